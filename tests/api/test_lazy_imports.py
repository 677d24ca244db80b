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
