"""The class-conditional AR model: class embedder + token embedder + Llama backbone + head.

See docs/llamagen.md#ar-model and the method pages. One class serves LlamaGen/IAR (identity
factorization, linear head), Open-MAGVIT2 (bit split, next-sub-token head) and
IAR2 (semantic/detail pairs, local-context head); the parts are plugins (the
factorization builds the token embedder, the head owns everything after the
backbone).

Token convention: sub-tokens ``(B, L, K)`` int64, the output of a
:class:`~arforge.interfaces.Factorization` (``model.factorization.split(ids)``).

Training
--------
``forward(sub_tokens, labels) -> ARForwardOutput``
    Teacher forcing. The input sequence is [cls(y), e_0 … e_{L-2}] (the model
    shifts internally), labels are dropped to the null class with p = 0.1 in
    train mode (docs/llamagen.md#class-conditioning); ``logits`` is a list of K fp32 tensors (B, L, V_k) where
    position t predicts token t (sub-token heads are teacher-forced on the
    earlier sub-tokens of the same position, docs/open_magvit2.md#next-sub-token-head, docs/iar2.md#input-aggregation-and-local-context-head).
``loss(sub_tokens, labels, weights=None) -> LossBreakdown``
    Σ_k w_k·CE_k (docs/iar.md#cluster-oriented-loss), plus λ·CE(cluster) when the model was built with
    ``cluster_size`` (IAR). Parts hold the unweighted terms.

Generation (what :mod:`arforge.generation` builds on)
-----------------------------------------------------
The model decodes *rows*: one per label it is given. It knows nothing of guidance;
:class:`arforge.guidance.GuidedBatch` chooses the rows (B, or [y; null] = 2B with CFG,
docs/llamagen.md#cfg-batch-layout), writes each chosen token into both halves and reads the
conditional half back.

``setup_caches(*, batch, dtype=None, device=None)``
    Allocates every cache once for ``batch`` rows: the backbone KV caches at
    (rows, H_kv, S_max, hd) with S_max = find_multiple(1 + L, 8) (docs/llamagen.md#kv-cache),
    plus each head's own caches (sized to its number of slots) and IAR2's window history.
    Calling it again with the same sizes keeps the buffers.
``keep_rows(rows)``
    Decode only the first ``rows`` rows from the next position on (the conditional half once
    guidance has ended): every cache keeps its buffers, and its first rows already hold
    those rows' history.
``decode_step(n, prev, labels, choose, *, record_cls_attention=False) -> (rows, K)``
    Decodes position n (0 … L-1), feeding positions in order from 0, for the (rows,)
    ``labels`` (the null class allowed). ``prev`` (rows, K) holds token n-1 (``None`` at
    n = 0, where the input is the class embedding). For each sub-token k the head calls
    ``choose(k, logits, info) -> (rows,) int64`` with ``logits`` (rows, V_k) fp32 and
    ``info`` a :class:`DecodeInfo` (n, L and, with ``record_cls_attention``, ``attn_cls``
    (rows,): the last backbone layer's head-averaged attention to the class token,
    docs/iar2.md#sampling). Nothing is allocated in the caches per step. Call it in eval
    mode, under no_grad.
``logits_full(sub_tokens, labels)``
    The no-cache reference: the teacher-forced logits without label dropout.
``num_params()``
    Parameters, each shared tensor counted once.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, NamedTuple, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from arforge.device import at_least_fp32
from arforge.errors import ArforgeError
from arforge.interfaces import Factorization, LossBreakdown
from arforge.nn.llama import BackboneStep, LabelEmbedder, LlamaBackbone, init_llama_weights

__all__ = [
    "ARForwardOutput",
    "DecodeInfo",
    "ChooseFn",
    "TokenEmbedder",
    "ARHead",
    "ARModel",
    "subtoken_loss",
    "cluster_cross_entropy",
]


class TokenRangeError(ArforgeError, ValueError):
    """A token id or class label outside what the model's embeddings hold."""


