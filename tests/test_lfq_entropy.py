"""LFQ entropy terms (docs/open_magvit2.md#lfq-entropy-losses, docs/open_magvit2.md#computing-the-entropy-exactly): every exact form against a brute-force softmax."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from arforge_plugins.quantizers.lookup_free_quantization import (
    LookupFreeQuantizer,
    codebook_entropy,
    codebook_prob_sum_bit_split,
    codebook_prob_sum_chunked,
    lfq_entropy,
    sample_entropy,
)

TAU = 0.01


def naive_entropy(x: torch.Tensor, tau: float = TAU, eps: float = 1e-5):
    """Upstream's definition, materialising N x 2^K: (H_sample, H_codebook, p_bar)."""
    k = x.shape[-1]
    codes = ((torch.arange(1 << k)[:, None] >> torch.arange(k)) & 1).to(x.dtype) * 2 - 1  # (2^K, K) LSB-first
    logits = 2 * x @ codes.T / tau  # (N, 2^K)
    probs = logits.softmax(-1)
    h_sample = -(probs * logits.log_softmax(-1)).sum(-1).mean()
    p_bar = probs.mean(0)
    h_codebook = -(p_bar * torch.log(p_bar + eps)).sum()
    return h_sample, h_codebook, p_bar


def tokens(n: int, k: int, scale: float, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g, dtype=torch.float64) * scale).to(dtype)


# ------------------------------------------------------------ forms vs brute force
@pytest.mark.parametrize("scale", [1.0, 0.01, 0.002])  # confident tokens ... nearly uniform ones
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float64, 1e-6)])
def test_all_forms_match_brute_force_k10(scale, dtype, rtol):
    x = tokens(37, 10, scale, dtype)
    hs_ref, hc_ref, pbar_ref = naive_entropy(x)
    atol = 1e-5 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(sample_entropy(x, tau=TAU), hs_ref, rtol=rtol, atol=atol)
    for split in (0, 3, 5, 9, 10):
        psum = codebook_prob_sum_bit_split(x, tau=TAU, split=split)
        torch.testing.assert_close(psum / 37, pbar_ref, rtol=rtol, atol=atol * 1e-2)
        torch.testing.assert_close(codebook_entropy(psum, 37.0), hc_ref, rtol=rtol, atol=atol)
    for chunk in (100, 1024, 5000):
        psum = codebook_prob_sum_chunked(x, tau=TAU, chunk_size=chunk)
        torch.testing.assert_close(psum / 37, pbar_ref, rtol=rtol, atol=atol * 1e-2)
        torch.testing.assert_close(codebook_entropy(psum, 37.0), hc_ref, rtol=rtol, atol=atol)


def test_temperature_is_a_real_setting():
    x = tokens(37, 10, 0.05)
    for tau in (0.01, 0.05, 0.3):
        hs_ref, hc_ref, _ = naive_entropy(x, tau=tau)
        hs, hc = lfq_entropy(x, tau=tau, split=4)
        torch.testing.assert_close(hs, hs_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hc, hc_ref, rtol=1e-5, atol=1e-5)
    assert not torch.isclose(lfq_entropy(x, tau=0.01)[0], lfq_entropy(x, tau=0.3)[0])


