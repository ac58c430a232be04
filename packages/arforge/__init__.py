"""arforge: class-conditional autoregressive image generation over discrete tokens.

The framework (this package) holds the registry, interfaces, building blocks,
trainers, tracking, studies and the CLI. Method components live in plugins
(``arforge_plugins`` for the built-ins) and register through the
``arforge.plugins`` entry-point group.

The Python API (docs/api.md)::

    import arforge
    run = arforge.load("quickstart/pipeline")
    samples = arforge.generate(run, classes=[3] * 8, guidance=1.5, seed=0)

Its names are imported on first use (module ``__getattr__``), so ``import arforge`` stays cheap:
the CLI imports this package before it checks its arguments, and torch takes seconds to import.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

#: name -> module that defines it, imported on first access.
_API = {
    "load": "arforge.api",
    "generate": "arforge.api",
    "reconstruct": "arforge.api",
    "find_run_dir": "arforge.api",
    "LoadedRun": "arforge.api",
    "Samples": "arforge.api",
    "Reconstruction": "arforge.api",
    "LoadError": "arforge.api",
    "ArforgeError": "arforge.errors",
}

#: Sub-modules a notebook reaches as ``arforge.<name>`` without importing them first
#: (``arforge.registry.get("guidance", "cfg_linear")``).
_SUBMODULES = ("api", "registry", "checkpoint", "tracking", "launch", "generation", "guidance", "viz")

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    import importlib

    if name in _SUBMODULES:
        return importlib.import_module(f"arforge.{name}")  # the import binds it in this namespace
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'arforge' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API) | set(_SUBMODULES))
