"""The handler of one ``durable_mp.map`` call: ``f(item)`` as a map function, wearing ``f``'s code.

A failed item's traceback leaves out this module's frame around the call of ``f``
(``map_errors.user_frames``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from durable_mp.context import DurableContext
from durable_mp.identity import code_functions


class CallPlain:
    """``f(item)`` as a map function ``(ctx, item, index, items)``; picklable when ``f`` is."""

    __slots__ = ("func",)

    def __init__(self, func: Callable[[Any], Any]) -> None:
        self.func = func

    def __call__(self, ctx: Any, item: Any, index: int, items: Any) -> Any:
        return self.func(item)

    def __getstate__(self) -> Callable[[Any], Any]:
        return self.func

    def __setstate__(self, func: Callable[[Any], Any]) -> None:
        self.func = func


class MapHandler:
    """The handler of one ``map`` call, wearing ``func``'s module and code fingerprint.

    ``identity.code_fingerprint`` reads ``__durable_code__``, so the execution records the
    code of *func* (bytecode and constants), which decides whether results are reused.
    """

    quiet_rerun = True  # map() itself says what a re-run does, in items

    def __init__(self, run: Callable[[Any, DurableContext], Any], func: Callable[..., Any], label: str,
                 code: str) -> None:
        self._body = run  # not "run": DurableFunction copies this __dict__ (functools.update_wrapper)
        self.__qualname__ = self.__name__ = f"durable_mp.map[{label}]"
        self.__durable_code__ = code
        fns = code_functions(func)  # a partial's function, a bound method's, a callable object's __call__
        if fns:
            self.__module__ = fns[0].__module__
            self.__code__ = fns[0].__code__  # a script's path: where `durable-mp list` says it came from
        else:  # a builtin: named by the module of durable_mp.map, as before this class moved here
            self.__module__ = "durable_mp.pmap"

    def __call__(self, event: Any, ctx: DurableContext) -> Any:
        return self._body(event, ctx)

    def __repr__(self) -> str:
        return f"<{self.__qualname__}>"
