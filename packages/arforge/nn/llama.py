"""Llama-style building blocks shared by every arforge AR family.

LlamaGen, IAR, Open-MAGVIT2 and IAR2 all use LlamaGen's block code
(docs/llamagen.md#llama-backbone): pre-norm blocks of fused-``wqkv`` attention
with 2D RoPE and a SwiGLU FFN. This module holds those blocks, the class embedder with label
dropout (docs/llamagen.md#class-conditioning) and :class:`LlamaBackbone`, the decoder stack with a training
``forward`` (causal SDPA) and a cached ``step`` for decoding. The 2D rotary table with its two
upstream quirks is :mod:`arforge.nn.rope` (docs/llamagen.md#2d-rope), the static KV cache
:mod:`arforge.nn.kv_cache` (docs/llamagen.md#kv-cache).

Attribute names follow upstream (``attention.wqkv``, ``feed_forward.w1`` ...)
so that the official checkpoints map onto them by renaming prefixes only
(docs/checkpoints.md#llamagen-and-iar-gpt, docs/checkpoints.md#open-magvit2-ar, docs/checkpoints.md#iar2-gpt).

Shapes: B batch, T sequence length, D width, H heads, H_kv key/value heads,
hd = D/H head dimension, S_max cache length.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from arforge.device import at_least_fp32
# The rotary table and the KV cache have their own modules; their names stay importable from here.
from arforge.nn.kv_cache import KVCache, canonical_device
from arforge.nn.rope import (RotaryTableMixin, SubtokenRotaryMixin, apply_rotary_emb, precompute_freqs_cis_2d,
                             subtoken_freqs_cis)

__all__ = [
    "find_multiple",
    "ffn_hidden_size",
    "RMSNorm",
    "FeedForward",
    "KVCache",
    "canonical_device",
    "Attention",
    "TransformerBlock",
    "run_blocks",
    "precompute_freqs_cis_2d",
    "subtoken_freqs_cis",
    "RotaryTableMixin",
    "apply_rotary_emb",
    "LabelEmbedder",
    "BackboneStep",
    "LlamaBackbone",
    "init_llama_weights",
]


def find_multiple(n: int, k: int) -> int:
    """The smallest multiple of ``k`` that is >= ``n`` (docs/llamagen.md#llama-backbone)."""
    if n % k == 0:
        return n
    return n + k - (n % k)


def ffn_hidden_size(dim: int, multiple_of: int = 256) -> int:
    """SwiGLU hidden size ``find_multiple(int(2*4D/3), 256)`` (docs/llamagen.md#llama-backbone; note the truncating int())."""
    return find_multiple(int(2 * (4 * dim) / 3), multiple_of)


# ======================================================================= norm
class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the gain (docs/llamagen.md#llama-backbone)."""

    def __init__(self, *, dim: int, eps: float = 1e-5):
        """dim: features normalised over the last axis; eps: ε (docs/llamagen.md#llama-backbone: 1e-5 in every family)."""
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = at_least_fp32(x)
        out = xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


# ======================================================================== ffn
class FeedForward(nn.Module):
    """SwiGLU FFN ``w2(silu(w1 x) * w3 x)`` without biases, dropout after ``w2`` (docs/llamagen.md#llama-backbone)."""

    def __init__(self, *, dim: int, hidden_dim: int | None = None, dropout_p: float = 0.1):
        """
        Args:
            dim: model width D.
            hidden_dim: SwiGLU hidden size; None applies the docs/llamagen.md#llama-backbone rule find_multiple(int(2·4D/3), 256).
            dropout_p: FFN dropout after ``w2`` (docs/llamagen.md#llama-backbone: 0.1).
        """
        super().__init__()
        hidden = hidden_dim if hidden_dim is not None else ffn_hidden_size(dim)  # docs/llamagen.md#llama-backbone rule
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.ffn_dropout = nn.Dropout(dropout_p)  #: docs/llamagen.md#llama-backbone: 0.1 in every family

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


# ================================================================ attention
class Attention(nn.Module):
    """Fused-``wqkv`` attention with 2D RoPE (docs/llamagen.md#llama-backbone).

    ``wqkv`` output features split as [q (H·hd); k (H_kv·hd); v (H_kv·hd)], head h at
    features [h·hd, (h+1)·hd). Plain MHA in every released model (H_kv = H); the
    cache and split honour H_kv anyway (docs/llamagen.md#kv-cache).
    """

    def __init__(self, *, dim: int, n_head: int, n_kv_head: int | None = None,
                 attn_dropout_p: float = 0.0, resid_dropout_p: float = 0.1):
        """
        Args:
            dim: model width D (docs/llamagen.md#model-sizes tables).
            n_head: query heads H; hd = D / H (docs/llamagen.md#model-sizes tables).
            n_kv_head: key/value heads (None = H, plain MHA as in every release, docs/llamagen.md#llama-backbone).
            attn_dropout_p: attention-probability dropout (docs/llamagen.md#llama-backbone: 0).
            resid_dropout_p: dropout after ``wo`` (docs/llamagen.md#llama-backbone: 0.1).
        """
        super().__init__()
        if dim % n_head:
            raise ValueError(f"width {dim} is not divisible by {n_head} heads")
        self.dim = dim
        self.n_head = n_head
        self.n_kv_head = n_kv_head if n_kv_head is not None else n_head
        if n_head % self.n_kv_head:
            raise ValueError(f"{n_head} heads are not a multiple of {self.n_kv_head} key/value heads")
        self.head_dim = dim // n_head
        kv_dim = self.n_kv_head * self.head_dim
        self.wqkv = nn.Linear(dim, dim + 2 * kv_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.attn_dropout_p = attn_dropout_p  #: docs/llamagen.md#llama-backbone: 0 in every family
        self.resid_dropout = nn.Dropout(resid_dropout_p)  #: docs/llamagen.md#llama-backbone: 0.1 in every family
        self.kv_cache: KVCache | None = None

    # ------------------------------------------------------------------ helpers
    def _qkv(self, x: torch.Tensor, freqs_cis: torch.Tensor):
        b, t, _ = x.shape
        kv_dim = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([self.dim, kv_dim, kv_dim], dim=-1)
        q = q.view(b, t, self.n_head, self.head_dim)  # (B, T, H, hd)
        k = k.view(b, t, self.n_kv_head, self.head_dim)  # (B, T, H_kv, hd)
        v = v.view(b, t, self.n_kv_head, self.head_dim)  # (B, T, H_kv, hd)
        q = apply_rotary_emb(q, freqs_cis)
        k = apply_rotary_emb(k, freqs_cis)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|H_kv, T, hd)

    def _expand_kv(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rep = self.n_head // self.n_kv_head
        if rep == 1:
            return k, v
        return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, S, hd)

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = y.shape
        y = y.transpose(1, 2).reshape(b, t, self.dim)  # (B, H, T, hd) -> (B, T, D)
        return self.resid_dropout(self.wo(y))

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        """Causal self-attention over the whole sequence x (B, T, D); freqs_cis (T, hd/2, 2)."""
        q, k, v = self._qkv(x, freqs_cis)
        k, v = self._expand_kv(k, v)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.attn_dropout_p if self.training else 0.0)
        return self._out(y)

    def setup_cache(self, *, max_batch: int, max_seq_len: int, dtype: torch.dtype,
                    device: torch.device | str) -> bool:
        """Allocate the cache unless one of exactly these sizes exists; True if allocated."""
        device = canonical_device(device)
        if self.kv_cache is not None and self.kv_cache.matches(max_batch=max_batch, max_seq_len=max_seq_len,
                                                               dtype=dtype, device=device):
            return False
        self.kv_cache = KVCache(max_batch=max_batch, n_kv_head=self.n_kv_head, max_seq_len=max_seq_len,
                                head_dim=self.head_dim, dtype=dtype, device=device)
        return True

    def step(self, x: torch.Tensor, freqs_cis: torch.Tensor, start_pos: int, *,
             return_cls_attn: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Cached attention for x (B, T, D) at positions [start_pos, start_pos + T).

        Keys/values go into the static cache; the queries attend over the filled
        prefix only (causal among the T new positions). With ``return_cls_attn`` it
        also returns the attention probability of the last query to key 0 (the
        class token), averaged over heads: (B,) fp32 (docs/iar2.md#sampling).
        """
        if self.kv_cache is None:
            raise RuntimeError("no KV cache: call setup_caches(...) before decoding")
        q, k, v = self._qkv(x, freqs_cis)
        cache = self.kv_cache
        keys, values = cache.update(start_pos, k.to(cache.k_cache.dtype), v.to(cache.v_cache.dtype))
        keys, values = self._expand_kv(keys.to(q.dtype), values.to(q.dtype))
        t = q.shape[2]
        if t == 1:  # one query sees the whole filled prefix: no mask at all
            y = F.scaled_dot_product_attention(q, keys, values)
        elif start_pos == 0:  # a square causal block
            y = F.scaled_dot_product_attention(q, keys, values, is_causal=True)
        else:
            s = start_pos + t
            mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=start_pos)  # (T, S)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        attn_cls = None
        if return_cls_attn:
            scores = (at_least_fp32(q[:, :, -1:]) @ at_least_fp32(keys).transpose(-1, -2)) / math.sqrt(self.head_dim)  # (B, H, 1, S)
            attn_cls = scores.softmax(dim=-1)[:, :, 0, 0].mean(dim=1)  # (B,)
        return self._out(y), attn_cls

    def step_static(self, x: torch.Tensor, freqs_cis: torch.Tensor, input_pos: torch.Tensor, mask: torch.Tensor, *,
                    return_cls_attn: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`step` for one position over the whole static cache, for ``torch.compile``.

        x (B, 1, D) at the position held in the (1,) tensor ``input_pos``; ``mask`` (1, S_max)
        keeps the filled keys. Every shape is the same at every position, so one compiled graph
        serves the whole sequence (upstream's layout: all S_max slots under a mask). The masked
        slots add exact zeros to the softmax, so it equals :meth:`step` up to the kernels'
        summation order.
        """
        if self.kv_cache is None:
            raise RuntimeError("no KV cache: call setup_caches(...) before decoding")
        q, k, v = self._qkv(x, freqs_cis)
        b = x.shape[0]
        kc, vc = self.kv_cache.k_cache[:b], self.kv_cache.v_cache[:b]  # (B, H_kv, S_max, hd) views
        kc.index_copy_(2, input_pos, k.to(kc.dtype))
        vc.index_copy_(2, input_pos, v.to(vc.dtype))
        keys, values = self._expand_kv(kc.to(q.dtype), vc.to(q.dtype))
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        attn_cls = None
        if return_cls_attn:
            scores = (at_least_fp32(q) @ at_least_fp32(keys).transpose(-1, -2)) / math.sqrt(self.head_dim)  # (B, H, 1, S)
            scores = scores.masked_fill(~mask, float("-inf"))
            attn_cls = scores.softmax(dim=-1)[:, :, 0, 0].mean(dim=1)  # (B,)
        return self._out(y), attn_cls


# ==================================================================== block
class TransformerBlock(nn.Module):
    """Pre-norm block h = x + Attn(norm(x)); out = h + FFN(norm(h)) (docs/llamagen.md#llama-backbone; drop-path 0)."""

    def __init__(self, *, dim: int, n_head: int, n_kv_head: int | None = None, ffn_hidden: int | None = None,
                 norm_eps: float = 1e-5, attn_dropout_p: float = 0.0, resid_dropout_p: float = 0.1,
                 ffn_dropout_p: float = 0.1):
        """
        Args:
            dim, n_head, n_kv_head: see :class:`Attention` (docs/llamagen.md#llama-backbone).
            ffn_hidden: SwiGLU hidden size (None = the docs/llamagen.md#llama-backbone rule).
            norm_eps: RMSNorm ε (docs/llamagen.md#llama-backbone: 1e-5).
            attn_dropout_p, resid_dropout_p, ffn_dropout_p: docs/llamagen.md#llama-backbone (0, 0.1, 0.1).
        """
        super().__init__()
        self.attention = Attention(dim=dim, n_head=n_head, n_kv_head=n_kv_head,
                                   attn_dropout_p=attn_dropout_p, resid_dropout_p=resid_dropout_p)
        self.feed_forward = FeedForward(dim=dim, hidden_dim=ffn_hidden, dropout_p=ffn_dropout_p)
        self.attention_norm = RMSNorm(dim=dim, eps=norm_eps)
        self.ffn_norm = RMSNorm(dim=dim, eps=norm_eps)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis)
        return h + self.feed_forward(self.ffn_norm(h))

    def step(self, x: torch.Tensor, freqs_cis: torch.Tensor, start_pos: int, *,
             return_cls_attn: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        a, attn_cls = self.attention.step(self.attention_norm(x), freqs_cis, start_pos,
                                          return_cls_attn=return_cls_attn)
        h = x + a
        return h + self.feed_forward(self.ffn_norm(h)), attn_cls

    def step_static(self, x: torch.Tensor, freqs_cis: torch.Tensor, input_pos: torch.Tensor, mask: torch.Tensor, *,
                    return_cls_attn: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        a, attn_cls = self.attention.step_static(self.attention_norm(x), freqs_cis, input_pos, mask,
                                                 return_cls_attn=return_cls_attn)
        h = x + a
        return h + self.feed_forward(self.ffn_norm(h)), attn_cls


def run_blocks(blocks, x: torch.Tensor, freqs_cis: torch.Tensor, *, checkpointing: bool) -> torch.Tensor:
    """Run the teacher-forced ``forward`` of ``blocks`` in order, optionally checkpointed.

    With ``checkpointing`` (the caller passes it only for a module in train mode;
    ignored while grad is disabled) each block runs under
    ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: its inner
    activations are freed after the forward and recomputed from the block's input
    during backward, so only one tensor (B, T, D) per block stays alive between
    forward and backward. Each block's forward then runs twice per step.
    """
    if not (checkpointing and torch.is_grad_enabled()):
        for blk in blocks:
            x = blk(x, freqs_cis)
        return x
    for blk in blocks:
        # use_reentrant=False with the default preserve_rng_state=True saves the CPU (and the
        # input's CUDA device) RNG state before the forward and restores it for the
        # recomputation, so the dropout masks replayed in backward are the ones of the forward:
        # gradients equal those without checkpointing.
        x = torch.utils.checkpoint.checkpoint(blk, x, freqs_cis, use_reentrant=False)
    return x


# ============================================================ class embedder
class LabelEmbedder(nn.Module):
    """Class embeddings with label dropout for CFG (docs/llamagen.md#class-conditioning).

    ``embedding_table`` has ``num_classes + 1`` rows; row ``num_classes`` is the
    null class. arforge always builds it (upstream only when dropout > 0).
    """

    def __init__(self, *, num_classes: int = 1000, dim: int, dropout_p: float = 0.1):
        """
        Args:
            num_classes: real classes (docs/llamagen.md#class-conditioning: 1000 ImageNet classes); the table has one more row.
            dim: model width D.
            dropout_p: probability of replacing a label by the null class in training (docs/llamagen.md#class-conditioning, docs/llamagen.md#llama-backbone: 0.1).
        """
        super().__init__()
        self.num_classes = num_classes
        self.dropout_p = dropout_p
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_p
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, *, train: bool,
                force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """labels (B,) or (B, 1) int64 -> (B, 1, D)."""
        if labels.dim() == 2:
            labels = labels.squeeze(1)  # Open-MAGVIT2 passes (B, 1)
        if (train and self.dropout_p > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels).unsqueeze(1)  # (B, 1, D)


# ================================================================= backbone
class BackboneStep(NamedTuple):
    hidden: torch.Tensor  #: (B, T, D)
    attn_cls: torch.Tensor | None  #: (B,) last layer's head-averaged attention to key 0, when asked


class LlamaBackbone(RotaryTableMixin, nn.Module):
    """The Llama-style decoder stack over input embeddings (docs/llamagen.md#llama-backbone, docs/llamagen.md#2d-rope, docs/llamagen.md#kv-cache).

    Input: [cls, e_0 … e_{L-2}] as embeddings (B, T, D), built by the caller.
    Token dropout (class slot included, docs/llamagen.md#llama-backbone) → ``layers`` → optional ``norm``.
    The final norm exists only for new combinations: the released families put
    it in the head (LlamaGen ``norm``, Open-MAGVIT2's shared ``norm``) or have
    none (IAR2, docs/iar2.md#input-aggregation-and-local-context-head).
    """

    def __init__(self, *, dim: int, n_layer: int, n_head: int, n_kv_head: int | None = None,
                 block_size: int, cls_token_num: int = 1, ffn_hidden: int | None = None,
                 norm_eps: float = 1e-5, token_dropout_p: float = 0.1, attn_dropout_p: float = 0.0,
                 resid_dropout_p: float = 0.1, ffn_dropout_p: float = 0.1, rope_base: float = 10000.0,
                 cls_zero_rotation: bool = True, rope_repeat_interleave: bool = False,
                 final_norm: bool = False, grad_checkpointing: bool = False):
        """
        Args:
            dim, n_layer, n_head: width, blocks and heads (docs/llamagen.md#model-sizes tables).
            n_kv_head: key/value heads (None = n_head; the KV cache is sized with it, docs/llamagen.md#kv-cache).
            block_size: tokens per image L = g² (docs/llamagen.md#model-sizes: 256 or 576); sets the RoPE grid and S_max.
            cls_token_num: class slots before the tokens (docs/llamagen.md#2d-rope: 1).
            ffn_hidden: SwiGLU hidden size (None = the docs/llamagen.md#llama-backbone rule).
            norm_eps: RMSNorm ε (docs/llamagen.md#llama-backbone: 1e-5).
            token_dropout_p: dropout on the whole input sequence, class slot included (docs/llamagen.md#llama-backbone: 0.1).
            attn_dropout_p, resid_dropout_p, ffn_dropout_p: docs/llamagen.md#llama-backbone (0, 0.1, 0.1).
            rope_base: RoPE base (docs/llamagen.md#2d-rope: 10000).
            cls_zero_rotation: docs/llamagen.md#2d-rope quirk, class rows (cos, sin) = (0, 0); on for every official checkpoint.
            rope_repeat_interleave: docs/iar2.md#the-repeat-interleaved-rope-table IAR2 quirk, token t rotated by cell ⌊t/2⌋.
            final_norm: an RMSNorm ``norm`` after the blocks (off for the released families, whose
                final norm lives in the head or does not exist, docs/llamagen.md#ar-model).
            grad_checkpointing: activation (gradient) checkpointing of every block: each block
                runs under ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``, so its
                internal activations (attention, the SwiGLU hidden, dropout masks) are not kept
                for backward but recomputed from the block input. Trades about one extra forward
                of the blocks per step (up to ~1/3 more compute) for activation memory that grows with
                one (B, T, D) tensor per block instead of all of them. Applies only to the
                training ``forward`` while the module is in train mode with grad enabled; eval,
                ``torch.no_grad()`` and the KV-cached ``step`` (decoding) never checkpoint.
                Dropout replays identically (RNG state preserved), so losses and gradients are
                those without it. A plain attribute: ``backbone.grad_checkpointing = True``
                switches it after construction.
        """
        super().__init__()
        grid = int(round(block_size ** 0.5))
        if grid * grid != block_size:
            raise ValueError(f"block_size {block_size} is not a square grid of tokens (2D RoPE, docs/llamagen.md#2d-rope)")
        self.dim = dim
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_kv_head = n_kv_head if n_kv_head is not None else n_head
        self.head_dim = dim // n_head
        self.block_size = block_size
        self.grid_size = grid
        self.cls_token_num = cls_token_num
        self.rope_base = rope_base
        self.cls_zero_rotation = cls_zero_rotation
        self.rope_repeat_interleave = rope_repeat_interleave
        self.grad_checkpointing = bool(grad_checkpointing)
        self.tok_dropout = nn.Dropout(token_dropout_p)
        self.layers = nn.ModuleList([
            TransformerBlock(dim=dim, n_head=n_head, n_kv_head=n_kv_head, ffn_hidden=ffn_hidden,
                             norm_eps=norm_eps, attn_dropout_p=attn_dropout_p,
                             resid_dropout_p=resid_dropout_p, ffn_dropout_p=ffn_dropout_p)
            for _ in range(n_layer)
        ])
        self.norm = RMSNorm(dim=dim, eps=norm_eps) if final_norm else None
        self.register_buffer("freqs_cis", self._table(), persistent=False)

    def _table(self) -> torch.Tensor:
        return precompute_freqs_cis_2d(grid_size=self.grid_size, head_dim=self.head_dim, base=self.rope_base,
                                       cls_token_num=self.cls_token_num, cls_zero_rotation=self.cls_zero_rotation,
                                       repeat_interleave=self.rope_repeat_interleave)

    def configure_rope(self, *, cls_zero_rotation: bool | None = None,
                       repeat_interleave: bool | None = None) -> None:
        """Switch a RoPE quirk and rebuild the (non-persistent) table in place."""
        if cls_zero_rotation is not None:
            self.cls_zero_rotation = cls_zero_rotation
        if repeat_interleave is not None:
            self.rope_repeat_interleave = repeat_interleave
        self.freqs_cis = self._table().to(self.freqs_cis.device)

    @property
    def max_seq_len(self) -> int:
        """S_max = find_multiple(cls + L, 8) (docs/llamagen.md#kv-cache: 257 -> 264, 577 -> 584)."""
        return find_multiple(self.cls_token_num + self.block_size, 8)

    # ---------------------------------------------------------------- training
    def forward(self, x_emb: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """x_emb (B, T, D) -> (B, T, D) under a causal mask.

        ``input_pos`` (T,) picks the RoPE rows (default 0 … T-1, docs/llamagen.md#2d-rope). With
        ``grad_checkpointing`` (train mode, grad enabled) every block is checkpointed.
        """
        t = x_emb.shape[1]
        if t > self.freqs_cis.shape[0]:
            raise ValueError(f"sequence of {t} positions exceeds the RoPE table "
                             f"({self.freqs_cis.shape[0]} = cls + block_size {self.block_size})")
        freqs = self.freqs_cis[:t] if input_pos is None else self.freqs_cis[input_pos]  # (T, hd/2, 2)
        h = self.tok_dropout(x_emb)
        h = run_blocks(self.layers, h, freqs, checkpointing=self.grad_checkpointing and self.training)
        return self.norm(h) if self.norm is not None else h

    # ---------------------------------------------------------------- decoding
    def setup_cache(self, *, max_batch: int, dtype: torch.dtype, device: torch.device | str,
                    max_seq_len: int | None = None) -> bool:
        """Allocate every layer's KV cache once (reused when sizes match); True if any was allocated."""
        s_max = max_seq_len if max_seq_len is not None else self.max_seq_len
        allocated = False
        for layer in self.layers:
            allocated |= layer.attention.setup_cache(max_batch=max_batch, max_seq_len=s_max,
                                                     dtype=dtype, device=device)
        return allocated

    def release_cache(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None

    def cache_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, layer in enumerate(self.layers):
            c = layer.attention.kv_cache
            if c is not None:
                out[f"layers.{i}.k_cache"] = c.k_cache
                out[f"layers.{i}.v_cache"] = c.v_cache
        return out

    def step(self, x_emb: torch.Tensor, pos: int, *, return_cls_attn: bool = False) -> BackboneStep:
        """Cached decoding of x_emb (B, T, D) at positions [pos, pos + T) (T = 1 when decoding).

        Positions must be fed in order from 0 (the class slot): each step attends
        over the cache prefix [0, pos + T).
        """
        t = x_emb.shape[1]
        freqs = self.freqs_cis[pos:pos + t]  # (T, hd/2, 2)
        h = self.tok_dropout(x_emb)
        attn_cls = None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            h, a = layer.step(h, freqs, pos, return_cls_attn=return_cls_attn and i == last)
            if a is not None:
                attn_cls = a
        if self.norm is not None:
            h = self.norm(h)
        return BackboneStep(h, attn_cls)

    def step_static(self, x_emb: torch.Tensor, input_pos: torch.Tensor, *,
                    return_cls_attn: bool = False) -> BackboneStep:
        """:meth:`step` for one position given as a (1,) tensor, over the whole static cache:
        the shapes do not change along the sequence, so ``torch.compile`` builds one graph
        (CUDA graphs with ``mode="reduce-overhead"``). ``ARModel.compile_decode`` uses it."""
        freqs = self.freqs_cis.index_select(0, input_pos)  # (1, hd/2, 2)
        s_max = self.layers[0].attention.kv_cache.max_seq_len
        mask = (torch.arange(s_max, device=input_pos.device) <= input_pos)[None]  # (T=1, S_max): filled slots
        h = self.tok_dropout(x_emb)
        attn_cls = None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            h, a = layer.step_static(h, freqs, input_pos, mask, return_cls_attn=return_cls_attn and i == last)
            if a is not None:
                attn_cls = a
        if self.norm is not None:
            h = self.norm(h)
        return BackboneStep(h, attn_cls)


# ====================================================================== init
def init_llama_weights(module: nn.Module, *, std: float = 0.02) -> None:
    """docs/llamagen.md#llama-backbone: Linear/Embedding weights ~ N(0, 0.02), Linear biases 0, RMSNorm gains 1.

    Zero-initialising the final output layers is each head's job.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=std)
        elif isinstance(m, RMSNorm):
            nn.init.ones_(m.weight)
