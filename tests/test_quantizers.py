"""The three quantizer plugins: ids, round trips, straight-through gradients, losses vs slow references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from arforge.errors import ConfigError
from arforge.interfaces import Quantizer, QuantizerOutput
from arforge_plugins.quantizers.lookup_free_quantization import (
    LookupFreeQuantizer,
    bits_to_ids,
    ids_to_bits,
    merge_ids,
    reverse_bit_order,
    split_ids,
)
from arforge_plugins.quantizers.semantic_detail_quantization import SemanticDetailQuantizer
from arforge_plugins.quantizers.vector_quantization import VectorQuantizer, vq_entropy_terms


def features(b, c, h, w, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, w, generator=g, dtype=torch.float64).to(dtype)


def st_normalised_grad(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """d/dz of sum(w * z/|z|) per position: (w - ẑ(ẑ.w)) / |z| (channels on axis 1)."""
    norm = z.norm(dim=1, keepdim=True)
    z_hat = z / norm
    return (w - z_hat * (z_hat * w).sum(1, keepdim=True)) / norm


@pytest.mark.parametrize("make", [
    lambda: VectorQuantizer(codebook_size=32, dim=4),
    lambda: LookupFreeQuantizer(bits=6),
    lambda: SemanticDetailQuantizer(semantic_codebook_size=8, detail_codebook_size=16, dim=4),
])
def test_protocol_and_output_shapes(make):
    q = make()
    assert isinstance(q, Quantizer)
    z = features(2, q.dim, 3, 5).requires_grad_(True)
    out = q.train()(z)
    assert isinstance(out, QuantizerOutput)
    assert out.z_q.shape == z.shape
    assert out.ids.shape == (2, 15, len(q.codebook_sizes)) and out.ids.dtype == torch.int64
    for i, size in enumerate(q.codebook_sizes):
        assert 0 <= int(out.ids[..., i].min()) and int(out.ids[..., i].max()) < size
    assert out.losses and all(v.ndim == 0 and v.requires_grad for v in out.losses.values())
    assert all(not v.requires_grad for v in out.stats.values())
    assert torch.equal(q.encode(z), out.ids)
    assert q.eval()(z).losses == {}


# ============================================================================ LFQ
def test_lfq_fixed_ids_and_bit_order():
    k = 18
    one = -torch.ones(k)
    one[0] = 1
    top = -torch.ones(k)
    top[17] = 1
    q = LookupFreeQuantizer()
    assert q.codes_to_ids(one).item() == 1 and q.codes_to_ids(top).item() == 1 << 17
    assert torch.equal(q.ids_to_codes(torch.tensor([1])), one)
    assert torch.equal(q.ids_to_codes(torch.tensor([1 << 17])), top)
    msb = LookupFreeQuantizer(bit_order="msb")
    assert msb.codes_to_ids(one).item() == 1 << 17 and msb.codes_to_ids(top).item() == 1
    ids = torch.randint(0, 1 << k, (100,))
    assert torch.equal(reverse_bit_order(ids, k), bits_to_ids(ids_to_bits(ids, k, msb_first=False), msb_first=True))
    assert torch.equal(reverse_bit_order(reverse_bit_order(ids, k), k), ids)


def test_lfq_bits_ids_round_trip_and_strict_threshold():
    ids = torch.randint(0, 1 << 18, (4, 50))
    bits = ids_to_bits(ids, 18)
    assert bits.shape == (4, 50, 18)
    assert torch.equal(bits_to_ids(bits), ids)
    manual = sum(bits[..., d].long() << d for d in range(18))
    assert torch.equal(manual, ids)
    q = LookupFreeQuantizer(bits=4)
    z = torch.tensor([0.0, 1e-8, -1e-8, 0.5]).view(1, 4, 1, 1)
    assert q.encode(z).item() == 0b1010  # 0 -> -1 (strict > 0), channel 1 and 3 are +1
    with pytest.raises(ValueError, match="ids must lie"):
        ids_to_bits(torch.tensor([1 << 18]), 18)


def test_lfq_factorised_split_6_12():
    assert split_ids(torch.tensor(1)).tolist() == [1, 0]
    assert split_ids(torch.tensor(1 << 6)).tolist() == [0, 1]  # channel 6 alone: post bit 0
    assert split_ids(torch.tensor(1 << 17)).tolist() == [0, 1 << 11]
    ids = torch.randint(0, 1 << 18, (3, 40))
    sub = split_ids(ids, (6, 12))
    assert sub.shape == (3, 40, 2)
    assert int(sub[..., 0].max()) < 64 and int(sub[..., 1].max()) < 4096
    assert torch.equal(sub[..., 0] + 64 * sub[..., 1], ids)
    assert torch.equal(merge_ids(sub), ids)
    bits = ids_to_bits(ids, 18)
    assert torch.equal(sub[..., 0], bits_to_ids(bits[..., :6]))  # pre = channels 0-5, LSB-first
    assert torch.equal(sub[..., 1], bits_to_ids(bits[..., 6:]))  # post = channels 6-17, LSB-first


def test_lfq_encode_decode_round_trip():
    q = LookupFreeQuantizer(bits=18)
    z = features(2, 18, 4, 3)
    ids = q.encode(z)
    dec = q.decode(ids, (4, 3))
    assert torch.equal(dec, torch.where(z > 0, 1.0, -1.0))
    assert torch.equal(q.encode(dec), ids)
    assert torch.equal(q.train()(z).z_q, dec)
    assert q.state_dict() == {}  # no parameters, no persistent buffers
    with pytest.raises(ValueError, match=r"\(B, 18, h, w\)"):
        q(torch.randn(1, 17, 2, 2))
    with pytest.raises(ValueError, match="ids must have shape"):
        q.decode(ids, (3, 3))


def test_lfq_straight_through_gradient():
    z0 = features(2, 8, 3, 3)
    w = features(2, 8, 3, 3, seed=1)
    q = LookupFreeQuantizer(bits=8).eval()
    z = z0.clone().requires_grad_(True)
    (q(z).z_q * w).sum().backward()
    assert torch.equal(z.grad, w)  # identity through sign
    # in training, the commitment term adds 0.25 * 2 (z - q) / numel; entropy off here
    q = LookupFreeQuantizer(bits=8, entropy_weight=0.0).train()
    z = z0.clone().requires_grad_(True)
    out = q(z)
    assert set(out.losses) == {"commitment"}
    ((out.z_q * w).sum() + sum(out.losses.values())).backward()
    expected = w + 0.25 * 2 * (z0 - torch.where(z0 > 0, 1.0, -1.0)) / z0.numel()
    torch.testing.assert_close(z.grad, expected)


def test_lfq_losses_match_naive_softmax():
    """Weighted losses equal upstream's formula with the full softmax (K = 10, every weight and tau set)."""
    z = features(2, 10, 3, 3, dtype=torch.float64) * 0.05
    q = LookupFreeQuantizer(bits=10, tau=0.05, sample_entropy_weight=0.7, codebook_entropy_weight=1.2,
                            entropy_weight=0.3, commitment_weight=0.5, entropy_scope="local").train()
    out = q(z)
    x = z.permute(0, 2, 3, 1).reshape(-1, 10)
    codes = torch.tensor([[1.0 if (j >> d) & 1 else -1.0 for d in range(10)] for j in range(1024)],
                         dtype=torch.float64)
    logits = 2 * x @ codes.T / 0.05
    probs = logits.softmax(-1)
    hs = -(probs * logits.log_softmax(-1)).sum(-1).mean()
    avg = probs.mean(0)
    hc = -(avg * torch.log(avg + 1e-5)).sum()
    commit = (x - torch.where(x > 0, 1.0, -1.0).double()).pow(2).mean()
    torch.testing.assert_close(out.losses["entropy"], 0.3 * (0.7 * hs - 1.2 * hc), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.losses["commitment"], 0.5 * commit, rtol=1e-12, atol=0)


