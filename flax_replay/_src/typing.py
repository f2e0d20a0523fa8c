"""Type names shared by the whole package (one definition each)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, Union

import jax

if TYPE_CHECKING:
    from flax_replay._src.core import TrajectoryCore

Array = jax.Array
# A pytree of arrays: a user's experience, a batch, a state's collections.
PyTree = Any
# A mesh axis name, or several (the rows are sharded over their product).
Axis = Union[str, tuple[str, ...]]


class Layout(Protocol):
    """How a buffer's user-facing batches and samples map onto the core's storage rows.

    `to_rows` checks a user's `add` batch against the storage and returns it as
    `[add_batch_size, A, *item_shape]` rows of time steps; `from_sequences` turns sampled
    sequences `[B, L, *item_shape]` into what a sample's `experience` shows the user.
    """

    def to_rows(self, batch: PyTree, storage: PyTree, core: TrajectoryCore) -> PyTree: ...

    def from_sequences(self, seq: PyTree) -> PyTree: ...
