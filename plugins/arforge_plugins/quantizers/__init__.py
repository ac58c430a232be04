"""Quantizers (``quantizers.*``): LlamaGen's VQ, Open-MAGVIT2's lookup-free quantization, IAR2's semantic-detail quantizer."""
