"""One buffer laid out over a `Mesh`, on one host or many, with JAX's own machinery.

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    buffer = flax_replay.shard(make_prioritised_flat_buffer(..., add_batch_size=64), mesh)
    state = buffer.init(example_step)                    # arrays with NamedShardings
    state = jax.jit(buffer.add, donate_argnums=0)(state, batch)      # no collective
    sample = jax.jit(buffer.sample)(state, key)          # sharded along the batch axis

Layout (global shapes: the single-device layout with one change, in "priorities"):

    "replay"      experience [R, T, ...]   rows sharded over the mesh axis: P(axis)
                  current_index, is_full, running_index   replicated: every row is written
                                                          at the same time index
    "priorities"  sum_tree, min_tree [S, nodes], max_priority [S]   one tree per shard: P(axis)

Shard k of S holds rows `[k R/S, (k+1) R/S)` and the sum tree over their items; its leaf j
is the buffer's leaf `k * (R/S) * slots + j`, which is exactly the single-device leaf index,
so `sample.indices` mean the same thing sharded or not. New items get the largest priority
set so far *on their shard* (with one shard: the single-device rule), so no add needs to
hear from another shard.

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
| can_sample, weights     | a scalar all-reduce                                               |

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
  shard its slice of the batch: the sampled items cross devices once.

Checkpoints: the state is a pytree of global arrays; Orbax saves and restores it from every
process. `abstract_state` gives restore targets with this mesh's shardings, and `reshard`
turns a state written on any number of shards (or unsharded) into this buffer's layout.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flax_replay._src import checks, sum_tree
from flax_replay._src.buffers import Buffer
from flax_replay._src.core import PrioritisedSample, PrioritisedTrajectoryBufferState, Sample
from flax_replay._src.state import PRIORITIES, REPLAY, from_collections, to_collections

PyTree = Any
Array = jax.Array
Axis = Union[str, tuple[str, ...]]

# ndim of each "priorities" leaf in the single-device layout; one more axis = one per shard.
_SINGLE_NDIM = {"sum_tree": 1, "min_tree": 1, "max_priority": 0}


# ------------------------------------------------------------------------ Flax metadata
def partition_names(col: str, name: str, value: Any, axis: Axis) -> tuple:
    """Mesh axis names of one array of the state: `(axis, None, ...)` for experience (rows
    first) and per-shard priority trees (shards first), `(None,) * ndim` (replicated) else."""
    ndim = len(value.shape) if hasattr(value, "shape") else jnp.ndim(value)
    per_shard = col == PRIORITIES and ndim == _SINGLE_NDIM.get(name, -1) + 1
    if (col == REPLAY and name == "experience" or per_shard) and ndim >= 1:
        return (axis,) + (None,) * (ndim - 1)
    return (None,) * ndim


def box_linen(col: str, name: str, value: PyTree, partition: Axis) -> PyTree:
    """`value` with every array leaf in an `nn.Partitioned` box (Linen's partitioning
    metadata), so that `nn.get_partition_spec` / `nn.get_sharding` give the buffer's layout."""
    return jax.tree.map(
        lambda x: nn.Partitioned(x, names=partition_names(col, name, x, partition)), value
    )


def nnx_metadata(col: str, name: str, value: PyTree, sharding: Axis) -> dict:
    """`nnx.Variable` metadata of one state field: `out_sharding` (NNX's partitioning names;
    the experience Variable holds a tree whose leaves all have the row axis first, so only
    that first name is given), and the `mesh` of the value when it already lives on one."""
    leaves = jax.tree_util.tree_leaves(value)
    names = partition_names(col, name, leaves[0], sharding)
    if not any(n is not None for n in names):
        return {}
    metadata: dict = {"out_sharding": names[:1] if name == "experience" else names}
    placed = getattr(leaves[0], "sharding", None)
    if isinstance(placed, NamedSharding) and isinstance(placed.mesh, Mesh):
        metadata["mesh"] = placed.mesh
    return metadata


