"""AR model presets (``models.*``): the paper sizes of LlamaGen, IAR, Open-MAGVIT2 and IAR2 over one :class:`arforge.ar_model.ARModel` (docs/llamagen.md#model-sizes)."""
