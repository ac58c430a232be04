"""User-facing errors.

Every error a user can cause by a mistake (a gin typo, an unknown plugin, a
wrong checkpoint, a missing weights file, a corrupt dataset) derives from
:class:`ArforgeError`. The CLI prints these as one short message, naming the
file, option or key at fault and what to do, without a Python traceback
(``ARFORGE_TRACEBACK=1`` shows it anyway).
"""


class ArforgeError(Exception):
    """Base class of user-facing errors."""


class ConfigError(ArforgeError):
    """A gin configuration mistake: syntax, unknown name, missing value."""
