"""The storage core every buffer is written on: rows of time steps, FIFO along time.

State layout: each experience leaf is `[add_batch_size (rows), max_length_time_axis (T),
*item_shape]`. An `add` writes `[rows, A]` steps at the write position, wrapping around.

Items. A sampleable item is a sequence of `sample_sequence_length` (L) consecutive steps of
one row whose absolute start time `s` (counted from the first step ever written to the row)
is a multiple of `period` (P). It is valid while all its steps are stored: `s >= W - T` and
`s + L <= W`, where W is the number of steps written per row so far. A sequence therefore
never crosses the write head and never mixes data from before and after an overwrite. T is a
multiple of P (rounded down by the factories), so an item keeps its storage slot
`(s mod T) / P` for its whole life.

This core samples a valid item uniformly. Prioritised sampling (a sum tree with one leaf per
slot) is the subclass `PrioritisedCore` in `priorities.py`.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import struct

from flax_replay._src import checks, memory
from flax_replay._src.typing import Array, PyTree


class TrajectoryBufferState(struct.PyTreeNode):
    """Uniform buffer state (collection "replay").

    experience: pytree of `[add_batch_size, max_length_time_axis, *item_shape]`.
    current_index: int32 `[]`, time index of the next write.
    is_full: bool `[]`, True once the time axis has wrapped.
    """

    experience: PyTree
    current_index: Array
    is_full: Array


class Turnover(NamedTuple):
    """The items an add of `a` steps per row breaks (`out`) and completes (`in`): leaves
    `[R * m]` (row-major `[R, m]`, `m = min(ceil(a / P), slots_per_row)`), masks `[R * m]`,
    and the entering items' absolute starts `start_in` `[m]` (the same in every row)."""

    leaf_out: Array
    mask_out: Array
    start_in: Array
    leaf_in: Array
    mask_in: Array


class Sample(struct.PyTreeNode):
    """A uniform sample: `experience` has a leading `[sample_batch_size]` axis."""

    experience: PyTree


def empty_storage(experience: PyTree, prefix: tuple[int, ...]) -> PyTree:
    """Zeros of shape `[*prefix, *x.shape]` for each leaf of one example step (arrays,
    scalars or `jax.ShapeDtypeStruct`s)."""
    def zeros(x):
        if not hasattr(x, "shape"):
            x = jnp.asarray(x)
        return jnp.zeros((*prefix, *x.shape), x.dtype)

    storage = jax.tree.map(zeros, experience)
    if not jax.tree_util.tree_leaves(storage):
        raise ValueError("init: the example experience has no array leaves")
    return storage


def floor_div(a: Array, b: int) -> Array:
    return jnp.floor_divide(a, b)


def write_steps(store: Array, steps: Array, time: Array) -> Array:
    """`store` `[R, T, ...]` with `steps` `[R, A, ...]` written at time indices `time` `[A]`
    (consecutive modulo T), in place under donation. One step is a dynamic update of one
    column (a scatter would also check its index's bounds: more small ops per add)."""
    if steps.shape[1] == 1:
        return jax.lax.dynamic_update_slice_in_dim(store, steps.astype(store.dtype), time[0],
                                                   axis=1)
    return store.at[:, time].set(steps, unique_indices=True)


