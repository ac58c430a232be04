#!/usr/bin/env python
"""Benchmark class-conditional sampling: images/s and tokens/s with CFG on, with and without the KV cache.

See docs/llamagen.md#kv-cache (where the time goes), docs/llamagen.md#sampling (generation),
docs/llamagen.md#kv-cache. Models have random weights (docs/llamagen.md#llama-backbone initialisation);
the speed does not depend on them. Per model:

* **cached** -- :func:`arforge.generation.generate` (caches allocated once), with the
  family's CFG schedule (LlamaGen constant 2.0, Open-MAGVIT2 (1.9, 2.0), IAR2 adaptive
  attention-guided 1.75 -> 3.0, w_attn 0.05: docs/llamagen.md#sampling-defaults). Each decode step is split into the
  backbone step, the head's sub-steps (sub-step k runs up to the logits of sub-token k)
  and the logit processing + sampling of each sub-token. ``--steps N`` decodes only the
  first N positions and extrapolates ``median step x L`` (the median resists other
  processes' load on a shared machine); later positions attend over a longer prefix, so
  the extrapolation is a slight underestimate (labelled ``extrap``). The breakdown
  columns are medians over the timed steps.
* **no cache** -- :func:`arforge.generation.no_cache_step`: each position recomputes the
  whole model over its prefix (the backbone once, the head once per sub-token). Its cost
  grows with the position, so it is timed at ``--no-cache-positions`` positions spread
  over 0 ... L-1 (the fastest of ``--repeat`` runs each) and the full sequence is the sum
  of the piecewise-linear interpolation (``interp``); ``--no-cache-full`` decodes every
  position instead (``measured``). The model's forward computes the heads and logits at
  every position of the prefix (it has no last-position-only mode), which for IAR2's
  5-block head with its 4096-way detail MLP is most of the no-cache cost. IAR2
  uses constant CFG (1.75, 1.75) here: the full forward does not expose the class
  attention that adaptive CFG needs (same batch layout, same cost otherwise).

images/s = B / (seconds per image batch), tokens/s = B * L / (seconds per batch), with
L positions per image (each of K sub-tokens is part of one position).

    python tools/benchmark_sampling.py --models llamagen-tiny,open_magvit2-tiny,iar2-tiny
    python tools/benchmark_sampling.py --models llamagen-B,open_magvit2-B,iar2-B --steps 8 \\
        --no-cache-positions 3 --json sampling_bench.json

Speed is measured here, never in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from arforge.ar_model import ARModel, DecodeInfo
from arforge.generation import generate, no_cache_step, process_logits, sampling_settings
from arforge.guidance import AdaptiveAttentionCFG, ConstantCFG, GuidedBatch
from arforge_plugins.models import ar_presets

FAMILIES = {
    # name: (builder, default guidance, guidance without class attention)
    "llamagen": (ar_presets.llamagen_gpt, lambda: ConstantCFG(scale=2.0), lambda: ConstantCFG(scale=2.0)),
    "open_magvit2": (ar_presets.open_magvit2_ar, lambda: ConstantCFG(scale=(1.9, 2.0)),
                     lambda: ConstantCFG(scale=(1.9, 2.0))),
    "iar2": (ar_presets.iar2_gpt, lambda: AdaptiveAttentionCFG(), lambda: ConstantCFG(scale=(1.75, 1.75))),
}


@dataclass
class Result:
    model: str
    params_m: float
    L: int
    K: int
    batch: int
    path: str
    guidance: str
    positions_timed: int
    how: str  #: measured | extrap | interp
    seconds_per_batch: float
    images_per_s: float
    tokens_per_s: float
    ms_per_step: float  #: mean over all L positions (cached: over the timed ones)
    breakdown_ms: dict[str, float] = field(default_factory=dict)  #: cached: per step means


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(name: str, dtype: torch.dtype, device: torch.device) -> tuple[ARModel, str]:
    family, _, size = name.rpartition("-")
    if family not in FAMILIES:
        raise SystemExit(f"unknown model {name!r}: use <family>-<size> with family in {', '.join(FAMILIES)}")
    torch.manual_seed(0)
    model = FAMILIES[family][0](size)  # the family's default vocabulary and block size (docs/llamagen.md#model-sizes)
    return model.to(device=device, dtype=dtype).eval(), family


class StepTimer:
    """Wraps the model's decode_step, backbone.step and head.decode_position to time their parts."""

    def __init__(self, model: ARModel, device: torch.device):
        self.model, self.device = model, device
        self.rows: list[dict[str, float]] = []
        self._marks: list[tuple[str, float]] = []
        self._orig = (model.decode_step, model.backbone.step, model.head.decode_position)
        decode_step, backbone_step, head_decode = self._orig

        def now() -> float:
            _sync(device)
            return time.perf_counter()

        def timed_backbone(*a, **kw):
            t0 = now()
            out = backbone_step(*a, **kw)
            self._marks.append(("backbone", now() - t0))
            return out

        def timed_head(h, n, choose):
            last = [now()]

            def timed_choose(k, logits):
                t = now()
                self._marks.append((f"head_sub{k}", t - last[0]))
                tok = choose(k, logits)
                last[0] = now()
                self._marks.append((f"sample_sub{k}", last[0] - t))
                return tok

            out = head_decode(h, n, timed_choose)
            self._marks.append(("head_tail", now() - last[0]))
            return out

        def timed_step(*a, **kw):
            self._marks = []
            t0 = now()
            out = decode_step(*a, **kw)
            row = {"step": now() - t0}
            for key, v in self._marks:
                row[key] = row.get(key, 0.0) + v
            row["other"] = row["step"] - sum(v for k, v in row.items() if k != "step")
            self.rows.append(row)
            return out

        model.decode_step = timed_step  # instance attributes shadow the methods
        model.backbone.step = timed_backbone
        model.head.decode_position = timed_head

    def restore(self) -> None:
        for obj, attr in ((self.model, "decode_step"), (self.model.backbone, "step"),
                          (self.model.head, "decode_position")):
            del obj.__dict__[attr]


