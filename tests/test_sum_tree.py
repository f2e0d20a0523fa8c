"""The exact wide sum tree: no drift, zero leaves unreachable, last duplicate wins, min tree,
new items at the (float) max priority, and no O(N) work per update."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import jaxprs_in_params

import flax_replay as fbx
from flax_replay._src import sum_tree

from one_row import add_steps, one_row_buffer

# ----------------------------------------------------------------------------------- helpers
_update = jax.jit(sum_tree.update, static_argnums=(1, 5))
_sample = jax.jit(sum_tree.sample, static_argnums=1)


def levels(tree, geo):
    """The flat node array as a list of per-depth NumPy arrays, root first."""
    tree = np.asarray(tree)
    return [tree[o : o + s] for o, s in zip(geo.offsets, geo.sizes)]


def assert_parents_are_children_reductions(tree, geo, reducer):
    """Every internal node is the sum (min) of its stored children. A float32 sum of 16
    non-negative values is within 15 * 2**-24 < 1e-6 (relative) of the exact sum, whatever the
    order; an all-zero family must give exactly 0. A min is exact."""
    lv = levels(tree, geo)
    k = geo.branching
    identity = 0.0 if reducer == "sum" else np.inf
    for d in range(1, len(lv)):
        children = np.full(geo.sizes[d - 1] * k, identity, np.float64)
        children[: geo.sizes[d]] = lv[d]
        children = children.reshape(-1, k)
        parents = lv[d - 1].astype(np.float64)
        if reducer == "sum":
            exact = children.sum(axis=1)
            np.testing.assert_allclose(parents, exact, rtol=1e-6, atol=0, err_msg=f"depth {d-1}")
            assert np.all((parents == 0) == (exact == 0)), f"depth {d - 1}: zero families"
        else:
            np.testing.assert_array_equal(parents, children.min(axis=1), err_msg=f"depth {d-1}")


def build(values, branching=16):
    """A sum tree and a min tree (0 -> inf) holding `values`, written through `update`."""
    values = np.asarray(values, np.float32)
    geo = sum_tree.geometry(values.size, branching)
    trees = (sum_tree.init(geo, 0.0), sum_tree.init(geo, jnp.inf))
    index = jnp.arange(values.size)
    mins = np.where(values > 0, values, np.inf).astype(np.float32)
    trees = _update(trees, geo, index, (jnp.asarray(values), jnp.asarray(mins)),
                    jnp.ones(values.size, bool), ("sum", "min"))
    return geo, trees


# ----------------------------------------------------------------------- a million updates
# Drift is measured through the code the buffers run: `update_sum_min` itself (a million
# writes, in batches of 1000 (its batched path), 2 and 1 (its small-batch path)), and real
# buffers' `add` and `set_priorities`, jitted, donated and scanned: one row (an add writes 2
# entries: the small-batch path) with updates of 1 and 2 priorities, and six rows (an add
# writes 12 entries) with updates of 100.
NUM_LEAVES = 50_003  # 50_003 = 4 * 12_500 + 3: the leaf level has padding
STEPS, BATCH = 1000, 1000  # 1000 * (1000 + 2 + 1): a million leaf writes


def wide_values(rng, shape):
    """float32 priorities from e^-20 to e^20, and 10% zeros, so that small leaves sit next
    to huge ones: a delta-updated float32 tree drifts badly on exactly this."""
    value = np.exp(rng.uniform(-20.0, 20.0, shape)).astype(np.float32)
    return np.where(rng.random(shape) < 0.1, np.float32(0.0), value)


def assert_exact_trees(sums, mins, geo, expected=None):
    """The leaves (`expected` if given) and their padding, the root against a float64 sum,
    every parent against its children, and the min tree against the sum tree's leaves."""
    sums, mins = np.asarray(sums), np.asarray(mins)
    leaf_level, min_level = levels(sums, geo)[-1], levels(mins, geo)[-1]
    leaves = leaf_level[: geo.num_leaves].astype(np.float64)
    if expected is not None:
        np.testing.assert_array_equal(leaves, expected)
    assert np.all(leaf_level[geo.num_leaves :] == 0)
    assert np.all(min_level[geo.num_leaves :] == np.inf)
    # The mix we meant: zeros, huge leaves, and leaves below the float32 ulp of the root.
    assert (leaves == 0).sum() > 100 and (leaves > 1e6).sum() > 100
    assert ((leaves > 0) & (leaves < 1e-3)).sum() > 100
    exact = leaves.sum()
    rel = abs(float(sums[0]) - exact) / exact
    print(f"root {float(sums[0])!r} vs float64 sum {exact!r}: relative error {rel:.2e}")
    assert rel < 1e-6
    assert_parents_are_children_reductions(sums, geo, "sum")
    assert_parents_are_children_reductions(mins, geo, "min")
    np.testing.assert_array_equal(min_level[: geo.num_leaves], np.where(leaves > 0, leaves, np.inf))
    assert float(mins[0]) == leaves[leaves > 0].min()


