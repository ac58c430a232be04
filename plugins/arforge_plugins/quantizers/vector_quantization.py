"""LlamaGen's l2-normalised vector quantizer.

Paper: "Autoregressive Model Beats Diffusion: Llama for Scalable Image
Generation". Upstream: LlamaGen ``tokenizer/tokenizer_image/vq_model.py``
(``VectorQuantizer``). See docs/llamagen.md#vector-quantizer; IAR2's stage-1
semantic codebook is this quantizer with 256 codes (docs/iar2.md#stage-1).

Per position, ẑ = z/‖z‖ is matched to the row-normalised codebook Ê by the
squared distance (the largest cosine similarity); the straight-through output is
ẑ + sg(ê_i - ẑ), built from the *normalised* ẑ. The codebook parameter is
``embedding.weight``, stored raw and normalised at use, so LlamaGen's
``quantize.embedding.weight`` maps onto it one to one.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from arforge.device import at_least_fp32, full_precision
from arforge.errors import ConfigError
from arforge.interfaces import QuantizerOutput

#: The ``+1e-5`` in H_batch = -sum p_bar log(p_bar + 1e-5) is part of the definition (docs/llamagen.md#vector-quantizer).
BATCH_ENTROPY_EPS = 1e-5
#: Tokens per block of the nearest-code search (bounds the N x K distance matrix).
LOOKUP_BLOCK = 4096




def squared_distances(z_hat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """‖ẑ_n - e_k‖² in LlamaGen's expanded form ‖ẑ‖² + ‖e‖² - 2ẑ·e: (N, K)."""
    return (z_hat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1)[None, :]
            - 2.0 * (z_hat @ codebook.T))


@torch.no_grad()
def nearest_codes(z_hat: torch.Tensor, codebook: torch.Tensor, block: int = LOOKUP_BLOCK) -> torch.Tensor:
    """argmin_k ‖ẑ_n - e_k‖² for tokens (N, D), in fp32, ``block`` tokens at a time: (N,) int64."""
    out = torch.zeros(z_hat.shape[0], dtype=torch.int64, device=z_hat.device)
    with full_precision(z_hat.device.type):
        z_hat, codebook = at_least_fp32(z_hat), at_least_fp32(codebook)
        for i in range(0, z_hat.shape[0], block):
            out[i:i + block] = squared_distances(z_hat[i:i + block], codebook).argmin(1)
    return out


def _chunk_logsumexp(z_hat: torch.Tensor, codebook: torch.Tensor, tau: float) -> torch.Tensor:
    return torch.logsumexp(-squared_distances(z_hat, codebook) / tau, dim=1)  # (N,)


