"""One buffer laid out over a `Mesh`, on one host or many, with JAX's own machinery.

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    buffer = flax_replay.shard(make_prioritised_flat_buffer(..., add_batch_size=64), mesh)
    state = buffer.init(example_step)                    # arrays with NamedShardings
    state = jax.jit(buffer.add, donate_argnums=0)(state, batch)      # no collective
    sample = jax.jit(buffer.sample)(state, key)          # sharded along the batch axis

The layout (`layout.py`): the single-device state, with the experience rows sharded over the
mesh axis and one sum tree per shard. Shard k of S holds rows `[k R/S, (k+1) R/S)` and the sum
tree over their items; its leaf j is the buffer's leaf `k * (R/S) * slots + j`, which is exactly
the single-device leaf index, so `sample.indices` mean the same thing sharded or not. New items
get the largest priority set so far *on their shard* (with one shard: the single-device rule),
so no add needs to hear from another shard.

Every method runs the unchanged single-device core on each shard's block under
`jax.shard_map`, with the per-shard configuration (`add_batch_size = R/S`); the per-shard
code never touches another device's memory, and whatever does cross devices is written here
as an explicit collective:

| method                  | crosses devices                                                   |
|-------------------------|-------------------------------------------------------------------|
| add                     | nothing                                                           |
| set_priorities, local   | nothing                                                           |
| sample, local           | nothing (a scalar all-reduce when `can_sample` is checkified)     |
| sample, global          | S floats (the shards' totals), then each sampled item, once       |
| set_priorities, global  | the [B] indices/priorities/versions (gathered by `jit`)           |
| can_sample, prioritised | a scalar all-reduce (uniform: nothing, the indices are replicated)|
| importance_weights      | a scalar all-reduce                                               |

Sampling modes (`sampling=`), the trade-off:
- "local": each shard draws `B/S` items from its own rows (uniform, or by its own sum tree)
  and the sample comes out sharded along the batch axis, ready for a data-parallel learner;
  no experience crosses devices. The distribution is stratified by shard: an item of shard k
  is drawn with probability `p_i / (S * total_k)` (reported in `sample.probabilities`, and
  used by `importance_weights`), not `p_i / total`. Uniform buffers lose nothing (all shards
  hold equally many valid items); prioritised buffers are exact only per shard.
- "global": the exact distribution of the whole buffer (uniform over all valid items, or
  `p_i / sum_k total_k`). Every shard makes the same draw from the same key (a uniform draw
  is the single-device draw itself), reads the items it owns and a reduce-scatter hands each
  shard its slice of the batch: the sampled items cross devices once. Episode-aware buffers
  (`episodes.py`) invert the shards' counts of valid windows the same way (S floats), then
  their own column trees; padded samples carry their `mask` through the reduce-scatter.

Host memory: a buffer made with `memory_kind="pinned_host"` keeps this layout; the experience
leaves' shardings carry the memory kind (`layout.in_storage`), so every device holds its rows
in its host memory and its trees in device memory, and each shard's block is written and
gathered there by the unchanged core (`memory.py`).

Checkpoints: the state is a pytree of global arrays; Orbax saves and restores it from every
process. `abstract_state` gives restore targets with this mesh's shardings, and `reshard`
turns a state written on any number of shards (or unsharded) into this buffer's layout
(`reshard.py`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from flax_replay._src import checks, layout, sum_tree
from flax_replay._src.buffers import Buffer
from flax_replay._src.core import Sample, TrajectoryBufferState, TrajectoryCore
from flax_replay._src.episodes import (
    EpisodeCore,
    EpisodeMethods,
    EpisodeTrajectoryBufferState,
)
from flax_replay._src.functions import require_unreplaced
from flax_replay._src.priorities import (
    PrioritisedCore,
    PrioritisedSample,
    PrioritisedTrajectoryBufferState,
    importance_weights,
)
from flax_replay._src.reshard import regroup_priorities, regroup_window_counts
from flax_replay._src.typing import Array, Axis, PyTree


def _where(mask: Array, tree: PyTree) -> PyTree:
    """`tree` where `mask` `[B]` holds, zeros elsewhere (leaves with a leading `[B]`)."""
    def keep(x):
        m = mask.reshape(mask.shape + (1,) * (x.ndim - 1))
        return jnp.where(m, x, jnp.zeros_like(x))

    return jax.tree.map(keep, tree)


def _prioritised(core: TrajectoryCore) -> PrioritisedCore:
    """`core`, known to be prioritised (the prioritised paths are only taken for those)."""
    assert isinstance(core, PrioritisedCore)
    return core


def _block_to_state(state):
    """A shard's block -> the single-device state of its rows (drop the [1] shard axis)."""
    if isinstance(state, EpisodeTrajectoryBufferState):
        return state.replace(window_count=state.window_count[0])
    if isinstance(state, PrioritisedTrajectoryBufferState):
        return state.replace(priority_state=jax.tree.map(lambda x: x[0], state.priority_state))
    return state


