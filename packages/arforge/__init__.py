"""arforge: class-conditional autoregressive image generation over discrete tokens.

The framework (this package) holds the registry, interfaces, building blocks,
trainers, tracking, studies and the CLI. Method components live in plugins
(``arforge_plugins`` for the built-ins) and register through the
``arforge.plugins`` entry-point group.
"""

__version__ = "0.1.0"
