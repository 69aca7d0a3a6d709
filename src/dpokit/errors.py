"""User-facing errors.

Anything raised as a `DpokitError` is a mistake in the user's input (config, data, checkpoint)
that the command line reports as one sentence and a non-zero exit status, without a traceback.
Everything else is a bug and keeps its traceback.
"""


class DpokitError(Exception):
    """A problem with the user's input, reported as one sentence."""


class ConfigError(DpokitError):
    """A bad command line or config value; the message names the key."""


class DataError(DpokitError):
    """A dataset that cannot be read; the message names the file (and line) or dataset."""


class CheckpointError(DpokitError):
    """A checkpoint that cannot be read or written; the message names the path."""
