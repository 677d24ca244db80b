"""Differential tests: random handlers on the reference SDK's local runner and on durable_mp.

Each seed gives one handler (``diffgen.generate``) as source text; the same text runs
under ``aws_durable_execution_sdk_python_testing.DurableFunctionTestRunner`` and under
``durable_mp.testing.DurableFunctionTestRunner``, both with ``skip_time=True``.  Compared:
the invocation status and error (type, message), the handler's result, which embeds every
``BatchResult`` the handler saw (status, completion reason, success/failure/started/total
counts, each item's status, result, error type and message), and the operation tree
(depth, type, sub type, name, status, attempt of every operation).

The only differences allowed are DESIGN.md §1's, each a named rule below:

* ``rule_error_types_name_their_sdk``: an error type is qualified by its SDK's module
  (``aws_durable_execution_sdk_python.exceptions.StepError`` is
  ``durable_mp.exceptions.StepError``): same names, same modules, under ``durable_mp``.
* ``rule_failure_completion_reason_from_final_state``: a batch stopped by failures
  reports ``ALL_COMPLETED`` in durable_mp when every one of its inputs ran to an end
  (the reference says ``FAILURE_TOLERANCE_EXCEEDED``); items and counts are the same.
* ``rule_racing_batch_compares_the_items_both_ended``: in a batch that can complete early
  with several items in flight (``diffgen`` marks it ``racing``), which items end before
  the decision races in both SDKs, and a failure-triggered completion lets durable_mp's
  running siblings finish where the reference reports them STARTED (a success-triggered
  one terminates them): only items both report ended are compared; durable_mp's counts,
  indices and status must still agree with its items.
* ``rule_step_names_default_to_the_functions_name``: a step called without ``name`` is
  named after its function in durable_mp; the reference leaves it None.
* ``rule_racing_batches_leave_their_operations_unchecked``: for the same reason as the
  racing rule above, the operation tree of a handler with a racing batch is not compared.

Not observable here, so no rule is needed: pickle serdes (results are JSON values
either way; payloads are not compared).  Every
other batch that can complete early runs with ``max_concurrency=1``, so its outcome does
not depend on thread timing, and must be equal.

``DURABLE_MP_DIFF_HANDLERS=<n>`` runs n handlers (default ``DEFAULT_HANDLERS``),
``DURABLE_MP_DIFF_SEED=<n>`` replays one.  A failing seed prints its source and both outcomes.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytest

import diffgen
from diffgen import Outcome

pytest.importorskip("aws_durable_execution_sdk_python_testing")

from durable_mp.store.facade import Store  # noqa: E402
from durable_mp.testing import DurableFunctionTestRunner as MpRunner  # noqa: E402

DEFAULT_HANDLERS = 240
REFERENCE_THREADS = 12  # the reference sleeps real seconds for waits inside a batch: overlap them
SHOWN_FAILURES = 3  # seeds printed in full; the rest are listed

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


def rule_racing_batch_compares_the_items_both_ended(ref: dict, mp: dict) -> list[str]:
    """With several items in flight and a config that can complete early, which items end
    before the decision is a race in both SDKs, and DESIGN.md §1 lets a failure-triggered
    completion finish the running siblings where the reference reports them STARTED (a
    success-triggered one terminates them in both).  So only an item both report ended is
    compared (its outcome does not race); durable_mp's summary must still add up.
    Returns what breaks the rule."""
    out = []
    finished = {item[0]: item for item in ref["items"] if item[1] != "STARTED"}
    for item in mp["items"]:
        theirs = finished.get(item[0])
        if theirs is not None and item[1] != "STARTED":
            out.extend(item_differences(theirs, item, f"all[{item[0]}]"))
    statuses = [item[1] for item in mp["items"]]
    indices = [item[0] for item in mp["items"]]
    counts = [statuses.count("SUCCEEDED"), statuses.count("FAILED"), statuses.count("STARTED"), len(statuses)]
    if mp["counts"] != counts or indices != sorted(set(indices)) or not set(indices) <= set(range(mp["inputs"])):
        out.append(f"durable_mp's items {indices} {statuses} do not add up to counts {mp['counts']}")
    custom = {"CUSTOM_COMPLETION_FAILED": "FAILED", "CUSTOM_COMPLETION_SUCCEEDED": "SUCCEEDED"}
    if mp["status"] != custom.get(mp["reason"], "FAILED" if "FAILED" in statuses else "SUCCEEDED"):
        out.append(f"durable_mp's status {mp['status']} with {mp['reason']} and items {statuses}")
    return out


def rule_step_names_default_to_the_functions_name(mp_operations: list[tuple]) -> list[tuple]:
    """A step called without ``name`` is named after its function (``__name__``) in
    durable_mp, where the reference leaves the name None (DESIGN.md §1): durable_mp's
    operations as the reference would name them.  Every generated step function is
    ``diffgen``'s ``flaky`` body, named ``STEP_FUNCTION``."""
    return sorted(((*op[:3], None, *op[4:]) if op[1] == "STEP" and op[3] == diffgen.STEP_FUNCTION else op
                   for op in mp_operations), key=str)


