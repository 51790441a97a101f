"""Errors a user can cause.

A `KompaktError` is caught by the CLI, printed as one line and turned into exit status 2
(a traceback only with `--debug`). Use it for anything the user can fix: a missing file, bad
UTF-8, an unknown recipe key, a vocabulary mismatch. Use `assert` for internal invariants.
"""


class KompaktError(Exception):
    """A mistake in the user's input, config or environment; the message says what to do."""


class ConfigError(KompaktError):
    """A recipe or override that does not validate."""


class DataError(KompaktError):
    """An input file that cannot be read as configured, or a corpus that ends up empty."""


class DeviceError(KompaktError):
    """This machine lacks what a command measures against (`kompakt bench mfu` without a CUDA GPU).
    `kompakt bench` (every benchmark) records it as skipped, with this message as the reason."""
