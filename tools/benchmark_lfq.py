#!/usr/bin/env python
"""Benchmark the LFQ training losses at K = 18 bits: time and peak memory, forward + backward.

See docs/open_magvit2.md#lfq-entropy-losses, docs/open_magvit2.md#computing-the-entropy-exactly. Methods:

* ``arforge``          -- arforge's exact computation: closed-form H_sample + bit-split H_codebook (docs/open_magvit2.md#computing-the-entropy-exactly);
* ``arforge_chunked``  -- arforge's exact chunked-over-codes H_codebook (docs/open_magvit2.md#computing-the-entropy-exactly);
* ``naive``            -- upstream Open-MAGVIT2's N x 2^K softmax, written out here (logits, probs,
                          log-probs, in fp32 on the CPU);
* ``vqp``              -- vector-quantize-pytorch's ``LFQ`` (optional; skipped with a message if not installed).

Every method sees the same input, ``torch.manual_seed(seed); z = torch.randn(B, K, grid, grid)``,
and computes the same objective 0.1 * (H_sample - H_codebook) + 0.25 * commitment. Each method
runs in a fresh subprocess, so the peak RSS (``ru_maxrss``) of one does not pollute another;
the baseline RSS (after imports and input creation) is reported as well. The loss values and the
largest input-gradient difference against ``arforge`` are printed so that equality is visible.

    python tools/benchmark_lfq.py --batch 2
    python tools/benchmark_lfq.py --batch 8 --json lfq_bench.json

Heavy methods are skipped when their estimated memory exceeds what the machine has available
(``--force`` runs them anyway). Speed is measured here, never in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("arforge", "arforge_chunked", "naive", "vqp")
#: rough peak bytes per element of one N x 2^K fp32 tensor, forward + backward (for the memory guard)
HEAVY_TENSORS = {"naive": 5.0, "vqp": 7.0}
TAU = 0.01
ENTROPY_WEIGHT = 0.1
COMMITMENT_WEIGHT = 0.25


# ====================================================================== the methods
def naive_losses(z, tau: float = TAU):
    """Upstream Open-MAGVIT2 ``LFQ.forward`` + ``entropy_loss``: full N x 2^K tensors."""
    import torch
    import torch.nn.functional as F

    b, k, h, w = z.shape
    x = z.permute(0, 2, 3, 1).reshape(b * h * w, k)  # (N, K)
    ids = torch.arange(1 << k)
    codebook = ((ids[:, None] >> torch.arange(k)) & 1).float() * 2 - 1  # (2^K, K), LSB-first
    logits = 2 * x @ codebook.T  # (N, 2^K)
    probs = F.softmax(logits / tau, -1)
    log_probs = F.log_softmax(logits / tau + 1e-5, -1)  # upstream's (dead) eps, kept for its cost
    avg_probs = probs.mean(0)
    codebook_entropy = -torch.sum(avg_probs * torch.log(avg_probs + 1e-5))
    sample_entropy = torch.mean(-torch.sum(probs * log_probs, -1))
    q = torch.where(x > 0, 1.0, -1.0)
    commitment = F.mse_loss(x, q.detach())
    return sample_entropy, codebook_entropy, commitment


def run_method(method: str, z):
    """Forward + backward of the LFQ objective; returns (H_sample, H_codebook, commitment, total)."""
    import torch

    if method in ("arforge", "arforge_chunked"):
        from arforge_plugins.quantizers.lookup_free_quantization import LookupFreeQuantizer

        quantizer = LookupFreeQuantizer(
            bits=z.shape[1], tau=TAU, entropy_weight=ENTROPY_WEIGHT, commitment_weight=COMMITMENT_WEIGHT,
            entropy_scope="local",
            codebook_entropy_method="bit_split" if method == "arforge" else "chunked").train()
        out = quantizer(z)
        total = sum(out.losses.values())
        total.backward()
        s = out.stats
        return s["per_sample_entropy"], s["codebook_entropy"], s["commitment"], total
    if method == "naive":
        hs, hc, commit = naive_losses(z)
        total = ENTROPY_WEIGHT * (hs - hc) + COMMITMENT_WEIGHT * commit
        total.backward()
        return hs, hc, commit, total
    if method == "vqp":
        from vector_quantize_pytorch import LFQ

        lfq = LFQ(dim=z.shape[1], codebook_size=1 << z.shape[1], entropy_loss_weight=ENTROPY_WEIGHT,
                  commitment_loss_weight=COMMITMENT_WEIGHT, diversity_gamma=1.0).train()
        (_, _, total), parts = lfq(z, inv_temperature=1.0 / TAU, return_loss_breakdown=True)
        total.backward()
        return parts.per_sample_entropy, parts.batch_entropy, parts.commitment, total
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def child(args: argparse.Namespace) -> None:
    """Run one method in this (fresh) process and print one JSON line."""
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.child == "vqp":
        try:
            import vector_quantize_pytorch  # noqa: F401
        except ImportError:
            print(json.dumps({"method": "vqp", "skipped": "vector-quantize-pytorch is not installed "
                              "(pip install vector-quantize-pytorch to include it)"}))
            return
    torch.manual_seed(args.seed)
    z0 = torch.randn(args.batch, args.bits, args.grid, args.grid).to(device)
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, values, grad = [], None, None
    started = time.perf_counter()
    for _ in range(args.repeats):
        z = z0.clone().requires_grad_(True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        values = run_method(args.child, z)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        grad = z.grad.detach().cpu().numpy()
        del z
        if time.perf_counter() - started > args.max_seconds:
            break
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: kilobytes
    if args.grad_file:
        np.save(args.grad_file, grad)
    result = {
        "method": args.child, "batch": args.batch, "tokens": args.batch * args.grid * args.grid,
        "bits": args.bits, "device": str(device), "threads": args.threads, "runs": len(times),
        "time_s_median": statistics.median(times), "time_s_min": min(times),
        "peak_rss_gb": peak_kb / 2**20, "baseline_rss_gb": baseline_kb / 2**20,
        "per_sample_entropy": float(values[0]), "codebook_entropy": float(values[1]),
        "commitment": float(values[2]), "total_loss": float(values[3]),
    }
    if device.type == "cuda":
        result["peak_device_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    print(json.dumps(result))


# ======================================================================= the parent
def available_bytes() -> int:
    """The host's free memory, as the sample job's automatic batch reads it."""
    import torch

    from arforge.memory import free_memory_bytes

    return free_memory_bytes(torch.device("cpu"))


def run_child(method: str, args: argparse.Namespace, grad_file: Path) -> dict:
    need = HEAVY_TENSORS.get(method, 0.0) * args.batch * args.grid ** 2 * (1 << args.bits) * 4
    avail = available_bytes()
    if args.device == "cpu" and need and avail is not None and need > 0.9 * avail and not args.force:
        return {"method": method, "batch": args.batch,
                "skipped": f"needs about {need / 2**30:.1f} GB, only {avail / 2**30:.1f} GB available "
                           "(--force runs it anyway)"}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", method, "--batch", str(args.batch),
           "--grid", str(args.grid), "--bits", str(args.bits), "--seed", str(args.seed),
           "--threads", str(args.threads), "--repeats", str(args.repeats),
           "--max-seconds", str(args.max_seconds), "--device", args.device, "--grad-file", str(grad_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        why = "killed (out of memory?)" if proc.returncode < 0 else f"exit code {proc.returncode}"
        return {"method": method, "batch": args.batch, "skipped": f"failed: {why}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


def print_table(rows: list[dict]) -> None:
    head = ("method", "batch", "tokens", "runs", "fwd+bwd s (min/median)", "peak RSS (GB)", "baseline (GB)",
            "H_sample", "H_codebook", "commitment", "total", "max|dgrad| vs arforge")
    fmt = "{:<16} {:>5} {:>6} {:>4} {:>22} {:>13} {:>13} {:>10} {:>10} {:>10} {:>10} {:>21}"
    print(fmt.format(*head))
    for r in rows:
        if "skipped" in r:
            print(f"{r['method']:<16} {r['batch']:>5}  skipped: {r['skipped']}")
            continue
        dgrad = r.get("max_abs_grad_diff")
        print(fmt.format(r["method"], r["batch"], r["tokens"], r["runs"],
                         f"{r['time_s_min']:.3f} / {r['time_s_median']:.3f}",
                         f"{r['peak_rss_gb']:.2f}", f"{r['baseline_rss_gb']:.2f}",
                         f"{r['per_sample_entropy']:.7f}", f"{r['codebook_entropy']:.7f}",
                         f"{r['commitment']:.7f}", f"{r['total_loss']:.7f}",
                         "-" if dgrad is None else f"{dgrad:.2e}"))
        if "peak_device_gb" in r:
            print(f"{'':<16} peak device memory {r['peak_device_gb']:.2f} GB")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8, help="images per batch (Open-MAGVIT2: 8 per device)")
    ap.add_argument("--grid", type=int, default=16, help="token grid side (16 x 16 at 256 px)")
    ap.add_argument("--bits", type=int, default=18, help="LFQ bits K (codebook 2^K)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    ap.add_argument("--repeats", type=int, default=10, help="timed runs per method (min and median reported)")
    ap.add_argument("--max-seconds", type=float, default=20.0,
                    help="stop repeating a method once this much time has passed (at least one run)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0, help="input seed (same input for every method)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--force", action="store_true", help="run heavy methods even if memory looks short")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--grad-file", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {METHODS}")

    import numpy as np

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:  # one at a time: never two heavy processes together
            print(f"running {method} (batch {args.batch}) ...", file=sys.stderr, flush=True)
            rows.append(run_child(method, args, Path(tmp) / f"{method}.npy"))
        ref = Path(tmp) / "arforge.npy"
        if ref.exists():
            g0 = np.load(ref)
            for r in rows:
                gf = Path(tmp) / f"{r['method']}.npy"
                if "skipped" not in r and gf.exists():
                    r["max_abs_grad_diff"] = float(np.abs(np.load(gf) - g0).max())
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
