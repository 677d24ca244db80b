"""Issue 19: which computation a ``durable_mp.map`` call is, and which stored results it may reuse.

Two calls that differ in the function (which lambda, closure values, the instance behind a
bound method, a partial's arguments, a callable object's state) never share results; a
call of the same computation reuses every item already computed by the same code in the
same store, and changed code is never returned silently.  Items count their runs with
marker files (``bench.markers``) so the tests see exactly which items ran.
"""

from __future__ import annotations

import functools
import os
import pickle
import threading
import time
import traceback

import numpy as np
import pytest

import durable_mp
from durable_mp import ValidationError
from durable_mp.bench.markers import counts, mark

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def markers(tmp_path, monkeypatch):
    path = tmp_path / "markers"
    path.mkdir()
    monkeypatch.setenv("MAP_TEST_MARKERS", str(path))
    return path


def ran(markers) -> dict[int, int]:
    return counts(str(markers), "item")


def counted(x):
    mark(os.environ["MAP_TEST_MARKERS"], f"item-{x}")
    return x * 2


# -- 1. identity -----------------------------------------------------------------------------


def test_two_lambdas_on_one_line_do_not_share_results(store_path):
    a = durable_mp.map(lambda x: x + 1, range(5), store=store_path); b = durable_mp.map(lambda x: x * 10, range(5), store=store_path)  # noqa: E501,E702
    assert a == [1, 2, 3, 4, 5]
    assert b == [0, 10, 20, 30, 40]


def test_closures_over_different_values_do_not_share_results(store_path):
    out = []
    for k in (2, 3):
        out.append(durable_mp.map(lambda x: x * k, range(4), store=store_path))  # noqa: B023 - k is the point
    assert out == [[0, 2, 4, 6], [0, 3, 6, 9]]


def make_scaler(k):
    def scale(x):
        return x * k
    return scale


def test_nested_functions_with_other_closure_values_do_not_share_results(store_path):
    assert durable_mp.map(make_scaler(2), range(3), store=store_path) == [0, 2, 4]
    assert durable_mp.map(make_scaler(5), range(3), store=store_path) == [0, 5, 10]


K = 2


def times_global(x):
    return x * K


def test_a_global_value_the_function_reads_is_part_of_it(store_path, monkeypatch):
    assert durable_mp.map(times_global, range(3), store=store_path) == [0, 2, 4]
    monkeypatch.setattr(__import__(__name__), "K", 7)
    assert durable_mp.map(times_global, range(3), store=store_path) == [0, 7, 14]


class Scaler:
    def __init__(self, factor):
        self.factor = factor

    def apply(self, x):
        return x * self.factor

    def __call__(self, x):
        return x + self.factor


def test_bound_methods_of_two_instances_do_not_share_results(store_path):
    assert durable_mp.map(Scaler(2).apply, range(4), store=store_path) == [0, 2, 4, 6]
    assert durable_mp.map(Scaler(5).apply, range(4), store=store_path) == [0, 5, 10, 15]


def test_callable_objects_run_and_their_state_tells_them_apart(store_path):
    assert durable_mp.map(Scaler(1), range(3), store=store_path) == [1, 2, 3]
    assert durable_mp.map(Scaler(10), range(3), store=store_path) == [10, 11, 12]


def power(x, exponent):
    return x ** exponent


def test_partials_run_and_their_arguments_tell_them_apart(store_path):
    assert durable_mp.map(functools.partial(power, exponent=2), range(4), store=store_path) == [0, 1, 4, 9]
    assert durable_mp.map(functools.partial(power, exponent=3), range(4), store=store_path) == [0, 1, 8, 27]


def test_defaults_and_name_are_part_of_the_identity():
    from durable_mp.identity import callable_identity

    def f(x, n=1):
        return x + n

    def g(x, n=2):
        return x + n

    g.__qualname__ = f.__qualname__
    g.__code__ = f.__code__.replace()
    assert callable_identity(f) != callable_identity(g)
    assert durable_mp.pmap.execution_id_for(f, [1]) != durable_mp.pmap.execution_id_for(f, [1], name="other")


def test_an_unhashable_closure_value_is_named_with_the_parameter_that_fixes_it(store_path):
    lock = threading.Lock()

    def guarded(x):
        with lock:
            return x

    with pytest.raises(ValidationError, match=r"closure variable 'lock' of .*guarded.*name="):
        durable_mp.map(guarded, range(3), store=store_path)


