"""Exception types raised by lorakit.

Every error lorakit raises on bad input derives from :class:`LorakitError`, so callers can catch one type.
The subclasses also derive from the matching built-in (``ValueError``, ``KeyError``...) so existing
``except ValueError`` code keeps working.
"""

from __future__ import annotations


class LorakitError(Exception):
    """Base class of every lorakit error."""


class ConfigError(LorakitError, ValueError):
    """An option or configuration value is invalid (wrong type, out of range, unknown key)."""


class UnknownMethodError(ConfigError, KeyError):
    """The requested adapter method is not registered in :data:`lorakit.METHODS`."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class TargetError(LorakitError, ValueError):
    """Target-module selection matched nothing, or matched a module type that cannot be adapted."""


class AdapterStateError(LorakitError, RuntimeError):
    """An operation does not fit the model's current adapter state (e.g. unknown adapter name)."""


class AdapterFileError(LorakitError, OSError):
    """An adapter directory is missing, truncated, corrupted, or not a lorakit adapter."""


class IncompatibleAdapterError(LorakitError, ValueError):
    """A saved adapter does not fit this model (different base weights or shapes)."""
