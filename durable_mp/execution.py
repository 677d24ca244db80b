"""``@durable_execution`` and the lifecycle of one execution.

An execution is named by ``execution_id`` (derived from the handler and its input when
omitted, so re-running the same command resumes it).  ``run`` takes the execution's lock
in the store, replays the handler from the top (finished operations return their
checkpoints), and records the outcome.  A finished execution is never run again: its
stored result (or failure) is returned, like an execution name in the reference service.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import cloudpickle

from durable_mp import rerun as _rerun
from durable_mp.context import DurableContext
from durable_mp.core.canonical import NotCanonicalError, canonical_bytes
from durable_mp.core.text import safe_str, type_name
from durable_mp.core.vocabulary import FAILED, PICKLE_PROTOCOL, RUNNING, SUCCEEDED
from durable_mp.engine import progress as _progress
from durable_mp.engine.dispatcher import DEFAULT_MAX_CRASH_RETRIES, Dispatcher
from durable_mp.engine.driver import DriverState
from durable_mp.engine.pool import WorkerPool
from durable_mp.engine.result_blobs import STORE_KEY
from durable_mp.engine.start import check_start_method, early_workers
from durable_mp.exceptions import ExecutionFailedError, SerDesError, ValidationError
from durable_mp.identity import code_fingerprint, handler_identity
from durable_mp.lambda_service import ErrorObject, InvocationStatus  # noqa: F401 - the reference re-exports it here
from durable_mp.operation.signature import check_callable
from durable_mp.store.callbacks import poll_callback
from durable_mp.store.env import resolve_store_path
from durable_mp.store.facade import ExecutionRecord, Store
from durable_mp.store.records import this_process

# Start methods whose workers start when the execution does, not at its first parallel/map.
# Not fork: a forked worker is a copy of the driver when it forks, and a handler's first steps
# may set what its branches read (fork is fast enough to start at the first batch, bench ``start``).
EARLY_START_METHODS = frozenset({"forkserver", "spawn"})


def dumps_value(value: Any) -> bytes:
    """Pickle an event or result for the execution record (cloudpickle for lambdas, local classes)."""
    try:
        return pickle.dumps(value, protocol=PICKLE_PROTOCOL)
    except Exception:  # noqa: BLE001 - lambdas, local classes
        return cloudpickle.dumps(value, protocol=PICKLE_PROTOCOL)


def _dumps_result(result: Any, what: str = "result") -> bytes:
    """The handler's result (or event) pickled for the execution record, or a ``SerDesError`` naming it.

    A result that cannot be pickled is the handler's error, so the execution ends FAILED
    instead of staying RUNNING; an event that cannot be is refused before anything is recorded.
    """
    try:
        return dumps_value(result)
    except Exception as error:
        raise SerDesError(f"Cannot serialize the handler's {what} (value of type {type_name(result)}) for the "
                          f"execution record: {type(error).__name__}: {safe_str(error)}") from error


def _digest(handler: Callable, event: Any) -> str:
    """Hash of which handler (``identity.handler_identity``) and which event.

    The event is encoded canonically (``core.canonical``), so the hash is the same in every
    process and under every hash seed; an event that has no such encoding is refused.
    """
    where = handler_identity(handler)
    try:
        data = canonical_bytes(event, "event")
    except NotCanonicalError as exc:
        raise ValidationError(
            f"cannot derive a default execution id: {exc}, so it would not encode the same way in every "
            f"process and re-running the same command would not resume. Pass an explicit "
            f"execution_id=... to run() (or use an event of plain values: str, int, float, bool, None, "
            f"bytes, lists, tuples, dicts, sets, dates, Decimal, UUID, paths, enums, dataclasses)") from exc
    return hashlib.blake2b(where.encode() + b"\0" + data, digest_size=8).hexdigest()


def _jsonable(value: Any) -> Any:
    """``json.dumps`` fallback for the envelope: BatchResult and dataclasses become dicts."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def envelope_of(result: Any) -> dict:
    """A successful result as the envelope; a result JSON cannot encode fails it (as the reference)."""
    try:
        return {"Status": SUCCEEDED, "Result": json.dumps(result, default=_jsonable)}
    except (TypeError, ValueError) as exc:
        return {"Status": FAILED, "Error": ErrorObject.from_exception(exc).to_dict()}


def _positive(name: str, value: Any) -> None:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ValidationError(f"{name} must be a positive integer, got {value!r}")


