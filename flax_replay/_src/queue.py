"""The trajectory queue: FIFO without randomness. Sampling consumes; an add that does not fit
is refused (the state is returned unchanged), never a silent overwrite.

Storage is the core's layout, `[add_batch_size, max_length_time_axis, *item_shape]`; the queue
holds `(write_index - read_index) mod T` steps per row (T when `is_full`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
from flax import struct

from flax_replay._src import checks, memory
from flax_replay._src.core import Sample, empty_storage
from flax_replay._src.functions import FunctionFields
from flax_replay._src.typing import Array, PyTree


class TrajectoryQueueState(struct.PyTreeNode):
    """experience `[add_batch_size, T, ...]`; write_index, read_index int32 `[]`; is_full bool."""

    experience: PyTree
    write_index: Array
    read_index: Array
    is_full: Array

    @property
    def current_index(self) -> Array:
        """The write position (the name the other buffers use)."""
        return self.write_index


@dataclasses.dataclass(frozen=True)
class TrajectoryQueue(FunctionFields):
    """`init`, `add`, `sample` (returns `(state, sample)`), `can_add`, `can_sample`."""

    max_length_time_axis: int
    add_batch_size: int
    add_sequence_length: int
    sample_sequence_length: int
    memory_kind: Optional[str] = None  # of the experience leaves (`memory.py`)
    # `sample` reads and removes: it returns `(state, sample)` and takes no key.
    consumes_samples: ClassVar[bool] = True
    function_fields: ClassVar[tuple[str, ...]] = ("init", "add", "sample", "can_add",
                                                  "can_sample")

    def init(self, experience: PyTree) -> TrajectoryQueueState:
        r, t = self.add_batch_size, self.max_length_time_axis
        storage = memory.to_storage(empty_storage(experience, (r, t)), self.memory_kind)
        # Distinct arrays: one buffer shared by two fields cannot be donated (jit refuses to
        # donate the same buffer twice).
        return TrajectoryQueueState(storage, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32),
                                    jnp.zeros((), bool))

    def size(self, state: TrajectoryQueueState) -> Array:
        """Steps per row waiting to be read."""
        t = self.max_length_time_axis
        return jnp.where(state.is_full, t, (state.write_index - state.read_index) % t)

    def can_add(self, state: TrajectoryQueueState, sequence_length: int | None = None) -> Array:
        a = self.add_sequence_length if sequence_length is None else sequence_length
        return self.size(state) + a <= self.max_length_time_axis

    def can_sample(self, state: TrajectoryQueueState) -> Array:
        return self.size(state) >= self.sample_sequence_length

    def add(self, state: TrajectoryQueueState, batch: PyTree) -> TrajectoryQueueState:
        """Appends `[add_batch_size, A, ...]`; refused (state unchanged) if it does not fit."""
        r, t = self.add_batch_size, self.max_length_time_axis
        checks.check_tree(batch, state.experience, 2, (r, None), "add",
                          ("add_batch_size", "sequence_length"))
        a = jax.tree_util.tree_leaves(batch)[0].shape[1]
        if not 1 <= a <= t:
            raise ValueError(f"add: sequence length {a} must be between 1 and {t}")
        fits = self.can_add(state, a)
        checks.value_check(
            fits, "add: the queue is full ({size} of " + str(t) + " steps per row); adding "
            + str(a) + " steps would overwrite unread data. Check can_add(state) first",
            size=self.size(state),
        )
        # A refused write goes to index t, which the scatter drops: no copy, no overwrite.
        time = jnp.where(fits, (state.write_index + jnp.arange(a)) % t, t)
        time, batch = memory.to_storage((time, batch), self.memory_kind)
        experience = jax.tree.map(
            lambda store, x: store.at[:, time].set(x, mode="drop"), state.experience, batch
        )
        new_write = jnp.where(fits, (state.write_index + a) % t, state.write_index)
        return state.replace(
            experience=experience,
            write_index=new_write.astype(jnp.int32),
            is_full=jnp.where(fits, new_write == state.read_index, state.is_full),
        )

    def sample(self, state: TrajectoryQueueState) -> tuple[TrajectoryQueueState, Sample]:
        """Reads (and consumes) `[add_batch_size, sample_sequence_length, ...]`."""
        t, l = self.max_length_time_axis, self.sample_sequence_length
        ok = self.can_sample(state)
        checks.value_check(
            ok, "sample: the queue holds {size} steps per row, fewer than "
            "sample_sequence_length=" + str(l) + "; check can_sample(state) first",
            size=self.size(state),
        )
        time = (state.read_index + jnp.arange(l)) % t
        time = memory.to_storage(time, self.memory_kind)
        experience = memory.to_device(jax.tree.map(lambda x: x[:, time], state.experience),
                                      self.memory_kind)
        new_read = jnp.where(ok, (state.read_index + l) % t, state.read_index)
        state = state.replace(
            read_index=new_read.astype(jnp.int32), is_full=state.is_full & ~ok
        )
        return state, Sample(experience=experience)
