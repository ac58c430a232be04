"""Framework building blocks shared by every AR family (docs/llamagen.md#llama-backbone, docs/llamagen.md#2d-rope, docs/llamagen.md#class-conditioning, docs/llamagen.md#kv-cache)."""

from arforge.nn.llama import (
    Attention,
    BackboneStep,
    FeedForward,
    KVCache,
    LabelEmbedder,
    LlamaBackbone,
    RMSNorm,
    RotaryTableMixin,
    TransformerBlock,
    apply_rotary_emb,
    canonical_device,
    ffn_hidden_size,
    find_multiple,
    init_llama_weights,
    precompute_freqs_cis_2d,
    subtoken_freqs_cis,
)

__all__ = [
    "Attention",
    "BackboneStep",
    "FeedForward",
    "KVCache",
    "LabelEmbedder",
    "LlamaBackbone",
    "RMSNorm",
    "RotaryTableMixin",
    "TransformerBlock",
    "apply_rotary_emb",
    "canonical_device",
    "ffn_hidden_size",
    "find_multiple",
    "init_llama_weights",
    "precompute_freqs_cis_2d",
    "subtoken_freqs_cis",
]
