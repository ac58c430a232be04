"""Tokenizer training losses (``losses.*``): PatchGAN, GAN objectives, LeCAM, LPIPS and their composer (docs/llamagen.md#losses)."""
