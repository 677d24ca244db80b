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

import functools
import hashlib
import inspect
import marshal
import os
import sys
import types
from collections.abc import Callable
from typing import Any

from durable_mp.core.digest import NotHashableError, digest_of_parts, value_digest

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
    """A hash of the code behind ``func``: its module file, its ``-c`` program, or its source.

    A function can state its own (``__durable_code__``): ``durable_mp.map``'s handler does.
    """
    own = getattr(func, "__durable_code__", None)
    if isinstance(own, str):
        return own
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


MAX_DEPTH = 8  # of callables inside callables (a partial of a bound method, a closure over a helper)


def _where(func: Callable[..., Any]) -> str:
    """Where a plain function is defined: module and name, a script's path, which lambda or nested function.

    Not its source: fixing a notebook cell or a script keeps the computation the same
    (the code fingerprint tells the versions apart).
    """
    where = f"{func.__module__}:{func.__qualname__}"
    if func.__module__ == "__main__" and _has_file(func):
        where += ":" + os.path.abspath(func.__code__.co_filename)
    if "<" in func.__qualname__:  # a lambda or a nested function: which one, by where its code starts
        positions = getattr(func.__code__, "co_positions", None)  # Python 3.11+: the column too
        starts = [p for p in positions() if p[2] is not None] if positions is not None else []
        first = starts[1] if len(starts) > 1 else (starts or [(None,) * 4])[0]
        where += f"@{func.__code__.co_firstlineno}:{first[0]}:{first[2]}"
    return where


def _state(value: Any, where: str, depth: int) -> bytes:
    """A digest of a value a callable carries; a callable in it is named by its own identity.

    A module is named by its name, a class by where it is defined and its plain class
    attributes (a local class cannot be pickled, and its pickle would only name it anyway).
    """
    if isinstance(value, types.ModuleType):
        return b"module:" + value.__name__.encode()
    if isinstance(value, type):
        attrs = sorted((k, v) for k, v in vars(value).items() if type(v) in _PLAIN)
        return digest_of_parts(b"class", f"{value.__module__}:{value.__qualname__}".encode(),
                               value_digest(attrs, f"the attributes of class {value.__qualname__}"))
    if callable(value) and depth < MAX_DEPTH:
        try:
            return b"callable:" + callable_identity(value, depth + 1)
        except NotHashableError:
            raise
        except Exception:  # noqa: BLE001 - not a kind of callable we know: hashed as a value below
            pass
    return value_digest(value, where)


def callable_identity(func: Callable[..., Any], depth: int = 0, *, state: bool = True) -> bytes:
    """A digest of what decides ``func``'s results besides its code and its argument (DESIGN §2).

    Where it is defined (which lambda or nested function, too), its closure values and
    defaults, the instance behind a bound method, a ``partial``'s function and arguments,
    a callable object's class and state.  ``state=False`` leaves out every value (closure,
    defaults, instance, arguments): for callers that name the computation themselves.
    Raises ``NotHashableError`` naming a value that cannot be hashed.
    """
    name = getattr(func, "__qualname__", None) or type(func).__qualname__
    parts: list[bytes]
    if isinstance(func, functools.partial):
        parts = [b"partial", callable_identity(func.func, depth + 1, state=state)]
        if state:
            parts.append(value_digest(func.args, f"the arguments of partial({name})"))
            parts.append(value_digest(sorted(func.keywords.items()), f"the keywords of partial({name})"))
    elif isinstance(func, types.MethodType):
        parts = [b"method", callable_identity(func.__func__, depth + 1, state=state)]
        if state:
            parts.append(_state(func.__self__, f"the instance behind bound method {name}", depth))
    elif isinstance(func, types.FunctionType):
        parts = [b"function", _where(func).encode()]
        if state:
            for var, cell in zip(func.__code__.co_freevars, func.__closure__ or (), strict=False):
                try:
                    value = cell.cell_contents
                except ValueError:  # an empty cell: a variable assigned after the function was made
                    value = None
                parts.append(var.encode() + b"=" + _state(value, f"closure variable {var!r} of {name}", depth))
            for var, value in _plain_globals(func):
                parts.append(f"global {var}=".encode() + value_digest(value, f"global {var!r} of {name}"))
            parts.append(_state(func.__defaults__, f"the defaults of {name}", depth))
            parts.append(_state(func.__kwdefaults__, f"the keyword defaults of {name}", depth))
    elif isinstance(func, types.BuiltinFunctionType):  # by reference (and its instance, if bound)
        parts = [b"builtin", value_digest(func, f"builtin {name}")]
    else:  # a callable object: its class and its state
        cls = type(func)
        parts = [b"object", f"{cls.__module__}:{cls.__qualname__}".encode()]
        if state:
            parts.append(value_digest(func, f"the state of callable object {cls.__qualname__}"))
    return digest_of_parts(*parts)


