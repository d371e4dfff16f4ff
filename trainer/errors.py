"""Errors Kiln raises for a user's mistake: the message says what is wrong, where, and the fix;
the CLI prints it as one paragraph, without a traceback."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config that cannot run; the message names the field, the value and the fix."""
