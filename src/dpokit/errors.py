"""User-facing errors, and how a command reports them.

Anything raised as a `DpokitError` is a mistake in the user's input (config, data, checkpoint)
that the command line reports as one sentence and a non-zero exit status, without a traceback.
Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable


class DpokitError(Exception):
    """A problem with the user's input, reported as one sentence."""


class ConfigError(DpokitError):
    """A bad command line or config value; the message names the key."""


class DataError(DpokitError):
    """A dataset that cannot be read; the message names the file (and line) or dataset."""


class CheckpointError(DpokitError):
    """A checkpoint that cannot be read or written; the message names the path."""


class Interrupted(Exception):
    """Training stopped on Ctrl-C or SIGTERM after a complete step; the message says where to resume."""


EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def run_guarded(fn: Callable[[], object], traceback_on: bool = False) -> int:
    """Run a command: a DpokitError becomes one sentence on stderr and exit status 2 (with the
    traceback only when asked: --traceback or DPOKIT_TRACEBACK=1); Ctrl-C exits 130."""
    try:
        result = fn()
    except DpokitError as err:
        # under torchrun every process stops with the same error; the first one says it
        if os.environ.get("RANK", "0") == "0":
            if traceback_on or os.environ.get("DPOKIT_TRACEBACK"):
                traceback.print_exc()
            print(f"dpokit: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Interrupted as stop:
        if os.environ.get("RANK", "0") == "0":
            print(f"dpokit: {stop}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("dpokit: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return result if isinstance(result, int) else 0
