"""`flashbax.buffers.trajectory_queue`: the queue's types and Flashbax's module-level
functions with Flashbax's signatures."""

from __future__ import annotations

from typing import TypeVar

from flax_replay import utils  # noqa: F401  (Flashbax's modules expose `utils`)
from flax_replay._src.core import Sample as TrajectoryQueueSample
from flax_replay._src.factories import make_trajectory_queue
from flax_replay._src.queue import TrajectoryQueue, TrajectoryQueueState
from flax_replay._src.typing import Array, PyTree
from flax_replay.utils import get_tree_shape_prefix

Experience = TypeVar("Experience")


def _queue(state: TrajectoryQueueState, add_sequence_length: int = 1,
           sample_sequence_length: int = 1) -> TrajectoryQueue:
    rows, t = get_tree_shape_prefix(state.experience, 2)
    return TrajectoryQueue(t, rows, add_sequence_length, sample_sequence_length)


def init(experience: PyTree, add_batch_size: int,
         max_length_time_axis: int) -> TrajectoryQueueState:
    return TrajectoryQueue(max_length_time_axis, add_batch_size, 1, 1).init(experience)


def add(state: TrajectoryQueueState, batch: PyTree) -> TrajectoryQueueState:
    """Appends `batch` `[add_batch_size, A, ...]`; refused (ValueError eagerly, a checkify
    check under jit, the state unchanged) when it does not fit, never an overwrite."""
    a = get_tree_shape_prefix(batch, 2)[1]
    return _queue(state, a).add(state, batch)


def sample(state: TrajectoryQueueState,
           sequence_length: int) -> tuple[TrajectoryQueueState, TrajectoryQueueSample]:
    return _queue(state, 1, sequence_length).sample(state)


def can_add(state: TrajectoryQueueState, add_sequence_length: int,
            max_length_time_axis: int) -> Array:
    return TrajectoryQueue(max_length_time_axis, 1, add_sequence_length, 1).can_add(state)


def can_sample(state: TrajectoryQueueState, sample_sequence_length: int,
               max_length_time_axis: int) -> Array:
    return TrajectoryQueue(max_length_time_axis, 1, 1, sample_sequence_length).can_sample(state)


__all__ = ["TrajectoryQueue", "TrajectoryQueueSample", "TrajectoryQueueState", "Experience",
           "init", "add", "sample", "can_add", "can_sample", "make_trajectory_queue"]
