"""A driver for ``test_crash_differential``: one generated handler, run to its end or killed.

``python crash_diff_job.py SEED STORE EXECUTION_ID TICKS KILL_AT MODE OUT``

Runs ``diffgen.generate(SEED)``'s handler with durable_mp (``skip_time=True``) after two
changes to its text: every step is AT_LEAST_ONCE (an AT_MOST_ONCE step cut short by a
crash is *meant* to end differently), and every step body calls ``_crash_tick()`` first,
and again after computing its value, before returning it.
A tick takes the next number in ``TICKS`` (a directory of marker files, shared by every
process and every run of one execution); the tick numbered ``KILL_AT`` kills:

* ``driver``: SIGKILL to the driver, from wherever the step runs (a worker or the driver);
* ``worker``: SIGKILL to the worker running the step (a step the driver runs is spared).

The killed step never returns.  When the run ends, OUT gets JSON: the invocation's
status, result or error, and every stored operation record without its timestamps and
pids.  A driver killed never writes OUT.
"""

from __future__ import annotations

import json
import os
import sys

from durable_mp.exceptions import ExecutionFailedError
from durable_mp.store.facade import Store

import diffgen
from util import comparable_records

TICK = '''

def _crash_tick():
    """The step about to run takes the next tick; the chosen one is killed before it returns."""
    import os, signal, time
    ticks, kill_at, mode = os.environ["CRASH_TICKS"], int(os.environ["CRASH_KILL_AT"]), os.environ["CRASH_MODE"]
    driver, number = int(os.environ["CRASH_DRIVER_PID"]), 0
    while True:
        try:
            os.close(os.open(os.path.join(ticks, str(number)), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            break
        except FileExistsError:
            number += 1
    if number != kill_at:
        return
    if mode == "driver":
        os.kill(driver, signal.SIGKILL)
    elif os.getpid() != driver:
        os.kill(os.getpid(), signal.SIGKILL)
    else:
        return
    time.sleep(60)  # a driver killed from a worker: this worker is ended when its driver's death is seen
'''


def crash_source(seed: int) -> str:
    """The handler text of ``seed`` with AT_LEAST_ONCE steps that tick as their body starts and ends."""
    source = diffgen.generate(seed).source
    source = source.replace(", step_semantics=StepSemantics.AT_MOST_ONCE_PER_RETRY", "")
    source = source.replace("step_semantics=StepSemantics.AT_MOST_ONCE_PER_RETRY", "")
    body = "    def body(step_ctx):\n"
    assert body in source, "diffgen's flaky() changed: the tick has nowhere to go"
    value = '        return f"{tag}@{step_ctx.attempt}"\n'
    assert value in source, "diffgen's flaky() changed: the second tick has nowhere to go"
    source = source.replace(body, body + "        _crash_tick()\n", 1)
    return source.replace(value, "        _crash_tick()\n" + value, 1) + TICK


def main() -> None:
    seed, store_path, execution_id, ticks, kill_at, mode, out = sys.argv[1:8]
    os.environ.update(CRASH_TICKS=ticks, CRASH_KILL_AT=kill_at, CRASH_MODE=mode, CRASH_DRIVER_PID=str(os.getpid()))
    handler = diffgen.build(crash_source(int(seed)), diffgen.DURABLE_MP, f"crash_diff_{seed}")
    outcome: dict = {}
    try:
        value = handler.run({}, execution_id=execution_id, store=store_path, skip_time=True)
        outcome.update(status="SUCCEEDED", result=json.loads(json.dumps(value)))
    except ExecutionFailedError as exc:
        error = exc.error
        outcome.update(status="FAILED", error=[getattr(error, "type", None), getattr(error, "message", str(exc))])
    store = Store(store_path)
    try:
        outcome["operations"] = comparable_records(store, execution_id)
        execution = store.get_execution(execution_id)
        outcome["execution_status"] = None if execution is None else execution.status
    finally:
        store.close()
    with open(out, "wb") as f:
        f.write(json.dumps(outcome).encode())


if __name__ == "__main__":
    main()