def bench_cached(model: ARModel, name: str, guidance, batch: int, steps: int | None,
                 device: torch.device) -> Result:
    L = model.block_size
    n_pos = L if steps is None else min(steps, L)
    labels = torch.arange(batch, device=device) % 1000
    settings = sampling_settings(model.num_subtokens)
    generate(model, labels, guidance=guidance, sampling=settings, seed=0, num_positions=min(2, L))  # warm-up
    timer = StepTimer(model, device)
    try:
        _sync(device)
        t0 = time.perf_counter()
        generate(model, labels, guidance=guidance, sampling=settings, seed=0, num_positions=n_pos)
        _sync(device)
        wall = time.perf_counter() - t0
    finally:
        timer.restore()
    rows = timer.rows
    keys = sorted({k for r in rows for k in r})
    median_ms = {k: 1000 * float(np.median([r.get(k, 0.0) for r in rows])) for k in keys}
    median_ms["step_mean"] = 1000 * wall / n_pos
    per_step = wall / n_pos if n_pos == L else median_ms["step"] / 1000
    total = wall if n_pos == L else per_step * L
    return Result(model=name, params_m=model.num_params() / 1e6, L=L, K=model.num_subtokens, batch=batch,
                  path="kv cache", guidance=type(guidance).__name__, positions_timed=n_pos,
                  how="measured" if n_pos == L else "extrap", seconds_per_batch=total,
                  images_per_s=batch / total, tokens_per_s=batch * L / total, ms_per_step=1000 * per_step,
                  breakdown_ms=median_ms)


