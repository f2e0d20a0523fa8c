"""An exact, wide sum tree (with a min tree beside it) over a fixed number of leaves.

Layout: one flat float32 array per tree holding every level, root first. A node has
`branching` children, stored contiguously, so the children of a node are one row read. Every
level below the root is padded to a multiple of the branching with nodes holding the
reduction's identity (0 for sums, +inf for mins), so every family is a full row. The default
branching is 4 (10 levels below the root for 10^6 leaves): the fastest measured at 10^6
leaves; 8 is faster at 10^4 (benchmarks/README.md).

Exactness: after leaves are written, every ancestor is *recomputed from its children*, level by
level, never adjusted by a delta. The stored parents are therefore always the float32 sums
of their stored children, whatever the history, and a zero leaf can never be reached (the
descent only enters children with a positive value).

Cost: a batched write of B leaves reads and writes O(B * branching * depth) nodes, and
recomputes whole only the few levels near the root that are smaller than what the batch
reads; no O(N) work. On CPU only, batches of up to SERIAL_MAX_BATCH entries into trees of
up to SERIAL_MAX_LEAVES leaves are written by a loop over the entries instead (faster there,
the same bits: see `_update_sum_min_serial`); no loop over the batch runs on GPU/TPU.
Duplicate leaf indices in one write: the last occurrence wins, on every backend. Why the
levels are visited as they are (static slices, unrolled, a separate path for one or two
entries) is measured in benchmarks/README.md.
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

DEFAULT_BRANCHING = 4


class Geometry(NamedTuple):
    """Static shape of a tree: `sizes[d]` nodes at depth d (root first), `offsets[d]` into
    the flat array. Every level below the root is padded to a multiple of `branching` with
    nodes that hold the reduction's identity, so every family is one full row."""

    branching: int
    num_leaves: int
    sizes: tuple[int, ...]
    offsets: tuple[int, ...]

    @property
    def depth(self) -> int:
        return len(self.sizes) - 1

    @property
    def num_nodes(self) -> int:
        return self.offsets[-1] + self.sizes[-1]


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def geometry(num_leaves: int, branching: int = DEFAULT_BRANCHING) -> Geometry:
    if num_leaves < 1:
        raise ValueError(f"a sum tree needs at least one leaf, got num_leaves={num_leaves}")
    if branching < 2:
        raise ValueError(f"branching must be >= 2, got {branching}")
    below = [_round_up(num_leaves, branching)]  # level sizes, leaves first
    while below[-1] > branching:
        below.append(_round_up(below[-1] // branching, branching))
    sizes = tuple(reversed(below + [1]))
    offsets = tuple(itertools.accumulate((0,) + sizes[:-1]))
    return Geometry(branching, num_leaves, sizes, offsets)


def init(geo: Geometry, identity: float) -> jax.Array:
    """A tree whose every node is `identity` (0.0 for a sum tree, inf for a min tree)."""
    return jnp.full((geo.num_nodes,), identity, jnp.float32)


def from_leaves(values: jax.Array, geo: Geometry) -> jax.Array:
    """The sum tree whose leaves are `values` `[num_leaves]`, built densely level by level
    (no scatter): the same nodes as writing the leaves with `update`."""
    pad = jnp.zeros((geo.sizes[-1] - geo.num_leaves,), jnp.float32)
    tree = jnp.concatenate([jnp.zeros((geo.offsets[-1],), jnp.float32),
                            values.astype(jnp.float32), pad])
    return _dense_top(tree, geo, geo.depth, "sum")


def leaves(tree: jax.Array, geo: Geometry) -> jax.Array:
    """`[num_leaves]` view of the leaf level (without its padding)."""
    return tree[geo.offsets[-1] : geo.offsets[-1] + geo.num_leaves]


def get(tree: jax.Array, geo: Geometry, index: jax.Array) -> jax.Array:
    """Leaf values at `index` (any shape)."""
    return tree[geo.offsets[-1] + index]


def _rows(tree: jax.Array, start: jax.Array, k: int) -> jax.Array:
    """`[B, k]`: `tree[start[b] : start[b] + k]` for each b, one batched row read."""
    return jax.vmap(lambda s: jax.lax.dynamic_slice(tree, (s,), (k,)))(start)


def _reduce(rows: jax.Array, reducer: str) -> jax.Array:
    """Reduces the last axis (a family of siblings) as a left fold, ((c0 + c1) + c2) + ...:
    one fixed order of float32 additions, so that every path that recomputes a parent (the
    batched one, the per-entry ones) stores the same bits."""
    op = jnp.add if reducer == "sum" else jnp.minimum
    out = rows[..., 0]
    for c in range(1, rows.shape[-1]):
        out = op(out, rows[..., c])
    return out


def _identity(reducer: str) -> float:
    return 0.0 if reducer == "sum" else float("inf")


def _dense_top(tree: jax.Array, geo: Geometry, d: int, reducer: str) -> jax.Array:
    """Recomputes every level above depth d from level d: contiguous reductions of small
    arrays, and one in-place write of the levels 0..d-1 (they are the first nodes of the flat
    array). Cheaper than per-entry gathers once a level has fewer nodes than a batch reads."""
    return jax.lax.dynamic_update_slice(tree, _top_levels(tree, geo, d, reducer), (0,))


def _top_levels(tree: jax.Array, geo: Geometry, d: int, reducer: str) -> jax.Array:
    """`[..., offsets[d]]`: the levels 0..d-1 recomputed from level d of `tree`
    `[..., num_nodes]` (with leading axes: of each stacked tree)."""
    k = geo.branching
    lead = tree.shape[:-1]
    level = tree[..., geo.offsets[d] : geo.offsets[d] + geo.sizes[d]]
    above = []
    for e in range(d, 0, -1):
        level = _reduce(level.reshape(*lead, -1, k), reducer)
        pad = geo.sizes[e - 1] - level.shape[-1]
        if pad:
            level = jnp.concatenate(
                [level, jnp.full((*lead, pad), _identity(reducer), tree.dtype)], axis=-1)
        above.append(level)
    return jnp.concatenate(above[::-1], axis=-1) if len(above) > 1 else above[0]


def _dense_top_stacked(flat: jax.Array, geo: Geometry, d: int, reducer: str,
                       n: int) -> jax.Array:
    """`_dense_top` of `n` trees laid end to end in `flat` `[n * num_nodes]`, written by one
    scatter of the `n` tops. (A dynamic-update-slice of a `[n, num_nodes]` view, or one under
    `vmap`, reads and writes the same buffer through two shapes, and XLA:CPU then copies
    the trees; a batched one becomes a clamped scatter several times slower.)"""
    top = _top_levels(flat.reshape(n, -1), geo, d, reducer)
    at = (jnp.arange(n, dtype=jnp.int32)[:, None] * geo.num_nodes
          + jnp.arange(top.shape[-1], dtype=jnp.int32)[None, :])
    return flat.at[at.reshape(-1)].set(top.reshape(-1), indices_are_sorted=True,
                                       unique_indices=True)


# A level whose children number at most DENSE_FACTOR * B * branching (for a batch of B
# writes) is recomputed whole; below it parents are recomputed per written entry.
DENSE_FACTOR = 4

# On CPU, writes of up to SERIAL_MAX_BATCH entries into trees of up to SERIAL_MAX_LEAVES leaves
# go entry by entry in a loop (`_update_sum_min_serial`); elsewhere the batched path runs.
# Measured (scan and single call, loaded machine): at 2e3 leaves 0.42-0.73x the batched path's
# time for 4-16 entries but 1.1-1.2x for 64-256 (the batched gathers overlap their reads); at
# 2e4 leaves 0.96-1.33x even for 4-16 entries, hence both bounds.
SERIAL_MAX_BATCH = 16
SERIAL_MAX_LEAVES = 1 << 12

# Writes of at most SMALL_BATCH entries (an add of one step to one row) go entry by entry
# with dynamic slices instead of gathers and scatters: for so few entries the batched
# bookkeeping costs more than the entries, and XLA:CPU can then compile the whole loop over
# the levels as one function. The result is the same.
SMALL_BATCH = 2


def _levels_loop(lo: int, hi: int, body, carry):
    """Runs `body(d, carry)` for depths d = hi, hi - 1, ..., lo + 1 (d is traced): a loop
    over the levels (never over the batch). With only dynamic slices in its body, XLA:CPU
    compiles the whole loop as one function."""
    if hi <= lo:
        return carry
    return jax.lax.fori_loop(0, hi - lo, lambda i, c: body(hi - i, c), carry)


def _offset(geo: Geometry, d: jax.Array) -> jax.Array:
    return jnp.asarray(geo.offsets, jnp.int32)[d]


def _recompute_parents(trees, geo, node, keep, reducers, leaf_rows=None, base=None, n=1,
                       stacked=False):
    """Recomputes, from their children, the ancestors of leaves `node` `[B]` where `keep`.

    `leaf_rows`, if given, are the (already final) children rows of the leaves' parents, one
    per tree, so the leaf level need not be read again. `base` `[B]`, if given, is the
    position of each entry's tree in flat arrays holding `n` trees one after the other (a
    vmapped update, see `update_sum_min`). `stacked`: the trees are one stacked tree
    (`[1, num_nodes]` flattened) even without `base`.
    """
    k = geo.branching
    depth = geo.depth
    dense = max([d for d in range(1, depth + 1)
                 if geo.sizes[d] <= DENSE_FACTOR * (node.shape[0] // n) * k], default=0)
    dropped = trees[0].shape[0]  # scatters to this position are dropped
    node = jnp.where(keep, node, 0)
    at = 0 if base is None else base

    def write(trees, d, parent, rows):
        dst = jnp.where(keep, at + geo.offsets[d - 1] + parent, dropped)
        return tuple(t.at[dst].set(_reduce(r, red), mode="drop")
                     for t, r, red in zip(trees, rows, reducers))

    if leaf_rows is not None and depth > dense:
        trees = write(trees, depth, node // k, leaf_rows)
        node, hi = node // k, depth - 1
    else:
        hi = depth

    def level(d, carry):
        trees, node = carry
        parent = node // k
        if base is None:
            rows = [_rows(t[geo.offsets[d] : geo.offsets[d] + geo.sizes[d]], parent * k, k)
                    for t in trees]
        else:
            # Each level read through a static slice of the `[n, num_nodes]` view, as one tree's
            # is read through a slice of itself: XLA:CPU then costs the read by the level's size.
            which = base // geo.num_nodes
            rows = [_rows(t.reshape(n, -1)[:, geo.offsets[d] : geo.offsets[d] + geo.sizes[d]]
                          .reshape(-1), which * geo.sizes[d] + parent * k, k) for t in trees]
        return write(trees, d, parent, rows), parent

    carry = (tuple(trees), node)
    for d in range(hi, dense, -1):  # unrolled, as sampling, for the same reason
        carry = level(d, carry)
    trees = carry[0]
    if dense:
        def top(t, r):
            if base is None and not stacked:
                return _dense_top(t, geo, dense, r)
            # Stacked trees (even one: a dynamic-update-slice of the flat view, reshaped
            # after, is a fusion whose output shape is not its operand's, which XLA:CPU
            # cannot run in place; it copies the trees).
            return _dense_top_stacked(t, geo, dense, r, n)
        trees = tuple(top(t, r) for t, r in zip(trees, reducers))
    return trees


def _update_small(trees, geo, index, values, mask, reducers, base=None):
    """`update` for a static batch of at most SMALL_BATCH entries, with one dynamic slice and
    one in-place write per entry and level, instead of gathers and scatters.

    Every entry writes its leaf's final value (that of the last entry writing the leaf, or the
    old one), so the writes commute; at each level all reads come before all writes (a level
    reads only the level below it), so no write has to wait for, or copy around, a read.
    """
    k = geo.branching
    ok = mask & (index >= 0) & (index < geo.num_leaves)
    node = jnp.clip(index, 0, geo.num_leaves - 1)
    at = 0 if base is None else base  # the entry's tree in stacked trees (see `update_sum_min`)
    leaf = at + geo.offsets[-1] + node
    b = jnp.arange(index.shape[0])
    same = ok[None, :] & (leaf[None, :] == leaf[:, None])  # [i, j]: j writes i's leaf
    last = jnp.max(jnp.where(same, b[None, :], -1), axis=1)

    def write(t, dst, new):
        for i in range(index.shape[0]):
            t = jax.lax.dynamic_update_slice(t, new[i:i + 1], (dst[i],))
        return t

    def read(t, start, size):
        return jnp.stack([jax.lax.dynamic_slice(t, (start[i],), (size,))
                          for i in range(index.shape[0])])

    trees = tuple(
        write(t, leaf, jnp.where(last >= 0, v.astype(t.dtype)[jnp.maximum(last, 0)],
                                 read(t, leaf, 1)[:, 0]))
        for t, v in zip(trees, values))

    def level(d, carry):
        trees, node = carry
        parent = node // k
        start, dst = at + _offset(geo, d) + parent * k, at + _offset(geo, d - 1) + parent
        # Families without a new leaf are recomputed to the value they hold.
        return tuple(write(t, dst, _reduce(read(t, start, k), red))
                     for t, red in zip(trees, reducers)), parent

    trees, _ = _levels_loop(0, geo.depth, level, (trees, node))
    return trees


def update(
    trees: tuple[jax.Array, ...],
    geo: Geometry,
    index: jax.Array,
    values: tuple[jax.Array, ...],
    mask: jax.Array,
    reducers: tuple[str, ...],
) -> tuple[jax.Array, ...]:
    """Writes leaves and recomputes their ancestors in several trees sharing a geometry.

    Args:
      trees: flat node arrays, one per tree, each `[num_nodes]`.
      index: `[B]` int leaf indices.
      values: one `[B]` array of new leaf values per tree.
      mask: `[B]` bool; False entries are not written (and need no valid index).
      reducers: "sum" or "min" per tree.
    Returns the updated trees. Under donation every write is in place.
    """
    index = index.astype(jnp.int32)
    if index.shape[0] == 0:
        return tuple(trees)
    if index.shape[0] <= SMALL_BATCH:
        return _update_small(trees, geo, index, values, mask, reducers)
    ok = mask & (index >= 0) & (index < geo.num_leaves)
    leaf = jnp.where(ok, geo.offsets[-1] + index, geo.num_nodes)
    # The last occurrence wins: mark each written leaf with the largest batch position that
    # writes it (a constant write, then a max: the same result in any order, on every
    # backend), read the marks back, then write the winners' values over them.
    pos = jnp.arange(index.shape[0], dtype=jnp.float32)
    first = trees[0].at[leaf].set(-1.0, mode="drop").at[leaf].max(pos, mode="drop")
    keep = ok & (first.at[leaf].get(mode="fill", fill_value=-1.0) == pos)
    leaf = jnp.where(keep, leaf, geo.num_nodes)
    trees = (first,) + tuple(trees[1:])
    trees = tuple(t.at[leaf].set(v.astype(t.dtype), mode="drop") for t, v in zip(trees, values))
    return _recompute_parents(trees, geo, index, keep, reducers)


def update_sum_min(
    sums: jax.Array, mins: jax.Array, geo: Geometry, index: jax.Array, values: jax.Array,
    mask: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """`update((sums, mins), geo, index, (values, where(values > 0, values, inf)), mask,
    ("sum", "min"))` for values >= 0 (priorities), fused: the leaf level is read once.

    The sum tree's leaves are first marked with `-1 - position` by a min (any order gives
    the same marks), and the rows of siblings that the parents need are read once: they show
    which entry won each leaf (the last occurrence), and, with each mark replaced by its
    winner's value, they are the final children of both trees (a min-tree leaf is its sum
    leaf, or inf where that is 0).
    """
    index = index.astype(jnp.int32)
    values = values.astype(jnp.float32)
    if index.shape[0] == 0:
        return sums, mins
    return _vmappable_update_sum_min(geo)(sums, mins, index, values,
                                          jnp.asarray(mask, bool))


@functools.cache
def _vmappable_update_sum_min(geo: Geometry):
    """`update_sum_min` for one geometry, with its own vmap rule.

    JAX's generic batching of the update turns every dynamic slice and in-place write into
    a batched gather or scatter, which XLA:CPU runs several times slower than the unbatched
    ops (measured: benchmarks/vmap.py). The rule instead lays the `n` vmapped trees end to
    end in one flat array and runs the unbatched algorithm once over all `n * B` entries,
    each offset by its tree's position (`base`): the same reads and writes per entry, still
    in place, and no loop over the trees. A vmap over one tree runs the unbatched update.
    benchmarks/results/vmap.md measures it (per buffer, within 1.2x of the unbatched call at
    1, 2 and 8 trees) and says what made it slower before (a batched write of the top levels,
    and copies of the trees).
    """

    @jax.custom_batching.custom_vmap
    def update(sums, mins, index, values, mask):
        return _update_sum_min_flat(sums, mins, index, values, mask, geo, None, 1)

    @update.def_vmap
    def rule(axis_size, in_batched, *args):
        n = axis_size
        sums, mins, index, values, mask = (
            x if batched else jnp.broadcast_to(x, (n, *x.shape))
            for x, batched in zip(args, in_batched))
        # One tree (Stoix's default) runs the unbatched update on it, stacked only where
        # it writes the top levels (see `_recompute_parents`).
        base = None if n == 1 else jnp.repeat(
            jnp.arange(n, dtype=jnp.int32) * geo.num_nodes, index.shape[1])
        out = _update_sum_min_flat(sums.reshape(-1), mins.reshape(-1), index.reshape(-1),
                                   values.reshape(-1), mask.reshape(-1), geo, base, n,
                                   stacked=True)
        return tuple(t.reshape(n, -1) for t in out), (True, True)

    return update


def _update_sum_min_flat(sums, mins, index, values, mask, geo: Geometry,
                         base: Optional[jax.Array], n: int, stacked: bool = False):
    """`update_sum_min` of `n` trees laid end to end in `sums` / `mins` `[n * num_nodes]`;
    entry i goes to the tree at `base[i]` (`base=None`: one tree)."""
    if index.shape[0] <= SMALL_BATCH:
        return _update_small((sums, mins), geo, index,
                             (values, jnp.where(values > 0, values, jnp.inf)), mask,
                             ("sum", "min"), base)
    batched = functools.partial(_update_sum_min_batched, geo=geo, base=base, n=n,
                                stacked=stacked)
    b = index.shape[0]
    if n > 1 or b > SERIAL_MAX_BATCH or geo.num_leaves > SERIAL_MAX_LEAVES:
        return batched(sums, mins, index, values, mask)
    # One tree (unbatched, or vmapped over one buffer: the flat arrays are that tree). The
    # two paths store bit-identical trees (tests/test_sum_tree.py runs both). A loop over the
    # entries is used only on CPU, where it is measured faster (benchmarks/README.md).
    return jax.lax.platform_dependent(
        sums, mins, index, values, mask,
        cpu=functools.partial(_update_sum_min_serial, geo=geo), default=batched)


def _update_sum_min_serial(sums, mins, index, values, mask, *, geo):
    """`update_sum_min` of one tree as a loop over the entries, in batch order, each written as
    a batch of one (`_update_small`). For XLA:CPU this is one small function of dynamic slices
    (no gathers, scatters or thread hand-offs). The stored bits equal the batched path's: the
    last entry writing a leaf wins, and every ancestor is last recomputed after all writes
    below it, by the same `_reduce`.
    """
    def entry(i, trees):
        one = lambda a: jax.lax.dynamic_slice(a, (i,), (1,))
        value = one(values)
        return _update_small(trees, geo, one(index), (value, jnp.where(value > 0, value, jnp.inf)),
                             one(mask), ("sum", "min"))

    return jax.lax.fori_loop(0, index.shape[0], entry, (sums, mins))


def _update_sum_min_batched(sums, mins, index, values, mask, *, geo, base=None, n=1,
                            stacked=False):
    b, k = index.shape[0], geo.branching
    at = 0 if base is None else base
    ok = mask & (index >= 0) & (index < geo.num_leaves)
    leaf = jnp.where(ok, at + geo.offsets[-1] + index, sums.shape[0])
    mark = -1.0 - jnp.arange(b, dtype=jnp.float32)  # below every leaf value
    sums = sums.at[leaf].min(mark, mode="drop")
    parent = jnp.where(ok, index // k, 0)
    rows = _rows(sums, at + geo.offsets[-1] + parent * k, k)
    column = index - parent * k
    j = jnp.arange(k)
    keep = ok & (jnp.sum(jnp.where(j == column[:, None], rows, 0.0), axis=1) == mark)
    winner = jnp.clip((-1.0 - rows).astype(jnp.int32), 0, b - 1)
    rows = jnp.where(rows < 0, values[winner], rows)
    min_rows = jnp.where(rows > 0, rows, jnp.inf)
    leaf = jnp.where(keep, leaf, sums.shape[0])
    sums = sums.at[leaf].set(values, mode="drop")
    mins = mins.at[leaf].set(jnp.where(values > 0, values, jnp.inf), mode="drop")
    return _recompute_parents((sums, mins), geo, index, keep, ("sum", "min"),
                              (rows, min_rows), base, n, stacked)


def sample_with_values(tree: jax.Array, geo: Geometry,
                       targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(leaf, value)`, both `[B]`: the leaves of `sample` and their (exact) stored values."""
    leaf, value, _ = sample_with_residuals(tree, geo, targets)
    return leaf, value


def sample_with_residuals(tree: jax.Array, geo: Geometry,
                          targets: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(leaf, value, residual)`, all `[B]`: `sample_with_values` and, per target, what is
    left of it inside the leaf reached, in `[0, value]` (the target minus the leaves before
    it). A uniform target in `[0, total)` leaves a residual uniform in `[0, value)`: a leaf
    holding a count can pick one of its counted items from it."""
    k = geo.branching
    j = jnp.arange(k)

    def level(d, carry):
        node, target, _ = carry
        rows = _rows(tree[geo.offsets[d] : geo.offsets[d] + geo.sizes[d]], node * k, k)
        cols = [rows[:, 0]]  # running sums, unrolled: cheaper than a cumsum for small k
        for c in range(1, k):
            cols.append(cols[-1] + rows[:, c])
        cum = jnp.stack(cols, axis=1)
        # Children to skip: those whose running sum is <= the target, but never the last
        # positive child (a target past the total, from rounding, ends there). The child
        # entered is then positive: its running sum rises above the previous one.
        skip = (cum <= target[:, None]) & (cum < cum[:, -1:])
        child = jnp.sum(skip, axis=1, dtype=jnp.int32)
        before = jnp.max(jnp.where(skip, cum, 0.0), axis=1)
        through = jnp.min(jnp.where(skip, jnp.inf, cum), axis=1)
        value = jnp.sum(jnp.where(j == child[:, None], rows, 0.0), axis=1)
        return node * k + child, jnp.clip(target - before, 0.0, through - before), value

    node = jnp.zeros(targets.shape, jnp.int32)
    target = targets.astype(jnp.float32)
    value = jnp.zeros(targets.shape, jnp.float32)  # replaced at the first level
    # Unrolled, each level read through a static slice of itself: XLA:CPU then costs a
    # read by the level's size, and does not split the reads of small levels across
    # threads (a hand-off costs more than the read; a loop over the levels would read
    # the whole array each time).
    for d in range(1, geo.depth + 1):
        node, target, value = level(d, (node, target, value))
    return node, value, target


def sample(tree: jax.Array, geo: Geometry, targets: jax.Array) -> jax.Array:
    """Leaf indices `[B]` for `targets` `[B]` in `[0, total)` (inverse-CDF descent).

    At each level the descent enters the first child whose running sum exceeds the target
    (necessarily a positive child); if rounding leaves the target past the last positive
    child, it enters that child. So a zero-valued leaf is never returned while the root is
    positive.
    """
    return sample_with_values(tree, geo, targets)[0]


def root(tree: jax.Array) -> jax.Array:
    """The root: the total of a sum tree, the smallest leaf of a min tree."""
    return tree[..., 0]  # [..., 0]: each root of a stack of trees (vmapped or pmapped states)