class DurableFunction:
    """A handler made durable. Call ``.run(event)`` for the result, or call it for the envelope."""

    def __init__(self, func: Callable[[Any, DurableContext], Any], **options: Any) -> None:
        functools.update_wrapper(self, func)
        self.func = func
        self.options = options

    @property
    def handler_ref(self) -> str:
        return f"{self.func.__module__}:{self.func.__qualname__}"

    def _origin(self) -> dict:
        """Where to find the handler again (``durable-mp resume``): a script's file, the cwd."""
        origin = {"cwd": os.getcwd()}
        if self.func.__module__ == "__main__":
            origin["source"] = os.path.abspath(self.func.__code__.co_filename)
        return origin

    def execution_id_for(self, event: Any) -> str:
        """The default execution id: readable name + hash of handler and event (same command, same id)."""
        return f"{self.func.__qualname__}-{_digest(self.func, event)}"

    def __call__(self, event: Any, lambda_context: Any = None) -> dict:
        """The reference's envelope: ``{"Status": ..., "Result": json}`` or ``{"Status", "Error"}``."""
        return self.run_envelope(event)

    def run_envelope(self, event: Any = None, **run_options: Any) -> dict:
        """``run`` with the outcome as the reference's envelope (``run``'s options apply)."""
        try:
            result = self.run(event, **run_options)
        except ExecutionFailedError as exc:
            return {"Status": FAILED, "Error": exc.error.to_dict()}
        return envelope_of(result)

    def run(
        self,
        event: Any = None,
        *,
        execution_id: str | None = None,
        store: Store | str | os.PathLike | None = None,
        max_workers: int | None = None,
        skip_time: bool | None = None,
        max_worker_memory: int | None = None,
        max_crash_retries: int | None = None,
        progress: bool | None = None,
        backend: Any = None,
        resume_failed: bool | None = None,
        start_method: str | None = None,
    ) -> Any:
        """Run (or resume) the execution and return the handler's result.

        A SUCCEEDED execution returns its stored result (and says so on stderr). A FAILED
        one is resumed: successes replay, failed operations run again as new attempts;
        ``resume_failed=False`` keeps the reference's rule instead (a failed execution
        stays failed and raises its stored error).

        Raises ``ExecutionFailedError`` (with ``.error``, an ``ErrorObject``) when the
        handler raised, ``ExecutionLockedError`` when another live driver runs it.  When
        the code no longer matches the checkpoints (``NonDeterministicExecutionError``
        as ``.error.type``) the run fails but the execution stays resumable: revert the
        change and run again.
        """
        opts = self.options
        store = store if store is not None else opts.get("store")
        max_workers = max_workers if max_workers is not None else opts.get("max_workers")
        skip_time = skip_time if skip_time is not None else opts.get("skip_time", False)
        max_worker_memory = max_worker_memory if max_worker_memory is not None else opts.get("max_worker_memory")
        max_crash_retries = (max_crash_retries if max_crash_retries is not None
                             else opts.get("max_crash_retries", DEFAULT_MAX_CRASH_RETRIES))
        progress = progress if progress is not None else opts.get("progress")
        backend = backend if backend is not None else opts.get("backend")
        resume_failed = resume_failed if resume_failed is not None else opts.get("resume_failed", True)
        start_method = start_method if start_method is not None else opts.get("start_method")
        try:  # "fork", "forkserver" or "spawn"; None: the platform's default (engine.start)
            start_method = check_start_method(start_method)
        except ValueError as exc:
            raise ValidationError(str(exc)) from None
        if backend not in (None, "local", "dask") and type(backend).__name__ != "Client":
            raise ValidationError(f"backend must be 'local', 'dask' or a distributed.Client, got {backend!r}")
        _positive("max_workers", max_workers)
        _positive("max_worker_memory", max_worker_memory)
        if max_worker_memory and backend not in (None, "local"):
            raise ValidationError(
                "max_worker_memory is not applied on the Dask backend: a Dask worker has its own memory limit "
                "(`dask worker --memory-limit`, or the distributed.worker.memory settings), past which its nanny "
                "restarts it; its branch then runs again, and fails with WorkerCrashedError when it keeps killing "
                "its worker. Set the limit on the workers and leave max_worker_memory out")
        _positive("max_crash_retries", max_crash_retries)
        execution_id = execution_id or self.execution_id_for(event)
        settings = {"execution_id": execution_id, "skip_time": bool(skip_time), "watch_steps": bool(max_worker_memory)}
        if backend in (None, "local"):
            # local workers write large results into the store's directory themselves (engine.result_blobs)
            settings[STORE_KEY] = str(store.path if isinstance(store, Store) else resolve_store_path(store))
        # spawn, forkserver: the first worker boots while the store opens (two fsyncs) and the run is prepared
        pool = _early_pool(settings, start_method, max_workers) if backend in (None, "local") else None
        try:
            owned = not isinstance(store, Store)
            db = Store(store) if owned else store
            try:
                return self._run(db, execution_id, event, settings, max_workers=max_workers,
                                 skip_time=bool(skip_time), max_worker_memory=max_worker_memory,
                                 max_crash_retries=max_crash_retries, progress=progress, backend=backend,
                                 resume_failed=bool(resume_failed), start_method=start_method, early_pool=pool)
            finally:
                if owned:
                    db.close()
        finally:
            if pool is not None:
                pool.close()  # idempotent; here for a store that did not open or an execution locked elsewhere

    def _prepare_rerun(self, db: Store, rec: ExecutionRecord, fingerprint: str) -> None:
        """Before running an existing execution: reopen what must run again, record the code."""
        original, extra = rec, rec.extra or {}
        if rec.status == FAILED:
            reopened = _rerun.reopen_checkpoints(db, rec.exec_id, all_failed=True)
            if not getattr(self.func, "quiet_rerun", False):  # durable_mp.map says it in items itself
                _rerun.announce(f"execution {rec.exec_id!r} FAILED in an earlier run; resuming it: finished "
                                f"operations replay, {reopened} failed one(s) run again (resume_failed=False keeps "
                                f"it failed)")
            now = time.time()  # run_starts / failed_runs: inspection tells this run from a killed one
            rec = rec._replace(status=RUNNING, error=None, ended_ts=None, runs=rec.runs + 1, started_ts=now, extra={
                **extra, "run_starts": [*extra.get("run_starts", ()), now],
                "failed_runs": [*extra.get("failed_runs", ()), rec.runs]})
        elif extra.get(_rerun.STOPPED_KEY) == _rerun.STOPPED_BY_NON_DETERMINISM:
            _rerun.reopen_checkpoints(db, rec.exec_id, all_failed=False)
        updated = _rerun.with_extra(rec, **{_rerun.CODE_KEY: fingerprint, _rerun.STOPPED_KEY: None})
        if updated != original:  # a new execution holds all this already: no second fsync before the first branch
            db.put_execution(updated)

    def _stop_resumable(self, db: Store, execution_id: str, exc: Exception) -> None:
        """Leave the execution RUNNING (resumable) after a non-determinism error, and say what to do.

        This run failed (``ExecutionFailedError``, as the reference fails the invocation);
        the execution did not: reverting the change and running again resumes it.
        """
        rec = db.get_execution(execution_id)
        db.put_execution(_rerun.with_extra(rec, **{_rerun.STOPPED_KEY: _rerun.STOPPED_BY_NON_DETERMINISM}))
        failed = ExecutionFailedError(ErrorObject.from_exception(exc), execution_id=execution_id)
        failed.args = (f"{failed} -- execution {execution_id!r} was stopped, not failed: the code no longer "
                       f"matches its checkpoints. Revert the change and run again to resume it, or start over "
                       f"with {_rerun.delete_command(db, execution_id)} (or another execution_id).",)
        raise failed from exc

    def _run(self, db: Store, execution_id: str, event: Any, settings: dict[str, Any], *, max_workers, skip_time,
             max_worker_memory, max_crash_retries, progress, backend, resume_failed, start_method=None,
             early_pool: WorkerPool | None = None) -> Any:
        fingerprint = code_fingerprint(self.func)

        def fresh() -> ExecutionRecord:
            now = time.time()
            pid, create_time = this_process()  # the owner acquire() records anyway (cached: no psutil call)
            stored = _dumps_result(event, "event")
            return ExecutionRecord(execution_id, RUNNING, self.handler_ref, stored, None, None, now, now, None, pid,
                                   create_time, 1, {**self._origin(), _rerun.CODE_KEY: fingerprint})

        rec, _created = db.acquire(execution_id, fresh)
        restore_sigterm = _stop_cleanly_on_sigterm()
        pool: Any = None
        try:
            if rec.status == SUCCEEDED:
                _rerun.announce(*_rerun.stored_result_notice(db, rec, fingerprint))
                return pickle.loads(rec.result)
            if rec.status == FAILED and not resume_failed:
                raise ExecutionFailedError(ErrorObject.from_dict(rec.error or {}), execution_id=execution_id,
                                           stored=True)
            if backend in (None, "local"):
                pool = early_pool if early_pool is not None else WorkerPool(settings, start_method)

                def make_dispatcher() -> Any:
                    # fork: one worker now (it sets itself up while the first batch's payload is built);
                    # the dispatcher forks the others when it has a chunk for them, so the first branch
                    # runs while they are forked, and a small batch forks only what it uses.  spawn,
                    # forkserver: the workers started with the run (``_early_pool``); the same applies
                    # to the rest
                    pool.ensure(max(1, pool.started_early))
                    return Dispatcher(db, execution_id, pool, max_workers=max_workers,
                                      max_worker_memory=max_worker_memory, max_crash_retries=max_crash_retries,
                                      progress=_progress.choose(progress), poll_callback=poll_callback)
            else:
                from durable_mp.backends.dask import DaskDispatcher

                pool = _DaskSession(backend)

                def make_dispatcher() -> Any:
                    return DaskDispatcher(db, execution_id, pool.client(), settings=settings,
                                          max_crash_retries=max_crash_retries, progress=_progress.choose(progress),
                                          max_workers=max_workers, reconnect=pool.reconnect,
                                          poll_callback=poll_callback)

            self._prepare_rerun(db, rec, fingerprint)
            if rec.input is not None:
                event = pickle.loads(rec.input)
            state = DriverState(db, execution_id, make_dispatcher, skip_time=skip_time, poll_callback=poll_callback)
            try:
                result = self.func(event, DurableContext(state, ""))
                stored = _dumps_result(result)
            except Exception as exc:  # noqa: BLE001 - any handler error fails the execution
                pool.close()
                db.flush()
                if _rerun.is_non_determinism(exc):  # the code changed under a checkpoint: stop, do not fail
                    self._stop_resumable(db, execution_id, exc)
                error = ErrorObject.from_exception(exc)
                db.finish_execution(db.get_execution(execution_id)._replace(
                    status=FAILED, error=error.to_dict(), ended_ts=time.time()))
                raise ExecutionFailedError(error, execution_id=execution_id) from exc
            except BaseException:  # Ctrl-C, SystemExit: keep RUNNING, resumable
                pool.close()
                db.flush()
                raise
            pool.begin_close()  # the workers exit while the last records and the result are committed
            db.flush()
            db.finish_execution(db.get_execution(execution_id)._replace(
                status=SUCCEEDED, result=stored, ended_ts=time.time()))
            pool.close()
            return result
        finally:
            if pool is not None:
                pool.close()  # idempotent; here for a failure before the handler ran (no process is left)
            restore_sigterm()
            db.release(execution_id)