def test_k18_bit_split_matches_chunked_and_brute_force():
    x = tokens(6, 18, 0.05)
    hs_ref, hc_ref, pbar_ref = naive_entropy(x)  # 6 x 2^18 is small enough here
    split = codebook_prob_sum_bit_split(x, tau=TAU, split=9)
    chunked = codebook_prob_sum_chunked(x, tau=TAU, chunk_size=1 << 14)
    assert split.shape == chunked.shape == (1 << 18,)
    torch.testing.assert_close(split, chunked, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(split / 6, pbar_ref, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(codebook_entropy(split, 6.0), codebook_entropy(chunked, 6.0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(codebook_entropy(split, 6.0), hc_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sample_entropy(x, tau=TAU), hs_ref, rtol=1e-5, atol=1e-5)
    # the AR factorisation's split (6 | 12) gives the same p_bar in the same id order
    torch.testing.assert_close(codebook_prob_sum_bit_split(x, tau=TAU, split=6), split, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("scale", [3.0, 1.0, 0.01, 1e-4])
def test_entropy_bounds(scale):
    k = 12
    x = tokens(50, k, scale, seed=3)
    hs, hc = lfq_entropy(x, tau=TAU)
    assert hs >= 0 and hs <= k * math.log(2) + 1e-4
    assert hc <= k * math.log(2) + 1e-4
    x18 = tokens(40, 18, scale, seed=4)
    hs, hc = lfq_entropy(x18, tau=TAU)
    assert hs >= 0 and hc <= 18 * math.log(2) + 1e-4


def test_uniform_limit_reaches_ln_codebook_size():
    x = torch.zeros(5, 10)  # every code equally likely
    hs, hc = lfq_entropy(x, tau=TAU)
    torch.testing.assert_close(hs, torch.tensor(10 * math.log(2)), rtol=1e-6, atol=1e-5)
    p = torch.tensor(2.0 ** -10)
    torch.testing.assert_close(hc, -(2 ** 10) * p * torch.log(p + 1e-5), rtol=1e-6, atol=1e-5)


# --------------------------------------------------------------- reference values
def test_spec_reference_values():
    """docs/open_magvit2.md#computing-the-entropy-exactly: seed 0, randn(2, 18, 16, 16), train mode, fp32."""
    torch.manual_seed(0)
    z = torch.randn(2, 18, 16, 16)
    out = LookupFreeQuantizer().train()(z)
    assert abs(out.stats["per_sample_entropy"].item() - 0.0685680) < 1e-6
    assert abs(out.stats["codebook_entropy"].item() - 6.3004408) < 1e-5
    assert abs(out.stats["commitment"].item() - 0.4088554) < 1e-6
    torch.testing.assert_close(out.losses["entropy"], torch.tensor(0.1 * (0.0685680 - 6.3004408)), atol=2e-6, rtol=0)
    torch.testing.assert_close(out.losses["commitment"], torch.tensor(0.25 * 0.4088554), atol=1e-6, rtol=0)
    # the exact value without the 1e-5 inside the log (fp64): 6.3068925
    x = z.double().permute(0, 2, 3, 1).reshape(-1, 18)
    p = codebook_prob_sum_bit_split(x, tau=TAU, split=9) / x.shape[0]
    assert abs(-torch.special.xlogy(p, p).sum().item() - 6.3068925) < 1e-6


# ---------------------------------------------------------------------- gradients
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-7), (torch.float32, 2e-4)])
@pytest.mark.parametrize("method", ["bit_split", "chunked"])
def test_gradients_equal_brute_force(dtype, rtol, method):
    x0 = tokens(37, 10, 0.03, dtype, seed=1)
    w_s, w_b = 1.0, 1.3

    x = x0.clone().requires_grad_(True)
    hs, hc, _ = naive_entropy(x)
    (w_s * hs - w_b * hc).backward()
    g_ref = x.grad.clone()

    x = x0.clone().requires_grad_(True)
    with torch.autocast("cpu", enabled=False):
        hs = sample_entropy(x, tau=TAU)
        psum = (codebook_prob_sum_bit_split(x, tau=TAU, split=4) if method == "bit_split"
                else codebook_prob_sum_chunked(x, tau=TAU, chunk_size=300))
        hc = codebook_entropy(psum, 37.0)
    (w_s * hs - w_b * hc).backward()
    assert g_ref.abs().max() > 0
    torch.testing.assert_close(x.grad, g_ref, rtol=rtol, atol=rtol * g_ref.abs().max().item())


def test_module_gradient_equals_brute_force():
    """The quantizer's full loss (entropy + commitment) backpropagates the naive gradient into z."""
    torch.manual_seed(2)
    z0 = torch.randn(1, 10, 6, 6, dtype=torch.float64) * 0.03
    q = LookupFreeQuantizer(bits=10, entropy_scope="local").train()
    z = z0.clone().requires_grad_(True)
    sum(q(z).losses.values()).backward()

    zr = z0.clone().requires_grad_(True)
    x = zr.permute(0, 2, 3, 1).reshape(-1, 10)
    hs, hc, _ = naive_entropy(x)
    commit = (x - torch.where(x > 0, 1.0, -1.0).to(x.dtype)).pow(2).mean()
    (0.1 * (hs - hc) + 0.25 * commit).backward()
    torch.testing.assert_close(z.grad, zr.grad, rtol=1e-7, atol=1e-12)


# ---------------------------------------------------------------------- precision
def test_autocast_bf16_gives_fp32_values_and_gradients():
    torch.manual_seed(0)
    z0 = torch.randn(2, 18, 4, 4)
    q = LookupFreeQuantizer().train()

    z = z0.clone().requires_grad_(True)
    out = q(z)
    sum(out.losses.values()).backward()
    ref_stats, ref_grad = out.stats, z.grad.clone()

    z = z0.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z)
        total = sum(out.losses.values())
    total.backward()
    for key in ("per_sample_entropy", "codebook_entropy", "commitment"):
        assert out.stats[key].dtype == torch.float32
        assert torch.equal(out.stats[key], ref_stats[key]), key
    assert torch.equal(z.grad, ref_grad)
    # autocast really was active: an unguarded matmul would have run in bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = z0.permute(0, 2, 3, 1).reshape(-1, 18)
        assert (x @ x.T).dtype == torch.bfloat16


# -------------------------------------------------------------------- eval + scope
def test_eval_mode_has_no_losses():
    q = LookupFreeQuantizer(bits=10).eval()
    out = q(torch.randn(1, 10, 3, 3))
    assert out.losses == {}
    assert "codebook_entropy" not in out.stats


_WORKER = textwrap.dedent("""
    import json, os, sys, torch
    from arforge_plugins.quantizers.lookup_free_quantization import LookupFreeQuantizer
    rank, world, store, scope, out = int(sys.argv[1]), 2, sys.argv[2], sys.argv[3], sys.argv[4]
    torch.distributed.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world)
    torch.distributed.barrier()  # joining is no sync point: see tests/two_ranks.py
    torch.manual_seed(0)
    z_all = torch.randn(4, 10, 3, 3, dtype=torch.float64) * 0.05
    z = z_all[2 * rank: 2 * rank + 2].clone().requires_grad_(True)
    q = LookupFreeQuantizer(bits=10, entropy_scope=scope).train()
    o = q(z)
    sum(o.losses.values()).backward()
    json.dump({"hc": o.stats["codebook_entropy"].item(), "hs": o.stats["per_sample_entropy"].item(),
               "grad": z.grad.flatten().tolist()}, open(out, "w"))
    torch.distributed.barrier()  # with the local scope no collective ran: neither rank may leave early
    torch.distributed.destroy_process_group()
""")


@pytest.mark.multirank
@pytest.mark.parametrize("scope", ["global", "local"])
def test_entropy_scope_across_two_ranks(tmp_path, scope):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(tmp_path / "store"), scope,
                               str(tmp_path / f"out{r}.json")], env=env) for r in range(2)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    res = [json.loads((tmp_path / f"out{r}.json").read_text()) for r in range(2)]

    torch.manual_seed(0)
    z_all = torch.randn(4, 10, 3, 3, dtype=torch.float64) * 0.05
    q = LookupFreeQuantizer(bits=10, entropy_scope="local").train()
    if scope == "global":
        # p_bar over both ranks' tokens, as on one device holding the whole batch
        hc_global = q(z_all).stats["codebook_entropy"].item()
        # DDP averages the ranks' gradients, so each rank's gradient must be world_size times the
        # one-device gradient of the whole-batch loss with respect to that rank's tokens (with the
        # entropy's gradient flowing into the local tokens only, it was half that for H_codebook).
        zr = z_all.clone().requires_grad_(True)
        sum(q(zr).losses.values()).backward()
        for r in range(2):
            assert abs(res[r]["hc"] - hc_global) < 1e-9
            torch.testing.assert_close(torch.tensor(res[r]["grad"], dtype=torch.float64),
                                       2 * zr.grad[2 * r: 2 * r + 2].flatten(), rtol=1e-7, atol=1e-12)
    else:
        for r in range(2):
            o = q(z_all[2 * r: 2 * r + 2])
            assert abs(res[r]["hc"] - o.stats["codebook_entropy"].item()) < 1e-9
        assert abs(res[0]["hc"] - res[1]["hc"]) > 1e-6