# ------------------------------------------------------------------------- the buffer
def _axes(axis: Axis) -> tuple[str, ...]:
    return (axis,) if isinstance(axis, str) else tuple(axis)


def _where(mask: Array, tree: PyTree) -> PyTree:
    """`tree` where `mask` `[B]` holds, zeros elsewhere (leaves with a leading `[B]`)."""
    def keep(x):
        m = mask.reshape(mask.shape + (1,) * (x.ndim - 1))
        return jnp.where(m, x, jnp.zeros_like(x))

    return jax.tree.map(keep, tree)


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

    def __post_init__(self) -> None:
        if not isinstance(self.buffer, Buffer):
            raise ValueError(
                f"buffer: only the buffers of the make_* factories can be sharded, got "
                f"{type(self.buffer).__name__}"
            )
        if self.sampling not in ("local", "global"):
            raise ValueError(f"sampling must be 'local' or 'global', got {self.sampling!r}")
        missing = [a for a in _axes(self.axis) if a not in self.mesh.shape]
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
        return math.prod(self.mesh.shape[a] for a in _axes(self.axis))

    @property
    def local(self) -> Buffer:
        """The buffer one shard runs: the same definition with `R / S` rows."""
        core = self.buffer.core
        return dataclasses.replace(self.buffer, core=dataclasses.replace(
            core, add_batch_size=core.add_batch_size // self.num_shards))

    @property
    def prioritised(self) -> bool:
        return self.buffer.core.prioritised

    def _check_batch(self, b: int) -> None:
        if b % self.num_shards:
            raise ValueError(
                f"sample_batch_size ({b}) must be a multiple of the {self.num_shards} shards "
                f"of mesh axis {self.axis!r}"
            )

    # -------------------------------------------------------------------------- layout
    def partition_specs(self, state: Any) -> Any:
        """A `PartitionSpec` for every array of `state` (concrete or abstract)."""
        cols = to_collections(state)
        specs = {
            col: {
                name: jax.tree.map(lambda x, c=col, n=name: P(*partition_names(c, n, x,
                                                                                  self.axis)), v)
                for name, v in values.items()
            }
            for col, values in cols.items()
        }
        return from_collections(type(state), specs)

    def shardings(self, state: Any) -> Any:
        """A `NamedSharding` on `mesh` for every array of `state` (for `jit`, Orbax)."""
        return jax.tree.map(lambda p: NamedSharding(self.mesh, p), self.partition_specs(state),
                            is_leaf=lambda x: isinstance(x, P))

    def _state(self, experience: PyTree, num_shards: Optional[int] = None):
        """The empty state (traceable): global experience, one tree per shard."""
        state = self.buffer.init(experience)
        if not self.prioritised:
            return state
        s = self.num_shards if num_shards is None else num_shards
        core = self.buffer.core
        if core.add_batch_size % s:
            raise ValueError(f"num_shards ({s}) must divide add_batch_size "
                             f"({core.add_batch_size})")
        local = dataclasses.replace(core, add_batch_size=core.add_batch_size // s)
        trees = local.init(experience).priority_state
        return state.replace(
            priority_state=jax.tree.map(lambda x: jnp.broadcast_to(x, (s, *x.shape)), trees))

    def init(self, experience: PyTree):
        """The empty state for steps shaped like `experience`, created in place on the mesh
        (each device allocates only its shard)."""
        make = lambda: self._state(experience)  # noqa: E731
        return jax.jit(make, out_shardings=self.shardings(jax.eval_shape(make)))()

    def abstract_state(self, experience: PyTree, num_shards: Optional[int] = None):
        """`jax.ShapeDtypeStruct`s with this mesh's shardings: Orbax restore targets.

        `num_shards`: restore a state written by a buffer sharded that many ways (e.g. on
        another mesh; read it from the checkpoint's metadata, the leading size of
        `sum_tree`): its per-shard trees are then restored replicated, for `reshard`.
        """
        abstract = jax.eval_shape(lambda: self._state(experience, num_shards))
        shardings = self.shardings(abstract)
        if num_shards is not None and num_shards != self.num_shards and self.prioritised:
            shardings = shardings.replace(priority_state=jax.tree.map(
                lambda _: NamedSharding(self.mesh, P()), shardings.priority_state))
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

    # ----------------------------------------------------------------- shard_map plumbing
    def _map(self, body, in_specs, out_specs):
        """`body` on every shard's block (call it under `jit`); the arguments are first put
        where `in_specs` says (a no-op when they are there already, as a donated state is)."""
        mapped = jax.shard_map(body, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs)
        return lambda *args: mapped(*self._constrain(args, in_specs))

    def _constrain(self, tree: PyTree, specs: PyTree) -> PyTree:
        shardings = jax.tree.map(lambda p: NamedSharding(self.mesh, p), specs,
                                 is_leaf=lambda x: isinstance(x, P))
        if self.mesh.are_all_axes_explicit:
            return jax.sharding.reshard(tree, shardings)
        return jax.lax.with_sharding_constraint(tree, shardings)

    def _shard(self) -> Array:
        return jax.lax.axis_index(self.axis)

    @staticmethod
    def _unwrap(state):
        """A shard's block -> the single-device state of its rows (drop the [1] shard axis)."""
        if isinstance(state, PrioritisedTrajectoryBufferState):
            return state.replace(priority_state=jax.tree.map(lambda x: x[0], state.priority_state))
        return state

    @staticmethod
    def _wrap(state):
        if isinstance(state, PrioritisedTrajectoryBufferState):
            return state.replace(
                priority_state=jax.tree.map(lambda x: x[None], state.priority_state))
        return state

    # ---------------------------------------------------------------------------- methods
    def add(self, state, batch: PyTree):
        """Writes `batch` (the layout's axes, rows first: `[add_batch_size, ...]`); each shard
        writes its own rows and updates its own tree."""
        self.buffer.layout.to_rows(batch, state.experience, self.buffer.core)  # global checks
        return self._add(state, batch)

    # The shard_map parts are jitted with the (hashable) buffer static: eager calls compile
    # once, and under the caller's `jit` they are inlined (donation included).
    @functools.partial(jax.jit, static_argnums=0)
    def _add(self, state, batch: PyTree):
        specs = self.partition_specs(state)

        def body(state, batch):
            return self._wrap(self.local.add(self._unwrap(state), batch))

        return self._map(body, (specs, P(self.axis)), specs)(state, batch)

    @functools.partial(jax.jit, static_argnums=0)
    def can_sample(self, state) -> Array:
        """bool `[]`: local sampling needs every shard sampleable, global sampling any."""
        def body(state):
            ok = self.local.can_sample(self._unwrap(state))
            if not self.prioritised:
                return ok  # depends only on the replicated write position
            reduce = jax.lax.pmin if self.sampling == "local" else jax.lax.pmax
            return reduce(ok.astype(jnp.int32), self.axis) > 0

        return self._map(body, (self.partition_specs(state),), P())(state)

    def sample(self, state, rng_key: Array, batch_size: Optional[int] = None):
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
    def _sample(self, state, rng_key: Array, b: int):
        body = {"local": self._sample_local, "global": self._sample_global}[self.sampling]
        return self._map(lambda st, key: body(self._unwrap(st), key, b),
                         (self.partition_specs(state), P()), P(self.axis))(state, rng_key)

    def _sample_local(self, state, key: Array, b: int):
        k, s = self._shard(), self.num_shards
        out = self.local.sample(state, jax.random.fold_in(key, k), b // s)
        if not self.prioritised:
            return out
        return out.replace(indices=out.indices + k * self.local.core.num_items,
                           probabilities=out.probabilities / s)

    def _sample_global(self, state, key: Array, b: int):
        k, local = self._shard(), self.local
        core = local.core
        if self.prioritised:
            ps = state.priority_state
            totals = jax.lax.all_gather(sum_tree.total(ps.sum_tree), self.axis)  # [S]
            grand = jnp.sum(totals)
            target = self.buffer.core.targets(key, b) * grand  # the same on every shard
            ends = jnp.cumsum(totals)
            owner = jnp.searchsorted(ends, target, side="right")
            # Rounding can put a target at the very end: give it to the last positive shard.
            last = self.num_shards - 1 - jnp.argmax(totals[::-1] > 0)
            owner = jnp.where(owner >= self.num_shards, last, owner)
            mine = owner == k
            local_target = jnp.clip(target - (ends[k] - totals[k]), 0.0, totals[k])
            leaf = sum_tree.sample(ps.sum_tree, core.tree_geometry,
                                   jnp.where(mine, local_target, 0.0))
            out = core.prioritised_sample(state, jnp.where(mine, leaf, 0), grand)
            out = out.replace(indices=out.indices + k * core.num_items)
        else:
            # The single-device draw itself; each shard reads the rows it owns.
            row, start = self.buffer.core.uniform_items(state, key, b)
            r = core.add_batch_size
            mine = row // r == k
            out = Sample(experience=core.gather(state.experience,
                                                jnp.where(mine, row - k * r, 0), start))
        out = out.replace(experience=local.layout.from_sequences(out.experience))
        return jax.tree.map(self._reduce_scatter, _where(mine, out))

    def _reduce_scatter(self, x: Array) -> Array:
        """Sum over shards (each item is non-zero on its owner only), scattered along the
        batch axis: each shard receives its `B/S` slice."""
        dtype = x.dtype
        if dtype == jnp.bool_:
            x = x.astype(jnp.int32)
        x = jax.lax.psum_scatter(x, self.axis, scatter_dimension=0, tiled=True)
        return x.astype(dtype)

    def set_priorities(self, state, indices: Array | PrioritisedSample, priorities: Array,
                       versions: Optional[Array] = None):
        """Sets raw priorities `[B]` at (single-device) leaf `indices` `[B]`; pass the sample
        itself as `indices` to drop stale updates. Local sampling: the indices and priorities
        of a local sample, sharded as it was; each shard updates its own tree with no
        communication. Global sampling: any indices; each shard applies its own."""
        if isinstance(indices, PrioritisedSample):
            indices, versions = indices.indices, indices.versions
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
    def _set_priorities(self, state, indices: Array, priorities: Array,
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
            new = self.local.core.set_priorities(self._unwrap(state), jnp.where(mine, j, 0),
                                                 priorities, *versions, mask=mine)
            return self._wrap(new)

        specs = self.partition_specs(state)
        return self._map(body, (specs,) + (spec,) * len(args), specs)(state, *args)

    def importance_weights(self, state, sample: PrioritisedSample, beta: float | Array = 0.4,
                           normalise: str = "buffer") -> Array:
        """`[B]` weights `(N P(i)) ** -beta` normalised by the largest weight in the buffer or
        batch, with `P(i)` the probability of this sampling mode."""
        return self.buffer.core.weights(sample.probabilities, self._min_probability(state),
                                        beta, normalise)

    @functools.partial(jax.jit, static_argnums=0)
    def _min_probability(self, state) -> Array:
        """The smallest probability of drawing any item in this sampling mode."""
        local = self.sampling == "local"

        def min_probability(state):
            ps = self._unwrap(state).priority_state
            total, min_leaf = sum_tree.total(ps.sum_tree), sum_tree.total(ps.min_tree)
            if local:
                return jax.lax.pmin(min_leaf / (total * self.num_shards), self.axis)
            return jax.lax.pmin(min_leaf, self.axis) / jax.lax.psum(total, self.axis)

        return self._map(min_probability, (self.partition_specs(state),), P())(state)

    # ------------------------------------------------------------------------ resharding
    def reshard(self, state):
        """`state`, written by a buffer of the same definition unsharded or sharded any
        number of ways (e.g. restored from a checkpoint made on another mesh), in this
        buffer's layout and shardings. Experience and leaf priorities are kept exactly; the
        trees are rebuilt from their leaves; a shard's max priority is the largest of the
        old shards' its rows came from."""
        return self._convert(state, self.num_shards)

    def unshard(self, state):
        """`state` in the single-device layout of `buffer` (one tree, replicated; rows still
        sharded), e.g. to hand a sharded buffer to code that expects an unsharded one."""
        return self._convert(state, None)

    def _convert(self, state, num_shards: Optional[int]):
        shardings = self.shardings(state)
        if isinstance(state, PrioritisedTrajectoryBufferState):
            # The trees are read whole: bring them (small next to the rows) to every device.
            shardings = shardings.replace(priority_state=jax.tree.map(
                lambda _: NamedSharding(self.mesh, P()), shardings.priority_state))
        return self._converted(jax.device_put(state, shardings), num_shards)

    @functools.partial(jax.jit, static_argnums=(0, 2))
    def _converted(self, state, num_shards: Optional[int]):
        out = _convert(state, self.buffer.core, num_shards)
        return self._constrain(out, self.partition_specs(out))


@jax.jit
def _summary(indices: Array, priorities: Array) -> tuple[Array, Array, Array]:
    """Smallest and largest index, and how many priorities are negative or not finite."""
    bad = jnp.sum(~(jnp.isfinite(priorities) & (priorities >= 0)))
    return jnp.min(indices), jnp.max(indices), bad


def _convert(state, core, num_shards: Optional[int]):
    """The state with its priorities regrouped into `num_shards` trees (None: one tree in the
    single-device layout). Traceable."""
    if not isinstance(state, PrioritisedTrajectoryBufferState):
        return state
    ps = state.priority_state
    n, rows = core.num_items, core.add_batch_size

    def leaves(tree: Array) -> Array:  # [num_items], in leaf order
        trees = tree.reshape(-1, tree.shape[-1])  # [old shards (1 if unsharded), nodes]
        s = trees.shape[0]
        geo = sum_tree.geometry(max(n // s, 1), core.branching)
        if n % s or tree.shape[-1] != geo.num_nodes:
            raise ValueError(f"reshard: a tree of shape {tree.shape} is not one of this "
                             f"buffer's ({n} items, branching {core.branching})")
        return jax.vmap(lambda t: sum_tree.leaves(t, geo))(trees).reshape(-1)

    sums, mins = leaves(ps.sum_tree), leaves(ps.min_tree)
    old = ps.max_priority.reshape(-1)
    row_max = jnp.repeat(old, rows // old.shape[0])  # [R]: the max of each row's old shard
    s = 1 if num_shards is None else num_shards
    geo = sum_tree.geometry(n // s, core.branching)

    def build(sums, mins):
        m = sums.shape[0]
        return sum_tree.update(
            (sum_tree.init(geo, 0.0), sum_tree.init(geo, jnp.inf)), geo,
            jnp.arange(m), (sums, mins), jnp.ones(m, bool), ("sum", "min"))

    sum_t, min_t = jax.vmap(build)(sums.reshape(s, -1), mins.reshape(s, -1))
    max_p = row_max.reshape(s, -1).max(axis=1)
    if num_shards is None:
        sum_t, min_t, max_p = sum_t[0], min_t[0], max_p[0]
    return state.replace(priority_state=ps.replace(sum_tree=sum_t, min_tree=min_t,
                                                   max_priority=max_p))


def shard(buffer: Buffer, mesh: Mesh, axis: Axis = "data", sampling: str = "local"
          ) -> ShardedBuffer:
    """`buffer` with its rows sharded over mesh axis `axis` (see `ShardedBuffer`)."""
    return ShardedBuffer(buffer, mesh, axis, sampling)
