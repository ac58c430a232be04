"""arforge's built-in method plugins (LlamaGen, Open-MAGVIT2, IAR, IAR2).

Each module is one component, named after its method; each registers through
an ``arforge.plugins`` entry point in the root ``pyproject.toml``.
"""
