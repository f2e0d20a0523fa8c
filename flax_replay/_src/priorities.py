"""Prioritised sampling on the storage core: a sum tree (and a min tree) with one leaf per
item slot, `leaf = row * slots_per_row + slot`.

A leaf holds `priority ** priority_exponent` for a valid item and 0 otherwise. An add zeroes
the leaves of the items its write broke and gives the items it completed the largest
priority set so far (at least 1); `set_priorities` writes leaves of currently valid items
only. An item is drawn with probability `leaf / total`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from flax_replay._src import checks, sum_tree
from flax_replay._src.core import Sample, TrajectoryBufferState, TrajectoryCore
from flax_replay._src.sum_tree import Geometry
from flax_replay._src.typing import Array, PyTree

SAMPLING_MODES = ("stratified", "independent")


class PriorityState(struct.PyTreeNode):
    """Collection "priorities": the exact sum tree, the min tree for importance weights, and the
    largest priority ever set (new items get it).

    sum_tree / min_tree: float32 `[num_nodes]`, flat levels, root first (see `sum_tree`).
    max_priority: float32 `[]`, raw priority (before the exponent), at least 1.
    geometry, priority_exponent: static (part of the tree structure, not leaves, so not in the
      collection): the tree's shape and the buffer's exponent, set by `init`, so that the state
      alone answers Flashbax's `sum_tree_state` (None in a state rebuilt by
      `from_collections(type(state), ...)`; `from_collections(state, ...)` keeps them).
    """

    sum_tree: Array
    min_tree: Array
    max_priority: Array
    geometry: Optional[Geometry] = struct.field(pytree_node=False, default=None)
    priority_exponent: Optional[float] = struct.field(pytree_node=False, default=None)


class PrioritisedTrajectoryBufferState(TrajectoryBufferState):
    """Prioritised buffer state: the uniform fields and `running_index` (int32 `[]`, steps written
    per row W, kept below `counter_modulus + T` by subtracting multiples of `counter_modulus`
    once the buffer is full, so that it never overflows) in "replay"; `priority_state` in
    "priorities"."""

    running_index: Array
    priority_state: PriorityState

    @property
    def sum_tree_state(self) -> SumTreeState:
        """Flashbax's field, read-only (a property: not part of the pytree): `nodes` is our sum
        tree (`[..., num_nodes]`; `nodes[..., 0]` the total) and `max_recorded_priority` the
        largest priority set so far after the exponent (`[...]`; a stacked state gives one per
        buffer). Read it with `flax_replay.buffers.sum_tree.get` / `get_probability`."""
        ps = self.priority_state
        if ps.geometry is None or ps.priority_exponent is None:
            raise ValueError(
                "sum_tree_state: this state lacks its tree's geometry and priority exponent "
                "(it was rebuilt with from_collections(type(state), ...)); rebuild it with "
                "from_collections(template_state, ...) or read state.priority_state")
        return SumTreeState(
            nodes=ps.sum_tree,
            max_recorded_priority=ps.max_priority ** jnp.float32(ps.priority_exponent),
            tree_depth=ps.geometry.depth, capacity=ps.geometry.num_leaves,
            geometry=ps.geometry)


class SumTreeState(struct.PyTreeNode):
    """Flashbax's `SumTreeState` over our exact tree (`flax_replay.buffers.sum_tree`).

    nodes: float32 `[num_nodes]`, the sum tree's flat levels, root first: `nodes[0]` is the
      total. A buffer's tree is `branching`-ary (4 by default); `buffers.sum_tree.init` makes
      a binary tree with Flashbax's node layout (leaf i at `2 ** tree_depth - 1 + i`).
    max_recorded_priority: float32 `[]`, the largest leaf value ever set (after the
      exponent), at least 1: what a new item gets.
    tree_depth, capacity: static, Flashbax's (levels below the root; number of leaves).
    geometry: static, our tree's shape (`flax_replay._src.sum_tree.Geometry`).
    """

    nodes: Array
    max_recorded_priority: Array
    tree_depth: int = struct.field(pytree_node=False)
    capacity: int = struct.field(pytree_node=False)
    geometry: Geometry = struct.field(pytree_node=False)


class PrioritisedSample(Sample):
    """A prioritised sample.

    experience: leading axis `[B]`.
    indices: int32 `[B]` sum-tree leaves, for `set_priorities`.
    priorities: float32 `[B]`, `priority ** priority_exponent` of each item.
    probabilities: float32 `[B]`, the probability with which each item was drawn.
    versions: int32 `[B]`, the start time of each item (the absolute start modulo the core's
      `counter_modulus`), so that `set_priorities` can ignore updates for slots that were
      rewritten since this sample was drawn.
    """

    indices: Array
    priorities: Array
    probabilities: Array
    versions: Array


@dataclasses.dataclass(frozen=True)
class PriorityOptions:
    """How a prioritised buffer samples and updates priorities (every prioritised factory).

    priority_exponent: items are drawn with probability proportional to
      `priority ** priority_exponent`, in [0, 1].
    sampling: "stratified" (one draw per equal slice of the total, as Flashbax) or
      "independent" (i.i.d. draws).
    branching: children per sum-tree node (>= 2).
    ignore_stale_priorities: `set_priorities` with a sample's versions ignores items
      rewritten since the sample.
    """

    priority_exponent: float = 0.6
    sampling: str = "stratified"
    branching: int = sum_tree.DEFAULT_BRANCHING
    ignore_stale_priorities: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.priority_exponent) <= 1.0:
            raise ValueError(f"priority_exponent must be in [0, 1], got {self.priority_exponent}")
        if self.sampling not in SAMPLING_MODES:
            raise ValueError(
                f"sampling must be 'stratified' or 'independent', got {self.sampling!r}")
        checks.positive_int("branching", self.branching, 2)
        # Hashable and exact: a Python float, whatever the user passed (np.float32, int).
        object.__setattr__(self, "priority_exponent", float(self.priority_exponent))


def sample_targets(rng_key: Array, b: int, stratified: bool = True) -> Array:
    """`[b]` float32 points in [0, 1): one uniform draw in each of `b` equal strata
    (`stratified`, as Flashbax) or `b` i.i.d. uniform draws."""
    u = jax.random.uniform(rng_key, (b,), jnp.float32)
    if stratified:
        u = (jnp.arange(b, dtype=jnp.float32) + u) / b
    return u


def importance_weights(p: Array, p_min: Array, beta: float | Array,
                       normalise: str = "buffer") -> Array:
    """`(p / p_min) ** -beta` (`"buffer"`) or `p ** -beta / max(p ** -beta)` (`"batch"`) for
    `p` `[B]` proportional to the sampled items' probabilities and `p_min` the smallest
    positive one in the buffer, in the same units (leaf values, or probabilities)."""
    w = p ** -beta
    if normalise == "buffer":
        return w * p_min ** beta
    if normalise == "batch":
        return w / jnp.max(w)
    raise ValueError(f"normalise must be 'buffer' or 'batch', got {normalise!r}")


FLOAT32_MAX = float(np.finfo(np.float32).max)
# The smallest normal float32. XLA on CPU flushes subnormal floats to zero (a priority of
# 1e-45 compares equal to 0 there), so positive subnormal priorities are raised to this.
FLOAT32_TINY = float(np.finfo(np.float32).tiny)


def clamp_subnormal(priorities: Array) -> Array:
    """float32 `[B]` with every positive subnormal raised to the smallest normal float32.

    Found from the bit pattern (exponent bits 0, mantissa not 0), which flushing cannot hide.
    """
    bits = jax.lax.bitcast_convert_type(priorities, jnp.int32)
    subnormal = (bits > 0) & (bits < 0x00800000)
    return jnp.where(subnormal, jnp.float32(FLOAT32_TINY), priorities)


# The step counter `running_index` is kept below `counter_modulus + T` (about 2**30): far from
# int32's limit, whatever the lifetime of the buffer, without jax x64.
COUNTER_SPAN = 2 ** 30


@dataclasses.dataclass(frozen=True)
class PrioritisedCore(TrajectoryCore):
    """The storage core with a sum tree over its item slots (see the module docstring).

    `counter_span`: the step counter is reduced modulo `counter_modulus`, the largest multiple
    of T not above it (at least T). Tests lower it to cross the reduction quickly.
    """

    options: PriorityOptions = PriorityOptions()
    counter_span: int = COUNTER_SPAN

    @property
    def counter_modulus(self) -> int:
        """M, a multiple of T (hence of the period): `running_index` and `versions` are the
        steps written and the items' start times modulo M, which keeps every slot, the valid
        window and the stale-update guard exact. A stale `set_priorities` is therefore ignored
        unless its slot was rewritten exactly a multiple of M / T times since the sample."""
        t = self.max_length_time_axis
        return t * max(1, self.counter_span // t)

    @property
    def priority_exponent(self) -> float:
        return self.options.priority_exponent

    @property
    def max_leaf(self) -> float:
        """The largest leaf value, `priority ** priority_exponent`, that `set_priorities`
        accepts: the float32 maximum over twice the number of leaves, so that the root (a
        float32 sum of every leaf, rounded at each level) stays finite."""
        return FLOAT32_MAX / (2 * self.num_items)

    @property
    def largest_priority(self) -> float:
        """The largest raw priority `set_priorities` accepts, `max_leaf ** (1 / exponent)`
        (about 1.7e38 / num_items for exponent 1; any finite priority for exponent 0, and for
        small exponents, whose leaves cannot get that large). Larger ones are refused like NaN."""
        alpha = self.priority_exponent
        if alpha == 0 or np.log(self.max_leaf) / alpha >= np.log(FLOAT32_MAX):
            return FLOAT32_MAX
        return float(self.max_leaf ** (1 / alpha))

    @property
    def tree_geometry(self) -> sum_tree.Geometry:
        return sum_tree.geometry(self.num_items, self.options.branching)

    def written(self, state: PrioritisedTrajectoryBufferState) -> Array:  # type: ignore[override]
        return state.running_index

    # --------------------------------------------------------------------------------- init
    def empty_priorities(self) -> PriorityState:
        geo = self.tree_geometry
        return PriorityState(sum_tree=sum_tree.init(geo, 0.0),
                             min_tree=sum_tree.init(geo, jnp.inf),
                             max_priority=jnp.ones((), jnp.float32),
                             geometry=geo, priority_exponent=self.priority_exponent)

    def init(self, experience: PyTree) -> PrioritisedTrajectoryBufferState:
        base = super().init(experience)
        return PrioritisedTrajectoryBufferState(
            experience=base.experience, current_index=base.current_index,
            is_full=base.is_full, running_index=jnp.zeros((), jnp.int32),
            priority_state=self.empty_priorities(),
        )

    # ---------------------------------------------------------------------------------- add
    def add(self, state: PrioritisedTrajectoryBufferState, rows: PyTree,  # type: ignore[override]
            what: str = "add") -> PrioritisedTrajectoryBufferState:
        new = cast(PrioritisedTrajectoryBufferState, super().add(state, rows, what))
        a, written = self.steps_in(rows, what), state.running_index
        weights = self.entering_weights(new, written, a)
        return new.replace(running_index=self.reduce_counter(written + a),
                           priority_state=self.after_add(state.priority_state, written, a,
                                                         weights))

    def reduce_counter(self, written: Array) -> Array:
        """`written` (< M + 2T) brought below M + T by subtracting a multiple of M; never below
        T, so a full buffer still reads as full (M is a multiple of T, so slots, the valid
        window relative to W and the period grid are unchanged)."""
        t, m = self.max_length_time_axis, self.counter_modulus
        reduced = (written - t) % m + t
        return jnp.where(written >= m + t, reduced, written).astype(jnp.int32)

    def after_add(self, ps: PriorityState, written: Array, a: int,
                  weight_in: Optional[Array] = None) -> PriorityState:
        """Zero the items a write of `a` steps per row broke, give the items it completed the
        max priority (times `weight_in` `[R * m]`, 0/1, if given: an episode-aware buffer
        zeroes the windows that cross an episode end); `written` counts the steps per row
        before the write."""
        turn = self.turnover(written, a)
        new_leaf = jnp.full(turn.leaf_in.shape, ps.max_priority ** self.priority_exponent)
        if weight_in is not None:
            new_leaf = new_leaf * weight_in
        # Order matters: an entering item may reuse a leaving item's slot; the last write wins.
        index = jnp.concatenate([turn.leaf_out, turn.leaf_in])
        mask = jnp.concatenate([turn.mask_out, turn.mask_in])
        sums = jnp.concatenate([jnp.zeros_like(turn.leaf_out, jnp.float32),
                                new_leaf.astype(jnp.float32)])
        sum_t, min_t = sum_tree.update_sum_min(
            ps.sum_tree, ps.min_tree, self.tree_geometry, index, sums, mask)
        return ps.replace(sum_tree=sum_t, min_tree=min_t)

    def entering_weights(self, state: PrioritisedTrajectoryBufferState, written: Array,
                         a: int) -> Optional[Array]:
        """`[R * m]` 0/1 factors of the new items' priority after an add (`state`: after the
        write), or None (all 1); overridden by the episode-aware core (`episodes.py`)."""
        return None

    # ------------------------------------------------------------------------------- sample
    def can_sample(self, state: PrioritisedTrajectoryBufferState) -> Array:  # type: ignore[override]
        """bool `[]`: the uniform condition and a positive total priority."""
        return super().can_sample(state) & (sum_tree.root(state.priority_state.sum_tree) > 0)

    def check_can_sample(self, state: PrioritisedTrajectoryBufferState) -> None:  # type: ignore[override]
        """The storage condition (see the core), then a positive total priority."""
        super().check_can_sample(state)
        checks.value_check(
            sum_tree.root(state.priority_state.sum_tree) > 0,
            "sample: no item has a positive priority (set_priorities gave every valid item "
            "priority 0, so the total is 0); set a positive priority first. can_sample(state) "
            "is False until then",
        )

    def sample(self, state: PrioritisedTrajectoryBufferState,  # type: ignore[override]
               rng_key: Array, batch_size: Optional[int] = None) -> PrioritisedSample:
        """Draws `batch_size` items with probability `leaf / total`; experience as the uniform
        core's, plus `indices`, `priorities`, `probabilities`, `versions` `[B]`."""
        b = self.sample_size(batch_size)
        self.check_can_sample(state)
        ps = state.priority_state
        total = sum_tree.root(ps.sum_tree)
        leaf, priorities = sum_tree.sample_with_values(
            ps.sum_tree, self.tree_geometry, self.targets(rng_key, b) * total)
        return self.sample_at(state, leaf, total, priorities)

    def targets(self, rng_key: Array, b: int) -> Array:
        """`[b]` points in [0, 1) at which the priorities' CDF is inverted: one per equal
        stratum ("stratified") or i.i.d. ("independent")."""
        return sample_targets(rng_key, b, self.options.sampling == "stratified")

    def sample_at(self, state: PrioritisedTrajectoryBufferState, leaf: Array, total: Array,
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
            # Never NaN: a total of 0 (refused eagerly, a checkify check under jit) gives 0.
            probabilities=jnp.where(total > 0, priorities / jnp.where(total > 0, total, 1), 0.0),
            versions=self.slot_start(slot, self.written(state)).astype(jnp.int32),
        )

    # ------------------------------------------------------------------------ set_priorities
    def set_priorities(self, state: PrioritisedTrajectoryBufferState, indices: Array,
                       priorities: Array, versions: Optional[Array] = None,
                       mask: Optional[Array] = None) -> PrioritisedTrajectoryBufferState:
        """Sets raw priorities `[B]` (>= 0, at most `largest_priority`) of the items at leaf
        `indices` `[B]`. A positive subnormal priority (below 1.2e-38) is raised to the
        smallest normal float32, so that its item stays reachable.

        The last occurrence of a duplicated index wins. Updates are ignored (never applied)
        for items that are not currently valid (their leaf stays 0), and, when `versions` is
        given and `ignore_stale_priorities` is on, for slots rewritten since the sample.
        Out-of-range indices and negative / NaN / infinite priorities, and priorities whose
        `priority ** priority_exponent` exceeds `max_leaf` (the tree's total would overflow
        float32), raise ValueError in an eager call; under `jit` they are `checkify` checks
        and the entries are ignored, so the tree is never corrupted. Entries where `mask`
        `[B]` is False are skipped, neither checked nor applied (a shard of a sharded buffer
        skips the other shards' items).
        """
        indices, priorities, versions = self._checked_update(indices, priorities, versions)
        priorities = clamp_subnormal(priorities)
        active = jnp.ones(indices.shape, bool) if mask is None else jnp.asarray(mask, bool)
        in_range = (indices >= 0) & (indices < self.num_items)
        finite = jnp.isfinite(priorities) & (priorities >= 0)
        # NaN compares False: not small enough either, but reported by the check above.
        small_enough = priorities ** self.priority_exponent <= jnp.float32(self.max_leaf)
        good_value = finite & small_enough
        checks.value_check(
            in_range | ~active, "set_priorities: indices must lie in [0, " + str(self.num_items)
            + "), got {indices}", indices=indices,
        )
        checks.value_check(
            finite | ~active,
            "set_priorities: priorities must be finite and >= 0, got {priorities}",
            priorities=priorities,
        )
        checks.value_check(
            small_enough | ~finite | ~active,
            "set_priorities: priorities must be at most " + f"{self.largest_priority:.6g}"
            + " (with priority_exponent=" + str(self.priority_exponent) + ", the sum of "
            "priority ** priority_exponent over the " + str(self.num_items) + " items must stay "
            "finite in float32), got {priorities}",
            priorities=priorities,
        )
        written = state.running_index
        safe = jnp.clip(indices, 0, self.num_items - 1)
        s_now = self.slot_start(safe % self.slots_per_row, written)
        lo, n = self.valid_window(written)
        valid_item = (s_now >= lo) & (s_now < lo + n * self.period) & (s_now >= 0)
        keep = active & in_range & good_value & valid_item
        if versions is not None and self.options.ignore_stale_priorities:
            # Versions are start times modulo M (the counter may have been reduced since the
            # sample); compared modulo M, without a subtraction that could overflow.
            m = self.counter_modulus
            keep = keep & (jnp.remainder(versions, m) == jnp.remainder(s_now, m))
        ps = state.priority_state
        leaf = jnp.where(keep, priorities, 0.0) ** self.priority_exponent
        sum_t, min_t = sum_tree.update_sum_min(
            ps.sum_tree, ps.min_tree, self.tree_geometry, safe, leaf, keep)
        # initial=0: an empty update (e.g. a mixer part of size 0) is a no-op, not an error.
        max_p = jnp.maximum(ps.max_priority,
                            jnp.max(jnp.where(keep, priorities, 0.0), initial=0.0))
        return state.replace(
            priority_state=ps.replace(sum_tree=sum_t, min_tree=min_t, max_priority=max_p))

    @staticmethod
    def _checked_update(indices, priorities, versions):
        """The arguments of `set_priorities` as arrays (float32 priorities), their shapes and
        dtypes checked (static, so at trace time)."""
        indices, priorities = jnp.asarray(indices), jnp.asarray(priorities)
        if indices.ndim != 1 or priorities.shape != indices.shape:
            raise ValueError(
                f"set_priorities: indices {indices.shape} and priorities {priorities.shape} "
                "must both be [B]"
            )
        if not jnp.issubdtype(indices.dtype, jnp.integer):
            raise ValueError(f"set_priorities: indices must be integers, got {indices.dtype}")
        if versions is not None:
            versions = jnp.asarray(versions)
            if versions.shape != indices.shape:
                raise ValueError(
                    f"set_priorities: versions {versions.shape} must match indices "
                    f"{indices.shape}"
                )
        return indices, priorities.astype(jnp.float32), versions

    def importance_weights(self, state: PrioritisedTrajectoryBufferState,
                           sample: PrioritisedSample, beta: float | Array,
                           normalise: str = "buffer") -> Array:
        """`[B]` weights `(N * P(i)) ** -beta`, divided by the largest weight of any item in the
        buffer (`normalise="buffer"`, from the min tree) or of the batch (`"batch"`)."""
        min_leaf = sum_tree.root(state.priority_state.min_tree)
        return importance_weights(sample.priorities, min_leaf, beta, normalise)
