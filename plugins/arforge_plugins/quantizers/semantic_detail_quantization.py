"""IAR2's semantic-detail two-level quantizer.

Paper: "IAR2: Improving Autoregressive Visual Generation with Semantic-Detail
Associated Token Prediction" (arXiv 2510.06928). Upstream: IAR2
``tokenizer/tokenizer_image/vq_model_second_stage.py`` (stage 2) and
``vq_model.py`` (stage 1). See docs/iar2.md#stage-1, docs/iar2.md#stage-2, docs/iar2.md#stage-2-training-schedule,
docs/checkpoints.md (IAR2 key layout), docs/evaluation.md#codebook-usage (usage).

Per position (docs/iar2.md#stage-2):

1. ẑ = z/‖z‖; the semantic id s = argmin_k ‖ẑ - ê1_k‖² over the row-normalised
   E1 (256 x 8, parameter ``embedding.weight``), q1 = ê1_s;
2. the residual r = ẑ - q1 is *not* re-normalised; the detail id
   d = argmin_j ‖r - E2_j‖² over the raw E2 (4096 x 8, bare parameter
   ``embedding_second``, l2-normalised once at construction, then used raw);
3. z_q = q1 + E2_d, straight-through ẑ + sg(z_q - ẑ).

A token is the pair (s, d): ids (B, h*w, 2). No fused id exists.

Stage 1 (docs/iar2.md#stage-1) is the same module with ``detail_codebook=False``: only E1,
ids (B, h*w, 1), exactly LlamaGen's VQ with 256 codes. Stage 2 starts from a
stage-1 checkpoint in one of two documented ways:

* build ``SemanticDetailQuantizer(detail_codebook=False)``, load the stage-1
  state strictly (``load_state_dict``, key ``embedding.weight``), then call
  :meth:`SemanticDetailQuantizer.add_detail_codebook`; or
* build the stage-2 quantizer and call
  :meth:`SemanticDetailQuantizer.load_stage1_state_dict`, which loads E1
  strictly and keeps the freshly initialised E2 (docs/iar2.md#stage-2-training-schedule: every stage-1 weight
  except ``embedding_second``).
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from arforge.errors import ConfigError
from arforge.interfaces import QuantizerOutput
from arforge_plugins.quantizers.vector_quantization import nearest_codes, vq_losses


def _uniform_normalised(rows: int, dim: int, *, device=None, dtype=None) -> torch.Tensor:
    """U(-1/rows, 1/rows), then rows l2-normalised (docs/iar2.md#stage-1, docs/iar2.md#stage-2)."""
    w = torch.empty(rows, dim, device=device, dtype=dtype).uniform_(-1.0 / rows, 1.0 / rows)
    return F.normalize(w, p=2, dim=-1)


class SemanticDetailQuantizer(nn.Module):
    """IAR2 semantic (E1, normalised) + detail (E2, raw) residual VQ (docs/iar2.md#stage-2).

    Training losses (absent in eval mode), already weighted, on the summed z_q
    (on q1 alone in the ``semantic_only`` pass):

    * ``vq`` = mean((z_q - sg(ẑ))²);
    * ``commitment`` = beta * mean((sg(z_q) - ẑ)²).

    The two upstream entropy terms are multiplied by 0 and are not offered.
    Usage diagnostics (docs/evaluation.md#codebook-usage) are kept outside the module state since
    :meth:`reset_usage`: stats ``usage_semantic`` (#distinct s / 256),
    ``usage_detail`` (#distinct d / 4096) and ``usage_pairs`` (#distinct (s, d) / 2^20).
    """

    def __init__(
        self,
        *,
        semantic_codebook_size: int = 256,  # rows of E1, the semantic codebook (docs/iar2.md#stage-1)
        detail_codebook_size: int = 4096,  # rows of E2, the shared detail codebook (docs/iar2.md#stage-2)
        dim: int = 8,  # code dimension = quant_conv output channels (docs/iar2.md#tokenizer)
        beta: float = 0.25,  # commitment weight (docs/iar2.md#stage-1, docs/iar2.md#stage-2)
        detail_codebook: bool = True,  # False = the stage-1 quantizer: E1 only, ids (s,) (docs/iar2.md#stage-1)
    ) -> None:
        super().__init__()
        if semantic_codebook_size < 1 or detail_codebook_size < 1 or dim < 1:
            raise ConfigError("SemanticDetailQuantizer: semantic_codebook_size, detail_codebook_size and dim "
                              f"must be >= 1, got {semantic_codebook_size}, {detail_codebook_size}, {dim}")
        self.semantic_codebook_size = int(semantic_codebook_size)
        self.detail_codebook_size = int(detail_codebook_size)
        self.dim = int(dim)
        self.beta = float(beta)
        self.embedding = nn.Embedding(self.semantic_codebook_size, self.dim)
        with torch.no_grad():
            self.embedding.weight.copy_(_uniform_normalised(self.semantic_codebook_size, self.dim))
        self.embedding_second: nn.Parameter | None
        self.register_parameter("embedding_second", None)
        self.codebook_sizes: tuple[int, ...] = (self.semantic_codebook_size,)
        if detail_codebook:
            self.add_detail_codebook()
        self.reset_usage()

    def extra_repr(self) -> str:
        return (f"semantic={self.semantic_codebook_size}, detail="
                f"{self.detail_codebook_size if self.has_detail_codebook else None}, dim={self.dim}")

    # --------------------------------------------------------------- stages
    @property
    def has_detail_codebook(self) -> bool:
        return self.embedding_second is not None

    def add_detail_codebook(self) -> None:
        """Turn a stage-1 quantizer into the stage-2 one: create E2, U(±1/4096) then normalised (docs/iar2.md#stage-2).

        E1 is kept as is; ids become pairs (s, d). Uses the global torch RNG.
        """
        if self.has_detail_codebook:
            raise ConfigError("SemanticDetailQuantizer already has its detail codebook (embedding_second)")
        w = self.embedding.weight
        self.embedding_second = nn.Parameter(
            _uniform_normalised(self.detail_codebook_size, self.dim, device=w.device, dtype=w.dtype))
        self.codebook_sizes = (self.semantic_codebook_size, self.detail_codebook_size)
        self.reset_usage()

    def load_stage1_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load a stage-1 quantizer state (exactly ``{'embedding.weight'}``) strictly; E2 is untouched (docs/iar2.md#stage-2-training-schedule)."""
        keys = set(state_dict)
        if keys != {"embedding.weight"}:
            raise ConfigError("a stage-1 semantic quantizer state must hold exactly 'embedding.weight' "
                              f"(strip the 'quantize.' prefix and drop 'codebook_used'); got {sorted(keys)}")
        src = state_dict["embedding.weight"]
        if tuple(src.shape) != tuple(self.embedding.weight.shape):
            raise ConfigError(f"stage-1 'embedding.weight' has shape {tuple(src.shape)}, expected "
                              f"{tuple(self.embedding.weight.shape)} (semantic_codebook_size x dim)")
        with torch.no_grad():
            self.embedding.weight.copy_(src)

    # ------------------------------------------------------------------ usage
    def reset_usage(self) -> None:
        """Start a new usage window; the histograms are not part of the module state."""
        self._seen_s: torch.Tensor | None = None
        self._seen_d: torch.Tensor | None = None
        self._seen_pairs: torch.Tensor | None = None

    def _track(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        s = ids[..., 0].reshape(-1)
        dev = s.device

        def mark(seen: torch.Tensor | None, flat: torch.Tensor, size: int) -> torch.Tensor:
            if seen is None or seen.device != dev:
                seen = torch.zeros(size, dtype=torch.bool, device=dev)
            seen[flat] = True
            return seen

        self._seen_s = mark(self._seen_s, s, self.semantic_codebook_size)
        out = {"usage_semantic": self._seen_s.sum().float() / self.semantic_codebook_size}
        if ids.shape[-1] == 2:
            d = ids[..., 1].reshape(-1)
            pairs = self.semantic_codebook_size * self.detail_codebook_size
            self._seen_d = mark(self._seen_d, d, self.detail_codebook_size)
            self._seen_pairs = mark(self._seen_pairs, s * self.detail_codebook_size + d, pairs)
            out["usage_detail"] = self._seen_d.sum().float() / self.detail_codebook_size
            out["usage_pairs"] = self._seen_pairs.sum().float() / pairs
        return out

    # ------------------------------------------------------------------ codes
    def normalized_semantic_codebook(self) -> torch.Tensor:
        """Ê1 (256, D); E2 is never normalised at use."""
        return F.normalize(self.embedding.weight, p=2, dim=-1)

    def _lookup(self, z_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """ẑ (N, D) -> (s, q1, d, E2_d); d and E2_d are None without the detail codebook."""
        e1 = self.normalized_semantic_codebook()
        s = nearest_codes(z_hat.detach(), e1.detach())  # (N,)
        q1 = F.embedding(s, e1).to(z_hat.dtype)  # (N, D)
        if not self.has_detail_codebook:
            return s, q1, None, None
        residual = z_hat.detach() - q1.detach()  # not re-normalised (docs/iar2.md#stage-2)
        d = nearest_codes(residual, self.embedding_second.detach())  # raw E2 (docs/iar2.md#stage-2)
        return s, q1, d, F.embedding(d, self.embedding_second).to(z_hat.dtype)

    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (..., S) -> per-level codes (..., S, D): [ê1_s, E2_d]; decode sums them."""
        self._check_ids(ids)
        levels = [F.embedding(ids[..., 0], self.normalized_semantic_codebook())]
        if ids.shape[-1] == 2:
            levels.append(F.embedding(ids[..., 1], self.embedding_second))
        return torch.stack(levels, dim=-2)

    def codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """Per-level codes (..., S, D) -> ids (..., S): s from the normalised level-0 code, d from the raw level 1."""
        s_level = codes.shape[-2]
        if s_level != len(self.codebook_sizes):
            raise ValueError(f"expected {len(self.codebook_sizes)} code levels, got {s_level}")
        lead = codes.shape[:-2]
        sem = F.normalize(codes[..., 0, :].reshape(-1, self.dim), p=2, dim=-1)
        ids = [nearest_codes(sem, self.normalized_semantic_codebook())]
        if s_level == 2:
            ids.append(nearest_codes(codes[..., 1, :].reshape(-1, self.dim), self.embedding_second))
        return torch.stack(ids, dim=-1).reshape(*lead, s_level)

    def _check_ids(self, ids: torch.Tensor, *, allow_semantic: bool = False) -> None:
        s_expected = len(self.codebook_sizes)
        if ids.dtype.is_floating_point or not (ids.shape[-1] == s_expected or (allow_semantic and ids.shape[-1] == 1)):
            raise ValueError(f"SemanticDetailQuantizer ids must be integers with {s_expected} component(s) "
                             f"in the last axis, got {ids.dtype} {tuple(ids.shape)}")
        for i in range(ids.shape[-1]):
            part, size = ids[..., i], self.codebook_sizes[i]
            if part.numel() and (int(part.min()) < 0 or int(part.max()) >= size):
                raise ValueError(f"id component {i} must lie in [0, {size}), got "
                                 f"[{int(part.min())}, {int(part.max())}]")

    def _check_features(self, z: torch.Tensor) -> None:
        if z.ndim != 4 or z.shape[1] != self.dim:
            raise ValueError(f"SemanticDetailQuantizer expects features (B, {self.dim}, h, w), got {tuple(z.shape)}")

    # --------------------------------------------------------------- interface
    def forward(self, z: torch.Tensor, *, semantic_only: bool = False) -> QuantizerOutput:
        """Quantise features (B, D, h, w).

        ``semantic_only=True`` is the stage-2 "first" pass (docs/iar2.md#stage-2): the output (and the
        codebook losses) use q1 only; ids are still the full tokens.
        """
        self._check_features(z)
        b, dim, h, w = z.shape
        z_hat = F.normalize(z.permute(0, 2, 3, 1).reshape(b * h * w, dim), p=2, dim=-1)  # (N, D)
        s, q1, d, e2_d = self._lookup(z_hat)
        z_q = q1 if (semantic_only or e2_d is None) else q1 + e2_d  # (N, D)
        ids = torch.stack([s] if d is None else [s, d], dim=-1).reshape(b, h * w, -1)  # (B, L, S)
        stats = self._track(ids)
        losses: dict[str, torch.Tensor] = {}
        if self.training:
            vq_losses(z_q, z_hat, beta=self.beta, losses=losses, stats=stats)
        z_st = z_hat + (z_q - z_hat).detach()  # straight-through on the normalised ẑ
        z_st = z_st.reshape(b, h, w, dim).permute(0, 3, 1, 2)  # (B, D, h, w)
        return QuantizerOutput(z_q=z_st, ids=ids, losses=losses, stats=stats)

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """Features (B, D, h, w) -> ids (B, h*w, S), S = 2 with the detail codebook, else 1."""
        self._check_features(z)
        b, dim, h, w = z.shape
        z_hat = F.normalize(z.permute(0, 2, 3, 1).reshape(b * h * w, dim), p=2, dim=-1)  # (N, D)
        s, _, d, _ = self._lookup(z_hat)
        ids = torch.stack([s] if d is None else [s, d], dim=-1).reshape(b, h * w, -1)  # (B, L, S)
        self._track(ids)
        return ids

    def decode(self, ids: torch.Tensor, grid: tuple[int, int], *, semantic_only: bool = False) -> torch.Tensor:
        """ids (B, h*w, S) -> features (B, D, h, w): ê1_s + E2_d (``get_codebook_entry``, docs/iar2.md#stage-2).

        ``semantic_only=True`` decodes ê1_s alone (and accepts ids (B, h*w, 1)).
        Note: encode(decode(ids)) is not the identity for pairs, because encode
        re-normalises ê1_s + E2_d; round trips hold for s alone and for
        :meth:`ids_to_codes` / :meth:`codes_to_ids`.
        """
        h, w = grid
        if ids.ndim != 3 or ids.shape[1] != h * w:
            raise ValueError(f"ids must have shape (B, {h * w}, S) for grid {grid}, got {tuple(ids.shape)}")
        self._check_ids(ids, allow_semantic=semantic_only)
        if semantic_only:
            ids = ids[..., :1]
        feats = F.embedding(ids[..., 0], self.normalized_semantic_codebook())  # (B, L, D)
        if ids.shape[-1] == 2:
            feats = feats + F.embedding(ids[..., 1], self.embedding_second)
        return feats.reshape(ids.shape[0], h, w, self.dim).permute(0, 3, 1, 2).contiguous()
