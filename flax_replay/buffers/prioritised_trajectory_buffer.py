"""`flashbax.buffers.prioritised_trajectory_buffer`: the prioritised buffer's types and
Flashbax's module-level functions (`prioritised_init`, `prioritised_add`, `prioritised_sample`,
`set_priorities`) with Flashbax's signatures, each a thin wrapper over our one implementation
(`flax_replay._src.priorities.PrioritisedCore`).

A state made by `prioritised_init` records priorities after the exponent (its exponent is
1): `set_priorities(state, indices, priorities, priority_exponent, device)` applies
`priority_exponent` as Flashbax does, so `sum_tree_state.max_recorded_priority` is Flashbax's.
A state made by a `make_prioritised_*` buffer keeps its buffer's exponent, and
`set_priorities` accepts that exponent for it. As everywhere in flax_replay, items start on
the `period` grid, so `max_length_time_axis` must be a multiple of `period`, and `device` is
accepted and ignored (the same code runs on every backend).
"""

from __future__ import annotations

from typing import Optional, TypeVar

import jax.numpy as jnp

from flax_replay import utils  # noqa: F401  (Flashbax's modules expose `utils`)
from flax_replay._src import sum_tree as _tree
from flax_replay._src.buffers import Buffer as TrajectoryBuffer
from flax_replay._src.buffers import PrioritisedBuffer as PrioritisedTrajectoryBuffer
from flax_replay._src.core import Sample as TrajectoryBufferSample
from flax_replay._src.core import TrajectoryBufferState
from flax_replay._src.factories import make_prioritised_trajectory_buffer
from flax_replay._src.priorities import (
    PrioritisedCore,
    PrioritisedTrajectoryBufferState,
    PriorityOptions,
    SumTreeState,
)
from flax_replay._src.priorities import PrioritisedSample as PrioritisedTrajectoryBufferSample
from flax_replay._src.typing import Array, PyTree
from flax_replay.buffers import sum_tree, trajectory_buffer  # noqa: F401
from flax_replay.buffers.sum_tree import get_tree_depth
from flax_replay.buffers.trajectory_buffer import can_sample
from flax_replay.utils import get_tree_shape_prefix

Experience = TypeVar("Experience")
BufferState = TypeVar("BufferState")
BufferSample = TypeVar("BufferSample")
Priorities = Array  # p in the PER paper
Probabilities = Array  # P in the PER paper
Indices = Array

# Flashbax picks a sum-tree write per device; ours is one exact write on every backend.
SET_BATCH_FN = {"tpu": sum_tree.set_batch_bincount, "gpu": sum_tree.set_batch_bincount,
                "cpu": sum_tree.set_batch_scan}


def get_max_divisible_length(max_length_time_axis: int, period: int) -> int:
    """The largest multiple of `period` not above `max_length_time_axis` (what the
    factories round the time axis down to)."""
    return int(max_length_time_axis - max_length_time_axis % period)


