"""Class-conditional generation: logit processing, the guided decode loop, decoding to images.

See docs/llamagen.md#sampling (and its KV-cache and sampling-defaults sections). One loop
serves the three families: it drives :meth:`arforge.ar_model.ARModel.decode_step`
position by position over the rows that :class:`arforge.guidance.GuidedBatch` lays out
and, for each sub-token, asks the *guidance* schedule (:mod:`arforge.guidance`) for the
scale and applies :func:`process_logits`.

Logit processing (docs/llamagen.md#logit-processing), per sub-token and in this order
    1. CFG combine on raw logits, ℓ = ℓ_u + s·(ℓ_c − ℓ_u), with the
       [conditional; unconditional] batch layout of docs/llamagen.md#cfg-batch-layout; where s = 1 the
       result is ℓ_c itself, not a recomputation (docs/llamagen.md#cfg-batch-layout);
    2. temperature T > 0 (greedy decoding is the explicit ``greedy`` mode);
    3. top-k: k' = min(max(k, 1), V), logits strictly below the k'-th largest
       become −∞ (ties at the threshold survive);
    4. top-p: sort (descending, stable), cumulative softmax, mark > p, shift the
       mark right by one (the top token and the first token crossing p stay);
    5. softmax, then one multinomial draw per row (or the argmax when greedy).

Guidance is decided once per :func:`generate` call (``guidance.guided``, docs/llamagen.md#cfg-batch-layout):
when it is on, the batch is doubled for every position and sub-token, and a
sub-token whose scale is 1 simply gets ℓ_c. The random numbers consumed do
not depend on guidance (one draw of B rows per sub-token either way), so with
every scale at 1 a guided run gives the tokens of an unguided one.

``cfg_interval`` (LlamaGen, docs/llamagen.md#sampling): once a schedule's guidance has ended for
good (:func:`arforge.guidance.last_guided_position`), the unconditional half is dropped: the
decode goes on with the B conditional rows, which come first in every cache (KV caches, the
head caches, IAR2's window history), so nothing is copied or recomputed
(``ARModel.keep_rows``). Upstream keeps computing the unconditional half to the end and only
skips the combine; ``drop_unconditional=False`` does the same. The tokens agree: the
conditional logits are the same rows' logits, up to the rounding of matmul kernels that see
another row count (``tests/test_generation.py`` checks equal tokens).

Random streams
    ``seed`` gives one ``torch.Generator`` on the model's device for the whole
    batch (``torch.multinomial`` over the B rows). ``generator`` may instead be
    a sequence of B generators, one per sample: each row then draws from its
    own stream (the exponential race ``argmax(p / E)``, E ~ Exp(1) from that
    row's generator, which is exactly the draw ``torch.multinomial(p, 1)``
    makes), so a sample's tokens depend on its own seed only, not on the batch
    it was decoded in (the sample job uses this, ``arforge.sampling_job``).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from arforge.device import at_least_fp32
from arforge.ar_model import ARModel, DecodeInfo
from arforge.errors import ArforgeError
from arforge.guidance import Guidance, GuidedBatch, combine_cfg
from arforge.interfaces import SubTokenSampling, as_grid

__all__ = [
    "GenerationError",
    "filter_logits",
    "sample_tokens",
    "process_logits",
    "sampling_settings",
    "generate",
    "generate_no_cache",
    "no_cache_step",
    "decode_tokens",
]

Generators = torch.Generator | Sequence[torch.Generator] | None


class GenerationError(ArforgeError, ValueError):
    """A user-facing generation problem (bad settings, a guidance schedule that cannot run here)."""


# ================================================================ docs/llamagen.md#logit-processing logits
def filter_logits(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k, then top-p (docs/llamagen.md#logit-processing steps 2–4) on (B, V) logits; returns a new tensor."""
    if not temperature > 0:
        raise GenerationError(f"temperature must be > 0 (got {temperature}); for greedy decoding use "
                              "SubTokenSampling(greedy=True) (docs/llamagen.md#logit-processing)")
    x = at_least_fp32(logits) / temperature
    V = x.shape[-1]
    if top_k > 0:
        k = min(max(int(top_k), 1), V)
        kth = torch.topk(x, k, dim=-1).values[..., -1:]  # (B, 1): the k'-th largest
        x = x.masked_fill(x < kth, float("-inf"))  # strictly below: ties at the threshold survive
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True, stable=True)  # (B, V)
        remove = sorted_x.softmax(dim=-1).cumsum(dim=-1) > top_p  # (B, V) in sorted order
        remove[..., 1:] = remove[..., :-1].clone()  # shift right: keep the first token crossing p
        remove[..., 0] = False  # and always the top token
        x = x.masked_fill(remove.scatter(-1, order, remove), float("-inf"))  # back to vocabulary order
    return x


