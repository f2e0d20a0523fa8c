"""`flashbax.buffers.prioritised_flat_buffer`: the prioritised flat buffer's types."""

from flax_replay._src.buffers import ExperiencePair
from flax_replay._src.buffers import PrioritisedBuffer as PrioritisedTrajectoryBuffer
from flax_replay._src.core import Sample as TransitionSample
from flax_replay._src.factories import (
    make_prioritised_flat_buffer,
    make_prioritised_trajectory_buffer,
)
from flax_replay._src.priorities import PrioritisedSample as PrioritisedTransitionSample
from flax_replay._src.priorities import PrioritisedTrajectoryBufferState
from flax_replay.utils import add_dim_to_args

__all__ = ["ExperiencePair", "PrioritisedTrajectoryBuffer", "PrioritisedTrajectoryBufferState",
           "PrioritisedTransitionSample", "TransitionSample", "make_prioritised_flat_buffer",
           "make_prioritised_trajectory_buffer", "add_dim_to_args"]
