"""`flashbax.buffers.sum_tree`: Flashbax's sum-tree functions with Flashbax's signatures, over
our exact tree (`flax_replay._src.sum_tree`).

`SumTreeState` is the type of a prioritised state's `sum_tree_state`. `init(capacity)` makes a
binary tree with Flashbax's node layout (`nodes` `[2 ** (tree_depth + 1) - 1]`, leaf i at
`get_tree_index(tree_depth, i)`); a buffer's tree (4-ary by default) has its own layout, which
`get` / `get_batch` / `get_probability` / `sample` read through the state's `geometry`.

Differences from Flashbax: every write recomputes the ancestors from their children (exact)
instead of adding deltas, so `set_batch_scan`, `set_batch_bincount` and `set_non_batched` are
one function and store the same bits; a capacity-1 tree has one level below its root (3
nodes, Flashbax's has 1); `sample` never returns a zero-valued leaf while the total is
positive.
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from flax_replay._src import sum_tree as _tree
from flax_replay._src.priorities import SumTreeState, sample_targets
from flax_replay._src.typing import Array


def get_tree_depth(capacity: int) -> int:
    """Levels below the root of Flashbax's binary tree of `capacity` leaves:
    `ceil(log2(capacity))`."""
    return int(np.ceil(np.log2(capacity)))


def init(capacity: int) -> SumTreeState:
    """An empty binary sum tree of `capacity` leaves in Flashbax's layout: `nodes` float32
    `[2 ** (tree_depth + 1) - 1]` of zeros, `max_recorded_priority` 1."""
    if int(capacity) < 1:
        raise ValueError(f"sum_tree.init: capacity must be >= 1, got {capacity}")
    # Binary with 2 ** depth leaves: every level is full, so our flat levels (root first) are
    # Flashbax's heap layout, level d starting at 2 ** d - 1.
    geo = _tree.geometry(max(2 ** get_tree_depth(capacity), 2), 2)
    return SumTreeState(nodes=_tree.init(geo, 0.0), max_recorded_priority=jnp.array(1.0),
                        tree_depth=geo.depth, capacity=int(capacity), geometry=geo)


def get_tree_index(depth_level: Union[Array, int], node_index: Union[Array, int]) -> Array:
    """Position in `nodes` of node `node_index` of level `depth_level`, in a tree made by
    `init` (binary, full levels): `2 ** depth_level - 1 + node_index`."""
    return jnp.power(2, depth_level) - 1 + node_index


def get(state: SumTreeState, node_index: Array) -> Array:
    """Leaf values at `node_index` (any shape)."""
    return _tree.get(state.nodes, state.geometry, jnp.asarray(node_index))


def get_batch(state: SumTreeState, node_indices: Array) -> Array:
    """Leaf values `[B]` at `node_indices` `[B]`."""
    return get(state, node_indices)


def get_probability(state: SumTreeState, node_index: Array) -> Array:
    """`leaf / total` at `node_index` (any shape)."""
    return get(state, node_index) / _tree.root(state.nodes)


def _set(state: SumTreeState, node_indices: Array, values: Array) -> SumTreeState:
    """Writes leaves `[B]` (the last occurrence of a repeated index wins; indices outside
    the tree are dropped) and recomputes their ancestors; `max_recorded_priority` becomes the
    max with every value, as in Flashbax."""
    index = jnp.asarray(node_indices).reshape(-1)
    values = jnp.asarray(values, jnp.float32).reshape(-1)
    (nodes,) = _tree.update((state.nodes,), state.geometry, index, (values,),
                            jnp.ones(index.shape, bool), ("sum",))
    new_max = jnp.maximum(jnp.max(values, initial=-jnp.inf), state.max_recorded_priority)
    return state.replace(nodes=nodes, max_recorded_priority=new_max)


def set_non_batched(state: SumTreeState, node_index: Array, value: Array) -> SumTreeState:
    """Sets one leaf (`node_index`, `value` scalars) to `value` >= 0."""
    return _set(state, node_index, value)


def set_batch_bincount(state: SumTreeState, node_indices: Array,
                       values: Array) -> SumTreeState:
    """Sets leaves `[B]` to `values` `[B]` (>= 0); the same function as `set_batch_scan`."""
    return _set(state, node_indices, values)


def set_batch_scan(state: SumTreeState, node_indices: Array, values: Array) -> SumTreeState:
    """Sets leaves `[B]` to `values` `[B]` (>= 0); the same function as `set_batch_bincount`."""
    return _set(state, node_indices, values)


def sample(state: SumTreeState, rng_key: Optional[Array] = None,
           query_value: Optional[Array] = None) -> Array:
    """One leaf index, drawn with probability `leaf / total` (`query_value` in [0, 1), or a
    uniform draw from `rng_key`)."""
    if query_value is None:
        if rng_key is None:
            raise ValueError("sum_tree.sample: give rng_key or query_value")
        query_value = jax.random.uniform(rng_key)
    target = jnp.reshape(query_value, (1,)) * _tree.root(state.nodes)
    return _tree.sample(state.nodes, state.geometry, target)[0]


def stratified_sample(state: SumTreeState, batch_size: int, rng_key: Array) -> Array:
    """`[batch_size]` leaf indices, one drawn in each of `batch_size` equal slices of the
    total (sorted by leaf position)."""
    targets = sample_targets(rng_key, batch_size, stratified=True) * _tree.root(state.nodes)
    return _tree.sample(state.nodes, state.geometry, targets)


__all__ = ["SumTreeState", "get_tree_depth", "init", "get_tree_index", "get", "get_batch",
           "get_probability", "set_non_batched", "set_batch_bincount", "set_batch_scan",
           "sample", "stratified_sample"]