def last_wins(expected, index, value):
    """NumPy: `expected[index] = value` entry by entry (the last of duplicates wins)."""
    last = index.size - 1 - np.unique(index[::-1], return_index=True)[1]
    expected[index[last]] = value[last]


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(1, 2))
def _scanned_update_sum_min(geo, sums, mins, writes):
    def body(trees, batches):
        for index, value in batches:
            trees = sum_tree.update_sum_min(*trees, geo, index, value,
                                            jnp.ones(index.shape, bool))
        return trees, None

    return jax.lax.scan(body, (sums, mins), writes)[0]


@pytest.fixture(scope="module")
def drifted():
    """A tree after a million `update_sum_min` writes, and its leaves by NumPy."""
    geo = sum_tree.geometry(NUM_LEAVES)
    rng = np.random.default_rng(0)
    writes = []
    for b in (BATCH, 2, 1):
        index = rng.integers(0, NUM_LEAVES, (STEPS, b)).astype(np.int32)
        if b == 2:
            index[::4, 1] = index[::4, 0]  # duplicates in the small-batch path too
        writes.append((index, wide_values(rng, (STEPS, b))))
    expected = np.zeros(NUM_LEAVES, np.float32)
    for t in range(STEPS):
        for index, value in writes:
            last_wins(expected, index[t], value[t])
    trees = _scanned_update_sum_min(geo, sum_tree.init(geo, 0.0), sum_tree.init(geo, jnp.inf),
                                    tuple(writes))
    return geo, jax.device_get(trees), expected


def test_million_updates_root_is_the_sum_of_the_leaves(drifted):
    geo, (sums, mins), expected = drifted
    assert_exact_trees(sums, mins, geo, expected)


def zero_block_and_odd_leaves(geo):
    """The leaves of the first depth-1 family (a quarter of the tree, at least) and every
    odd leaf after it."""
    block = geo.branching ** (len(geo.sizes) - 2)
    return block, np.concatenate([np.arange(block), np.arange(block + 1, geo.num_leaves, 2)])


def assert_zeroed(sums, geo, block, sampled, sampled_values=None):
    """The zeroed family's root is exactly 0 (recomputed from zeros, no residue of old
    deltas), the tree is still exact, and no sampled leaf is zero or padding."""
    lv = levels(sums, geo)
    assert lv[1][0] == 0.0
    assert_parents_are_children_reductions(sums, geo, "sum")
    leaves = np.asarray(sum_tree.leaves(sums, geo))
    assert np.all(leaves[:block] == 0) and np.all(leaves[block + 1 :: 2] == 0)
    sampled = np.asarray(sampled).reshape(-1)
    assert sampled.min() >= 0 and sampled.max() < geo.num_leaves, "sampled a padding leaf"
    assert np.all(leaves[sampled] > 0), "a zero-priority leaf was sampled"
    if sampled_values is not None:
        np.testing.assert_array_equal(np.asarray(sampled_values).reshape(-1), leaves[sampled])


def test_zeroed_subtree_after_drift_is_exactly_zero_and_never_sampled(drifted):
    geo, (sums, mins), _ = drifted
    block, zero = zero_block_and_odd_leaves(geo)
    sums, mins = jax.jit(sum_tree.update_sum_min, static_argnums=2)(
        jnp.asarray(sums), jnp.asarray(mins), geo, jnp.asarray(zero, jnp.int32),
        jnp.zeros(zero.size), jnp.ones(zero.size, bool))
    targets = jax.random.uniform(jax.random.key(1), (200_000,)) * sums[0]
    assert_zeroed(sums, geo, block, _sample(sums, geo, targets))


# Through the buffers: priorities are leaves (exponent 1); both leaf levels have padding.
ONE_ROW = fbx.make_prioritised_flat_buffer(max_length=10_003, min_length=1,
                                           sample_batch_size=1, priority_exponent=1.0)
