"""The error types every entry point reports as the user's: one line ``<command>: error: ...``, exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """Something the user gave or did stops the job: a file, path, checkpoint or setting, or a documented
    stop (``train.max_nonfinite_steps``). The entry points print it as one line ``error: ...`` and exit 2,
    on every rank."""


class ConfigError(UserError, ValueError):
    """A configuration value is missing, unknown, of the wrong type or inconsistent."""


USER_ERRORS = (UserError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError)
"""What the entry points report as the user's error (one ``error:`` line, exit 2): ours, and the errors the
libraries raise for bad values and paths."""
