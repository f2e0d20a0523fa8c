"""Bad priority updates (negative, NaN, infinite, out-of-range indices): a ValueError naming
them in an eager call; ignored under jit (the trees are untouched) and reported by checkify.
And a donated, jitted set_priorities writes the trees in place without copying the storage."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import flax_replay as fbx
from flax_replay._src import sum_tree


@pytest.fixture(scope="module")
def filled():
    """A prioritised flat buffer (2 rows x 16 steps, 32 leaves) with every item at a
    distinct priority."""
    buf = fbx.make_prioritised_flat_buffer(max_length=32, min_length=1, sample_batch_size=4,
                                           add_sequences=True, add_batch_size=2)
    state = buf.init({"obs": jnp.zeros((3,), jnp.float32), "reward": jnp.float32(0)})
    for _ in range(2):  # W = 20 > T = 16: every slot holds an item
        state = buf.add(state, {"obs": jnp.ones((2, 10, 3)), "reward": jnp.ones((2, 10))})
    leaves = jnp.arange(32)
    state = buf.set_priorities(state, leaves, 0.5 + leaves / 8)
    return buf, state


BAD = [
    ("negative", [3, 4], [1.0, -2.5], r"priorities must be finite and >= 0, got \[ *1\. +-2\.5\]"),
    ("nan", [3, 4], [np.nan, 1.0], r"priorities must be finite and >= 0, got \[ *nan +1\.\]"),
    ("inf", [3, 4], [1.0, np.inf], r"priorities must be finite and >= 0, got \[ *1\. +inf\]"),
    ("-inf", [3, 4], [-np.inf, 1.0], r"priorities .*got \[-inf +1\.\]"),
    ("index too large", [3, 32], [1.0, 1.0], r"indices must lie in \[0, 32\), got \[ *3 +32\]"),
    ("negative index", [-1, 3], [1.0, 1.0], r"indices must lie in \[0, 32\), got \[-1 +3\]"),
    ("all bad", [0, 40], [np.nan, 2.0], r"indices must lie in \[0, 32\), got \[ *0 +40\]"),
]  # all of two entries: the jitted functions compile once


def same_trees(a, b):
    for name in ("sum_tree", "min_tree", "max_priority"):
        np.testing.assert_array_equal(getattr(a.priority_state, name),
                                      getattr(b.priority_state, name), err_msg=name)


@pytest.mark.parametrize("name,idx,prio,message", BAD, ids=[b[0] for b in BAD])
def test_eager_call_raises_naming_the_values(filled, name, idx, prio, message):
    buf, state = filled
    with pytest.raises(ValueError, match=message):
        buf.set_priorities(state, jnp.asarray(idx, jnp.int32), jnp.asarray(prio, jnp.float32))


@pytest.fixture(scope="module")
def jitted(filled):
    buf, _ = filled
    return jax.jit(buf.set_priorities), jax.jit(
        checkify.checkify(buf.set_priorities, errors=checkify.user_checks))


@pytest.mark.parametrize("name,idx,prio,message", BAD, ids=[b[0] for b in BAD])
def test_under_jit_bad_entries_are_ignored_and_checkify_reports_them(filled, jitted, name, idx,
                                                                     prio, message):
    buf, state = filled
    set_priorities, checked = jitted
    idx = np.asarray(idx, np.int32)
    prio = np.asarray(prio, np.float32)
    bad = ~((idx >= 0) & (idx < 32) & np.isfinite(prio) & (prio >= 0))
    out = set_priorities(state, jnp.asarray(idx), jnp.asarray(prio))
    # Exactly what the good entries alone do (nothing, when all are bad).
    good_only = buf.set_priorities(state, jnp.asarray(idx[~bad]), jnp.asarray(prio[~bad]))
    same_trees(out, good_only)
    if bad.all():
        same_trees(out, state)
    err, out2 = checked(state, jnp.asarray(idx), jnp.asarray(prio))
    assert err.get() is not None, "checkify did not report the bad entries"
    assert re.search(message, err.get()), err.get()
    same_trees(out2, good_only)


def test_checkify_is_silent_for_good_updates(filled, jitted):
    buf, state = filled
    _, checked = jitted
    err, out = checked(state, jnp.array([1, 2], jnp.int32), jnp.array([0.0, 3.0]))
    assert err.get() is None
    leaves = np.asarray(sum_tree.leaves(out.priority_state.sum_tree, buf.core.tree_geometry))
    assert leaves[1] == 0.0 and leaves[2] == np.float32(3.0) ** np.float32(0.6)


def test_donated_set_priorities_aliases_the_storage_and_does_not_copy_it():
    buf = fbx.make_prioritised_flat_buffer(max_length=20_000, min_length=1,
                                           sample_batch_size=8, add_batch_size=4)
    state = buf.init({"obs": jnp.zeros((16,), jnp.float32), "reward": jnp.float32(0)})
    add = jax.jit(buf.add, donate_argnums=0)
    for _ in range(2):  # W = 2: one item (start 0) per row, leaves 0, 5000, 10000, 15000
        state = add(state, {"obs": jnp.ones((4, 16)), "reward": jnp.ones((4,))})
    set_priorities = jax.jit(buf.set_priorities, donate_argnums=0)
    idx, prio = jnp.array([0, 5000], jnp.int32), jnp.array([2.0, 3.0])
    text = set_priorities.lower(state, idx, prio).compile().as_text()
    header = text.splitlines()[0]
    assert "input_output_alias" in header, header[:300]
    n_exp = len(jax.tree.leaves(state.experience))
    for i in range(n_exp):  # output leaf i (experience) reuses input parameter i
        assert f"{{{i}}}: ({i}, {{}}, may-alias)" in header, header[:600]
    entry = text[text.index("\nENTRY") :]
    # No copies, but of scalars (the counter of a loop over the written entries).
    copies = [ln for ln in entry.splitlines() if " copy(" in ln or " copy-start(" in ln]
    assert all(re.search(r"= \w+\[\]", ln) for ln in copies), copies
    exp_shapes = [f"f32[{','.join(map(str, x.shape))}]" for x in jax.tree.leaves(state.experience)]
    for line in entry.splitlines()[1:]:  # the storage is only read as a parameter, never made
        if any(f"= {shape}" in line for shape in exp_shapes):
            assert " parameter(" in line, line
    # And at run time: the same memory comes back, the donated input is gone.
    before = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(state.experience)]
    old = state
    state = set_priorities(state, idx, prio)
    after = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(state.experience)]
    assert before == after
    assert all(x.is_deleted() for x in jax.tree.leaves(old.experience))
    leaves = np.asarray(sum_tree.leaves(state.priority_state.sum_tree, buf.core.tree_geometry))
    np.testing.assert_allclose(leaves[[0, 5000]], np.float32([2.0, 3.0]) ** np.float32(0.6))
