"""`flashbax.buffers.item_buffer`: the item buffer's types."""

from typing import TypeVar

from flax_replay import utils  # noqa: F401  (Flashbax's modules expose `utils`)
from flax_replay._src.buffers import Buffer as TrajectoryBuffer
from flax_replay._src.core import Sample as TrajectoryBufferSample
from flax_replay._src.core import TrajectoryBufferState
from flax_replay._src.factories import make_item_buffer, make_trajectory_buffer
from flax_replay.utils import add_dim_to_args

# Flashbax's builder behind make_item_buffer, same arguments; ours validates them too.
create_item_buffer = make_item_buffer

Experience = TypeVar("Experience")

__all__ = ["TrajectoryBuffer", "TrajectoryBufferSample", "TrajectoryBufferState", "Experience",
           "make_item_buffer", "make_trajectory_buffer", "add_dim_to_args", "create_item_buffer"]