def rule_racing_batches_leave_their_operations_unchecked(handler: diffgen.Generated) -> bool:
    """Operations of a handler with a racing batch are not compared: which branches ran how
    far races, and the reference leaves orphaned branches' operations STARTED where durable_mp
    terminates (success) or finishes (failure) them (DESIGN.md §1)."""
    return handler.racing


RULES: tuple[Callable[..., Any], ...] = (rule_error_types_name_their_sdk,
                                         rule_failure_completion_reason_from_final_state,
                                         rule_racing_batch_compares_the_items_both_ended,
                                         rule_step_names_default_to_the_functions_name,
                                         rule_racing_batches_leave_their_operations_unchecked)


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
    if ref["racing"]:
        return [f"{path}: {found}" for found in rule_racing_batch_compares_the_items_both_ended(ref, mp)]
    out = []
    if ref["status"] != mp["status"]:
        out.append(f"{path}: status {ref['status']} != {mp['status']}")
    if ref["reason"] != mp["reason"] and not rule_failure_completion_reason_from_final_state(ref, mp):
        out.append(f"{path}: completion_reason {ref['reason']} != {mp['reason']}")
    if ref["counts"] != mp["counts"]:
        out.append(f"{path}: counts (success, failure, started, total) {ref['counts']} != {mp['counts']}")
        return out  # the items differ too; the counts say how
    for ref_item, mp_item in zip(ref["items"], mp["items"], strict=True):
        out.extend(item_differences(ref_item, mp_item, f"{path}.all[{ref_item[0]}]"))
    return out


def item_differences(ref: list, mp: list, where: str) -> list[str]:
    """One ``BatchItem``: ``[index, status, result, [error type, message] or None]``."""
    (index, status, result, error), (mp_index, mp_status, mp_result, mp_error) = ref, mp
    if (index, status) != (mp_index, mp_status):
        return [f"{where}: item {index} {status} != item {mp_index} {mp_status}"]
    out = []
    if (error is None) != (mp_error is None):
        out.append(f"{where}: error {error} != {mp_error}")
    elif error is not None and error[0] != mp_error[0] and not rule_error_types_name_their_sdk(error[0], mp_error[0]):
        out.append(f"{where}: error type {error[0]} != {mp_error[0]}")
    elif error is not None and error[1] != mp_error[1]:
        out.append(f"{where}: error message {error[1]!r} != {mp_error[1]!r}")
    return out + differences(result, mp_result, f"{where}.result")


def outcome_differences(ref: Outcome, mp: Outcome, handler: diffgen.Generated) -> list[str]:
    if ref.status != mp.status:
        return [f"invocation status {ref.status} != {mp.status}"]
    if (ref.error is None) != (mp.error is None):
        return [f"invocation error {ref.error} != {mp.error}"]
    if ref.error is not None and mp.error is not None:
        (kind, message), (mp_kind, mp_message) = ref.error, mp.error
        if kind != mp_kind and not rule_error_types_name_their_sdk(kind, mp_kind):
            return [f"invocation error type {kind} != {mp_kind}"]
        if message != mp_message:
            return [f"invocation error message {message!r} != {mp_message!r}"]
    found = differences(ref.result, mp.result)
    mp_operations = rule_step_names_default_to_the_functions_name(mp.operations)
    if not found and not rule_racing_batches_leave_their_operations_unchecked(handler) \
            and ref.operations != mp_operations:
        only_ref = sorted(set(ref.operations) - set(mp_operations), key=str)
        only_mp = sorted(set(mp_operations) - set(ref.operations), key=str)
        found.append(f"operations: only the reference {only_ref[:4]}, only durable_mp {only_mp[:4]}")
    return found


