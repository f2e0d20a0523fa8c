"""flax_replay: experience replay for JAX as Flax state.

Functional API (Flashbax-compatible: change the import):
    make_flat_buffer, make_trajectory_buffer, make_item_buffer, make_trajectory_queue,
    make_prioritised_flat_buffer, make_prioritised_trajectory_buffer,
    make_prioritised_item_buffer, make_n_step_buffer, make_prioritised_n_step_buffer,
    make_mixer
Flax views of the same buffers: `flax_replay.linen.ReplayBuffer`, `flax_replay.nnx.ReplayBuffer`
(Variable types `Replay`, `Priorities`).
Sharded and multi-host buffers: `flax_replay.shard(buffer, mesh, axis="data")` (see
`flax_replay.sharding`).
Offline datasets in Flashbax's Vault format: `flax_replay.vault.Vault`.
"""

from flax_replay import buffers, linen, nnx, sharding, utils, vault
from flax_replay._src.buffers import (
    Buffer,
    ExperiencePair,
    NStepReturns,
    NStepTransition,
    PrioritisedBuffer,
)
from flax_replay._src.core import Sample, TrajectoryBufferState
from flax_replay._src.episodes import (
    EpisodeOptions,
    EpisodeSample,
    EpisodeTrajectoryBufferState,
    PrioritisedEpisodeSample,
    PrioritisedEpisodeTrajectoryBufferState,
    sequence_priorities,
)
from flax_replay._src.factories import (
    make_flat_buffer,
    make_item_buffer,
    make_n_step_buffer,
    make_prioritised_flat_buffer,
    make_prioritised_item_buffer,
    make_prioritised_n_step_buffer,
    make_prioritised_trajectory_buffer,
    make_trajectory_buffer,
    make_trajectory_queue,
)
from flax_replay._src.mixer import Mixer, make_mixer
from flax_replay._src.nnx import Priorities, Replay
from flax_replay._src.priorities import (
    PrioritisedSample,
    PrioritisedTrajectoryBufferState,
    PriorityOptions,
    PriorityState,
)
from flax_replay._src.queue import TrajectoryQueue, TrajectoryQueueState
from flax_replay._src.sharding import ShardedBuffer, shard
from flax_replay._src.state import from_collections, to_collections
from flax_replay._src.train_state import TrainState

# Flashbax's module attributes (`fbx.trajectory_buffer.TrajectoryBufferState`, ...).
from flax_replay.buffers import (
    flat_buffer,
    item_buffer,
    mixer,
    prioritised_flat_buffer,
    prioritised_item_buffer,
    prioritised_trajectory_buffer,
    trajectory_buffer,
    trajectory_queue,
)

# Flashbax's names for the sample and state types.
TrajectoryBufferSample = Sample
TransitionSample = Sample
PrioritisedTrajectoryBufferSample = PrioritisedSample
PrioritisedTransitionSample = PrioritisedSample

__version__ = "0.1.0"

__all__ = [
    "Buffer", "PrioritisedBuffer", "TrajectoryQueue", "Mixer",
    "ExperiencePair", "NStepTransition", "NStepReturns",
    "Sample", "PrioritisedSample", "TrajectoryBufferSample", "TransitionSample",
    "PrioritisedTrajectoryBufferSample", "PrioritisedTransitionSample",
    "TrajectoryBufferState", "PrioritisedTrajectoryBufferState", "PriorityState",
    "PriorityOptions",
    "TrajectoryQueueState", "Replay", "Priorities",
    "make_flat_buffer", "make_trajectory_buffer", "make_item_buffer", "make_trajectory_queue",
    "make_prioritised_flat_buffer", "make_prioritised_trajectory_buffer",
    "make_prioritised_item_buffer", "make_n_step_buffer", "make_prioritised_n_step_buffer",
    "make_mixer", "TrainState", "to_collections", "from_collections", "linen", "nnx",
    "ShardedBuffer", "shard", "sharding", "vault",
    "buffers", "utils", "flat_buffer", "item_buffer", "mixer", "prioritised_flat_buffer",
    "prioritised_item_buffer", "prioritised_trajectory_buffer", "trajectory_buffer",
    "trajectory_queue",
    "EpisodeOptions", "EpisodeSample", "PrioritisedEpisodeSample",
    "EpisodeTrajectoryBufferState", "PrioritisedEpisodeTrajectoryBufferState",
    "sequence_priorities",
]
