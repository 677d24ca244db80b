"""Find a ``@durable_execution`` handler from a reference the command line was given.

Two forms, both ``LEFT:QUALNAME``:

* ``package.module:handler`` imports the module (the current directory is on the path,
  as with ``python -m``);
* ``path/to/file.py:handler`` loads the file as a module named after it (``file``), with
  its directory on the path, like ``python path/to/file.py`` would, but without running
  its ``if __name__ == "__main__"`` block.

An execution records its handler as ``module:qualname``.  For a handler loaded from a
file, ``run`` also records the file (``ExecutionRecord.extra["source"]``), so ``resume``
finds it again from any directory.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType
from typing import Any

from durable_mp.execution import DurableFunction


class HandlerError(Exception):
    """The handler reference cannot be resolved; the message says why (one line)."""


def split_ref(ref: str) -> tuple[str, str]:
    left, sep, qualname = ref.rpartition(":")
    if not sep or not left or not qualname:
        raise HandlerError(f"handler reference {ref!r} must look like MODULE:HANDLER or path/to/file.py:HANDLER")
    return left, qualname


def is_path(left: str) -> bool:
    return left.endswith(".py") or os.sep in left or "/" in left


def _add_path(directory: str) -> None:
    if directory not in sys.path:
        sys.path.insert(0, directory)


def load_file(path: str) -> ModuleType:
    """Import a ``.py`` file as the module named after it (reusing it if already loaded)."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise HandlerError(f"no such file: {path}")
    name = os.path.splitext(os.path.basename(path))[0]
    if not name.isidentifier():
        raise HandlerError(f"{path}: the file name must be a valid Python module name")
    existing = sys.modules.get(name)
    if existing is not None:
        if os.path.abspath(getattr(existing, "__file__", "") or "") == path:
            return existing
        raise HandlerError(f"cannot load {path} as module {name!r}: a different module of that name is already "
                           f"imported ({getattr(existing, '__file__', 'built-in')}); rename the file")
    _add_path(os.path.dirname(path))
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise HandlerError(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before exec: pickling by reference and dataclasses need it
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        sys.modules.pop(name, None)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise HandlerError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    return module


def load_module(name: str, extra_paths: tuple[str, ...] = ()) -> ModuleType:
    for directory in (os.getcwd(), *extra_paths):
        if directory:
            _add_path(directory)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and name.startswith(exc.name):
            raise HandlerError(f"no module named {name!r} (searched the current directory and sys.path)") from exc
        raise HandlerError(f"importing {name!r} failed: ModuleNotFoundError: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - any failure of user code at import time
        raise HandlerError(f"importing {name!r} failed: {type(exc).__name__}: {exc}") from exc


def resolve(module: ModuleType, qualname: str, ref: str) -> DurableFunction:
    obj: Any = module
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise HandlerError(f"{ref}: module {module.__name__!r} has no attribute {qualname!r}") from None
    if not isinstance(obj, DurableFunction):
        raise HandlerError(f"{ref} is a {type(obj).__name__}, not a handler decorated with @durable_execution")
    return obj


def load_handler(
    ref: str, *, source: str | None = None, paths: tuple[str, ...] = ()
) -> tuple[DurableFunction, str | None]:
    """The handler named by ``ref`` and the file it was loaded from (None for a module ref).

    ``source`` is the file recorded for an execution started from a path: when it still
    exists it is loaded instead of importing ``ref``'s module by name, so ``resume`` works
    from any directory.  ``paths`` are extra directories to import module refs from.
    """
    left, qualname = split_ref(ref)
    if is_path(left):
        return resolve(load_file(left), qualname, ref), os.path.abspath(left)
    if source is not None and os.path.isfile(source):
        return resolve(load_file(source), qualname, ref), os.path.abspath(source)
    if left == "__main__":
        raise HandlerError(f"handler {ref!r} was defined in a script run as __main__, which cannot be imported "
                           f"again; name the script instead: --handler path/to/script.py:{qualname}")
    return resolve(load_module(left, paths), qualname, ref), None