def _chunk_terms(z_hat: torch.Tensor, codebook: torch.Tensor, lse: torch.Tensor,
                 tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    log_p = -squared_distances(z_hat, codebook) / tau - lse[:, None]  # (N, |J|)
    p = log_p.exp()
    return p.sum(0), -(p * log_p).sum()  # sum_n p_nj (|J|,), sum_n sum_j -p log p


def vq_entropy_terms(z_hat: torch.Tensor, codebook: torch.Tensor, *, tau: float = 0.01,
                     chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(H_sample, H_batch) of LlamaGen's entropy loss (docs/llamagen.md#vector-quantizer), exactly, in fp32.

    Affinities a_nk = -‖ẑ_n - ê_k‖², p = softmax(a/tau). The softmax normaliser is
    accumulated chunk by chunk over the codes, then p is rebuilt per chunk; with
    autograd on, each chunk is recomputed in the backward pass, so no tensor larger
    than N x chunk_size is ever held.
    """
    with full_precision(z_hat.device.type):
        z_hat, codebook = at_least_fp32(z_hat), at_least_fp32(codebook)
        track = torch.is_grad_enabled() and (z_hat.requires_grad or codebook.requires_grad)
        chunks = [codebook[j:j + chunk_size] for j in range(0, codebook.shape[0], chunk_size)]

        def run(fn, *args):
            return checkpoint(fn, *args, use_reentrant=False) if track else fn(*args)

        lse = torch.logsumexp(torch.stack([run(_chunk_logsumexp, z_hat, c, tau) for c in chunks], 1), 1)
        parts = [run(_chunk_terms, z_hat, c, lse, tau) for c in chunks]
        n = z_hat.shape[0]
        p_bar = torch.cat([p for p, _ in parts]) / n  # (K,)
        h_sample = torch.stack([e for _, e in parts]).sum() / n
        h_batch = -(p_bar * torch.log(p_bar + BATCH_ENTROPY_EPS)).sum()
    return h_sample, h_batch


def vq_losses(z_q: torch.Tensor, z_hat: torch.Tensor, *, beta: float, losses: dict, stats: dict) -> None:
    """vq = mean((z_q - sg(ẑ))²) and commitment = β·mean((sg(z_q) - ẑ)²) (docs/llamagen.md#vector-quantizer, docs/iar2.md#stage-2).

    Shared by LlamaGen's VQ and IAR2's two-level quantizer (there on the summed z_q).
    """
    vq = (z_q - z_hat.detach()).pow(2).mean()
    commitment = (z_q.detach() - z_hat).pow(2).mean()
    losses["vq"] = vq
    losses["commitment"] = beta * commitment
    stats.update(vq=vq.detach(), commitment=commitment.detach())


class VectorQuantizer(nn.Module):
    """LlamaGen VQ with an l2-normalised codebook (docs/llamagen.md#vector-quantizer): ids (B, h*w, 1).

    Training losses (absent in eval mode), already weighted:

    * ``vq`` = mean((z_q - sg(ẑ))²), the codebook loss;
    * ``commitment`` = beta * mean((sg(z_q) - ẑ)²);
    * ``entropy`` = entropy_loss_ratio * (H_sample - H_batch), only when the ratio is not 0.

    Codebook usage is a diagnostic outside the module state (never in
    ``state_dict``, not broadcast by DDP): a histogram of the ids of every
    forward/encode since :meth:`reset_usage`. Stats: ``codebook_usage`` (distinct
    ids since reset / K), ``batch_usage`` (distinct ids in the batch / K), and the
    unweighted ``vq``, ``commitment``, ``sample_entropy``, ``batch_entropy`` in training.
    """

    def __init__(
        self,
        *,
        codebook_size: int = 16384,  # K rows of the codebook (docs/llamagen.md#tokenizer: 16384; IAR2 stage 1: 256, docs/iar2.md#stage-1)
        dim: int = 8,  # code dimension = quant_conv output channels (docs/llamagen.md#encoder-and-decoder)
        beta: float = 0.25,  # commitment weight (docs/llamagen.md#vector-quantizer)
        entropy_loss_ratio: float = 0.0,  # weight of H_sample - H_batch; 0 = off as upstream (docs/llamagen.md#vector-quantizer)
        entropy_temperature: float = 0.01,  # tau of the entropy softmax over -‖ẑ - ê‖² (docs/llamagen.md#vector-quantizer)
        entropy_chunk_size: int = 4096,  # codes per chunk of the entropy computation (memory O(N * chunk))
    ) -> None:
        super().__init__()
        if codebook_size < 1 or dim < 1:
            raise ConfigError(f"VectorQuantizer: codebook_size and dim must be >= 1, got {codebook_size}, {dim}")
        if not entropy_temperature > 0:
            raise ConfigError(f"VectorQuantizer: entropy_temperature must be > 0, got {entropy_temperature}")
        if entropy_chunk_size < 1:
            raise ConfigError(f"VectorQuantizer: entropy_chunk_size must be >= 1, got {entropy_chunk_size}")
        self.codebook_size = int(codebook_size)
        self.dim = int(dim)
        self.codebook_sizes: tuple[int, ...] = (self.codebook_size,)
        self.beta = float(beta)
        self.entropy_loss_ratio = float(entropy_loss_ratio)
        self.entropy_temperature = float(entropy_temperature)
        self.entropy_chunk_size = int(entropy_chunk_size)
        self.embedding = nn.Embedding(self.codebook_size, self.dim)
        with torch.no_grad():  # docs/llamagen.md#vector-quantizer: U(-1/K, 1/K), then rows l2-normalised
            self.embedding.weight.uniform_(-1.0 / self.codebook_size, 1.0 / self.codebook_size)
            self.embedding.weight.copy_(F.normalize(self.embedding.weight, p=2, dim=-1))
        self._usage_counts: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"codebook_size={self.codebook_size}, dim={self.dim}, beta={self.beta}"

    # ------------------------------------------------------------------ usage
    def reset_usage(self) -> None:
        """Start a new usage window (the histogram is not part of the module state)."""
        self._usage_counts = None

    def usage_counts(self) -> torch.Tensor:
        """How often each code was chosen since :meth:`reset_usage`: (K,) int64."""
        if self._usage_counts is None:
            return torch.zeros(self.codebook_size, dtype=torch.int64, device=self.embedding.weight.device)
        return self._usage_counts.clone()

    def _track(self, ids: torch.Tensor) -> None:
        counts = torch.bincount(ids.reshape(-1), minlength=self.codebook_size)
        if self._usage_counts is None or self._usage_counts.device != counts.device:
            self._usage_counts = counts
        else:
            self._usage_counts += counts

    # ------------------------------------------------------------------ codes
    def normalized_codebook(self) -> torch.Tensor:
        """Ê, the row-normalised codebook (K, D)."""
        return F.normalize(self.embedding.weight, p=2, dim=-1)

    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (..., 1) -> normalised codes ê (..., D)."""
        self._check_id_range(ids)
        return F.embedding(ids[..., 0], self.normalized_codebook())

    def codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes or features (..., D) -> nearest ids (..., 1) after l2-normalisation."""
        flat = F.normalize(codes.reshape(-1, self.dim), p=2, dim=-1)  # (N, D)
        return nearest_codes(flat, self.normalized_codebook()).reshape(*codes.shape[:-1], 1)

    def _check_id_range(self, ids: torch.Tensor) -> None:
        if ids.shape[-1] != 1 or ids.dtype.is_floating_point:
            raise ValueError(f"VectorQuantizer ids must be integers of shape (..., 1), got {ids.dtype} "
                             f"{tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.codebook_size):
            raise ValueError(f"VectorQuantizer ids must lie in [0, {self.codebook_size}), got "
                             f"[{int(ids.min())}, {int(ids.max())}]")

    def _check_features(self, z: torch.Tensor) -> None:
        if z.ndim != 4 or z.shape[1] != self.dim:
            raise ValueError(f"VectorQuantizer expects features (B, {self.dim}, h, w), got {tuple(z.shape)}")

    # --------------------------------------------------------------- interface
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        self._check_features(z)
        b, d, h, w = z.shape
        z_hat = F.normalize(z.permute(0, 2, 3, 1).reshape(b * h * w, d), p=2, dim=-1)  # (N, D)
        codebook = self.normalized_codebook()  # (K, D)
        idx = nearest_codes(z_hat.detach(), codebook.detach())  # (N,)
        self._track(idx)
        z_q = F.embedding(idx, codebook).to(z_hat.dtype)  # (N, D)
        stats = {"codebook_usage": (self._usage_counts > 0).sum().float() / self.codebook_size,
                 "batch_usage": torch.tensor(torch.unique(idx).numel() / self.codebook_size, device=z.device)}
        losses: dict[str, torch.Tensor] = {}
        if self.training:
            vq_losses(z_q, z_hat, beta=self.beta, losses=losses, stats=stats)
            if self.entropy_loss_ratio != 0:
                h_sample, h_batch = vq_entropy_terms(z_hat, codebook, tau=self.entropy_temperature,
                                                     chunk_size=self.entropy_chunk_size)
                losses["entropy"] = self.entropy_loss_ratio * (h_sample - h_batch)
                stats.update(sample_entropy=h_sample.detach(), batch_entropy=h_batch.detach())
        z_st = z_hat + (z_q - z_hat).detach()  # straight-through on the normalised ẑ (docs/llamagen.md#vector-quantizer)
        z_st = z_st.reshape(b, h, w, d).permute(0, 3, 1, 2)  # (B, D, h, w)
        return QuantizerOutput(z_q=z_st, ids=idx.reshape(b, h * w, 1), losses=losses, stats=stats)

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """Features (B, D, h, w) -> ids (B, h*w, 1)."""
        self._check_features(z)
        b, d, h, w = z.shape
        ids = self.codes_to_ids(z.permute(0, 2, 3, 1)).reshape(b, h * w, 1)
        self._track(ids)
        return ids

    def decode(self, ids: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """ids (B, h*w, 1) -> normalised codes as features (B, D, h, w) (docs/llamagen.md#vector-quantizer)."""
        h, w = grid
        if ids.ndim != 3 or ids.shape[1] != h * w:
            raise ValueError(f"ids must have shape (B, {h * w}, 1) for grid {grid}, got {tuple(ids.shape)}")
        codes = self.ids_to_codes(ids)  # (B, L, D)
        return codes.reshape(ids.shape[0], h, w, self.dim).permute(0, 3, 1, 2).contiguous()
