"""The value checks keep plain `jit` on JAX's fast dispatch path (no effects in the jaxpr)
and are still raised by `checkify`: if a JAX release moves the internals the silent check is
built on, these tests fail instead of every user paying the slow path unnoticed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import checkify

import flax_replay as fbx
from flax_replay._src import checks


def _buffer():
    return fbx.make_prioritised_flat_buffer(max_length=32, min_length=4, sample_batch_size=4)


def test_the_effect_free_check_is_built():
    assert checks._silent_check_p is not None, (
        "the effect-free check could not be built on this JAX version: value checks fall "
        "back to checkify.debug_check, and every jitted sample takes JAX's slow dispatch path"
    )


@pytest.mark.parametrize("method", ["sample", "set_priorities"])
def test_checked_methods_have_no_effects_under_plain_jit(method):
    buf = _buffer()
    state = buf.init({"x": jnp.zeros(3)})
    if method == "sample":
        jaxpr = jax.make_jaxpr(buf.sample)(state, jax.random.key(0))
    else:
        jaxpr = jax.make_jaxpr(buf.set_priorities)(state, jnp.arange(4), jnp.ones(4))
    assert not jaxpr.effects, jaxpr.effects
    # The check is in the program (and dropped at lowering), not silently skipped.
    assert "flax_replay_debug_check" in str(jaxpr)


def test_checkify_still_raises_the_check():
    buf = _buffer()
    state = buf.init({"x": jnp.zeros(3)})  # empty: cannot be sampled
    err, _ = jax.jit(checkify.checkify(buf.sample, errors=checkify.user_checks))(
        state, jax.random.key(0))
    with pytest.raises(checkify.JaxRuntimeError, match="cannot be sampled yet"):
        err.throw()
    # Under vmap too (the batching rule reduces the checks of the batch).
    states = jax.tree.map(lambda x: jnp.stack([x, x]), state)
    err, _ = jax.jit(checkify.checkify(jax.vmap(buf.sample, (0, None)),
                                       errors=checkify.user_checks))(states, jax.random.key(0))
    with pytest.raises(checkify.JaxRuntimeError, match="cannot be sampled yet"):
        err.throw()
