"""Moving a prioritised state between numbers of shards: its leaf priorities are regrouped
into one sum tree per new shard, exactly (the trees are rebuilt from their leaves).

Leaf `j` of a buffer's items is the same item however the buffer is sharded (shard k of S
holds leaves `[k n/S, (k+1) n/S)`), so regrouping is a reshape of the leaf levels.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from flax_replay._src import sum_tree
from flax_replay._src.core import TrajectoryCore
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
