#!/usr/bin/env python
"""Sampling and training speed of arforge, side by side with the reference code, on the same weights.

    # arforge alone (as tools/benchmark_sampling.py, without the breakdown)
    python tools/benchmark.py --family llamagen --size B --batch 8 --positions 32

    # against the reference code in a local checkout (never copied into arforge)
    python tools/benchmark.py --against llamagen --upstream-dir ~/src/LlamaGen --batch 8 --positions 32
    python tools/benchmark.py --against iar2 --upstream-dir ~/src/IAR2 --batch 4 --positions 24
    python tools/benchmark.py --against open_magvit2 --upstream-dir ~/src/Open-MAGVIT2 --batch 4 --positions 16
    python tools/benchmark.py --against llamagen --upstream-dir ~/src/LlamaGen --train --batch 8

Results and the exact commands that made them: docs/performance.md.

**Same weights.** The upstream module is built at paper size (LlamaGen GPT-B at 16x16, IAR2-B at
24x24, Open-MAGVIT2 AR-B at 16x16) and every tensor is drawn from a seeded generator
(``make_parity_fixtures._randomize``: upstream zero-initialises its output heads, which would make
every logit 0). Its state dict is saved to a temporary file in the official container (LlamaGen:
the DDP trainer dict with ``args``; IAR2: the FSDP bare dict of ``IAR2-B.pth``; Open-MAGVIT2: the
Lightning ``state_dict`` under ``transformer.``) and read into arforge through the registered
loader (``loaders.official_llamagen_gpt`` / ``official_iar2_gpt`` / ``official_open_magvit2_ar``),
as a user loads a release file (docs/checkpoints.md#loading).

**Same tokens before any timing.** Both sides decode the first ``--positions`` positions of a
small batch in float32 at ``top_k = 1`` with the family's guidance, and the token ids must be
equal; otherwise the tool stops. Upstream's samplers draw with ``torch.multinomial`` and
arforge's with exponential races, so no seed makes their random draws alike: the timed runs then
sample at the family's default ``top_k`` (what each sampler really computes), and their tokens are
not compared. With ``--dtype bfloat16`` the check still runs in float32 (the two codes round
differently in bf16); the share of equal top-1 tokens in bf16 is printed, not asserted.

**Timing.** One warm-up run of each side, then ``--repeats`` rounds of upstream, arforge
(A B A B ...); printed: each run with its process user/sys CPU time and minor page faults (where a
run lost time to the kernel rather than to arithmetic), the medians, the spread (min-max), the
ratio upstream/arforge of the medians and of the best runs, and the machine (CPU model, cores,
torch threads, torch version, dtype, load average). On a shared machine use ``--threads 1``:
with more threads than free cores, OpenMP barriers wait on descheduled threads.

**``--positions N``** decodes only the first N positions of each image on both sides, with every
cache, mask and CFG schedule sized for the full sequence, so each timed position costs what it
costs in a full run. Upstream's samplers take no such option: their sampling function is wrapped
(a module-global shim, as in tools/make_parity_fixtures.py) to record the chosen tokens and to
stop the loop after N positions; the call still asks for the full sequence. arforge's
:func:`arforge.generation.generate` takes ``num_positions``.

Run-time shims on the upstream code (nothing of its forward code is touched):

* IAR2, float32: the inference window is allocated in bf16 (``gpt_inference.py``
  ``WindowExtractor.extract``), which only runs under CUDA autocast; in float32 it is allocated
  in float32 (as tools/make_parity_fixtures.py does). In bfloat16 upstream runs unchanged.
* IAR2: ``generate`` cannot run (it passes ``sample_logits`` to ``sample``, which has no such
  argument), so ``sample`` is called with the inputs ``generate`` would give it.
* LlamaGen: ``generate`` sizes its caches for the tokens it is asked for; it is asked for all 256
  (see ``--positions``).

**``--train``** (LlamaGen only): one training step of GPT-B, batch ``--batch`` x 256 tokens, fp32
eager: forward, cross-entropy, backward, gradient clipping at 1.0 and AdamW (lr 1e-4, betas
(0.9, 0.95), weight decay 0.05, dropouts 0.1 as in training). Upstream: its ``Transformer``
with ``targets`` and ``train_c2i.creat_optimizer`` (fused AdamW where torch has it); arforge:
``model.loss`` and ``torch.optim.AdamW`` over ``trainers.common.param_groups`` as
``jobs.train_ar`` builds it (fused on CUDA only). Each run is a fresh subprocess (the peak-memory
method of tools/benchmark_grad_checkpointing.py: peak resident set during the steps minus the
resident set after the model is built); before timing, both sides compute the loss of the same
batch with dropout off and the losses must agree to 1e-5 relative. arforge's ``TrainLoop``
finite checks of the loss and weights are not part of the timed step.

Speed is measured here, never in tests.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

FAMILIES = ("llamagen", "iar2", "open_magvit2")
UPSTREAM_REPOS = {"llamagen": "FoundationVision/LlamaGen", "iar2": "sjtuplayer/IAR2",
                  "open_magvit2": "TencentARC/Open-MAGVIT2"}
#: the registry kind of the guidance schedules (``guidance.cfg_constant`` ...)
GUIDANCE_KIND = "guidance"
SEED = 0
#: relative tolerance of the equal-initial-loss check (fp32; the two codes order the sums differently)
LOSS_RTOL = 1e-5


# ===================================================================== machine and statistics
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_topology() -> str:
    """Physical cores and hardware threads of the first CPU package (``/proc/cpuinfo``)."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        return "?"
    return f"{info.get('cpu cores', '?')} cores / {info.get('siblings', '?')} hardware threads"


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in have]
    except OSError:
        pass
    return []


