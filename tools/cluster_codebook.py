#!/usr/bin/env python
"""Cluster a VQ codebook with IAR's balanced k-means and write the reordered codebook and mapping.

The file-to-file form of ``jobs.cluster_codebook`` (the pipeline stage, same function:
``arforge_plugins.clustering.cluster_job.cluster_state``).

See docs/iar.md#codebook-clustering (IAR ``balance_k_means.py``). Reads the
codebook from

* an arforge safetensors weights file,
* an arforge checkpoint directory (``--entry`` names the weights, default ``model``), or
* a LlamaGen-layout ``.pt`` (e.g. ``vq_ds16_c2i.pt``), loaded safely with
  ``torch.load(weights_only=True)`` and an allow-list (``--entry`` picks the container entry).

Writes, into ``--output-dir`` (default: next to the input):

* ``<stem>-reorder-kmeans+nearest-cluster_size=<m>.safetensors``: every tensor of
  the chosen state dict, with only the codebook rows permuted (E_new = E_old[permutation]);
* ``mapping-kmeans+nearest-cluster_size=<m>.safetensors``: ``mapping`` (mapping[old id] =
  new id, IAR's ``mapping.pt``), ``permutation`` (its inverse) and ``assignments``;
  with ``--npy`` also ``mapping-...npy``. No pickle is written.

Example::

    python tools/cluster_codebook.py pretrained/vq_ds16_c2i.pt --clusters 128 --cluster-size 128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from arforge.checkpoint import (CheckpointError, load_checkpoint, load_foreign, load_weights, save_weights,
                                strip_wrapper_prefixes, unwrap_container)
from arforge.errors import ArforgeError
from arforge_plugins.clustering.cluster_job import cluster_state

CODEBOOK_SUFFIXES = ("quantize.embedding.weight", "embedding.weight")


def read_state(path: Path, entry: str) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict holding the codebook, and a description of where it came from."""
    if path.is_dir():
        ckpt = load_checkpoint(path)
        if entry not in ckpt.weights:
            raise CheckpointError(f"{path}: no weights named {entry!r}; it has {sorted(ckpt.weights)} (use --entry)")
        return ckpt.weights[entry], f"{ckpt.path} [{entry}]"
    if path.suffix == ".safetensors":
        return load_weights(path), str(path)
    state, where = unwrap_container(load_foreign(path), prefer=entry)
    return strip_wrapper_prefixes(state), f"{path} [{where}]"


def find_codebook_key(state: dict[str, torch.Tensor], key: str | None, source: str) -> str:
    if key is not None:
        if key not in state:
            raise CheckpointError(f"{source}: no key {key!r}; codebook-like keys: "
                                  f"{[k for k in state if k.endswith('embedding.weight')]}")
        return key
    found = [k for k in state if k.endswith(CODEBOOK_SUFFIXES) and "second" not in k]
    if len(found) != 1:
        raise CheckpointError(f"{source}: cannot tell which tensor is the codebook (candidates: {found}); "
                              "name it with --key, e.g. --key quantize.embedding.weight")
    return found[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", type=Path, help="codebook source: .safetensors, arforge checkpoint dir, or LlamaGen .pt")
    ap.add_argument("--key", default=None, help="codebook tensor name (default: the one '*embedding.weight')")
    ap.add_argument("--entry", default="model", help="container entry / checkpoint weights name (default: model)")
    ap.add_argument("--clusters", type=int, default=128, help="number of clusters n (IAR: 128)")
    ap.add_argument("--cluster-size", type=int, default=128, help="codes per cluster m (IAR: 128)")
    ap.add_argument("--seed", type=int, default=42, help="seed of the initial centres (IAR: 42)")
    ap.add_argument("--max-iter", type=int, default=100, help="k-means iterations at most (IAR: 100)")
    ap.add_argument("--no-normalize", action="store_true",
                    help="cluster the raw rows instead of the l2-normalised ones (IAR normalises)")
    ap.add_argument("--output-dir", type=Path, default=None, help="where to write (default: next to the input)")
    ap.add_argument("--npy", action="store_true", help="also write the mapping as .npy")
    args = ap.parse_args(argv)

    try:
        from tqdm import tqdm

        state, source = read_state(args.input, args.entry)
        key = find_codebook_key(state, args.key, source)
        codebook = state[key]
        print(f"codebook {key} {tuple(codebook.shape)} from {source}")
        bar = tqdm(total=args.max_iter, desc="balanced k-means", unit="it")

        def progress(it: int, mse: float) -> None:
            bar.update(1)
            bar.set_postfix(intra_mse=f"{mse:.4f}")

        # The same function jobs.cluster_codebook runs as a pipeline stage.
        try:
            reordered, result = cluster_state(state, key, clusters=args.clusters, cluster_size=args.cluster_size,
                                              seed=args.seed, max_iter=args.max_iter,
                                              normalize=not args.no_normalize, source=source, callback=progress)
        finally:
            bar.close()
        out_dir = args.output_dir or (args.input if args.input.is_dir() else args.input.parent)
        tag = f"kmeans+nearest-cluster_size={args.cluster_size}"
        stem = args.input.name if args.input.is_dir() else args.input.stem
        meta = {"source": source, "codebook_key": key, "clusters": args.clusters,
                "cluster_size": args.cluster_size, "seed": args.seed, "iterations": result.iterations,
                "converged": result.converged, "normalize": not args.no_normalize}
        weights_path = save_weights(out_dir / f"{stem}-reorder-{tag}.safetensors", reordered, meta)
        mapping_path = save_weights(out_dir / f"mapping-{tag}.safetensors",
                                    {"mapping": result.mapping, "permutation": result.permutation,
                                     "assignments": result.assignments}, meta)
        if args.npy:
            np.save(out_dir / f"mapping-{tag}.npy", result.mapping.numpy())
    except ArforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    sizes = torch.bincount(result.assignments, minlength=args.clusters)
    vectors = codebook.detach().float().cpu()
    if not args.no_normalize:
        vectors = torch.nn.functional.normalize(vectors, dim=-1)
    per_cluster = ((vectors[result.permutation].view(args.clusters, args.cluster_size, -1)
                    - result.centers[:, None]) ** 2).sum(-1).mean(1)  # mean squared distance to the centre
    print(f"iterations: {result.iterations} ({'converged' if result.converged else 'stopped at --max-iter'}), "
          f"total intra-cluster MSE {result.total_mse:.4f}")
    print(f"cluster sizes: min {int(sizes.min())}, max {int(sizes.max())}, mean {sizes.float().mean():.1f} "
          f"over {args.clusters} clusters")
    q = torch.quantile(per_cluster, torch.tensor([0.0, 0.5, 1.0]))
    print(f"per-cluster mean squared distance to centre: min {q[0]:.4f}, median {q[1]:.4f}, max {q[2]:.4f}")
    print(f"wrote {weights_path}\nwrote {mapping_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
