"""An exact, wide sum tree (with a min tree beside it) over a fixed number of leaves.

Layout: one flat float32 array per tree holding every level, root first. A node has
`branching` children, stored contiguously, so the children of a node are one row read; a
level has `ceil(size_below / branching)` nodes, and missing children read as the reduction's
identity (0 for sums, +inf for mins). The default branching, 4 (10 levels below the root for
10^6 leaves instead of 20), was the fastest of 4, 8, 16 and 32 on CPU for both sampling and
updates: the work per level grows linearly with the branching, the depth only shrinks
logarithmically, and a row of 4 floats never spans more than two cache lines
(benchmarks/README.md).

Exactness: after leaves are written, every ancestor is *recomputed from its children*, level by
level, never adjusted by a delta. The stored parents are therefore always the float32 sums
of their stored children, whatever the history, and a zero leaf can never be reached (the
descent only enters children with a positive value).

Batched writes cost O(B * branching * depth) row reads and scatters, and the few levels
near the root that have fewer nodes than a batch reads are recomputed whole (contiguous
reductions); no O(N) work. Duplicate leaf indices in one write: the last occurrence wins, on
every backend (the others are dropped before the scatter). There is no serial loop over the
batch on any backend: the same batched program runs everywhere.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

DEFAULT_BRANCHING = 4


class Geometry(NamedTuple):
    """Static shape of a tree: `sizes[d]` nodes at depth d (root first), `offsets[d]` into
    the flat array."""

    branching: int
    sizes: tuple[int, ...]
    offsets: tuple[int, ...]

    @property
    def num_leaves(self) -> int:
        return self.sizes[-1]

    @property
    def num_nodes(self) -> int:
        return self.offsets[-1] + self.sizes[-1]


def geometry(num_leaves: int, branching: int = DEFAULT_BRANCHING) -> Geometry:
    if num_leaves < 1:
        raise ValueError(f"a sum tree needs at least one leaf, got num_leaves={num_leaves}")
    if branching < 2:
        raise ValueError(f"branching must be >= 2, got {branching}")
    sizes = [num_leaves]
    while sizes[-1] > 1:
        sizes.append(math.ceil(sizes[-1] / branching))
    if len(sizes) == 1:  # a single leaf still gets a root above it
        sizes.append(1)
    sizes = tuple(reversed(sizes))
    offsets = tuple(itertools.accumulate((0,) + sizes[:-1]))
    return Geometry(branching, sizes, offsets)


def init(geo: Geometry, identity: float) -> jax.Array:
    """A tree whose every node is `identity` (0.0 for a sum tree, inf for a min tree)."""
    return jnp.full((geo.num_nodes,), identity, jnp.float32)


def leaves(tree: jax.Array, geo: Geometry) -> jax.Array:
    """`[num_leaves]` view of the leaf level."""
    return tree[geo.offsets[-1] :]


def get(tree: jax.Array, geo: Geometry, index: jax.Array) -> jax.Array:
    """Leaf values at `index` (any shape)."""
    return tree[geo.offsets[-1] + index]


def last_occurrence(index: jax.Array) -> jax.Array:
    """`[B]` bool: True where no later entry of `index` has the same value.

    A stable sort groups equal indices in their original order; the last of each group wins.
    O(B log B), deterministic on every backend (unlike a scatter with duplicate indices).
    """
    order = jnp.argsort(index, stable=True)
    sorted_index = index[order]
    is_last_sorted = jnp.append(sorted_index[1:] != sorted_index[:-1], True)
    return jnp.zeros_like(is_last_sorted).at[order].set(is_last_sorted)


def _family(tree: jax.Array, geo: Geometry, d: int, parent: jax.Array,
            identity: float) -> tuple[jax.Array, jax.Array | None]:
    """`(rows, shift)`: `rows` `[B, k]` holds the children (at depth d) of the nodes `parent`
    `[B]` (at depth d - 1), each row one contiguous slice of the flat array (a row gather, not
    k element gathers).

    A partial last family would run past the end of its level: its slice is moved back by
    `shift` `[B]` (0 for every full family) and the `shift` leading entries, which belong to
    the previous family, read as `identity`; child `c` of a node is then `rows[:, c + shift]`.
    `shift` is None when the level has no partial family.

    Inner levels are read through a static slice of the level, so that XLA costs the read as
    one level, not as the whole array; the leaf level, which ends the array, is read in place.
    """
    k = geo.branching
    size, off = geo.sizes[d], geo.offsets[d]
    if size < k:  # a single family (its parent is the root or a lone node): pad it
        level = jnp.concatenate([tree[off : off + size],
                                 jnp.full((k - size,), identity, tree.dtype)])
        return jnp.broadcast_to(level, (parent.shape[0], k)), None
    first = parent * k
    start = jnp.minimum(first, size - k)
    if d == len(geo.sizes) - 1:  # the leaf level ends the array: read it in place
        rows = _rows_gather(tree, start, offset=off, k=k)
    else:
        rows = _rows_gather(tree[off : off + size], start, offset=0, k=k)
    if size % k == 0:
        return rows, None
    shift = first - start
    return jnp.where(jnp.arange(k) >= shift[:, None], rows, identity), shift


def _rows_gather(tree: jax.Array, start: jax.Array, *, offset: int, k: int) -> jax.Array:
    """`[B, k]`: `tree[offset + start[b] : ... + k]` for each b, one batched row read."""
    return jax.vmap(lambda s: jax.lax.dynamic_slice(tree, (offset + s,), (k,)))(start)


def _reduce(rows: jax.Array, reducer: str) -> jax.Array:
    return jnp.sum(rows, axis=1) if reducer == "sum" else jnp.min(rows, axis=1)


def _dense_top(tree: jax.Array, geo: Geometry, d: int, reducer: str) -> jax.Array:
    """Recomputes every level above depth d from level d: contiguous reductions of small
    arrays, and one in-place write of the levels 0..d-1 (they are the first nodes of the flat
    array). Cheaper than per-entry gathers once a level has fewer nodes than a batch reads."""
    k = geo.branching
    identity = 0.0 if reducer == "sum" else jnp.inf
    level = tree[geo.offsets[d] : geo.offsets[d] + geo.sizes[d]]
    above = []
    for e in range(d, 0, -1):
        pad = geo.sizes[e - 1] * k - geo.sizes[e]
        if pad:
            level = jnp.concatenate([level, jnp.full((pad,), identity, tree.dtype)])
        level = _reduce(level.reshape(geo.sizes[e - 1], k), reducer)
        above.append(level)
    top = jnp.concatenate(above[::-1]) if len(above) > 1 else above[0]
    return jax.lax.dynamic_update_slice(tree, top, (0,))


# A level whose children number at most DENSE_FACTOR * B * branching (for a batch of B
# writes) is recomputed whole; below it parents are recomputed per written entry.
DENSE_FACTOR = 4


def _recompute_parents(trees, geo, node, keep, reducers, leaf_rows=None):
    """Recomputes, from their children, the ancestors of leaves `node` `[B]` where `keep`.

    `leaf_rows`, if given, are the (already final) children rows of the leaves' parents, one
    per tree, so the leaf level need not be read again.
    """
    k = geo.branching
    depth = len(geo.sizes) - 1
    dense = max([d for d in range(1, depth + 1)
                 if geo.sizes[d] <= DENSE_FACTOR * node.shape[0] * k], default=0)
    out_of_range = geo.num_nodes  # scatters to this position are dropped
    for d in range(depth, dense, -1):
        parent = jnp.where(keep, node // k, 0)
        dst = jnp.where(keep, geo.offsets[d - 1] + parent, out_of_range)
        new_trees = []
        for i, (t, r) in enumerate(zip(trees, reducers)):
            if d == depth and leaf_rows is not None:
                rows = leaf_rows[i]
            else:
                rows, _ = _family(t, geo, d, parent, 0.0 if r == "sum" else jnp.inf)
            new_trees.append(t.at[dst].set(_reduce(rows, r), mode="drop"))
        trees = tuple(new_trees)
        node = parent
    if dense:
        trees = tuple(_dense_top(t, geo, dense, r) for t, r in zip(trees, reducers))
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
    b = index.shape[0]
    if b == 0:
        return sums, mins
    return _update_sum_min_batched(sums, mins, index, values, mask, geo=geo)


def _update_sum_min_batched(sums, mins, index, values, mask, *, geo):
    b, k = index.shape[0], geo.branching
    depth = len(geo.sizes) - 1
    ok = mask & (index >= 0) & (index < geo.num_leaves)
    leaf = jnp.where(ok, geo.offsets[-1] + index, geo.num_nodes)
    mark = -1.0 - jnp.arange(b, dtype=jnp.float32)  # below every leaf value
    sums = sums.at[leaf].min(mark, mode="drop")
    parent = jnp.where(ok, index // k, 0)
    rows, shift = _family(sums, geo, depth, parent, 0.0)
    column = index - parent * k + (0 if shift is None else shift)
    j = jnp.arange(k)
    keep = ok & (jnp.sum(jnp.where(j == column[:, None], rows, 0.0), axis=1) == mark)
    winner = jnp.clip((-1.0 - rows).astype(jnp.int32), 0, b - 1)
    rows = jnp.where(rows < 0, values[winner], rows)
    min_rows = jnp.where(rows > 0, rows, jnp.inf)
    if shift is not None:
        min_rows = jnp.where(j >= shift[:, None], min_rows, jnp.inf)
    leaf = jnp.where(keep, leaf, geo.num_nodes)
    sums = sums.at[leaf].set(values, mode="drop")
    mins = mins.at[leaf].set(jnp.where(values > 0, values, jnp.inf), mode="drop")
    return _recompute_parents((sums, mins), geo, index, keep, ("sum", "min"),
                              (rows, min_rows))


def sample_with_values(tree: jax.Array, geo: Geometry,
                       targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(leaf, value)`, both `[B]`: the leaves of `sample` and their (exact) stored values."""
    k = geo.branching
    depth = len(geo.sizes) - 1
    node = jnp.zeros(targets.shape, jnp.int32)
    target = targets.astype(jnp.float32)
    j = jnp.arange(k)
    for d in range(1, depth + 1):
        rows, shift = _family(tree, geo, d, node, 0.0)
        cols = [rows[:, 0]]  # running sums, unrolled: cheaper than a cumsum for small k
        for c in range(1, k):
            cols.append(cols[-1] + rows[:, c])
        cum = jnp.stack(cols, axis=1)
        # Children to skip: those whose running sum is <= the target, but never the last
        # positive child (a target past the total, from rounding, ends there). The child
        # entered is then positive: its running sum rises above the previous one.
        skip = (cum <= target[:, None]) & (cum < cum[:, -1:])
        child = jnp.sum(skip, axis=1, dtype=jnp.int32)
        if d < depth:
            before = jnp.max(jnp.where(skip, cum, 0.0), axis=1)
            through = jnp.min(jnp.where(skip, jnp.inf, cum), axis=1)
            target = jnp.clip(target - before, 0.0, through - before)
        else:
            value = jnp.sum(jnp.where(j == child[:, None], rows, 0.0), axis=1)
        if shift is not None:
            child = child - shift
        node = node * k + child
    return node, value


def sample(tree: jax.Array, geo: Geometry, targets: jax.Array) -> jax.Array:
    """Leaf indices `[B]` for `targets` `[B]` in `[0, total)` (inverse-CDF descent).

    At each level the descent enters the first child whose running sum exceeds the target
    (necessarily a positive child); if rounding leaves the target past the last positive
    child, it enters that child. So a zero-valued leaf is never returned while the root is
    positive.
    """
    return sample_with_values(tree, geo, targets)[0]


def total(tree: jax.Array) -> jax.Array:
    return tree[0]
