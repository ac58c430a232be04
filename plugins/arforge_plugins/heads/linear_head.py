"""LlamaGen/IAR single linear head: final RMSNorm ``norm`` then ``output`` (docs/llamagen.md#linear-head).

One sub-token (K = 1). ``output`` is Linear(D → V, no bias), zero-initialised
(docs/llamagen.md#llama-backbone); logits are fp32. No cache: a position is one matmul.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from arforge.device import at_least_fp32
from arforge.nn.llama import RMSNorm

__all__ = ["LinearHead"]


class LinearHead(nn.Module):
    """``norm`` → ``output``: h (B, L, D) -> [(B, L, V)] fp32 (LlamaGen docs/llamagen.md#linear-head)."""

    tied_subtoken = None

    def __init__(self, *, dim: int, vocab_size: int = 16384, norm_eps: float = 1e-5):
        """
        Args:
            dim: the backbone width D.
            vocab_size: V (docs/llamagen.md#model-sizes: 16384).
            norm_eps: RMSNorm ε (docs/llamagen.md#llama-backbone: 1e-5).
        """
        super().__init__()
        self.dim = dim
        self.vocab_sizes = (vocab_size,)
        self.norm = RMSNorm(dim=dim, eps=norm_eps)
        self.output = nn.Linear(dim, vocab_size, bias=False)

    def zero_init_outputs(self) -> None:
        nn.init.zeros_(self.output.weight)

    def tie_embedding(self, embedding: nn.Embedding) -> None:  # pragma: no cover - nothing to tie
        raise TypeError("the linear head shares no embedding (docs/llamagen.md#llama-backbone: no weight tying)")

    def forward(self, h: torch.Tensor, sub_tokens: torch.Tensor | None = None) -> list[torch.Tensor]:
        return [at_least_fp32(self.output(self.norm(h)))]  # [(B, L, V)]

    # -------------------------------------------------------------- decoding
    def setup_cache(self, *, batch: int, dtype: torch.dtype, device: torch.device | str) -> bool:
        return False

    def cache_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def decode_position(self, h: torch.Tensor, n: int,
                        choose: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """h (Bc, 1, D) -> chosen tokens (Bc, 1)."""
        logits = at_least_fp32(self.output(self.norm(h[:, 0])))  # (Bc, V)
        return choose(0, logits)[:, None]  # (Bc, 1)
