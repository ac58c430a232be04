"""IAR's codebook clustering: balanced k-means and the cluster-ordered codebook (docs/iar.md)."""
