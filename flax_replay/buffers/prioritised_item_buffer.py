"""`flashbax.buffers.prioritised_item_buffer`: the prioritised item buffer's types."""

from typing import TypeVar

from flax_replay import utils  # noqa: F401  (Flashbax's modules expose `utils`)
from flax_replay._src.buffers import PrioritisedBuffer as PrioritisedTrajectoryBuffer
from flax_replay._src.factories import (
    make_prioritised_item_buffer,
    make_prioritised_trajectory_buffer,
)
from flax_replay._src.priorities import PrioritisedSample as PrioritisedTrajectoryBufferSample
from flax_replay._src.priorities import PrioritisedTrajectoryBufferState
from flax_replay.utils import add_dim_to_args

# Flashbax's builder behind make_prioritised_item_buffer, same arguments; ours validates them
# too.
create_prioritised_item_buffer = make_prioritised_item_buffer

Experience = TypeVar("Experience")

__all__ = ["PrioritisedTrajectoryBuffer", "PrioritisedTrajectoryBufferSample",
           "PrioritisedTrajectoryBufferState", "Experience", "make_prioritised_item_buffer",
           "make_prioritised_trajectory_buffer", "add_dim_to_args",
           "create_prioritised_item_buffer"]
