"""What a parallel/map hands to the state that runs it: one plain record, no behaviour."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from durable_mp.core.records import OpRecord, OpStatus


@dataclass
class BatchSpec:
    """One parallel/map call, as the context resolved it.

    ``funcs`` is set for parallel (one callable per branch), ``func`` + ``inputs`` for
    map.  ``done`` holds branches that already have a terminal checkpoint (resume);
    ``resuming`` says whether partial checkpoints may exist under other branches.
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
    done: dict[int, OpRecord] = field(default_factory=dict)
    resuming: bool = False

    def replay_done(self) -> dict[int, OpRecord]:
        """Tell the completion policy about branches finished in an earlier run; their records."""
        for index, rec in self.done.items():
            self.policy.on_started(index)
            self.policy.on_finished(index, rec.status == OpStatus.SUCCEEDED)
        return dict(self.done)

    def item_name(self, index: int) -> str:
        if self.names is not None:
            return self.names[index]
        return f"parallel-branch-{index}" if self.funcs is not None else f"map-item-{index}"
