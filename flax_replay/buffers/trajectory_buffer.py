"""`flashbax.buffers.trajectory_buffer`: the trajectory buffer's types and Flashbax's
module-level functions (`init`, `add`, `sample`, `can_sample`) with Flashbax's signatures."""

from __future__ import annotations

from typing import TypeVar

from flax_replay import utils  # noqa: F401  (Flashbax's modules expose `utils`)
from flax_replay._src.buffers import Buffer as TrajectoryBuffer
from flax_replay._src.core import Sample as TrajectoryBufferSample
from flax_replay._src.core import TrajectoryBufferState, TrajectoryCore
from flax_replay._src.factories import make_trajectory_buffer
from flax_replay._src.typing import Array, PyTree
from flax_replay.utils import get_tree_shape_prefix

Experience = TypeVar("Experience")
BufferState = TypeVar("BufferState")
BufferSample = TypeVar("BufferSample")


def _core(state: TrajectoryBufferState, sample_batch_size: int = 1, sequence_length: int = 1,
          period: int = 1, min_length_time_axis: int = 1) -> TrajectoryCore:
    rows, t = get_tree_shape_prefix(state.experience, 2)
    if t % period:
        # Items live on a fixed period grid (see core.py): Flashbax's factory-free sampling
        # with a time axis that is not a multiple of the period has no such grid.
        raise ValueError(f"sample: max_length_time_axis ({t}) must be a multiple of period "
                         f"({period})")
    return TrajectoryCore(rows, t, min_length_time_axis, sample_batch_size, sequence_length,
                          period)


def init(experience: PyTree, add_batch_size: int,
         max_length_time_axis: int) -> TrajectoryBufferState:
    """Empty state `[add_batch_size, max_length_time_axis, ...]` for one step `experience`."""
    return TrajectoryCore(add_batch_size, max_length_time_axis, 1, 1, 1, 1).init(experience)


def add(state: TrajectoryBufferState, batch: PyTree) -> TrajectoryBufferState:
    """Appends `batch` `[add_batch_size, A, ...]` along time."""
    return _core(state).add(state, batch)


def sample(state: TrajectoryBufferState, rng_key: Array, batch_size: int,
           sequence_length: int, period: int) -> TrajectoryBufferSample:
    """`batch_size` sequences of `sequence_length` steps starting on the `period` grid."""
    core = _core(state, batch_size, sequence_length, period, sequence_length)
    return core.sample(state, rng_key)


def can_sample(state: TrajectoryBufferState, min_length_time_axis: int) -> Array:
    """bool: the buffer is full or holds at least `min_length_time_axis` steps per row."""
    return state.is_full | (state.current_index >= min_length_time_axis)


__all__ = ["TrajectoryBuffer", "TrajectoryBufferSample", "TrajectoryBufferState",
           "BufferState", "BufferSample", "Experience", "init", "add", "sample", "can_sample",
           "make_trajectory_buffer"]
