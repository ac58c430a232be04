"""Open-MAGVIT2's next-sub-token intra transformer (docs/open_magvit2.md#next-sub-token-head, docs/open_magvit2.md#sampling).

For each position t the 2-slot sequence [h_t, E_pre[pre_t]] runs through
``factorized_blocks`` (full Llama blocks of the backbone's width, causal, RoPE
rows 0–1: zero rotation then the identity, docs/open_magvit2.md#next-sub-token-head), a shared RMSNorm ``norm``,
and ``head.0`` (slot 0 → pre logits) / ``head.1`` (slot 1 → post logits).
E_pre is the embedder's ``pre_emb`` — the same tensor, not a copy
(docs/checkpoints.md#strict-mapping-rules): the model ties it with :meth:`tie_embedding`.

Sampling: per position a cache of exactly two slots per block, allocated once
per generation and overwritten each step (docs/llamagen.md#kv-cache; upstream reallocates a
264-long cache at each of the 256 steps).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from arforge.device import at_least_fp32
from arforge.nn.llama import RMSNorm, SubtokenRotaryMixin, TransformerBlock, run_blocks

__all__ = ["NextSubtokenHead"]


class NextSubtokenHead(SubtokenRotaryMixin, nn.Module):
    """Intra transformer over [h_t, E_pre[pre_t]] → (pre, post) logits (Open-MAGVIT2 docs/open_magvit2.md#next-sub-token-head)."""

    tied_subtoken = 0  #: reuses the embedder's ``pre_emb``
    n_slots = 2

    def __init__(self, *, dim: int, n_layer: int, n_head: int, n_kv_head: int | None = None,
                 vocab_sizes: Sequence[int] = (64, 4096), ffn_hidden: int | None = None,
                 norm_eps: float = 1e-5, attn_dropout_p: float = 0.0, resid_dropout_p: float = 0.1,
                 ffn_dropout_p: float = 0.1, rope_base: float = 10000.0, cls_zero_rotation: bool = True,
                 rope_repeat_interleave: bool = False, grad_checkpointing: bool = False):
        """
        Args:
            dim, n_head, n_kv_head, ffn_hidden, norm_eps: as the backbone (docs/open_magvit2.md#model-sizes: same width and blocks).
            n_layer: ``factorized_n_layer`` (docs/open_magvit2.md#model-sizes: 2 / 3 / 4 for B / L / XL).
            vocab_sizes: (pre, post) vocabularies (docs/open_magvit2.md#next-sub-token-head: 64 and 4096, from bits [6, 12]).
            attn_dropout_p, resid_dropout_p, ffn_dropout_p: block dropouts (docs/llamagen.md#llama-backbone: 0, 0.1, 0.1).
            rope_base, cls_zero_rotation, rope_repeat_interleave: the table whose rows 0–1 the slots use (docs/open_magvit2.md#next-sub-token-head).
            grad_checkpointing: checkpoint each of ``factorized_blocks`` in the training forward
                (train mode, grad enabled), as :class:`~arforge.nn.llama.LlamaBackbone` does: their
                activations over the B·L short sequences are recomputed in backward instead of kept.
                Never applies to decoding. A plain attribute, switchable after construction.
        """
        super().__init__()
        vocab_sizes = tuple(int(v) for v in vocab_sizes)
        if len(vocab_sizes) != 2:
            raise ValueError(f"the next-sub-token head predicts two sub-tokens, got vocab_sizes {vocab_sizes}")
        self.dim = dim
        self.vocab_sizes = vocab_sizes
        self.head_dim = dim // n_head
        self.rope_base = rope_base
        self.cls_zero_rotation = cls_zero_rotation
        self.rope_repeat_interleave = rope_repeat_interleave
        self.grad_checkpointing = bool(grad_checkpointing)
        self.factorized_blocks = nn.ModuleList([
            TransformerBlock(dim=dim, n_head=n_head, n_kv_head=n_kv_head, ffn_hidden=ffn_hidden, norm_eps=norm_eps,
                             attn_dropout_p=attn_dropout_p, resid_dropout_p=resid_dropout_p,
                             ffn_dropout_p=ffn_dropout_p)
            for _ in range(n_layer)
        ])
        self.norm = RMSNorm(dim=dim, eps=norm_eps)
        self.head = nn.ModuleList([nn.Linear(dim, v, bias=False) for v in vocab_sizes])
        self.register_buffer("freqs_cis", self._table(), persistent=False)
        self.__dict__["_pre_emb"] = None  # tied, not registered: it belongs to the embedder

    # ---------------------------------------------------------------- tying
    def tie_embedding(self, embedding: nn.Embedding) -> None:
        if embedding.num_embeddings != self.vocab_sizes[0]:
            raise ValueError(f"pre embedding has {embedding.num_embeddings} rows, expected {self.vocab_sizes[0]}")
        self.__dict__["_pre_emb"] = embedding

    @property
    def pre_emb(self) -> nn.Embedding:
        emb = self.__dict__["_pre_emb"]
        if emb is None:
            raise RuntimeError("the next-sub-token head has no pre embedding: build it inside an ARModel "
                               "(which ties the embedder's pre_emb) or call tie_embedding(...)")
        return emb

    def zero_init_outputs(self) -> None:
        for lin in self.head:
            nn.init.zeros_(lin.weight)

    # ------------------------------------------------------------- training
    def forward(self, h: torch.Tensor, sub_tokens: torch.Tensor) -> list[torch.Tensor]:
        """h (B, L, D), sub_tokens (B, L, 2) -> [pre (B, L, V_0), post (B, L, V_1)] fp32."""
        b, n_pos, d = h.shape
        x = torch.stack([h, self.pre_emb(sub_tokens[..., 0])], dim=2)  # (B, L, 2, D)
        x = x.reshape(b * n_pos, self.n_slots, d)  # (B·L, 2, D)
        x = run_blocks(self.factorized_blocks, x, self.freqs_cis,
                       checkpointing=self.grad_checkpointing and self.training)
        x = self.norm(x).view(b, n_pos, self.n_slots, d)  # (B, L, 2, D)
        return [at_least_fp32(self.head[0](x[:, :, 0])), at_least_fp32(self.head[1](x[:, :, 1]))]

    # ------------------------------------------------------------- decoding
    def setup_cache(self, *, batch: int, dtype: torch.dtype, device: torch.device | str) -> bool:
        allocated = False
        for blk in self.factorized_blocks:
            allocated |= blk.attention.setup_cache(max_batch=batch, max_seq_len=self.n_slots,
                                                   dtype=dtype, device=device)
        return allocated

    def release_cache(self) -> None:
        for blk in self.factorized_blocks:
            blk.attention.kv_cache = None

    def cache_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, blk in enumerate(self.factorized_blocks):
            if blk.attention.kv_cache is not None:
                out[f"factorized_blocks.{i}.k_cache"] = blk.attention.kv_cache.k_cache
                out[f"factorized_blocks.{i}.v_cache"] = blk.attention.kv_cache.v_cache
        return out

    def _slot(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        freqs = self.freqs_cis[pos:pos + 1]  # (1, hd/2, 2)
        for blk in self.factorized_blocks:
            x, _ = blk.step(x, freqs, pos)
        return self.norm(x[:, 0])  # (Bc, D)

    def decode_position(self, h: torch.Tensor, n: int,
                        choose: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """docs/open_magvit2.md#sampling steps 2–3: h (Bc, 1, D) -> (pre, post) (Bc, 2); slot 0 then slot 1 reusing slot 0's K/V."""
        pre = choose(0, at_least_fp32(self.head[0](self._slot(h, 0))))  # (Bc,)
        post = choose(1, at_least_fp32(self.head[1](self._slot(self.pre_emb(pre)[:, None], 1))))  # (Bc,)
        return torch.stack([pre, post], dim=1)  # (Bc, 2)