def machine(dtype: str) -> dict[str, Any]:
    """What a figure needs to name its machine."""
    import torch

    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"cpu": cpu_model(), "topology": cpu_topology(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "flags": cpu_flags(), "torch": torch.__version__, "python": platform.python_version(),
            "dtype": dtype, "load_average": load}


def machine_line(m: dict[str, Any]) -> str:
    flags = ",".join(m["flags"]) or "-"
    return (f"machine: {m['cpu']} ({m['topology']}, {m['cpus']} CPUs visible), {m['threads']} torch threads, "
            f"flags {flags}; "
            f"torch {m['torch']}, python {m['python']}, dtype {m['dtype']}; load average {m['load_average']}")


@dataclass
class Stats:
    n: int
    median: float
    min: float
    max: float

    @property
    def spread(self) -> float:
        """(max - min) / median."""
        return (self.max - self.min) / self.median if self.median else 0.0


def summarize(times: Sequence[float]) -> Stats:
    if not times:
        raise ValueError("no timed runs")
    return Stats(n=len(times), median=statistics.median(times), min=min(times), max=max(times))


def alternate(runs: dict[str, Callable[[], Any]], repeats: int, *, warmup: bool = True,
              clock: Callable[[], float] = time.perf_counter,
              report: Callable[[str, int, float], None] | None = None) -> dict[str, list[float]]:
    """One warm-up of each side in order, then ``repeats`` rounds of every side in order (A B A B ...).

    Returns the wall times of the timed runs per side; ``report(name, round, seconds)`` sees each.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup:
        for fn in runs.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(repeats):
        for name, fn in runs.items():
            t0 = clock()
            fn()
            dt = clock() - t0
            times[name].append(dt)
            if report is not None:
                report(name, r, dt)
    return times


def ratio_lines(times: dict[str, list[float]], *, unit: str, per: float | None = None,
                per_unit: str = "") -> list[str]:
    """Medians, spreads and (for two sides, the first as the reference) the ratios."""
    stats = {name: summarize(t) for name, t in times.items()}
    lines = []
    for name, s in stats.items():
        extra = f", {1000 * s.median / per:.1f} ms {per_unit}" if per else ""
        lines.append(f"{name:>9}: median {s.median:.3f} {unit} over {s.n} runs (min {s.min:.3f}, max {s.max:.3f}, "
                     f"spread {100 * s.spread:.0f}%){extra}")
    if len(stats) == 2:
        (na, a), (nb, b) = stats.items()
        lines.append(f"    ratio {na}/{nb}: {a.median / b.median:.2f}x (medians), {a.min / b.min:.2f}x (best runs), "
                     f"{a.max / b.max:.2f}x (worst runs)")
    return lines


def upstream_commit(folder: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], check=True, capture_output=True,
                              text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def with_usage(fn: Callable[[], Any], log: list) -> Callable[[], Any]:
    """``fn`` that appends its process CPU times and minor page faults to ``log`` on every call.

    Sys time and page faults show where a run lost time to the kernel (fresh memory for large
    temporaries) rather than to arithmetic, which explains much of the spread on a loaded machine.
    """
    def run():
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        out = fn()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        log.append({"user_s": r1.ru_utime - r0.ru_utime, "sys_s": r1.ru_stime - r0.ru_stime,
                    "minor_faults": r1.ru_minflt - r0.ru_minflt})
        return out
    return run


# ========================================================================== arforge side
def _registry():
    from arforge import registry

    return registry.load_plugins()


def guidance(name: str, **kw):
    """A guidance schedule built through the registry by its name (``cfg_constant`` ...), as gin builds it."""
    return _registry().get(GUIDANCE_KIND, name)(**kw)


def arforge_generate(model, labels, guide, *, top_k: int, positions: int, seed: int = SEED):
    """The public :func:`arforge.generation.generate` (KV caches), first ``positions`` positions."""
    import torch

    from arforge.generation import generate
    from arforge.interfaces import SubTokenSampling

    with torch.no_grad():
        return generate(model, labels, guidance=guide, sampling=SubTokenSampling(top_k=top_k), seed=seed,
                        num_positions=positions)


@dataclass
class Family:
    """What the benchmark needs of one family, on the arforge side."""
    model: str  #: models.<name>
    loader: str  #: loaders.<name>
    guidance: tuple[str, dict]  #: guidance plugin and its settings (upstream's defaults)
    top_k: int  #: upstream's default top_k for sampling
    title: str


FAMILY = {
    # sample_c2i.py: --cfg-scale 4.0, --top-k 2000
    "llamagen": Family("llamagen_gpt", "official_llamagen_gpt", ("cfg_constant", {"scale": 4.0}), 2000,
                       "LlamaGen GPT-B, 16x16, CFG 4.0"),
    # README: cfg 1.75 -> 3.0 for both heads, w_attn 0.05; sample_c2i_ddp.py: --top-k 0
    "iar2": Family("iar2_gpt", "official_iar2_gpt",
                   ("cfg_adaptive_attention", {"sem_start": 1.75, "sem_end": 3.0, "det_start": 1.75, "det_end": 3.0,
                                               "w_attn": 0.05}), 0,
                   "IAR2-B, 24x24, adaptive CFG 1.75->3.0, w_attn 0.05"),
    # scripts/evaluation/sample_gpu.sh (B): top_k 0, temperature 1.0, cfg (1.9, 2.0)
    "open_magvit2": Family("open_magvit2_ar", "official_open_magvit2_ar", ("cfg_constant", {"scale": (1.9, 2.0)}),
                           0, "Open-MAGVIT2 AR-B, 16x16, CFG (1.9, 2.0)"),
}


def arforge_model(family: str, size: str, checkpoint: Path | None = None):
    """The family's model through the registry; weights from ``checkpoint`` through the official loader, else seeded."""
    import torch

    reg = _registry()
    torch.manual_seed(SEED)
    model = reg.get("models", FAMILY[family].model)(size=size)
    if checkpoint is not None:
        model = reg.get("loaders", FAMILY[family].loader)(module=model, checkpoint=checkpoint)
    return model.eval()


