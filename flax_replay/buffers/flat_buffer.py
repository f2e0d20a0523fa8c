"""`flashbax.buffers.flat_buffer`: the flat buffer's types."""

from typing import TypeVar

from flax_replay._src.buffers import Buffer as TrajectoryBuffer
from flax_replay._src.buffers import ExperiencePair
from flax_replay._src.core import Sample as TransitionSample
from flax_replay._src.core import TrajectoryBufferState
from flax_replay._src.factories import make_flat_buffer, make_trajectory_buffer
from flax_replay.utils import add_dim_to_args

# Flashbax's builder behind make_flat_buffer, same arguments; ours validates them too.
create_flat_buffer = make_flat_buffer

Experience = TypeVar("Experience")

__all__ = ["ExperiencePair", "TrajectoryBuffer", "TrajectoryBufferState", "TransitionSample",
           "Experience", "make_flat_buffer", "make_trajectory_buffer", "add_dim_to_args",
           "create_flat_buffer"]
