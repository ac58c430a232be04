"""IAR balanced k-means and codebook reordering (docs/iar.md#codebook-clustering)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from arforge_plugins.clustering.balanced_kmeans import (
    balanced_kmeans,
    greedy_balanced_assignment,
    nearest_neighbour_chain,
    remap_ids,
    reorder_codebook,
)


def codebook(k: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(k, d, generator=torch.Generator().manual_seed(seed)) * 0.3


def slow_reference(raw: torch.Tensor, n: int, m: int, seed: int, max_iter: int = 100):
    """docs/iar.md#codebook-clustering written out with Python loops and float64 distances."""
    vecs = F.normalize(raw.float(), dim=-1)
    pts = vecs.double().tolist()
    k = len(pts)
    start = torch.randperm(k, generator=torch.Generator().manual_seed(seed))[:n].tolist()
    centers = [list(pts[i]) for i in start]

    def sq(a, b):
        return sum((x - y) ** 2 for x, y in zip(a, b))

    for _ in range(max_iter):
        dist = [[sq(p, c) for c in centers] for p in pts]
        order = sorted(range(k), key=lambda i: (min(dist[i]), i))
        sizes, assign, members = [0] * n, [-1] * k, [[] for _ in range(n)]
        for i in order:
            for c in sorted(range(n), key=lambda c: (dist[i][c], c)):
                if sizes[c] < m:
                    sizes[c] += 1
                    assign[i] = c
                    members[c].append(i)
                    break
        new = [[sum(pts[i][j] for i in mem) / m for j in range(len(pts[0]))] for mem in members]
        done = all(abs(a - b) <= 1e-8 + 1e-5 * abs(b) for c0, c1 in zip(centers, new) for a, b in zip(c0, c1))
        centers = new
        if done:
            break
    perm = []
    for c in range(n):
        ids = [i for i in range(k) if assign[i] == c]  # ascending original id
        cp = [pts[i] for i in ids]
        mean = [sum(v[j] for v in cp) / m for j in range(len(cp[0]))]
        first = min(range(m), key=lambda r: (math.sqrt(sq(cp[r], mean)), r))
        slots, seen = [None] * m, set()

        def put(slot, row):
            slots[slot] = row
            seen.add(row)

        def nearest(row):
            return min((r for r in range(m) if r not in seen), key=lambda r: (sq(cp[row], cp[r]), r))

        h = m // 2
        put(h - 1, first)
        put(h, nearest(first))
        for ii in range(h - 1):
            put(h - 2 - ii, nearest(slots[h - 1 - ii]))
            put(h + 1 + ii, nearest(slots[h + ii]))
        perm += [ids[r] for r in slots]
    return torch.tensor(assign), torch.tensor(perm)


@pytest.mark.parametrize("k,d,n,m,seed", [(64, 3, 8, 8, 42), (48, 4, 4, 12, 7), (128, 8, 16, 8, 0)])
def test_matches_slow_reference(k, d, n, m, seed):
    raw = codebook(k, d, seed=seed + 1)
    res = balanced_kmeans(raw, n, m, seed=seed)
    ref_assign, ref_perm = slow_reference(raw, n, m, seed)
    assert torch.equal(res.assignments, ref_assign)
    assert torch.equal(res.permutation, ref_perm)