class ARForwardOutput(NamedTuple):
    logits: list[torch.Tensor]  #: K tensors (B, L, V_k), fp32
    hidden: torch.Tensor  #: backbone output (B, L, D)


@dataclass(frozen=True)
class DecodeInfo:
    """What ``choose`` learns about the position being decoded."""

    n: int  #: token index being decoded, 0 … L-1
    L: int  #: tokens per image
    attn_cls: torch.Tensor | None = None  #: (rows,) attention to the class key, when recorded


#: choose(k, logits (rows, V_k) fp32, info) -> chosen sub-token k, (rows,) int64
ChooseFn = Callable[[int, torch.Tensor, DecodeInfo], torch.Tensor]


@runtime_checkable
class TokenEmbedder(Protocol):
    """Built by a factorization: sub-tokens (B, T, K) -> input embeddings (B, T, D)."""

    def forward(self, sub_tokens: torch.Tensor) -> torch.Tensor: ...
    def sub_embedding(self, k: int) -> nn.Embedding: ...


@runtime_checkable
class ARHead(Protocol):
    """Everything after the backbone: teacher-forced logits and per-position sampling sub-steps."""

    vocab_sizes: tuple[int, ...]
    dim: int
    #: which of the embedder's sub-token tables the head reuses (one tensor), or None
    tied_subtoken: int | None

    def tie_embedding(self, embedding: nn.Embedding) -> None: ...
    def forward(self, h: torch.Tensor, sub_tokens: torch.Tensor) -> list[torch.Tensor]: ...
    def setup_cache(self, *, batch: int, dtype: torch.dtype, device: torch.device | str) -> bool: ...
    def cache_tensors(self) -> dict[str, torch.Tensor]: ...
    def decode_position(self, h: torch.Tensor, n: int,
                        choose: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor: ...
    def zero_init_outputs(self) -> None: ...


# ====================================================================== losses
def cluster_cross_entropy(logits: torch.Tensor, tokens: torch.Tensor, *, cluster_size: int) -> torch.Tensor:
    """IAR's cluster-oriented CE (docs/iar.md#cluster-oriented-loss): CE(logsumexp over each cluster, t // cluster_size).

    Equals the mean of −log Σ_{k ∈ cluster(t)} p_k. logits (..., V), tokens (...).
    """
    v = logits.shape[-1]
    if v % cluster_size:
        raise ValueError(f"vocabulary {v} is not a whole number of clusters of {cluster_size}")
    lc = at_least_fp32(logits).reshape(-1, v // cluster_size, cluster_size).logsumexp(-1)  # (N, V/cs)
    return F.cross_entropy(lc, tokens.reshape(-1) // cluster_size)


def subtoken_loss(logits: Sequence[torch.Tensor], sub_tokens: torch.Tensor, *,
                  weights: Sequence[float] | None = None, names: Sequence[str] | None = None,
                  cluster_size: int | None = None, cluster_weight: float = 1.0) -> LossBreakdown:
    """Σ_k w_k·CE(logits_k, sub_tokens[..., k]) (+ cluster_weight·cluster CE on sub-token 0).

    Each CE is a mean over tokens (docs/llamagen.md#losses). ``parts`` are the unweighted terms, named
    ``ce_<name>`` (and ``cce``).
    """
    k_count = len(logits)
    weights = [1.0] * k_count if weights is None else list(weights)
    names = [str(k) for k in range(k_count)] if names is None else list(names)
    if len(weights) != k_count or len(names) != k_count:
        raise ValueError(f"{k_count} sub-tokens but {len(weights)} loss weights / {len(names)} names")
    parts: dict[str, torch.Tensor] = {}
    total = logits[0].new_zeros(())
    for k, (lg, w, name) in enumerate(zip(logits, weights, names, strict=True)):
        ce = F.cross_entropy(at_least_fp32(lg.reshape(-1, lg.shape[-1])), sub_tokens[..., k].reshape(-1))  # over B·L
        parts[f"ce_{name}"] = ce
        total = total + w * ce
    if cluster_size is not None:
        cce = cluster_cross_entropy(logits[0], sub_tokens[..., 0], cluster_size=cluster_size)
        parts["cce"] = cce
        total = total + cluster_weight * cce
    return LossBreakdown(total=total, parts=parts)


# ======================================================================= model
@dataclass(frozen=True)
class _DecodeState:
    rows: int
    dtype: torch.dtype
    device: torch.device
    pos: torch.Tensor  #: (1,) int64, the position a compiled step decodes (allocated once)


def _build_head(factory: Callable[..., nn.Module], *, dim: int, vocab_sizes: tuple[int, ...],
                block_size: int) -> nn.Module:
    """Call a head factory with what the model already knows (width, vocabularies, grid)."""
    import functools
    import inspect

    kwargs: dict[str, object] = {"dim": dim, "vocab_sizes": vocab_sizes}
    target = factory
    while isinstance(target, functools.partial):
        target = target.func
    # A class is read through __init__: gin's configurable subclass reports (*args, **kwargs).
    target = target.__init__ if isinstance(target, type) else target
    try:
        takes_grid = "grid_size" in inspect.signature(target).parameters
    except (TypeError, ValueError):  # a builtin or C callable: no signature to read
        takes_grid = False
    if takes_grid:
        side = int(round(block_size ** 0.5))
        if side * side != block_size:
            raise ValueError(f"head {getattr(factory, '__name__', factory)!r} needs a square token grid, "
                             f"but the backbone's block_size is {block_size}")
        kwargs["grid_size"] = side
    head = factory(**kwargs)
    if not isinstance(head, nn.Module):
        raise TypeError(f"the head factory {getattr(factory, '__name__', factory)!r} returned "
                        f"{type(head).__name__}, not a torch module")
    return head


class ARModel(nn.Module):
    """A class-conditional AR model over sub-tokens (see the module docstring for the API)."""

    def __init__(self, *, factorization: Factorization, backbone: LlamaBackbone,
                 head: nn.Module | Callable[..., nn.Module],
                 num_classes: int = 1000, class_dropout_p: float = 0.1,
                 loss_weights: Sequence[float] | None = None, cluster_size: int | None = None,
                 cluster_loss_weight: float = 1.0, init_weights: bool = True):
        """
        Args:
            factorization: tokenizer ids <-> sub-tokens, and the input token embedder
                (``build_embedder``); its ``vocab_sizes`` must equal the head's.
            backbone: the decoder stack (docs/llamagen.md#llama-backbone, docs/llamagen.md#2d-rope); its width must equal the head's.
            head: the output head plugin (docs/llamagen.md#ar-model), built or as a factory: a
                factory (in gin ``@heads.linear`` without parentheses) is called with the
                backbone's ``dim``, the factorization's ``vocab_sizes`` and, when it takes one,
                the ``grid_size`` of the backbone's square token grid, so they are not repeated.
            num_classes: classes of the label embedder (docs/llamagen.md#class-conditioning: 1000, plus the null row).
            class_dropout_p: label dropout to the null class in training (docs/llamagen.md#class-conditioning: 0.1).
            loss_weights: per-sub-token CE weights (docs/iar2.md#losses; IAR2's ``--w1`` is the first).
            cluster_size: IAR cluster-oriented loss on sub-token 0 (docs/iar.md#cluster-oriented-loss: 128), or None.
            cluster_loss_weight: its λ (docs/iar.md#cluster-oriented-loss: ``--lambda-cce`` = 1).
            init_weights: apply docs/llamagen.md#llama-backbone initialisation (N(0, 0.02), zero output layers).
        """
        super().__init__()
        vocab = tuple(factorization.vocab_sizes)
        if not isinstance(head, nn.Module):
            head = _build_head(head, dim=backbone.dim, vocab_sizes=vocab, block_size=backbone.block_size)
        if tuple(head.vocab_sizes) != vocab:
            raise ValueError(f"head vocabularies {tuple(head.vocab_sizes)} differ from the factorization's {vocab}")
        if head.dim != backbone.dim:
            raise ValueError(f"head width {head.dim} differs from the backbone width {backbone.dim}")
        grid = getattr(head, "grid_size", None)
        if grid is not None and grid * grid != backbone.block_size:
            raise ValueError(f"head grid {grid}x{grid} does not match the backbone's block_size {backbone.block_size}")
        self.factorization = factorization
        self.vocab_sizes = vocab
        self._vocab_bounds: dict[torch.device, torch.Tensor] = {}  # the id check's (K,) bounds per device
        self.num_subtokens = len(vocab)
        self.subtoken_names = tuple(getattr(factorization, "subtoken_names", [str(k) for k in range(len(vocab))]))
        self.cls_embedding = LabelEmbedder(num_classes=num_classes, dim=backbone.dim, dropout_p=class_dropout_p)
        self.embedder = factorization.build_embedder(dim=backbone.dim)
        self.backbone = backbone
        self.head = head
        if head.tied_subtoken is not None:  # one tensor shared with the input embedding (docs/checkpoints.md#strict-mapping-rules)
            head.tie_embedding(self.embedder.sub_embedding(head.tied_subtoken))
        self.loss_weights = tuple(loss_weights) if loss_weights is not None else (1.0,) * len(vocab)
        if len(self.loss_weights) != len(vocab):
            raise ValueError(f"{len(self.loss_weights)} loss weights for {len(vocab)} sub-tokens")
        self.cluster_size = cluster_size
        self.cluster_loss_weight = cluster_loss_weight
        self._decode: _DecodeState | None = None
        self._compiled_step: Callable[..., BackboneStep] | None = None  # set by compile_decode
        if init_weights:
            self.initialize_weights()

    # ------------------------------------------------------------------ basics
    def initialize_weights(self) -> None:
        """docs/llamagen.md#llama-backbone: every Linear/Embedding ~ N(0, 0.02), biases 0, norms 1, the output layers zero."""
        init_llama_weights(self)
        self.head.zero_init_outputs()

    @property
    def block_size(self) -> int:
        return self.backbone.block_size

    @property
    def null_class(self) -> int:
        return self.cls_embedding.null_class

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def configure_rope(self, *, cls_zero_rotation: bool | None = None, repeat_interleave: bool | None = None) -> None:
        """Switch a RoPE quirk (docs/llamagen.md#2d-rope, docs/iar2.md#the-repeat-interleaved-rope-table) in the backbone and the head alike."""
        self.backbone.configure_rope(cls_zero_rotation=cls_zero_rotation, repeat_interleave=repeat_interleave)
        if hasattr(self.head, "configure_rope"):
            self.head.configure_rope(cls_zero_rotation=cls_zero_rotation, repeat_interleave=repeat_interleave)

    def _check_tokens(self, sub_tokens: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Ids within each sub-token's vocabulary (and labels within [0, num_classes], the last
        being the null class), so that a bad id is a clear error and not an IndexError (CPU) or a
        device-side assert (CUDA) inside an embedding lookup. One fused test and one host sync per
        forward; the message is worked out only when it fails."""
        if sub_tokens.dim() != 3 or sub_tokens.shape[-1] != self.num_subtokens:
            raise ValueError(f"sub_tokens must be (B, L, {self.num_subtokens}) int64 (after "
                             f"factorization.split), got {tuple(sub_tokens.shape)}")
        if sub_tokens.shape[1] > self.block_size:
            raise ValueError(f"{sub_tokens.shape[1]} tokens exceed block_size {self.block_size}")
        bounds = self._vocab_bounds.get(sub_tokens.device)
        if bounds is None:  # once per device, not per forward
            bounds = self._vocab_bounds[sub_tokens.device] = torch.tensor(self.vocab_sizes, device=sub_tokens.device)
        bad = ((sub_tokens < 0) | (sub_tokens >= bounds)).any()
        if labels is not None:
            bad = bad | ((labels < 0) | (labels > self.null_class)).any()
        if not bool(bad):
            return
        out = (sub_tokens < 0) | (sub_tokens >= bounds)  # (B, L, K)
        if bool(out.any()):
            k = int(out.flatten(0, 1).any(0).nonzero()[0])
            ids = sub_tokens[..., k]
            bad_id = int(ids.max()) if int(ids.max()) >= self.vocab_sizes[k] else int(ids.min())
            raise TokenRangeError(
                f"sub-token {k} ({self.subtoken_names[k]}) holds id {bad_id}, outside the model's vocabulary "
                f"0..{self.vocab_sizes[k] - 1}: the codes were made by another tokenizer/factorization")
        if labels is not None:
            self._check_labels(labels)

    def _check_labels(self, labels: torch.Tensor) -> None:
        """Labels in [0, num_classes]; num_classes is the null class (guided sampling, CFG training)."""
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > self.null_class):
            bad = int(labels.max()) if int(labels.max()) > self.null_class else int(labels.min())
            raise TokenRangeError(f"class label {bad} is outside 0..{self.null_class - 1} (num_classes = "
                                  f"{self.null_class}; {self.null_class} is the null class): set the model's "
                                  "num_classes to the dataset's number of classes")

    # ---------------------------------------------------------------- training
    def forward(self, sub_tokens: torch.Tensor, labels: torch.Tensor, *,
                force_drop_ids: torch.Tensor | None = None) -> ARForwardOutput:
        """Teacher-forced logits; sub_tokens (B, L, K) int64, labels (B,) int64."""
        return self._teacher_forced(sub_tokens, labels, drop_labels=self.training, force_drop_ids=force_drop_ids)

    def _teacher_forced(self, sub_tokens, labels, *, drop_labels: bool, force_drop_ids=None) -> ARForwardOutput:
        self._check_tokens(sub_tokens, labels)
        cls = self.cls_embedding(labels, train=drop_labels, force_drop_ids=force_drop_ids)  # (B, 1, D)
        tok = self.embedder(sub_tokens[:, :-1])  # (B, L-1, D)
        h = self.backbone(torch.cat([cls, tok], dim=1))  # (B, L, D)
        return ARForwardOutput(logits=self.head(h, sub_tokens), hidden=h)

    def loss(self, sub_tokens: torch.Tensor, labels: torch.Tensor,
             weights: Sequence[float] | None = None) -> LossBreakdown:
        """Σ_k w_k·CE_k (+ λ·cluster CE); ``weights`` overrides the model's ``loss_weights``."""
        return self.loss_from_logits(self(sub_tokens, labels).logits, sub_tokens, weights)

    def loss_from_logits(self, logits: Sequence[torch.Tensor], sub_tokens: torch.Tensor,
                         weights: Sequence[float] | None = None) -> LossBreakdown:
        """:meth:`loss` of logits already computed by this model's forward.

        A trainer runs the forward through its DDP/FSDP wrapper (gradient hooks, sharded
        parameters) and so cannot call :meth:`loss`; it passes the wrapper's logits here, and
        the loss stays defined once.
        """
        return subtoken_loss(logits, sub_tokens, weights=weights if weights is not None else self.loss_weights,
                             names=self.subtoken_names, cluster_size=self.cluster_size,
                             cluster_weight=self.cluster_loss_weight)

    @torch.no_grad()
    def logits_full(self, sub_tokens: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
        """The no-cache reference: teacher-forced logits, no label dropout (use eval mode)."""
        return self._teacher_forced(sub_tokens, labels, drop_labels=False).logits

    # -------------------------------------------------------------- generation
    @torch.no_grad()
    def setup_caches(self, *, batch: int, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> None:
        """Allocate every decoding cache once for ``batch`` rows (2B under CFG: ``GuidedBatch.rows``)."""
        ref = next(self.parameters())
        dtype = dtype if dtype is not None else ref.dtype
        device = torch.empty(0, device=device if device is not None else ref.device).device
        pos = self._decode.pos if self._decode is not None and self._decode.pos.device == device else \
            torch.zeros(1, dtype=torch.int64, device=device)
        state = _DecodeState(rows=int(batch), dtype=dtype, device=device, pos=pos)
        self.backbone.setup_cache(max_batch=state.rows, dtype=dtype, device=device)
        self.head.setup_cache(batch=state.rows, dtype=dtype, device=device)
        self._decode = state

    def compile_decode(self, *, backend: str | None = "inductor", mode: str | None = None) -> None:
        """Decode through ``torch.compile`` of the backbone's static-cache step (None: eager again).

        The step attends over every cache slot under a mask (``LlamaBackbone.step_static``), so one
        graph serves every position; ``mode="reduce-overhead"`` adds CUDA graphs on a GPU. The
        head's few small ops per sub-token stay eager. Tokens equal the eager decode's at
        temperature 0 (``tests/test_generation.py``); the first call compiles (seconds to minutes).
        """
        if backend is None:
            self._compiled_step = None
            return
        self._compiled_step = torch.compile(self.backbone.step_static, backend=backend, mode=mode, fullgraph=True)

    def keep_rows(self, rows: int) -> None:
        """Decode the first ``rows`` rows only from the next position on (see the module docstring)."""
        state = self._decode
        if state is None or not 0 < int(rows) <= state.rows:
            raise ValueError(f"keep_rows({rows}) needs caches set up for at least that many rows "
                             f"(now {None if state is None else state.rows})")
        self._decode = replace(state, rows=int(rows))

    def release_caches(self) -> None:
        self.backbone.release_cache()
        if hasattr(self.head, "release_cache"):
            self.head.release_cache()
        self._decode = None

    def cache_tensors(self) -> dict[str, torch.Tensor]:
        """Every decoding buffer by name (to check that nothing is reallocated)."""
        out = {f"backbone.{k}": v for k, v in self.backbone.cache_tensors().items()}
        out.update({f"head.{k}": v for k, v in self.head.cache_tensors().items()})
        return out

    @torch.no_grad()
    def decode_step(self, n: int, prev: torch.Tensor | None, labels: torch.Tensor, choose: ChooseFn, *,
                    record_cls_attention: bool = False) -> torch.Tensor:
        """Decode position n; returns its sub-tokens (rows, K) (see the module docstring)."""
        state = self._decode
        if state is None:
            raise RuntimeError("decode_step needs caches: call setup_caches(batch=..., ...) first")
        rows = state.rows
        if labels.shape != (rows,):
            raise ValueError(f"labels must be ({rows},), one per row of setup_caches(batch={rows}), "
                             f"got {tuple(labels.shape)}")
        L = self.block_size
        if not 0 <= n < L:
            raise ValueError(f"position {n} is outside 0 … {L - 1}")
        if n == 0:  # labels are checked once per image batch, not at every position
            self._check_labels(labels)
            x = self.cls_embedding(labels, train=False)  # (rows, 1, D)
        else:
            if prev is None or prev.shape != (rows, self.num_subtokens):
                raise ValueError(f"prev must be the (rows, K) = ({rows}, {self.num_subtokens}) sub-tokens of "
                                 f"position {n - 1}, got {None if prev is None else tuple(prev.shape)}")
            x = self.embedder(prev[:, None, :])  # (rows, 1, D)
        if self._compiled_step is not None:
            pos = state.pos.fill_(n)  # one (1,) tensor for the whole decode: the graph's input
            step = self._compiled_step(x.to(state.dtype), pos, return_cls_attn=record_cls_attention)
        else:
            step = self.backbone.step(x.to(state.dtype), n, return_cls_attn=record_cls_attention)
        info = DecodeInfo(n=n, L=L, attn_cls=step.attn_cls)

        def head_choose(k: int, logits: torch.Tensor) -> torch.Tensor:
            tok = choose(k, logits, info)
            if tok.shape != (rows,):
                raise ValueError(f"choose must return ({rows},) sub-tokens, got {tuple(tok.shape)}")
            return tok

        return self.head.decode_position(step.hidden, n, head_choose)  # (rows, K)