def bench_no_cache(model: ARModel, name: str, guidance, batch: int, positions: int, full: bool,
                   device: torch.device, repeat: int = 1) -> Result:
    L, K = model.block_size, model.num_subtokens
    labels = torch.arange(batch, device=device) % 1000
    rows = GuidedBatch(guidance, batch=batch)
    labels_c = rows.labels(labels, null_class=model.null_class)
    settings = sampling_settings(K)
    gen = torch.Generator(device=device).manual_seed(0)

    def choose(k: int, logits: torch.Tensor, info: DecodeInfo) -> torch.Tensor:
        tok = process_logits(logits, cfg_scale=rows.scale(k, rows.info(info)), guided=rows.guided,
                             sampling=settings[k], generator=gen)
        return rows.tokens(tok)

    g = torch.Generator().manual_seed(1)
    tokens = torch.stack([torch.randint(0, v, (batch, L), generator=g) for v in model.vocab_sizes], -1).to(device)

    def step(n: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        no_cache_step(model, tokens, labels_c, n, choose, batch=rows)
        _sync(device)
        return time.perf_counter() - t0

    step(0)  # warm-up
    if full:
        times = [step(n) for n in range(L)]
        total, timed, how = float(sum(times)), L, "measured"
    else:
        at = sorted({int(round(x)) for x in np.linspace(0, L - 1, max(positions, 2))})
        times = [min(step(n) for _ in range(max(repeat, 1))) for n in at]
        total = float(np.interp(np.arange(L), at, times).sum())  # piecewise linear in the position
        timed, how = len(at), "interp"
    return Result(model=name, params_m=model.num_params() / 1e6, L=L, K=K, batch=batch, path="no cache",
                  guidance=type(guidance).__name__, positions_timed=timed, how=how, seconds_per_batch=total,
                  images_per_s=batch / total, tokens_per_s=batch * L / total, ms_per_step=1000 * total / L,
                  breakdown_ms={} if full else {f"pos{n}": 1000 * t for n, t in zip(at, times)})


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _table(results: list[Result]) -> str:
    head = (f"{'model':<18}{'params':>9}{'L':>5}{'K':>3}{'B':>4}  {'path':<9}{'timed':>6} {'how':<9}"
            f"{'ms/step':>9}{'s/batch':>10}{'img/s':>9}{'tok/s':>9}  breakdown (ms per step)")
    lines = [head, "-" * len(head)]
    for r in results:
        if r.path == "kv cache":
            b = r.breakdown_ms
            parts = [f"backbone {b.get('backbone', 0):.1f}"]
            parts += [f"head{k} {b.get(f'head_sub{k}', 0):.1f}" for k in range(r.K)]
            parts += [f"sample{k} {b.get(f'sample_sub{k}', 0):.2f}" for k in range(r.K)]
            parts.append(f"other {b.get('other', 0) + b.get('head_tail', 0):.1f}")
            parts.append(f"(step median {b.get('step', 0):.1f}, mean {b['step_mean']:.1f})")
            detail = ", ".join(parts)
        else:
            detail = ", ".join(f"{k} {v:.0f}" for k, v in r.breakdown_ms.items()) or "every position"
        lines.append(f"{r.model:<18}{r.params_m:>8.1f}M{r.L:>5}{r.K:>3}{r.batch:>4}  {r.path:<9}"
                     f"{r.positions_timed:>6} {r.how:<9}{r.ms_per_step:>9.1f}{r.seconds_per_batch:>10.2f}"
                     f"{r.images_per_s:>9.3f}{r.tokens_per_s:>9.1f}  {detail}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="llamagen-tiny,open_magvit2-tiny,iar2-tiny",
                    help="comma-separated <family>-<size>: families llamagen, open_magvit2, iar2; sizes as "
                         "in arforge_plugins.models.ar_presets (tiny, B, L, ...)")
    ap.add_argument("--batch", type=int, default=1, help="images per batch (the caches hold 2x with CFG)")
    ap.add_argument("--steps", type=int, default=None,
                    help="cached path: decode only the first N positions and extrapolate (default: all)")
    ap.add_argument("--no-cache-positions", type=int, default=4,
                    help="no-cache path: positions timed over 0 ... L-1 (0 skips the no-cache path)")
    ap.add_argument("--no-cache-full", action="store_true", help="no-cache path: decode every position")
    ap.add_argument("--repeat", type=int, default=1, help="no-cache path: runs per timed position (fastest kept)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "processor": platform.processor(), "threads": torch.get_num_threads(), "device": str(device),
           "dtype": args.dtype, "batch": args.batch, "steps": args.steps,
           "no_cache_positions": args.no_cache_positions, "no_cache_full": args.no_cache_full,
           "repeat": args.repeat, "load_average": _loadavg(),
           "argv": sys.argv[1:] if argv is None else argv}
    print(json.dumps(env))
    results: list[Result] = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        t0 = time.perf_counter()
        model, family = build(name, dtype, device)
        _, cached_guidance, plain_guidance = FAMILIES[family]
        with torch.no_grad():
            results.append(bench_cached(model, name, cached_guidance(), args.batch, args.steps, device))
            print(_table(results[-1:]).splitlines()[-1], flush=True)
            if args.no_cache_positions > 0 or args.no_cache_full:
                results.append(bench_no_cache(model, name, plain_guidance(), args.batch, args.no_cache_positions,
                                              args.no_cache_full, device, args.repeat))
                print(_table(results[-1:]).splitlines()[-1], flush=True)
        model.release_caches()
        del model
        print(f"# {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    print()
    print(_table(results))
    print(f"# load average at the end: {_loadavg()} on {os.cpu_count()} CPUs")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "results": [asdict(r) for r in results]}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
