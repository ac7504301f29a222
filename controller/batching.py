"""Which finished groups go into the next batch, and which are too old for any batch to come.

Batch ``b`` is trained at trainer version ``b``. A group's age for it is the staleness of its
oldest model token (`sample_staleness`; the tool output of a multi-turn sample is not counted);
a group older than ``max_token_staleness`` can never be trained again (later batches only make it
older), so it is dropped here.

Oldest first (earliest deadline first): a long response finishes late but old, and would miss its
last admissible batch behind fresh short ones if batches were filled in completion order.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from areal_py.wire import protocol as P
from controller.staleness import sample_staleness


@dataclass
class BatchPick:
    groups: list[P.Group]  # the batch, oldest first; empty when too few admissible groups are ready
    ages: list[int]  # staleness of each group in `groups`
    remaining: list[P.Group]  # admissible groups left waiting, oldest first
    dropped: int  # groups too old for this and every later batch
    stale: list[P.Group] = field(default_factory=list)  # those `dropped` groups, oldest first


def pick_batch(ready: Sequence[P.Group], batch_version: int, batch_size: int, max_token_staleness: int) -> BatchPick:
    """Drop groups with age > ``max_token_staleness``; take the ``batch_size`` oldest of the rest.

    The sort is stable, so equally old groups keep their completion order.
    """
    aged = [(sample_staleness(batch_version, [v for s in g.samples for v in s.model_versions()]), g) for g in ready]
    aged.sort(key=lambda x: -x[0])
    kept = [(age, g) for age, g in aged if age <= max_token_staleness]
    stale = [g for age, g in aged if age > max_token_staleness]
    if len(kept) < batch_size:
        return BatchPick([], [], [g for _, g in kept], len(stale), stale)
    return BatchPick([g for _, g in kept[:batch_size]], [a for a, _ in kept[:batch_size]],
                     [g for _, g in kept[batch_size:]], len(stale), stale)
