"""Whatever user code raises or returns, the branch ends with a clear error about that branch.

A fault matrix in the style of loky's: every stage where the engine formats or pickles a
user object (a branch raises, a step raises, a branch or step returns, a custom serdes
writes, a step run in a killable worker) crossed with every kind of bad object
(exceptions whose ``str()``/``repr()`` raise, exceptions that cannot be pickled or whose
pickling raises, results that cannot be pickled, serdes outputs that are not a payload),
at top level (branches in worker processes) and nested (branches on a worker's threads).
Nothing may hang (the timeout turns a hang into a failure), no worker may die for it,
and the neighbours of the bad branch finish intact.
"""

from __future__ import annotations

import threading

import pytest

from durable_mp import durable_execution
from durable_mp.config import CompletionConfig, MapConfig, ParallelConfig, StepConfig
from durable_mp.retries import RetryPresets
from durable_mp.serdes import SerDes

pytestmark = pytest.mark.timeout(60)

ALL_COMPLETED = CompletionConfig.all_completed()
NO_RETRY = RetryPresets.none()


class StrRaises(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ is broken")


class StrAndReprRaise(StrRaises):
    def __repr__(self) -> str:
        raise RuntimeError("__repr__ is broken")


class StrReturnsNonStr(Exception):
    def __str__(self):
        return 42


class HoldsALock(Exception):
    """Cannot be pickled."""

    def __init__(self) -> None:
        super().__init__("holds a lock")
        self.lock = threading.Lock()


class PicklingRaises(Exception):
    """Pickling it raises an exception that cannot be printed either."""

    def __init__(self) -> None:
        super().__init__("cannot be pickled either")

    def __reduce__(self):
        raise StrRaises()


class ResultPicklingRaises:
    def __reduce__(self):
        raise StrRaises()


def _raise(kind: str) -> None:
    if kind == "operation_error_fields":  # the user's own StepError, its fields not strings
        from durable_mp import StepError

        raise StepError(StrRaises(), "custom", data=HoldsALock(), stack_trace=[StrRaises()])
    raise {"str_raises": StrRaises, "str_and_repr_raise": StrAndReprRaise, "str_not_str": StrReturnsNonStr,
           "unpicklable_exc": HoldsALock, "pickling_raises_exc": PicklingRaises}[kind]()


def _value(kind: str):
    return {"unpicklable_result": threading.Lock, "pickling_raises_result": ResultPicklingRaises}[kind]()


class BadSerDes(SerDes):
    """A custom serdes whose ``serialize`` writes something that is not a payload, or raises
    (for every value, or only for ``only``: the other items of a map are written as text)."""

    def __init__(self, kind: str, only=None) -> None:
        self.kind = kind
        self.only = only

    def serialize(self, value, serdes_context):
        if self.kind == "deserialize_raises" or (self.only is not None and value != self.only):
            return str(value)
        if self.kind == "serdes_dict":
            return {"v": value}
        if self.kind == "serdes_int":
            return 7
        if self.kind == "serdes_list":
            return ["not", "bytes"]
        raise StrRaises()

    def deserialize(self, data, serdes_context):
        assert self.only is not None, "a value this serdes could not write is never read"
        if self.kind == "deserialize_raises" and data == str(self.only):
            raise StrRaises()
        return int(data)


EXCEPTIONS = ("str_raises", "str_and_repr_raise", "str_not_str", "unpicklable_exc", "pickling_raises_exc",
              "operation_error_fields")
RESULTS = ("unpicklable_result", "pickling_raises_result")
SERDES = ("serdes_dict", "serdes_int", "serdes_list", "serdes_raises")
READ_BACK = ("deserialize_raises",)  # the item's payload is written, reading it back raises

# What the bad branch's error must say: its type (last dotted part) and texts in its message.
# A message must name the exception's type when its text cannot be had.
RAISED = {
    "str_raises": ("StrRaises", ["str() raised RuntimeError"]),
    "str_and_repr_raise": ("StrAndReprRaise", ["str() raised RuntimeError"]),
    "str_not_str": ("StrReturnsNonStr", ["str() raised TypeError"]),
    "unpicklable_exc": ("HoldsALock", ["holds a lock"]),
    "pickling_raises_exc": ("PicklingRaises", ["cannot be pickled either"]),
    "operation_error_fields": ("StepError", ["StrRaises object: str() raised RuntimeError"]),
}
RETURNED = {
    "unpicklable_result": ["Cannot serialize result of", "_thread.lock"],
    "pickling_raises_result": ["Cannot serialize result of", "ResultPicklingRaises", "StrRaises"],
}
SERIALIZED = {
    "serdes_dict": ["BadSerDes", "returned builtins.dict", "str or bytes"],
    "serdes_int": ["BadSerDes", "returned builtins.int", "str or bytes"],
    "serdes_list": ["BadSerDes", "returned builtins.list", "str or bytes"],
    "serdes_raises": ["BadSerDes", "StrRaises", "str() raised RuntimeError"],
    "deserialize_raises": ["Cannot deserialize result of branch 1", "BadSerDes", "StrRaises",
                           "str() raised RuntimeError"],
}


def _step_of(stage: str, kind: str):
    if stage == "step_raises":
        def body(_):
            _raise(kind)
        return body, StepConfig(retry_strategy=NO_RETRY)
    if stage == "step_returns":
        return (lambda _: _value(kind)), StepConfig(retry_strategy=NO_RETRY)
    assert stage == "step_serdes"
    return (lambda _: "fine"), StepConfig(retry_strategy=NO_RETRY, serdes=BadSerDes(kind))


def _bad_branch(stage: str, kind: str):
    if stage == "branch_raises":
        return lambda ctx: _raise(kind)
    if stage == "branch_returns":
        return lambda ctx: _value(kind)
    body, config = _step_of(stage, kind)
    return lambda ctx: ctx.step(body, name="bad-step", config=config)


def _expected(stage: str, kind: str) -> tuple[str, list[str]]:
    """(error type, texts) the bad branch's error must show."""
    if stage == "branch_raises":
        return RAISED[kind]
    if stage == "branch_serdes":
        return "SerDesError", ["result of branch 1", *SERIALIZED[kind]]
    if stage == "branch_deserialize":
        return "SerDesError", SERIALIZED[kind]
    if stage == "branch_returns":
        return "SerDesError", [RETURNED[kind][0] + " branch 1", *RETURNED[kind][1:]]
    if stage == "step_raises":
        return "StepError", RAISED[kind][1]
    if stage == "step_returns":
        return "SerDesError", [RETURNED[kind][0] + " step 'bad-step'", *RETURNED[kind][1:]]
    return "SerDesError", ["result of step 'bad-step'", *SERIALIZED[kind]]


CASES = ([("branch_raises", k) for k in EXCEPTIONS] + [("branch_returns", k) for k in RESULTS]
         + [("branch_serdes", k) for k in SERDES] + [("branch_deserialize", k) for k in READ_BACK]
         + [("step_raises", k) for k in EXCEPTIONS]
         + [("step_returns", k) for k in RESULTS] + [("step_serdes", k) for k in SERDES])


def _summary(result) -> list[tuple]:
    return [(it.status.value, it.result, it.error and it.error.type, it.error and it.error.message,
             it.error and "".join(it.error.stack_trace or ())) for it in result.all]


def _batch(ctx, stage: str, kind: str):
    """Three branches, the middle one bad: a map when the item serdes is the fault, else a parallel."""
    if stage in ("branch_serdes", "branch_deserialize"):
        return ctx.map([0, 1, 2], lambda c, x, i, xs: x,
                       config=MapConfig(completion_config=ALL_COMPLETED, item_serdes=BadSerDes(kind, only=1)))
    good = [lambda c, i=i: i for i in range(3)]
    return ctx.parallel([good[0], _bad_branch(stage, kind), good[2]],
                        config=ParallelConfig(completion_config=ALL_COMPLETED))


@pytest.mark.parametrize("level", ["top", "nested"])
@pytest.mark.parametrize("stage,kind", CASES)
def test_a_bad_user_object_fails_only_its_branch_with_a_clear_error(stage, kind, level, store_path):
    @durable_execution
    def handler(event, ctx):
        if level == "top":
            return _summary(_batch(ctx, stage, kind))
        outer = ctx.parallel([lambda c: _summary(_batch(c, stage, kind))],
                             config=ParallelConfig(completion_config=ALL_COMPLETED))
        assert outer.all[0].error is None, outer.all[0].error
        return outer.all[0].result

    items = handler.run(None, store=store_path, skip_time=True)
    assert [(s, r) for s, r, _, _, _ in items] == [("SUCCEEDED", 0), ("FAILED", None), ("SUCCEEDED", 2)]
    _, _, error_type, message, trace = items[1]
    expected_type, texts = _expected(stage, kind)
    assert error_type.rsplit(".", 1)[-1] == expected_type, (error_type, message)
    for text in texts:
        assert text in message, (text, message)
    if stage.endswith("_raises") and kind != "operation_error_fields":  # the traceback names the user's
        # exception and where it was raised (an operation error carries its own, here a list of one non-str)
        assert RAISED[kind][0] in trace and "in _raise" in trace, trace
    assert "crashed its worker" not in message


@pytest.mark.parametrize("stage,kind", [("step_raises", k) for k in EXCEPTIONS]
                         + [("step_returns", k) for k in RESULTS])
def test_a_bad_user_object_in_a_root_step_run_by_a_worker_fails_the_step(stage, kind, store_path):
    """A root step with a timeout runs in a worker (``RunCall``) so it can be killed."""
    from durable_mp import SerDesError, StepError

    body, config = _step_of(stage, kind)
    config = StepConfig(retry_strategy=NO_RETRY, timeout=60)

    @durable_execution
    def handler(event, ctx):
        try:
            ctx.step(body, name="bad-step", config=config)
        except (StepError, SerDesError) as exc:
            return type(exc).__name__, exc.message, "".join(exc.stack_trace or ())
        return "no error", "", ""

    error_type, message, trace = handler.run(None, store=store_path, skip_time=True)
    if stage == "step_raises":
        expected_type, texts = RAISED[kind]
        assert error_type == "StepError"
        for text in texts:
            assert text in message, (text, message)
        assert expected_type in trace or kind == "operation_error_fields", trace
    else:
        assert error_type == "SerDesError", message
        for text in ["Cannot serialize result of", *RETURNED[kind][1:]]:
            assert text in message, (text, message)
    assert "died" not in message


@pytest.mark.parametrize("kind", RESULTS)
def test_a_handler_result_that_cannot_be_stored_fails_the_execution_naming_it(kind, store_path):
    """Not RUNNING forever: the execution ends FAILED, its error names the handler's result and its type."""
    from durable_mp.exceptions import ExecutionFailedError
    from durable_mp.store.facade import Store

    @durable_execution
    def handler(event, ctx):
        ctx.step(lambda _: 1, name="one")
        return _value(kind)

    for run in range(2):  # a re-run (fix-and-resume of the FAILED execution) fails the same clear way
        with pytest.raises(ExecutionFailedError) as caught:
            handler.run(None, store=store_path, execution_id="bad-result")
        error = caught.value.error
        assert error.type.rsplit(".", 1)[-1] == "SerDesError", (run, error)
        for text in ["handler's result", *RETURNED[kind][1:]]:
            assert text in error.message, (run, text, error.message)
        with Store(store_path) as db:
            rec = db.get_execution("bad-result")
        assert rec.status == "FAILED" and rec.error["ErrorMessage"] == error.message


def _raise_base(kind: str) -> None:
    raise {"keyboard_interrupt": KeyboardInterrupt, "system_exit": SystemExit,
           "generator_exit": GeneratorExit}[kind]("user raised it")


@pytest.mark.parametrize("level", ["top", "nested"])
@pytest.mark.parametrize("where", ["branch", "step"])
@pytest.mark.parametrize("kind", ["keyboard_interrupt", "system_exit", "generator_exit"])
def test_a_base_exception_raised_by_user_code_in_a_worker_fails_only_its_branch(kind, where, level, store_path):
    """A worker ignores SIGINT's KeyboardInterrupt (its signals are the defaults: a signal kills it), so one
    raised there was raised by the user's code: like SystemExit, it fails that branch, not the worker."""
    def bad(ctx):
        if where == "branch":
            _raise_base(kind)
        return ctx.step(lambda _: _raise_base(kind), name="bad-step", config=StepConfig(retry_strategy=NO_RETRY))

    def batch(ctx):
        return _summary(ctx.parallel([lambda c: 0, bad, lambda c: 2],
                                     config=ParallelConfig(completion_config=ALL_COMPLETED)))

    @durable_execution
    def handler(event, ctx):
        if level == "top":
            return batch(ctx)
        return ctx.parallel([batch], config=ParallelConfig(completion_config=ALL_COMPLETED)).all[0].result

    items = handler.run(None, store=store_path, skip_time=True)
    assert [(s, r) for s, r, _, _, _ in items] == [("SUCCEEDED", 0), ("FAILED", None), ("SUCCEEDED", 2)]
    _, _, error_type, message, trace = items[1]
    expected = {"keyboard_interrupt": "KeyboardInterrupt", "system_exit": "SystemExit",
                "generator_exit": "GeneratorExit"}[kind]
    assert error_type.rsplit(".", 1)[-1] == expected and message == "user raised it", (error_type, message)
    assert "_raise_base" in trace


def test_an_event_that_cannot_be_stored_is_refused_naming_it_and_records_nothing(store_path):
    from durable_mp import SerDesError
    from durable_mp.store.facade import Store

    @durable_execution
    def handler(event, ctx):
        return "ran"

    with pytest.raises(SerDesError, match=r"handler's event \(value of type _thread.lock\)"):
        handler.run(threading.Lock(), store=store_path, execution_id="bad-event")
    with Store(store_path) as db:
        assert db.get_execution("bad-event") is None
    assert handler.run(None, store=store_path, execution_id="bad-event") == "ran"  # nothing was left locked