def _early_pool(settings: dict[str, Any], start_method: str, max_workers: int | None) -> WorkerPool | None:
    """Under spawn and forkserver, a pool whose first workers begin to boot now (``start.early_workers``).

    A fresh interpreter takes longer to boot than anything the driver does before its
    first batch (opening the store and claiming the execution: two fsyncs), so it starts
    first; a run that never maps kills it unused.  ``fork`` forks at the first batch.
    """
    if start_method not in EARLY_START_METHODS:
        return None
    pool = WorkerPool(settings, start_method)
    try:
        pool.start_early(early_workers(start_method, max_workers or os.cpu_count() or 1))
    except BaseException:
        pool.close()
        raise
    return pool


def _stop_cleanly_on_sigterm() -> Callable[[], None]:
    """Turn SIGTERM (``kill``, systemd, a batch scheduler) into the same clean stop as Ctrl-C.

    The default action would end the driver on the spot, losing the records of the last
    group commit; raising ``SystemExit(143)`` instead kills the workers, commits what was
    recorded and leaves the execution resumable.  Only in the main thread, and only when
    nobody else installed a handler.  Returns the function that restores the old one.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return lambda: None

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL)


RECONNECT_SECONDS = 2.0  # one attempt of a new Dask client to reach a scheduler that went away


class _DaskSession:
    """The Dask client of one run: created on first use when ``backend="dask"``, closed after."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self._client: Any = None
        self._owned = False

    def client(self) -> Any:
        if self._client is None:
            from durable_mp.backends.dask import client_for

            self._client, self._owned = client_for(self.backend)
        return self._client

    def reconnect(self, address: str) -> Any:
        """A new client to ``address``, owned (closed) by this run: the one it had gave up reconnecting."""
        from distributed import Client

        if self._client is not None and self._owned:
            self._client.close()
        self._client, self._owned = Client(address, timeout=RECONNECT_SECONDS, set_as_default=False), True
        return self._client

    def begin_close(self) -> None:
        """Nothing to start early: ``close`` does it all."""

    def close(self) -> None:
        if self._client is not None and self._owned:
            self._client.close()
        self._client = None


def durable_execution(
    func: Callable[[Any, DurableContext], Any] | None = None,
    *,
    boto3_client: Any = None,
    plugins: list | None = None,
    **options: Any,
) -> Any:
    """Make ``handler(event, context)`` durable; usable bare or with options.

    ``boto3_client`` and ``plugins`` are accepted for source compatibility and ignored.
    Options (``store``, ``max_workers``, ``skip_time``, ``max_worker_memory``,
    ``max_crash_retries``, ``progress``, ``resume_failed``, ``start_method``) become defaults for ``run``.
    """
    if func is None:
        return lambda f: durable_execution(f, **options)
    # a handler that cannot take (event, context) would fail only when it runs: refuse it now
    check_callable(func, 2, "handler(event, context)", "durable handler")
    return DurableFunction(func, **options)
