"""Token factorizations: tokenizer ids (B, L, S) <-> AR sub-tokens (B, L, K), and their input embedders.

docs/llamagen.md#ar-model, docs/llamagen.md#losses, docs/open_magvit2.md#lfq-and-token-ids. Each class
satisfies :class:`arforge.interfaces.Factorization` and builds the module that
embeds sub-tokens for the backbone (``build_embedder(dim=...)``):

* :class:`IdentityFactorization` — LlamaGen/IAR: one id, one table ``tok_embeddings``.
* :class:`BitSplitFactorization` — Open-MAGVIT2: an LSB-first LFQ id split into
  bit groups, [6, 12] by default (pre = id & 63, post = id >> 6); the input
  embedding is ``pre_emb[pre] + post_emb[post]``.
* :class:`SemanticDetailFactorization` — IAR2: the (s, d) pair as is; the input
  embedding is ``aggregation_layer([E_s[s]; E_d[d]])``.

The embedder's parameter names are upstream's, so the checkpoint maps only
prefix them (docs/checkpoints.md#llamagen-and-iar-gpt, docs/checkpoints.md#open-magvit2-ar, docs/checkpoints.md#iar2-gpt).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = [
    "IdentityFactorization",
    "BitSplitFactorization",
    "SemanticDetailFactorization",
    "TokenEmbedding",
    "BitSplitEmbedding",
    "SemanticDetailEmbedding",
]


def _check_last_dim(t: torch.Tensor, k: int, what: str) -> None:
    if t.dim() != 3 or t.shape[-1] != k:
        raise ValueError(f"{what} must be (B, L, {k}) int64, got {tuple(t.shape)}")


# ===================================================================== embedders
class TokenEmbedding(nn.Module):
    """One table ``tok_embeddings`` (LlamaGen docs/llamagen.md#linear-head): sub_tokens (B, T, 1) -> (B, T, D)."""

    def __init__(self, *, vocab_size: int, dim: int):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab_size, dim)

    def forward(self, sub_tokens: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(sub_tokens[..., 0])  # (B, T, D)

    def sub_embedding(self, k: int) -> nn.Embedding:
        if k != 0:
            raise IndexError(f"the identity embedder has one sub-token, not {k + 1}")
        return self.tok_embeddings


class BitSplitEmbedding(nn.Module):
    """Open-MAGVIT2 docs/open_magvit2.md#next-sub-token-head: e_t = ``pre_emb``[pre_t] + ``post_emb``[post_t]."""

    def __init__(self, *, vocab_sizes: tuple[int, int], dim: int):
        super().__init__()
        self.pre_emb = nn.Embedding(vocab_sizes[0], dim)  #: 64 × D; shared with the intra transformer
        self.post_emb = nn.Embedding(vocab_sizes[1], dim)  #: 4096 × D

    def forward(self, sub_tokens: torch.Tensor) -> torch.Tensor:
        return self.pre_emb(sub_tokens[..., 0]) + self.post_emb(sub_tokens[..., 1])  # (B, T, D)

    def sub_embedding(self, k: int) -> nn.Embedding:
        return (self.pre_emb, self.post_emb)[k]


class SemanticDetailEmbedding(nn.Module):
    """IAR2 docs/iar2.md#input-aggregation-and-local-context-head: e_t = Agg([E_s[s_t]; E_d[d_t]]), Agg = Linear(2D→4D) → GELU(erf) → Linear(4D→D)."""

    def __init__(self, *, vocab_sizes: tuple[int, int], dim: int):
        super().__init__()
        self.tok_embeddings1 = nn.Embedding(vocab_sizes[0], dim)  #: E_s, 256 × D; shared with head slot 2
        self.tok_embeddings2 = nn.Embedding(vocab_sizes[1], dim)  #: E_d, 4096 × D
        self.aggregation_layer = nn.Sequential(
            nn.Linear(2 * dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, sub_tokens: torch.Tensor) -> torch.Tensor:
        pair = torch.cat([self.tok_embeddings1(sub_tokens[..., 0]),
                          self.tok_embeddings2(sub_tokens[..., 1])], dim=-1)  # (B, T, 2D)
        return self.aggregation_layer(pair)  # (B, T, D)

    def sub_embedding(self, k: int) -> nn.Embedding:
        return (self.tok_embeddings1, self.tok_embeddings2)[k]


# =============================================================== factorizations
class IdentityFactorization:
    """LlamaGen/IAR: one id per position, S = K = 1 (docs/llamagen.md#linear-head, docs/llamagen.md#losses)."""

    subtoken_names = ("token",)

    def __init__(self, *, codebook_size: int = 16384):
        """codebook_size: the tokenizer's vocabulary (docs/llamagen.md#model-sizes: 16384 for LlamaGen VQ-16)."""
        self.codebook_sizes = (codebook_size,)
        self.vocab_sizes = (codebook_size,)

    def split(self, ids: torch.Tensor) -> torch.Tensor:
        _check_last_dim(ids, 1, "ids")
        return ids

    def merge(self, sub: torch.Tensor) -> torch.Tensor:
        _check_last_dim(sub, 1, "sub-tokens")
        return sub

    def build_embedder(self, *, dim: int) -> TokenEmbedding:
        return TokenEmbedding(vocab_size=self.vocab_sizes[0], dim=dim)

    def __repr__(self) -> str:
        return f"IdentityFactorization(codebook_size={self.codebook_sizes[0]})"


class BitSplitFactorization:
    """Open-MAGVIT2 asymmetric factorization of LSB-first LFQ ids (docs/open_magvit2.md#lfq-and-token-ids, docs/open_magvit2.md#next-sub-token-head).

    With bits [b_0, b_1] the id's low b_0 bits are sub-token 0 and the next b_1
    bits sub-token 1: pre = id & (2^b_0 − 1), post = id >> b_0, id = pre + 2^b_0·post.
    """

    subtoken_names = ("pre", "post")

    def __init__(self, *, bits: Sequence[int] = (6, 12)):
        """bits: bit groups, low first (docs/open_magvit2.md#model-sizes ``factorized_bits`` [6, 12]; the AR heads have two sub-tokens)."""
        bits = tuple(int(b) for b in bits)
        if len(bits) != 2 or min(bits) < 1:
            raise ValueError(f"bits must be two positive group sizes such as (6, 12), got {bits}")
        self.bits = bits
        self.codebook_sizes = (1 << sum(bits),)
        self.vocab_sizes = (1 << bits[0], 1 << bits[1])

    def split(self, ids: torch.Tensor) -> torch.Tensor:
        _check_last_dim(ids, 1, "ids")
        pre = ids & (self.vocab_sizes[0] - 1)  # (B, L, 1): channels 0 … b_0-1
        post = ids >> self.bits[0]  # (B, L, 1): the remaining channels
        return torch.cat([pre, post], dim=-1)  # (B, L, 2)

    def merge(self, sub: torch.Tensor) -> torch.Tensor:
        _check_last_dim(sub, 2, "sub-tokens")
        return (sub[..., :1] + (sub[..., 1:] << self.bits[0]))  # (B, L, 1)

    def build_embedder(self, *, dim: int) -> BitSplitEmbedding:
        return BitSplitEmbedding(vocab_sizes=self.vocab_sizes, dim=dim)

    def __repr__(self) -> str:
        return f"BitSplitFactorization(bits={list(self.bits)})"


class SemanticDetailFactorization:
    """IAR2 (s, d) pairs, S = K = 2; p(s, d) = p(s)·p(d | s) (docs/iar2.md#input-aggregation-and-local-context-head, docs/iar2.md#losses)."""

    subtoken_names = ("sem", "det")

    def __init__(self, *, semantic_size: int = 256, detail_size: int = 4096):
        """semantic_size / detail_size: the two codebooks (docs/iar2.md#model-sizes: 256 and 4096)."""
        self.codebook_sizes = (semantic_size, detail_size)
        self.vocab_sizes = (semantic_size, detail_size)

    def split(self, ids: torch.Tensor) -> torch.Tensor:
        _check_last_dim(ids, 2, "ids")
        return ids

    def merge(self, sub: torch.Tensor) -> torch.Tensor:
        _check_last_dim(sub, 2, "sub-tokens")
        return sub

    def build_embedder(self, *, dim: int) -> SemanticDetailEmbedding:
        return SemanticDetailEmbedding(vocab_sizes=self.vocab_sizes, dim=dim)

    def __repr__(self) -> str:
        return f"SemanticDetailFactorization(semantic_size={self.vocab_sizes[0]}, detail_size={self.vocab_sizes[1]})"
