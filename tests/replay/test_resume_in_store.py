"""A resumed map leaves its finished items' records in the store until the BatchResult is built.

The driver is SIGKILLed near the end of a map that mixes plain successes, ``None``
results, large results and tolerated failures; the resumed run's BatchResult must equal
a fresh run's, item for item.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from durable_mp.core.records import OpRecord
from durable_mp.store.facade import Store

N = 300
SCRIPT = textwrap.dedent('''
    import json, os, signal, sys, time
    from durable_mp import durable_execution
    from durable_mp.config import CompletionConfig, MapConfig

    KILL_AT = int(os.environ.get("KILL_AT", "-1"))

    def item(ctx, x, index, items):
        if index == KILL_AT:
            time.sleep(0.5)  # the items before it are committed (group commit every 20 ms), even on a loaded machine
            os.kill(os.getppid(), signal.SIGKILL)  # the driver dies mid-map
            time.sleep(30)
        if index % 50 == 7:
            raise ValueError(f"bad {index}")
        if index % 50 == 9:
            return None
        if index % 100 == 11:
            return bytes([index % 256]) * 300_000
        return {"i": index, "sq": x * x}

    @durable_execution
    def handler(event, ctx):
        r = ctx.map(list(range(event["n"])), item, name="m",
                    config=MapConfig(completion_config=CompletionConfig(tolerated_failure_percentage=50)))
        return {"all": [[b.index, b.status.value, repr(b.result)[:40], len(b.result) if isinstance(b.result, bytes)
                         else None, b.error and b.error.message] for b in r.all],
                "results": len(r.get_results()), "errors": [e.message for e in r.get_errors()],
                "counts": [r.success_count, r.failure_count, r.started_count, r.total_count],
                "reason": r.completion_reason.value, "status": r.status.value}

    if __name__ == "__main__":
        out = handler.run({"n": int(sys.argv[3])}, store=sys.argv[1], execution_id=sys.argv[2], max_workers=2,
                          progress=False)
        print(json.dumps(out))
''')


def _run(script: str, store: str, exec_id: str, kill_at: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "KILL_AT": str(kill_at if kill_at is not None else -1)}
    proc = subprocess.Popen([sys.executable, script, store, exec_id, str(N)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=90)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # workers left behind by a killed driver
        except ProcessLookupError:
            pass
        proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.timeout(240)
def test_a_map_resumed_after_a_driver_kill_equals_a_fresh_run(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    store = str(tmp_path / "store")
    fresh = _run(str(script), store, "fresh")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    killed = _run(str(script), store, "resumed", kill_at=N - 1)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    with Store(store) as db:
        parents = {rec.op_id for rec in db.children("resumed", "")}
        done = {i: OpRecord.loads(d).status for p in parents for i, d in db.branch_raw("resumed", p).items()}
    assert sum(s == "SUCCEEDED" for s in done.values()) > 0, "nothing was finished before the kill"
    resumed = _run(str(script), store, "resumed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    want, got = json.loads(fresh.stdout.splitlines()[-1]), json.loads(resumed.stdout.splitlines()[-1])
    assert got == want
    assert want["counts"][1] == 6 and any(row[3] == 300_000 for row in want["all"])
