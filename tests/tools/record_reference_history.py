"""Re-record the reference SDK's event histories used by ``tests/inspect/test_history_reference.py``.

Needs the reference and its local runner (not durable_mp dependencies)::

    pip install aws-durable-execution-sdk-python==3.0.0 aws-durable-execution-sdk-python-testing==1.4.0
    python tests/tools/record_reference_history.py        # writes tests/data/reference_history/*.json

Each handler of ``history_handlers.py`` runs once in ``DurableFunctionTestRunner``
(time skipped); its ``GetDurableExecutionHistory`` events, with execution data, are
written as JSON, one file per handler.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "data" / "reference_history"
CALLBACK_POLL_S = 0.05
CALLBACK_WAIT_S = 30.0

sys.path.insert(0, str(HERE))
from history_handlers import CALLBACK_RESULT, NEEDS_CALLBACK, handlers  # noqa: E402


def _answer_callback(runner: Any, stop: threading.Event) -> None:
    """Complete the first callback the execution starts (the runner exposes it only in its history)."""
    deadline = time.monotonic() + CALLBACK_WAIT_S
    while not stop.is_set() and time.monotonic() < deadline:
        for execution in list(runner._store.list_all()):  # noqa: SLF001 - the local runner's in-memory store
            for op in execution.operations:
                details = getattr(op, "callback_details", None)
                if details is not None and details.callback_id and getattr(op.status, "value", "") == "STARTED":
                    runner.send_callback_success(details.callback_id, CALLBACK_RESULT.encode())
                    return
        time.sleep(CALLBACK_POLL_S)


def record(name: str, handler: Any) -> list[dict]:
    from aws_durable_execution_sdk_python.execution import durable_execution
    from aws_durable_execution_sdk_python_testing.runner import DurableFunctionTestRunner

    with DurableFunctionTestRunner(durable_execution(handler), skip_time=True) as runner:
        stop = threading.Event()
        helper = None
        if name in NEEDS_CALLBACK:
            helper = threading.Thread(target=_answer_callback, args=(runner, stop), daemon=True)
            helper.start()
        arn = runner.run_async(input=json.dumps({"job": name}), execution_timeout=60)
        runner.wait_for_result(execution_arn=arn, timeout=60)
        stop.set()
        if helper is not None:
            helper.join()
        response = runner.get_execution_history(arn, include_execution_data=True)
    return [event.to_dict() for event in response.events]


def _iso(value: Any) -> str:
    """Timestamps as ISO-8601 with milliseconds, as ``durable-mp history --json`` prints them."""
    if hasattr(value, "isoformat"):
        return value.isoformat(timespec="milliseconds")
    return str(value)


def main() -> int:
    from aws_durable_execution_sdk_python import __about__ as about

    OUT.mkdir(parents=True, exist_ok=True)
    only = set(sys.argv[1:])
    for name, handler in handlers("aws_durable_execution_sdk_python").items():
        if only and name not in only:
            continue
        events = record(name, handler)
        doc = {"recorded_with": f"aws-durable-execution-sdk-python {about.__version__}", "handler": name,
               "events": events}
        (OUT / f"{name}.json").write_text(json.dumps(doc, indent=2, default=_iso) + "\n")
        print(f"{name}: {len(events)} events")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