# -- running --------------------------------------------------------------------------------------
def run_durable_mp(seed: int, source: str, store: Store) -> Outcome:
    handler = diffgen.build(source, diffgen.DURABLE_MP, f"diff_mp_{seed}")
    with MpRunner(handler=handler, skip_time=True, store=store) as runner:
        return Outcome.of(runner.run(input="{}", execution_timeout=diffgen.RUN_TIMEOUT))


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
    handlers = {seed: diffgen.generate(seed) for seed in chosen}
    sources = {seed: handler.source for seed, handler in handlers.items()}
    started = time.monotonic()
    # spawn: a fork of this process could inherit a lock held by one of its threads
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = pool.submit(diffgen.run_references, sources, REFERENCE_THREADS)
        store = Store(str(tmp_path / "store"))
        try:
            mp = {seed: run_durable_mp(seed, source, store) for seed, source in sources.items()}
        finally:
            store.close()
        mp_seconds = time.monotonic() - started
        ref = pending.result()
    failures = [(seed, found) for seed in chosen if (found := outcome_differences(ref[seed], mp[seed], handlers[seed]))]
    with capsys.disabled():
        print(f"\ndifferential: {len(chosen)} handlers in {time.monotonic() - started:.1f} s "
              f"(durable_mp {mp_seconds:.1f} s), {len(failures)} differ", file=sys.stderr)
    if failures:
        shown = [report(seed, sources[seed], ref[seed], mp[seed], found) for seed, found in failures[:SHOWN_FAILURES]]
        listed = ", ".join(f"{seed} ({found[0]})" for seed, found in failures)
        pytest.fail(f"{len(failures)} of {len(chosen)} handlers differ from the reference:\n" + "\n\n".join(shown)
                    + f"\nall differing seeds: {listed}", pytrace=False)


# -- the comparison itself ---------------------------------------------------------------------
def batch(reason: str, counts: list[int], items: list[list], inputs: int | None = None, status: str = "FAILED",
          racing: bool = False):
    return {"__batch__": True, "inputs": inputs if inputs is not None else counts[3], "racing": racing,
            "status": status, "reason": reason, "counts": counts, "items": items}


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
    # a racing batch: items both ended must agree; one only durable_mp finished is fine
    ref_items = [[0, "FAILED", None, ["ValueError", "x"]], [1, "STARTED", None, None]]
    mp_items = [[0, "FAILED", None, ["ValueError", "x"]], [1, "SUCCEEDED", "b", None], [2, "SUCCEEDED", "c", None]]
    ref = batch("FAILURE_TOLERANCE_EXCEEDED", [0, 1, 1, 2], ref_items, inputs=3, racing=True)
    assert differences(ref, batch("ALL_COMPLETED", [2, 1, 0, 3], mp_items, racing=True)) == []
    wrong = [[0, "SUCCEEDED", "a", None], *mp_items[1:]]
    assert differences(ref, batch("ALL_COMPLETED", [3, 0, 0, 3], wrong, status="SUCCEEDED", racing=True))
    assert differences(ref, batch("ALL_COMPLETED", [2, 1, 0, 2], mp_items, racing=True))  # counts do not add up


def test_the_step_name_rule_renames_only_steps_named_after_the_generated_function():
    ops = [(0, "STEP", "Step", diffgen.STEP_FUNCTION, "SUCCEEDED", 1), (0, "STEP", "Step", "s1", "FAILED", 2),
           (0, "CONTEXT", "Parallel", diffgen.STEP_FUNCTION, "SUCCEEDED", None)]
    assert rule_step_names_default_to_the_functions_name(ops) == sorted(
        [(0, "STEP", "Step", None, "SUCCEEDED", 1), ops[1], ops[2]], key=str)
