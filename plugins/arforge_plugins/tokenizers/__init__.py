"""Tokenizers (``tokenizers.*``): the generic encoder-quantizer-decoder and the LlamaGen VQ and Open-MAGVIT2 backbones."""
