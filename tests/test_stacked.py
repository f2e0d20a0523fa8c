"""Stacked buffer states (one buffer per device or agent: `jax.vmap` / `jax.pmap` over
states, the Stoix and Mava structure).

Every method inside the map gives, for each buffer, exactly what the unbatched call gives on
that buffer's state, and `can_sample` called outside the map answers per buffer (`[n]`), as
Flashbax's does. The sum tree's own vmap rule (`sum_tree._vmappable_update_sum_min`) is checked
against per-tree updates, on the small-batch and batched paths, with duplicates, masked and
out-of-range entries, and with only some arguments batched.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_replay._src import sum_tree

from buffer_cases import (
    CASES,
    EXAMPLE,
    assert_trees_equal,
    make_batch,
    new_priorities,
    stack,
    unstack,
)

GEO = sum_tree.geometry(37, 4)


def random_trees(rng, n):
    """`n` (sum, min) trees with random leaves, built by the unbatched update."""
    out = []
    for _ in range(n):
        s, m = sum_tree.init(GEO, 0.0), sum_tree.init(GEO, jnp.inf)
        v = rng.uniform(0, 3, GEO.num_leaves).astype(np.float32)
        v[rng.random(GEO.num_leaves) < 0.3] = 0.0
        out.append(sum_tree.update_sum_min(s, m, GEO, np.arange(GEO.num_leaves), v,
                                           np.ones(GEO.num_leaves, bool)))
    return out


@pytest.mark.parametrize("n,b", [(1, 1), (2, 1), (1, 2), (3, 2), (8, 1), (2, 7), (5, 40), (1, 7),
                                 (1, 40)])
def test_vmapped_tree_update_is_the_per_tree_update(n, b):
    rng = np.random.default_rng(n * 100 + b)
    trees = random_trees(rng, n)
    # Indices with duplicates (last one wins), out of range entries and masked entries.
    index = rng.integers(-2, GEO.num_leaves + 2, (n, b)).astype(np.int32)
    index[:, -1] = index[:, 0]
    values = rng.uniform(0, 2, (n, b)).astype(np.float32)
    values[rng.random((n, b)) < 0.2] = 0.0
    mask = rng.random((n, b)) < 0.8
    sums = jnp.stack([t[0] for t in trees])
    mins = jnp.stack([t[1] for t in trees])
    got = jax.jit(jax.vmap(lambda s, m, i, v, k: sum_tree.update_sum_min(s, m, GEO, i, v, k)))(
        sums, mins, index, values, mask)
    for t in range(n):
        want = sum_tree.update_sum_min(trees[t][0], trees[t][1], GEO, index[t], values[t],
                                       mask[t])
        np.testing.assert_array_equal(np.asarray(got[0][t]), np.asarray(want[0]))
        np.testing.assert_array_equal(np.asarray(got[1][t]), np.asarray(want[1]))


def test_vmap_with_some_arguments_unbatched():
    """One tree and one mask for all, several updates: n independent results."""
    rng = np.random.default_rng(7)
    (s, m), = random_trees(rng, 1)
    index = rng.integers(0, GEO.num_leaves, (4, 6)).astype(np.int32)
    values = rng.uniform(0, 2, (4, 6)).astype(np.float32)
    mask = np.ones(6, bool)
    got = jax.vmap(lambda i, v: sum_tree.update_sum_min(s, m, GEO, i, v, mask))(index, values)
    for t in range(4):
        want = sum_tree.update_sum_min(s, m, GEO, index[t], values[t], mask)
        np.testing.assert_array_equal(np.asarray(got[0][t]), np.asarray(want[0]))
        np.testing.assert_array_equal(np.asarray(got[1][t]), np.asarray(want[1]))
    # Nested vmap falls back to JAX's own batching of the rule: still exact.
    got2 = jax.vmap(jax.vmap(lambda i, v: sum_tree.update_sum_min(s, m, GEO, i, v, mask)))(
        index[None], values[None])
    np.testing.assert_array_equal(np.asarray(got2[0][0]), np.asarray(got[0]))


N = 3


def stacked_run(kind, vmapped: bool, N: int = N):
    """Adds, samples and sets priorities of N buffers, with different data per buffer,
    through `jax.vmap` (one call for all) or buffer by buffer; returns states and samples."""
    case = CASES[kind]
    buf = case.buffer
    keys = jax.random.split(jax.random.PRNGKey(3), N)
    batches = [make_batch(case, i, (N,)) for i in range(4)]
    if vmapped:
        init = jax.jit(jax.vmap(lambda _: buf.init(EXAMPLE)))
        add = jax.jit(jax.vmap(buf.add), donate_argnums=0)
        sample = jax.jit(jax.vmap(buf.sample))
        setp = jax.jit(jax.vmap(buf.set_priorities), donate_argnums=0)
        state = init(jnp.arange(N))
        for x in batches:
            state = add(state, x)
        s = sample(state, keys)
        # Each buffer's priorities as the unbatched run computes them from its own sample.
        prio = np.stack([new_priorities(part) for part in unstack(s, N)])
        state = setp(state, s.indices, prio)
        return state, s, sample(state, keys)
    out = []
    add, sample, setp = jax.jit(buf.add), jax.jit(buf.sample), jax.jit(buf.set_priorities)
    for i in range(N):
        state = buf.init(EXAMPLE)
        for x in batches:
            state = add(state, jax.tree.map(lambda a, i=i: a[i], x))
        s = sample(state, keys[i])
        state = setp(state, s.indices, new_priorities(s))
        out.append((state, s, sample(state, keys[i])))
    return out


@pytest.mark.parametrize("kind,n", [("prioritised_flat", N), ("prioritised_trajectory", N),
                                    ("prioritised_flat", 1)])
def test_vmapped_buffers_are_the_separate_buffers(kind, n):
    """Bit for bit; n = 1 takes the unbatched tree paths inside the vmap rule, n > 1 the
    stacked one (trees end to end, tops written into the `[n, num_nodes]` view)."""
    got = stacked_run(kind, True, n)
    want = stacked_run(kind, False, n)
    for i, parts in enumerate(zip(*(unstack(g, n) for g in got))):
        assert_trees_equal(parts, want[i])


@pytest.mark.parametrize("kind", ["flat", "trajectory", "prioritised_flat",
                                  "prioritised_trajectory", "prioritised_item"])
@pytest.mark.parametrize("mapping", ["vmap", "pmap"])
def test_can_sample_outside_the_map(kind, mapping):
    """`buffer.can_sample(stacked_state)` is `[n]`, each buffer's own answer (Flashbax's
    behaviour; a prioritised state used to raise or read the first tree whole)."""
    case = CASES[kind]
    buf = case.buffer
    full = buf.init(EXAMPLE)
    for i in range(4):
        full = buf.add(full, make_batch(case, i))
    states = [full, buf.init(EXAMPLE)]  # buffer 0 can be sampled, buffer 1 is empty
    per_buffer = [bool(buf.can_sample(s)) for s in states]
    assert per_buffer == [True, False]
    stacked = stack(states)
    if mapping == "pmap":
        stacked = jax.pmap(lambda s: s)(stacked)  # one buffer per device
    got = buf.can_sample(stacked)
    assert np.asarray(got).shape == (2,)
    np.testing.assert_array_equal(np.asarray(got), per_buffer)
    # As a Stoix-style program asks it: all buffers ready, under jit or not.
    assert not bool(jax.jit(buf.can_sample)(stacked).all())