SIX_ROWS = fbx.make_prioritised_flat_buffer(max_length=6 * 8_335, min_length=1,
                                            sample_batch_size=1, add_batch_size=6,
                                            priority_exponent=1.0)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _buffer_drift(buffer, state, step, updates):
    """Per scan step: one `add` of `step`, then `set_priorities` with each of `updates`'
    (indices, priorities) batches."""
    def body(state, batches):
        state = buffer.add(state, step)
        for index, value in batches:
            state = buffer.set_priorities(state, index, value)
        return state, None

    return jax.lax.scan(body, state, updates)[0]


@functools.partial(jax.jit, static_argnums=(0, 5), donate_argnums=1)
def _zero_and_sample(buffer, state, ones, pairs, rest, draws):
    """Sets priority 0 on `rest` in one call, then on `ones` one per call and on `pairs` two
    per call (last, so that nothing recomputes their ancestors after them), then samples
    `draws` batches of 4096."""
    def zero(state, index):
        return buffer.set_priorities(state, index, jnp.zeros(index.shape)), None

    state = buffer.set_priorities(state, rest, jnp.zeros(rest.shape))
    state = jax.lax.scan(zero, state, ones[:, None])[0]
    state = jax.lax.scan(zero, state, pairs)[0]
    keys = jax.random.split(jax.random.key(2), draws)
    s = jax.lax.map(lambda k: buffer.sample(state, k, 4096), keys)
    return state, s.indices, s.priorities


@pytest.fixture(scope="module", params=["one_row", "six_rows"])
def drifted_buffer(request):
    """A buffer after wrapping around its rows 3 (one row) or 2 (six rows) times, every step
    an add and random priority updates (duplicates included) of items anywhere."""
    rng = np.random.default_rng(1)
    if request.param == "one_row":
        buffer, step, wraps, sizes = ONE_ROW, {"x": jnp.float32(1)}, 3, (1, 2)
    else:
        buffer, step, wraps, sizes = SIX_ROWS, {"x": jnp.ones(6)}, 2, (100,)
    n, steps = buffer.core.num_items, wraps * buffer.core.max_length_time_axis
    updates = []
    for b in sizes:
        index = rng.integers(0, n, (steps, b)).astype(np.int32)
        index[::5, -1] = index[::5, 0]  # duplicates (no-ops for b == 1)
        updates.append((index, wide_values(rng, (steps, b))))
    state = _buffer_drift(buffer, buffer.init({"x": jnp.float32(0)}), step, tuple(updates))
    return buffer, state


def test_buffer_million_updates_root_is_the_sum_of_the_leaves(drifted_buffer):
    buffer, state = drifted_buffer
    geo, ps = buffer.core.tree_geometry, jax.device_get(state.priority_state)
    assert_exact_trees(ps.sum_tree, ps.min_tree, geo)
    # The slot the write head is in holds no complete item: its leaf is 0 on every row.
    t, written = buffer.core.max_length_time_axis, int(state.running_index)
    assert written >= 2 * t
    head = np.arange(buffer.core.add_batch_size) * t + (written - 1) % t
    assert np.all(sum_tree.leaves(ps.sum_tree, geo)[head] == 0)


@pytest.mark.parametrize("drifted_buffer", ["one_row"], indirect=True)
def test_buffer_zeroed_subtree_is_exactly_zero_and_never_sampled(drifted_buffer):
    """The zeros are written through `set_priorities` one and two at a time and in one large
    batch, and the buffer's own `sample` draws from the result. (One row only: the six-row
    buffer's updates take the same batched path, and a compilation costs seconds.)"""
    buffer, state = drifted_buffer
    geo = buffer.core.tree_geometry
    block, zero = zero_block_and_odd_leaves(geo)
    half = block // 2
    zero = jnp.asarray(zero, jnp.int32)
    state, sampled, values = _zero_and_sample(
        buffer, jax.tree.map(jnp.copy, state), zero[:half], zero[half:block].reshape(-1, 2),
        zero[block:], 50)
    assert_zeroed(state.priority_state.sum_tree, geo, block, sampled, values)


