"""Model-size presets and builders for the three AR families (docs/llamagen.md#model-sizes).

One class, :class:`arforge.ar_model.ARModel`, many named sizes:

* :func:`llamagen_gpt` — LlamaGen GPT-B … GPT-7B (docs/llamagen.md#model-sizes): identity factorization,
  linear head. :func:`iar_gpt` is the same model with IAR's cluster loss (docs/iar.md#cluster-oriented-loss).
* :func:`open_magvit2_ar` — Open-MAGVIT2 B/L/XL (docs/open_magvit2.md#model-sizes): bit split [6, 12],
  next-sub-token intra transformer.
* :func:`iar2_gpt` — IAR2 B/L/XL/XXL (docs/iar2.md#model-sizes): semantic/detail pairs, local-context
  head, ``repeat_interleave`` RoPE (docs/iar2.md#the-repeat-interleaved-rope-table).

Every family also has a ``tiny`` preset for tests. :data:`PRESET_PARAMS` lists
the parameter count of every paper preset at its default vocabulary and block
size (the "computed" numbers of the docs' size tables, exact here); build on the meta device
(``with torch.device("meta"):``) to count without allocating.

Every factory takes ``grad_checkpointing`` (default off): activation
checkpointing of each transformer block in training, for the large sizes
(LlamaGen XXL/3B, IAR2 XXL …) on 40–80 GB cards. It trades one extra forward
of the blocks per step (roughly a third more compute) for keeping only each
block's input between forward and backward, and leaves losses, gradients and
sampling unchanged. In gin: ``models.llamagen_gpt.grad_checkpointing = True``;
on a built model: ``model.backbone.grad_checkpointing = True`` (and
``model.head.grad_checkpointing`` for the Open-MAGVIT2 and IAR2 heads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from arforge.ar_model import ARModel
from arforge.errors import ConfigError
from arforge.interfaces import as_grid
from arforge.nn.llama import LlamaBackbone

from arforge_plugins.heads.linear_head import LinearHead
from arforge_plugins.heads.next_subtoken_head import NextSubtokenHead
from arforge_plugins.heads.semantic_detail_head import SemanticDetailHead
from arforge_plugins.factorizations.token_factorizations import (
    BitSplitFactorization,
    IdentityFactorization,
    SemanticDetailFactorization,
)

__all__ = [
    "ARSize",
    "LLAMAGEN_SIZES",
    "OPEN_MAGVIT2_SIZES",
    "IAR2_SIZES",
    "PRESET_PARAMS",
    "llamagen_gpt",
    "iar_gpt",
    "open_magvit2_ar",
    "iar2_gpt",
]


@dataclass(frozen=True)
class ARSize:
    n_layer: int  #: backbone blocks (Open-MAGVIT2: spatial blocks)
    n_head: int
    dim: int
    head_layers: int = 0  #: Open-MAGVIT2 ``factorized_n_layer``; IAR2 head blocks (5)


#: docs/llamagen.md#model-sizes (IAR uses the same sizes)
LLAMAGEN_SIZES: dict[str, ARSize] = {
    "tiny": ARSize(n_layer=2, n_head=4, dim=64),
    "B": ARSize(n_layer=12, n_head=12, dim=768),
    "L": ARSize(n_layer=24, n_head=16, dim=1024),
    "XL": ARSize(n_layer=36, n_head=20, dim=1280),
    "XXL": ARSize(n_layer=48, n_head=24, dim=1536),
    "XXXL": ARSize(n_layer=48, n_head=40, dim=2560),
    "1B": ARSize(n_layer=22, n_head=32, dim=2048),
    "3B": ARSize(n_layer=24, n_head=32, dim=3200),
    "7B": ARSize(n_layer=32, n_head=32, dim=4096),
}

#: docs/open_magvit2.md#model-sizes (``imagenet_conditional_llama_{B,L,XL}.yaml``)
OPEN_MAGVIT2_SIZES: dict[str, ARSize] = {
    "tiny": ARSize(n_layer=2, n_head=4, dim=64, head_layers=1),
    "B": ARSize(n_layer=24, n_head=16, dim=1024, head_layers=2),
    "L": ARSize(n_layer=36, n_head=20, dim=1280, head_layers=3),
    "XL": ARSize(n_layer=48, n_head=24, dim=1536, head_layers=4),
}

#: docs/iar2.md#model-sizes (upstream ``gpt_train.py`` GPT-B/L/XL/XXL)
IAR2_SIZES: dict[str, ARSize] = {
    "tiny": ARSize(n_layer=2, n_head=4, dim=64, head_layers=5),
    "B": ARSize(n_layer=12, n_head=12, dim=768, head_layers=5),
    "L": ARSize(n_layer=24, n_head=16, dim=1024, head_layers=5),
    "XL": ARSize(n_layer=36, n_head=20, dim=1280, head_layers=5),
    "XXL": ARSize(n_layer=48, n_head=24, dim=1536, head_layers=5),
}

#: Parameters of each paper preset at its default vocabulary (computed from the
#: architecture; the docs' rounded figures in the comments).
PRESET_PARAMS: dict[str, int] = {
    "llamagen_gpt/B": 110_888_448,  # 110.9M
    "llamagen_gpt/L": 342_910_976,  # 342.9M
    "llamagen_gpt/XL": 774_699_520,  # 774.7M
    "llamagen_gpt/XXL": 1_410_972_672,  # 1.411B
    "llamagen_gpt/XXXL": 3_893_027_840,  # 3.893B
    "llamagen_gpt/1B": 1_199_616_000,  # 1.200B
    "llamagen_gpt/3B": 3_096_659_200,  # 3.097B
    "llamagen_gpt/7B": 6_614_589_440,  # 6.615B
    "open_magvit2_ar/B": 343_570_432,  # 343.6M
    "open_magvit2_ar/L": 804_362_240,  # 804.4M
    "open_magvit2_ar/XL": 1_486_679_040,  # 1.487B
    "iar2_gpt/B": 143_111_616,  # 143.1M incl. the 35.4M head
    "iar2_gpt/L": 408_220_160,  # 408.2M incl. 64.2M
    "iar2_gpt/XL": 884_267_200,  # 884.3M incl. 101.6M
    "iar2_gpt/XXL": 1_570_110_336,  # 1.570B incl. 141.6M
}


def _documented(model: ARModel, family: str, size: str | ARSize, at_defaults: bool) -> ARModel:
    """Attach the preset's documented parameter count (checked by ``arforge run --dry-run``)."""
    key = f"{family}/{size}" if isinstance(size, str) else None
    model.preset = key
    model.preset_family = family  # names the gin configurable in error messages (models.<family>)
    model.documented_params = PRESET_PARAMS.get(key) if key and at_defaults else None
    return model


