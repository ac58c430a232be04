"""IAR's balanced k-means clustering and nearest-neighbour reordering of a VQ codebook.

Paper: "Improving Autoregressive Visual Generation with Cluster-Oriented Token
Prediction" (IAR, CVPR 2025). Upstream: IAR ``balance_k_means.py``. Spec:
docs/iar.md#codebook-clustering.

The l2-normalised codebook rows are split into ``n_clusters`` clusters of exactly
``cluster_size`` codes by a greedy balanced k-means; the raw rows are then
reordered so that cluster c holds ids [m*c, m*c + m), ordered inside a cluster by
a nearest-neighbour chain grown outwards from the code closest to the cluster
mean. The old -> new id mapping is built from index bookkeeping (upstream matches
rows at squared distance < 1e-6, which breaks on duplicate rows), checked to be a
permutation, and checked to satisfy E_new[mapping[k]] == E_old[k].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class BalancedKMeansResult:
    """What :func:`balanced_kmeans` returns (all tensors int64 on the CPU except ``centers``)."""

    assignments: torch.Tensor  #: (K,) cluster of each original id
    permutation: torch.Tensor  #: (K,) permutation[new id] = old id, so E_new = E_old[permutation]
    mapping: torch.Tensor  #: (K,) mapping[old id] = new id (IAR's ``mapping.pt``)
    centers: torch.Tensor  #: (n_clusters, D) final cluster means (of the normalised rows)
    iterations: int  #: k-means iterations run
    converged: bool  #: whether the centres stopped moving (``allclose``) before ``max_iter``
    total_mse: float  #: sum over codes of the mean squared distance to their cluster mean


def greedy_balanced_assignment(distances: torch.Tensor, cluster_size: int) -> tuple[torch.Tensor, list[list[int]]]:
    """IAR's balanced assignment (docs/iar.md#codebook-clustering) for squared distances (K, n).

    Codes are visited in ascending order of the distance to their nearest centre
    and each joins the nearest centre whose cluster has fewer than ``cluster_size``
    members. Ties are broken by index (stable sorts). Returns the assignments (K,)
    and each cluster's members in the order they joined.
    """
    k, n = distances.shape
    d = distances.detach().cpu().numpy()
    visit = np.argsort(d.min(axis=1), kind="stable")
    first_choice = d.argmin(axis=1)  # the first minimum, as a stable argsort's head
    sizes = [0] * n
    assignments = np.full(k, -1, dtype=np.int64)
    members: list[list[int]] = [[] for _ in range(n)]
    for i in visit.tolist():
        c = int(first_choice[i])
        if sizes[c] >= cluster_size:  # nearest centre full: walk its preference list
            for c in np.argsort(d[i], kind="stable").tolist():
                if sizes[c] < cluster_size:
                    break
        sizes[c] += 1
        assignments[i] = c
        members[c].append(i)
    return torch.from_numpy(assignments), members


def nearest_neighbour_chain(vectors: torch.Tensor) -> torch.Tensor:
    """Order the m codes of one cluster (docs/iar.md#codebook-clustering): (m, D) -> positions (m,) with slot p holding row order[p].

    Slot m/2 - 1 is the code closest (Euclidean) to the mean; slot m/2 is the nearest
    unvisited code to it (squared Euclidean); then alternately slot m/2 - 2 - ii takes
    the nearest unvisited code to slot m/2 - 1 - ii, and slot m/2 + 1 + ii the nearest
    unvisited code to slot m/2 + ii. Ties go to the lowest row.
    """
    m = vectors.shape[0]
    half = m // 2
    dist = (torch.cdist(vectors, vectors, p=2) ** 2).cpu().numpy()  # (m, m), as upstream
    to_mean = torch.norm(vectors - vectors.mean(0), dim=1)
    visited = np.zeros(m, dtype=bool)
    order = np.full(m, -1, dtype=np.int64)

    def take(slot: int, row: int) -> None:
        order[slot] = row
        visited[row] = True

    def nearest_unvisited(row: int) -> int:
        return int(np.argmin(np.where(visited, np.inf, dist[row])))

    take(half - 1, int(torch.argmin(to_mean)))
    take(half, nearest_unvisited(int(order[half - 1])))
    for ii in range(half - 1):
        take(half - 2 - ii, nearest_unvisited(int(order[half - 1 - ii])))
        take(half + 1 + ii, nearest_unvisited(int(order[half + ii])))
    return torch.from_numpy(order)


def balanced_kmeans(
    codebook: torch.Tensor,
    n_clusters: int,
    cluster_size: int,
    seed: int = 42,
    max_iter: int = 100,
    *,
    normalize: bool = True,
    callback: Callable[[int, float], None] | None = None,
) -> BalancedKMeansResult:
    """Cluster a codebook (K, D) into ``n_clusters`` x ``cluster_size`` and derive its reordering (docs/iar.md#codebook-clustering).

    ``normalize`` l2-normalises the rows first (IAR clusters LlamaGen's normalised
    codebook); the reordering applies to the raw rows: ``E_new = E_old[permutation]``.
    ``seed`` seeds the initial centres (``torch.randperm``, docs/iar.md#codebook-clustering). ``callback`` is
    called after every iteration with (iteration, total intra-cluster MSE).

    Note: upstream seeds the global RNG with 42 and then builds the VQ model, which
    consumes random numbers before ``randperm``; its exact centres cannot be
    reproduced from the seed alone. Here the seed drives a private generator.
    """
    if codebook.ndim != 2:
        raise ValueError(f"codebook must be (K, D), got shape {tuple(codebook.shape)}")
    k = codebook.shape[0]
    if n_clusters < 1 or cluster_size < 2 or cluster_size % 2:
        raise ValueError(f"need n_clusters >= 1 and an even cluster_size >= 2 (the chain grows two ends "
                         f"from the middle, docs/iar.md#codebook-clustering); got {n_clusters}, {cluster_size}")
    if n_clusters * cluster_size != k:
        raise ValueError(f"n_clusters * cluster_size = {n_clusters} * {cluster_size} = "
                         f"{n_clusters * cluster_size} must equal the codebook size {k}")
    raw = codebook.detach().cpu()
    vectors = raw.float()
    if normalize:
        vectors = F.normalize(vectors, p=2, dim=-1)

    generator = torch.Generator().manual_seed(seed)
    centers = vectors[torch.randperm(k, generator=generator)[:n_clusters]]  # (n, D) distinct codes
    converged, iterations, total_mse = False, 0, float("nan")
    assignments = torch.empty(0, dtype=torch.int64)
    for iterations in range(1, max_iter + 1):
        distances = torch.cdist(vectors, centers, p=2) ** 2  # (K, n)
        assignments, members = greedy_balanced_assignment(distances, cluster_size)
        member_idx = torch.tensor(members, dtype=torch.int64)  # (n, m) in joining order
        grouped = vectors[member_idx]  # (n, m, D)
        new_centers = grouped.mean(1)  # (n, D)
        total_mse = float(((grouped - new_centers[:, None]) ** 2).mean(-1).sum())
        if callback is not None:
            callback(iterations, total_mse)
        done = torch.allclose(centers, new_centers)
        centers = new_centers
        if done:
            converged = True
            break

    # cluster c occupies new ids [m c, m c + m): members in ascending original id, then chained
    permutation = torch.empty(k, dtype=torch.int64)
    for c in range(n_clusters):
        ids = torch.nonzero(assignments == c).flatten()  # ascending original ids, (m,)
        permutation[c * cluster_size:(c + 1) * cluster_size] = ids[nearest_neighbour_chain(vectors[ids])]
    if not torch.equal(torch.sort(permutation).values, torch.arange(k)):
        raise AssertionError("balanced k-means reordering is not a permutation of the codebook ids")
    mapping = torch.empty(k, dtype=torch.int64)
    mapping[permutation] = torch.arange(k)
    if not torch.equal(raw[permutation][mapping], raw):
        raise AssertionError("reordered codebook fails E_new[mapping[k]] == E_old[k]")
    return BalancedKMeansResult(assignments=assignments, permutation=permutation, mapping=mapping,
                                centers=centers, iterations=iterations, converged=converged,
                                total_mse=total_mse)


def reorder_codebook(codebook: torch.Tensor, result: BalancedKMeansResult) -> torch.Tensor:
    """E_new = E_old[permutation]: the raw rows in the clustered order."""
    return codebook[result.permutation.to(codebook.device)]


def remap_ids(ids: torch.Tensor, mapping: torch.Tensor) -> torch.Tensor:
    """Codes extracted with the original codebook -> ids of the reordered one (x <- mapping[x], docs/iar.md#codebook-clustering)."""
    return mapping.to(ids.device)[ids]
