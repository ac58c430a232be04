"""Open-MAGVIT2 lookup-free quantization (LFQ) with exact, memory-safe entropy terms.

Papers: "Language Model Beats Diffusion -- Tokenizer is Key to Visual Generation"
(LFQ) and "Open-MAGVIT2" (arXiv 2409.04410). Upstream: Open-MAGVIT2 v2
``src/Open_MAGVIT2/modules/vqvae/lookup_free_quantize.py``. Spec:
docs/open_magvit2.md#lfq-and-token-ids, docs/open_magvit2.md#lfq-entropy-losses,
docs/open_magvit2.md#computing-the-entropy-exactly and docs/open_magvit2.md#differences-from-upstream.

LFQ has no parameters and no buffers. Each of the K channels of a token is one
bit, ``b_d = [z_d > 0]`` (strict: 0 maps to -1), the code is ``q = 2b - 1`` and
the id is LSB-first, ``id = sum_d b_d 2^d`` (Open-MAGVIT2 v2; v1 and
vector-quantize-pytorch are MSB-first, an explicit option here).

The training objective needs the softmax of ``2<z_n, c_j>/tau`` over all 2^K
codes. Upstream materialises three N x 2^18 tensors under fp16; here the same
values are computed exactly, in fp32 whatever autocast is active (docs/open_magvit2.md#computing-the-entropy-exactly):

* H_sample in closed form: the softmax is a product of K independent
  Bernoullis with ``P(b_d = 1) = sigmoid(4 z_d / tau)``;
* H_codebook from ``p_bar = (P^A)^T P^B / N`` over a split of the bits into a
  low group A (``a`` bits) and a high group B, never an N x 2^K tensor
  (:func:`codebook_prob_sum_bit_split`), or alternatively chunked over codes
  (:func:`codebook_prob_sum_chunked`). Both are exact and differentiable.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from arforge.device import at_least_fp32, full_precision
from arforge.errors import ConfigError
from arforge.interfaces import QuantizerOutput

#: The ``+1e-5`` inside ``log(p_bar + 1e-5)`` of H_codebook changes the value, so it is
#: kept (docs/open_magvit2.md#differences-from-upstream); the one upstream adds inside log_softmax is not.
CODEBOOK_ENTROPY_EPS = 1e-5
#: Open-MAGVIT2's asymmetric token factorisation: channels 0-5 -> pre, 6-17 -> post (docs/open_magvit2.md#lfq-and-token-ids).
FACTORIZED_BITS = (6, 12)

ENTROPY_SCOPES = ("global", "local")
ENTROPY_METHODS = ("bit_split", "chunked")
BIT_ORDERS = ("lsb", "msb")


# ===================================================================== bits <-> ids
def _bit_weights(bits: int, msb_first: bool, device: torch.device | None) -> torch.Tensor:
    w = torch.arange(bits, device=device, dtype=torch.int64)
    if msb_first:
        w = w.flip(0)
    return torch.ones((), dtype=torch.int64, device=device) << w  # (bits,) = 2^d or 2^(K-1-d)


def ids_to_bits(ids: torch.Tensor, bits: int, *, msb_first: bool = False) -> torch.Tensor:
    """Integer ids (...) -> bool bits (..., bits); channel d is bit 2^d (LSB-first, docs/open_magvit2.md#lfq-and-token-ids)."""
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"ids must be an integer tensor, got {ids.dtype}")
    ids = ids.to(torch.int64)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= 1 << bits):
        raise ValueError(f"ids must lie in [0, 2^{bits}) = [0, {1 << bits}); got range "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    return _to_bits(ids, bits, msb_first)


def _to_bits(ids: torch.Tensor, bits: int, msb_first: bool = False) -> torch.Tensor:
    return (ids.unsqueeze(-1) & _bit_weights(bits, msb_first, ids.device)) != 0  # (..., bits)


def bits_to_ids(bits: torch.Tensor, *, msb_first: bool = False) -> torch.Tensor:
    """Bits (..., K) (bool, or anything where ``> 0`` means 1) -> int64 ids (...)."""
    b = bits if bits.dtype == torch.bool else bits > 0
    w = _bit_weights(b.shape[-1], msb_first, b.device)
    return (b.to(torch.int64) * w).sum(-1)


def codes_to_bits(codes: torch.Tensor) -> torch.Tensor:
    """+-1 codes (or features) -> bits with the strict threshold ``> 0`` (docs/open_magvit2.md#lfq-and-token-ids)."""
    return codes > 0


def reverse_bit_order(ids: torch.Tensor, bits: int) -> torch.Tensor:
    """Convert ids between LSB-first and MSB-first numbering (v1 / vector-quantize-pytorch)."""
    return bits_to_ids(ids_to_bits(ids, bits).flip(-1))


def split_ids(ids: torch.Tensor, groups: Sequence[int] = FACTORIZED_BITS) -> torch.Tensor:
    """LSB-first ids (...) -> sub-ids (..., len(groups)), group g from the next ``groups[g]`` channels.

    For Open-MAGVIT2's ``factorized_bits=[6, 12]``: pre = channels 0-5 and post =
    channels 6-17, each LSB-first, so ``id = pre + 64 * post`` (docs/open_magvit2.md#lfq-and-token-ids).
    """
    out, shift = [], 0
    ids = ids.to(torch.int64)
    for g in groups:
        out.append((ids >> shift) & ((1 << g) - 1))
        shift += g
    if ids.numel() and int(ids.max()) >= 1 << shift:
        raise ValueError(f"ids exceed the {shift} bits covered by groups {tuple(groups)}")
    return torch.stack(out, dim=-1)


def merge_ids(sub_ids: torch.Tensor, groups: Sequence[int] = FACTORIZED_BITS) -> torch.Tensor:
    """Inverse of :func:`split_ids`: sub-ids (..., G) -> ids (...) with ``id = pre + 2^6 * post``."""
    if sub_ids.shape[-1] != len(groups):
        raise ValueError(f"expected {len(groups)} sub-ids in the last axis, got {sub_ids.shape[-1]}")
    ids = torch.zeros(sub_ids.shape[:-1], dtype=torch.int64, device=sub_ids.device)
    shift = 0
    for i, g in enumerate(groups):
        s = sub_ids[..., i].to(torch.int64)
        if s.numel() and (int(s.min()) < 0 or int(s.max()) >= 1 << g):
            raise ValueError(f"sub-id {i} must lie in [0, {1 << g})")
        ids = ids | (s << shift)
        shift += g
    return ids


def sub_codes(bits: int, *, device: torch.device | None = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """All 2^bits codes in {-1, +1}^bits, row j = code of LSB-first id j: (2^bits, bits)."""
    j = torch.arange(1 << bits, device=device)
    return _to_bits(j, bits).to(dtype) * 2 - 1


# ============================================================== exact entropy terms


def binary_entropy_of_logit(x: torch.Tensor) -> torch.Tensor:
    """h(x) = H(Bernoulli(sigmoid(x))) = s(x) softplus(-x) + s(-x) softplus(x), stable for any x."""
    return torch.sigmoid(x) * F.softplus(-x) + torch.sigmoid(-x) * F.softplus(x)


def sample_entropy(z: torch.Tensor, *, tau: float) -> torch.Tensor:
    """Closed-form mean per-token entropy of softmax_j(2<z_n, c_j>/tau), z: (N, K) (docs/open_magvit2.md#computing-the-entropy-exactly)."""
    return binary_entropy_of_logit(4.0 * z / tau).sum(-1).mean()


def _log_bit_probs(z: torch.Tensor, tau: float) -> torch.Tensor:
    """(N, 2K): [log P(b_d = 1 | z_n), log P(b_d = 0 | z_n)] = [logsigmoid(s), logsigmoid(-s)], s = 4z/tau."""
    s = (4.0 / tau) * z
    return torch.cat([F.logsigmoid(s), F.logsigmoid(-s)], dim=-1)


def _bit_selectors(ids: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """(|J|, 2K): [b_j, 1 - b_j], so that log p_nj = log_bit_probs_n . selector_j."""
    b = _to_bits(ids, bits).to(dtype)
    return torch.cat([b, 1 - b], dim=-1)


def _group_probs(z: torch.Tensor, tau: float) -> torch.Tensor:
    """Softmax of (2/tau)<z_n, c_j> over the 2^g codes of a group of g channels: (N, 2^g).

    Computed as exp(sum_d log sigmoid(c_jd * 4 z_nd / tau)), the same function as the
    softmax (docs/open_magvit2.md#computing-the-entropy-exactly) but a sum of non-positive terms, so no large logits cancel in fp32.
    """
    g = z.shape[-1]
    sel = _bit_selectors(torch.arange(1 << g, device=z.device), g, z.dtype)  # (2^g, 2g)
    return (_log_bit_probs(z, tau) @ sel.T).exp()


def codebook_prob_sum_bit_split(z: torch.Tensor, *, tau: float, split: int) -> torch.Tensor:
    """sum_n p_nj for every code j (LSB-first id order) via (P^A)^T P^B (docs/open_magvit2.md#computing-the-entropy-exactly).

    z: (N, K). Group A is channels [0, split), group B channels [split, K); the
    result is (2^K,) but no tensor larger than N x 2^max(split, K - split) exists.
    """
    k = z.shape[-1]
    if not 0 <= split <= k:
        raise ValueError(f"split must lie in [0, {k}], got {split}")
    pa = _group_probs(z[:, :split], tau)  # (N, 2^a)
    pb = _group_probs(z[:, split:], tau)  # (N, 2^(K-a))
    joint = pa.T @ pb  # (2^a, 2^(K-a)); entry [jA, jB] belongs to id jA + 2^a jB
    return joint.T.reshape(-1)  # (2^K,) in id order: index jB * 2^a + jA


def _chunk_prob_sum(log_bit_probs: torch.Tensor, selectors: torch.Tensor) -> torch.Tensor:
    return (log_bit_probs @ selectors.T).exp().sum(0)  # (N, |J|) -> (|J|,)


def codebook_prob_sum_chunked(z: torch.Tensor, *, tau: float, chunk_size: int = 4096) -> torch.Tensor:
    """sum_n p_nj for every code j, chunk by chunk over the codes (docs/open_magvit2.md#computing-the-entropy-exactly).

    ``log p_nj = sum_d log sigmoid(c_jd 4 z_nd / tau)``, which equals
    ``(2/tau)<z_n, c_j> - sum_d log(2 cosh(2 z_nd / tau))``: no normaliser over all
    codes is needed (the log-sigmoid sum avoids the fp32 cancellation of the
    difference form). With autograd on, each chunk is recomputed in the backward
    pass (activation checkpointing), so memory stays O(N * chunk_size).
    """
    k = z.shape[-1]
    log_bit_probs = _log_bit_probs(z, tau)  # (N, 2K)
    track = torch.is_grad_enabled() and log_bit_probs.requires_grad
    out = []
    for start in range(0, 1 << k, chunk_size):
        ids = torch.arange(start, min(start + chunk_size, 1 << k), device=z.device)
        sel = _bit_selectors(ids, k, z.dtype)  # (|J|, 2K)
        if track:
            out.append(checkpoint(_chunk_prob_sum, log_bit_probs, sel, use_reentrant=False))
        else:
            out.append(_chunk_prob_sum(log_bit_probs, sel))
    return torch.cat(out)


def _distributed() -> bool:
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over all ranks, differentiable as the sum is.

    Every rank's loss depends on every rank's ``t`` through the sum, so d(sum)/dt_r
    summed over the ranks' identical losses is world_size; DDP/FSDP then average the
    ranks' gradients. The local gradient is therefore scaled by world_size (what an
    all-reduce in backward would give) -- with a gradient of 1, a 2-rank run would
    step the codebook entropy at half the strength of a 1-rank run on the same batch.
    """
    if not _distributed():
        return t
    total = t.detach().clone()
    torch.distributed.all_reduce(total)
    world = torch.distributed.get_world_size()
    return total + (t - t.detach()) * world


def codebook_entropy(prob_sum: torch.Tensor, count: torch.Tensor | float, *,
                     eps: float = CODEBOOK_ENTROPY_EPS) -> torch.Tensor:
    """H_codebook = -sum_j p_bar_j log(p_bar_j + eps) with p_bar = prob_sum / count (docs/open_magvit2.md#lfq-entropy-losses)."""
    p_bar = prob_sum / count
    return -(p_bar * torch.log(p_bar + eps)).sum()


def lfq_entropy(z: torch.Tensor, *, tau: float = 0.01, split: int | None = None,
                method: str = "bit_split", chunk_size: int = 4096, scope: str = "local",
                eps: float = CODEBOOK_ENTROPY_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(H_sample, H_codebook) of LFQ features z: (N, K), exactly, in fp32 (docs/open_magvit2.md#computing-the-entropy-exactly).

    ``scope="global"`` sums p over every rank's tokens (all-reduce, differentiable
    for the local contribution) before dividing by the global token count;
    ``"local"`` is upstream's per-device p_bar (docs/open_magvit2.md#differences-from-upstream).
    H_sample is a per-token mean and always local.
    """
    if method not in ENTROPY_METHODS:
        raise ValueError(f"method must be one of {ENTROPY_METHODS}, got {method!r}")
    if scope not in ENTROPY_SCOPES:
        raise ValueError(f"scope must be one of {ENTROPY_SCOPES}, got {scope!r}")
    if z.ndim != 2:
        raise ValueError(f"expected tokens (N, K), got shape {tuple(z.shape)}")
    k = z.shape[-1]
    with full_precision(z.device.type):
        z = at_least_fp32(z)
        h_sample = sample_entropy(z, tau=tau)
        if method == "bit_split":
            prob_sum = codebook_prob_sum_bit_split(z, tau=tau, split=k // 2 if split is None else split)
        else:
            prob_sum = codebook_prob_sum_chunked(z, tau=tau, chunk_size=chunk_size)
        count = torch.tensor(float(z.shape[0]), device=z.device)
        if scope == "global":
            prob_sum = all_reduce_sum(prob_sum)
            count = all_reduce_sum(count)
        h_codebook = codebook_entropy(prob_sum, count, eps=eps)
    return h_sample, h_codebook


# ========================================================================= module
class LookupFreeQuantizer(nn.Module):
    """Open-MAGVIT2 LFQ (docs/open_magvit2.md#lfq-and-token-ids): K sign bits per token, ids (B, h*w, 1).

    Training losses (0 / absent in eval mode, docs/open_magvit2.md#lfq-entropy-losses), already weighted:

    * ``entropy`` = entropy_weight * (w_s * H_sample - w_b * H_codebook);
    * ``commitment`` = commitment_weight * mean((z - sg(q))^2).

    Stats (detached): ``per_sample_entropy``, ``codebook_entropy``, ``commitment``
    (unweighted) in training, and ``batch_distinct_ids`` always.
    """

    def __init__(
        self,
        *,
        bits: int = 18,  # code bits = channels of z; implicit codebook 2^bits (docs/open_magvit2.md#encoder-and-decoder: z_channels 18)
        bit_order: str = "lsb",  # 'lsb' = v2+ ids (docs/open_magvit2.md#lfq-and-token-ids); 'msb' = v1 / vector-quantize-pytorch numbering
        tau: float = 0.01,  # entropy temperature; upstream hard-codes 0.01 and ignores inv_temperature (docs/open_magvit2.md#lfq-entropy-losses)
        entropy_weight: float = 0.1,  # weight of the aux entropy term in the generator loss (docs/llamagen.md#loss-weights-of-the-three-tokenizers)
        sample_entropy_weight: float = 1.0,  # w_s, upstream `sample_minimization_weight` (docs/open_magvit2.md#lfq-entropy-losses)
        codebook_entropy_weight: float = 1.0,  # w_b, upstream `batch_maximization_weight` (docs/open_magvit2.md#lfq-entropy-losses)
        commitment_weight: float = 0.25,  # weight of mean((z - sg(q))^2) (docs/open_magvit2.md#lfq-entropy-losses)
        entropy_scope: str = "global",  # p_bar over the global batch (all-reduced) or 'local' per device (docs/open_magvit2.md#computing-the-entropy-exactly)
        codebook_entropy_method: str = "bit_split",  # exact H_codebook form: 'bit_split' or 'chunked' (docs/open_magvit2.md#computing-the-entropy-exactly)
        entropy_split: int | None = None,  # bits in the low group A of the bit split; None = bits // 2 (9 at 18)
        entropy_chunk_size: int = 4096,  # codes per chunk of the 'chunked' form (memory O(N * chunk))
    ) -> None:
        super().__init__()
        if not isinstance(bits, int) or not 1 <= bits <= 62:
            raise ConfigError(f"LookupFreeQuantizer: bits must be an integer in [1, 62], got {bits!r}")
        if bit_order not in BIT_ORDERS:
            raise ConfigError(f"LookupFreeQuantizer: bit_order must be one of {BIT_ORDERS}, got {bit_order!r}")
        if not tau > 0:
            raise ConfigError(f"LookupFreeQuantizer: tau must be > 0, got {tau!r}")
        if entropy_scope not in ENTROPY_SCOPES:
            raise ConfigError(f"LookupFreeQuantizer: entropy_scope must be one of {ENTROPY_SCOPES}, "
                              f"got {entropy_scope!r}")
        if codebook_entropy_method not in ENTROPY_METHODS:
            raise ConfigError(f"LookupFreeQuantizer: codebook_entropy_method must be one of "
                              f"{ENTROPY_METHODS}, got {codebook_entropy_method!r}")
        if entropy_split is not None and codebook_entropy_method != "bit_split":
            raise ConfigError("LookupFreeQuantizer: entropy_split applies to codebook_entropy_method='bit_split' "
                              f"only; remove it or switch the method (got {codebook_entropy_method!r})")
        split = bits // 2 if entropy_split is None else entropy_split
        if not 0 <= split <= bits:
            raise ConfigError(f"LookupFreeQuantizer: entropy_split must lie in [0, bits={bits}], got {split}")
        if entropy_chunk_size < 1:
            raise ConfigError(f"LookupFreeQuantizer: entropy_chunk_size must be >= 1, got {entropy_chunk_size}")
        self.bits = bits
        self.dim = bits
        self.codebook_sizes: tuple[int, ...] = (1 << bits,)
        self.bit_order = bit_order
        self.tau = float(tau)
        self.entropy_weight = float(entropy_weight)
        self.sample_entropy_weight = float(sample_entropy_weight)
        self.codebook_entropy_weight = float(codebook_entropy_weight)
        self.commitment_weight = float(commitment_weight)
        self.entropy_scope = entropy_scope
        self.codebook_entropy_method = codebook_entropy_method
        self.entropy_split = split
        self.entropy_chunk_size = int(entropy_chunk_size)

    @property
    def msb_first(self) -> bool:
        return self.bit_order == "msb"

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, bit_order={self.bit_order}, tau={self.tau}, "
                f"entropy_scope={self.entropy_scope}, method={self.codebook_entropy_method}")

    # ------------------------------------------------------------------ checks
    def _check_features(self, z: torch.Tensor) -> None:
        if z.ndim != 4 or z.shape[1] != self.bits:
            raise ValueError(f"LookupFreeQuantizer expects features (B, {self.bits}, h, w), "
                             f"got shape {tuple(z.shape)}")

    def _check_ids(self, ids: torch.Tensor, grid: tuple[int, int]) -> None:
        h, w = grid
        if ids.ndim != 3 or ids.shape[1] != h * w or ids.shape[2] != 1:
            raise ValueError(f"ids must have shape (B, {h * w}, 1) for grid {grid}, got {tuple(ids.shape)}")

    # ------------------------------------------------------------------ tokens
    def entropy_terms(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(H_sample, H_codebook) of tokens (N, K) with this quantizer's settings."""
        return lfq_entropy(tokens, tau=self.tau, split=self.entropy_split,
                           method=self.codebook_entropy_method, chunk_size=self.entropy_chunk_size,
                           scope=self.entropy_scope)

    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (..., 1) -> +-1 codes (..., K) in fp32."""
        return ids_to_bits(ids[..., 0], self.bits, msb_first=self.msb_first).float() * 2 - 1

    def codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes or features (..., K) -> ids (..., 1) with the strict ``> 0`` threshold."""
        return bits_to_ids(codes_to_bits(codes), msb_first=self.msb_first)[..., None]

    # --------------------------------------------------------------- interface
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        self._check_features(z)
        b, k, h, w = z.shape
        positive = z > 0  # strict threshold: z = 0 -> -1 (docs/open_magvit2.md#lfq-and-token-ids)
        q = torch.where(positive, torch.ones((), dtype=z.dtype, device=z.device),
                        -torch.ones((), dtype=z.dtype, device=z.device))  # (B, K, h, w)
        ids = bits_to_ids(positive.permute(0, 2, 3, 1), msb_first=self.msb_first)  # (B, h, w)
        ids = ids.reshape(b, h * w, 1)  # (B, L, 1), raster order
        z_q = z + (q - z).detach()
        stats: dict[str, torch.Tensor] = {
            "batch_distinct_ids": torch.tensor(float(torch.unique(ids).numel()), device=z.device)}
        losses: dict[str, torch.Tensor] = {}
        if self.training:
            tokens = z.permute(0, 2, 3, 1).reshape(b * h * w, k)  # (N, K)
            with contextlib.nullcontext() if self.entropy_weight != 0 else torch.no_grad():
                h_sample, h_codebook = self.entropy_terms(tokens)
            with full_precision(z.device.type):
                commitment = (at_least_fp32(z) - at_least_fp32(q).detach()).pow(2).mean()
            aux = self.sample_entropy_weight * h_sample - self.codebook_entropy_weight * h_codebook
            if self.entropy_weight != 0:
                losses["entropy"] = self.entropy_weight * aux
            losses["commitment"] = self.commitment_weight * commitment
            stats.update(per_sample_entropy=h_sample.detach(), codebook_entropy=h_codebook.detach(),
                         commitment=commitment.detach())
        return QuantizerOutput(z_q=z_q, ids=ids, losses=losses, stats=stats)

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """Features (B, K, h, w) -> ids (B, h*w, 1)."""
        self._check_features(z)
        b, _, h, w = z.shape
        return self.codes_to_ids(z.permute(0, 2, 3, 1)).reshape(b, h * w, 1)

    def decode(self, ids: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """ids (B, h*w, 1) -> +-1 features (B, K, h, w), the decoder's input (docs/open_magvit2.md#lfq-and-token-ids)."""
        self._check_ids(ids, grid)
        h, w = grid
        codes = self.ids_to_codes(ids)  # (B, L, K)
        return codes.reshape(ids.shape[0], h, w, self.bits).permute(0, 3, 1, 2).contiguous()
