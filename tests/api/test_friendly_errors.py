"""Issue 19 item 9: the smaller things a newcomer trips over, each said where it happens."""

from __future__ import annotations

import pathlib

import lmdb
import pytest

import durable_mp
from durable_mp import ValidationError, durable_execution

pytestmark = pytest.mark.timeout(60)


def test_a_handler_without_a_context_parameter_is_refused_at_decoration():
    def h(event):
        return event

    with pytest.raises(ValidationError, match=r"h.*\(event, context\)"):
        durable_execution(h)
    with pytest.raises(ValidationError, match=r"\(event, context\)"):
        durable_execution(store="x")(h)


def test_handlers_that_fit_are_still_accepted():
    durable_execution(lambda event, context: None)
    durable_execution(lambda *args: None)
    durable_execution(lambda event, context=None, extra=1: None)


def test_a_read_only_store_directory_is_said_to_be_read_only():
    from durable_mp.store.env import _open_failure

    path = pathlib.Path("/ro/store")
    text = _open_failure(path, lmdb.ReadonlyError(f"{path}: Read-only file system"))
    assert "read-only" in text and "not a valid LMDB store" not in text
    assert "store=" in text or "DURABLE_MP_STORE" in text


def test_a_map_timeout_is_named_as_the_map_parameter(store_path):
    with pytest.raises(ValidationError, match=r"^durable_mp.map timeout") as info:
        durable_mp.map(abs, [1, 2], store=store_path, timeout=-1)
    assert "branch_timeout" not in str(info.value)
