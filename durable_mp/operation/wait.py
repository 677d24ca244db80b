"""``context.wait``: a durable sleep, recorded with the time it ends.

The STARTED record holds ``scheduled_end``, so a resumed execution only waits for what
is left of the duration, and a finished wait replays instantly.
"""

from __future__ import annotations

import time

from durable_mp.config import Duration
from durable_mp.core.records import OpStatus, OpType
from durable_mp.core.vocabulary import SubType
from durable_mp.exceptions import ValidationError
from durable_mp.operation.protocol import DurableContextProtocol
from durable_mp.operation.replay import open_operation


def wait(ctx: DurableContextProtocol, duration: Duration | float, name: str | None) -> None:
    seconds = duration.to_seconds() if isinstance(duration, Duration) else duration
    if seconds < 1:
        raise ValidationError(f"wait duration must be at least 1 second, got {seconds}")
    opening = open_operation(ctx, ctx._next_id(), OpType.WAIT, SubType.WAIT, name)
    if opening.is_done:
        return None
    rec = opening.record
    if rec is None:
        now = time.time()
        rec = opening.started(now=now, extra={"scheduled_end": now + seconds})
        ctx.state.emit(rec)
    ctx.state.sleep_until((rec.extra or {})["scheduled_end"])
    ctx.state.emit(rec._replace(status=OpStatus.SUCCEEDED, end_ts=time.time()))
    return None


__all__ = ["wait"]
