"""Token factorizations (``factorizations.*``): tokenizer ids <-> the AR model's sub-tokens, and their input embedders (docs/llamagen.md#ar-model, docs/open_magvit2.md#lfq-and-token-ids)."""
