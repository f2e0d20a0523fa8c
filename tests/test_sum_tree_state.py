"""`state.sum_tree_state`: Flashbax's field name as a read-only view of our priority state."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_replay as fbx
from flax_replay.buffers import sum_tree


def test_sum_tree_state_root_is_the_total_and_not_a_pytree_field() -> None:
    buffer = fbx.make_prioritised_flat_buffer(
        max_length=16, min_length=2, sample_batch_size=4, add_batch_size=2, priority_exponent=0.5
    )
    state = buffer.init({"x": jnp.zeros((3,))})
    for t in range(5):
        state = buffer.add(state, {"x": jnp.full((2, 3), float(t))})
    batch = buffer.sample(state, jax.random.PRNGKey(0))
    raw = np.array([4.0, 9.0, 16.0, 25.0], np.float32)
    state = buffer.set_priorities(state, batch.indices, jnp.asarray(raw))

    # Independent total: each valid item's p ** 0.5 from what the sample reports afterwards.
    batch = buffer.sample(state, jax.random.PRNGKey(1))
    total = np.asarray(batch.priorities) / np.asarray(batch.probabilities)
    np.testing.assert_allclose(np.asarray(state.sum_tree_state.nodes[0]), total, rtol=1e-5)
    np.testing.assert_array_equal(state.sum_tree_state.nodes, state.priority_state.sum_tree)
    # Flashbax's max_recorded_priority: the largest priority set, after the exponent.
    assert float(state.sum_tree_state.max_recorded_priority) == 5.0  # 25 ** 0.5
    np.testing.assert_array_equal(sum_tree.get(state.sum_tree_state, batch.indices),
                                  batch.priorities)
    np.testing.assert_allclose(sum_tree.get_probability(state.sum_tree_state, batch.indices),
                               batch.probabilities, rtol=1e-6)

    # Rebuilt from its collections: like the state, the view works and the structure is the
    # same; from the type alone the static fields are missing, and the view says so.
    cols = fbx.to_collections(state)
    like = fbx.from_collections(state, cols)
    assert jax.tree.structure(like) == jax.tree.structure(state)
    assert float(like.sum_tree_state.max_recorded_priority) == 5.0
    with pytest.raises(ValueError, match="from_collections"):
        _ = fbx.from_collections(type(state), cols).sum_tree_state

    # A property: the pytree (and so jit, donation, checkpoints) is unchanged.
    assert "sum_tree_state" not in {f.name for f in dataclasses.fields(state)}
    leaves = jax.tree.leaves(state)
    again = jax.jit(lambda s: s)(state)
    assert len(jax.tree.leaves(again)) == len(leaves)

    stacked = jax.tree.map(lambda x: jnp.stack([x, x]), state)
    assert stacked.sum_tree_state.nodes.shape == (2, *state.priority_state.sum_tree.shape)
    assert stacked.sum_tree_state.max_recorded_priority.shape == (2,)