# ------------------------------------------------------------------ zero leaves unreachable
def adversarial_targets(values, total):
    """Targets at every prefix-sum boundary and one float32 ulp either side, plus 0, the
    total, and just past it (rounding may push a target there)."""
    cum32 = np.cumsum(values.astype(np.float64)).astype(np.float32)
    edges = np.concatenate([cum32, np.float32([0.0, total])])
    t = np.concatenate([edges, np.nextafter(edges, np.float32(np.inf)),
                        np.nextafter(edges, np.float32(0))])
    return np.clip(t, 0, None).astype(np.float32)


@pytest.mark.parametrize("pattern", ["mixed", "tiny_next_to_huge", "single", "tail"])
def test_zero_priority_and_padding_never_sampled(pattern):
    n = 5003  # 5003 = 16 * 312 + 11: 5 padding children in the last family
    rng = np.random.default_rng(0)
    values = np.zeros(n, np.float32)
    if pattern == "mixed":
        pos = rng.random(n) < 0.3
        values[pos] = 10.0 ** rng.uniform(-30, 30, pos.sum())
    elif pattern == "tiny_next_to_huge":
        values[0::37] = 1e30
        values[1::37] = 1e-30  # absorbed by the huge neighbours' sum
        values[5::37] = 1.0
    elif pattern == "single":
        values[2345] = 1e-30
    else:  # only the last (partial) family is positive; padding lies just after it
        values[-3:] = [1e-20, 0.0, 3.0]
    geo, (sums, _) = build(values)
    total = np.float32(sums[0])
    u = rng.random(100_000, dtype=np.float32)
    targets = np.concatenate([u * total, adversarial_targets(values, total)])
    got = np.asarray(_sample(sums, geo, jnp.asarray(targets)))
    assert got.min() >= 0 and got.max() < n, "sampled a padding leaf"
    bad = got[values[got] <= 0]
    assert bad.size == 0, f"sampled zero-priority leaves {np.unique(bad)[:10]}"
    if pattern == "single":
        assert np.all(got == 2345)


def test_sample_is_inverse_cdf():
    values = np.float32([0.0, 1.0, 0.0, 2.0, 4.0] + [0.0] * 20 + [1.0])
    geo, (sums, _) = build(values, branching=4)
    targets = jnp.float32([0.0, 0.999, 1.0, 2.5, 3.0, 6.99, 7.0, 7.5, 8.0])
    np.testing.assert_array_equal(_sample(sums, geo, targets),
                                  [1, 1, 3, 3, 4, 4, 25, 25, 25])