# ========================================================================= upstream side
class _Stop(Exception):
    """Raised by the sampling shim once the requested positions are decoded."""


class Upstream:
    """One upstream family imported from a local checkout: its model at paper size, saved and sampled."""

    def __init__(self, family: str, folder: Path):
        import torch

        self.family, self.folder = family, folder
        sys.path.insert(0, str(folder))
        self.torch = torch
        getattr(self, f"_import_{family}")()

    # ---- imports and models
    def _import_llamagen(self) -> None:
        from autoregressive.models import generate as up_generate
        from autoregressive.models import gpt as up_gpt

        self.gen, self.gpt = up_generate, up_gpt
        self.L, self.sample_fn, self.calls_per_position = 256, "sample", 1

    def _import_iar2(self) -> None:
        from autoregressive.models import generate as up_generate
        from autoregressive.models import gpt_inference as up_infer

        self.gen, self.gpt = up_generate, up_infer
        self.L, self.sample_fn, self.calls_per_position = 576, "sample_from_logits", 2
        self._torch_of_infer = up_infer.torch

    def _import_open_magvit2(self) -> None:
        from src.Open_MAGVIT2.modules.transformer import gpt as up_gpt

        self.gen = self.gpt = up_gpt
        self.L, self.sample_fn, self.calls_per_position = 256, "sample_from_logits", 2

    def build(self, *, train: bool = False):
        """The paper-size model as upstream's scripts build it, every tensor from a seeded generator."""
        tools = str(Path(__file__).resolve().parent)
        if tools not in sys.path:
            sys.path.insert(0, tools)
        from make_parity_fixtures import _randomize  # the fixtures' seeded draw: O(1) logits, no zero heads

        if self.family == "llamagen":
            drop = 0.1 if train else 0.0  # train_c2i.py: --dropout-p 0.1, --token-dropout-p 0.1
            model = self.gpt.GPT_B(vocab_size=16384, block_size=256, num_classes=1000, cls_token_num=1,
                                   model_type="c2i", resid_dropout_p=drop, ffn_dropout_p=drop, token_dropout_p=drop)
        elif self.family == "iar2":
            model = self.gpt.GPT_B(block_size=576, num_classes=1000, cls_token_num=1, model_type="c2i")
        else:  # configs/Open-MAGVIT2/gpu/imagenet_conditional_llama_B.yaml
            model = self.gpt.GPT(vocab_size=512, block_size=256, spatial_n_layer=24, factorized_n_layer=2,
                                 factorized_bits=[6, 12], n_head=16, dim=1024, cond_dim=1024, token_drop=0.1,
                                 resid_dropout_p=0.1, token_factorization=True, class_num=1000)
        _randomize(model, SEED + 1)
        return model.train(train)

    def save(self, model, folder: Path) -> Path:
        """The state dict in the official container of the family's release files."""
        torch = self.torch
        state = {k: v for k, v in model.state_dict().items() if "kv_cache" not in k}
        if self.family == "llamagen":
            args = argparse.Namespace(gpt_model="GPT-B", gpt_type="c2i", vocab_size=16384, image_size=256,
                                      downsample_size=16, num_classes=1000, cls_token_num=1)
            path, obj = folder / "c2i_B_256.pt", {"model": state, "steps": 0, "args": args}
        elif self.family == "iar2":
            path, obj = folder / "IAR2-B.pth", state  # FSDP consolidated: a bare state dict
        else:
            path, obj = folder / "AR_256_B.ckpt", {"state_dict": {"transformer." + k: v for k, v in state.items()}}
        torch.save(obj, path)
        return path

    # ---- sampling
    @contextlib.contextmanager
    def _shims(self, dtype, record: list, stop_after: int | None):
        """Record the chosen tokens; stop after ``stop_after`` sampling calls; IAR2's fp32 window."""
        torch = self.torch
        original = getattr(self.gen, self.sample_fn)

        def sample(*a, **kw):
            out = original(*a, **kw)
            record.append(out[0] if isinstance(out, tuple) else out)  # LlamaGen returns (idx, probs)
            if stop_after is not None and len(record) == stop_after:
                raise _Stop
            return out

        setattr(self.gen, self.sample_fn, sample)
        if self.family == "iar2" and dtype == torch.float32:
            class _WindowDtype:  # torch as gpt_inference sees it, except that bf16 window buffers follow fp32
                def __getattr__(self, name):
                    return getattr(torch, name)

                @staticmethod
                def zeros(*shape, dtype=None, **kw):
                    return torch.zeros(*shape, dtype=torch.float32 if dtype is torch.bfloat16 else dtype, **kw)

            self.gpt.torch = _WindowDtype()
        try:
            yield
        finally:
            setattr(self.gen, self.sample_fn, original)
            if self.family == "iar2":
                self.gpt.torch = self._torch_of_infer

    def sample(self, model, labels, *, top_k: int, positions: int, cfg_interval: float = -1):
        """(B, N, K) token ids of the first N positions from upstream's own sampler (seeded)."""
        torch = self.torch
        torch.manual_seed(SEED)
        dtype = next(model.parameters()).dtype
        record: list = []
        stop = positions * self.calls_per_position if positions < self.L else None
        null = torch.full_like(labels, 1000)
        with self._shims(dtype, record, stop), torch.no_grad(), contextlib.suppress(_Stop):
            if self.family == "llamagen":  # sample_c2i.py
                self.gen.generate(model, labels, self.L, cfg_scale=4.0, cfg_interval=cfg_interval, temperature=1.0,
                                  top_k=top_k, top_p=1.0, sample_logits=True)
            elif self.family == "iar2":  # what generate() would pass to sample()
                cond = torch.cat([labels, null])[:, None]
                self.gen.sample(cond, model, self.L, temperature=[1.0, 1.0], top_k=[top_k, top_k], top_p=[1.0, 1.0],
                                cfg_scale=[[1.75, 3.0], [1.75, 3.0]], w_attn=0.05)
            else:  # sample.py sample_classconditional
                cond = torch.cat([labels, null])[:, None]
                self.gen.sample_Open_MAGVIT2(cond, model, self.L, temperature=[1.0, 1.0], top_k=[top_k, top_k],
                                             top_p=[1.0, 1.0], token_factorization=True, cfg_scale=[1.9, 2.0])
        k = self.calls_per_position
        ids = torch.stack([torch.cat(record[i::k], dim=1) for i in range(k)], dim=-1)  # (B, N, K)
        return ids[:, :positions].long()