def test_lfq_config_errors():
    with pytest.raises(ConfigError, match="entropy_scope"):
        LookupFreeQuantizer(entropy_scope="world")
    with pytest.raises(ConfigError, match="bit_order"):
        LookupFreeQuantizer(bit_order="big")
    with pytest.raises(ConfigError, match="tau"):
        LookupFreeQuantizer(tau=0)
    with pytest.raises(ConfigError, match="entropy_split"):
        LookupFreeQuantizer(bits=10, entropy_split=11)
    with pytest.raises(ConfigError, match="applies to codebook_entropy_method='bit_split'"):
        LookupFreeQuantizer(codebook_entropy_method="chunked", entropy_split=6)


# ============================================================================= VQ
def slow_vq_reference(z: torch.Tensor, weight: torch.Tensor, beta: float, ratio: float, tau: float):
    """Explicit loops over positions and codes (float64, Python math)."""
    b, d, h, w = z.shape
    codebook = [[float(v) for v in row] for row in weight.double()]
    codebook = [[v / math.sqrt(sum(c * c for c in row)) for v in row] for row in codebook]
    ids, zq, zh = [], [], []
    for bi in range(b):
        for y in range(h):
            for x in range(w):
                vec = [float(z[bi, c, y, x]) for c in range(d)]
                norm = math.sqrt(sum(v * v for v in vec))
                vec = [v / norm for v in vec]
                dist = [sum((vec[c] - row[c]) ** 2 for c in range(d)) for row in codebook]
                i = min(range(len(dist)), key=dist.__getitem__)
                ids.append(i)
                zq.append(codebook[i])
                zh.append(vec)
    n = len(ids)
    mse = sum((zq[t][c] - zh[t][c]) ** 2 for t in range(n) for c in range(d)) / (n * d)
    # entropy: a_nk = -|ẑ_n - ê_k|^2, p = softmax(a / tau)
    k = len(codebook)
    h_sample, avg = 0.0, [0.0] * k
    for t in range(n):
        a = [-sum((zh[t][c] - codebook[j][c]) ** 2 for c in range(d)) / tau for j in range(k)]
        mx = max(a)
        lse = mx + math.log(sum(math.exp(v - mx) for v in a))
        for j in range(k):
            p = math.exp(a[j] - lse)
            h_sample -= p * (a[j] - lse) / n
            avg[j] += p / n
    h_batch = -sum(p * math.log(p + 1e-5) for p in avg)
    return ids, {"vq": mse, "commitment": beta * mse, "entropy": ratio * (h_sample - h_batch)}


