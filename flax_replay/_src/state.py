"""The mapping between a buffer's state dataclass and its two Flax collections.

    "replay":     experience, current_index, is_full (+ running_index; queue: write/read_index)
    "priorities": sum_tree, min_tree, max_priority   (prioritised buffers only)

This is the only place that knows it: the Linen and NNX views and the sharded layout go
through `to_collections` / `from_collections`; a `TrainState` and a checkpoint hold the
collections as they are.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax_replay._src.priorities import PriorityState

REPLAY = "replay"
PRIORITIES = "priorities"
COLLECTIONS = (REPLAY, PRIORITIES)


def to_collections(state: Any) -> dict[str, dict[str, Any]]:
    """`{"replay": {...}, "priorities": {...}}` (no "priorities" for uniform buffers)."""
    out: dict[str, dict[str, Any]] = {REPLAY: {}}
    for f in dataclasses.fields(state):
        value = getattr(state, f.name)
        if isinstance(value, PriorityState):
            out[PRIORITIES] = {g.name: getattr(value, g.name) for g in dataclasses.fields(value)}
        else:
            out[REPLAY][f.name] = value
    return out


def from_collections(state_type: type, collections: Any) -> Any:
    """Inverse of `to_collections` for a state of type `state_type`."""
    kwargs = {}
    for f in dataclasses.fields(state_type):
        if f.name == "priority_state":
            kwargs[f.name] = PriorityState(**dict(collections[PRIORITIES]))
        else:
            kwargs[f.name] = collections[REPLAY][f.name]
    return state_type(**kwargs)
