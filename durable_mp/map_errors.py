"""What a failed or interrupted ``durable_mp.map`` raises.

A failed item raises the function's own exception type (``except KeyError:`` catches it),
with the item's ``index``, a note saying which item failed, and the worker's traceback
as its cause.  Ctrl-C raises ``MapInterrupted`` after one line saying how to resume, and
an uncaught one prints nothing more.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import sys
from typing import Any

from durable_mp import map_handler
from durable_mp.core.remote import remote_traceback
from durable_mp.exceptions import ChildContextError
from durable_mp.lambda_service import ErrorObject

_NOTE = "durable_mp.map: item {index} of {total} failed (execution {exec_id!r}); fix it and run the same call to resume"


def _exception_type(name: str | None) -> type[BaseException] | None:
    if not name:
        return None
    module, _, qual = name.rpartition(".")
    try:
        obj: Any = importlib.import_module(module) if module else builtins
        for part in qual.split("."):
            obj = getattr(obj, part)
    except Exception:  # noqa: BLE001 - not importable here: the caller falls back
        return None
    return obj if isinstance(obj, type) and issubclass(obj, Exception) else None


def item_error(err: ErrorObject, index: int, total: int, exec_id: str) -> BaseException:
    """The function's exception for a failed item: its own type (``except KeyError:`` catches it), the
    worker's traceback as its cause, ``index`` set and a note saying which item failed."""
    cls = _exception_type(err.type)
    message = err.message or ""
    error: BaseException
    if cls is None:
        error = ChildContextError(message=f"{err.type}: {message}" if err.type else message, error_type=err.type,
                                  data=err.data, stack_trace=err.stack_trace)
    else:
        args: tuple[Any, ...] = (message,)
        if issubclass(cls, KeyError):  # str(KeyError(k)) is repr(k): give the key back
            try:
                args = (ast.literal_eval(message),)
            except (ValueError, SyntaxError):
                pass
        try:
            error = cls(*args)
        except Exception:  # noqa: BLE001 - an __init__ with other arguments: keep the message
            error = cls.__new__(cls)
            error.args = args
    note = _NOTE.format(index=index, total=total, exec_id=exec_id)
    if hasattr(error, "add_note"):  # Python 3.11+
        error.add_note(note)
    else:
        error.__notes__ = [note]  # type: ignore[attr-defined]
    error.index = index  # type: ignore[attr-defined]
    error.__cause__ = remote_traceback(user_frames(err.stack_trace))
    return error


class MapInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a ``map``; the line saying how to resume was already printed.

    Uncaught, it prints nothing more (no traceback of durable_mp's internals): see
    ``_quiet_interrupts``.  Caught as ``KeyboardInterrupt`` it is one.
    """


def _quiet_excepthook(previous: Any) -> Any:
    def hook(cls: type[BaseException], exc: BaseException, tb: Any) -> None:
        if not isinstance(exc, MapInterrupted):
            previous(cls, exc, tb)
    hook.durable_mp_quiet = True  # type: ignore[attr-defined]
    return hook


def quiet_interrupts() -> None:
    """An uncaught ``MapInterrupted`` shows only the line already printed, in scripts and in IPython."""
    if not getattr(sys.excepthook, "durable_mp_quiet", False):
        sys.excepthook = _quiet_excepthook(sys.excepthook)
    ipython = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    if ipython is not None and hasattr(ipython, "set_custom_exc"):
        ipython.set_custom_exc((MapInterrupted,), lambda shell, etype, value, tb, tb_offset=None: None)


def user_frames(stack_trace: list[str] | None) -> list[str] | None:
    """The worker's traceback without durable_mp's own frame around the call of the function."""
    if not stack_trace:
        return stack_trace
    here = f'  File "{map_handler.__file__}"'
    out: list[str] = []
    skipping = False
    for entry in stack_trace:
        if entry.startswith("  File "):
            skipping = entry.startswith(here)
        elif not entry.startswith("    "):
            skipping = False
        if not skipping:
            out.append(entry)
    return out


__all__ = ["MapInterrupted", "item_error", "quiet_interrupts", "user_frames"]
