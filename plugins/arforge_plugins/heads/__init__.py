"""AR output heads (``heads.*``): LlamaGen's linear head, Open-MAGVIT2's next-sub-token head, IAR2's semantic/detail local-context head."""
