"""Episode-aware trajectory buffers: sequences that never cross an episode end, or that are
padded and masked after it.

`EpisodeOptions(end_key, mode, period)` says where episodes end and which windows are items:

| `sequence_mode`    | a window of L steps starting at absolute time s is an item when ...  |
|--------------------|-----------------------------------------------------------------------|
| `"within_episode"` | s is on the `period` grid and no episode ends at s + c, ..., s + L - 2 |
| `"padded"`         | s is on the grid or starts an episode (the step s - 1 ended one); the |
|                    | steps after the first end inside the window are zeros, `mask` False  |

with c = `lead` (0 but for flat buffers with `frame_stack`: their first K - 1 steps are only
the frames a stack reaches back to, `frames.py`, where an earlier episode is zeroed, not
refused), and, in both modes, all L steps are stored (`s >= W - T`, `s + L <= W`), exactly as for a
buffer without episodes. In `"padded"` mode with `period > 1` an episode may start off the
grid, so the core keeps one slot per time step (its internal period is 1) and the windows
off the grid that do not start an episode are simply never valid.

Incremental validity. Each add writes the end flags of its steps (`episode_ends`, and
`episode_starts` = the previous step ended an episode; the very first step of a row starts
one) beside the experience, and decides, once, the validity of every window the add
completes (`Turnover.start_in`): `L - 1` flags per completed window, read by dynamic slices
for a small add. The flags live in `window_valid` `[R, slots]` (the slots of a row are the
leaves of its windows, `leaf = row * slots + slot`; 2-D so that writing a column is a
dynamic update in place: a reshape around it would make XLA copy the array on every add).

Uniform sampling. Every row is written at the same time index, so an add completes (and
breaks) the same slots in every row: a column of the `[R, slots]` grid. A uniform buffer
keeps a sum tree over the *slots* (`window_count`, `slots_per_row` leaves), whose leaf is the
number of valid stored windows of that column (0 once the column's windows are overwritten).
An add of a few steps then rewrites one or two leaves (the small, loop-free path of
`sum_tree.update`) instead of `2 R` leaves of a tree over all windows. A draw descends the
tree to a column with probability `count / total`, and the target's residual inside that
leaf, uniform in `[0, count)`, picks the `k`-th valid row of the column: every valid window
has probability exactly `1 / total`. A prioritised buffer gives a completed invalid window the
leaf 0 instead of the max priority and ignores `set_priorities` for it, so its probability is
exactly 0.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Union, cast

import jax
import jax.numpy as jnp

from flax_replay._src import checks, sum_tree
from flax_replay._src.core import Sample, TrajectoryBufferState, TrajectoryCore, write_steps
from flax_replay._src.priorities import (
    PrioritisedCore,
    PrioritisedSample,
    PrioritisedTrajectoryBufferState,
)
from flax_replay._src.typing import Array, PyTree

SEQUENCE_MODES = ("within_episode", "padded")
# Adds completing at most this many windows per row read and write their flags with dynamic
# slices, one column at a time; larger ones (a first fill) with one gather / scatter.
SMALL_ADD = 4
EndKey = Union[str, Callable[[PyTree], Array]]


# ------------------------------------------------------------------------------ options
def _leaf(tree: PyTree, key: str) -> Optional[Any]:
    if isinstance(tree, dict) or hasattr(tree, "keys") and hasattr(tree, "get"):
        return tree.get(key)
    return getattr(tree, key, None)


@dataclasses.dataclass(frozen=True)
class EpisodeOptions:
    """Where episodes end, and which windows are items (see the module docstring).

    end_key: the name of a top-level bool leaf (shape `[]` per step) that is True on the last
      step of an episode, or a function `step -> bool[]` of one step.
    mode: "within_episode" or "padded".
    period: the user's `period` (the grid windows start on).
    lead: the steps at the start of each window that are context only (the older frames of a
      flat buffer's frame stacks): an episode end among them leaves the window valid.
    """

    end_key: EndKey
    mode: str = "within_episode"
    period: int = 1
    lead: int = 0

    def __post_init__(self) -> None:
        if self.mode not in SEQUENCE_MODES:
            raise ValueError(
                f"sequence_mode must be 'within_episode' or 'padded', got {self.mode!r}")
        if not (isinstance(self.end_key, str) or callable(self.end_key)):
            raise ValueError(
                "episode_end_key must be the name of a bool leaf or a function step -> bool[], "
                f"got {self.end_key!r}")
        checks.positive_int("period", self.period)
        checks.non_negative_int("lead", self.lead)
        if self.lead and self.padded:
            raise ValueError("sequence_mode='padded' has no context steps (lead must be 0)")

    @property
    def padded(self) -> bool:
        return self.mode == "padded"

    def check_experience(self, experience: PyTree) -> None:
        """ValueError unless the end signal of one example step is a bool scalar."""
        if isinstance(self.end_key, str):
            leaf = _leaf(experience, self.end_key)
            if leaf is None:
                raise ValueError(
                    f"episode_end_key {self.end_key!r} is not a top-level leaf of the experience")
            what = f"episode_end_key {self.end_key!r}"
        else:
            leaf = jax.eval_shape(self.end_key, experience)
            what = "episode_end_key (the function's result)"
        if not hasattr(leaf, "shape"):
            leaf = jnp.asarray(leaf)
        if jnp.result_type(leaf) != jnp.bool_:
            raise ValueError(f"{what} must be bool, got {jnp.result_type(leaf)}")
        if tuple(leaf.shape) != ():
            raise ValueError(
                f"{what} must have shape () per step (one flag per step), got {tuple(leaf.shape)}")

    def flags(self, steps: PyTree, n_axes: int) -> Array:
        """bool `[*prefix]`: the end flag of every step of `steps` (leaves `[*prefix, ...]`,
        `n_axes` leading axes)."""
        if isinstance(self.end_key, str):
            return jnp.asarray(_leaf(steps, self.end_key), bool)
        fn = self.end_key
        for _ in range(n_axes):
            fn = jax.vmap(fn)
        return jnp.asarray(fn(steps), bool)


def real_steps(ends: Array) -> Array:
    """bool `[..., L]`: True up to and including the first end of each window `ends`
    `[..., L]` (the steps of the window's own episode), False after it (padding)."""
    # The first end's position by a reduction: a cumulative sum lowers to a reduce-window
    # that XLA:CPU runs several times slower than the rest of a sample.
    l = ends.shape[-1]
    first = jnp.min(jnp.where(ends, jnp.arange(l), l), axis=-1, keepdims=True)
    return jnp.arange(l) <= first


# -------------------------------------------------------------------------------- state
class EpisodeTrajectoryBufferState(TrajectoryBufferState):
    """A uniform episode-aware state (all in collection "replay").

    episode_ends / episode_starts: bool `[add_batch_size, max_length_time_axis]`, per stored
      step: it ends an episode / it starts one.
    window_valid: bool `[add_batch_size, slots_per_row]`, the episode validity of the window
      in each slot, decided when the window was completed.
    window_count: float32 sum tree (`[num_nodes]`) over the `slots_per_row` columns: the
      number of valid stored windows in each column (rows of that slot).
    """

    episode_ends: Array
    episode_starts: Array
    window_valid: Array
    window_count: Array


class PrioritisedEpisodeTrajectoryBufferState(PrioritisedTrajectoryBufferState):
    """A prioritised episode-aware state: the prioritised fields and `episode_ends`,
    `episode_starts`, `window_valid` (as the uniform one) in "replay"."""

    episode_ends: Array
    episode_starts: Array
    window_valid: Array


class EpisodeSample(Sample):
    """A `"padded"` sample: `experience` `[B, L, ...]` (zeros after the first episode end of
    each sequence) and `mask` bool `[B, L]`, True for real steps."""

    mask: Array


class PrioritisedEpisodeSample(PrioritisedSample):
    """A prioritised `"padded"` sample: the prioritised fields and `mask` bool `[B, L]`."""

    mask: Array


def with_full_mask(sample: Sample, length: int) -> Sample:
    """`sample` (experience `[B, L, ...]`) as a padded sample whose steps are all real: a
    `mask` of True `[B, L]` (e.g. to mix it with padded samples). ValueError when its
    experience is not sequences of `length` steps."""
    leaves = jax.tree_util.tree_leaves(sample.experience)
    shapes = {tuple(x.shape[:2]) for x in leaves}
    if len(shapes) != 1 or any(len(x.shape) < 2 for x in leaves) \
            or next(iter(shapes))[1] != length:
        raise ValueError(
            f"mixing padded sequences (mask [B, {length}]) with a sample whose experience is "
            f"not [B, {length}, ...] sequences (leading shapes {sorted(shapes)})")
    b = next(iter(shapes))[0]
    fields = {f.name: getattr(sample, f.name) for f in dataclasses.fields(sample)}
    kind = PrioritisedEpisodeSample if isinstance(sample, PrioritisedSample) else EpisodeSample
    return kind(mask=jnp.ones((b, length), bool), **fields)


# ------------------------------------------------------------------------------- cores
class EpisodeMethods:
    """What an episode-aware core adds to `TrajectoryCore` / `PrioritisedCore` (a mixin: the
    storage, the period grid and the priorities stay the parent's)."""

    episodes: EpisodeOptions
    # Provided by the core the mixin is combined with.
    add_batch_size: int
    max_length_time_axis: int
    min_length_time_axis: int
    sample_sequence_length: int
    period: int
    num_items: int
    slots_per_row: int

    def _episode_fields(self) -> dict[str, Array]:
        shape = (self.add_batch_size, self.max_length_time_axis)
        return dict(episode_ends=jnp.zeros(shape, bool), episode_starts=jnp.zeros(shape, bool),
                    window_valid=jnp.zeros((self.add_batch_size, self.slots_per_row), bool))

    def _write_flags(self, state: Any, rows: PyTree, written: Array) -> dict[str, Array]:
        """The end/start flags of the new steps `rows` `[R, A, ...]` written at the write head."""
        t = self.max_length_time_axis
        ends = self.episodes.flags(rows, 2)
        a = ends.shape[1]
        time = (state.current_index + jnp.arange(a, dtype=jnp.int32)) % t
        last = (state.current_index - 1) % t  # the previous step, kept by any add of a < T
        old_ends = state.episode_ends
        new_ends = write_steps(old_ends, ends, time)
        # Read the previous step's flag from the written array: reading the old one first
        # would make XLA copy the whole flag array on every add instead of writing in place.
        prev = (old_ends if a == t else new_ends)[:, last] | (written == 0)
        starts = jnp.concatenate([prev[:, None], ends[:, :-1]], axis=1)
        return dict(
            episode_ends=new_ends,
            episode_starts=write_steps(state.episode_starts, starts, time),
        )

    def _window_ok(self, state: Any, start: Array) -> Array:
        """bool `[R, m]`: the episode validity of the windows starting at absolute times
        `start` `[m]` in every row, from the stored flags (all their steps are stored)."""
        t, l = self.max_length_time_axis, self.sample_sequence_length
        if self.episodes.padded:
            on_grid = (start % self.episodes.period == 0)[None, :]
            if start.shape[0] <= SMALL_ADD:
                starts = jnp.concatenate([jax.lax.dynamic_slice_in_dim(
                    state.episode_starts, s % t, 1, axis=1) for s in start], axis=1)
            else:
                starts = state.episode_starts[:, start % t]
            return on_grid | starts
        c = self.episodes.lead
        n = l - 1 - c  # flags that must be False: positions c .. L - 2 of the window
        if n <= 0:
            return jnp.ones((self.add_batch_size, start.shape[0]), bool)
        if start.shape[0] <= SMALL_ADD:
            return jnp.stack([~jnp.any(self._flags_from(state.episode_ends, s + c, n), axis=-1)
                              for s in start], axis=1)
        time = (start[:, None] + c + jnp.arange(n)) % t  # [m, n]
        return ~jnp.any(state.episode_ends[:, time], axis=-1)

    def _flags_from(self, flags: Array, start: Array, n: int) -> Array:
        """`[R, n]`: `flags[:, (start + i) % T]` for i < n (n <= T), by dynamic slices (a
        gather's indices cost more than the few flags it reads). The window may wrap around
        the time axis: the last and the first n columns, side by side, are consecutive times,
        and the window is a slice of them."""
        t = self.max_length_time_axis
        start = start % t
        lo = jnp.minimum(start, t - n)
        pair = jnp.concatenate([jax.lax.dynamic_slice_in_dim(flags, lo, n, axis=1),
                                flags[:, :n]], axis=1)
        return jax.lax.dynamic_slice_in_dim(pair, start - lo, n, axis=1)

    def _entering(self, state: Any, written: Array, a: int):
        """The turnover of an add of `a` steps and the validity `[R * m]` of the windows it
        completes; `state` is the state after the write."""
        turn = cast(TrajectoryCore, self).turnover(written, a)
        ok = self._window_ok(state, turn.start_in)  # [R, m]
        m = turn.start_in.shape[0]
        if m > SMALL_ADD:
            flat = state.window_valid.reshape(-1)
            valid = flat.at[turn.leaf_in].set(
                jnp.where(turn.mask_in, ok.reshape(-1), flat[turn.leaf_in]))
            return turn, ok.reshape(-1), valid.reshape(state.window_valid.shape)
        # Row 0's leaves are the slots; every row completes the same ones: one column each.
        grid = state.window_valid
        for j in range(m):
            slot, keep = turn.leaf_in[j], turn.mask_in[j]
            old = jax.lax.dynamic_slice_in_dim(grid, slot, 1, axis=1)
            grid = jax.lax.dynamic_update_slice_in_dim(
                grid, jnp.where(keep, ok[:, j:j + 1], old), slot, axis=1)
        return turn, ok.reshape(-1), grid

    def check_can_sample(self, state: Any) -> None:
        checks.value_check(
            self.can_sample(state),  # type: ignore[attr-defined]
            "sample: the buffer cannot be sampled yet: no valid sequence exists yet ({steps} "
            "steps per row written; min_length_time_axis="
            + str(self.min_length_time_axis) + ", sequence length "
            + str(self.sample_sequence_length) + ", sequence_mode=" + repr(self.episodes.mode)
            + ("; in this mode a window that crosses an episode end is never valid, so "
               "episodes shorter than the sequence length are never sampled"
               if not self.episodes.padded
               else "") + "); check can_sample(state) first",
            steps=self.written(state),  # type: ignore[attr-defined]
        )

    def with_mask(self, out: Sample) -> Sample:
        """`out` with padding zeroed and `mask` `[B, L]` added (`"padded"` mode), or as is."""
        if not self.episodes.padded:
            return out
        mask = real_steps(self.episodes.flags(out.experience, 2))

        def zero(x: Array) -> Array:
            m = mask.reshape(mask.shape + (1,) * (x.ndim - 2))
            return jnp.where(m, x, jnp.zeros_like(x))

        fields = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
        fields["experience"] = jax.tree.map(zero, out.experience)
        kind = PrioritisedEpisodeSample if isinstance(out, PrioritisedSample) else EpisodeSample
        return kind(mask=mask, **fields)


@dataclasses.dataclass(frozen=True)
class EpisodeCore(EpisodeMethods, TrajectoryCore):
    """A uniform trajectory core whose items respect episodes (see the module docstring)."""

    episodes: EpisodeOptions = EpisodeOptions("done")

    @property
    def count_geometry(self) -> sum_tree.Geometry:
        """The tree over the columns (slots of a row): one leaf per slot."""
        return sum_tree.geometry(self.slots_per_row)

    def sampleable(self, state: EpisodeTrajectoryBufferState) -> Array:
        """bool `[num_items]`: the windows a sample can return (valid and stored)."""
        live = sum_tree.leaves(state.window_count, self.count_geometry) > 0  # [slots]
        return (state.window_valid & live[None, :]).reshape(-1)

    def init(self, experience: PyTree) -> EpisodeTrajectoryBufferState:
        self.episodes.check_experience(experience)
        base = TrajectoryCore.init(self, experience)
        return EpisodeTrajectoryBufferState(
            experience=base.experience, current_index=base.current_index, is_full=base.is_full,
            window_count=sum_tree.init(self.count_geometry, 0.0), **self._episode_fields())

    def add(self, state: EpisodeTrajectoryBufferState, rows: PyTree,  # type: ignore[override]
            what: str = "add") -> EpisodeTrajectoryBufferState:
        written = self.written(state)
        new = TrajectoryCore.add(self, state, rows, what)
        new = new.replace(**self._write_flags(state, rows, written))
        turn, ok, valid = self._entering(new, written, self.steps_in(rows, what))
        # One leaf per column: row 0's leaves are the slots (the masks are the same in every
        # row). A column leaving counts 0; one entering counts its valid windows; where both
        # (a large add), the entering one is written last and wins.
        m = turn.start_in.shape[0]
        counts = jnp.sum(ok.reshape(self.add_batch_size, m), axis=0, dtype=jnp.float32)
        index = jnp.concatenate([turn.leaf_out[:m], turn.leaf_in[:m]])
        mask = jnp.concatenate([turn.mask_out[:m], turn.mask_in[:m]])
        values = jnp.concatenate([jnp.zeros((m,), jnp.float32), counts])
        (count,) = sum_tree.update((state.window_count,), self.count_geometry, index,
                                   (values,), mask, ("sum",))
        return cast(EpisodeTrajectoryBufferState,
                    new.replace(window_valid=valid, window_count=count))

    def can_sample(self, state: EpisodeTrajectoryBufferState) -> Array:  # type: ignore[override]
        return TrajectoryCore.can_sample(self, state) & (sum_tree.root(state.window_count) > 0)

    def uniform_items(self, state: EpisodeTrajectoryBufferState,  # type: ignore[override]
                      rng_key: Array, b: int) -> tuple[Array, Array]:
        """`(row, start)` `[b]`: valid windows drawn uniformly (see the module docstring)."""
        total = sum_tree.root(state.window_count)
        u = jax.random.uniform(rng_key, (b,), jnp.float32)
        return self.items_at(state, u * total)

    def items_at(self, state: EpisodeTrajectoryBufferState,
                 targets: Array) -> tuple[Array, Array]:
        """`(row, start)` `[b]` of targets `[b]` in `[0, total)`: the column by the tree's
        inverse CDF, then the `floor(residual)`-th valid row of that column."""
        slot, count, residual = sum_tree.sample_with_residuals(
            state.window_count, self.count_geometry, targets)
        k = jnp.clip(jnp.floor(residual), 0, jnp.maximum(count - 1, 0)).astype(jnp.int32)
        r = self.add_batch_size
        column = state.window_valid[jnp.arange(r)[None, :], slot[:, None]]  # [b, R]
        return jnp.minimum(kth_true(column, k), r - 1), slot * self.period

    def sample(self, state: EpisodeTrajectoryBufferState,  # type: ignore[override]
               rng_key: Array, batch_size: Optional[int] = None) -> Sample:
        return self.with_mask(TrajectoryCore.sample(self, state, rng_key, batch_size))


@dataclasses.dataclass(frozen=True)
class PrioritisedEpisodeCore(EpisodeMethods, PrioritisedCore):
    """A prioritised trajectory core whose items respect episodes: an invalid window's leaf
    is 0 from the add that completes it, and `set_priorities` leaves it 0."""

    episodes: EpisodeOptions = EpisodeOptions("done")

    def init(self, experience: PyTree) -> PrioritisedEpisodeTrajectoryBufferState:
        self.episodes.check_experience(experience)
        base = PrioritisedCore.init(self, experience)
        fields: dict[str, Any] = {f.name: getattr(base, f.name)
                                  for f in dataclasses.fields(base)}
        fields.update(self._episode_fields())
        return PrioritisedEpisodeTrajectoryBufferState(**fields)

    def add(self, state: PrioritisedEpisodeTrajectoryBufferState,  # type: ignore[override]
            rows: PyTree, what: str = "add") -> PrioritisedEpisodeTrajectoryBufferState:
        # The flags are written first, so that `entering_weights` (called by the parent's add
        # after its write) sees them.
        flagged = state.replace(**self._write_flags(state, rows, state.running_index))
        new = PrioritisedCore.add(self, flagged, rows, what)
        _, _, valid = self._entering(new, state.running_index, self.steps_in(rows, what))
        return cast(PrioritisedEpisodeTrajectoryBufferState, new.replace(window_valid=valid))

    def entering_weights(self, state: PrioritisedTrajectoryBufferState,
                         written: Array, a: int) -> Array:
        return self._entering(state, written, a)[1].astype(jnp.float32)

    def sample(self, state: PrioritisedEpisodeTrajectoryBufferState,  # type: ignore[override]
               rng_key: Array, batch_size: Optional[int] = None) -> PrioritisedSample:
        return cast(PrioritisedSample,
                    self.with_mask(PrioritisedCore.sample(self, state, rng_key, batch_size)))

    def set_priorities(self, state: PrioritisedEpisodeTrajectoryBufferState,  # type: ignore[override]
                       indices: Array, priorities: Array, versions: Optional[Array] = None,
                       mask: Optional[Array] = None) -> PrioritisedEpisodeTrajectoryBufferState:
        """As `PrioritisedCore.set_priorities`; updates of windows that cross an episode end
        are skipped (their leaf stays 0, they never raise the max priority). Bad indices and
        priorities are still checked."""
        idx, p, _ = self._checked_update(indices, priorities, versions)
        safe = jnp.clip(idx, 0, self.num_items - 1)
        bad = (idx < 0) | (idx >= self.num_items) | ~jnp.isfinite(p) | (p < 0)
        keep = state.window_valid.reshape(-1)[safe] | bad
        if mask is not None:
            keep = keep & jnp.asarray(mask, bool)
        return cast(PrioritisedEpisodeTrajectoryBufferState,
                    PrioritisedCore.set_priorities(self, state, indices, priorities, versions,
                                                   keep))


def kth_true(flags: Array, k: Array) -> Array:
    """int32 `[b]`: the index of the `k[i]`-th (from 0) True of each row of `flags` bool
    `[b, r]` (`r` where a row has fewer than k + 1).

    Each row is packed into 32-bit words; the word holding the k-th True is found from the
    words' population counts, and the bit inside it by `kth_set_bit`: a few elementwise
    steps, where a running sum over the flags would cost a pass per flag.
    """
    b, r = flags.shape
    n = -(-r // 32)
    # Packed by an unrolled OR of the columns, not a reduction: the reduction's loop made
    # XLA:CPU recompute the flags' gather indices (a whole tree path) for every flag.
    packed = []
    for w in range(n):
        word = jnp.zeros((b,), jnp.uint32)
        for j in range(min(32, r - 32 * w)):
            word = word | (flags[:, 32 * w + j].astype(jnp.uint32) << j)
        packed.append(word)
    words = jnp.stack(packed, axis=1)  # [b, n]
    if n == 1:
        return jnp.minimum(kth_set_bit(words[:, 0], k, min(r, 32)), r)
    counts = jax.lax.population_count(words).astype(jnp.int32)
    before = jnp.cumsum(counts, axis=1) - counts  # Trues in the words before each word
    word = jnp.sum(before + counts <= k[:, None], axis=1, dtype=jnp.int32)  # n: past the end
    at = jnp.minimum(word, n - 1)[:, None]
    bit = kth_set_bit(jnp.take_along_axis(words, at, axis=1)[:, 0],
                      k - jnp.take_along_axis(before, at, axis=1)[:, 0], 32)
    return jnp.where(word < n, jnp.minimum(word * 32 + bit, r), r)


def kth_set_bit(bits: Array, k: Array, width: int) -> Array:
    """int32 `[b]`: the position of the `k`-th (from 0) set bit of `bits` uint32 `[b]` whose
    set bits lie below `width` <= 32 (`width` when fewer than k + 1 are set). A binary search
    on population counts: a few elementwise steps that XLA fuses into one loop, where a
    running sum over the bits would cost one pass per bit."""
    pos = jnp.zeros(k.shape, jnp.int32)
    half = 1  # the largest power of two below width (1 for width 1)
    while 2 * half < width:
        half *= 2
    while half >= 1:
        low = jax.lax.population_count(bits & jnp.uint32((1 << half) - 1)).astype(jnp.int32)
        up = low <= k  # the k-th set bit is above the lower `half` bits
        k = jnp.where(up, k - low, k)
        bits = jnp.where(up, bits >> half, bits)
        pos = jnp.where(up, pos + half, pos)
        half //= 2
    # Bit 0 of `bits` is now the one at `pos`: the k-th set bit when it is set and no set bit
    # is left to skip (k == 0); with fewer than k + 1 set bits one of the two fails.
    return jnp.where(((bits & 1) == 1) & (k == 0), pos, width)


def episode_core(core: TrajectoryCore, episodes: Optional[EpisodeOptions]) -> TrajectoryCore:
    """`core` made episode-aware by `episodes` (None: `core` itself, today's behaviour). In
    `"padded"` mode the core's own period becomes 1 (episode starts may lie off the grid)."""
    if episodes is None:
        return core
    fields = {f.name: getattr(core, f.name) for f in dataclasses.fields(core)}
    if episodes.padded:
        fields["period"] = 1
    kind = PrioritisedEpisodeCore if isinstance(core, PrioritisedCore) else EpisodeCore
    return kind(**fields, episodes=episodes)


def sequence_priorities(td_errors: Array, mask: Optional[Array] = None,
                        eta: float = 0.9) -> Array:
    """R2D2's sequence priority `eta * max_t |td| + (1 - eta) * mean_t |td|` over the real
    steps of each sequence.

    td_errors: `[B, L]` TD errors (their absolute values are used).
    mask: optional bool `[B, L]`, True for real steps (a padded sample's `mask`); a sequence
      with no real step gets priority 0.
    Returns float32 `[B]`, ready for `set_priorities`.
    """
    td = jnp.abs(jnp.asarray(td_errors, jnp.float32))
    if td.ndim != 2:
        raise ValueError(f"sequence_priorities: td_errors must be [B, L], got {td.shape}")
    m = jnp.ones(td.shape, bool) if mask is None else jnp.asarray(mask, bool)
    if m.shape != td.shape:
        raise ValueError(
            f"sequence_priorities: mask {m.shape} must match td_errors {td.shape}")
    n = jnp.sum(m, axis=1)
    peak = jnp.max(jnp.where(m, td, 0.0), axis=1)
    mean = jnp.sum(jnp.where(m, td, 0.0), axis=1) / jnp.maximum(n, 1)
    return jnp.where(n > 0, eta * peak + (1.0 - eta) * mean, 0.0)
