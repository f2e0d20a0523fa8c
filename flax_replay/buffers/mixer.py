"""`flashbax.buffers.mixer`: the mixer and the buffer, state and sample types it accepts."""

from typing import TypeVar

from flax_replay._src.buffers import Buffer as TrajectoryBuffer
from flax_replay._src.buffers import PrioritisedBuffer as PrioritisedTrajectoryBuffer
from flax_replay._src.core import Sample as TrajectoryBufferSample
from flax_replay._src.core import Sample as TransitionSample
from flax_replay._src.core import TrajectoryBufferState
from flax_replay._src.mixer import Mixer, make_mixer
from flax_replay._src.priorities import PrioritisedSample as PrioritisedTrajectoryBufferSample
from flax_replay._src.priorities import PrioritisedTrajectoryBufferState

BufferTypes = TypeVar("BufferTypes", TrajectoryBuffer, PrioritisedTrajectoryBuffer)
StateTypes = TypeVar("StateTypes", TrajectoryBufferState, PrioritisedTrajectoryBufferState)
SampleTypes = TypeVar("SampleTypes", TrajectoryBufferSample, PrioritisedTrajectoryBufferSample)
state_types = [TrajectoryBufferState, PrioritisedTrajectoryBufferState]
sample_types = [TrajectoryBufferSample, PrioritisedTrajectoryBufferSample]

__all__ = ["Mixer", "make_mixer", "TrajectoryBuffer", "PrioritisedTrajectoryBuffer",
           "TrajectoryBufferSample", "TransitionSample", "TrajectoryBufferState",
           "PrioritisedTrajectoryBufferSample", "PrioritisedTrajectoryBufferState",
           "BufferTypes", "StateTypes", "SampleTypes", "state_types", "sample_types"]
