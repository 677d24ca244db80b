"""The root of durable_mp's exception tree, low enough for ``core`` to raise it.

``core`` values validate themselves (``CompletionDecision`` raises ``ValidationError``),
but ``exceptions`` sits above ``core``: it names ``CompletionReason``.  So the root
classes live here, and ``exceptions`` re-exports them; users import them from there.
Their ``__module__`` is the public one, so error type names in checkpoints and
tracebacks read ``durable_mp.exceptions.ValidationError`` wherever the class lives.

``ErrorDetails`` is what an exception may read of a ``lambda_service.ErrorObject``,
which sits above ``exceptions`` (it rebuilds operation errors).
"""

from __future__ import annotations

from typing import Any, Protocol

PUBLIC_MODULE = "durable_mp.exceptions"


def _rebuild(cls: type[BaseException], args: tuple[Any, ...]) -> BaseException:
    error = cls.__new__(cls, *args)
    error.args = args
    return error


class PickleByState:
    """Pickle by state, not by re-calling ``__init__``.

    Errors travel from workers to the driver; the default reduction calls
    ``cls(*self.args)``, which breaks for constructors such as
    ``BatchCompletionError(completion_reason, message)`` or ``UnrecoverableError``.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.args), self.__dict__)  # type: ignore[attr-defined]


class DurableExecutionsError(PickleByState, Exception):
    """Base of every error durable_mp raises on purpose."""

    __module__ = PUBLIC_MODULE


class ValidationError(DurableExecutionsError):
    """Bad arguments to a durable operation or config; raised before anything runs."""

    __module__ = PUBLIC_MODULE


class InvalidStateError(DurableExecutionsError):
    """An object was asked to make a transition its state does not allow."""

    __module__ = PUBLIC_MODULE


class ErrorDetails(Protocol):
    """A checkpointed failure, as ``lambda_service.ErrorObject`` (which imports ``exceptions``) is."""

    @property
    def message(self) -> str | None: ...

    @property
    def type(self) -> str | None: ...

    @property
    def data(self) -> str | None: ...

    @property
    def stack_trace(self) -> list[str] | None: ...

    def to_dict(self) -> dict[str, Any]: ...


__all__ = ["DurableExecutionsError", "ErrorDetails", "InvalidStateError", "PickleByState", "ValidationError"]


class InvariantError(RuntimeError):
    """durable_mp was about to break one of its own invariants (docs/architecture.md "Invariants"): an internal error.

    Raised where the state lives (the store, the driver's intake of worker messages) instead
    of applying the change, so a bug shows up at the spot, not as a lost or doubled result.
    """
