"""Errors a user can act on.

Every message says what is wrong, where (file, line, field when known) and what to do.
"""

from __future__ import annotations

__all__ = ["StreamKpisError", "ConfigError", "InputFileError"]


class StreamKpisError(Exception):
    """Base class of the errors stream-kpis reports to its user."""


class ConfigError(StreamKpisError):
    """The settings or a config file are invalid."""


class InputFileError(StreamKpisError):
    """An input file for replay or produce cannot be read at all (not a bad line: those go to DLQ)."""
