"""Callback ids: what an outside system is given to complete a callback.

An id is the callback operation's key (execution, parent, operation id) as URL-safe
base64 JSON, so anyone holding it and the store can find the record.  It lives in
``core`` because both the operation that creates callbacks and the inspection views that
show waiting ones (``show``, ``list``, history's ``CallbackStartedDetails``) need it.
"""

from __future__ import annotations

import base64
import json

from durable_mp.core.errors import ValidationError


def encode_callback_id(execution_id: str, parent_id: str, op_id: str) -> str:
    raw = json.dumps([execution_id, parent_id, op_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_callback_id(callback_id: str) -> tuple[str, str, str]:
    try:
        raw = base64.urlsafe_b64decode(callback_id + "=" * (-len(callback_id) % 4))
        execution_id, parent_id, op_id = json.loads(raw)
        return str(execution_id), str(parent_id), str(op_id)
    except (ValueError, TypeError) as exc:
        raise ValidationError(f"not a durable_mp callback id: {callback_id!r}") from exc
