"""IAR2's local-context semantic/detail head (docs/iar2.md#input-aggregation-and-local-context-head, docs/iar2.md#sampling).

Per position n:

1. **Window.** The 12 causal neighbours of cell n = (i, j) on the g×g grid, in
   this order (docs/iar2.md#input-aggregation-and-local-context-head): k = 0–4 row i−2, columns j−2 … j+2; k = 5–9 row i−1,
   columns j−2 … j+2; k = 10 (i, j−2); k = 11 (i, j−1). Neighbour m contributes
   h_m, the backbone state that predicted token m. Out-of-grid neighbours are
   zero vectors fed *into* ``mlp1``, so they contribute mlp1(0) (docs/iar2.md#differences-from-upstream quirk).
2. **Compression.** ``mlp1`` (D → D//4 → ⌊D/12⌋, shared over the slots), the 12
   outputs concatenated in neighbour order, ``mlp2`` (12·⌊D/12⌋ → 2D → D) → u_n.
3. **Head sequence** [u_n, h_n, E_s[s_n]] through 5 ``factorized_blocks``
   (causal, RoPE rows 0–2 of the backbone's table: zero, then identity twice
   under IAR2's ``repeat_interleave``, docs/open_magvit2.md#next-sub-token-head), ``norm``, then ``output1``(slot 1)
   → semantic logits and ``output2``(slot 2) → detail logits. E_s is the
   embedder's ``tok_embeddings1`` (one tensor; the model ties it).

The window indices are derived from the grid size (any g) and kept as
non-persistent buffers (docs/iar2.md#differences-from-upstream). Because ``mlp1`` acts on each neighbour
separately, mlp1 is applied once per position and the 12 compressed vectors are
gathered (mlp1(gather(h)) = gather(mlp1(h))): training runs mlp1 L times
instead of 12·L, and sampling keeps a history of mlp1(h_m) (Bc, L+1, ⌊D/12⌋)
whose last row is mlp1(0), instead of the raw (Bc, L, D) states.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from arforge.device import at_least_fp32
from arforge.nn.llama import RMSNorm, SubtokenRotaryMixin, TransformerBlock, run_blocks, canonical_device

__all__ = ["SemanticDetailHead", "window_indices", "NEIGHBOURS"]

#: (row offset, column offset) of the 12 neighbours, in docs/iar2.md#input-aggregation-and-local-context-head order
NEIGHBOURS: tuple[tuple[int, int], ...] = (
    tuple((-2, dc) for dc in range(-2, 3)) + tuple((-1, dc) for dc in range(-2, 3)) + ((0, -2), (0, -1))
)


def window_indices(grid_size: int) -> torch.Tensor:
    """(g*g, 12) int64: the flat index of each cell's neighbours, −1 where out of the grid."""
    g = grid_size
    rows = []
    for i in range(g):
        for j in range(g):
            rows.append([(i + di) * g + (j + dj) if 0 <= i + di < g and 0 <= j + dj < g else -1
                         for di, dj in NEIGHBOURS])
    return torch.tensor(rows, dtype=torch.long).reshape(g * g, len(NEIGHBOURS))  # (g*g, 12)


