"""Where a store may live: the advice durable_mp gives for unsafe or missing directories.

A store directory is refused when others can write it (loading a checkpoint unpickles
it).  The advice must be safe to follow: never change the mode of a directory durable_mp
did not create (``/tmp``!), name the exact change otherwise, and never create a chain of
missing parents for a mistyped path.
"""

from __future__ import annotations

import os
import stat

import pytest

from durable_mp.exceptions import StoreError
from durable_mp.store.facade import Store

pytestmark = pytest.mark.process_free  # no test here starts a process


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_world_writable_directory_durable_mp_did_not_create_gets_a_subdirectory_not_chmod(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # like /tmp
    with pytest.raises(StoreError) as info:
        Store(shared)
    text = str(info.value)
    assert "chmod" not in text, text
    assert str(shared / "durable_mp") in text  # a subdirectory durable_mp will create with mode 0700
    assert _mode(shared) == 0o1777  # nothing changed
    Store(shared / "durable_mp").close()  # and the advice works
    assert _mode(shared / "durable_mp") == 0o700


def test_store_equal_to_tmp_never_suggests_chmod_of_tmp():
    with pytest.raises(StoreError) as info:
        Store("/tmp")
    text = str(info.value)
    assert "chmod" not in text and "/tmp/durable_mp" in text, text


def test_existing_own_directory_nobody_else_can_write_is_accepted(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    os.chmod(mine, 0o755)
    Store(mine).close()
    assert (mine / "data.mdb").exists()
    assert _mode(mine) == 0o755  # not ours to change


def test_group_writable_directory_from_umask_002_says_exactly_what_to_change(tmp_path):
    runs = tmp_path / "runs"
    old = os.umask(0o002)
    try:
        runs.mkdir()
    finally:
        os.umask(old)
    assert _mode(runs) == 0o775
    with pytest.raises(StoreError) as info:
        Store(runs)
    text = str(info.value)
    assert "group" in text and "0775" in text  # which bit is the problem
    assert f"store={str(runs / 'durable_mp')!r}" in text  # what to pass instead
    assert "chmod" not in text  # durable_mp did not create it
    assert not (runs / "data.mdb").exists()


def test_store_durable_mp_created_that_became_group_writable_gets_the_exact_chmod(tmp_path):
    path = tmp_path / "store"
    Store(path).close()
    os.chmod(path, 0o770)
    with pytest.raises(StoreError) as info:
        Store(path)
    assert f"chmod go-w {path}" in str(info.value)
    os.chmod(path, 0o700)
    os.chmod(path / "data.mdb", 0o664)
    with pytest.raises(StoreError) as info:
        Store(path)
    assert f"chmod go-w {path / 'data.mdb'}" in str(info.value)


def test_only_the_last_component_is_created(tmp_path):
    Store(tmp_path / "new").close()  # the last component: created
    assert _mode(tmp_path / "new") == 0o700
    deep = tmp_path / "typo" / "deeper" / "store"
    with pytest.raises(StoreError) as info:
        Store(deep)
    text = str(info.value)
    assert str(tmp_path / "typo" / "deeper") in text and "does not exist" in text
    assert "mkdir -p" in text
    assert not (tmp_path / "typo").exists()