def test_vq_init_names_and_official_layout():
    q = VectorQuantizer(codebook_size=64, dim=8)
    assert list(q.state_dict()) == ["embedding.weight"]
    torch.testing.assert_close(q.embedding.weight.norm(dim=1), torch.ones(64))
    official = {"embedding.weight": torch.randn(64, 8) * 3}  # raw rows, normalised at use
    q.load_state_dict(official, strict=True)
    torch.testing.assert_close(q.normalized_codebook(), F.normalize(official["embedding.weight"], dim=-1))
    defaults = VectorQuantizer()
    assert defaults.codebook_sizes == (16384,) and defaults.dim == 8


def test_vq_init_is_uniform_then_normalised():
    torch.manual_seed(5)
    q = VectorQuantizer(codebook_size=16, dim=8)
    torch.manual_seed(5)
    torch.empty(16, 8).normal_()  # nn.Embedding's own init draws first, as in LlamaGen
    raw = torch.empty(16, 8).uniform_(-1 / 16, 1 / 16)
    torch.testing.assert_close(q.embedding.weight.data, F.normalize(raw, dim=-1))


def test_vq_round_trip_and_decode():
    q = VectorQuantizer(codebook_size=64, dim=8)
    z = features(2, 8, 4, 4)
    ids = q.encode(z)
    dec = q.decode(ids, (4, 4))
    assert torch.equal(q.encode(dec), ids)
    torch.testing.assert_close(dec.norm(dim=1), torch.ones(2, 4, 4))
    torch.testing.assert_close(q.eval()(z).z_q, dec)
    all_ids = torch.arange(64)[:, None]
    assert torch.equal(q.codes_to_ids(q.ids_to_codes(all_ids)), all_ids)
    with pytest.raises(ValueError, match="must lie in"):
        q.decode(torch.full((1, 4, 1), 64), (2, 2))


