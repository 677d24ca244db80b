"""Progress of running parallel/map calls: a tqdm bar on a terminal or in a notebook, nothing otherwise.

The dispatcher calls ``bar.item(ok)`` once per finished branch; the null bar makes that a
no-op method call, and the tqdm bar only redraws at tqdm's own rate, so progress never
shows up on the hot path.

While a bar is shown on a terminal, log records written to the same terminal by
``logging`` stream handlers (the root logger's, or ``logging.lastResort`` when nobody
configured logging) go through ``tqdm.write``, which clears the bar, prints the line and
redraws it, instead of breaking the bar in two.  A resumed batch starts its bar at the
stored done and failed counts.  In Jupyter (where stderr is not a terminal) the bar is
``tqdm.notebook``'s widget when ipywidgets is installed, else tqdm's text bar, which the
notebook shows in the cell's output.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import threading
from typing import Any

REDRAW_SECONDS = 0.2  # tqdm's mininterval: at most five redraws a second


class NullBar:
    def item(self, succeeded: bool) -> None:
        pass

    def succeeded(self, count: int) -> None:
        pass

    def close(self) -> None:
        pass


NULL_BAR = NullBar()


class NullProgress:
    def start(self, name: str, total: int, done: int = 0, failed: int = 0) -> NullBar:
        return NULL_BAR


class _TqdmStream:
    """A stream for a log handler: each record is written with ``tqdm.write`` above the bar."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        from tqdm import tqdm

        tqdm.write(text.rstrip("\n"), file=self.stream)

    def flush(self) -> None:
        self.stream.flush()


class _LogRedirect:
    """Route console log handlers through ``tqdm.write`` while at least one bar is shown."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bars = 0
        self.swapped: list[tuple[logging.StreamHandler[Any], Any]] = []
        self.last_resort: logging.Handler | None = None

    def enter(self, stream: Any) -> None:
        with self.lock:
            self.bars += 1
            if self.bars > 1:
                return
            consoles = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
            for handler in logging.getLogger().handlers:
                if type(handler) is logging.StreamHandler and handler.stream in consoles:
                    self.swapped.append((handler, handler.stream))
                    handler.setStream(_TqdmStream(handler.stream))
            if logging.lastResort is not None and not logging.getLogger().handlers:
                self.last_resort = logging.lastResort
                replacement = logging.StreamHandler(_TqdmStream(stream))
                replacement.setLevel(self.last_resort.level)
                logging.lastResort = replacement

    def leave(self) -> None:
        with self.lock:
            self.bars -= 1
            if self.bars > 0:
                return
            for handler, stream in self.swapped:
                if isinstance(handler.stream, _TqdmStream):  # nobody replaced it meanwhile
                    handler.setStream(stream)
            self.swapped = []
            if self.last_resort is not None:
                logging.lastResort = self.last_resort
                self.last_resort = None


_REDIRECT = _LogRedirect()


class TqdmBar:
    """One bar per batch: done / failed counts, rate and ETA."""

    def __init__(self, name: str, total: int, done: int, stream: Any, failed: int = 0, notebook: bool = False) -> None:
        if notebook:
            from tqdm.notebook import tqdm
        else:
            from tqdm import tqdm

        self.failed = failed
        self.bar = tqdm(total=total, initial=done, desc=name, file=stream, unit="item", leave=True,
                        dynamic_ncols=True, mininterval=REDRAW_SECONDS)
        if failed:
            self.bar.set_postfix(failed=failed, refresh=True)
        self.redirected = not notebook
        if self.redirected:
            _REDIRECT.enter(stream)

    def item(self, succeeded: bool) -> None:
        if not succeeded:
            self.failed += 1
            self.bar.set_postfix(failed=self.failed, refresh=False)
        self.bar.update(1)

    def succeeded(self, count: int) -> None:
        """``count`` branches succeeded (one update for a message's worth of map items)."""
        self.bar.update(count)

    def close(self) -> None:
        self.bar.close()
        if self.redirected:
            self.redirected = False
            _REDIRECT.leave()


class TqdmProgress:
    def __init__(self, stream: Any = None, notebook: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.notebook = notebook

    def start(self, name: str, total: int, done: int = 0, failed: int = 0) -> Any:
        try:
            return TqdmBar(name, total, done, self.stream, failed=failed, notebook=self.notebook)
        except ImportError:
            return NULL_BAR


def in_notebook() -> bool:
    """True inside a Jupyter kernel (IPython's ZMQ shell), where stderr is no terminal but a bar shows."""
    ipython = sys.modules.get("IPython")
    if ipython is None or "ipykernel" not in sys.modules:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:  # noqa: BLE001 - any odd IPython state: not a notebook
        return False
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def _has_widgets() -> bool:
    """tqdm.notebook draws an ipywidgets widget; without ipywidgets, tqdm's text bar is shown instead."""
    return importlib.util.find_spec("ipywidgets") is not None


def choose(progress: bool | None) -> Any:
    """``True``: always; ``False``: never; ``None``: when stderr is a terminal or in a Jupyter notebook."""
    notebook = in_notebook()
    if progress is None:
        progress = notebook or sys.stderr.isatty()
    if not progress:
        return NullProgress()
    return TqdmProgress(notebook=notebook and _has_widgets())
