"""Issue 12, parts 3 and 4: huge and subnormal priorities cannot break the tree, and bad input
gets a clear error. Each test fails on the code before the fix (the closing note of the issue
lists what each did before)."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import flax_replay as fbx
from flax_replay._src import sum_tree

N = 8  # items of the prioritised item buffer below


def _filled(priority_exponent: float = 1.0):
    buf = fbx.make_prioritised_item_buffer(N, 1, 4, add_batches=True,
                                           priority_exponent=priority_exponent)
    state = buf.init(jnp.zeros((), jnp.float32))
    # One jitted add of all N items (an eager add compiles each operation on its own).
    state = jax.jit(buf.add)(state, jnp.arange(N, dtype=jnp.float32))
    return buf, state


def _leaves(buf, state) -> np.ndarray:
    return np.asarray(sum_tree.leaves(state.priority_state.sum_tree, buf.core.tree_geometry))


def _assert_same(a, b) -> None:
    jax.tree.map(np.testing.assert_array_equal, a, b)


def _drawn(buf, state, n: int = 40) -> set:
    sample = jax.jit(buf.sample, static_argnums=2)
    return {int(i) for k in range(n) for i in sample(state, jax.random.key(k), 4).indices}


# ------------------------------------------------------------------------ huge priorities
def test_huge_priority_is_refused_eagerly():
    buf, state = _filled()
    with pytest.raises(ValueError, match=r"priorities must be at most 2\.12676e\+37"):
        buf.set_priorities(state, jnp.array([0, 1]), jnp.array([3e38, 3e38]))
    # The documented largest priority is accepted; a little more is not.
    largest = buf.core.largest_priority
    assert largest == pytest.approx(np.finfo(np.float32).max / (2 * N))
    everything = jnp.full((N,), largest, jnp.float32)
    full = buf.set_priorities(state, jnp.arange(N), everything)
    assert np.isfinite(sum_tree.root(full.priority_state.sum_tree))
    with pytest.raises(ValueError, match="at most"):
        buf.set_priorities(state, jnp.array([0]), jnp.array([largest * 1.01]))
    # New items get max_priority: the root stays finite after more adds.
    full = buf.add(full, jnp.array([9.0], jnp.float32))
    assert np.isfinite(sum_tree.root(full.priority_state.sum_tree))


def test_huge_priority_under_jit_is_dropped_and_checkify_reports_it():
    buf, state = _filled()
    idx, huge = jnp.array([0, 1, 2]), jnp.array([3e38, 3e38, 2.0], jnp.float32)
    new = jax.jit(buf.set_priorities)(state, idx, huge)
    assert np.isfinite(sum_tree.root(new.priority_state.sum_tree))
    np.testing.assert_array_equal(_leaves(buf, new), [1, 1, 2, 1, 1, 1, 1, 1])
    assert float(new.priority_state.max_priority) == 2.0
    assert _drawn(buf, new) == set(range(N)), "every positive-priority item stays reachable"
    err, checked = jax.jit(checkify.checkify(buf.set_priorities, errors=checkify.user_checks))(
        state, idx, huge)
    with pytest.raises(checkify.JaxRuntimeError, match="at most"):
        err.throw()
    _assert_same(checked, new)


def test_exponent_below_one_accepts_the_float32_maximum():
    buf, state = _filled(priority_exponent=0.5)
    assert buf.core.largest_priority == np.finfo(np.float32).max
    new = buf.set_priorities(state, jnp.array([0]), jnp.array([3e38], jnp.float32))
    assert np.isfinite(sum_tree.root(new.priority_state.sum_tree))


def test_subnormal_priority_keeps_its_item_reachable():
    buf, state = _filled()
    p = np.zeros(N, np.float32)
    p[3] = 1e-45  # subnormal: XLA on CPU flushes it to 0
    new = buf.set_priorities(state, jnp.arange(N), jnp.asarray(p))
    leaves = _leaves(buf, new)
    assert leaves[3] == np.finfo(np.float32).tiny and (np.delete(leaves, 3) == 0).all()
    assert bool(buf.can_sample(new))
    assert _drawn(buf, new, 2) == {3}


# ---------------------------------------------------------------- all priorities zero
def test_all_priorities_zero_says_so_and_never_gives_nan():
    buf, state = _filled()
    zero = buf.set_priorities(state, jnp.arange(N), jnp.zeros(N))
    assert not bool(buf.can_sample(zero))
    with pytest.raises(ValueError, match="no item has a positive priority"):
        buf.sample(zero, jax.random.key(0))
    out = jax.jit(buf.sample)(zero, jax.random.key(0))
    assert np.isfinite(out.probabilities).all() and np.isfinite(out.priorities).all()
    err, _ = jax.jit(checkify.checkify(buf.sample, errors=checkify.user_checks))(
        zero, jax.random.key(0))
    with pytest.raises(checkify.JaxRuntimeError, match="no item has a positive priority"):
        err.throw()
    # Too few steps is still reported as such.
    empty = buf.init(jnp.zeros((), jnp.float32))
    with pytest.raises(ValueError, match="cannot be sampled yet"):
        buf.sample(empty, jax.random.key(0))


# ----------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("make", ["flat", "prioritised_flat", "item", "prioritised_item"])
def test_python_scalars_are_accepted_by_add_as_by_init(make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        buf = getattr(fbx, f"make_{make}_buffer")(16, 2, 2)
    state = buf.init({"a": 3, "r": 1.5, "d": True})
    for i in range(3):
        state = buf.add(state, {"a": i, "r": 0.5 * i, "d": i == 1})
    np.testing.assert_array_equal(state.experience["a"][0, :3], [0, 1, 2])
    np.testing.assert_array_equal(state.experience["r"][0, :3], [0, 0.5, 1])
    np.testing.assert_array_equal(state.experience["d"][0, :3], [False, True, False])
    assert state.experience["a"].dtype == jnp.int32
    # A scalar of another kind is still refused by dtype, naming the leaf.
    with pytest.raises(ValueError, match=r"\['a'\] has dtype float32"):
        buf.add(state, {"a": 1.5, "r": 0.5, "d": True})


@pytest.mark.parametrize("make", ["flat", "prioritised_flat"])
def test_negative_batch_size_names_batch_size(make):
    buf = getattr(fbx, f"make_{make}_buffer")(16, 2, 2)
    state = buf.init({"a": jnp.zeros(())})
    for i in range(4):
        state = buf.add(state, {"a": jnp.float32(i)})
    with pytest.raises(ValueError, match="batch_size must be >= 0, got -1"):
        buf.sample(state, jax.random.key(0), -1)
    with pytest.raises(ValueError, match="batch_size must be an int"):
        buf.sample(state, jax.random.key(0), 2.5)
    assert buf.sample(state, jax.random.key(0), 3).experience.first["a"].shape == (3,)


@pytest.mark.parametrize("prioritised", [False, True])
def test_period_longer_than_the_time_axis_is_named(prioritised):
    make = (fbx.make_prioritised_trajectory_buffer if prioritised
            else fbx.make_trajectory_buffer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=r"`period` \(64\) exceeds `max_length_time_axis` "
                                             r"\(32\)"):
            make(add_batch_size=1, sample_batch_size=2, sample_sequence_length=2, period=64,
                 min_length_time_axis=2, max_length_time_axis=32)
    assert not [w for w in caught if "rounded down" in str(w.message)]
