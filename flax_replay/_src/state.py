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
            out[PRIORITIES] = {g.name: getattr(value, g.name) for g in dataclasses.fields(value)
                               if g.metadata.get("pytree_node", True)}
        else:
            out[REPLAY][f.name] = value
    return out


@dataclasses.dataclass(frozen=True)
class StateTemplate:
    """What `from_collections` needs besides the collections: the state's type and the static
    fields of its priority state (tree geometry, exponent). Hashable and not a pytree, so a
    Linen or NNX module can hold it as a plain attribute."""

    state_type: type
    static: tuple[tuple[str, Any], ...] = ()


def template(state: Any) -> StateTemplate:
    """The `StateTemplate` of a state (concrete or abstract)."""
    like = getattr(state, "priority_state", None)
    static: tuple[tuple[str, Any], ...] = ()
    if isinstance(like, PriorityState):
        static = tuple((g.name, getattr(like, g.name)) for g in dataclasses.fields(like)
                       if not g.metadata.get("pytree_node", True))
    return StateTemplate(type(state), static)


def from_collections(state_type: Any, collections: Any) -> Any:
    """Inverse of `to_collections`. `state_type`: the state's type, or a state (or abstract
    state, or its `template`) to rebuild like: then the result also has its static fields
    (the priority tree's geometry and exponent, which Flashbax's `sum_tree_state` view reads)
    and so the same tree structure."""
    if not isinstance(state_type, type):
        state_type = state_type if isinstance(state_type, StateTemplate) else template(state_type)
    else:
        state_type = StateTemplate(state_type)
    kwargs = {}
    for f in dataclasses.fields(state_type.state_type):
        if f.name == "priority_state":
            kwargs[f.name] = PriorityState(**dict(collections[PRIORITIES]),
                                           **dict(state_type.static))
        else:
            kwargs[f.name] = collections[REPLAY][f.name]
    return state_type.state_type(**kwargs)
