"""An exact, wide sum tree (with a min tree beside it) over a fixed number of leaves.

Layout: one flat float32 array per tree holding every level, root first. A node has
`branching` children (16 by default: 64 bytes, one cache line), so a tree of 10^6 leaves has
5 levels below the root instead of 20; a level has `ceil(size_below / branching)` nodes, and
missing children read as the reduction's identity (0 for sums, +inf for mins).

Exactness: after leaves are written, every ancestor is *recomputed from its children*, level by
level, never adjusted by a delta. The stored parents are therefore always the float32 sums
of their stored children, whatever the history, and a zero leaf can never be reached (the
descent only enters children with a positive value).

Batched writes cost O(B * branching * depth) gathers and scatters: no O(N) work and no
serial loop over the batch. Duplicate leaf indices in one write: the last occurrence wins,
on every backend (the others are dropped before the scatter).
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

DEFAULT_BRANCHING = 16


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
    keep = mask & last_occurrence(jnp.where(mask, index, -1)) & (index >= 0)
    keep = keep & (index < geo.num_leaves)
    k = geo.branching
    out_of_range = geo.num_nodes  # scatters to this position are dropped
    depth = len(geo.sizes) - 1
    node = index
    trees = tuple(
        t.at[jnp.where(keep, geo.offsets[depth] + node, out_of_range)].set(
            v.astype(t.dtype), mode="drop"
        )
        for t, v in zip(trees, values)
    )
    for d in range(depth, 0, -1):
        parent = jnp.where(keep, node // k, 0)
        children = parent[:, None] * k + jnp.arange(k)  # [B, k] indices at depth d
        present = children < geo.sizes[d]
        flat_children = geo.offsets[d] + jnp.minimum(children, geo.sizes[d] - 1)
        new_trees = []
        for t, r in zip(trees, reducers):
            vals = t[flat_children]
            if r == "sum":
                new = jnp.sum(jnp.where(present, vals, 0.0), axis=-1)
            else:
                new = jnp.min(jnp.where(present, vals, jnp.inf), axis=-1)
            new_trees.append(
                t.at[jnp.where(keep, geo.offsets[d - 1] + parent, out_of_range)].set(
                    new, mode="drop"
                )
            )
        trees = tuple(new_trees)
        node = parent
    return trees


def sample(tree: jax.Array, geo: Geometry, targets: jax.Array) -> jax.Array:
    """Leaf indices `[B]` for `targets` `[B]` in `[0, total)` (inverse-CDF descent).

    At each level the descent enters the first child whose running sum exceeds the target
    among children with a positive value; if rounding leaves the target past the last
    positive child, it enters that child. So a zero-valued leaf is never returned while the
    root is positive.
    """
    k = geo.branching
    node = jnp.zeros(targets.shape, jnp.int32)
    target = targets.astype(jnp.float32)
    for d in range(1, len(geo.sizes)):
        children = node[:, None] * k + jnp.arange(k)
        present = children < geo.sizes[d]
        vals = tree[geo.offsets[d] + jnp.minimum(children, geo.sizes[d] - 1)]
        vals = jnp.where(present, vals, 0.0)
        cum = jnp.cumsum(vals, axis=-1)
        positive = vals > 0
        candidate = (cum > target[:, None]) & positive
        first = jnp.argmax(candidate, axis=-1)
        last_positive = k - 1 - jnp.argmax(positive[:, ::-1], axis=-1)
        child = jnp.where(candidate.any(axis=-1), first, last_positive)
        chosen = jnp.take_along_axis(vals, child[:, None], axis=-1)[:, 0]
        before = jnp.take_along_axis(cum, child[:, None], axis=-1)[:, 0] - chosen
        target = jnp.clip(target - before, 0.0, chosen)
        node = node * k + child.astype(jnp.int32)
    return node


def total(tree: jax.Array) -> jax.Array:
    return tree[0]