def test_balance_permutation_and_mapping():
    raw = codebook(96, 8)
    res = balanced_kmeans(raw, 6, 16, seed=3)
    assert torch.equal(torch.bincount(res.assignments, minlength=6), torch.full((6,), 16))
    assert torch.equal(torch.sort(res.mapping).values, torch.arange(96))
    assert torch.equal(res.mapping[res.permutation], torch.arange(96))
    new = reorder_codebook(raw, res)
    assert torch.equal(new[res.mapping], raw)  # E_new[mapping[k]] == E_old[k]
    assert torch.equal(res.mapping // 16, res.assignments)  # cluster c holds ids [16c, 16c + 16)
    ids = torch.randint(0, 96, (2, 10))
    assert torch.equal(new[remap_ids(ids, res.mapping)], raw[ids])


def test_deterministic_for_a_seed():
    raw = codebook(64, 4)
    a, b = balanced_kmeans(raw, 8, 8, seed=11), balanced_kmeans(raw, 8, 8, seed=11)
    assert torch.equal(a.mapping, b.mapping) and a.iterations == b.iterations
    others = [balanced_kmeans(raw, 8, 8, seed=s).mapping for s in (1, 2, 3)]
    assert any(not torch.equal(o, a.mapping) for o in others)


def test_duplicate_rows_still_give_a_permutation():
    """Upstream matches rows at distance < 1e-6 and breaks on duplicates (docs/iar.md#codebook-clustering); bookkeeping does not."""
    base = codebook(16, 4)
    raw = torch.cat([base, base])  # every row twice
    res = balanced_kmeans(raw, 4, 8, seed=0)
    assert torch.equal(torch.sort(res.mapping).values, torch.arange(32))
    assert torch.equal(reorder_codebook(raw, res)[res.mapping], raw)


def test_greedy_assignment_prefers_nearest_open_cluster():
    # 3 codes, 2 centres, capacity 2: codes 0 and 1 are nearest to centre 0, code 1 is closer,
    # code 2 also wants centre 0 but it is full by then -> centre 1
    dist = torch.tensor([[0.2, 5.0], [0.1, 4.0], [0.3, 0.9]])
    assign, members = greedy_balanced_assignment(dist, 2)
    assert assign.tolist() == [0, 0, 1] and members == [[1, 0], [2]]
    dist = torch.tensor([[0.2, 5.0], [0.1, 4.0], [0.15, 0.9]])  # now code 2 beats code 0 to centre 0
    assign, _ = greedy_balanced_assignment(dist, 2)
    assert assign.tolist() == [1, 0, 0]


def test_nearest_neighbour_chain_by_hand():
    x = torch.tensor([0.0, 10.0, 1.0, 15.0, 3.0, 6.0])[:, None]  # rows in scrambled order
    order = nearest_neighbour_chain(x)
    # mean 5.83 -> 6 in slot 2; 3 nearest to 6 -> slot 3; 10 (nearest to 6) -> slot 1;
    # 1 (nearest to 3) -> slot 4; 15 (nearest to 10) -> slot 0; 0 -> slot 5
    assert x[order, 0].tolist() == [15.0, 10.0, 6.0, 3.0, 1.0, 0.0]


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="must equal the codebook size"):
        balanced_kmeans(codebook(50, 4), 8, 8)
    with pytest.raises(ValueError, match="even cluster_size"):
        balanced_kmeans(codebook(45, 4), 5, 9)


def test_cluster_codebook_tool(tmp_path):
    """The tool reads a LlamaGen-layout .pt (weights_only + allow-list) and writes safetensors only."""
    import argparse
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "cluster_codebook", Path(__file__).resolve().parents[1] / "tools" / "cluster_codebook.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    raw = codebook(64, 8)
    other = torch.randn(3, 3)
    torch.save({"model": {"quantize.embedding.weight": raw, "quantize.codebook_used": torch.zeros(8),
                          "decoder.w": other}, "args": argparse.Namespace(lr=1e-4)}, tmp_path / "vq.pt")
    assert tool.main([str(tmp_path / "vq.pt"), "--clusters", "8", "--cluster-size", "8", "--npy",
                      "--output-dir", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    new = load_file(str(out / "vq-reorder-kmeans+nearest-cluster_size=8.safetensors"))
    maps = load_file(str(out / "mapping-kmeans+nearest-cluster_size=8.safetensors"))
    mapping = maps["mapping"]
    assert torch.equal(new["quantize.embedding.weight"][mapping], raw)
    assert torch.equal(new["decoder.w"], other)
    assert torch.equal(mapping, balanced_kmeans(raw, 8, 8, seed=42).mapping)
    assert np.array_equal(np.load(out / "mapping-kmeans+nearest-cluster_size=8.npy"), mapping.numpy())
    assert tool.main([str(tmp_path / "vq.pt"), "--clusters", "8", "--cluster-size", "7"]) == 2
