"""``jobs.cluster_codebook``: IAR's codebook clustering as a pipeline stage (docs/iar.md#codebook-clustering).

It sits between the tokenizer and the AR training: it reads a trained (or official) VQ
tokenizer, clusters its codebook with :func:`balanced_kmeans` into ``clusters`` x
``cluster_size`` codes and writes, into its run folder,

* ``checkpoints/``: an arforge checkpoint of the tokenizer with only the codebook rows permuted
  (E_new = E_old[permutation]): later stages load it with ``loaders.arforge_checkpoint``, so
  codes extracted with it, the AR model's targets and the sampler's decoder all use the
  cluster-ordered ids (cluster c holds ids [m·c, m·c + m), which ``models.iar_gpt``'s
  cluster-oriented loss reads as t // m);
* ``mapping.npy`` (mapping[old id] = new id, IAR's ``mapping.pt``) and ``mapping.safetensors``
  (mapping, permutation, assignments): codes already extracted with the original tokenizer are
  remapped when read (``datasets.token_codes.remap``).

``tools/cluster_codebook.py`` does the same on a file, through the same :func:`cluster_state`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import torch

from arforge import checkpoint as ck
from arforge import validation as V
from arforge.errors import ArforgeError

from arforge_plugins.clustering.balanced_kmeans import BalancedKMeansResult, balanced_kmeans, reorder_codebook


def cluster_state(state: Mapping[str, torch.Tensor], key: str, *, clusters: int, cluster_size: int,
                  seed: int = 42, max_iter: int = 100, normalize: bool = True, source: str = "the tokenizer",
                  callback: Callable[[int, float], None] | None = None,
                  ) -> tuple[dict[str, torch.Tensor], BalancedKMeansResult]:
    """``state`` with its codebook ``key`` reordered by balanced k-means, and the clustering."""
    if key not in state:
        raise ArforgeError(f"{source} has no tensor {key!r}; codebook-like keys: "
                           f"{[k for k in state if k.endswith('embedding.weight')]}")
    codebook = state[key]
    if codebook.ndim != 2 or codebook.shape[0] != clusters * cluster_size:
        raise ArforgeError(f"{source}: {key} has shape {tuple(codebook.shape)}, but clusters x cluster_size = "
                           f"{clusters} x {cluster_size} = {clusters * cluster_size} rows are needed")
    result = balanced_kmeans(codebook, clusters, cluster_size, seed=seed, max_iter=max_iter,
                             normalize=normalize, callback=callback)
    reordered = dict(state)
    reordered[key] = reorder_codebook(codebook, result)
    return reordered, result


def cluster_codebook(ctx, *, tokenizer: torch.nn.Module, clusters: int = 128, cluster_size: int = 128,
                     codebook_key: str = "quantize.embedding.weight", seed: int = 42, max_iter: int = 100,
                     normalize: bool = True) -> dict[str, float]:
    """Cluster a trained VQ tokenizer's codebook for IAR and save the reordered tokenizer.

    Args:
        tokenizer: the trained VQ tokenizer, through a loader (``@x/loaders.arforge_checkpoint()`` or
            ``@x/loaders.official_llamagen_vq()``): its codebook has ``clusters * cluster_size`` rows.
        clusters / cluster_size: n and m (docs/iar.md#codebook-clustering: 128 x 128 for VQ-16);
            ``models.iar_gpt.cluster_size`` must be m.
        codebook_key: the codebook tensor in the tokenizer's state dict.
        seed / max_iter: initial centres and iteration cap (IAR: 42, 100).
        normalize: cluster the l2-normalised rows (IAR does; the raw rows are what is reordered).
    """
    V.check_args("jobs.cluster_codebook", locals(), where=ctx, clusters=V.POSITIVE_INT,
                 cluster_size=V.POSITIVE_INT, codebook_key=V.TEXT, seed=V.NON_NEGATIVE_INT,
                 max_iter=V.POSITIVE_INT, normalize=V.BOOL)
    # Clustering random weights would quietly give the AR stage a meaningless order.
    source = ck.require_loaded(tokenizer, binding="jobs.cluster_codebook.tokenizer")
    state = {k: v.detach().cpu() for k, v in tokenizer.state_dict().items()}
    history: list[float] = []

    def progress(iteration: int, mse: float) -> None:
        history.append(mse)
        ctx.tracker.log_metrics({"cluster/intra_mse": mse}, step=iteration)

    reordered, result = cluster_state(state, codebook_key, clusters=clusters, cluster_size=cluster_size, seed=seed,
                                      max_iter=max_iter, normalize=normalize, source=f"{source} ({type(tokenizer).__name__})",
                                      callback=progress)
    sizes = torch.bincount(result.assignments, minlength=clusters)
    metrics = {"intra_mse": result.total_mse, "iterations": float(result.iterations),
               "converged": float(result.converged), "cluster_size_min": float(sizes.min()),
               "cluster_size_max": float(sizes.max())}
    ctx.log(f"balanced k-means: {result.iterations} iterations "
            f"({'converged' if result.converged else 'stopped at max_iter'}), intra-cluster MSE {result.total_mse:.4f}, "
            f"{clusters} clusters of {int(sizes.min())}..{int(sizes.max())} codes")
    if ctx.is_main:
        out = ctx.output_dir
        meta: dict[str, Any] = {"source": str(source), "codebook_key": codebook_key, "clusters": clusters,
                                "cluster_size": cluster_size, "seed": seed, "iterations": result.iterations,
                                "converged": result.converged, "normalize": normalize}
        final = ck.save_checkpoint(out / "checkpoints", 0, {"model": reordered},
                                   config={"job": "cluster_codebook", **meta})
        ck.save_weights(out / "mapping.safetensors", {"mapping": result.mapping, "permutation": result.permutation,
                                                      "assignments": result.assignments},
                        {k: str(v) for k, v in meta.items()})
        np.save(out / "mapping.npy", result.mapping.numpy())
        ctx.tracker.log_metrics({f"cluster/{k}": v for k, v in metrics.items()}, step=result.iterations)
        ctx.tracker.log_artifact(out / "mapping.safetensors", "cluster")
        ctx.extra["checkpoint"] = str(final)
    return metrics
