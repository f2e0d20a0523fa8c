"""Where each array of a buffer state lives on a mesh: partition names for Flax metadata,
`PartitionSpec`s and `NamedSharding`s for `jit` and Orbax, and the sharded state's shapes.

A buffer sharded `S` ways over mesh axis `axis` has the single-device layout with one change:

    "replay"      experience [R, T, ...]            P(axis): rows sharded
                  current_index, is_full, ...       replicated (every row is written at the
                                                    same time index)
    "priorities"  sum_tree, min_tree [S, nodes]     P(axis): one tree per shard
                  max_priority [S]

A buffer made with `memory_kind` (`memory.py`) keeps this layout; only the experience leaves'
`NamedSharding`s carry that memory kind (`in_storage`), the indices, flags and trees stay in
device memory.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flax_replay._src import sum_tree
from flax_replay._src.buffers import Buffer
from flax_replay._src.core import TrajectoryBufferState
from flax_replay._src.episodes import EpisodeCore, EpisodeTrajectoryBufferState
from flax_replay._src.priorities import PrioritisedCore, PrioritisedTrajectoryBufferState
from flax_replay._src.state import PRIORITIES, REPLAY, from_collections, to_collections
from flax_replay._src.typing import Axis, PyTree

# ndim of each "priorities" leaf in the single-device layout; one more axis = one per shard.
_SINGLE_NDIM = {"sum_tree": 1, "min_tree": 1, "max_priority": 0}
# "replay" arrays with the rows (or leaves, row-major) first, sharded like the experience:
# the episode flags of episode-aware buffers (`episodes.py`); and their per-shard trees.
_ROW_FIELDS = ("experience", "episode_ends", "episode_starts", "window_valid")
_REPLAY_TREES = {"window_count": 1}


def axes(axis: Axis) -> tuple[str, ...]:
    return (axis,) if isinstance(axis, str) else tuple(axis)


# ------------------------------------------------------------------------ Flax metadata
def partition_names(col: str, name: str, value: Any, axis: Axis) -> tuple:
    """Mesh axis names of one array of the state: `(axis, None, ...)` for experience (rows
    first) and per-shard priority trees (shards first), `(None,) * ndim` (replicated) else."""
    ndim = len(value.shape) if hasattr(value, "shape") else jnp.ndim(value)
    per_shard = col == PRIORITIES and ndim == _SINGLE_NDIM.get(name, -1) + 1
    per_shard |= col == REPLAY and ndim == _REPLAY_TREES.get(name, -1) + 1
    if (col == REPLAY and name in _ROW_FIELDS or per_shard) and ndim >= 1:
        return (axis,) + (None,) * (ndim - 1)
    return (None,) * ndim


def box_linen(col: str, name: str, value: PyTree, partition: Axis) -> PyTree:
    """`value` with every array leaf in an `nn.Partitioned` box (Linen's partitioning
    metadata), so that `nn.get_partition_spec` / `nn.get_sharding` give the buffer's layout."""
    return jax.tree.map(
        lambda x: nn.Partitioned(x, names=partition_names(col, name, x, partition)), value
    )


def nnx_metadata(col: str, name: str, value: PyTree, partition: Axis) -> dict:
    """`nnx.Variable` metadata of one state field: `out_sharding` (NNX's partitioning names;
    the experience Variable holds a tree whose leaves all have the row axis first, so only
    that first name is given), and the `mesh` of the value when it already lives on one."""
    leaves = jax.tree_util.tree_leaves(value)
    names = partition_names(col, name, leaves[0], partition)
    if not any(n is not None for n in names):
        return {}
    metadata: dict = {"out_sharding": names[:1] if name == "experience" else names}
    placed = getattr(leaves[0], "sharding", None)
    if isinstance(placed, NamedSharding) and isinstance(placed.mesh, Mesh):
        metadata["mesh"] = placed.mesh
    return metadata


# --------------------------------------------------------------------- specs, shardings
def partition_specs(state: Any, axis: Axis) -> Any:
    """A `PartitionSpec` for every array of `state` (concrete or abstract)."""
    specs = {
        col: {name: jax.tree.map(lambda x, c=col, n=name: P(*partition_names(c, n, x, axis)), v)
              for name, v in values.items()}
        for col, values in to_collections(state).items()
    }
    return from_collections(state, specs)  # same structure, static fields included


def in_storage(where: PyTree, memory_kind: Optional[str]) -> PyTree:
    """`where` (a tree of `NamedSharding`s) with the experience leaves of every buffer state
    in it placed in `memory_kind` (None: unchanged, the default device memory)."""
    if memory_kind is None:
        return where

    def place(node: Any) -> Any:
        if not isinstance(node, TrajectoryBufferState):
            return node
        return node.replace(experience=jax.tree.map(
            lambda s: s.with_memory_kind(memory_kind), node.experience))

    return jax.tree.map(place, where, is_leaf=lambda x: isinstance(x, TrajectoryBufferState))


