"""`buffer.replace(**functions)`: Flashbax's buffers are dataclasses of functions that
published programs rebind (PureJaxRL: `buffer.replace(add=jax.jit(buffer.add,
donate_argnums=0), ...)`). A replaced buffer must run exactly as the original, in the
functional API and in the Linen and NNX views, and views that cannot honour replaced functions
must say which were replaced."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from test_views import functional_script, run_view_script

import flax_replay as fbx

from buffer_cases import CASES, EXAMPLE, assert_trees_equal

KINDS = ("flat", "trajectory", "item", "queue", "prioritised_flat", "prioritised_trajectory",
         "n_step")


def pure_jax_rl(buffer):
    """The PureJaxRL rebinding, with every function field the buffer has jitted."""
    fields = {name: jax.jit(getattr(buffer, name)) for name in buffer.function_fields}
    fields["add"] = jax.jit(buffer.add, donate_argnums=0)
    return buffer.replace(**fields)


@pytest.mark.parametrize("kind", KINDS)
def test_replaced_buffer_runs_as_the_original(kind):
    case = CASES[kind]
    buf = pure_jax_rl(case.buffer)
    assert type(buf) is type(case.buffer)
    assert set(buf.replaced) == set(case.buffer.function_fields)
    # The replaced functions are what the buffer calls (not the methods).
    assert buf.add is dict(buf.overrides)["add"] and buf.add is not case.buffer.add
    hash(buf)  # still hashable: usable as a static argument and as a Linen attribute
    state, outs = run_view_script(
        kind, lambda: buf.init(EXAMPLE), buf.add, buf.sample, buf.can_sample,
        getattr(buf, "can_add", None), getattr(buf, "set_priorities", None))
    ref_cols, ref_outs = functional_script(kind)
    assert_trees_equal(fbx.to_collections(state), ref_cols)
    assert_trees_equal(outs, ref_outs)


def test_replace_is_called_with_the_replaced_function():
    """A user function that changes behaviour is honoured (not silently bypassed)."""
    case = CASES["flat"]
    calls = []

    def add(state, batch):
        calls.append(1)
        return case.buffer.add(state, batch)

    buf = case.buffer.replace(add=add)
    state = buf.init(EXAMPLE)
    m = fbx.nnx.ReplayBuffer(buf, EXAMPLE)
    m.add(jax.tree.map(lambda x: np.zeros((2, *x.shape), x.dtype), EXAMPLE))
    buf.add(state, jax.tree.map(lambda x: np.zeros((2, *x.shape), x.dtype), EXAMPLE))
    assert len(calls) == 2


@pytest.mark.parametrize("kind", ("trajectory", "prioritised_flat"))
def test_views_of_a_replaced_buffer(kind):
    case = CASES[kind]
    buf = pure_jax_rl(case.buffer)
    ref_cols, ref_outs = functional_script(kind)
    # Linen: the module calls the replaced (jitted) functions inside its own trace.
    mod = fbx.linen.ReplayBuffer(buffer=buf, experience=EXAMPLE)

    def add(v, x):
        _, upd = mod.apply(v, x, method="add", mutable=["replay", "priorities"])
        return {**v, **upd}

    def set_priorities(v, i, p):
        _, upd = mod.apply(v, i, p, method="set_priorities", mutable=["priorities"])
        return {**v, **upd}

    v, outs = run_view_script(
        kind, jax.jit(lambda: mod.init(jax.random.PRNGKey(0))), jax.jit(add),
        jax.jit(lambda v, k: mod.apply(v, k, method="sample")),
        jax.jit(lambda v: mod.apply(v, method="can_sample")), None, jax.jit(set_priorities))
    assert_trees_equal(outs, ref_outs)
    assert_trees_equal({k: v[k] for k in ref_cols}, ref_cols)

    # NNX, eager: the donated add replaces the module's arrays by the new state.
    m = fbx.nnx.ReplayBuffer(buf, EXAMPLE)

    def mutate(fn):
        def call(m, *args):
            fn(m, *args)
            return m
        return call

    m, outs = run_view_script(
        kind, lambda: m, mutate(lambda m, x: m.add(x)), lambda m, k: m.sample(k),
        lambda m: m.can_sample(), None, mutate(lambda m, i, p: m.set_priorities(i, p)))
    assert_trees_equal(outs, ref_outs)
    assert_trees_equal(fbx.to_collections(m.state()), ref_cols)
    # And under nnx.jit with the module donated.
    m2 = fbx.nnx.ReplayBuffer(buf, EXAMPLE)
    nnx.jit(lambda m, x: m.add(x), donate_argnums=0)(
        m2, jax.tree.map(lambda x: np.ones((*case.batch_prefix, *x.shape), x.dtype), EXAMPLE))


def test_shard_names_what_was_replaced():
    buf = CASES["prioritised_flat"].buffer
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    fbx.shard(buf, mesh)  # the factory's buffer shards
    with pytest.raises(ValueError, match="add, sample were replaced"):
        fbx.shard(buf.replace(add=jax.jit(buf.add), sample=jax.jit(buf.sample)), mesh)


def test_replace_refuses_unknown_names_and_non_functions():
    buf = CASES["trajectory"].buffer
    with pytest.raises(TypeError, match="unknown field.*set_priorities"):
        buf.replace(set_priorities=lambda *a: None)  # a uniform buffer has none
    with pytest.raises(TypeError, match="add must be callable"):
        buf.replace(add=3)
    # Equal replacements give equal buffers; the original is untouched.
    f = jax.jit(buf.add)
    assert buf.replace(add=f) == buf.replace(add=f)
    assert buf.replaced == () and buf.replace(add=f) != buf
    # Configuration fields are replaceable too (dataclasses.replace semantics).
    q = CASES["queue"].buffer
    assert q.replace(sample_sequence_length=2).sample_sequence_length == 2