def _size(table: dict[str, ARSize], size: str | ARSize | Mapping[str, int], family: str) -> ARSize:
    if isinstance(size, ARSize):
        return size
    if isinstance(size, Mapping):  # a custom size from gin: {"n_layer": 2, "n_head": 2, "dim": 16, ...}
        try:
            return ARSize(**size)
        except TypeError as exc:
            raise ConfigError(f"a {family} size given as a dict takes the keys n_layer, n_head, dim and "
                              f"head_layers ({exc}); got {dict(size)}") from None
    try:
        return table[size]
    except KeyError:
        raise ConfigError(f"unknown {family} size {size!r}; known sizes: {', '.join(table)}") from None


def llamagen_gpt(size: str | ARSize = "B", *, vocab_size: int = 16384, block_size: int = 256,
                 num_classes: int = 1000, class_dropout_p: float = 0.1, token_dropout_p: float = 0.1,
                 resid_dropout_p: float = 0.1, ffn_dropout_p: float = 0.1, cls_zero_rotation: bool = True,
                 rope_repeat_interleave: bool = False, cluster_size: int | None = None,
                 cluster_loss_weight: float = 1.0, grad_checkpointing: bool = False) -> ARModel:
    """LlamaGen class-conditional GPT (docs/llamagen.md#model-sizes, docs/llamagen.md#linear-head).

    Args:
        size: a key of :data:`LLAMAGEN_SIZES` (B, L, XL, XXL, XXXL, 1B, 3B, 7B, tiny) or an :class:`ARSize`.
        vocab_size: VQ codebook size (docs/llamagen.md#model-sizes: 16384).
        block_size: tokens per image (docs/llamagen.md#model-sizes: 256 at 256 px, 576 at 384 px).
        num_classes: label classes (docs/llamagen.md#class-conditioning: 1000, plus the null row).
        class_dropout_p, token_dropout_p, resid_dropout_p, ffn_dropout_p: docs/llamagen.md#llama-backbone (0.1 each).
        cls_zero_rotation: docs/llamagen.md#2d-rope class-slot RoPE quirk (on for official weights).
        rope_repeat_interleave: docs/iar2.md#the-repeat-interleaved-rope-table IAR2 quirk (off for LlamaGen).
        cluster_size, cluster_loss_weight: IAR's cluster loss (docs/iar.md#cluster-oriented-loss), off by default.
        grad_checkpointing: activation checkpointing of every backbone block in the
            training forward (recomputed in backward; up to ~1/3 more compute for much less activation
            memory; never applies in eval, under no_grad or to cached decoding). Settable later
            as ``model.backbone.grad_checkpointing``.
    """
    s = _size(LLAMAGEN_SIZES, size, "LlamaGen")
    fact = IdentityFactorization(codebook_size=vocab_size)
    backbone = LlamaBackbone(dim=s.dim, n_layer=s.n_layer, n_head=s.n_head, block_size=block_size,
                             token_dropout_p=token_dropout_p, resid_dropout_p=resid_dropout_p,
                             ffn_dropout_p=ffn_dropout_p, cls_zero_rotation=cls_zero_rotation,
                             rope_repeat_interleave=rope_repeat_interleave, final_norm=False,
                             grad_checkpointing=grad_checkpointing)
    head = LinearHead(dim=s.dim, vocab_size=vocab_size)
    model = ARModel(factorization=fact, backbone=backbone, head=head, num_classes=num_classes,
                    class_dropout_p=class_dropout_p, cluster_size=cluster_size,
                    cluster_loss_weight=cluster_loss_weight)
    return _documented(model, "llamagen_gpt", size, vocab_size == 16384 and num_classes == 1000)