def test_vq_losses_match_explicit_loops():
    torch.manual_seed(1)
    q = VectorQuantizer(codebook_size=12, dim=4, beta=0.25, entropy_loss_ratio=0.5,
                        entropy_temperature=0.05, entropy_chunk_size=5).double().train()
    z = features(2, 4, 2, 3, dtype=torch.float64)
    out = q(z)
    ids, ref = slow_vq_reference(z, q.embedding.weight.detach(), 0.25, 0.5, 0.05)
    assert out.ids.flatten().tolist() == ids
    assert set(out.losses) == {"vq", "commitment", "entropy"}
    for key, value in ref.items():
        assert abs(out.losses[key].item() - value) < 1e-10, key
    # the default ratio 0 leaves the term out entirely
    assert "entropy" not in VectorQuantizer(codebook_size=12, dim=4).train()(z.float()).losses


def test_vq_entropy_chunked_gradients_equal_full_softmax():
    torch.manual_seed(3)
    z_hat = F.normalize(torch.randn(9, 4, dtype=torch.float64), dim=-1).requires_grad_(True)
    e_hat = F.normalize(torch.randn(13, 4, dtype=torch.float64), dim=-1).requires_grad_(True)
    hs, hb = vq_entropy_terms(z_hat, e_hat, tau=0.1, chunk_size=4)
    (hs - 2 * hb).backward()
    g_z, g_e = z_hat.grad.clone(), e_hat.grad.clone()
    z_hat.grad = e_hat.grad = None
    a = -torch.cdist(z_hat, e_hat) ** 2 / 0.1
    p = a.softmax(-1)
    hs_ref = -(p * a.log_softmax(-1)).sum(-1).mean()
    avg = p.mean(0)
    hb_ref = -(avg * torch.log(avg + 1e-5)).sum()
    torch.testing.assert_close(hs, hs_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hb, hb_ref, rtol=1e-10, atol=1e-12)
    (hs_ref - 2 * hb_ref).backward()
    torch.testing.assert_close(g_z, z_hat.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(g_e, e_hat.grad, rtol=1e-8, atol=1e-10)


def test_vq_straight_through_uses_normalised_input():
    z0 = features(2, 8, 3, 3)
    w = features(2, 8, 3, 3, seed=1)
    q = VectorQuantizer(codebook_size=32, dim=8).eval()
    z = z0.clone().requires_grad_(True)
    (q(z).z_q * w).sum().backward()
    assert z.grad.abs().sum() > 0
    torch.testing.assert_close(z.grad, st_normalised_grad(z0, w))
    # in training, the codebook gets the vq-loss gradient, z the commitment one
    q.train()
    z = z0.clone().requires_grad_(True)
    out = q(z)
    sum(out.losses.values()).backward()
    assert q.embedding.weight.grad.abs().sum() > 0 and z.grad.abs().sum() > 0


def test_vq_usage_is_a_non_persistent_diagnostic():
    q = VectorQuantizer(codebook_size=64, dim=8)
    z = features(3, 8, 4, 4)
    ids = q.encode(z)
    distinct = torch.unique(ids).numel()
    assert int((q.usage_counts() > 0).sum()) == distinct
    assert int(q.usage_counts().sum()) == ids.numel()
    out = q.train()(z)
    torch.testing.assert_close(out.stats["codebook_usage"], torch.tensor(distinct / 64))
    assert list(q.state_dict()) == ["embedding.weight"]
    q.reset_usage()
    assert int(q.usage_counts().sum()) == 0


def test_vq_autocast_lookup_is_fp32():
    q = VectorQuantizer(codebook_size=64, dim=8)
    z = features(2, 8, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ids = q.encode(z)
    assert torch.equal(ids, q.encode(z))


# ============================================================ semantic-detail (IAR2)
def slow_sd_reference(z, e1, e2):
    """Explicit loops: s by normalised E1, d by raw E2 on the un-normalised residual."""
    b, d, h, w = z.shape
    e1 = F.normalize(e1.double(), dim=-1)
    e2 = e2.double()
    pairs, zq, zh = [], [], []
    for bi in range(b):
        for y in range(h):
            for x in range(w):
                v = F.normalize(z[bi, :, y, x].double(), dim=0)
                s = min(range(e1.shape[0]), key=lambda k: float(((v - e1[k]) ** 2).sum()))
                r = v - e1[s]
                dd = min(range(e2.shape[0]), key=lambda j: float(((r - e2[j]) ** 2).sum()))
                pairs.append((s, dd))
                zq.append(e1[s] + e2[dd])
                zh.append(v)
    zq, zh = torch.stack(zq), torch.stack(zh)
    return pairs, ((zq - zh) ** 2).mean().item(), zq


def make_sd(**kw):
    torch.manual_seed(0)
    return SemanticDetailQuantizer(semantic_codebook_size=8, detail_codebook_size=16, dim=4, **kw)


def test_sd_layout_and_init():
    q = make_sd()
    assert sorted(q.state_dict()) == ["embedding.weight", "embedding_second"]
    assert isinstance(q.embedding_second, torch.nn.Parameter)
    torch.testing.assert_close(q.embedding_second.norm(dim=1), torch.ones(16))  # normalised once
    assert q.codebook_sizes == (8, 16)
    d = SemanticDetailQuantizer()
    assert d.codebook_sizes == (256, 4096) and d.dim == 8


def test_sd_ids_and_losses_match_loops_with_raw_e2():
    q = make_sd().double().train()
    with torch.no_grad():
        q.embedding_second.mul_(0.3)  # E2 is used raw: a scaled E2 must change the codes accordingly
    z = features(2, 4, 3, 3, dtype=torch.float64)
    out = q(z)
    pairs, mse, zq = slow_sd_reference(z, q.embedding.weight.detach(), q.embedding_second.detach())
    assert [tuple(p) for p in out.ids.reshape(-1, 2).tolist()] == pairs
    assert abs(out.losses["vq"].item() - mse) < 1e-12
    assert abs(out.losses["commitment"].item() - 0.25 * mse) < 1e-12
    torch.testing.assert_close(out.z_q.permute(0, 2, 3, 1).reshape(-1, 4), zq)
    torch.testing.assert_close(q.decode(out.ids, (3, 3)), out.z_q)


def test_sd_semantic_only_pass():
    q = make_sd().train()
    z = features(2, 4, 3, 3)
    full = q(z)
    out = q(z, semantic_only=True)
    assert torch.equal(out.ids, full.ids)
    sem = q.decode(out.ids, (3, 3), semantic_only=True)
    torch.testing.assert_close(out.z_q, sem)
    z_hat = F.normalize(z, dim=1)
    torch.testing.assert_close(out.losses["vq"], ((sem - z_hat) ** 2).mean())
    q.zero_grad()
    sum(out.losses.values()).backward()
    assert q.embedding.weight.grad.abs().sum() > 0
    assert q.embedding_second.grad is None  # E2 plays no part in the semantic-only pass
    q.zero_grad()
    sum(q(z).losses.values()).backward()
    assert q.embedding_second.grad.abs().sum() > 0


def test_sd_stage1_mode_is_exactly_the_vq():
    q = make_sd(detail_codebook=False).train()
    assert list(q.state_dict()) == ["embedding.weight"] and q.codebook_sizes == (8,)
    vq = VectorQuantizer(codebook_size=8, dim=4).train()
    vq.load_state_dict(q.state_dict())
    z = features(2, 4, 3, 3)
    a, b = q(z), vq(z)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.z_q, b.z_q)
    assert a.losses.keys() == b.losses.keys()
    for k in a.losses:
        assert torch.equal(a.losses[k], b.losses[k])
    ids = q.encode(z)
    assert ids.shape == (2, 9, 1)
    assert torch.equal(q.encode(q.decode(ids, (3, 3))), ids)  # round trip


def test_sd_stage2_from_stage1_checkpoint():
    stage1 = make_sd(detail_codebook=False)
    with torch.no_grad():
        stage1.embedding.weight.mul_(2.0)
    sd1 = stage1.state_dict()
    # route 1: stage-1 module, strict load, then add E2
    q = make_sd(detail_codebook=False)
    q.load_state_dict(sd1, strict=True)
    q.add_detail_codebook()
    assert sorted(q.state_dict()) == ["embedding.weight", "embedding_second"]
    assert q.codebook_sizes == (8, 16) and torch.equal(q.embedding.weight, sd1["embedding.weight"])
    assert q.encode(features(1, 4, 2, 2)).shape == (1, 4, 2)
    with pytest.raises(ConfigError, match="already has"):
        q.add_detail_codebook()
    # route 2: stage-2 module, load E1 only
    q2 = make_sd()
    e2 = q2.embedding_second.detach().clone()
    q2.load_stage1_state_dict(sd1)
    assert torch.equal(q2.embedding.weight, sd1["embedding.weight"]) and torch.equal(q2.embedding_second, e2)
    with pytest.raises(ConfigError, match="exactly 'embedding.weight'"):
        q2.load_stage1_state_dict(q2.state_dict())


def test_sd_round_trips():
    q = make_sd()
    z = features(2, 4, 4, 4)
    ids = q.encode(z)
    codes = q.ids_to_codes(ids)
    assert codes.shape == (2, 16, 2, 4)
    assert torch.equal(q.codes_to_ids(codes), ids)
    # the semantic id survives decode -> encode of q1
    again = q.encode(q.decode(ids, (4, 4), semantic_only=True))
    assert torch.equal(again[..., 0], ids[..., 0])
    all_pairs = torch.cartesian_prod(torch.arange(8), torch.arange(16))  # (128, 2)
    assert torch.equal(q.codes_to_ids(q.ids_to_codes(all_pairs)), all_pairs)


def test_sd_straight_through_gradient():
    z0 = features(2, 4, 3, 3)
    w = features(2, 4, 3, 3, seed=1)
    q = make_sd().eval()
    z = z0.clone().requires_grad_(True)
    (q(z).z_q * w).sum().backward()
    torch.testing.assert_close(z.grad, st_normalised_grad(z0, w))


def test_sd_usage_stats():
    q = make_sd()
    z = features(4, 4, 4, 4)
    out = q(z)
    s, d = out.ids[..., 0].flatten(), out.ids[..., 1].flatten()
    torch.testing.assert_close(out.stats["usage_semantic"], torch.tensor(torch.unique(s).numel() / 8))
    torch.testing.assert_close(out.stats["usage_detail"], torch.tensor(torch.unique(d).numel() / 16))
    torch.testing.assert_close(out.stats["usage_pairs"], torch.tensor(torch.unique(s * 16 + d).numel() / 128))
    out2 = q(features(4, 4, 4, 4, seed=9))
    assert out2.stats["usage_pairs"] >= out.stats["usage_pairs"]  # cumulative since reset
    q.reset_usage()
    out3 = q(z)
    torch.testing.assert_close(out3.stats["usage_pairs"], out.stats["usage_pairs"])