def sample_tokens(logits: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """softmax, then one multinomial draw per row (docs/llamagen.md#logit-processing step 5): (B, V) -> (B,) int64.

    ``generator`` is one generator for the batch, or B generators (one stream
    per row; see the module docstring).
    """
    probs = at_least_fp32(logits).softmax(dim=-1)  # (B, V)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator)[:, 0]
    gens = list(generator)
    if len(gens) != probs.shape[0]:
        raise GenerationError(f"{len(gens)} per-sample generators for {probs.shape[0]} rows")
    V = probs.shape[-1]
    race = torch.stack([torch.empty(V, dtype=probs.dtype, device=probs.device).exponential_(1, generator=g)
                        for g in gens])  # (B, V): each row from its own stream
    return (probs / race).argmax(dim=-1)  # = torch.multinomial(p_i, 1, generator=g_i) row by row


def process_logits(logits: torch.Tensor, *, cfg_scale: float | torch.Tensor = 1.0, guided: bool,
                   sampling: SubTokenSampling, generator: Generators = None) -> torch.Tensor:
    """docs/llamagen.md#logit-processing for one sub-token: (rows, V) fp32 logits -> (B,) int64 tokens.

    With ``guided`` the logits are (2B, V) [cond; uncond] and are combined with
    ``cfg_scale`` (a number or a (B,) tensor) by :func:`arforge.guidance.combine_cfg`; without it they are (B, V) and the
    scale must be 1. Greedy sampling takes the argmax of the combined logits
    (temperature, top-k and top-p cannot change it) and draws no random numbers.
    """
    if logits.dim() != 2:
        raise GenerationError(f"logits must be (batch, vocabulary), got {tuple(logits.shape)}")
    if guided:
        logits = combine_cfg(logits, cfg_scale)
    elif not _is_one(cfg_scale):
        raise GenerationError(f"cfg_scale {cfg_scale!r} with guided=False: guidance is decided once per generate "
                              "call (docs/llamagen.md#cfg-batch-layout); pass guided=True with [cond; uncond] logits")
    if sampling.greedy:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
    return sample_tokens(logits, generator)


def _is_one(scale: float | torch.Tensor) -> bool:
    if isinstance(scale, torch.Tensor):
        return bool((scale == 1).all())
    return float(scale) == 1.0


def sampling_settings(num_subtokens: int, sampling: SubTokenSampling | Sequence[SubTokenSampling] | None = None, *,
                      temperature: float | Sequence[float] = 1.0, top_k: int | Sequence[int] = 0,
                      top_p: float | Sequence[float] = 1.0,
                      greedy: bool | Sequence[bool] = False) -> tuple[SubTokenSampling, ...]:
    """One :class:`SubTokenSampling` per sub-token, from one/K objects or from scalars/K-tuples."""
    if sampling is not None:
        items = [sampling] if isinstance(sampling, SubTokenSampling) else list(sampling)
        if len(items) == 1:
            items = items * num_subtokens
        if len(items) != num_subtokens or not all(isinstance(s, SubTokenSampling) for s in items):
            raise GenerationError(f"sampling must be one SubTokenSampling or one per sub-token ({num_subtokens}), "
                                  f"got {sampling!r}")
        return tuple(items)

    def per(name: str, value: Any) -> list[Any]:
        vals = list(value) if isinstance(value, (list, tuple)) else [value]
        vals = vals * num_subtokens if len(vals) == 1 else vals
        if len(vals) != num_subtokens:
            raise GenerationError(f"{name} has {len(vals)} entries but the model has {num_subtokens} sub-tokens; "
                                  f"give one value or {num_subtokens}")
        return vals

    try:
        return tuple(SubTokenSampling(temperature=float(t), top_k=int(k), top_p=float(p), greedy=bool(g))
                     for t, k, p, g in zip(per("temperature", temperature), per("top_k", top_k),
                                           per("top_p", top_p), per("greedy", greedy)))
    except ValueError as exc:
        raise GenerationError(str(exc)) from exc


# ============================================================ the decode loop
def _setup(model: ARModel, labels: torch.Tensor, guidance: Guidance | None,
           sampling: SubTokenSampling | Sequence[SubTokenSampling], seed: int | None, generator: Generators,
           num_positions: int | None):
    if model.training:
        raise GenerationError("generate needs the model in eval mode (dropout and label dropout are active in "
                              "train mode): call model.eval() first")
    device = next(model.parameters()).device
    if labels.dim() != 1:
        raise GenerationError(f"labels must be (B,) class indices, got shape {tuple(labels.shape)}")
    labels = labels.to(device=device, dtype=torch.int64)
    B = labels.shape[0]
    if B == 0:
        raise GenerationError("generate needs at least one label")
    bad = (labels < 0) | (labels >= model.null_class)
    if bool(bad.any()):
        raise GenerationError(f"labels must lie in [0, {model.null_class}); got {labels[bad][:5].tolist()} "
                              f"(the null class {model.null_class} is added by guidance itself)")
    L = model.block_size
    N = L if num_positions is None else int(num_positions)
    if not 0 < N <= L:
        raise GenerationError(f"num_positions must be in 1 … {L}, got {num_positions}")
    settings = sampling_settings(model.num_subtokens, sampling)
    if generator is not None and seed is not None:
        raise GenerationError("give either seed or generator, not both")
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(0 if seed is None else int(seed))
    elif not isinstance(generator, torch.Generator):
        generator = list(generator)
        if len(generator) != B:
            raise GenerationError(f"{len(generator)} per-sample generators for {B} labels")
    batch = GuidedBatch(guidance, batch=B)  # decides guidance once for the call

    def choose(k: int, logits: torch.Tensor, info: DecodeInfo) -> torch.Tensor:
        """(rows, V_k) logits -> (rows,) chosen sub-tokens, the same in both halves."""
        scale = batch.scale(k, batch.info(info))
        tok = process_logits(logits, cfg_scale=scale, guided=batch.guided, sampling=settings[k],
                             generator=generator)  # (B,)
        return batch.tokens(tok)

    return batch, batch.labels(labels, null_class=model.null_class), N, choose


def _positions(N: int, progress: bool, desc: str):
    if not progress:
        return range(N)
    from tqdm import tqdm

    return tqdm(range(N), desc=desc, unit="tok", leave=False)


@torch.no_grad()
def generate(model: ARModel, labels: torch.Tensor, *, guidance: Guidance | None = None,
             sampling: SubTokenSampling | Sequence[SubTokenSampling] = SubTokenSampling(),
             seed: int | None = None, generator: Generators = None, record_cls_attention: bool | str = "auto",
             num_positions: int | None = None, dtype: torch.dtype | None = None,
             progress: bool = False, drop_unconditional: bool = True) -> torch.Tensor:
    """Sample sub-tokens for ``labels`` with the KV caches (docs/llamagen.md#kv-cache, docs/llamagen.md#sampling).

    Args:
        model: an :class:`ARModel` in eval mode.
        labels: (B,) class indices.
        guidance: the CFG schedule (:mod:`arforge.guidance`; None: unguided). Whether guidance
            is on is read once from ``guidance.guided``; the caches are then sized for 2B rows.
        sampling: one :class:`SubTokenSampling` per sub-token (or one for all).
        seed: seeds one generator for the batch (default 0 when no ``generator``).
        generator: a ``torch.Generator``, or B of them (one stream per sample).
        record_cls_attention: record the class-token attention for the schedule
            (``"auto"``: when ``guidance.needs_cls_attention``).
        num_positions: decode only the first N positions (benchmarks); default L.
        dtype: cache dtype (default: the model's).
        progress: a progress bar over positions.
        drop_unconditional: once the schedule's guidance has ended (``cfg_interval``), decode
            the conditional rows only (see the module docstring); False keeps computing the
            unconditional half to the end, as upstream does.

    Returns:
        (B, N, K) int64 sub-tokens (``model.factorization.merge`` gives tokenizer ids).
    """
    batch, rows_labels, N, choose = _setup(model, labels, guidance, sampling, seed, generator, num_positions)
    needs = batch.guidance.needs_cls_attention
    record = needs if record_cls_attention == "auto" else bool(record_cls_attention)
    if needs and not record:
        raise GenerationError(f"{type(batch.guidance).__name__} needs the class-token attention: "
                              "leave record_cls_attention='auto' (or True)")
    model.setup_caches(batch=batch.rows, dtype=dtype, device=rows_labels.device)  # reused when sizes match
    out = torch.empty(batch.batch, N, model.num_subtokens, dtype=torch.int64, device=rows_labels.device)
    prev = None
    for n in _positions(N, progress, "generate"):
        prev = model.decode_step(n, prev, rows_labels, choose, record_cls_attention=record)  # (rows, K)
        out[:, n] = batch.conditional(prev)
        if drop_unconditional and batch.ends_after(n, model.block_size):
            batch.end_guidance()  # rows 2B -> B: the conditional half is the first B rows
            model.keep_rows(batch.rows)
            rows_labels, prev = rows_labels[:batch.rows], prev[:batch.rows]
    return out


@torch.no_grad()
def no_cache_step(model: ARModel, tokens: torch.Tensor, labels: torch.Tensor, n: int,
                  choose: Callable[[int, torch.Tensor, DecodeInfo], torch.Tensor], *,
                  batch: GuidedBatch) -> torch.Tensor:
    """Decode position n by recomputing the model over the prefix (no caches).

    ``tokens`` (B, ≥ n+1, K) holds positions < n; position n is filled in place
    sub-token by sub-token (the heads are teacher-forced on the earlier
    sub-tokens of the same position, docs/open_magvit2.md#next-sub-token-head, docs/iar2.md#input-aggregation-and-local-context-head).
    ``labels`` are the (rows,) labels of ``batch`` and ``choose`` maps (rows, V_k) logits to
    (rows,) sub-tokens. The backbone runs once per position; sub-tokens k ≥ 1 rerun only the
    head. Returns position n's (B, K) sub-tokens.
    """
    K = tokens.shape[2]
    prefix = tokens[:, :n + 1]  # (B, n+1, K), a view: writes land in ``tokens``
    x = batch.tokens(prefix)  # (rows, n+1, K): every row sees the image's tokens (unguided: prefix itself)
    out = model(x, labels)  # eval mode: no label dropout; hidden state n depends on tokens < n only
    info = DecodeInfo(n=n, L=model.block_size)
    for k in range(K):
        logits = out.logits[0] if k == 0 else model.head(out.hidden, x)[k]  # (rows, n+1, V_k)
        tok = choose(k, at_least_fp32(logits[:, n]), info)  # (rows,)
        x[:, n, k] = tok
        prefix[:, n, k] = batch.conditional(tok)
    return prefix[:, n]


@torch.no_grad()
def generate_no_cache(model: ARModel, labels: torch.Tensor, *, guidance: Guidance | None = None,
                      sampling: SubTokenSampling | Sequence[SubTokenSampling] = SubTokenSampling(),
                      seed: int | None = None, generator: Generators = None, num_positions: int | None = None,
                      progress: bool = False, drop_unconditional: bool = True) -> torch.Tensor:
    """:func:`generate` without KV caches: each position recomputes ``model(...)`` over the prefix.

    The reference for the cached loop (same seed, same tokens) and the
    benchmark's "without KV cache" path. Schedules that need the class-token
    attention (IAR2's adaptive CFG) cannot run here: the full forward does not
    expose attention probabilities.
    """
    batch, rows_labels, N, choose = _setup(model, labels, guidance, sampling, seed, generator, num_positions)
    if batch.guidance.needs_cls_attention:
        raise GenerationError(f"{type(batch.guidance).__name__} needs the class-token attention, which only the "
                              "cached decode records: use generate()")
    tokens = torch.zeros(batch.batch, N, model.num_subtokens, dtype=torch.int64, device=rows_labels.device)
    for n in _positions(N, progress, "generate (no cache)"):
        no_cache_step(model, tokens, rows_labels, n, choose, batch=batch)
        if drop_unconditional and batch.ends_after(n, model.block_size):
            batch.end_guidance()
            rows_labels = rows_labels[:batch.rows]
    return tokens


# ================================================================== decoding
@torch.no_grad()
def decode_tokens(tokenizer: Any, factorization: Any, sub_tokens: torch.Tensor,
                  grid: tuple[int, int] | None = None, *,
                  eval_size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """Sub-tokens (B, L, K) -> images (B, 3, H, W) in about [−1, 1] (not clamped).

    ``factorization.merge`` gives the tokenizer ids, ``tokenizer.decode`` the
    images. With ``eval_size`` they are resized bicubically with
    ``align_corners=False`` and no antialiasing, as upstream does before
    quantisation (docs/evaluation.md#sample-files; 384 → 256 for LlamaGen-384, IAR, IAR2).
    """
    if sub_tokens.dim() != 3:
        raise GenerationError(f"sub_tokens must be (B, L, K), got {tuple(sub_tokens.shape)}")
    grid = tuple(grid) if grid is not None else as_grid(sub_tokens.shape[1])
    ids = factorization.merge(sub_tokens)  # (B, L, S)
    images = tokenizer.decode(ids, grid)  # (B, 3, H, W)
    if eval_size is not None:
        size = (eval_size, eval_size) if isinstance(eval_size, int) else tuple(eval_size)
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False, antialias=False)
    return images