# ------------------------------------------------------------------------------- duplicates
def test_duplicate_indices_last_occurrence_wins():
    rng = np.random.default_rng(1)
    n, b = 300, 2000
    geo = sum_tree.geometry(n)
    index = rng.integers(0, n // 3, b)  # heavy duplication
    value = rng.random(b).astype(np.float32) + 0.5
    mask = rng.random(b) < 0.7  # a masked-out later duplicate must not override
    expected = np.zeros(n, np.float32)
    for i, v, m in zip(index, value, mask):
        if m:
            expected[i] = v
    for _ in range(3):  # deterministic: the same answer every time
        (sums,) = _update((sum_tree.init(geo, 0.0),), geo, jnp.asarray(index),
                         (jnp.asarray(value),), jnp.asarray(mask), ("sum",))
        np.testing.assert_array_equal(sum_tree.leaves(sums, geo), expected)
        assert_parents_are_children_reductions(sums, geo, "sum")


@pytest.mark.parametrize("fused", [False, True])
def test_small_and_batched_writes_agree_with_a_reference(fused):
    """Random sequences of writes of 1, 2 (written entry by entry) and 3..9 entries (gathers
    and scatters), with duplicates, masked and out-of-range entries, on a tree whose levels
    have padding: every leaf as in a NumPy model, every parent its children's reduction."""
    rng = np.random.default_rng(7)
    n = 83  # 83 -> 84 leaves padded, 21 -> 24, 6 -> 8, 2 -> 4: padding on every level
    geo = sum_tree.geometry(n, 4)
    sums, mins = sum_tree.init(geo, 0.0), sum_tree.init(geo, jnp.inf)
    expected = np.zeros(n, np.float32)
    if fused:
        step = jax.jit(sum_tree.update_sum_min, static_argnums=2)
    else:
        step = jax.jit(lambda s, m, g, i, v, k: sum_tree.update(
            (s, m), g, i, (v, jnp.where(v > 0, v, jnp.inf)), k, ("sum", "min")),
            static_argnums=2)
    for _ in range(60):
        b = int(rng.choice([1, 2, 2, 3, 9]))
        index = rng.integers(-2, n + 2, b) if rng.random() < 0.2 else rng.integers(0, n, b)
        if b > 1 and rng.random() < 0.5:
            index[-1] = index[0]  # a duplicate
        value = np.where(rng.random(b) < 0.3, 0.0, rng.random(b) + 0.1).astype(np.float32)
        mask = rng.random(b) < 0.8
        for i, v, m in zip(index, value, mask):
            if m and 0 <= i < n:
                expected[i] = v
        sums, mins = step(sums, mins, geo, jnp.asarray(index, jnp.int32), jnp.asarray(value),
                          jnp.asarray(mask))
        np.testing.assert_array_equal(sum_tree.leaves(sums, geo), expected)
        np.testing.assert_array_equal(sum_tree.leaves(mins, geo),
                                      np.where(expected > 0, expected, np.inf))
        assert_parents_are_children_reductions(sums, geo, "sum")
        assert_parents_are_children_reductions(mins, geo, "min")
        assert float(sums[0]) == pytest.approx(float(expected.astype(np.float64).sum()),
                                               rel=1e-6)


def test_set_priorities_duplicates_last_wins():
    buf = one_row_buffer()
    state = add_steps(buf, buf.init({"x": jnp.zeros(())}), range(9))  # items start at 0..7
    state = buf.set_priorities(state, jnp.array([3, 3, 5, 3, 5]),
                               jnp.array([1.0, 7.0, 2.0, 4.0, 0.25]))
    leaves = np.asarray(sum_tree.leaves(state.priority_state.sum_tree, buf.core.tree_geometry))
    np.testing.assert_array_equal(leaves, [1, 1, 1, 2, 1, 0.5, 1, 1] + [0] * 8)
    assert float(state.priority_state.max_priority) == 7.0  # 7 was set, then overwritten
    assert float(state.priority_state.min_tree[0]) == 0.5


# ------------------------------------------------------------------------ the min tree
def test_min_tree_tracks_valid_items_through_overwrites():
    buf = one_row_buffer()
    geo = buf.core.tree_geometry
    state = buf.init({"x": jnp.zeros(())})
    assert float(state.priority_state.min_tree[0]) == np.inf  # empty: no valid item

    def root_min():
        return float(state.priority_state.min_tree[0])

    state = add_steps(buf, state, range(2))  # item 0, at the initial max priority 1
    state = buf.set_priorities(state, jnp.array([0]), jnp.array([0.25]))
    assert root_min() == 0.5  # 0.25 ** 0.5
    state = add_steps(buf, state, [2])  # item 1 enters at 1
    assert root_min() == 0.5
    state = buf.set_priorities(state, jnp.array([0]), jnp.array([0.0]))  # 0: leaves the min
    assert root_min() == 1.0
    state = buf.set_priorities(state, jnp.array([1]), jnp.array([4.0]))
    assert root_min() == 2.0
    state = add_steps(buf, state, range(3, 23))  # wrapped: items 0..6 overwritten
    sums = np.asarray(sum_tree.leaves(state.priority_state.sum_tree, geo))
    mins = np.asarray(sum_tree.leaves(state.priority_state.min_tree, geo))
    np.testing.assert_array_equal(mins, np.where(sums > 0, sums, np.inf))
    assert root_min() == sums[sums > 0].min() == 2.0  # all new, at max priority 4
    assert_parents_are_children_reductions(state.priority_state.min_tree, geo, "min")


# ------------------------------------------------------------ new items: max as a float
def test_new_items_get_the_float_max_priority():
    buf = one_row_buffer()
    state = add_steps(buf, buf.init({"x": jnp.zeros(())}), range(3))  # items start at 0, 1
    state = buf.set_priorities(state, jnp.array([0, 1]), jnp.array([2.5, 0.5]))
    assert float(state.priority_state.max_priority) == 2.5  # Flashbax 0.1.3: 2 (int cast)
    state = add_steps(buf, state, [3])  # the item starting at 2 is new
    leaf = float(sum_tree.get(state.priority_state.sum_tree, buf.core.tree_geometry, 2))
    want = np.float32(2.5) ** np.float32(0.5)
    np.testing.assert_allclose(leaf, want, rtol=1e-6)
    assert abs(leaf - np.float32(2.0) ** np.float32(0.5)) > 0.1
    # ... and a sample of it reports that priority.
    state = buf.set_priorities(state, jnp.array([0, 1]), jnp.array([0.0, 0.0]))
    sample = buf.sample(state, jax.random.key(0))
    np.testing.assert_array_equal(sample.indices, [2, 2, 2, 2])
    np.testing.assert_allclose(sample.priorities, want, rtol=1e-6)
    np.testing.assert_array_equal(sample.experience.first["x"], 2.0)


# ---------------------------------------------------------------------- no O(N) work
def _big_outputs(jaxpr, min_size):
    """(primitive name, shape) of every equation, at any nesting depth, whose output has at
    least `min_size` elements."""
    out = []
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            shape = getattr(v.aval, "shape", ())
            if int(np.prod(shape)) >= min_size:
                out.append((eqn.primitive.name, tuple(shape)))
        for sub in jaxprs_in_params(eqn.params):
            out.extend(_big_outputs(sub, min_size))
    return out


def _dus_update_sizes(jaxpr, min_size):
    """Sizes of the updates written by dynamic_update_slices into arrays of >= min_size."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dynamic_update_slice":
            if int(np.prod(eqn.invars[0].aval.shape)) >= min_size:
                out.append(int(np.prod(eqn.invars[1].aval.shape)))
        for sub in jaxprs_in_params(eqn.params):
            out.extend(_dus_update_sizes(sub, min_size))
    return out


@pytest.fixture(scope="module")
def big_buffer():
    # 4 rows of 20_000 steps: 80_000 leaves, and a batch of 64 per update.
    buf = fbx.make_prioritised_flat_buffer(max_length=80_000, min_length=1,
                                           sample_batch_size=64, add_batch_size=4)
    state = buf.init({"obs": jnp.zeros((3,), jnp.float32), "reward": jnp.zeros(())})
    return buf, state


def test_updates_do_no_work_of_the_size_of_the_tree(big_buffer):
    buf, state = big_buffer
    n = buf.core.num_items
    idx = jnp.arange(64, dtype=jnp.int32)
    p = jnp.ones(64)
    batch = {"obs": jnp.zeros((4, 3)), "reward": jnp.zeros((4,))}
    for name, fn, args in [
        ("set_priorities", buf.set_priorities, (state, idx, p)),
        ("add", buf.add, (state, batch)),
    ]:
        big = _big_outputs(jax.make_jaxpr(fn)(*args).jaxpr, n)
        assert big, f"{name}: expected the in-place scatters"
        # Only in-place writes touch arrays of the size of the tree: scatters of the batch
        # (and scatter-min marks of duplicates), dynamic_update_slices of single nodes or of
        # the small levels near the root that are recomputed whole, and the loops / platform
        # switch that carry the tree through them (their bodies are checked too). No cumsum,
        # bincount, full reduction or copy of the tree.
        prims = {prim for prim, _ in big}
        assert "scatter" in prims, f"{name}: {big}"
        assert prims <= {"scatter", "scatter-min", "dynamic_update_slice", "cond", "scan",
                         "custom_vmap_call",  # a call: its body is in the list too
                         "while"}, f"{name}: {big}"
        small_levels = _dus_update_sizes(jax.make_jaxpr(fn)(*args).jaxpr, n)
        assert all(size <= n // 16 for size in small_levels), f"{name}: {small_levels}"
    # Sampling gathers [B, branching] children per level, never a whole level: a level is
    # only ever a static slice (of the leaves, the only level this large) that XLA fuses into
    # the gather, so the compiled program materialises nothing of the size of the tree.
    big = _big_outputs(jax.make_jaxpr(buf.sample)(state, jax.random.key(0)).jaxpr, n)
    assert {prim for prim, _ in big} <= {"slice"}, big
    text = jax.jit(buf.sample).lower(state, jax.random.key(0)).compile().as_text()
    entry = text[text.index("\nENTRY") :]
    instr = re.compile(r"^\s*(?:ROOT )?%\S+ = \w+\[([\d,]*)\]\S* ([\w-]+)\(")
    large = [(m[2], m[1]) for m in map(instr.match, entry.splitlines())
             if m and math.prod(int(x) for x in m[1].split(",") if x) >= n]
    assert {op for op, _ in large} <= {"parameter", "bitcast", "get-tuple-element"}, large


def test_compiled_set_priorities_is_in_place(big_buffer):
    buf, state = big_buffer
    geo = buf.core.tree_geometry
    compiled = jax.jit(buf.set_priorities, donate_argnums=0).lower(
        state, jnp.arange(64, dtype=jnp.int32), jnp.ones(64)).compile()
    text = compiled.as_text()
    tree_shape = f"f32[{geo.num_nodes}]"
    instr = re.compile(r"^\s*(?:ROOT )?%\S+ = (\w+\[[\d,]*\])\S* ([\w-]+)\(")
    # In every computation (the entry and the loops over the levels): parameters in, loop
    # results passed through, in-place writes out: scatters or dynamic-update-slices,
    # possibly wrapped in a fusion whose root is one.
    ops = [m[2] for m in map(instr.match, text.splitlines()) if m and m[1] == tree_shape]
    assert ops and set(ops) <= {"parameter", "get-tuple-element", "scatter",
                                "dynamic-update-slice", "fusion"}, ops
    for line in text.splitlines():
        if f"= {tree_shape}" in line and " fusion(" in line:
            called = line.split("calls=%")[1].split(",")[0]
            body = text[text.index(f"%{called} ") :]
            root = [ln for ln in body.splitlines() if "ROOT" in ln][0]
            assert " scatter(" in root or " dynamic-update-slice(" in root, root
    # No copy of anything but small index arrays and loop counters.
    copies = [ln for ln in text.splitlines() if " copy(" in ln or " copy-start(" in ln]
    sizes = [math.prod(map(int, filter(None, re.search(r"= \w+\[([\d,]*)\]", ln)[1].split(","))))
             for ln in copies]
    assert all(size <= geo.num_nodes // 16 for size in sizes), copies


@pytest.mark.parametrize("branching", [2, 4, 8])
def test_cpu_serial_and_batched_updates_store_identical_bits(branching):
    """`update_sum_min` runs a loop over the entries on CPU and a batched program elsewhere;
    both must store the same bits, whatever the batch holds: duplicates (last wins), masked and
    out-of-range entries, zeros, huge values, on trees with padding on every level."""
    rng = np.random.default_rng(branching)
    serial = jax.jit(sum_tree._update_sum_min_serial, static_argnames="geo")
    batched = jax.jit(sum_tree._update_sum_min_batched, static_argnames="geo")
    for n in (83, 4_001):  # the loop runs on trees of up to 2**12 leaves
        geo = sum_tree.geometry(n, branching)
        values = jnp.asarray(rng.exponential(size=n).astype(np.float32))
        everything = (jnp.arange(n), values, jnp.ones(n, bool))
        start = batched(sum_tree.init(geo, 0.0), sum_tree.init(geo, jnp.inf), *everything,
                        geo=geo)
        for b in (3, 16):
            index = rng.integers(-3, n + 3, size=b)
            index[: b // 3] = index[b // 3 : 2 * (b // 3)]  # duplicates
            value = (rng.exponential(size=b) * (rng.random(b) < 0.8)).astype(np.float32)
            value[rng.random(b) < 0.1] = 1e30
            args = (jnp.asarray(index, jnp.int32), jnp.asarray(value),
                    jnp.asarray(rng.random(b) < 0.85))
            got = serial(*start, *args, geo=geo)
            want = batched(*start, *args, geo=geo)
            for g, w in zip(got, want):
                np.testing.assert_array_equal(np.asarray(g).view(np.uint32),
                                              np.asarray(w).view(np.uint32))


def test_update_sum_min_takes_the_serial_path_on_cpu_only():
    geo = sum_tree.geometry(1000, 4)
    args = (sum_tree.init(geo, 0.0), sum_tree.init(geo, jnp.inf), geo,
            jnp.arange(16, dtype=jnp.int32), jnp.ones(16), jnp.ones(16, bool))
    lowered = jax.jit(sum_tree.update_sum_min, static_argnums=2, donate_argnums=(0, 1)).lower(
        *args)
    text = lowered.compile().as_text()
    # The batched path scatters the batch into the tree; the serial one is a while loop of
    # dynamic slices, in place: nothing of the tree's size is copied.
    assert " while(" in text and " scatter(" not in text
    tree = f"f32[{geo.num_nodes}]"
    assert not [ln for ln in text.splitlines() if f"= {tree}" in ln and " copy(" in ln]
    gpu = jax.jit(sum_tree.update_sum_min, static_argnums=2).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "scatter" in gpu and "stablehlo.while" not in gpu