def test_the_same_function_made_twice_is_the_same_computation():
    from durable_mp.identity import callable_identity

    assert callable_identity(make_scaler(2)) == callable_identity(make_scaler(2))
    assert callable_identity(Scaler(2).apply) == callable_identity(Scaler(2).apply)
    assert callable_identity(make_scaler(2)) != callable_identity(make_scaler(3))


def test_large_arrays_and_bytes_are_hashed_from_their_buffers():
    from durable_mp.core.digest import value_digest

    rows = list(np.arange(200 * 1024, dtype=np.float64).reshape(200, 1024))
    assert value_digest(rows) == value_digest([r.copy() for r in rows])
    changed = [r.copy() for r in rows]
    changed[150][3] += 1
    assert value_digest(rows) != value_digest(changed)
    assert value_digest(np.zeros(4, "f4")) != value_digest(np.zeros(4, "f8"))
    assert value_digest(np.zeros((2, 2))) != value_digest(np.zeros(4))
    assert value_digest(b"abc") != value_digest(bytearray(b"abd"))
    # no pickle of the arrays: a numpy subclass that refuses to pickle still hashes as an array would
    assert value_digest(np.ones(3)) == value_digest(np.ones(3)[:, None].reshape(3))


def test_large_items_hashed_on_threads_get_the_same_keys_and_the_same_first_error():
    """Rows of a megabyte are hashed on several threads (issue 23 target 3): same digests, in
    input order, and the first item that cannot be hashed is the one named."""
    from durable_mp.core.digest import value_digest
    from durable_mp.pmap import PARALLEL_HASH_BYTES, _item_keys

    rows = [np.full(PARALLEL_HASH_BYTES // 8, float(i)) for i in range(7)]
    assert _item_keys(rows, None) == b"".join(value_digest(r, f"item {i}") for i, r in enumerate(rows))
    assert _item_keys(rows, None) != _item_keys(rows[::-1], None)
    bad = [*rows[:3], threading.Lock(), *rows[3:], threading.Lock()]
    with pytest.raises(ValidationError, match=r"item 3\b"):
        _item_keys(bad, None)


# -- 2. code fingerprint ---------------------------------------------------------------------


SOURCE = "def work(x):\n    return x * 2\n"


def test_code_digest_ignores_lines_and_sees_constants_and_nested_code():
    from durable_mp.identity import code_digest

    def compile_work(text):
        space: dict = {}
        exec(compile(text, "<work>", "exec"), space)
        return space["work"]

    base = code_digest(compile_work(SOURCE))
    assert code_digest(compile_work("\n\n# moved\n" + SOURCE)) == base
    assert code_digest(compile_work(SOURCE.replace("2", "3"))) != base
    nested = "def work(x):\n    return sorted([x], key=lambda v: v + {})\n"
    assert code_digest(compile_work(nested.format(1))) != code_digest(compile_work(nested.format(2)))


def doubling(x):
    mark(os.environ["MAP_TEST_MARKERS"], f"item-{x}")
    return x * 2


def tripling(x):
    mark(os.environ["MAP_TEST_MARKERS"], f"item-{x}")
    return x * 3


@pytest.fixture
def restore_code():
    """Put back the code of the functions a test edits in place."""
    saved = {func: func.__code__ for func in (doubling, buggy)}
    yield
    for func, code in saved.items():
        func.__code__ = code


def test_changed_code_after_success_recomputes_and_keep_returns_the_old(store_path, markers, restore_code,
                                                                        capfd):
    assert durable_mp.map(doubling, range(4), store=store_path) == [0, 2, 4, 6]
    doubling.__code__ = tripling.__code__  # the same function, edited
    assert durable_mp.map(doubling, range(4), store=store_path, on_code_change="keep") == [0, 2, 4, 6]
    assert "CHANGED" in capfd.readouterr().err
    assert ran(markers) == {i: 1 for i in range(4)}
    assert durable_mp.map(doubling, range(4), store=store_path) == [0, 3, 6, 9]
    assert "code changed" in capfd.readouterr().err
    assert ran(markers) == {i: 2 for i in range(4)}
    assert durable_mp.map(doubling, range(4), store=store_path) == [0, 3, 6, 9]
    assert ran(markers) == {i: 2 for i in range(4)}
    assert durable_mp.map(doubling, range(4), store=store_path, recompute=True) == [0, 3, 6, 9]
    assert ran(markers) == {i: 3 for i in range(4)}


def buggy(x):
    mark(os.environ["MAP_TEST_MARKERS"], f"item-{x}")
    if x == 5:
        raise KeyError(f"no row {x}")
    return x * 10


def fixed(x):
    mark(os.environ["MAP_TEST_MARKERS"], f"item-{x}")
    return x * 10


def test_changed_code_after_a_failure_is_the_fix_and_keeps_finished_items(store_path, markers, restore_code,
                                                                         capfd):
    with pytest.raises(KeyError):
        durable_mp.map(buggy, range(10), store=store_path, max_workers=2)
    first = ran(markers)
    capfd.readouterr()
    buggy.__code__ = fixed.__code__
    assert durable_mp.map(buggy, range(10), store=store_path, max_workers=2) == [x * 10 for x in range(10)]
    err = capfd.readouterr().err
    second = ran(markers)
    again = {i for i in second if second[i] > first.get(i, 0)}
    assert 5 in again and not again & ({i for i in first} - {5})
    assert "changed code" in err and "resuming:" in err
    lines = [line for line in err.splitlines() if "resuming" in line]
    assert len(lines) == 1 and "resume_failed" not in err and "branch" not in err


# -- 3. incremental re-runs ------------------------------------------------------------------


def test_a_grown_list_runs_only_its_new_items_and_a_reordered_one_runs_nothing(store_path, markers, capfd):
    assert durable_mp.map(counted, range(100), store=store_path) == [x * 2 for x in range(100)]
    assert durable_mp.map(counted, range(110), store=store_path) == [x * 2 for x in range(110)]
    assert ran(markers) == {i: 1 for i in range(110)}
    assert "100 of 110 items were already computed" in capfd.readouterr().err
    backwards = list(reversed(range(110)))
    assert durable_mp.map(counted, backwards, store=store_path) == [x * 2 for x in backwards]
    assert ran(markers) == {i: 1 for i in range(110)}
    changed = list(range(110))
    changed[42] = 1000
    assert durable_mp.map(counted, changed, store=store_path) == [x * 2 for x in changed]
    assert ran(markers) == {**{i: 1 for i in range(110)}, 1000: 1}


def read_file(path):
    mark(os.environ["MAP_TEST_MARKERS"], f"item-{os.path.basename(path)[1:-4]}")
    with open(path) as f:
        return f.read().upper()


def test_a_changed_file_recomputes_alone_with_file_key(store_path, markers, tmp_path):
    paths = []
    for i in range(6):
        path = tmp_path / f"f{i}.txt"
        path.write_text(f"text {i}")
        paths.append(str(path))
    assert durable_mp.map(read_file, paths, store=store_path, key=durable_mp.file_key) == [
        f"TEXT {i}" for i in range(6)]
    time.sleep(0.01)
    (tmp_path / "f3.txt").write_text("new text")
    out = durable_mp.map(read_file, paths, store=store_path, key=durable_mp.file_key)
    assert out[3] == "NEW TEXT" and out[:3] == ["TEXT 0", "TEXT 1", "TEXT 2"]
    assert ran(markers) == {0: 1, 1: 1, 2: 1, 3: 2, 4: 1, 5: 1}
    (tmp_path / "f4.txt").write_text("text 4")  # touched, same content: the content key reuses it
    durable_mp.map(read_file, paths, store=store_path, key=durable_mp.file_content_key)
    before = ran(markers)
    (tmp_path / "f4.txt").write_text("text 4")
    durable_mp.map(read_file, paths, store=store_path, key=durable_mp.file_content_key)
    assert ran(markers) == before


# -- 4. errors people expect -----------------------------------------------------------------


def test_except_key_error_catches_the_functions_key_error_with_a_short_chain(store_path, markers):
    try:
        durable_mp.map(buggy, range(8), store=store_path, max_workers=2)
    except KeyError as exc:
        assert exc.args == ("no row 5",) and exc.index == 5
        text = "".join(traceback.format_exception(exc))
    else:
        pytest.fail("no KeyError")
    assert text.count("The above exception was the direct cause") == 1
    assert "During handling" not in text
    assert 'raise KeyError(f"no row {x}")' in text and "item 5 of 8 failed" in text
    assert len(text.splitlines()) < 25, text


class Unpicklable:
    def __reduce__(self):
        raise TypeError("a socket cannot be pickled")


def test_an_unpicklable_item_is_named(store_path):
    with pytest.raises(ValidationError, match=r"item 2 .*key=.*worker"):
        durable_mp.map(counted, [1, 2, Unpicklable()], store=store_path)
    pickle.dumps(Scaler(1))


MAIN_SCRIPT = '''
import functools, sys
import durable_mp

class Scaler:
    def __init__(self, f):
        self.f = f

    def apply(self, x):
        return x * self.f

    def __call__(self, x):
        return x + self.f

def power(x, e):
    return x ** e

if __name__ == "__main__":
    store = sys.argv[1]
    print(durable_mp.map(Scaler(10), range(3), store=store), durable_mp.map(Scaler(20), range(3), store=store))
    print(durable_mp.map(Scaler(2).apply, range(3), store=store), durable_mp.map(Scaler(5).apply, range(3), store=store))
    print(durable_mp.map(functools.partial(power, e=2), range(3), store=store),
          durable_mp.map(functools.partial(power, e=3), range(3), store=store))
'''


def test_callables_defined_in_a_script_run_as_main(store_path, tmp_path):
    import subprocess
    import sys

    script = tmp_path / "callables.py"
    script.write_text(MAIN_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(durable_mp.__file__))}
    for _ in range(2):  # the second run returns the stored results
        done = subprocess.run([sys.executable, str(script), store_path], capture_output=True, text=True, timeout=90,
                              env=env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split("\n")[:3] == ["[10, 11, 12] [20, 21, 22]", "[0, 2, 4] [0, 5, 10]",
                                                "[0, 1, 4] [0, 1, 8]"], done.stdout


def test_show_says_which_items_were_reused_and_which_code_made_them(store_path, markers, restore_code, capsys):
    from durable_mp.cli.main import main
    from durable_mp.store.facade import Store

    with pytest.raises(KeyError):
        durable_mp.map(buggy, range(10), store=store_path, max_workers=1)
    buggy.__code__ = fixed.__code__
    durable_mp.map(buggy, range(10), store=store_path, max_workers=1)
    durable_mp.map(buggy, range(12), store=store_path, max_workers=1)
    with Store(store_path) as store:
        first, second = [rec.exec_id for rec in store.list_executions()]
    capsys.readouterr()
    assert main(["show", second, "--store", store_path]) == 0
    out = capsys.readouterr().out
    assert f"12 items: 2 computed here, 10 reused from {first}" in out, out
    assert main(["show", first, "--store", store_path]) == 0
    out = capsys.readouterr().out
    assert "10 items: 10 computed here" in out, out
    assert "run 1: code " in out and "run 2: code " in out and "(the fix" in out, out


def test_closures_over_classes_and_modules_are_named_not_pickled():
    import json
    import math

    from durable_mp.identity import callable_identity

    def make(kind, module):
        class Local:  # a local class cannot be pickled
            factor = kind

        def f(x):
            return module.floor(Local.factor * x)
        return f

    assert callable_identity(make(2, math)) == callable_identity(make(2, math))
    assert callable_identity(make(2, math)) != callable_identity(make(2, json))
    assert callable_identity(make(2, math)) != callable_identity(make(3, math))


class Model:
    def __init__(self, weights, tag):
        self.weights = weights
        self.tag = tag

    def predict(self, x):
        return float(self.weights.sum()) + x


def test_an_instance_with_array_attributes_is_hashed_from_its_buffers_not_pickled(monkeypatch):
    from durable_mp.core import digest
    from durable_mp.identity import callable_identity

    weights = np.arange(1 << 16, dtype=np.float64)
    base = callable_identity(Model(weights, "a").predict)
    monkeypatch.setattr(digest.pickle, "dumps", lambda *a, **k: pytest.fail("pickled"))
    assert callable_identity(Model(weights.copy(), "a").predict) == base
    changed = weights.copy()
    changed[7] = -1
    assert callable_identity(Model(changed, "a").predict) != base
    assert callable_identity(Model(weights, "b").predict) != base
    assert callable_identity(Model(weights, {"k": np.ones(2)}).predict) != callable_identity(
        Model(weights, {"k": np.zeros(2)}).predict)


def test_an_item_given_twice_is_reused_in_both_places(store_path, markers):
    assert durable_mp.map(counted, [1, 2], store=store_path) == [2, 4]
    assert durable_mp.map(counted, [2, 2, 1, 3, 3], store=store_path) == [4, 4, 2, 6, 6]
    assert ran(markers) == {1: 1, 2: 1, 3: 2}  # 3 was new, given twice: both ran
