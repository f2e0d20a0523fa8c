"""Moving a prioritised state between numbers of shards: its leaf priorities are regrouped
into one sum tree per new shard, exactly (the trees are rebuilt from their leaves). A uniform
episode-aware state's window counts per column are recounted per new shard the same way.

Leaf `j` of a buffer's items is the same item however the buffer is sharded (shard k of S
holds leaves `[k n/S, (k+1) n/S)`), so regrouping is a reshape of the leaf levels.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from flax_replay._src import sum_tree
from flax_replay._src.core import TrajectoryCore
from flax_replay._src.episodes import EpisodeCore, EpisodeTrajectoryBufferState
from flax_replay._src.priorities import PrioritisedCore, PrioritisedTrajectoryBufferState
from flax_replay._src.typing import Array


def regroup_priorities(state: Any, core: TrajectoryCore, num_shards: Optional[int]) -> Any:
    """`state` with its priorities in `num_shards` trees (None: one tree, the single-device
    layout), from a state of the buffer `core` with any number of trees. A new shard's max
    priority is the largest of the old shards' its rows came from. Uniform states are
    returned as they are. Traceable; reads the trees whole."""
    if not isinstance(state, PrioritisedTrajectoryBufferState):
        return state
    assert isinstance(core, PrioritisedCore)
    ps = state.priority_state
    n, rows = core.num_items, core.add_batch_size
    branching = core.options.branching

    def leaves(tree: Array) -> Array:  # [num_items], in leaf order
        trees = tree.reshape(-1, tree.shape[-1])  # [old shards (1 if unsharded), nodes]
        s = trees.shape[0]
        geo = sum_tree.geometry(max(n // s, 1), branching)
        if n % s or tree.shape[-1] != geo.num_nodes:
            raise ValueError(f"reshard: a tree of shape {tree.shape} is not one of this "
                             f"buffer's ({n} items, branching {branching})")
        return jax.vmap(lambda t: sum_tree.leaves(t, geo))(trees).reshape(-1)

    sums, mins = leaves(ps.sum_tree), leaves(ps.min_tree)
    old = ps.max_priority.reshape(-1)
    row_max = jnp.repeat(old, rows // old.shape[0])  # [R]: the max of each row's old shard
    s = 1 if num_shards is None else num_shards
    geo = sum_tree.geometry(n // s, branching)

    def build(sums, mins):
        m = sums.shape[0]
        return sum_tree.update(
            (sum_tree.init(geo, 0.0), sum_tree.init(geo, jnp.inf)), geo,
            jnp.arange(m), (sums, mins), jnp.ones(m, bool), ("sum", "min"))

    sum_t, min_t = jax.vmap(build)(sums.reshape(s, -1), mins.reshape(s, -1))
    max_p = row_max.reshape(s, -1).max(axis=1)
    if num_shards is None:
        sum_t, min_t, max_p = sum_t[0], min_t[0], max_p[0]
    return state.replace(priority_state=ps.replace(sum_tree=sum_t, min_tree=min_t,
                                                   max_priority=max_p, geometry=geo))


def regroup_window_counts(state: Any, core: TrajectoryCore, num_shards: Optional[int]) -> Any:
    """A uniform episode-aware `state` with its column trees (`window_count`, one per shard,
    over the slots of that shard's rows) regrouped into `num_shards` trees (None: one tree),
    exactly. A column's count on a new shard is the number of its rows whose window there is
    valid (`window_valid`) and still stored (the column's count was positive on the row's
    old shard). Other states are returned as they are. Traceable; reads the trees whole."""
    if not isinstance(state, EpisodeTrajectoryBufferState):
        return state
    assert isinstance(core, EpisodeCore)
    rows, slots = core.add_batch_size, core.slots_per_row
    geo = core.count_geometry  # the same for every number of shards: one leaf per slot
    trees = state.window_count.reshape(-1, state.window_count.shape[-1])
    old = trees.shape[0]
    if rows % old or trees.shape[-1] != geo.num_nodes:
        raise ValueError(f"reshard: window counts of shape {state.window_count.shape} are not "
                         f"this buffer's ({rows} rows, {slots} slots per row)")
    live = jax.vmap(lambda t: sum_tree.leaves(t, geo))(trees) > 0  # [old shards, slots]
    valid = state.window_valid.reshape(rows, slots) & jnp.repeat(live, rows // old, axis=0)
    s = 1 if num_shards is None else num_shards
    counts = jnp.sum(valid.reshape(s, rows // s, slots), axis=1, dtype=jnp.float32)
    # Built densely: a scatter into trees whose shard axis is sharded would need an explicit
    # output sharding.
    out = jax.vmap(lambda c: sum_tree.from_leaves(c, geo))(counts)
    return state.replace(window_count=out[0] if num_shards is None else out)