class SemanticDetailHead(SubtokenRotaryMixin, nn.Module):
    """Window MLPs + 5-block head over [u_n, h_n, E_s[s_n]] → (semantic, detail) logits (IAR2 docs/iar2.md#input-aggregation-and-local-context-head)."""

    tied_subtoken = 0  #: reuses the embedder's ``tok_embeddings1``
    n_slots = 3

    def __init__(self, *, dim: int, n_head: int, grid_size: int, n_layer: int = 5, n_kv_head: int | None = None,
                 vocab_sizes: Sequence[int] = (256, 4096), ffn_hidden: int | None = None, norm_eps: float = 1e-5,
                 attn_dropout_p: float = 0.0, resid_dropout_p: float = 0.1, ffn_dropout_p: float = 0.1,
                 rope_base: float = 10000.0, cls_zero_rotation: bool = True, rope_repeat_interleave: bool = True,
                 grad_checkpointing: bool = False):
        """
        Args:
            dim, n_head, n_kv_head, ffn_hidden, norm_eps: as the backbone (docs/iar2.md#input-aggregation-and-local-context-head: same configuration).
            grid_size: g of the g×g token grid (docs/iar2.md#model-sizes: 24), for the neighbour window.
            n_layer: head blocks (docs/iar2.md#input-aggregation-and-local-context-head: 5).
            vocab_sizes: (semantic, detail) vocabularies (docs/iar2.md#model-sizes: 256 and 4096).
            attn_dropout_p, resid_dropout_p, ffn_dropout_p: block dropouts (docs/llamagen.md#llama-backbone: 0, 0.1, 0.1).
            rope_base, cls_zero_rotation, rope_repeat_interleave: the table whose rows 0–2 the slots
                use (docs/open_magvit2.md#next-sub-token-head; IAR2 checkpoints need ``rope_repeat_interleave``, docs/iar2.md#the-repeat-interleaved-rope-table).
            grad_checkpointing: checkpoint each of ``factorized_blocks`` in the training forward
                (train mode, grad enabled), as :class:`~arforge.nn.llama.LlamaBackbone` does: their
                activations over the B·L short sequences are recomputed in backward instead of kept.
                Never applies to decoding. A plain attribute, switchable after construction.
        """
        super().__init__()
        vocab_sizes = tuple(int(v) for v in vocab_sizes)
        if len(vocab_sizes) != 2:
            raise ValueError(f"the semantic/detail head predicts two sub-tokens, got vocab_sizes {vocab_sizes}")
        self.dim = dim
        self.vocab_sizes = vocab_sizes
        self.grid_size = grid_size
        self.head_dim = dim // n_head
        self.rope_base = rope_base
        self.cls_zero_rotation = cls_zero_rotation
        self.rope_repeat_interleave = rope_repeat_interleave
        self.grad_checkpointing = bool(grad_checkpointing)
        c = dim // 12  # ⌊D/12⌋ features per neighbour (docs/iar2.md#model-sizes)
        self.window_dim = c
        self.mlp1 = nn.Sequential(nn.Linear(dim, dim // 4), nn.GELU(), nn.Linear(dim // 4, c, bias=False))
        self.mlp2 = nn.Sequential(nn.Linear(len(NEIGHBOURS) * c, 2 * dim), nn.GELU(),
                                  nn.Linear(2 * dim, dim, bias=False))
        self.factorized_blocks = nn.ModuleList([
            TransformerBlock(dim=dim, n_head=n_head, n_kv_head=n_kv_head, ffn_hidden=ffn_hidden, norm_eps=norm_eps,
                             attn_dropout_p=attn_dropout_p, resid_dropout_p=resid_dropout_p,
                             ffn_dropout_p=ffn_dropout_p)
            for _ in range(n_layer)
        ])
        self.norm = RMSNorm(dim=dim, eps=norm_eps)
        self.output1 = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, vocab_sizes[0], bias=False))
        self.output2 = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, vocab_sizes[1], bias=False))
        self.register_buffer("window_index", window_indices(grid_size), persistent=False)  # (g*g, 12), −1 outside
        self.register_buffer("freqs_cis", self._table(), persistent=False)
        self.__dict__["_sem_emb"] = None  # tied, not registered: it belongs to the embedder
        self.history: torch.Tensor | None = None

    # ---------------------------------------------------------------- tying
    def tie_embedding(self, embedding: nn.Embedding) -> None:
        if embedding.num_embeddings != self.vocab_sizes[0]:
            raise ValueError(f"semantic embedding has {embedding.num_embeddings} rows, expected {self.vocab_sizes[0]}")
        self.__dict__["_sem_emb"] = embedding

    @property
    def tok_embeddings1(self) -> nn.Embedding:
        emb = self.__dict__["_sem_emb"]
        if emb is None:
            raise RuntimeError("the semantic/detail head has no semantic embedding: build it inside an ARModel "
                               "(which ties the embedder's tok_embeddings1) or call tie_embedding(...)")
        return emb

    def zero_init_outputs(self) -> None:
        nn.init.zeros_(self.output1[2].weight)
        nn.init.zeros_(self.output2[2].weight)

    # --------------------------------------------------------------- window
    def neighbour_states(self, h: torch.Tensor) -> torch.Tensor:
        """The raw window: h (B, L, D) -> (B, L, 12, D), zero vectors where out of the grid."""
        b, n_pos, d = h.shape
        idx = self.window_index[:n_pos]  # (L, 12)
        padded = torch.cat([h, h.new_zeros(b, 1, d)], dim=1)  # (B, L+1, D): row L is the zero vector
        return padded[:, torch.where(idx < 0, n_pos, idx)]  # (B, L, 12, D)

    def local_context(self, h: torch.Tensor) -> torch.Tensor:
        """u = mlp2(concat_k mlp1(h_{m_k})): h (B, L, D) -> (B, L, D)."""
        b, n_pos, d = h.shape
        idx = self.window_index[:n_pos]  # (L, 12)
        compressed = self.mlp1(torch.cat([h, h.new_zeros(b, 1, d)], dim=1))  # (B, L+1, c): row L = mlp1(0)
        window = compressed[:, torch.where(idx < 0, n_pos, idx)]  # (B, L, 12, c)
        return self.mlp2(window.reshape(b, n_pos, -1))  # (B, L, 12c) -> (B, L, D)

    # ------------------------------------------------------------- training
    def forward(self, h: torch.Tensor, sub_tokens: torch.Tensor) -> list[torch.Tensor]:
        """h (B, L, D), sub_tokens (B, L, 2) -> [semantic (B, L, V_s), detail (B, L, V_d)] fp32."""
        b, n_pos, d = h.shape
        x = torch.stack([self.local_context(h), h, self.tok_embeddings1(sub_tokens[..., 0])], dim=2)  # (B, L, 3, D)
        x = x.reshape(b * n_pos, self.n_slots, d)  # (B·L, 3, D)
        x = run_blocks(self.factorized_blocks, x, self.freqs_cis,
                       checkpointing=self.grad_checkpointing and self.training)
        x = self.norm(x).view(b, n_pos, self.n_slots, d)  # (B, L, 3, D); slot 0's output is unused
        return [at_least_fp32(self.output1(x[:, :, 1])), at_least_fp32(self.output2(x[:, :, 2]))]

    # ------------------------------------------------------------- decoding
    def setup_cache(self, *, batch: int, dtype: torch.dtype, device: torch.device | str) -> bool:
        """Head K/V caches of exactly 3 slots and the window history (Bc, L+1, c), allocated once."""
        device = canonical_device(device)
        allocated = False
        for blk in self.factorized_blocks:
            allocated |= blk.attention.setup_cache(max_batch=batch, max_seq_len=self.n_slots,
                                                   dtype=dtype, device=device)
        shape = (batch, self.grid_size * self.grid_size + 1, self.window_dim)
        hist = self.history
        if hist is None or tuple(hist.shape) != shape or hist.dtype != dtype or hist.device != device:
            self.history = torch.zeros(shape, dtype=dtype, device=device)
            allocated = True
        return allocated

    def release_cache(self) -> None:
        for blk in self.factorized_blocks:
            blk.attention.kv_cache = None
        self.history = None

    def cache_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, blk in enumerate(self.factorized_blocks):
            if blk.attention.kv_cache is not None:
                out[f"factorized_blocks.{i}.k_cache"] = blk.attention.kv_cache.k_cache
                out[f"factorized_blocks.{i}.v_cache"] = blk.attention.kv_cache.v_cache
        if self.history is not None:
            out["history"] = self.history
        return out

    def _blocks_step(self, x: torch.Tensor, start: int) -> torch.Tensor:
        freqs = self.freqs_cis[start:start + x.shape[1]]  # (T, hd/2, 2)
        for blk in self.factorized_blocks:
            x, _ = blk.step(x, freqs, start)
        return self.norm(x[:, -1])  # (Bc, D): the last new slot

    def decode_position(self, h: torch.Tensor, n: int,
                        choose: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """docs/iar2.md#sampling steps 2–3: h (Bc, 1, D) -> (s, d) (Bc, 2)."""
        if self.history is None or self.history.shape[0] < h.shape[0]:
            raise RuntimeError("the semantic/detail head's caches are not set up for this batch: call setup_caches")
        # The first Bc rows: after the model's keep_rows (guidance ended) the conditional rows,
        # whose history the first rows already hold.
        hist = self.history[:h.shape[0]]  # (Bc, L+1, c), a view
        L = hist.shape[1] - 1
        if n == 0:  # a new image: the out-of-grid row is mlp1(0) under the current weights
            hist[:, L].copy_(self.mlp1(h.new_zeros(1, self.dim)).to(hist.dtype).expand(h.shape[0], -1))
        hist[:, n].copy_(self.mlp1(h[:, 0]).to(hist.dtype))  # (Bc, c)
        idx = self.window_index[n]  # (12,)
        window = hist[:, torch.where(idx < 0, L, idx)]  # (Bc, 12, c)
        u = self.mlp2(window.reshape(h.shape[0], -1).to(h.dtype))  # (Bc, 12c) -> (Bc, D)
        x = self._blocks_step(torch.stack([u, h[:, 0]], dim=1), 0)  # slots 0–1: (Bc, 2, D) -> (Bc, D)
        s = choose(0, at_least_fp32(self.output1(x)))  # (Bc,)
        x = self._blocks_step(self.tok_embeddings1(s)[:, None], 2)  # slot 2: (Bc, 1, D) -> (Bc, D)
        d = choose(1, at_least_fp32(self.output2(x)))  # (Bc,)
        return torch.stack([s, d], dim=1)  # (Bc, 2)
