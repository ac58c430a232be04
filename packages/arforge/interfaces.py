"""The contracts between interchangeable components.

Token convention used everywhere in arforge:

* A tokenizer maps images (B, 3, H, W) in [-1, 1] to a grid of h x w positions,
  flattened row-major to L = h*w, each position holding ``S`` integer *id
  components*: ids have shape (B, L, S), dtype int64.

  - VQ (LlamaGen) and LFQ (Open-MAGVIT2): S = 1 (one id per position; for LFQ
    the id is the LSB-first 18-bit integer).
  - Semantic-detail (IAR2): S = 2, the pair (s, d). No fused id exists.

  ``codebook_sizes`` lists the vocabulary of each component, e.g. (16384,),
  (262144,) or (256, 4096).

* A factorization maps tokenizer ids (B, L, S) to the AR model's sub-tokens
  (B, L, K) with ``vocab_sizes`` of length K, and back. Identity: K = S.
  Open-MAGVIT2's bit split: S = 1 -> K = 2 (pre, post) with id = pre + 64*post.

These are ``typing.Protocol`` classes: a plugin needs the attributes and
methods, not a base class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, runtime_checkable

import torch


# ------------------------------------------------------------------ quantizer
class QuantizerOutput(NamedTuple):
    """What a quantizer's forward returns."""

    z_q: torch.Tensor  #: straight-through quantised features, same shape as the input
    ids: torch.Tensor  #: (B, h*w, S) int64
    losses: dict[str, torch.Tensor]  #: named, already weighted terms; their sum is the quantizer loss
    stats: dict[str, torch.Tensor]  #: unweighted diagnostics (entropies, usage), detached


@runtime_checkable
class Quantizer(Protocol):
    codebook_sizes: tuple[int, ...]
    dim: int  #: channels of the features it quantises

    def forward(self, z: torch.Tensor) -> QuantizerOutput: ...
    def encode(self, z: torch.Tensor) -> torch.Tensor: ...  # (B, C, h, w) -> (B, h*w, S)
    def decode(self, ids: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor: ...  # -> (B, C, h, w)


# ------------------------------------------------------------------ tokenizer
class TokenizerOutput(NamedTuple):
    reconstruction: torch.Tensor  #: (B, 3, H, W), not clamped
    ids: torch.Tensor  #: (B, L, S)
    losses: dict[str, torch.Tensor]  #: the quantizer's weighted losses
    stats: dict[str, torch.Tensor]


@runtime_checkable
class Tokenizer(Protocol):
    codebook_sizes: tuple[int, ...]
    downsample: int  #: image pixels per token along each axis (8 or 16)

    def forward(self, images: torch.Tensor) -> TokenizerOutput: ...
    def encode(self, images: torch.Tensor) -> torch.Tensor: ...  # (B, 3, H, W) -> (B, L, S)
    def decode(self, ids: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor: ...  # -> (B, 3, H, W)


# -------------------------------------------------------------- factorization
@runtime_checkable
class Factorization(Protocol):
    codebook_sizes: tuple[int, ...]  #: what it accepts from the tokenizer (S components)
    vocab_sizes: tuple[int, ...]  #: sub-vocabularies it produces (K sub-tokens)

    def split(self, ids: torch.Tensor) -> torch.Tensor: ...  # (B, L, S) -> (B, L, K)
    def merge(self, sub: torch.Tensor) -> torch.Tensor: ...  # (B, L, K) -> (B, L, S)


# ------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class SubTokenSampling:
    """Per-sub-token sampling settings (docs/llamagen.md#logit-processing)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False

    def __post_init__(self) -> None:
        if not self.greedy and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (got {self.temperature}); "
                             "request greedy decoding explicitly with greedy=True")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (got {self.top_k})")


@dataclass
class LossBreakdown:
    """A total loss with its named parts (for logging)."""

    total: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)

    def detached(self) -> dict[str, float]:
        out = {"loss": float(self.total.detach())}
        out.update({k: float(v.detach()) for k, v in self.parts.items()})
        return out


def as_grid(n: int) -> tuple[int, int]:
    """The square grid of ``n`` tokens; errors if ``n`` is not a square."""
    g = int(round(n ** 0.5))
    if g * g != n:
        raise ValueError(f"{n} tokens do not form a square grid")
    return g, g

