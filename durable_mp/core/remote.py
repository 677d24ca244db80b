"""What a worker-side traceback says, read back from its checkpointed text.

A failure that happened in a worker (or in an earlier run) reaches the user only as the
strings of an ``ErrorObject``: the original exception object is gone.  This module turns
those strings back into something a person can act on: a ``RemoteTraceback`` exception
to hang in a ``__cause__`` chain (shown the way ``concurrent.futures`` shows its
``_RemoteTraceback``), the original exception's type, and the user's frame
(``file:line in function``) for one-line log messages.
"""

from __future__ import annotations

import functools
import os
import re
import sysconfig
from collections.abc import Sequence
from typing import NamedTuple

from durable_mp.core.errors import PUBLIC_MODULE

# ``  File "/path/x.py", line 3, in f`` as ``traceback.format_exception`` writes a frame.
_FRAME = re.compile(r'^  File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>.+)$')
# An exception line: ``ZeroDivisionError: ...`` or ``mod.Error`` alone.
_EXCEPTION_LINE = re.compile(r"^(?P<type>[A-Za-z_][\w.]*)(?::\s?(?P<message>.*))?$")

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


@functools.lru_cache(maxsize=1)
def _library_dirs() -> tuple[str, ...]:
    """Where the standard library and installed packages live: their frames are rarely the line to fix.

    Computed on first use: ``sysconfig.get_paths()`` costs ~10 ms, too much for every import.
    """
    paths = {sysconfig.get_paths().get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    return tuple(os.path.abspath(p) + os.sep for p in paths if p)


class Frame(NamedTuple):
    file: str
    line: int
    func: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line} in {self.func}"


class RemoteTraceback(Exception):
    """The traceback of a failure in another process, as text: the ``__cause__`` of the error raised here."""

    __module__ = PUBLIC_MODULE

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb.rstrip()}\n"""'

    def __reduce__(self) -> tuple[type[RemoteTraceback], tuple[str]]:
        return (RemoteTraceback, (self.tb,))


def traceback_text(stack_trace: Sequence[str] | None) -> str:
    """The stored lines of a traceback joined as ``traceback.format_exception`` printed them."""
    return "".join(stack_trace or ())


def is_traceback(stack_trace: Sequence[str] | None) -> bool:
    """True when ``stack_trace`` holds a formatted traceback (not just some lines someone stored)."""
    return any(line.startswith("Traceback (most recent call last)") for line in stack_trace or ())


def remote_traceback(stack_trace: Sequence[str] | None) -> RemoteTraceback | None:
    """A ``RemoteTraceback`` for a stored traceback, or None when there is none to show."""
    return RemoteTraceback(traceback_text(stack_trace)) if is_traceback(stack_trace) else None


def _lines(stack_trace: Sequence[str] | None) -> list[str]:
    return traceback_text(stack_trace).splitlines()


def origin_type(stack_trace: Sequence[str] | None) -> str | None:
    """The type of the exception the traceback ends with (the outermost one of a chain).

    The exception line is the first unindented line after a block of frames; notes and
    multi-line messages come after it without frames in between, so they are skipped.
    """
    found = None
    after_frames = False
    for line in _lines(stack_trace):
        if line.startswith(" "):
            after_frames = True
            continue
        if after_frames:
            match = _EXCEPTION_LINE.match(line)
            if match:
                found = match.group("type")
        after_frames = False
    return found


def _frames(stack_trace: Sequence[str] | None) -> list[Frame]:
    frames = []
    for line in _lines(stack_trace):
        match = _FRAME.match(line)
        if match:
            frames.append(Frame(match.group("file"), int(match.group("line")), match.group("func")))
    return frames


def user_frame(stack_trace: Sequence[str] | None) -> Frame | None:
    """The innermost frame of the user's own code in a stored traceback.

    Frames of durable_mp itself, of the standard library and of installed packages are
    skipped; when nothing else is left, the innermost frame outside durable_mp (else the
    innermost frame) is the best there is.
    """
    frames = _frames(stack_trace)
    if not frames:
        return None
    outside = [f for f in frames if not os.path.abspath(f.file).startswith(_PACKAGE_DIR)]
    own = [f for f in outside
           if not os.path.abspath(f.file).startswith(_library_dirs()) and not f.file.startswith("<frozen")]
    return (own or outside or frames)[-1]


def origin_note(error_type: str | None, stack_trace: Sequence[str] | None, message: str | None = None) -> str:
    """`` (raised as ZeroDivisionError at /path/job.py:12 in f)``: what a one-line error hides.

    The original type is named when the stored type is another (a ``ChildContextError``
    wrapping it) and the message does not name it already; empty when the stored failure
    has no traceback.
    """
    origin = origin_type(stack_trace)
    frame = user_frame(stack_trace)
    parts = []
    if (origin and origin != error_type and not (error_type or "").endswith("." + origin)
            and f"{origin}:" not in (message or "")):
        parts.append(f"raised as {origin}")
    if frame is not None:
        parts.append(f"at {frame}")
    return f" ({' '.join(parts)})" if parts else ""


__all__ = ["Frame", "RemoteTraceback", "is_traceback", "origin_note", "origin_type", "remote_traceback",
           "traceback_text", "user_frame"]
