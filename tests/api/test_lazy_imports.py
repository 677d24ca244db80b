"""``import durable_mp`` is cheap: public names are imported on first use (PEP 562, issue 23 target 4).

A spawned worker and a fork server import ``durable_mp`` (every submodule import does), so
what the package's ``__init__`` imports is paid by every worker start under ``spawn`` and
``forkserver``.  The names themselves stay the same objects, wherever they are imported from.
"""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import durable_mp

# What only the driver needs: the store (lmdb, psutil), the dispatcher, the command line.
DRIVER_ONLY = ("lmdb", "psutil", "tqdm", "numpy", "durable_mp.store.facade", "durable_mp.engine.dispatcher",
               "durable_mp.engine.pool", "durable_mp.execution", "durable_mp.cli", "durable_mp.inspect")


def _loaded_after(code: str) -> list[str]:
    program = f"{code}\nimport sys\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60,
                         cwd=str(durable_mp.__path__[0] + "/.."))
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.timeout(90)
def test_importing_the_package_imports_none_of_its_modules():
    loaded = _loaded_after("import durable_mp")
    assert [m for m in loaded if m.startswith("durable_mp.")] == []


@pytest.mark.timeout(90)
def test_what_a_worker_imports_leaves_the_driver_side_out():
    loaded = set(_loaded_after("import durable_mp.engine.start, durable_mp.context"))
    assert sorted(loaded & set(DRIVER_ONLY)) == []


@pytest.mark.timeout(90)
def test_a_public_name_still_imports_its_module():
    loaded = set(_loaded_after("from durable_mp import durable_execution"))
    assert "durable_mp.execution" in loaded


def test_public_names_are_the_objects_of_their_modules():
    for module, names in durable_mp._HOMES.items():
        mod = importlib.import_module(module)
        for name in names:
            assert getattr(durable_mp, name) is getattr(mod, name), name
    assert set(durable_mp.__all__) - {"__version__"} == set(durable_mp._HOME_OF)
    assert set(durable_mp.__all__) <= set(dir(durable_mp))


@pytest.mark.timeout(90)
def test_a_submodule_is_reachable_as_an_attribute_as_when_everything_was_imported():
    program = ("import durable_mp; print(durable_mp.config.StepConfig.__name__, "
               "durable_mp.serdes.PickleSerDes.__name__)")
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60,
                         cwd=str(durable_mp.__path__[0] + "/.."))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["StepConfig", "PickleSerDes"]


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        durable_mp.no_such_name  # noqa: B018
    with pytest.raises(ImportError):
        from durable_mp import no_such_name  # noqa: F401


def test_the_callback_senders_keep_their_documented_home():
    from durable_mp.operation import callback
    from durable_mp.store import callbacks

    for name in ("send_callback_success", "send_callback_failure", "send_callback_heartbeat"):
        assert getattr(callback, name) is getattr(callbacks, name)
    with pytest.raises(AttributeError):
        callback.no_such_sender  # noqa: B018


@pytest.mark.timeout(90)
def test_a_process_that_never_imported_the_context_still_builds_branch_contexts():
    """A Dask worker imports the engine, not ``durable_mp.context``; the engine imports it by name."""
    program = ("import sys; from durable_mp.engine.state import context_factory; "
               "assert 'durable_mp.context' not in sys.modules; print(context_factory().__name__)")
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60,
                         cwd=str(durable_mp.__path__[0] + "/.."))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "DurableContext"


# What a fresh worker no longer imports before its first branch (issue 23 target 4): each is
# loaded on first use, by a branch that calls an operation, pickles by value, nests a batch.
WORKER_LEAVES_OUT = ("cloudpickle", "_hashlib", "durable_mp.config", "durable_mp.concurrency.models",
                     "durable_mp.concurrency.policy", "durable_mp.operation.step", "durable_mp.operation.batch",
                     "durable_mp.operation.replay", "durable_mp.retries", "durable_mp.waits", "durable_mp.decorators",
                     "durable_mp.types", "durable_mp.core.spec", "durable_mp.engine.threads")


@pytest.mark.timeout(90)
def test_what_a_worker_imports_leaves_the_operations_and_cloudpickle_out():
    loaded = set(_loaded_after("import durable_mp.engine.start, durable_mp.context"))
    assert sorted(loaded & set(WORKER_LEAVES_OUT)) == []


@pytest.mark.process_free
def test_the_names_the_reference_imports_from_context_are_still_there():
    from durable_mp import config, decorators, types, waits
    from durable_mp.context import (
        ParallelBranch,
        StepContext,
        WaitForCallbackContext,
        WaitForConditionConfig,
        durable_parallel_branch,
        durable_step,
        durable_wait_for_callback,
        durable_with_child_context,
    )

    assert ParallelBranch is config.ParallelBranch and WaitForConditionConfig is waits.WaitForConditionConfig
    assert StepContext is types.StepContext and WaitForCallbackContext is types.WaitForCallbackContext
    assert (durable_step, durable_parallel_branch, durable_wait_for_callback, durable_with_child_context) == (
        decorators.durable_step, decorators.durable_parallel_branch, decorators.durable_wait_for_callback,
        decorators.durable_with_child_context)
    with pytest.raises(ImportError):
        from durable_mp.context import no_such_name  # noqa: F401


@pytest.mark.process_free
def test_a_batch_result_is_still_an_envelope_once_its_module_is_loaded():
    """envelope recognises BatchResult without importing its module: no value can be one before."""
    from durable_mp.concurrency.models import BatchResult
    from durable_mp.envelope import decode_envelope, envelope_of

    result = BatchResult.from_dict({"all": [], "completionReason": "ALL_COMPLETED"})
    text = envelope_of(result)
    assert text is not None and '"br"' in text
    assert decode_envelope(text).to_dict() == result.to_dict()