def _state_to_block(state):
    """Inverse of `_block_to_state`."""
    if isinstance(state, EpisodeTrajectoryBufferState):
        return state.replace(window_count=state.window_count[None])
    if isinstance(state, PrioritisedTrajectoryBufferState):
        return state.replace(priority_state=jax.tree.map(lambda x: x[None], state.priority_state))
    return state


@dataclasses.dataclass(frozen=True)
class ShardedBuffer:
    """A buffer whose rows are sharded over the mesh axis (or axes) `axis`; one sum tree per
    shard. The same methods as the buffer it wraps, pure functions of the (global) state, to
    be jitted with the state donated; see the module docstring for the layout and modes.

    Attributes:
      buffer: a `Buffer` / `PrioritisedBuffer` from a `make_*` factory; its
        `add_batch_size` and sample batch sizes must be multiples of the number of shards.
      mesh: a `jax.sharding.Mesh` (the global mesh on a multi-process run).
      axis: the mesh axis name (or tuple of names) the rows are sharded over.
      sampling: "local" or "global" (see the module docstring).
    """

    buffer: Buffer
    mesh: Mesh
    axis: Axis = "data"
    sampling: str = "local"
    consumes_samples: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not isinstance(self.buffer, Buffer):
            raise ValueError(
                f"buffer: only the buffers of the make_* factories can be sharded, got "
                f"{type(self.buffer).__name__}"
            )
        require_unreplaced(self.buffer, "shard")
        if self.sampling not in ("local", "global"):
            raise ValueError(f"sampling must be 'local' or 'global', got {self.sampling!r}")
        missing = [a for a in layout.axes(self.axis) if a not in self.mesh.shape]
        if missing:
            raise ValueError(f"axis {self.axis!r}: the mesh has no axis {missing[0]!r} "
                             f"(its axes are {tuple(self.mesh.shape)})")
        rows, s = self.buffer.core.add_batch_size, self.num_shards
        if rows % s:
            raise ValueError(
                f"add_batch_size ({rows}) must be a multiple of the {s} shards of mesh axis "
                f"{self.axis!r} (flat buffers: pass add_batch_size; item buffers have one row "
                "and cannot be sharded)"
            )
        self._check_batch(self.buffer.core.sample_batch_size)

    @property
    def num_shards(self) -> int:
        return layout.buffer_shards(self.mesh, self.axis)

    @property
    def local(self) -> Buffer:
        """The buffer one shard runs: the same definition with `R / S` rows."""
        return layout.local_buffer(self.buffer, self.num_shards)

    @property
    def prioritised(self) -> bool:
        return isinstance(self.buffer.core, PrioritisedCore)

    @property
    def episodes(self) -> bool:
        """Whether the buffer is episode-aware: each shard then has its own valid windows."""
        return isinstance(self.buffer.core, EpisodeMethods)

    def _check_batch(self, b: int) -> None:
        if b % self.num_shards:
            raise ValueError(
                f"sample_batch_size ({b}) must be a multiple of the {self.num_shards} shards "
                f"of mesh axis {self.axis!r}"
            )

    # -------------------------------------------------------------------------- layout
    def partition_specs(self, state: Any) -> Any:
        """A `PartitionSpec` for every array of `state` (concrete or abstract)."""
        return layout.partition_specs(state, self.axis)

    @property
    def memory_kind(self) -> Optional[str]:
        """Where the experience leaves live (the buffer's `memory_kind`; None: device)."""
        return self.buffer.core.memory_kind

    def shardings(self, state: Any) -> Any:
        """A `NamedSharding` on `mesh` for every array of `state` (for `jit`, Orbax); the
        experience leaves carry the buffer's `memory_kind`."""
        return layout.shardings(state, self.mesh, self.axis, self.memory_kind)

    def init(self, experience: PyTree):
        """The empty state for steps shaped like `experience`, created in place on the mesh
        (each device allocates only its shard)."""
        make = functools.partial(layout.sharded_init, self.buffer, experience, self.num_shards)
        return jax.jit(make, out_shardings=self.shardings(jax.eval_shape(make)))()

    def abstract_state(self, experience: PyTree, num_shards: Optional[int] = None):
        """`jax.ShapeDtypeStruct`s with this mesh's shardings: Orbax restore targets.

        `num_shards`: restore a state written by a buffer sharded that many ways (e.g. on
        another mesh; read it from the checkpoint's metadata, the leading size of
        `sum_tree`): its per-shard trees are then restored replicated, for `reshard`.
        """
        return layout.abstract_state(self.buffer, self.mesh, self.axis, experience, num_shards)

    def reshard(self, state: TrajectoryBufferState):
        """`state`, written by a buffer of the same definition unsharded or sharded any
        number of ways (e.g. restored from a checkpoint made on another mesh), in this
        buffer's layout and shardings. Experience and leaf priorities are kept exactly; the
        trees are rebuilt from their leaves; a shard's max priority is the largest of the
        old shards' its rows came from."""
        return self._regroup(state, self.num_shards)

    def unshard(self, state: TrajectoryBufferState):
        """`state` in the single-device layout of `buffer` (one tree, replicated; rows still
        sharded), e.g. to hand a sharded buffer to code that expects an unsharded one."""
        return self._regroup(state, None)

    def _regroup(self, state: TrajectoryBufferState, num_shards: Optional[int]):
        where = layout.replicate_trees(state, self.shardings(state), self.mesh)
        return self._regroup_placed(jax.device_put(state, where), num_shards)

    @functools.partial(jax.jit, static_argnums=(0, 2))
    def _regroup_placed(self, state: TrajectoryBufferState, num_shards: Optional[int]):
        out = regroup_priorities(state, self.buffer.core, num_shards)
        out = regroup_window_counts(out, self.buffer.core, num_shards)
        return layout.constrain(out, self.mesh, self.partition_specs(out), self.memory_kind)

    # ----------------------------------------------------------------- shard_map plumbing
    def _map(self, body, in_specs, out_specs):
        """`body` on every shard's block (call it under `jit`); the arguments are first put
        where `in_specs` says (a no-op when they are there already, as a donated state is)."""
        mapped = jax.shard_map(body, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs)
        return lambda *args: mapped(*layout.constrain(args, self.mesh, in_specs,
                                                      self.memory_kind))

    def _shard(self) -> Array:
        return jax.lax.axis_index(self.axis)

    # ---------------------------------------------------------------------------- methods
    def add(self, state: TrajectoryBufferState, batch: PyTree):
        """Writes `batch` (the layout's axes, rows first: `[add_batch_size, ...]`); each shard
        writes its own rows and updates its own tree."""
        self.buffer.layout.to_rows(batch, state.experience, self.buffer.core)  # global checks
        return self._add(state, batch)

    # The shard_map parts are jitted with the (hashable) buffer static: eager calls compile
    # once, and under the caller's `jit` they are inlined (donation included).
    @functools.partial(jax.jit, static_argnums=0)
    def _add(self, state: TrajectoryBufferState, batch: PyTree):
        specs = self.partition_specs(state)

        def body(state, batch):
            return _state_to_block(self.local.add(_block_to_state(state), batch))

        return self._map(body, (specs, P(self.axis)), specs)(state, batch)

    @functools.partial(jax.jit, static_argnums=0)
    def can_sample(self, state: TrajectoryBufferState) -> Array:
        """bool `[]`: local sampling needs every shard sampleable, global sampling any."""
        def body(state):
            ok = self.local.can_sample(_block_to_state(state))
            if not (self.prioritised or self.episodes):
                return ok  # depends only on the replicated write position
            reduce = jax.lax.pmin if self.sampling == "local" else jax.lax.pmax
            return reduce(ok.astype(jnp.int32), self.axis) > 0

        return self._map(body, (self.partition_specs(state),), P())(state)

    def sample(self, state: TrajectoryBufferState, rng_key: Array,
               batch_size: Optional[int] = None):
        """`batch_size` items (default `sample_batch_size`), every leaf sharded along its
        leading batch axis. A prioritised sample's `indices` are the single-device leaf
        indices and `probabilities` the probabilities of this sampling mode."""
        b = self.buffer.core.sample_batch_size if batch_size is None else batch_size
        self._check_batch(b)
        checks.value_check(
            self.can_sample(state),
            "sample: the sharded buffer cannot be sampled yet (" + self.sampling + " sampling "
            "needs a valid item and, if prioritised, a positive total priority on "
            + ("every shard" if self.sampling == "local" else "some shard")
            + "); check can_sample(state) first",
        )
        return self._sample(state, rng_key, b)

    @functools.partial(jax.jit, static_argnums=(0, 3))
    def _sample(self, state: TrajectoryBufferState, rng_key: Array, b: int):
        if self.sampling == "local":
            body = self._sample_local
        else:
            body = (self._sample_global_prioritised if self.prioritised
                    else self._sample_global_episodes if self.episodes else self._sample_global)
        return self._map(lambda st, key: body(_block_to_state(st), key, b),
                         (self.partition_specs(state), P()), P(self.axis))(state, rng_key)

    def _sample_local(self, state: TrajectoryBufferState, key: Array, b: int):
        k, s = self._shard(), self.num_shards
        out = self.local.sample(state, jax.random.fold_in(key, k), b // s)
        if not isinstance(out, PrioritisedSample):
            return out
        return out.replace(indices=out.indices + k * self.local.core.num_items,
                           probabilities=out.probabilities / s)

    def _sample_global(self, state: TrajectoryBufferState, key: Array, b: int):
        """Uniform: the single-device draw itself; each shard reads the rows it owns."""
        k, core = self._shard(), self.local.core
        row, start = self.buffer.core.uniform_items(state, key, b)
        r = core.add_batch_size
        mine = row // r == k
        out = Sample(experience=core.gather(state.experience, jnp.where(mine, row - k * r, 0),
                                            start))
        return self._gather_owned(mine, out)

    def _sample_global_episodes(self, state: TrajectoryBufferState, key: Array, b: int):
        """Uniform over the valid windows of all shards: every shard inverts the same
        targets over the shards' window counts (as prioritised global sampling does over
        their totals), then its own column tree for the targets that fall on it."""
        core = self.local.core
        assert isinstance(core, EpisodeCore) and isinstance(state, EpisodeTrajectoryBufferState)
        totals = jax.lax.all_gather(sum_tree.root(state.window_count), self.axis)  # [S]
        target = jax.random.uniform(key, (b,), jnp.float32) * jnp.sum(totals)
        mine, local_target = self._owned(totals, target)
        row, start = core.items_at(state, jnp.where(mine, local_target, 0.0))
        out = core.with_mask(Sample(experience=core.gather(state.experience, row, start)))
        return self._gather_owned(mine, out)

    def _owned(self, totals: Array, target: Array) -> tuple[Array, Array]:
        """Which targets `[B]` (in `[0, sum(totals))`, the same on every shard) fall on this
        shard, given every shard's total `[S]`, and where inside its own total."""
        k = self._shard()
        ends = jnp.cumsum(totals)
        owner = jnp.searchsorted(ends, target, side="right")
        # Rounding can put a target at the very end: give it to the last positive shard.
        last = self.num_shards - 1 - jnp.argmax(totals[::-1] > 0)
        owner = jnp.where(owner >= self.num_shards, last, owner)
        return owner == k, jnp.clip(target - (ends[k] - totals[k]), 0.0, totals[k])

    def _sample_global_prioritised(self, state: TrajectoryBufferState, key: Array, b: int):
        """Every shard inverts the same targets over the shards' totals, then its own tree
        for the targets that fall on it."""
        k, core = self._shard(), _prioritised(self.local.core)
        assert isinstance(state, PrioritisedTrajectoryBufferState)
        ps = state.priority_state
        totals = jax.lax.all_gather(sum_tree.root(ps.sum_tree), self.axis)  # [S]
        grand = jnp.sum(totals)
        target = core.targets(key, b) * grand  # the same on every shard
        mine, local_target = self._owned(totals, target)
        leaf = sum_tree.sample(ps.sum_tree, core.tree_geometry,
                               jnp.where(mine, local_target, 0.0))
        out = core.sample_at(state, jnp.where(mine, leaf, 0), grand)
        out = out.replace(indices=out.indices + k * core.num_items)
        if isinstance(core, EpisodeMethods):  # padded: zeros after the end, and the mask
            return self._gather_owned(mine, core.with_mask(out))
        return self._gather_owned(mine, out)

    def _gather_owned(self, mine: Array, out):
        """The global sample from each shard's owned items (`mine` `[B]`): each item is
        non-zero on its owner only; a reduce-scatter sums them and hands each shard its
        `B/S` slice of the batch."""
        out = out.replace(experience=self.local.layout.from_sequences(out.experience))

        def reduce_scatter(x: Array) -> Array:
            dtype = x.dtype
            if dtype == jnp.bool_:
                x = x.astype(jnp.int32)
            x = jax.lax.psum_scatter(x, self.axis, scatter_dimension=0, tiled=True)
            return x.astype(dtype)

        return jax.tree.map(reduce_scatter, _where(mine, out))

    def set_priorities(self, state: TrajectoryBufferState, indices: Array | PrioritisedSample,
                       priorities: Array, versions: Optional[Array] = None):
        """Sets raw priorities `[B]` at (single-device) leaf `indices` `[B]`; pass the sample
        itself as `indices` to drop stale updates. Local sampling: the indices and priorities
        of a local sample, sharded as it was; each shard updates its own tree with no
        communication. Global sampling: any indices; each shard applies its own."""
        if isinstance(indices, PrioritisedSample):
            sample = indices
            indices, versions = sample.indices, sample.versions
        indices, priorities = jnp.asarray(indices), jnp.asarray(priorities)
        n = self.buffer.core.num_items
        if self.sampling == "local":
            self._check_batch(indices.shape[0])
        # Global checks (ValueError eagerly, checkify under jit), reduced to scalars so that
        # they also run on arrays that span processes.
        lo, hi, bad = _summary(indices, priorities)
        checks.value_check((lo >= 0) & (hi < n), "set_priorities: indices must lie in [0, "
                           + str(n) + "), got values from {lo} to {hi}", lo=lo, hi=hi)
        checks.value_check(bad == 0, "set_priorities: priorities must be finite and >= 0 "
                           "({bad} are not)", bad=bad)
        return self._set_priorities(state, indices, priorities, versions)

    @functools.partial(jax.jit, static_argnums=0)
    def _set_priorities(self, state: TrajectoryBufferState, indices: Array, priorities: Array,
                        versions: Optional[Array]):
        n = self.buffer.core.num_items
        local = self.sampling == "local"
        items = self.local.core.num_items
        spec = P(self.axis) if local else P()
        has_versions = versions is not None
        args = (indices, priorities) + ((jnp.asarray(versions),) if has_versions else ())

        def body(state, indices, priorities, *versions):
            # Global sampling: the whole [B] is on every shard, which applies its own entries.
            j = indices - self._shard() * items
            mine = (j >= 0) & (j < items)
            if local:
                checks.value_check(
                    mine | (indices < 0) | (indices >= n),
                    "set_priorities (local sampling): index {i} is not on the shard that "
                    "received it; pass a local sample's indices as sharded, or use "
                    "sampling='global'", i=jnp.where(mine, -1, indices).max())
            new = _prioritised(self.local.core).set_priorities(
                _block_to_state(state), jnp.where(mine, j, 0), priorities,
                versions[0] if versions else None, mask=mine)
            return _state_to_block(new)

        specs = self.partition_specs(state)
        return self._map(body, (specs,) + (spec,) * len(args), specs)(state, *args)

    def importance_weights(self, state: TrajectoryBufferState, sample: PrioritisedSample,
                           beta: float | Array = 0.4, normalise: str = "buffer") -> Array:
        """`[B]` weights `(N P(i)) ** -beta` normalised by the largest weight in the buffer or
        batch, with `P(i)` the probability of this sampling mode."""
        return importance_weights(sample.probabilities, self._min_probability(state), beta,
                                  normalise)

    @functools.partial(jax.jit, static_argnums=0)
    def _min_probability(self, state: TrajectoryBufferState) -> Array:
        """The smallest probability of drawing any item in this sampling mode."""
        local = self.sampling == "local"

        def min_probability(state):
            ps = _block_to_state(state).priority_state
            total, min_leaf = sum_tree.root(ps.sum_tree), sum_tree.root(ps.min_tree)
            if local:
                return jax.lax.pmin(min_leaf / (total * self.num_shards), self.axis)
            return jax.lax.pmin(min_leaf, self.axis) / jax.lax.psum(total, self.axis)

        return self._map(min_probability, (self.partition_specs(state),), P())(state)


@jax.jit
def _summary(indices: Array, priorities: Array) -> tuple[Array, Array, Array]:
    """Smallest and largest index, and how many priorities are negative or not finite."""
    bad = jnp.sum(~(jnp.isfinite(priorities) & (priorities >= 0)))
    return jnp.min(indices), jnp.max(indices), bad


def shard(buffer: Buffer, mesh: Mesh, axis: Axis = "data", sampling: str = "local"
          ) -> ShardedBuffer:
    """`buffer` with its rows sharded over mesh axis `axis` (see `ShardedBuffer`)."""
    return ShardedBuffer(buffer, mesh, axis, sampling)