@dataclasses.dataclass(frozen=True)
class TrajectoryCore:
    """Static configuration and the pure functions over a trajectory state.

    Validation of user-facing arguments is done by the factories (`factories.py`); this class
    only asserts the invariants it relies on.
    """

    add_batch_size: int
    max_length_time_axis: int
    min_length_time_axis: int
    sample_batch_size: int
    sample_sequence_length: int
    period: int
    # Where the experience leaves live (None: default device memory; "pinned_host"); the
    # counters and trees stay in device memory (`memory.py`).
    memory_kind: Optional[str] = None

    def __post_init__(self) -> None:
        assert self.max_length_time_axis % self.period == 0, "T must be a multiple of period"

    # ----------------------------------------------------------------------------- geometry
    @property
    def slots_per_row(self) -> int:
        return self.max_length_time_axis // self.period

    @property
    def num_items(self) -> int:
        """Number of item slots over all rows (a prioritised buffer's sum-tree leaves)."""
        return self.add_batch_size * self.slots_per_row

    def written(self, state: TrajectoryBufferState) -> Array:
        """Steps written per row, W. Here any value congruent to W mod T that is >= T once the
        buffer is full is enough (T is a multiple of the period); a prioritised state counts
        W exactly."""
        t = self.max_length_time_axis
        return jnp.where(state.is_full, state.current_index + t, state.current_index)

    def valid_window(self, written: Array) -> tuple[Array, Array]:
        """`(lo, n)`: valid items start at `lo, lo + P, ..., lo + (n-1) P` (absolute times)."""
        t, l, p = self.max_length_time_axis, self.sample_sequence_length, self.period
        lo = -floor_div(-jnp.maximum(written - t, 0), p) * p
        hi = floor_div(written - l, p) * p
        n = jnp.maximum(floor_div(hi - lo, p) + 1, 0)
        return lo, n

    def slot_start(self, slot: Array, written: Array) -> Array:
        """Absolute start of the newest item whose start lies in `slot` (-1 if none yet)."""
        t, p = self.max_length_time_axis, self.period
        offset = slot * p
        s = offset + floor_div(written - 1 - offset, t) * t
        return jnp.where(written - 1 >= offset, s, -1)

    def turnover(self, written: Array, a: int) -> Turnover:
        """Which items an add of `a` steps per row breaks and completes; `written` counts the
        steps per row before the add (what a sum tree over the slots must update)."""
        p, s_per_row = self.period, self.slots_per_row
        lo0, n0 = self.valid_window(written)
        lo1, n1 = self.valid_window(written + a)
        # Static bound on the items entering (starts in (W - L, W + a - L]) or leaving
        # (starts in [W - T, W + a - T)) per row: a grid of period p meets an interval
        # of length a at most ceil(a / p) times.
        m = min(-(-a // p), s_per_row)
        j = jnp.arange(m)
        # Leaving: valid before, start below the new window.
        n_out = jnp.clip(floor_div(lo1 - lo0, p), 0, n0)
        s_out = lo0 + j * p
        # Entering: valid after, start above the old window's last item.
        first_new = jnp.where(n0 > 0, jnp.maximum(lo1, lo0 + n0 * p), lo1)
        n_in = jnp.clip(n1 - floor_div(first_new - lo1, p), 0, n1)
        s_in = first_new + j * p
        rows = jnp.arange(self.add_batch_size)[:, None] * s_per_row
        return Turnover(
            leaf_out=(rows + (s_out % self.max_length_time_axis) // p).reshape(-1),
            mask_out=jnp.broadcast_to(j < n_out, (self.add_batch_size, m)).reshape(-1),
            start_in=s_in,
            leaf_in=(rows + (s_in % self.max_length_time_axis) // p).reshape(-1),
            mask_in=jnp.broadcast_to(j < n_in, (self.add_batch_size, m)).reshape(-1),
        )

    # --------------------------------------------------------------------------------- init
    def init(self, experience: PyTree) -> TrajectoryBufferState:
        """State for items shaped like `experience` (one time step, no batch axes)."""
        storage = empty_storage(experience, (self.add_batch_size, self.max_length_time_axis))
        return TrajectoryBufferState(
            experience=memory.to_storage(storage, self.memory_kind),
            current_index=jnp.zeros((), jnp.int32),
            is_full=jnp.zeros((), bool),
        )

    # ---------------------------------------------------------------------------------- add
    def steps_in(self, rows: PyTree, what: str = "add") -> int:
        """A (static) number of steps per row, A, of `rows` `[add_batch_size, A, ...]`."""
        a = jax.tree_util.tree_leaves(rows)[0].shape[1]
        if not 1 <= a <= self.max_length_time_axis:
            raise ValueError(f"{what}: sequence length {a} must be between 1 and "
                             f"max_length_time_axis={self.max_length_time_axis}")
        return a

    def add(self, state: TrajectoryBufferState, rows: PyTree,
            what: str = "add") -> TrajectoryBufferState:
        """Appends `rows` (leaves `[add_batch_size, A, *item_shape]`, 1 <= A <= T) in time.

        Writes only the A new steps of every row (in place under donation) and returns the
        state with `experience`, `current_index` and `is_full` replaced.
        """
        t = self.max_length_time_axis
        checks.check_tree(rows, state.experience, 2, (self.add_batch_size, None), what,
                          ("add_batch_size", "sequence_length"))
        a = self.steps_in(rows, what)
        time = (state.current_index + jnp.arange(a, dtype=jnp.int32)) % t
        # Indices and steps join the storage's memory: one space per operation.
        time, rows = memory.to_storage((time, rows), self.memory_kind)
        experience = jax.tree.map(lambda store, x: write_steps(store, x, time), state.experience,
                                  rows)
        new_index = state.current_index + a
        return state.replace(
            experience=experience,
            current_index=(new_index % t).astype(jnp.int32),
            is_full=state.is_full | (new_index >= t),
        )

    # ------------------------------------------------------------------------------- sample
    def can_sample(self, state: TrajectoryBufferState) -> Array:
        """bool `[]`: at least `min_length_time_axis` steps per row and a valid item."""
        _, n = self.valid_window(self.written(state))
        return (state.is_full | (state.current_index >= self.min_length_time_axis)) & (n > 0)

    def check_can_sample(self, state: TrajectoryBufferState) -> None:
        """ValueError (eager) or a `checkify` check (jit) when too few steps are written for an
        item (the storage part of `can_sample`; a subclass checks its own conditions after)."""
        checks.value_check(
            TrajectoryCore.can_sample(self, state),
            "sample: the buffer cannot be sampled yet ({steps} steps per row written; "
            "min_length_time_axis=" + str(self.min_length_time_axis) + ", sequence length "
            + str(self.sample_sequence_length) + "); check can_sample(state) first",
            steps=self.written(state),
        )

    def sample(self, state: TrajectoryBufferState, rng_key: Array,
               batch_size: Optional[int] = None) -> Sample:
        """Draws `batch_size` sequences uniformly: experience leaves `[B, L, *item_shape]`.

        Sampling a buffer that cannot be sampled raises ValueError in an eager call; under
        `jit` it is a `checkify` check (see README, "Sampling too early").
        """
        b = self.sample_size(batch_size)
        self.check_can_sample(state)
        row, start = self.uniform_items(state, rng_key, b)
        return Sample(experience=self.gather(state.experience, row, start))

    def sample_size(self, batch_size: Optional[int]) -> int:
        """`batch_size` (default `sample_batch_size`) as a static int >= 0, or a ValueError
        naming `batch_size`."""
        if batch_size is None:
            return self.sample_batch_size
        return checks.non_negative_int("batch_size", batch_size)

    def uniform_items(self, state: TrajectoryBufferState, rng_key: Array,
                      b: int) -> tuple[Array, Array]:
        """`(row, start)`, both `[b]`: valid items drawn uniformly; `start` is a time index."""
        lo, n = self.valid_window(self.written(state))
        n = jnp.maximum(n, 1)
        # One draw over all (row, item) pairs (every row holds the same n valid items): half
        # the random numbers of a draw per axis, the same distribution.
        j = jax.random.randint(rng_key, (b,), 0, n * self.add_batch_size)
        return j // n, (lo + j % n * self.period) % self.max_length_time_axis

    def gather(self, experience: PyTree, row: Array, start: Array) -> PyTree:
        """Sequences `[b, L, *item_shape]` of rows `row` `[b]` from time indices `start` `[b]`."""
        t = self.max_length_time_axis
        time = (start[:, None] + jnp.arange(self.sample_sequence_length)) % t
        row, time = memory.to_storage((row[:, None], time), self.memory_kind)
        out = jax.tree.map(lambda x: x[row, time], experience)
        return memory.to_device(out, self.memory_kind)
