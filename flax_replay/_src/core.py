"""The one storage core every buffer is written on: rows of time steps, FIFO along time.

State layout: each experience leaf is `[add_batch_size (rows), max_length_time_axis (T),
*item_shape]`. An `add` writes `[rows, A]` steps at the write position, wrapping around.

Items. A sampleable item is a sequence of `sample_sequence_length` (L) consecutive steps of
one row whose absolute start time `s` (counted from the first step ever written to the row)
is a multiple of `period` (P). It is valid while all its steps are stored: `s >= W - T` and
`s + L <= W`, where W is the number of steps written per row so far. A sequence therefore
never crosses the write head and never mixes data from before and after an overwrite. T is a
multiple of P (rounded down by the factories), so an item keeps its storage slot
`(s mod T) / P` for its whole life, and the prioritised core keeps one sum-tree leaf per
slot: leaf `row * (T // P) + slot`.

The uniform core samples a valid item uniformly; the prioritised core samples a leaf with
probability `leaf / total`, where a leaf holds `priority ** priority_exponent` for a valid
item and 0 otherwise (an item broken by a write keeps 0 until its slot holds a new valid
item, which gets the maximum priority recorded so far).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import struct

from flax_replay._src import checks, sum_tree

Array = jax.Array
PyTree = Any


@struct.dataclass
class TrajectoryBufferState:
    """Uniform buffer state (collection "replay").

    experience: pytree of `[add_batch_size, max_length_time_axis, *item_shape]`.
    current_index: int32 `[]`, time index of the next write.
    is_full: bool `[]`, True once the time axis has wrapped.
    """

    experience: PyTree
    current_index: Array
    is_full: Array


@struct.dataclass
class PriorityState:
    """Collection "priorities": the exact sum tree, the min tree for importance weights, and the
    largest priority ever set (new items get it).

    sum_tree / min_tree: float32 `[num_nodes]`, flat levels, root first (see `sum_tree`).
    max_priority: float32 `[]`, raw priority (before the exponent).
    """

    sum_tree: Array
    min_tree: Array
    max_priority: Array


@struct.dataclass
class PrioritisedTrajectoryBufferState:
    """Prioritised buffer state: the uniform fields and `running_index` (int32 `[]`, steps written
    per row, never wrapped) in "replay"; `priority_state` in "priorities"."""

    experience: PyTree
    current_index: Array
    is_full: Array
    running_index: Array
    priority_state: PriorityState


@struct.dataclass
class Sample:
    """A uniform sample: `experience` has a leading `[sample_batch_size]` axis."""

    experience: PyTree


@struct.dataclass
class PrioritisedSample:
    """A prioritised sample.

    experience: leading axis `[B]`.
    indices: int32 `[B]` sum-tree leaves, for `set_priorities`.
    priorities: float32 `[B]`, `priority ** priority_exponent` of each item.
    probabilities: float32 `[B]`, the probability with which each item was drawn.
    versions: int32 `[B]`, the absolute start time of each item, so that `set_priorities` can
      ignore updates for slots that were rewritten since this sample was drawn.
    """

    experience: PyTree
    indices: Array
    priorities: Array
    probabilities: Array
    versions: Array


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


def _floor_div(a: Array, b: int) -> Array:
    return jnp.floor_divide(a, b)


@dataclasses.dataclass(frozen=True)
class TrajectoryCore:
    """Static configuration and the pure functions over a (prioritised) trajectory state.

    Validation of user-facing arguments is done by the factories in `buffers.py`; this class
    only asserts the invariants it relies on.
    """

    add_batch_size: int
    max_length_time_axis: int
    min_length_time_axis: int
    sample_batch_size: int
    sample_sequence_length: int
    period: int
    priority_exponent: Optional[float] = None
    sampling: str = "stratified"
    branching: int = sum_tree.DEFAULT_BRANCHING
    ignore_stale_priorities: bool = True

    def __post_init__(self) -> None:
        assert self.max_length_time_axis % self.period == 0, "T must be a multiple of period"
        assert self.sampling in ("stratified", "independent"), self.sampling

    # ----------------------------------------------------------------------------- geometry
    @property
    def prioritised(self) -> bool:
        return self.priority_exponent is not None

    @property
    def slots_per_row(self) -> int:
        return self.max_length_time_axis // self.period

    @property
    def num_items(self) -> int:
        """Number of sum-tree leaves (item slots) over all rows."""
        return self.add_batch_size * self.slots_per_row

    @property
    def tree_geometry(self) -> sum_tree.Geometry:
        return sum_tree.geometry(self.num_items, self.branching)

    def _written(self, state) -> Array:
        """Steps written per row, W; for the uniform state any value congruent mod T with
        W >= T once full is enough, because T is a multiple of the period."""
        if self.prioritised:
            return state.running_index
        t = self.max_length_time_axis
        return jnp.where(state.is_full, state.current_index + t, state.current_index)

    def valid_window(self, written: Array) -> tuple[Array, Array]:
        """`(lo, n)`: valid items start at `lo, lo + P, ..., lo + (n-1) P` (absolute times)."""
        t, l, p = self.max_length_time_axis, self.sample_sequence_length, self.period
        lo = -_floor_div(-jnp.maximum(written - t, 0), p) * p
        hi = _floor_div(written - l, p) * p
        n = jnp.maximum(_floor_div(hi - lo, p) + 1, 0)
        return lo, n

    def _slot_start(self, slot: Array, written: Array) -> Array:
        """Absolute start of the newest item whose start lies in `slot` (-1 if none yet)."""
        t, p = self.max_length_time_axis, self.period
        offset = slot * p
        s = offset + _floor_div(written - 1 - offset, t) * t
        return jnp.where(written - 1 >= offset, s, -1)

    # --------------------------------------------------------------------------------- init
    def init(self, experience: PyTree) -> TrajectoryBufferState | PrioritisedTrajectoryBufferState:
        """State for items shaped like `experience` (one time step, no batch axes)."""
        r, t = self.add_batch_size, self.max_length_time_axis
        storage = empty_storage(experience, (r, t))
        base = dict(
            experience=storage,
            current_index=jnp.zeros((), jnp.int32),
            is_full=jnp.zeros((), bool),
        )
        if not self.prioritised:
            return TrajectoryBufferState(**base)
        geo = self.tree_geometry
        return PrioritisedTrajectoryBufferState(
            **base,
            running_index=jnp.zeros((), jnp.int32),
            priority_state=PriorityState(
                sum_tree=sum_tree.init(geo, 0.0),
                min_tree=sum_tree.init(geo, jnp.inf),
                max_priority=jnp.ones((), jnp.float32),
            ),
        )

    # ---------------------------------------------------------------------------------- add
    def add(self, state, rows: PyTree, what: str = "add"):
        """Appends `rows` (leaves `[add_batch_size, A, *item_shape]`, 1 <= A <= T) in time."""
        r, t = self.add_batch_size, self.max_length_time_axis
        checks.check_tree(
            rows, state.experience, 2, (r, None), what, ("add_batch_size", "sequence_length")
        )
        a = jax.tree_util.tree_leaves(rows)[0].shape[1]
        if not 1 <= a <= t:
            raise ValueError(
                f"{what}: sequence length {a} must be between 1 and max_length_time_axis={t}"
            )
        step = jnp.arange(a, dtype=jnp.int32)
        time = (state.current_index + step) % t
        experience = jax.tree.map(
            lambda store, x: store.at[:, time].set(x, unique_indices=True, indices_are_sorted=False),
            state.experience,
            rows,
        )
        new_index = state.current_index + a
        updated = dict(
            experience=experience,
            current_index=(new_index % t).astype(jnp.int32),
            is_full=state.is_full | (new_index >= t),
        )
        if not self.prioritised:
            return state.replace(**updated)
        written = state.running_index
        return state.replace(
            **updated,
            running_index=written + a,
            priority_state=self._priorities_after_add(state.priority_state, written, a),
        )

    def _priorities_after_add(self, ps: PriorityState, written: Array, a: int) -> PriorityState:
        """Zero the items the write broke, give the items it completed the max priority."""
        p, s_per_row = self.period, self.slots_per_row
        lo0, n0 = self.valid_window(written)
        lo1, n1 = self.valid_window(written + a)
        # Static bound on the items entering (starts in (W - L, W + a - L]) or leaving
        # (starts in [W - T, W + a - T)) per row: a grid of period p meets an interval
        # of length a at most ceil(a / p) times.
        m = min(-(-a // p), s_per_row)
        j = jnp.arange(m)
        # Leaving: valid before, start below the new window.
        n_out = jnp.clip(_floor_div(lo1 - lo0, p), 0, n0)
        s_out = lo0 + j * p
        # Entering: valid after, start above the old window's last item.
        first_new = jnp.where(n0 > 0, jnp.maximum(lo1, lo0 + n0 * p), lo1)
        n_in = jnp.clip(n1 - _floor_div(first_new - lo1, p), 0, n1)
        s_in = first_new + j * p
        rows = jnp.arange(self.add_batch_size)[:, None] * s_per_row
        leaf_out = (rows + (s_out % self.max_length_time_axis) // p).reshape(-1)
        leaf_in = (rows + (s_in % self.max_length_time_axis) // p).reshape(-1)
        mask_out = jnp.broadcast_to(j < n_out, (self.add_batch_size, m)).reshape(-1)
        mask_in = jnp.broadcast_to(j < n_in, (self.add_batch_size, m)).reshape(-1)
        new_leaf = ps.max_priority ** self.priority_exponent
        # Order matters: an entering item may reuse a leaving item's slot; the last write wins.
        index = jnp.concatenate([leaf_out, leaf_in])
        mask = jnp.concatenate([mask_out, mask_in])
        sums = jnp.concatenate([jnp.zeros_like(leaf_out, jnp.float32),
                                jnp.full(leaf_in.shape, new_leaf, jnp.float32)])
        sum_t, min_t = sum_tree.update_sum_min(
            ps.sum_tree, ps.min_tree, self.tree_geometry, index, sums, mask)
        return ps.replace(sum_tree=sum_t, min_tree=min_t)

    # ------------------------------------------------------------------------------- sample
    def can_sample(self, state) -> Array:
        """bool `[]`: at least `min_length_time_axis` steps per row and a valid item (and, when
        prioritised, a positive total priority)."""
        written = self._written(state)
        _, n = self.valid_window(written)
        ok = (state.is_full | (state.current_index >= self.min_length_time_axis)) & (n > 0)
        if self.prioritised:
            ok = ok & (sum_tree.total(state.priority_state.sum_tree) > 0)
        return ok

    def _check_can_sample(self, state) -> None:
        checks.value_check(
            self.can_sample(state),
            "sample: the buffer cannot be sampled yet ({steps} steps per row written; "
            "min_length_time_axis=" + str(self.min_length_time_axis) + ", sequence length "
            + str(self.sample_sequence_length) + "); check can_sample(state) first",
            steps=self._written(state),
        )

    def sample(self, state, rng_key: Array, batch_size: Optional[int] = None):
        """Draws `batch_size` sequences: experience leaves `[B, L, *item_shape]`.

        Returns `Sample` (uniform) or `PrioritisedSample`. Sampling a buffer that cannot be
        sampled raises ValueError in an eager call; under `jit` it is a `checkify` check (see
        README, "Sampling too early").
        """
        b = self.sample_batch_size if batch_size is None else batch_size
        self._check_can_sample(state)
        if not self.prioritised:
            row, start = self.uniform_items(state, rng_key, b)
            return Sample(experience=self.gather(state.experience, row, start))
        ps = state.priority_state
        total = sum_tree.total(ps.sum_tree)
        leaf, priorities = sum_tree.sample_with_values(
            ps.sum_tree, self.tree_geometry, self.targets(rng_key, b) * total)
        return self.prioritised_sample(state, leaf, total, priorities)

    # The pieces of `sample`, also used per shard by the sharded buffer (`sharding.py`).
    def targets(self, rng_key: Array, b: int) -> Array:
        """`[b]` points in [0, 1) at which the priorities' CDF is inverted: one per equal
        stratum ("stratified") or i.i.d. ("independent")."""
        u = jax.random.uniform(rng_key, (b,), jnp.float32)
        if self.sampling == "stratified":
            u = (jnp.arange(b, dtype=jnp.float32) + u) / b
        return u

    def uniform_items(self, state, rng_key: Array, b: int) -> tuple[Array, Array]:
        """`(row, start)`, both `[b]`: valid items drawn uniformly; `start` is a time index."""
        lo, n = self.valid_window(self._written(state))
        n = jnp.maximum(n, 1)
        # One draw over all (row, item) pairs (every row holds the same n valid items): half
        # the random numbers of a draw per axis, the same distribution.
        j = jax.random.randint(rng_key, (b,), 0, n * self.add_batch_size)
        return j // n, (lo + j % n * self.period) % self.max_length_time_axis

    def gather(self, experience: PyTree, row: Array, start: Array) -> PyTree:
        """Sequences `[b, L, *item_shape]` of rows `row` `[b]` from time indices `start` `[b]`."""
        t = self.max_length_time_axis
        time = (start[:, None] + jnp.arange(self.sample_sequence_length)) % t
        return jax.tree.map(lambda x: x[row[:, None], time], experience)

    def prioritised_sample(self, state, leaf: Array, total: Array,
                           priorities: Optional[Array] = None) -> PrioritisedSample:
        """The sample of the items at sum-tree leaves `leaf` `[b]`, drawn with probability
        `leaf value / total`; `priorities` `[b]`, the leaf values if already read."""
        row, slot = leaf // self.slots_per_row, leaf % self.slots_per_row
        if priorities is None:
            priorities = sum_tree.get(state.priority_state.sum_tree, self.tree_geometry, leaf)
        return PrioritisedSample(
            experience=self.gather(state.experience, row, slot * self.period),
            indices=leaf.astype(jnp.int32),
            priorities=priorities,
            probabilities=priorities / total,
            versions=self._slot_start(slot, self._written(state)).astype(jnp.int32),
        )

    # ------------------------------------------------------------------------ set_priorities
    def set_priorities(self, state, indices: Array, priorities: Array,
                       versions: Optional[Array] = None, mask: Optional[Array] = None):
        """Sets raw priorities `[B]` (>= 0, finite) of the items at leaf `indices` `[B]`.

        The last occurrence of a duplicated index wins. Updates are ignored (never applied)
        for items that are not currently valid (their leaf stays 0), and, when `versions` is
        given and `ignore_stale_priorities` is on, for slots rewritten since the sample.
        Out-of-range indices and negative / NaN / infinite priorities raise ValueError in an
        eager call; under `jit` they are `checkify` checks and the entries are ignored, so
        the tree is never corrupted. Entries where `mask` `[B]` is False are skipped, neither
        checked nor applied (a shard of a sharded buffer skips the other shards' items).
        """
        indices = jnp.asarray(indices)
        priorities = jnp.asarray(priorities)
        if indices.ndim != 1 or priorities.shape != indices.shape:
            raise ValueError(
                f"set_priorities: indices {indices.shape} and priorities {priorities.shape} "
                "must both be [B]"
            )
        if not jnp.issubdtype(indices.dtype, jnp.integer):
            raise ValueError(f"set_priorities: indices must be integers, got {indices.dtype}")
        if not jnp.issubdtype(priorities.dtype, jnp.floating):
            priorities = priorities.astype(jnp.float32)
        if versions is not None:
            versions = jnp.asarray(versions)
            if versions.shape != indices.shape:
                raise ValueError(
                    f"set_priorities: versions {versions.shape} must match indices "
                    f"{indices.shape}"
                )
        priorities = priorities.astype(jnp.float32)
        active = jnp.ones(indices.shape, bool) if mask is None else jnp.asarray(mask, bool)
        in_range = (indices >= 0) & (indices < self.num_items)
        good_value = jnp.isfinite(priorities) & (priorities >= 0)
        checks.value_check(
            in_range | ~active, "set_priorities: indices must lie in [0, " + str(self.num_items)
            + "), got {indices}", indices=indices,
        )
        checks.value_check(
            good_value | ~active,
            "set_priorities: priorities must be finite and >= 0, got {priorities}",
            priorities=priorities,
        )
        written = state.running_index
        safe = jnp.clip(indices, 0, self.num_items - 1)
        slot = safe % self.slots_per_row
        s_now = self._slot_start(slot, written)
        lo, n = self.valid_window(written)
        valid_item = (s_now >= lo) & (s_now < lo + n * self.period) & (s_now >= 0)
        keep = active & in_range & good_value & valid_item
        if versions is not None and self.ignore_stale_priorities:
            keep = keep & (versions == s_now)
        ps = state.priority_state
        leaf = jnp.where(keep, priorities, 0.0) ** self.priority_exponent
        sum_t, min_t = sum_tree.update_sum_min(
            ps.sum_tree, ps.min_tree, self.tree_geometry, safe, leaf, keep)
        # initial=0: an empty update (e.g. a mixer part of size 0) is a no-op, not an error.
        max_p = jnp.maximum(ps.max_priority,
                            jnp.max(jnp.where(keep, priorities, 0.0), initial=0.0))
        return state.replace(
            priority_state=PriorityState(sum_tree=sum_t, min_tree=min_t, max_priority=max_p)
        )

    def importance_weights(self, state, sample: PrioritisedSample, beta: float | Array,
                           normalise: str = "buffer") -> Array:
        """`[B]` weights `(N * P(i)) ** -beta`, divided by the largest weight of any item in the
        buffer (`normalise="buffer"`, from the min tree) or of the batch (`"batch"`)."""
        min_leaf = sum_tree.total(state.priority_state.min_tree)
        return self.weights(sample.priorities, min_leaf, beta, normalise)

    @staticmethod
    def weights(p: Array, p_min: Array, beta: float | Array, normalise: str = "buffer") -> Array:
        """`(p / p_min) ** -beta` (`"buffer"`) or `p ** -beta / max(p ** -beta)` (`"batch"`) for
        `p` `[B]` proportional to the sampled items' probabilities and `p_min` the smallest
        positive one in the buffer, in the same units (leaf values, or probabilities)."""
        w = p ** -beta
        if normalise == "buffer":
            return w * p_min ** beta
        if normalise == "batch":
            return w / jnp.max(w)
        raise ValueError(f"normalise must be 'buffer' or 'batch', got {normalise!r}")