def get_num_items_in_row(max_length_time_axis: int, period: int) -> int:
    """Item slots per row: `max_length_time_axis // period`."""
    return int(max_length_time_axis // period)


def get_sum_tree_capacity(max_length_time_axis: int, period: int, add_batch_size: int) -> int:
    """Sum-tree leaves (item slots) of a buffer: slots per row times rows."""
    return get_num_items_in_row(max_length_time_axis, period) * int(add_batch_size)


def _core(state: PrioritisedTrajectoryBufferState, sample_sequence_length: int = 1,
          period: Optional[int] = None, batch_size: int = 1,
          priority_exponent: Optional[float] = None) -> PrioritisedCore:
    """The core of `state`'s buffer for these arguments (checked against the state's tree)."""
    rows, t = get_tree_shape_prefix(state.experience, 2)
    ps = state.priority_state
    geo, alpha = ps.geometry, ps.priority_exponent
    if priority_exponent is not None:
        alpha = priority_exponent
    if geo is None or alpha is None:
        raise ValueError("this prioritised state lacks its tree's geometry and exponent (it was "
                         "rebuilt with from_collections(type(state), ...)); rebuild it with "
                         "from_collections(template_state, ...)")
    if period is None:  # any period giving the state's number of slots (only to write leaves)
        period = t * rows // geo.num_leaves
    if t % period:
        raise ValueError(f"max_length_time_axis ({t}) must be a multiple of period ({period}): "
                         "items start on the period grid")
    if sample_sequence_length > t:
        raise ValueError(f"sequence length {sample_sequence_length} must be between 1 and "
                         f"max_length_time_axis ({t})")
    core = PrioritisedCore(
        add_batch_size=rows, max_length_time_axis=t,
        min_length_time_axis=sample_sequence_length, sample_batch_size=batch_size,
        sample_sequence_length=sample_sequence_length, period=period,
        options=PriorityOptions(alpha, branching=geo.branching))
    if core.tree_geometry != geo:
        raise ValueError(f"period {period} gives {core.num_items} items, but this state's sum "
                         f"tree has {geo.num_leaves} leaves: pass the period it was made with")
    return core


def _calculate_new_item_indices(index_before_writing: Array, add_sequence_length: int,
                                period: int, max_length_time_axis: int,
                                sample_sequence_length: int,
                                add_batch_size: int) -> tuple[Array, Array]:
    """Flashbax's private helper of `prioritised_add`, answered by our add's
    `PrioritisedCore.turnover`: the leaves `[add_batch_size * m]` of the items an add of
    `add_sequence_length` steps per row completes and breaks, row by row, each row's entries
    first and the unused places filled with `get_sum_tree_capacity(...)` (out of range)."""
    core = PrioritisedCore(
        add_batch_size=add_batch_size, max_length_time_axis=max_length_time_axis,
        min_length_time_axis=sample_sequence_length, sample_batch_size=1,
        sample_sequence_length=sample_sequence_length, period=period)
    turn = core.turnover(jnp.asarray(index_before_writing), add_sequence_length)
    pad = core.num_items
    return (jnp.where(turn.mask_in, turn.leaf_in, pad),
            jnp.where(turn.mask_out, turn.leaf_out, pad))


def prioritised_init(experience: PyTree, add_batch_size: int, max_length_time_axis: int,
                     period: int) -> PrioritisedTrajectoryBufferState:
    """Empty state `[add_batch_size, max_length_time_axis, ...]` for one step `experience`,
    with one sum-tree leaf per item slot (`add_batch_size * max_length_time_axis // period`).
    Its leaves and `max_recorded_priority` hold priorities after the exponent (applied by
    `set_priorities`), as Flashbax's."""
    if max_length_time_axis % period:
        raise ValueError(f"max_length_time_axis ({max_length_time_axis}) must be a multiple of "
                         f"period ({period}): items start on the period grid")
    core = PrioritisedCore(add_batch_size=add_batch_size,
                           max_length_time_axis=max_length_time_axis, min_length_time_axis=1,
                           sample_batch_size=1, sample_sequence_length=1, period=period,
                           options=PriorityOptions(1.0))
    return core.init(experience)


def prioritised_add(state: PrioritisedTrajectoryBufferState, batch: PyTree,
                    sample_sequence_length: int, period: int,
                    device: str = "cpu") -> PrioritisedTrajectoryBufferState:
    """Appends `batch` `[add_batch_size, A, ...]` along time; the items it breaks get priority
    0 and the sequences of `sample_sequence_length` steps it completes the largest priority
    recorded so far."""
    return _core(state, sample_sequence_length, period).add(state, batch)


def prioritised_sample(state: PrioritisedTrajectoryBufferState, rng_key: Array,
                       batch_size: int, sequence_length: int,
                       period: int) -> PrioritisedTrajectoryBufferSample:
    """`batch_size` sequences `[batch_size, sequence_length, ...]` drawn with probability
    `leaf / total` (stratified), with their `indices` and `probabilities` `[batch_size]`."""
    return _core(state, sequence_length, period, batch_size).sample(state, rng_key)


def set_priorities(state: PrioritisedTrajectoryBufferState, indices: Indices,
                   priorities: Priorities, priority_exponent: float,
                   device: str = "cpu") -> PrioritisedTrajectoryBufferState:
    """Sets the priorities `[B]` of the items at `indices` `[B]` (leaf `priority **
    priority_exponent`; 0 stays 0).

    Only items the buffer can currently sample (a positive leaf) are updated, since without
    the sequence length an item not yet complete cannot be told from one set to 0; use the
    buffer's `set_priorities` to raise an item from 0. Bad indices or priorities raise as in
    the buffer's `set_priorities`.
    """
    ps = state.priority_state
    alpha = float(priority_exponent)
    if ps.priority_exponent is not None and ps.priority_exponent not in (alpha, 1.0):
        raise ValueError(f"set_priorities: this state's buffer has priority_exponent="
                         f"{ps.priority_exponent}, got priority_exponent={alpha}")
    priorities = jnp.asarray(priorities, jnp.float32)
    if ps.priority_exponent != alpha:
        # A state from prioritised_init (exponent 1) records priorities after the exponent.
        priorities = jnp.where(priorities == 0, 0.0, priorities ** alpha)
        alpha = 1.0
    core = _core(state, priority_exponent=alpha)
    idx = jnp.asarray(indices)
    current = _tree.get(ps.sum_tree, core.tree_geometry, jnp.clip(idx, 0, core.num_items - 1))
    in_range = (idx >= 0) & (idx < core.num_items)
    return core.set_priorities(state, idx, priorities, mask=(current > 0) | ~in_range)


__all__ = ["TrajectoryBuffer", "PrioritisedTrajectoryBuffer", "TrajectoryBufferSample",
           "TrajectoryBufferState", "PrioritisedTrajectoryBufferSample",
           "PrioritisedTrajectoryBufferState", "SumTreeState", "Experience", "BufferState",
           "BufferSample", "Priorities", "Probabilities", "Indices", "SET_BATCH_FN",
           "can_sample", "get_max_divisible_length", "get_num_items_in_row",
           "get_sum_tree_capacity", "get_tree_depth", "make_prioritised_trajectory_buffer",
           "prioritised_init", "prioritised_add", "prioritised_sample", "set_priorities"]
