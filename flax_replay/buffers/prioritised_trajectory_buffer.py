"""`flashbax.buffers.prioritised_trajectory_buffer`: the prioritised buffer's types.

`SumTreeState` is our `PriorityState` (an exact sum tree and a min tree; see
`flax_replay._src.sum_tree`), so code that only names the type keeps working."""

from typing import TypeVar

from flax_replay import utils  # noqa: F401  (Flashbax's modules expose `utils`)
from flax_replay._src.buffers import Buffer as TrajectoryBuffer
from flax_replay._src.buffers import PrioritisedBuffer as PrioritisedTrajectoryBuffer
from flax_replay._src.core import Sample as TrajectoryBufferSample
from flax_replay._src.core import TrajectoryBufferState
from flax_replay._src.factories import make_prioritised_trajectory_buffer
from flax_replay._src.priorities import PrioritisedSample as PrioritisedTrajectoryBufferSample
from flax_replay._src.priorities import PrioritisedTrajectoryBufferState
from flax_replay._src.priorities import PriorityState as SumTreeState
from flax_replay.buffers import trajectory_buffer  # noqa: F401
from flax_replay.buffers.trajectory_buffer import can_sample

Experience = TypeVar("Experience")
BufferState = TypeVar("BufferState")
BufferSample = TypeVar("BufferSample")

__all__ = ["TrajectoryBuffer", "PrioritisedTrajectoryBuffer", "TrajectoryBufferSample",
           "TrajectoryBufferState", "PrioritisedTrajectoryBufferSample",
           "PrioritisedTrajectoryBufferState", "SumTreeState", "Experience", "BufferState",
           "BufferSample", "can_sample", "make_prioritised_trajectory_buffer"]