def iar_gpt(size: str | ARSize = "B", *, vocab_size: int = 16384, block_size: int = 256, num_classes: int = 1000,
            class_dropout_p: float = 0.1, token_dropout_p: float = 0.1, resid_dropout_p: float = 0.1,
            ffn_dropout_p: float = 0.1, cluster_size: int = 128, cluster_loss_weight: float = 1.0,
            grad_checkpointing: bool = False) -> ARModel:
    """IAR: LlamaGen's GPT over reordered ids, trained with the cluster-oriented loss (docs/iar.md#cluster-oriented-loss).

    Args:
        cluster_size: tokens per cluster (docs/iar.md#cluster-oriented-loss: 128 clusters × 128).
        cluster_loss_weight: λ (docs/iar.md#cluster-oriented-loss: ``--lambda-cce`` = 1).
        grad_checkpointing: activation checkpointing of the backbone blocks, as :func:`llamagen_gpt`.
        Others: as :func:`llamagen_gpt`.
    """
    return llamagen_gpt(size, vocab_size=vocab_size, block_size=block_size, num_classes=num_classes,
                        class_dropout_p=class_dropout_p, token_dropout_p=token_dropout_p,
                        resid_dropout_p=resid_dropout_p, ffn_dropout_p=ffn_dropout_p,
                        cluster_size=cluster_size, cluster_loss_weight=cluster_loss_weight,
                        grad_checkpointing=grad_checkpointing)


def open_magvit2_ar(size: str | ARSize = "B", *, factorized_bits: Sequence[int] = (6, 12), block_size: int = 256,
                    num_classes: int = 1000, class_dropout_p: float = 0.1, token_dropout_p: float = 0.1,
                    resid_dropout_p: float = 0.1, ffn_dropout_p: float = 0.1,
                    cls_zero_rotation: bool = True, grad_checkpointing: bool = False) -> ARModel:
    """Open-MAGVIT2 AR with next-sub-token prediction (docs/open_magvit2.md#model-sizes, docs/open_magvit2.md#next-sub-token-head).

    Args:
        size: a key of :data:`OPEN_MAGVIT2_SIZES` (B, L, XL, tiny) or an :class:`ARSize`.
        factorized_bits: LFQ bit groups (docs/open_magvit2.md#model-sizes: [6, 12] → vocabularies 64 and 4096).
        block_size: tokens per image (docs/open_magvit2.md#model-sizes: 256).
        num_classes: label classes (docs/llamagen.md#class-conditioning: 1000).
        class_dropout_p, token_dropout_p, resid_dropout_p, ffn_dropout_p: docs/llamagen.md#llama-backbone (0.1 each).
        cls_zero_rotation: docs/llamagen.md#2d-rope quirk (on for official weights).
        grad_checkpointing: activation checkpointing of every backbone block and of the intra
            transformer's ``factorized_blocks`` in the training forward (recomputed in backward;
            up to ~1/3 more compute for much less activation memory; never applies in eval, under
            no_grad or to cached decoding). Settable later as ``model.backbone.grad_checkpointing``
            / ``model.head.grad_checkpointing``.
    """
    s = _size(OPEN_MAGVIT2_SIZES, size, "Open-MAGVIT2")
    fact = BitSplitFactorization(bits=factorized_bits)
    backbone = LlamaBackbone(dim=s.dim, n_layer=s.n_layer, n_head=s.n_head, block_size=block_size,
                             token_dropout_p=token_dropout_p, resid_dropout_p=resid_dropout_p,
                             ffn_dropout_p=ffn_dropout_p, cls_zero_rotation=cls_zero_rotation, final_norm=False,
                             grad_checkpointing=grad_checkpointing)
    head = NextSubtokenHead(dim=s.dim, n_layer=s.head_layers, n_head=s.n_head, vocab_sizes=fact.vocab_sizes,
                            resid_dropout_p=resid_dropout_p, ffn_dropout_p=ffn_dropout_p,
                            cls_zero_rotation=cls_zero_rotation, grad_checkpointing=grad_checkpointing)
    model = ARModel(factorization=fact, backbone=backbone, head=head, num_classes=num_classes,
                    class_dropout_p=class_dropout_p)
    return _documented(model, "open_magvit2_ar", size, tuple(factorized_bits) == (6, 12) and num_classes == 1000)


