"""A one-row prioritised buffer and helpers shared by the eager tests of the sum tree and of
prioritised sampling (one set of shapes, so their calls share compiled code)."""

import jax
import jax.numpy as jnp
import numpy as np

import flax_replay as fbx
from flax_replay._src import sum_tree


def one_row_buffer():
    """One row of 16 steps, items of 2 steps, alpha = 0.5."""
    return fbx.make_prioritised_flat_buffer(max_length=16, min_length=1, sample_batch_size=4,
                                            priority_exponent=0.5)


_ADD: dict = {}


def add_steps(buffer, state, ts):
    """`state` after adding one step `{"x": t}` for each t in `ts` (a jitted add, compiled
    once per buffer: cheaper than the many small ops of eager adds)."""
    if buffer not in _ADD:
        _ADD[buffer] = jax.jit(buffer.add)
    for t in ts:
        state = _ADD[buffer](state, {"x": jnp.float32(t)})
    return state


def leaf_values(buffer, state) -> np.ndarray:
    """The sum tree's leaves `[num_items]` (without the padding of the leaf level)."""
    return np.asarray(sum_tree.leaves(state.priority_state.sum_tree, buffer.core.tree_geometry))