def named(mesh: Mesh, specs: PyTree, memory_kind: Optional[str] = None) -> PyTree:
    """The `NamedSharding`s on `mesh` of a tree of `PartitionSpec`s; the experience of any
    buffer state in it in `memory_kind`."""
    where = jax.tree.map(lambda p: NamedSharding(mesh, p), specs,
                         is_leaf=lambda x: isinstance(x, P))
    return in_storage(where, memory_kind)


def shardings(state: Any, mesh: Mesh, axis: Axis, memory_kind: Optional[str] = None) -> Any:
    """A `NamedSharding` on `mesh` for every array of `state` (for `jit`, Orbax); the
    experience leaves in `memory_kind`."""
    return named(mesh, partition_specs(state, axis), memory_kind)


def constrain(tree: PyTree, mesh: Mesh, specs: PyTree,
              memory_kind: Optional[str] = None) -> PyTree:
    """`tree` laid out as `specs` say, the experience of a buffer state in `memory_kind`
    (inside `jit`; a no-op where it is already)."""
    where = named(mesh, specs, memory_kind)
    if mesh.are_all_axes_explicit:
        return jax.sharding.reshard(tree, where)
    return jax.lax.with_sharding_constraint(tree, where)


def replicate_trees(state: Any, state_shardings: Any, mesh: Mesh) -> Any:
    """`state_shardings` with the priority trees replicated (they are read whole when their
    leaves are regrouped; small next to the rows), or a uniform episode-aware state's window
    counts and validity flags (one bool per window)."""
    if isinstance(state, EpisodeTrajectoryBufferState):  # window counts are recounted
        return state_shardings.replace(window_count=NamedSharding(mesh, P()),
                                       window_valid=NamedSharding(mesh, P()))
    if not isinstance(state, PrioritisedTrajectoryBufferState):
        return state_shardings
    return state_shardings.replace(priority_state=jax.tree.map(
        lambda _: NamedSharding(mesh, P()), state_shardings.priority_state))


# --------------------------------------------------------------------- sharded state
def local_buffer(buffer: Buffer, num_shards: int) -> Buffer:
    """The buffer one of `num_shards` shards runs: the same definition with `R / S` rows."""
    rows = buffer.core.add_batch_size
    if rows % num_shards:
        raise ValueError(f"num_shards ({num_shards}) must divide add_batch_size ({rows})")
    core = dataclasses.replace(buffer.core, add_batch_size=rows // num_shards)
    return dataclasses.replace(buffer, core=core)


def sharded_init(buffer: Buffer, experience: PyTree, num_shards: int) -> Any:
    """The empty state with global experience and one priority tree per shard (traceable)."""
    state = buffer.init(experience)
    if isinstance(state, EpisodeTrajectoryBufferState):  # one 0/1 window tree per shard
        local_core = local_buffer(buffer, num_shards).core
        assert isinstance(local_core, EpisodeCore)
        tree = sum_tree.init(local_core.count_geometry, 0.0)
        return state.replace(window_count=jnp.broadcast_to(tree, (num_shards, *tree.shape)))
    if not isinstance(state, PrioritisedTrajectoryBufferState):
        return state
    local = local_buffer(buffer, num_shards).core
    assert isinstance(local, PrioritisedCore)
    trees = local.empty_priorities()
    return state.replace(priority_state=jax.tree.map(
        lambda x: jnp.broadcast_to(x, (num_shards, *x.shape)), trees))


def abstract_state(buffer: Buffer, mesh: Mesh, axis: Axis, experience: PyTree,
                   num_shards: Optional[int] = None) -> Any:
    """`jax.ShapeDtypeStruct`s of a state sharded `num_shards` ways, placed on `mesh` (Orbax
    restore targets). A state of another number of shards than the mesh axis has its trees
    replicated, ready for `reshard`."""
    shards = buffer_shards(mesh, axis)
    abstract = jax.eval_shape(lambda: sharded_init(buffer, experience, num_shards or shards))
    where = shardings(abstract, mesh, axis, buffer.core.memory_kind)
    if num_shards not in (None, shards):
        where = replicate_trees(abstract, where, mesh)
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, where)


def buffer_shards(mesh: Mesh, axis: Axis) -> int:
    """The number of shards of mesh axis (or axes) `axis`."""
    n = 1
    for a in axes(axis):
        n *= mesh.shape[a]
    return n