def iar2_gpt(size: str | ARSize = "B", *, semantic_size: int = 256, detail_size: int = 4096, block_size: int = 576,
             num_classes: int = 1000, class_dropout_p: float = 0.1, token_dropout_p: float = 0.1,
             resid_dropout_p: float = 0.1, ffn_dropout_p: float = 0.1, semantic_loss_weight: float = 1.0,
             cls_zero_rotation: bool = True, rope_repeat_interleave: bool = True,
             grad_checkpointing: bool = False) -> ARModel:
    """IAR2 GPT with the local-context semantic/detail head (docs/iar2.md#model-sizes, docs/iar2.md#input-aggregation-and-local-context-head).

    Args:
        size: a key of :data:`IAR2_SIZES` (B, L, XL, XXL, tiny) or an :class:`ARSize`.
        semantic_size, detail_size: the two codebooks (docs/iar2.md#model-sizes: 256 and 4096).
        block_size: tokens per image (docs/iar2.md#model-sizes: 576, a 24×24 grid).
        num_classes: label classes (docs/llamagen.md#class-conditioning: 1000).
        class_dropout_p, token_dropout_p, resid_dropout_p, ffn_dropout_p: docs/llamagen.md#llama-backbone (0.1 each).
        semantic_loss_weight: ``--w1`` on the semantic CE (docs/iar2.md#losses: default 1.0, the FSDP example 2.0).
        cls_zero_rotation: docs/llamagen.md#2d-rope quirk (on for official weights).
        rope_repeat_interleave: docs/iar2.md#the-repeat-interleaved-rope-table quirk (on for official weights; optional for new models).
        grad_checkpointing: activation checkpointing of every backbone block and of the head's 5
            ``factorized_blocks`` in the training forward (recomputed in backward; up to ~1/3 more
            compute for much less activation memory; never applies in eval, under no_grad or to
            cached decoding). Settable later as ``model.backbone.grad_checkpointing`` /
            ``model.head.grad_checkpointing``.
    """
    s = _size(IAR2_SIZES, size, "IAR2")
    fact = SemanticDetailFactorization(semantic_size=semantic_size, detail_size=detail_size)
    backbone = LlamaBackbone(dim=s.dim, n_layer=s.n_layer, n_head=s.n_head, block_size=block_size,
                             token_dropout_p=token_dropout_p, resid_dropout_p=resid_dropout_p,
                             ffn_dropout_p=ffn_dropout_p, cls_zero_rotation=cls_zero_rotation,
                             rope_repeat_interleave=rope_repeat_interleave, final_norm=False,
                             grad_checkpointing=grad_checkpointing)
    head = SemanticDetailHead(dim=s.dim, n_head=s.n_head, grid_size=as_grid(block_size)[0],
                              n_layer=s.head_layers, vocab_sizes=fact.vocab_sizes,
                              resid_dropout_p=resid_dropout_p, ffn_dropout_p=ffn_dropout_p,
                              cls_zero_rotation=cls_zero_rotation, rope_repeat_interleave=rope_repeat_interleave,
                              grad_checkpointing=grad_checkpointing)
    model = ARModel(factorization=fact, backbone=backbone, head=head, num_classes=num_classes,
                    class_dropout_p=class_dropout_p, loss_weights=(semantic_loss_weight, 1.0))
    return _documented(model, "iar2_gpt", size, (semantic_size, detail_size, num_classes) == (256, 4096, 1000))
