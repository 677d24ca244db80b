"""Differential tests: random handlers on the reference SDK's local runner and on durable_mp.

Each seed gives one handler (``diffgen.generate``) as source text; the same text runs
under ``aws_durable_execution_sdk_python_testing.DurableFunctionTestRunner`` and under
``durable_mp.testing.DurableFunctionTestRunner``, both with ``skip_time=True``.  The
invocation status, the error type of a failed invocation and the handler's result are
compared; the result embeds every ``BatchResult`` the handler saw (status, completion
reason, success/failure/started/total counts, each item's status, result and error type).

The only differences allowed are DESIGN.md §1's, each a named rule below:

* ``rule_error_types_name_their_sdk``: an error type is qualified by its SDK's module
  (``aws_durable_execution_sdk_python.exceptions.StepError`` is
  ``durable_mp.exceptions.StepError``): same names, same modules, under ``durable_mp``.
* ``rule_failure_completion_reason_from_final_state``: a batch stopped by failures
  reports ``ALL_COMPLETED`` in durable_mp when every one of its inputs ran to an end
  (the reference says ``FAILURE_TOLERANCE_EXCEEDED``); items and counts are the same.

Not observable here, so no rule is needed: step names defaulting to ``__name__`` (every
generated step is named), pickle serdes (results are JSON values either way), a
success-triggered completion terminating running branches and a failure-triggered one
letting them finish (a batch that can complete early runs with ``max_concurrency=1``, so
no sibling is running when it completes; ``diffgen`` keeps outcomes free of thread timing).

``DURABLE_MP_DIFF_HANDLERS=<n>`` runs n handlers (default ``DEFAULT_HANDLERS``),
``DURABLE_MP_DIFF_SEED=<n>`` replays one.  A failing seed prints its source and both outcomes.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest

import diffgen

reference_testing = pytest.importorskip("aws_durable_execution_sdk_python_testing")

from durable_mp.store.facade import Store  # noqa: E402
from durable_mp.testing import DurableFunctionTestRunner as MpRunner  # noqa: E402

DEFAULT_HANDLERS = 240
REFERENCE_THREADS = 12  # the reference sleeps real seconds for waits inside a batch: overlap them
RUN_TIMEOUT = 120
SHOWN_FAILURES = 3  # seeds printed in full; the rest are listed


@dataclass
class Outcome:
    status: str
    result: Any
    error_type: str | None

    def as_text(self) -> str:
        return json.dumps({"status": self.status, "error_type": self.error_type, "result": self.result})


# -- the allowed differences (DESIGN.md §1) -------------------------------------------------------
REFERENCE_PREFIX = diffgen.REFERENCE + "."
MP_PREFIX = diffgen.DURABLE_MP + "."


def rule_error_types_name_their_sdk(ref: str | None, mp: str | None) -> bool:
    """Same exception, each qualified by its own SDK: durable_mp has the reference's names
    and modules under ``durable_mp`` (DESIGN.md §1, API contract)."""
    if ref is None or mp is None or not ref.startswith(REFERENCE_PREFIX) or not mp.startswith(MP_PREFIX):
        return False
    return ref[len(REFERENCE_PREFIX):] == mp[len(MP_PREFIX):]


def rule_failure_completion_reason_from_final_state(ref: dict, mp: dict) -> bool:
    """A completion reached by failures reads its reason from the final state in durable_mp:
    ``ALL_COMPLETED`` when every branch ran to an end, where the reference reports the
    decision, ``FAILURE_TOLERANCE_EXCEEDED`` (DESIGN.md §1).  Only the reason may differ."""
    return (ref["reason"] == "FAILURE_TOLERANCE_EXCEEDED" and mp["reason"] == "ALL_COMPLETED"
            and mp["counts"][3] == mp["inputs"] and not any(item[1] == "STARTED" for item in mp["items"]))


RULES: tuple[Callable[..., bool], ...] = (rule_error_types_name_their_sdk,
                                          rule_failure_completion_reason_from_final_state)


# -- comparison -----------------------------------------------------------------------------------
def differences(ref: Any, mp: Any, path: str = "result") -> list[str]:
    """Where ``mp`` differs from ``ref`` beyond the rules; one line each."""
    if isinstance(ref, dict) and isinstance(mp, dict) and ref.get("__batch__") and mp.get("__batch__"):
        return batch_differences(ref, mp, path)
    if isinstance(ref, dict) and isinstance(mp, dict):
        if ref.keys() != mp.keys():
            return [f"{path}: keys {sorted(ref)} != {sorted(mp)}"]
        return [d for key in ref for d in differences(ref[key], mp[key], f"{path}.{key}")]
    if isinstance(ref, list) and isinstance(mp, list):
        if len(ref) != len(mp):
            return [f"{path}: {len(ref)} values != {len(mp)}: {ref!r} != {mp!r}"]
        return [d for i, (a, b) in enumerate(zip(ref, mp, strict=True)) for d in differences(a, b, f"{path}[{i}]")]
    return [] if ref == mp else [f"{path}: {ref!r} != {mp!r}"]


def batch_differences(ref: dict, mp: dict, path: str) -> list[str]:
    out = []
    if ref["status"] != mp["status"]:
        out.append(f"{path}: status {ref['status']} != {mp['status']}")
    if ref["reason"] != mp["reason"] and not rule_failure_completion_reason_from_final_state(ref, mp):
        out.append(f"{path}: completion_reason {ref['reason']} != {mp['reason']}")
    if ref["counts"] != mp["counts"]:
        out.append(f"{path}: counts (success, failure, started, total) {ref['counts']} != {mp['counts']}")
        return out  # the items differ too; the counts say how
    for (index, status, result, error), (mp_index, mp_status, mp_result, mp_error) in zip(
            ref["items"], mp["items"], strict=True):
        where = f"{path}.all[{index}]"
        if (index, status) != (mp_index, mp_status):
            out.append(f"{where}: item {index} {status} != item {mp_index} {mp_status}")
            continue
        if error != mp_error and not rule_error_types_name_their_sdk(error, mp_error):
            out.append(f"{where}: error type {error} != {mp_error}")
        out.extend(differences(result, mp_result, f"{where}.result"))
    return out


def outcome_differences(ref: Outcome, mp: Outcome) -> list[str]:
    out = []
    if ref.status != mp.status:
        out.append(f"invocation status {ref.status} != {mp.status}")
    if ref.error_type != mp.error_type and not rule_error_types_name_their_sdk(ref.error_type, mp.error_type):
        out.append(f"invocation error type {ref.error_type} != {mp.error_type}")
    return out + differences(ref.result, mp.result)


# -- running --------------------------------------------------------------------------------------
def outcome_of(result: Any) -> Outcome:
    return Outcome(result.status.value, None if result.result is None else json.loads(result.result),
                   None if result.error is None else result.error.type)


def run_reference(seed: int, source: str) -> Outcome:
    handler = diffgen.build(source, diffgen.REFERENCE, f"diff_ref_{seed}")
    with reference_testing.DurableFunctionTestRunner(handler=handler, skip_time=True) as runner:
        return outcome_of(runner.run(input="{}", execution_timeout=RUN_TIMEOUT))


def run_durable_mp(seed: int, source: str, store: Store) -> Outcome:
    handler = diffgen.build(source, diffgen.DURABLE_MP, f"diff_mp_{seed}")
    with MpRunner(handler=handler, skip_time=True, store=store) as runner:
        return outcome_of(runner.run(input="{}", execution_timeout=RUN_TIMEOUT))


def seeds() -> list[int]:
    replay = os.environ.get("DURABLE_MP_DIFF_SEED")
    if replay:
        return [int(replay)]
    return list(range(int(os.environ.get("DURABLE_MP_DIFF_HANDLERS", DEFAULT_HANDLERS))))


@pytest.fixture
def quiet_logs():
    """Both SDKs log every failed step and branch; hundreds of handlers would bury the report."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)
    names = [diffgen.REFERENCE, "aws_durable_execution_sdk_python_testing", diffgen.DURABLE_MP]
    saved = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    yield
    root.setLevel(level)
    for name, old in saved.items():
        logging.getLogger(name).setLevel(old)


