"""Peak memory and time of one training step of GPT-B with and without ``grad_checkpointing``.

Builds LlamaGen GPT-B (``models.llamagen_gpt`` size "B", block_size 256, vocab 16384,
111M parameters) on the CPU in fp32 and runs training steps (train mode, dropout on;
forward + loss + backward, no optimizer) at batch 8 × 256 tokens, once with
checkpointing off (A) and once on (B), alternating A B A B …

Method (CPU; torch has no allocator statistics there, and ``tracemalloc`` does not see
torch's tensor memory): every run is a fresh subprocess, so no variant inherits another's
heap or high-water mark. In it the model is built, every ``.grad`` is allocated up front
(so parameters and gradients are in the baseline for both variants), the current resident
set (``/proc/self/statm``) is read as the baseline, one step runs, and the step's peak
memory is ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the process's peak resident set)
minus that baseline: the activations kept for backward plus the step's transient buffers.
This is sound when the step's peak exceeds the build's (checked and reported as
``valid``); freed memory that the allocator keeps is counted as used, as it would be on
the machine. Time per step is the wall time of each step after the first in the same
process (the first includes one-off allocation and kernel warm-up). On a shared machine
the times are indicative; the memory figures are not affected by load.

    .venv/bin/python tools/benchmark_grad_checkpointing.py [--batch 8] [--repeats 2] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def child(checkpointing: bool, batch: int, steps: int, seed: int) -> dict:
    import torch

    from arforge_plugins.models.ar_presets import llamagen_gpt

    torch.manual_seed(seed)
    model = llamagen_gpt("B", block_size=256, vocab_size=16384, grad_checkpointing=checkpointing).float().train()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    L = model.block_size
    tokens = torch.randint(0, 16384, (batch, L, 1))
    labels = torch.randint(0, 1000, (batch,))
    build_peak = _maxrss_bytes()
    baseline = _rss_bytes()
    times, losses, peak = [], [], None
    for i in range(steps):
        t0 = time.perf_counter()
        loss = model.loss(tokens, labels).total
        loss.backward()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
        if i == 0:
            peak = _maxrss_bytes()
    return {"grad_checkpointing": checkpointing, "batch": batch, "threads": torch.get_num_threads(),
            "params": model.num_params(), "baseline_rss_mib": baseline / 2**20,
            "step_peak_growth_mib": (peak - baseline) / 2**20, "valid": peak > build_peak,
            "step_s": times, "losses": losses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="A B pairs, each run in fresh subprocesses")
    ap.add_argument("--steps", type=int, default=3, help="steps per subprocess (the first is not timed)")
    ap.add_argument("--child", choices=["off", "on"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child == "on", args.batch, args.steps, seed=0)))
        return

    runs = {False: [], True: []}
    for r in range(args.repeats):
        for flag in (False, True):  # A B A B ...
            out = subprocess.run([sys.executable, __file__, "--child", "on" if flag else "off",
                                  "--batch", str(args.batch), "--steps", str(args.steps)],
                                 check=True, capture_output=True, text=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            runs[flag].append(res)
            print(f"run {r} grad_checkpointing={flag}: peak growth {res['step_peak_growth_mib']:.0f} MiB "
                  f"(valid={res['valid']}), steps {['%.2f' % t for t in res['step_s']]} s, "
                  f"loss {res['losses'][0]:.6f}", flush=True)

    print(f"\nGPT-B ({runs[False][0]['params'] / 1e6:.1f}M params), fp32 CPU, batch {args.batch} x 256 tokens, "
          f"{runs[False][0]['threads']} threads, {args.repeats} fresh processes per variant")
    for flag, name in ((False, "without checkpointing"), (True, "with checkpointing   ")):
        mem = [r["step_peak_growth_mib"] for r in runs[flag]]
        timed = [t for r in runs[flag] for t in r["step_s"][1:]] or [r["step_s"][0] for r in runs[flag]]
        each = ", ".join("%.0f" % m for m in mem)
        print(f"{name}: step peak memory {statistics.median(mem):7.0f} MiB (runs: {each}), "
              f"time/step median {statistics.median(timed):.2f} s (min {min(timed):.2f})")
    same = all(a["losses"][0] == b["losses"][0] for a, b in zip(runs[False], runs[True]))
    print(f"first-step losses identical with and without: {same}")


if __name__ == "__main__":
    main()
