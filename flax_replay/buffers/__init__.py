"""Flashbax's module paths (`flashbax.buffers.<module>`), so that code importing types and
functions from them runs after changing `flashbax` to `flax_replay`.

Each module re-exports flax_replay's implementation under Flashbax's names; nothing here has
logic of its own beyond adapting Flashbax's module-level function signatures.
"""

from flax_replay._src.factories import (
    make_flat_buffer,
    make_item_buffer,
    make_prioritised_flat_buffer,
    make_prioritised_item_buffer,
    make_prioritised_trajectory_buffer,
    make_trajectory_buffer,
    make_trajectory_queue,
)
from flax_replay._src.mixer import make_mixer
from flax_replay.buffers import (
    flat_buffer,
    item_buffer,
    mixer,
    prioritised_flat_buffer,
    prioritised_item_buffer,
    prioritised_trajectory_buffer,
    sum_tree,
    trajectory_buffer,
    trajectory_queue,
)

__all__ = [
    "flat_buffer", "item_buffer", "mixer", "prioritised_flat_buffer", "prioritised_item_buffer",
    "prioritised_trajectory_buffer", "sum_tree", "trajectory_buffer", "trajectory_queue",
    "make_flat_buffer", "make_item_buffer", "make_mixer", "make_prioritised_flat_buffer",
    "make_prioritised_item_buffer", "make_prioritised_trajectory_buffer",
    "make_trajectory_buffer", "make_trajectory_queue",
]
