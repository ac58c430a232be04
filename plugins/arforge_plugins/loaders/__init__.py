"""Loaders (``loaders.*``): the official LlamaGen, Open-MAGVIT2 and IAR2 checkpoints through strict key maps (docs/checkpoints.md)."""