def report(seed: int, source: str, ref: Outcome, mp: Outcome, found: list[str]) -> str:
    return "\n".join([f"seed {seed} (replay: DURABLE_MP_DIFF_SEED={seed}):", *(f"  {d}" for d in found),
                      "  reference:  " + ref.as_text(), "  durable_mp: " + mp.as_text(),
                      diffgen.numbered(source)])


@pytest.mark.timeout(900)
def test_random_handlers_behave_as_on_the_reference(tmp_path, quiet_logs, capsys):
    chosen = seeds()
    sources = {seed: diffgen.generate(seed).source for seed in chosen}
    started = time.monotonic()
    with ThreadPoolExecutor(REFERENCE_THREADS) as pool:
        pending = {seed: pool.submit(run_reference, seed, source) for seed, source in sources.items()}
        reference_done = time.monotonic()
        store = Store(str(tmp_path / "store"))
        try:
            mp = {seed: run_durable_mp(seed, source, store) for seed, source in sources.items()}
        finally:
            store.close()
        mp_seconds = time.monotonic() - reference_done
        ref = {seed: future.result() for seed, future in pending.items()}
    failures = [(seed, found) for seed in chosen if (found := outcome_differences(ref[seed], mp[seed]))]
    with capsys.disabled():
        print(f"\ndifferential: {len(chosen)} handlers in {time.monotonic() - started:.1f} s "
              f"(durable_mp {mp_seconds:.1f} s), {len(failures)} differ", file=sys.stderr)
    if failures:
        shown = [report(seed, sources[seed], ref[seed], mp[seed], found) for seed, found in failures[:SHOWN_FAILURES]]
        listed = ", ".join(f"{seed} ({found[0]})" for seed, found in failures)
        pytest.fail(f"{len(failures)} of {len(chosen)} handlers differ from the reference:\n" + "\n\n".join(shown)
                    + f"\nall differing seeds: {listed}", pytrace=False)


