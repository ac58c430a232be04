"""Classifier-free guidance (``guidance.*``): the CFG schedules of LlamaGen, Open-MAGVIT2 and IAR2 (docs/llamagen.md#sampling)."""
