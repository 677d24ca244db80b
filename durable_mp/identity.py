"""Who a handler is, for its default execution id, and what its code is, for re-run notices.

A default execution id must name the same handler in every process that runs the same
program, and different handlers in different programs:

- a handler in a module or script file is named by its module, qualified name and, for
  a script (``__main__``), the script's absolute path (the ids scripts always had);
- a ``python -c`` program has no file: it is named by its program text;
- in IPython and Jupyter ``co_filename`` holds the cell number or the kernel's temp file
  (with its pid), which a kernel restart changes: the handler is named by its source text.

The code fingerprint hashes what a change to the handler's behaviour most likely touches:
the file the handler lives in (its helpers included), the ``-c`` program text, or the
handler's own source; a stored result computed by other code is then reported as such.
"""

from __future__ import annotations

import hashlib
import inspect
import marshal
import os
import sys
from collections.abc import Callable
from typing import Any

DIGEST_BYTES = 8  # of the blake2b hashes below: 16 hex characters


def _hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).hexdigest()


def _inline_program() -> str | None:
    """The program text of ``python -c TEXT``, or None when this process runs something else."""
    if not sys.argv or sys.argv[0] != "-c":
        return None
    argv = list(getattr(sys, "orig_argv", ()))
    if "-c" in argv and argv.index("-c") + 1 < len(argv):
        return str(argv[argv.index("-c") + 1])
    return None


def _has_file(func: Callable[..., Any]) -> bool:
    """Whether ``func`` was defined in a file that names it stably (not ``-c``, a REPL or a notebook cell)."""
    if func.__module__ != "__main__":
        return True
    main = sys.modules.get("__main__")
    return getattr(main, "__file__", None) is not None and not _looks_interactive(func)


def _looks_interactive(func: Callable[..., Any]) -> bool:
    filename = getattr(getattr(func, "__code__", None), "co_filename", "")
    return filename.startswith("<") or "ipykernel_" in filename


def _source(func: Callable[..., Any]) -> str | None:
    try:
        return inspect.getsource(func)
    except (OSError, TypeError):
        return None


def _code_bytes(func: Callable[..., Any]) -> bytes:
    """Last resort (a plain REPL): the code object, without the file name that varies."""
    code = getattr(func, "__code__", None)
    if code is None:
        return repr(func).encode()
    return marshal.dumps(code.replace(co_filename=""))


def handler_identity(func: Callable[..., Any]) -> str:
    """The text the default execution id hashes to name ``func`` (see the module docstring)."""
    where = f"{func.__module__}:{func.__qualname__}"
    if func.__module__ != "__main__":
        return where
    if _has_file(func):
        return where + ":" + os.path.abspath(getattr(func.__code__, "co_filename", ""))
    program = _inline_program()
    if program is not None:
        return f"{where}:-c:{_hash(program.encode())}"
    source = _source(func)
    if source is not None:
        return f"{where}:source:{_hash(inspect.cleandoc(source).encode())}"
    return f"{where}:code:{_hash(_code_bytes(func))}"


def code_fingerprint(func: Callable[..., Any]) -> str:
    """A hash of the code behind ``func``: its module file, its ``-c`` program, or its source."""
    if _has_file(func):
        filename = getattr(getattr(func, "__code__", None), "co_filename", None)
        module = sys.modules.get(func.__module__)
        filename = getattr(module, "__file__", None) or filename
        if filename:
            try:
                with open(filename, "rb") as f:
                    return "file:" + _hash(f.read())
            except OSError:
                pass
    program = _inline_program()
    if program is not None and func.__module__ == "__main__":
        return "-c:" + _hash(program.encode())
    source = _source(func)
    if source is not None:
        return "source:" + _hash(source.encode())
    return "code:" + _hash(_code_bytes(func))


__all__ = ["code_fingerprint", "handler_identity"]