_PLAIN = (int, float, complex, str, bytes, bool, type(None))


def _names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def _plain_globals(func: types.FunctionType) -> list[tuple[str, Any]]:
    """The module-level plain values (numbers, text) ``func`` reads: ``k`` in
    ``for k in ...: map(lambda x: x * k, ...)``."""
    found = []
    for name in sorted(_names(func.__code__)):
        value = func.__globals__.get(name, _MISSING)
        if type(value) in _PLAIN or (type(value) is tuple and all(type(v) in _PLAIN for v in value)):
            found.append((name, value))
    return found


def code_functions(func: Any) -> list[types.FunctionType]:
    """The Python functions whose code runs when ``func`` is called (none for a builtin)."""
    return _code_of(func)


def _code_of(func: Any, depth: int = 0) -> list[Any]:
    """The function objects whose code runs when ``func`` is called (not builtins)."""
    if depth > MAX_DEPTH:
        return []
    if isinstance(func, functools.partial):
        return _code_of(func.func, depth + 1)
    if isinstance(func, types.MethodType):
        return _code_of(func.__func__, depth + 1)
    if isinstance(func, types.FunctionType):
        return [func]
    call = type(func).__dict__.get("__call__") or getattr(type(func), "__call__", None)  # noqa: B004
    return [call] if isinstance(call, types.FunctionType) else []


def _feed_code(h: Any, code: types.CodeType, global_names: set[str]) -> None:
    h.update(code.co_code)
    h.update(repr((code.co_names, code.co_argcount, code.co_kwonlyargcount, code.co_flags)).encode())
    global_names.update(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            h.update(b"code{")
            _feed_code(h, const, global_names)
            h.update(b"}")
        else:
            h.update(value_digest(const, "a constant"))


def code_digest(func: Callable[..., Any]) -> str:
    """A hash of the code ``func`` runs: bytecode, constants and names, nested code included, lines not.

    A helper function of the same module that the code calls counts as its code too.
    Moving code, editing comments or blank lines does not change it.  (Plain global values
    it reads, ``FACTOR = 2``, are part of its identity instead: ``callable_identity``.)
    """
    h = hashlib.sha256()
    todo, seen = _code_of(func), set[int]()
    while todo:
        fn = todo.pop(0)
        if id(fn) in seen or len(seen) > 64:
            continue
        seen.add(id(fn))
        names: set[str] = set()
        h.update(f"{fn.__module__}:{fn.__qualname__}".encode())
        _feed_code(h, fn.__code__, names)
        for name in sorted(names):
            value = fn.__globals__.get(name, _MISSING)
            if isinstance(value, types.FunctionType) and value.__module__ == fn.__module__:
                todo.append(value)
    return "code:" + h.hexdigest()[:2 * DIGEST_BYTES]


_MISSING = object()

__all__ = ["callable_identity", "code_digest", "code_fingerprint", "code_functions", "handler_identity"]
