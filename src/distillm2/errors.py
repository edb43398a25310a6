"""The errors a user can act on. Each names the file, line, key or model and what was expected;
the command line prints the message and exits with status 2 instead of a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Base class of every expected failure caused by an input (config, data, model, extra)."""


class ConfigError(UserError, ValueError):
    """A config file or override that does not fit the schema."""


class DataError(UserError, ValueError):
    """Bad input data; the message names the file, line or key."""


class TokenizerMismatch(UserError, ValueError):
    """Teacher and student do not share a vocabulary: token-level distillation is undefined."""


class NonFiniteError(UserError, FloatingPointError):
    """Training produced non-finite losses or gradients too often, or weights that are not finite."""


class DivergenceError(NonFiniteError):
    """Training stayed finite but diverged: the loss exploded or the gradient vanished."""


class MissingExtra(UserError, ImportError):
    """An optional dependency is not installed; the message gives the install command."""

    def __init__(self, what: str, extra: str | None = None, command: str | None = None):
        hint = command or f"pip install 'distillm2[{extra}]'"
        super().__init__(f"{what} needs an optional dependency: {hint}")