# ============================================================================= sampling
def _labels(batch: int):
    import torch

    return torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(SEED + 7))


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def family_guidance(family: str, cfg_interval: float):
    """The family's schedule; for LlamaGen with upstream's ``cfg_interval`` (a float, -1 = always)
    the same scale as ``guidance.cfg_interval`` with that interval in token indices."""
    fam = FAMILY[family]
    if cfg_interval == -1:
        return guidance(fam.guidance[0], **fam.guidance[1])
    from arforge.guidance import IntervalCFG

    return guidance("cfg_interval", scale=fam.guidance[1]["scale"],
                    interval=IntervalCFG.from_upstream(cfg_scale=1.0, cfg_interval=cfg_interval).interval)


def bench_alone(args) -> dict[str, Any]:
    fam = FAMILY[args.family]
    model = arforge_model(args.family, args.size).to(_dtype(args.dtype))
    L = model.block_size
    N = min(args.positions or L, L)
    labels = _labels(args.batch)
    guide = family_guidance(args.family, args.cfg_interval)
    top_k = fam.top_k if args.top_k is None else args.top_k
    m = machine(args.dtype)
    print(machine_line(m))
    print(f"arforge alone: models.{fam.model} size {args.size} ({model.num_params() / 1e6:.1f}M), batch {args.batch}, "
          f"{guide!r}, top_k {top_k}, positions {N} of {L}"
          + (f", decode compiled ({args.compile_decode}; the warm-up compiles)" if args.compile_decode else ""),
          flush=True)
    if args.compile_decode:
        model.compile_decode(backend=args.compile_decode)
    times = alternate({"arforge": lambda: arforge_generate(model, labels, guide, top_k=top_k, positions=N)},
                      args.repeats, report=lambda n, r, dt: print(f"  run {r + 1} {n}: {dt:.3f} s", flush=True))
    for line in ratio_lines(times, unit="s", per=N, per_unit="per position"):
        print(line)
    return {"machine": m, "mode": "alone", "family": args.family, "size": args.size, "batch": args.batch,
            "positions": N, "L": L, "top_k": top_k, "times": times}


