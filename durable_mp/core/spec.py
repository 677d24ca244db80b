"""What a parallel/map hands to the state that runs it: one plain record, no behaviour."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from durable_mp.core.item_probe import succeeded
from durable_mp.core.vocabulary import default_item_name


@dataclass
class BatchSpec:
    """One parallel/map call, as the context resolved it.

    ``funcs`` is set for parallel (one callable per branch), ``func`` + ``inputs`` for
    map.  ``done`` holds branches that already have a terminal checkpoint (resume);
    ``resuming`` says whether partial checkpoints may exist under other branches.
    A record in ``done`` / ``unfinished`` is an ``OpRecord`` or its stored bytes
    (``core.item_probe`` reads their status; results are decoded only for the BatchResult).
    ``unfinished`` holds the non-terminal records of a resumed batch (reopened attempts).
    """

    op_id: str
    sub_type: str
    item_sub_type: str
    name: str | None
    n: int
    names: list | None
    funcs: list | None
    func: Callable | None
    inputs: Sequence | None
    item_serdes: Any
    max_concurrency: int | None
    branch_timeout: float | None
    policy: Any
    execution_id: str = ""
    done: dict[int, Any] = field(default_factory=dict)
    resuming: bool = False
    unfinished: dict[int, Any] = field(default_factory=dict)
    done_ok: dict[int, bool] | None = None  # {index: succeeded} of ``done``, when the caller probed it
    flat: bool = False  # NestingType.FLAT: branches run in virtual contexts (``core.nesting``)
    skip_time: bool = False  # sleeps are instant: the batch runs on a virtual clock (``engine.virtual_clock``)

    def done_succeeded(self) -> dict[int, bool]:
        """``{index: succeeded}`` of the branches in ``done``, each status probed once."""
        if self.done_ok is None:
            self.done_ok = {index: succeeded(rec) for index, rec in self.done.items()}
        return self.done_ok

    def replay_done(self) -> dict[int, Any]:
        """Tell the completion policy about branches finished in an earlier run; their records."""
        self.policy.on_replayed(self.done_succeeded())
        return dict(self.done)

    def replay_into(self, records: Any) -> None:
        """``replay_done`` into ``records`` (``ItemColumns``, ``RunningColumns``): no copy of the done records' dict."""
        self.policy.on_replayed(self.done_succeeded())
        records.add_records(self.done)

    def item_name(self, index: int) -> str:
        if self.names is not None:
            return self.names[index]
        return default_item_name(index, parallel=self.funcs is not None)
