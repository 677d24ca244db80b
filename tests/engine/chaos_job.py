"""The durable job the chaos test (``test_chaos.py``) runs, one driver process per run.

Usage: ``python chaos_job.py STORE WORKDIR``; the job's shape and its fault plan are read
from ``WORKDIR/plan.json``, the handler's result is pickled to ``WORKDIR/result.pkl``.

The job mixes what the engine must keep apart under faults: root steps, a map whose
items run a step, a nested parallel and a child context, a parallel whose branches run
a nested map, a step that fails its first attempt and is retried (under ``skip_time``),
and results over 64 KiB (numpy arrays, which travel out of band).

Every step, branch and child-context body appends ``identity pid time`` to
``WORKDIR/log/<identity>`` (one ``O_APPEND`` write, so lines never interleave): the test
compares these logs with the store's records to see what ran again.  Every body is
also a fault site; the plan maps a site to a fault that fires exactly once, ever: its
marker ``WORKDIR/fired/<site>`` is created with ``O_EXCL`` before firing, so neither a
re-dispatched branch, a sibling thread nor a re-run driver fires it again.

Only the public API is used, so the test survives changes to the engine's internals.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import sys
import time

import numpy as np
import psutil

from durable_mp import ParallelBranch, durable_execution
from durable_mp.config import CompletionConfig, Duration, MapConfig, ParallelConfig, StepConfig
from durable_mp.retries import RetryStrategyConfig, create_retry_strategy

EXECUTION_ID = "chaos"
DRIVER_VAR = "CHAOS_DRIVER"  # "pid start-time" of the driver, set by it, inherited by its workers
BIG_ELEMENTS = 12_000  # float64 elements of a large result: 96 KB, over the 64 KiB out-of-band threshold
FAULT_EXIT_CODE = 77  # what an injected os._exit exits with
# The first attempt of a flaky step fails; its retry waits 30 s, which skip_time skips.
RETRY = StepConfig(retry_strategy=create_retry_strategy(RetryStrategyConfig(
    max_attempts=3, initial_delay=Duration.from_seconds(30))))
ALL_SUCCESSFUL = CompletionConfig.all_successful()

# Faults a site can carry.  Worker sites run in a worker process; driver sites run in
# the handler's own code, in the driver.
WORKER_FAULTS = ("sigkill", "sigterm", "os_exit", "kill_driver")
DRIVER_FAULTS = ("sigkill", "sigterm", "os_exit")

WORKDIR = sys.argv[2] if __name__ == "__main__" else ""
PLAN: dict = {}


# -- pure values: the expected result is computed from these without durable_mp -----------

def value(tag: str) -> int:
    """A small deterministic number for ``tag``."""
    return int.from_bytes(hashlib.blake2b(tag.encode(), digest_size=4).digest(), "little") % 100_000


def big(tag: str) -> np.ndarray:
    """A deterministic array over the out-of-band threshold."""
    return np.arange(BIG_ELEMENTS, dtype=np.float64) * 0.5 + value(tag)


def item_names(shape: dict) -> dict:
    """Every identity (step, branch and child-context name) of the job, by kind."""
    names: dict[str, list[str]] = {"steps": ["root-a", "root-big", "root-flaky"], "bodies": []}
    for i in range(shape["items"]):
        names["bodies"] += [f"item-{i}", f"child-{i}"] + [f"item-{i}-par-{j}" for j in range(shape["width"])]
        names["steps"] += [f"item-{i}-step", f"child-{i}-flaky"] + [f"item-{i}-par-{j}-step"
                                                                     for j in range(shape["width"])]
    for k in range(shape["tops"]):
        names["bodies"] += [f"top-{k}"] + [f"top-{k}-m-{q}" for q in range(shape["inner"])]
        names["steps"] += [f"top-{k}-big"] + [f"top-{k}-m-{q}-step" for q in range(shape["inner"])]
    return names


def fault_sites(shape: dict) -> dict[str, tuple[str, ...]]:
    """Each fault site and the faults it can carry."""
    names = item_names(shape)
    sites: dict[str, tuple[str, ...]] = {f"{n}@start": WORKER_FAULTS for n in names["bodies"] + names["steps"]}
    sites.update({f"{n}@end": WORKER_FAULTS for n in names["steps"]})
    # Root steps run in the driver (as in the reference) unless they have a timeout.
    sites.update({site: DRIVER_FAULTS for site in sites if in_driver(site)})
    sites.update({"handler@after-roots": DRIVER_FAULTS, "handler@after-items": DRIVER_FAULTS})
    return sites


def in_driver(site: str) -> bool:
    """Whether a fault site may run in the driver: the handler's code and its root steps."""
    return site.startswith(("handler@", "root-"))


def expected(shape: dict) -> dict:
    """The handler's result, computed directly: what every faulty run must return."""
    def item(i: int) -> dict:
        par = [big(f"item-{i}-par-{j}-step") if j == 0 else value(f"item-{i}-par-{j}-step")
               for j in range(shape["width"])]
        return {"i": i, "step": value(f"item-{i}-step"), "par": par, "child": value(f"child-{i}-flaky")}

    def top(k: int) -> dict:
        return {"m": [value(f"top-{k}-m-{q}-step") for q in range(shape["inner"])], "big": big(f"top-{k}-big")}

    return {"a": value("root-a"), "big": big("root-big"), "flaky": value("root-flaky"),
            "items": [item(i) for i in range(shape["items"])], "tops": [top(k) for k in range(shape["tops"])]}


# -- logging and faults --------------------------------------------------------------------