def bf16_quality(model, labels, guide, *, top_k: int, positions: int, dtype) -> dict[str, Any]:
    """What sampling in ``dtype`` (weights and caches cast, as the sample job does under
    ``launch.precision = "bf16"``) changes against float32, on the same weights.

    * teacher-forced: the fp32 model samples N positions (seeded, the family's top-k and
      guidance); both models then score those tokens (``logits_full``) and we compare, per
      sub-token, the top-1 agreement and the absolute logit difference (also relative to the
      standard deviation of the fp32 logits);
    * free-running greedy decode (``top_k = 1``) in both dtypes: the first position where
      the tokens differ, per sample (after it the sequences diverge).
    """
    import copy

    import torch

    low = copy.deepcopy(model).to(dtype).eval()
    L = model.block_size
    with torch.no_grad():
        tokens = arforge_generate(model, labels, guide, top_k=top_k, positions=positions)  # (B, N, K)
        full = torch.zeros(tokens.shape[0], L, tokens.shape[2], dtype=tokens.dtype)
        full[:, :positions] = tokens  # positions < N see tokens < N only (causal)
        ref = model.logits_full(full, labels)
        got = low.logits_full(full, labels)
    per_subtoken = []
    for k, (a, b) in enumerate(zip(ref, got)):
        a, b = a[:, :positions].float(), b[:, :positions].float()  # (B, N, V_k)
        diff = (a - b).abs()
        per_subtoken.append({"subtoken": k, "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
                             "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                             "logit_std": float(a.std()), "max_diff_over_std": float(diff.max() / a.std())})
    with torch.no_grad():
        g32 = arforge_generate(model, labels, guide, top_k=1, positions=positions)
        g16 = arforge_generate(low, labels, guide, top_k=1, positions=positions)
    same = (g32 == g16).all(-1)  # (B, N)
    first = [int(row.logical_not().nonzero()[0]) if not bool(row.all()) else positions for row in same]
    return {"teacher_forced": per_subtoken, "greedy_first_difference": first, "positions": positions}


def bench_quality(args) -> dict[str, Any]:
    fam = FAMILY[args.family]
    model = arforge_model(args.family, args.size)
    # arforge zero-initialises the output heads as upstream does (every logit 0): the fixtures'
    # seeded O(1) draw instead, as the side-by-side mode gives both codes.
    from make_parity_fixtures import _randomize

    _randomize(model, SEED + 1)
    L = model.block_size
    N = min(args.positions or L, L)
    labels = _labels(args.batch)
    guide = family_guidance(args.family, args.cfg_interval)
    top_k = fam.top_k if args.top_k is None else args.top_k
    dtype = _dtype(args.dtype if args.dtype != "float32" else "bfloat16")
    m = machine(str(dtype).replace("torch.", ""))
    print(machine_line(m))
    print(f"quality of {dtype} sampling against float32: models.{fam.model} size {args.size} "
          f"({model.num_params() / 1e6:.1f}M, seeded weights), batch {args.batch}, {guide!r}, top_k {top_k}, "
          f"positions {N} of {L}", flush=True)
    q = bf16_quality(model, labels, guide, top_k=top_k, positions=N, dtype=dtype)
    for row in q["teacher_forced"]:
        print(f"  sub-token {row['subtoken']}: top-1 agreement {100 * row['top1_agreement']:.2f}%, |logit diff| "
              f"max {row['max_abs_diff']:.4f} mean {row['mean_abs_diff']:.4f} (fp32 logit std "
              f"{row['logit_std']:.3f}; max/std {row['max_diff_over_std']:.4f})")
    print(f"  greedy decode: first differing position per sample {q['greedy_first_difference']} of {N}")
    return {"machine": m, "mode": "quality", "family": args.family, "size": args.size, "batch": args.batch,
            "top_k": top_k, **q}


def bench_batches(args) -> dict[str, Any]:
    """Images/s of arforge's cached decode against the batch size (``--batches 1,4,16``)."""
    import torch

    fam = FAMILY[args.family]
    model = arforge_model(args.family, args.size).to(_dtype(args.dtype))
    L = model.block_size
    N = min(args.positions or L, L)
    guide = family_guidance(args.family, args.cfg_interval)
    top_k = fam.top_k if args.top_k is None else args.top_k
    m = machine(args.dtype)
    print(machine_line(m))
    print(f"images/s against batch: models.{fam.model} size {args.size}, {guide!r}, top_k {top_k}, "
          f"positions {N} of {L} (images/s counts whole images: batch / (time x L / N))", flush=True)
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        labels = _labels(b)
        times = alternate({f"batch {b}": lambda: arforge_generate(model, labels, guide, top_k=top_k, positions=N)},
                          args.repeats)[f"batch {b}"]
        st = summarize(times)
        ips = b / (st.median * L / N)
        rows.append({"batch": b, "times": times, "images_per_s": ips})
        print(f"  batch {b:>4}: {st.median:.3f} s per batch (min {st.min:.3f}), {ips:.3f} images/s", flush=True)
        del labels
        model.release_caches()
    return {"machine": m, "mode": "batches", "family": args.family, "size": args.size, "positions": N,
            "dtype": args.dtype, "rows": rows, "torch": torch.__version__}


def bench_against(args) -> dict[str, Any]:
    import torch

    family, folder = args.against, Path(args.upstream_dir).expanduser().resolve()
    fam = FAMILY[family]
    up = Upstream(family, folder)
    commit = upstream_commit(folder)
    up_model = up.build().eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = up.save(up_model, Path(tmp))
        ours = arforge_model(family, "B", path)
    L = ours.block_size
    assert L == up.L, (L, up.L)
    N = min(args.positions or L, L)
    guide = family_guidance(family, args.cfg_interval)
    ci = args.cfg_interval
    top_k = fam.top_k if args.top_k is None else args.top_k
    m = machine(args.dtype)
    print(machine_line(m))
    print(f"upstream: {UPSTREAM_REPOS[family]} at {commit} ({folder})")
    print(f"model: {fam.title}; {guide!r}; {ours.num_params() / 1e6:.1f}M parameters; batch {args.batch}; top_k {top_k}; "
          f"positions {N} of {L}; weights: seeded upstream state dict -> temp file -> loaders.{fam.loader}",
          flush=True)

    # ---- equal tokens first (fp32, top_k = 1)
    check_b = min(args.batch, args.check_batch)
    check_labels = _labels(check_b)
    t0 = time.perf_counter()
    want = up.sample(up_model, check_labels, top_k=1, positions=N, cfg_interval=ci)
    got = arforge_generate(ours, check_labels, guide, top_k=1, positions=N)
    if not torch.equal(want, got):
        bad = (want != got).any(-1).nonzero()
        raise SystemExit(f"token ids differ between upstream and arforge at top_k=1 (float32), first at "
                         f"(sample, position) {tuple(bad[0].tolist())} of {len(bad)}: not timing")
    print(f"check: equal token ids at top_k=1, float32, batch {check_b}, {N} positions x {want.shape[-1]} sub-tokens "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)

    dtype = _dtype(args.dtype)
    bf16_agreement = None
    if dtype != torch.float32:
        up_model.to(dtype)
        ours.to(dtype)
        try:
            a = up.sample(up_model, check_labels, top_k=1, positions=N, cfg_interval=ci)
        except RuntimeError as e:  # Open-MAGVIT2: apply_rotary_emb returns fp32 keys (gpt.py:288) for a bf16 cache
            raise SystemExit(f"upstream {UPSTREAM_REPOS[family]} does not run with {args.dtype} weights here "
                             f"({str(e).splitlines()[0]}); time it in float32") from None
        b = arforge_generate(ours, check_labels, guide, top_k=1, positions=N)
        same = (a == b).all(-1)  # (B, N): every sub-token of the position equal
        first = [int(row.logical_not().nonzero()[0]) if not bool(row.all()) else N for row in same]
        bf16_agreement = {"equal_share": float(same.float().mean()), "first_difference": first}
        print(f"check in {args.dtype}: top-1 token ids of upstream and arforge first differ at position "
              f"{first} of {N} (per sample; after that the sequences diverge), {100 * same.float().mean():.1f}% "
              f"of positions equal; the codes round differently in {args.dtype}: not asserted", flush=True)

    labels = _labels(args.batch)
    usage: dict[str, list[dict]] = {"upstream": [], "arforge": []}
    runs = {"upstream": with_usage(lambda: up.sample(up_model, labels, top_k=top_k, positions=N, cfg_interval=ci),
                                   usage["upstream"]),
            "arforge": with_usage(lambda: arforge_generate(ours, labels, guide, top_k=top_k, positions=N),
                                  usage["arforge"])}

    def report(n: str, r: int, dt: float) -> None:
        u = usage[n][-1]
        print(f"  round {r + 1} {n:>8}: {dt:.3f} s (user {u['user_s']:.2f} s, sys {u['sys_s']:.2f} s, "
              f"{u['minor_faults']} page faults)", flush=True)

    times = alternate(runs, args.repeats, report=report)
    print(f"{fam.title}, batch {args.batch}, {N} positions, {args.dtype}:")
    for line in ratio_lines(times, unit="s", per=N, per_unit="per position"):
        print(line)
    return {"machine": m, "mode": "against", "family": family, "upstream": UPSTREAM_REPOS[family], "commit": commit,
            "batch": args.batch, "positions": N, "L": L, "top_k": top_k, "dtype": args.dtype,
            "bf16_top1_agreement": bf16_agreement, "times": times, "usage": usage}


# ============================================================================= training
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _set_dropout(model, p: float | None, saved: dict | None = None) -> dict:
    """Dropout probabilities off (p = 0, returning what they were) or back (``saved``)."""
    import torch

    saved_out = {}
    for name, mod in model.named_modules():
        for attr in ("p", "dropout_prob", "dropout_p"):
            if isinstance(getattr(mod, attr, None), float) and (isinstance(mod, torch.nn.Dropout) or attr != "p"):
                key = (name, attr)
                saved_out[key] = getattr(mod, attr)
                setattr(mod, attr, saved[key] if saved is not None else p)
    return saved_out


def train_child(side: str, folder: Path | None, batch: int, steps: int, *, family: str = "llamagen",
                size: str = "B", compile: str | None = None, autocast: bool = False, fused_adamw: bool = False) -> dict[str, Any]:
    """One fresh process: build one side, check loss without dropout, time ``steps`` train steps after one warm-up.

    ``compile``: a torch.compile backend for the forward (upstream ``train_c2i.py`` compiles its
    model unless ``--no-compile``; arforge ``jobs.train_ar.compile``); ``autocast``: bf16 autocast
    of forward and loss (``--mixed-precision bf16``; ``launch.precision = "bf16"``);
    ``fused_adamw``: arforge's ``jobs.train_ar.fused_adamw`` (upstream fuses on CUDA only).
    ``side = "arforge-alone"`` times ``family``'s model at ``size`` without upstream (seeded weights).
    """
    import torch

    g = torch.Generator().manual_seed(SEED + 3)
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
    if side == "arforge-alone":
        model = arforge_model(family, size)
        tools = str(Path(__file__).resolve().parent)
        if tools not in sys.path:
            sys.path.insert(0, tools)
        from make_parity_fixtures import _randomize

        _randomize(model, SEED + 1)
        model.train()
        L = model.block_size
        sub = torch.stack([torch.randint(0, v, (batch, L), generator=g) for v in model.vocab_sizes], -1)
        labels = torch.randint(0, 1000, (batch,), generator=g)
        tokens = sub
    else:
        up = Upstream("llamagen", folder)
        up_model = up.build(train=True)
        tokens = torch.randint(0, 16384, (batch, 256), generator=g)
        labels = torch.randint(0, 1000, (batch,), generator=g)
    if side == "upstream":
        model = up_model
        fwd = model if compile is None else torch.compile(model, backend=compile)

        def loss_fn():
            with amp():
                return fwd(idx=tokens[:, :-1], cond_idx=labels, targets=tokens)[1]

        from autoregressive.train.train_c2i import creat_optimizer

        class _Quiet:
            def info(self, *a, **k):
                pass

        def make_opt():  # train_c2i.py: weight decay 5e-2, lr 1e-4, betas (0.9, 0.95)
            return creat_optimizer(model, 5e-2, 1e-4, (0.9, 0.95), _Quiet())
    else:
        if side == "arforge":
            with tempfile.TemporaryDirectory() as tmp:
                path = up.save(up_model, Path(tmp))
                del up_model
                gc.collect()
                reg = _registry()
                torch.manual_seed(SEED)
                model = reg.get("models", "llamagen_gpt")(size="B")
                model = reg.get("loaders", "official_llamagen_gpt")(module=model, checkpoint=path)
            model.train()
            sub = tokens[..., None]  # (B, L, 1)
        fwd = model if compile is None else torch.compile(model, backend=compile)

        def loss_fn():  # as jobs.train_ar: the (compiled) forward, then the loss from its logits
            with amp():
                return model.loss_from_logits(fwd(sub, labels).logits, sub).total

        from arforge.trainers.common import param_groups

        def make_opt():  # jobs.train_ar (trainers/ar_trainer.py): AdamW over the ndim decay groups
            return torch.optim.AdamW(param_groups(model, weight_decay=5e-2), lr=1e-4, betas=(0.9, 0.95),
                                     fused=fused_adamw)
    saved = _set_dropout(model, 0.0)
    with torch.no_grad():
        check = float(loss_fn())
    _set_dropout(model, None, saved)
    gc.collect()
    build_peak, baseline = _maxrss_bytes(), _rss_bytes()
    opt = make_opt()
    torch.manual_seed(SEED + 5)
    times, losses = [], []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    peak = _maxrss_bytes()
    return {"side": side, "check_loss": check, "step_s": times[1:], "warmup_s": times[0], "losses": losses,
            "tokens_per_item": int(tokens.shape[1]),
            "baseline_rss_mib": baseline / 2**20, "peak_growth_mib": (peak - baseline) / 2**20,
            "peak_rss_mib": peak / 2**20, "valid": peak > build_peak, "threads": torch.get_num_threads(),
            "params": sum(p.numel() for p in model.parameters())}


def bench_train(args) -> dict[str, Any]:
    """Train steps in fresh processes: LlamaGen GPT-B against upstream (``--against llamagen``), or
    any family's B model alone; with the speed options of ``jobs.train_ar``."""
    alone = args.against is None
    folder = None if alone else Path(args.upstream_dir).expanduser().resolve()
    m = machine("bfloat16 autocast" if args.autocast else "float32")
    print(machine_line(m))
    if not alone:
        print(f"upstream: {UPSTREAM_REPOS['llamagen']} at {upstream_commit(folder)} ({folder})")
    opts = ", ".join(o for o in (f"torch.compile backend {args.compile}" if args.compile else "eager",
                                 "bf16 autocast" if args.autocast else "fp32",
                                 "fused AdamW (arforge)" if args.fused_adamw else "") if o)
    what = "GPT-B, batch %d x 256 tokens" % args.batch if not alone else \
        f"models.{FAMILY[args.family].model} size {args.size}, batch {args.batch}"
    print(f"train step: {what}, {opts}, forward + CE + backward + clip + AdamW; {args.repeats} fresh processes "
          f"per side (A B A B), {args.train_steps} timed steps after one warm-up each", flush=True)
    runs: dict[str, list[dict]] = {"arforge-alone": []} if alone else {"upstream": [], "arforge": []}
    for r in range(args.repeats):
        for side in runs:
            cmd = [sys.executable, __file__, "--train-child", side, "--batch", str(args.batch),
                   "--train-steps", str(args.train_steps), "--family", args.family, "--size", args.size]
            cmd += ["--upstream-dir", str(folder)] if folder else []
            cmd += ["--threads", str(args.threads)] if args.threads else []
            cmd += ["--compile", args.compile] if args.compile else []
            cmd += ["--autocast"] if args.autocast else []
            cmd += ["--fused-adamw"] if args.fused_adamw else []
            out = subprocess.run(cmd, check=True, capture_output=True, text=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            runs[side].append(res)
            print(f"  round {r + 1} {side:>8}: steps {', '.join('%.2f' % t for t in res['step_s'])} s "
                  f"(warm-up {res['warmup_s']:.2f}), peak growth {res['peak_growth_mib']:.0f} MiB "
                  f"(valid={res['valid']}), check loss {res['check_loss']:.6f}", flush=True)
    if not alone:
        a, b = runs["upstream"][0]["check_loss"], runs["arforge"][0]["check_loss"]
        tol = LOSS_RTOL if not args.autocast else 1e-2  # bf16: each side rounds its own ops
        if abs(a - b) > tol * abs(a):
            raise SystemExit(f"initial losses differ: upstream {a!r}, arforge {b!r} (tolerance {tol} relative)")
        print(f"check: equal initial loss without dropout: upstream {a:.6f}, arforge {b:.6f} "
              f"(|diff| {abs(a - b):.2e}, tolerance {tol:g} relative)")
    times = {side: [t for res in rs for t in res["step_s"]] for side, rs in runs.items()}
    tokens = args.batch * runs[next(iter(runs))][0]["tokens_per_item"]
    for line in ratio_lines(times, unit="s/step"):
        print(line)
    for side, rs in runs.items():
        s = summarize(times[side])
        mem = [res["peak_growth_mib"] for res in rs]
        print(f"{side:>9}: {tokens / s.median:.0f} tokens/s (median step), peak memory growth "
              f"{statistics.median(mem):.0f} MiB (runs: {', '.join('%.0f' % x for x in mem)}), "
              f"peak RSS {statistics.median([res['peak_rss_mib'] for res in rs]):.0f} MiB")
    if not alone:
        mu = statistics.median([res["peak_growth_mib"] for res in runs["upstream"]])
        ma = statistics.median([res["peak_growth_mib"] for res in runs["arforge"]])
        print(f"    peak-memory ratio arforge/upstream: {ma / mu:.2f}")
    return {"machine": m, "mode": "train", "batch": args.batch, "runs": runs,
            "options": {"compile": args.compile, "autocast": args.autocast, "fused_adamw": args.fused_adamw}}


# ================================================================================== CLI
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", choices=FAMILIES, help="time the reference code side by side (needs --upstream-dir)")
    ap.add_argument("--upstream-dir", help="a local checkout of the reference repository for --against")
    ap.add_argument("--family", choices=FAMILIES, default="llamagen", help="arforge alone: which family")
    ap.add_argument("--size", default="B", help="arforge alone: size preset (tiny, B, L, ...); --against uses B")
    ap.add_argument("--batch", type=int, default=8, help="images per batch (the caches hold 2x with CFG)")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds (A B per round), after one warm-up each")
    ap.add_argument("--positions", type=int, default=None,
                    help="decode only the first N positions (both sides; caches sized for the full sequence)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--top-k", type=int, default=None, help="top_k of the timed runs (default: upstream's default)")
    ap.add_argument("--cfg-interval", type=float, default=-1,
                    help="LlamaGen only: upstream's cfg_interval (guidance while the decode index <= it; -1: "
                         "always); arforge runs guidance.cfg_interval with the same tokens guided and drops the "
                         "unconditional rows after them")
    ap.add_argument("--check-batch", type=int, default=2, help="batch of the equal-token check")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--train", action="store_true", help="time a GPT-B train step instead (--against llamagen)")
    ap.add_argument("--train-steps", type=int, default=2, help="--train: timed steps per process")
    ap.add_argument("--train-child", choices=("upstream", "arforge", "arforge-alone"), help=argparse.SUPPRESS)
    ap.add_argument("--compile", help="--train: a torch.compile backend for both sides' forward (e.g. inductor)")
    ap.add_argument("--autocast", action="store_true", help="--train: bf16 autocast on both sides")
    ap.add_argument("--fused-adamw", action="store_true", help="--train: arforge's fused AdamW (jobs.train_ar)")
    ap.add_argument("--compile-decode", help="arforge alone: decode through torch.compile with this backend "
                                             "(ARModel.compile_decode, e.g. inductor)")
    ap.add_argument("--quality", action="store_true",
                    help="arforge alone: what bf16 sampling changes against fp32 (top-1 agreement, logit "
                         "difference, first differing greedy token) instead of timing")
    ap.add_argument("--batches", help="arforge alone: images/s for each of these batch sizes (e.g. 1,4,16,64)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.train_child:
        print(json.dumps(train_child(args.train_child, Path(args.upstream_dir) if args.upstream_dir else None,
                                     args.batch, args.train_steps, family=args.family, size=args.size,
                                     compile=args.compile,
                                     autocast=args.autocast, fused_adamw=args.fused_adamw)))
        return 0
    if (args.against is None) != (args.upstream_dir is None):
        ap.error("--against and --upstream-dir go together")
    if args.upstream_dir and not Path(args.upstream_dir).expanduser().is_dir():
        ap.error(f"--upstream-dir {args.upstream_dir} is not a folder")
    if args.cfg_interval != -1 and (args.against or args.family) != "llamagen":
        ap.error("--cfg-interval is LlamaGen's option (--against llamagen or --family llamagen)")
    if args.train:
        if args.against not in (None, "llamagen"):
            ap.error("--train compares with LlamaGen's train step only (--against llamagen); without --against "
                     "it times any --family alone")
        if args.dtype != "float32":
            ap.error("--train takes --autocast for bf16, not --dtype")
        result = bench_train(args)
    elif args.quality or args.batches:
        if args.against:
            ap.error("--quality and --batches time arforge alone: leave out --against")
        result = bench_quality(args) if args.quality else bench_batches(args)
    elif args.against:
        result = bench_against(args)
    else:
        result = bench_alone(args)
    result["argv"] = sys.argv[1:] if argv is None else list(argv)
    result["load_average_end"] = machine(args.dtype)["load_average"]
    print(f"load average at the end: {result['load_average_end']} on {os.cpu_count()} CPUs")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
