"""docs/architecture.md "Packages": dependencies point one way, and moved classes keep their public names.

CI's import-cycle check catches cycles; these tests catch an import that points the wrong
way before it closes one (every import counts, also in functions and TYPE_CHECKING blocks).
"""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest

import durable_mp
from durable_mp.exceptions import DurableExecutionsError, InvalidStateError, ValidationError
from durable_mp.lambda_service import ErrorObject, error_type_name

pytestmark = pytest.mark.process_free  # no test here starts a process

PACKAGE = Path(durable_mp.__file__).parent
FOUNDATIONS = ("config", "retries", "waits", "serdes", "types", "exceptions", "lambda_service", "jitter",
               "_compat", "logger", "concurrency.models", "concurrency.rule", "concurrency.policy", "decorators")
ABOVE_FOUNDATIONS = ("context", "execution", "engine", "operation", "backends", "cli")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """durable_mp modules (without the ``durable_mp.`` prefix) that ``path`` imports anywhere."""
    is_package = path.name == "__init__.py"
    base = _module_name(path).split(".")[: None if is_package else -1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                module = ".".join(base[: len(base) - node.level + 1] + ([module] if module else []))
            names = [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name.split(".", 1)[1] for name in names if name.startswith("durable_mp."))
    return found


def _imports_of(module: str) -> set[str]:
    path = PACKAGE / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = PACKAGE / module.replace(".", "/") / "__init__.py"
    return _imports(path)


def _package_modules(package: str) -> list[str]:
    return sorted(_module_name(p)[len("durable_mp."):] for p in (PACKAGE / package).glob("*.py"))


def _starts(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("module", FOUNDATIONS)
def test_foundations_import_nothing_above_them(module):
    assert sorted(i for i in _imports_of(module) if _starts(i, ABOVE_FOUNDATIONS)) == []


@pytest.mark.parametrize("module", _package_modules("core"))
def test_core_imports_only_core(module):
    assert sorted(i for i in _imports_of(module) if not _starts(i, ("core",))) == []


@pytest.mark.parametrize("module", _package_modules("operation"))
def test_operations_do_not_import_the_context_that_calls_them(module):
    assert sorted(i for i in _imports_of(module) if _starts(i, ("context", "execution"))) == []


# The one import of ``store`` in ``operation``: the callback senders' documented home re-exports them.
STORE_REEXPORTS = {"operation.callback": {"store.callbacks.send_callback_success", "store.callbacks.send_callback_failure",
                                          "store.callbacks.send_callback_heartbeat"}}


@pytest.mark.parametrize("module", _package_modules("operation"))
def test_operations_never_reach_into_the_store(module):
    """An operation reads records through its context's state (``engine.state.ContextState``), never the store."""
    allowed = STORE_REEXPORTS.get(module, set())
    assert sorted(i for i in _imports_of(module) if _starts(i, ("store",)) and i not in allowed) == []


def test_the_store_reexports_of_operations_are_only_reexports():
    """Each allowed name is re-exported under its own name and not used by the module itself."""
    for module, names in STORE_REEXPORTS.items():
        path = PACKAGE / (module.replace(".", "/") + ".py")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = {f"{node.module}.{a.name}"[len("durable_mp."):]: a.asname for node in ast.walk(tree)
                   if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("durable_mp.store")
                   for a in node.names}
        assert set(aliases) == names
        assert all(name.rsplit(".", 1)[1] == alias for name, alias in aliases.items())
        used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        assert not used & {name.rsplit(".", 1)[1] for name in names}


@pytest.mark.parametrize("module", _package_modules("inspect"))
def test_inspect_uses_only_core_and_store(module):
    assert sorted(i for i in _imports_of(module) if not _starts(i, ("core", "store", "inspect"))) == []


def test_the_root_errors_keep_their_public_names():
    """They are defined in ``core.errors``; checkpoints and tracebacks still name ``exceptions``."""
    for cls in (DurableExecutionsError, ValidationError, InvalidStateError):
        assert error_type_name(cls("x")) == f"durable_mp.exceptions.{cls.__name__}"
        assert ErrorObject.from_exception(cls("x")).type == f"durable_mp.exceptions.{cls.__name__}"
        copy = pickle.loads(pickle.dumps(cls("x")))
        assert type(copy) is cls and copy.args == ("x",)


def test_reference_homes_of_moved_names_are_the_same_objects():
    from durable_mp import ParallelBranch, config, context, decorators, retries, serdes
    from durable_mp.core import serdes_base

    assert context.ParallelBranch is config.ParallelBranch is ParallelBranch
    assert context.durable_step is decorators.durable_step
    assert serdes.SerDes is serdes_base.SerDes and serdes.SerDesContext is serdes_base.SerDesContext
    assert retries.with_retry is durable_mp.with_retry


@pytest.mark.parametrize("module", _package_modules("engine"))
def test_the_engine_imports_nothing_above_it(module):
    """core ← store ← engine ← operation ← context/execution: the engine is handed what it needs from above."""
    wrong = {name for name in _imports_of(module) if _starts(name, ("operation", "context", "execution", "cli",
                                                                      "backends", "inspect"))}
    assert not wrong, f"{module} imports {sorted(wrong)}"