def ran(identity: str) -> None:
    """Append ``identity pid time`` to the identity's log (one write, O_APPEND)."""
    fd = os.open(os.path.join(WORKDIR, "log", identity), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, f"{identity} {os.getpid()} {time.time():.6f}\n".encode())
    finally:
        os.close(fd)


def site(name: str) -> None:
    """Fire the fault planned for this site, the first time any process reaches it."""
    kind = PLAN.get("faults", {}).get(name)
    if kind is None:
        return
    try:
        os.close(os.open(os.path.join(WORKDIR, "fired", name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        return  # fired before: each fault fires once
    if kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal ends this process; do not run on meanwhile
    elif kind == "os_exit":
        os._exit(FAULT_EXIT_CODE)
    elif kind == "kill_driver":
        pid, started = os.environ[DRIVER_VAR].split()
        try:
            if psutil.Process(int(pid)).create_time() == float(started):  # not a dead driver's recycled pid
                os.kill(int(pid), signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    else:
        raise AssertionError(f"unknown fault {kind!r}")


def body(identity: str) -> None:
    ran(identity)
    site(f"{identity}@start")


def step_of(identity: str, compute):
    """A step function that logs, may fault before and after computing, and returns compute()."""
    def run(step_ctx):
        body(identity)
        time.sleep(PLAN["shape"]["step_seconds"])  # long enough for outside faults to land mid-run
        result = compute()
        site(f"{identity}@end")
        return result
    return run


def flaky_step(identity: str):
    """A step whose very first attempt (across all runs) fails; later attempts succeed."""
    def run(step_ctx):
        body(identity)
        try:
            os.close(os.open(os.path.join(WORKDIR, "flaky", identity), os.O_WRONLY | os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            site(f"{identity}@end")
            return value(identity)
        raise ValueError(f"first attempt of {identity} fails")
    return run


# -- the handler ----------------------------------------------------------------------------

def nested_branch(i: int, j: int):
    name = f"item-{i}-par-{j}"

    def run(ctx):
        body(name)
        compute = (lambda: big(f"{name}-step")) if j == 0 else (lambda: value(f"{name}-step"))
        return ctx.step(step_of(f"{name}-step", compute), name=f"{name}-step")
    return run


def child(i: int):
    def run(ctx):
        body(f"child-{i}")
        return ctx.step(flaky_step(f"child-{i}-flaky"), name=f"child-{i}-flaky", config=RETRY)
    return run


def map_item(ctx, x, i, xs):
    body(f"item-{i}")
    step = ctx.step(step_of(f"item-{i}-step", lambda: value(f"item-{i}-step")), name=f"item-{i}-step")
    par = ctx.parallel([ParallelBranch(nested_branch(i, j), name=f"item-{i}-par-{j}")
                        for j in range(PLAN["shape"]["width"])],
                       name=f"item-{i}-par", config=ParallelConfig(completion_config=ALL_SUCCESSFUL))
    par.throw_if_error()
    got = ctx.run_in_child_context(child(i), name=f"child-{i}")
    return {"i": i, "step": step, "par": par.get_results(), "child": got}


def top_branch(k: int):
    def inner(ctx, x, q, xs):
        body(f"top-{k}-m-{q}")
        return ctx.step(step_of(f"top-{k}-m-{q}-step", lambda: value(f"top-{k}-m-{q}-step")),
                        name=f"top-{k}-m-{q}-step")

    def run(ctx):
        body(f"top-{k}")
        m = ctx.map(list(range(PLAN["shape"]["inner"])), inner, name=f"top-{k}-map",
                    config=MapConfig(item_namer=lambda x, q: f"top-{k}-m-{q}", completion_config=ALL_SUCCESSFUL))
        m.throw_if_error()
        arr = ctx.step(step_of(f"top-{k}-big", lambda: big(f"top-{k}-big")), name=f"top-{k}-big")
        return {"m": m.get_results(), "big": arr}
    return run


@durable_execution
def handler(event, ctx):
    shape = PLAN["shape"]
    a = ctx.step(step_of("root-a", lambda: value("root-a")), name="root-a")
    arr = ctx.step(step_of("root-big", lambda: big("root-big")), name="root-big")
    flaky = ctx.step(flaky_step("root-flaky"), name="root-flaky", config=RETRY)
    site("handler@after-roots")
    items = ctx.map(list(range(shape["items"])), map_item, name="items",
                    config=MapConfig(item_namer=lambda x, i: f"item-{i}", completion_config=ALL_SUCCESSFUL))
    items.throw_if_error()
    site("handler@after-items")
    tops = ctx.parallel([ParallelBranch(top_branch(k), name=f"top-{k}") for k in range(shape["tops"])],
                        name="tops", config=ParallelConfig(completion_config=ALL_SUCCESSFUL))
    tops.throw_if_error()
    return {"a": a, "big": arr, "flaky": flaky, "items": items.get_results(), "tops": tops.get_results()}


def main(store: str) -> None:
    if PLAN.get("ignore_sigxfsz"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a store write past RLIMIT_FSIZE fails with EFBIG instead
    os.environ[DRIVER_VAR] = f"{os.getpid()} {psutil.Process().create_time()!r}"
    result = handler.run(None, execution_id=EXECUTION_ID, store=store, skip_time=True,
                         max_crash_retries=PLAN["max_crash_retries"])
    tmp = os.path.join(WORKDIR, "result.pkl.tmp")
    with open(tmp, "wb") as f:
        pickle.dump(result, f, protocol=5)
    os.replace(tmp, os.path.join(WORKDIR, "result.pkl"))


if __name__ == "__main__":
    with open(os.path.join(WORKDIR, "plan.json")) as f:
        PLAN.update(json.load(f))
    main(sys.argv[1])
