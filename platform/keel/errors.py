"""Errors a user can fix: the CLI shows them as one line; any other exception keeps its traceback.

Both subclass ``ValueError``, so code that caught ``ValueError`` for a user mistake still does.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in what the user gave Keel (config, data, environment), told in one line naming where."""


class ConfigError(UserError):
    """An invalid configuration value or combination, naming the key (``mix.T``)."""
