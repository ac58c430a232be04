"""arforge's built-in method plugins (LlamaGen, Open-MAGVIT2, IAR, IAR2), one folder per kind.

This is its own distribution (``plugins/pyproject.toml``, ``arforge-plugins``): every
component registers through the ``arforge.plugins`` entry-point group, the route a
third-party plugin takes (docs/registry.md). Each module is one component, named
after its method.
"""
