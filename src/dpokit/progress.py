"""Progress bars (tqdm) that suit where the output goes.

On a terminal: live bars on stderr, which are not copied to train.log. Anywhere else (a log file,
a pipe, a batch scheduler): the same tqdm text as a plain line every `log_every` seconds and at the
end, so logs hold readable progress with an ETA instead of carriage-return clutter.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterable
from typing import Any, TextIO

import tqdm

LOG_EVERY_SECONDS = 30.0


def interactive() -> bool:
    return bool(sys.__stderr__ and sys.__stderr__.isatty())


class _Lines(io.TextIOBase):
    """What tqdm writes, as whole lines (tqdm redraws a line with '\\r'; a log wants new lines)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, s: str) -> int:
        text = s.replace("\r", "").rstrip()
        if text:
            self.stream.write(text + "\n")
            self.stream.flush()
        return len(s)

    def flush(self) -> None:
        self.stream.flush()


def bar(
    iterable: Iterable | None = None,
    *,
    total: float | None = None,
    desc: str = "",
    unit: str = "it",
    enabled: bool = True,
    leave: bool = False,
    log_every: float = LOG_EVERY_SECONDS,
    **kwargs: Any,
) -> tqdm.tqdm:
    if interactive():
        return tqdm.tqdm(
            iterable, total=total, desc=desc, unit=unit, disable=not enabled, leave=leave, file=sys.__stderr__,
            dynamic_ncols=True, **kwargs,
        )  # fmt: skip
    return tqdm.tqdm(
        iterable, total=total, desc=desc, unit=unit, disable=not enabled, leave=True, file=_Lines(sys.stdout),
        mininterval=log_every, maxinterval=log_every, ncols=0, **kwargs,
    )  # fmt: skip