# -- the comparison itself ---------------------------------------------------------------------
def batch(reason: str, counts: list[int], items: list[list], inputs: int | None = None, status: str = "FAILED"):
    return {"__batch__": True, "inputs": inputs if inputs is not None else counts[3], "status": status,
            "reason": reason, "counts": counts, "items": items}


def test_the_rules_allow_only_what_they_name():
    step_error = "exceptions.StepError"
    assert rule_error_types_name_their_sdk(REFERENCE_PREFIX + step_error, MP_PREFIX + step_error)
    assert not rule_error_types_name_their_sdk(REFERENCE_PREFIX + step_error, MP_PREFIX + "exceptions.ChildContextError")
    assert not rule_error_types_name_their_sdk("ValueError", "RuntimeError")
    ended = [[0, "FAILED", None, "ValueError"]]
    assert differences(batch("FAILURE_TOLERANCE_EXCEEDED", [0, 1, 0, 1], ended),
                       batch("ALL_COMPLETED", [0, 1, 0, 1], ended)) == []
    # a branch never started (2 inputs, 1 reported) keeps the reference's reason
    assert differences(batch("FAILURE_TOLERANCE_EXCEEDED", [0, 1, 0, 1], ended, inputs=2),
                       batch("ALL_COMPLETED", [0, 1, 0, 1], ended, inputs=2))
    # counting a never-started item (defect 6) is a difference
    assert differences(batch("MIN_SUCCESSFUL_REACHED", [1, 0, 0, 1], [[0, "SUCCEEDED", "a", None]], inputs=2),
                       batch("MIN_SUCCESSFUL_REACHED", [1, 0, 1, 2], [[0, "SUCCEEDED", "a", None],
                                                                      [1, "STARTED", None, None]], inputs=2))
    assert differences(["a", {"__error__": "StepError"}], ["a", {"__error__": "ChildContextError"}])
