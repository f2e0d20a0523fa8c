"""The Linen module, the NNX module and the functional API are three views of one buffer: the
same operations give identical states and samples. Plus what each view must do the Flax way:
Linen collections and mutability, a buffer inside a model and a donated TrainState step; NNX
in-place updates under `nnx.jit`, and `Replay` / `Priorities` filters.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import flax_replay as fbx

from buffer_cases import (
    CASES,
    EXAMPLE,
    assert_trees_equal,
    keys,
    make_batch,
    new_priorities,
    single,
)

VIEW_KINDS = ("trajectory", "prioritised_flat", "queue")
REPLAY_FIELDS = {"experience", "current_index", "is_full"}
PRIORITY_FIELDS = {"sum_tree", "min_tree", "max_priority"}


def replay_fields(kind: str) -> set[str]:
    if CASES[kind].queue:
        return {"experience", "write_index", "read_index", "is_full"}
    return REPLAY_FIELDS | ({"running_index"} if CASES[kind].prioritised else set())


def mutable_for_add(kind: str) -> list[str]:
    return ["replay", "priorities"] if CASES[kind].prioritised else ["replay"]


# ------------------------------------------------------------------ one script, three views
# Every view runs the same operations; a script returns (final state as collections, outputs).
# Buffers: 3 adds, can_sample, sample, [set_priorities(sample), sample].
# Queue: add, add, can_add, sample, add, can_sample, sample.
def _batches(kind: str) -> list:
    return [make_batch(CASES[kind], i) for i in range(3)]


def functional_script(kind: str):
    f = single(kind)
    state, outs = run_view_script(kind, lambda: f["init"](EXAMPLE), f["add"], f["sample"],
                                  f["can_sample"], f.get("can_add"), f.get("set_priorities"))
    return fbx.to_collections(state), outs


def linen_module(kind: str) -> fbx.linen.ReplayBuffer:
    return fbx.linen.ReplayBuffer(buffer=CASES[kind].buffer, experience=EXAMPLE)


@functools.cache
def linen_fns(kind: str) -> dict:
    """The Linen methods, each jitted once: `apply` with the mutable collections it needs."""
    mod, mutable = linen_module(kind), mutable_for_add(kind)

    def add(v, x):
        _, upd = mod.apply(v, x, method="add", mutable=mutable)
        return {**v, **upd}

    def set_priorities(v, indices, priorities):
        _, upd = mod.apply(v, indices, priorities, method="set_priorities",
                           mutable=["priorities"])
        assert set(upd) == {"priorities"}  # the experience is not written
        return {**v, **upd}

    def queue_sample(v):
        s, upd = mod.apply(v, method="sample", mutable=["replay"])  # sampling consumes
        return {**v, **upd}, s

    return {
        "init": jax.jit(lambda: mod.init(jax.random.PRNGKey(0))),
        "add": jax.jit(add),
        # Reading needs no mutable collection.
        "sample": jax.jit(queue_sample if CASES[kind].queue
                          else lambda v, k: mod.apply(v, k, method="sample")),
        "can_sample": jax.jit(lambda v: mod.apply(v, method="can_sample")),
        "can_add": jax.jit(lambda v: mod.apply(v, method="can_add")),
        "set_priorities": jax.jit(set_priorities),
    }


def run_view_script(kind: str, init, add, sample, can_sample, can_add, set_priorities):
    """The script over any view: each argument is a function of the view's state holder (the
    Linen variables dict or the NNX module); mutating calls return the new holder."""
    case, b = CASES[kind], _batches(kind)
    v = init()
    outs = []
    if case.queue:
        v = add(add(v, b[0]), b[1])
        outs.append(can_add(v))
        v, s = sample(v)
        outs.append(s)
        v = add(v, b[2])
        outs.append(can_sample(v))
        v, s = sample(v)
        outs.append(s)
        return v, outs
    for x in b:
        v = add(v, x)
    outs.append(can_sample(v))
    s = sample(v, keys(0))
    outs.append(s)
    if case.prioritised:
        v = set_priorities(v, s.indices, new_priorities(s))
        outs.append(sample(v, keys(1)))
    return v, outs


def linen_script(kind: str):
    f = linen_fns(kind)
    return run_view_script(kind, f["init"], f["add"], f["sample"], f["can_sample"],
                           f["can_add"], f["set_priorities"])


@functools.cache
def nnx_fns(kind: str) -> dict:
    """The NNX methods, each under `nnx.jit` (in place: mutating calls return nothing)."""

    def queue_sample(m):
        return m.sample()

    return {
        "add": nnx.jit(lambda m, x: m.add(x), donate_argnums=0),
        "sample": nnx.jit(queue_sample if CASES[kind].queue else lambda m, k: m.sample(k)),
        "can_sample": nnx.jit(lambda m: m.can_sample()),
        "can_add": nnx.jit(lambda m: m.can_add()),
        "set_priorities": nnx.jit(lambda m, i, p: m.set_priorities(i, p), donate_argnums=0),
    }


def nnx_script(kind: str):
    f = nnx_fns(kind)

    def mutate(fn):
        def call(m, *args):
            assert fn(m, *args) is None
            return m  # the same module, updated in place

        return call

    def sample(m, *args):
        out = f["sample"](m, *args)
        return (m, out) if CASES[kind].queue else out

    m, outs = run_view_script(
        kind, lambda: fbx.nnx.ReplayBuffer(CASES[kind].buffer, EXAMPLE), mutate(f["add"]),
        sample, f["can_sample"], f["can_add"], mutate(f["set_priorities"]),
    )
    return fbx.to_collections(m.state()), outs, m


@pytest.mark.parametrize("kind", VIEW_KINDS)
def test_three_views_agree(kind):
    ref_cols, ref_outs = functional_script(kind)
    lin_vars, lin_outs = linen_script(kind)
    nnx_cols, nnx_outs, m = nnx_script(kind)

    # Linen: exactly the collections and names of the state, nothing else.
    assert set(lin_vars) == set(ref_cols)
    assert set(lin_vars["replay"]) == replay_fields(kind)
    if CASES[kind].prioritised:
        assert set(lin_vars["priorities"]) == PRIORITY_FIELDS
    assert_trees_equal(dict(lin_vars), ref_cols)
    assert_trees_equal(lin_outs, ref_outs)
    assert_trees_equal(nnx_cols, ref_cols)
    assert_trees_equal(nnx_outs, ref_outs)
    # The scripts did something: the buffer can be sampled (the queue: can add) and its
    # samples hold added data.
    assert bool(ref_outs[0])
    sample = ref_outs[1]
    assert np.any(np.asarray(jax.tree.leaves(sample.experience)[0]) != 0)


# ---------------------------------------------------------------------------------- Linen
def test_linen_mutability_rules():
    """`add` on a uniform buffer needs "replay" only; on a prioritised buffer also "priorities";
    reading needs nothing mutable. Checked abstractly (eval_shape): the rules are static."""
    uni, pri = linen_module("trajectory"), linen_module("prioritised_flat")
    v_uni = jax.eval_shape(uni.init, jax.random.PRNGKey(0))
    v_pri = jax.eval_shape(pri.init, jax.random.PRNGKey(0))
    assert set(v_uni) == {"replay"} and set(v_pri) == {"replay", "priorities"}
    b_uni, b_pri = make_batch(CASES["trajectory"], 0), make_batch(CASES["prioritised_flat"], 0)

    _, upd = jax.eval_shape(lambda v: uni.apply(v, b_uni, method="add", mutable=["replay"]),
                            v_uni)
    assert set(upd) == {"replay"}
    _, upd = jax.eval_shape(
        lambda v: pri.apply(v, b_pri, method="add", mutable=["replay", "priorities"]), v_pri
    )
    assert set(upd) == {"replay", "priorities"}
    # `init(key, batch)` only creates the buffer, empty.
    v = jax.jit(uni.init)(jax.random.PRNGKey(0), b_uni)
    assert set(v) == {"replay"} and int(v["replay"]["current_index"]) == 0
    assert not np.any(np.asarray(v["replay"]["experience"]["obs"]))
    # Calling apply with the batch directly (`__call__`) adds too.
    _, upd = jax.eval_shape(lambda v: uni.apply(v, b_uni, mutable=["replay"]), v_uni)
    assert set(upd) == {"replay"}

    with pytest.raises(flax.errors.ModifyScopeVariableError, match="replay"):
        jax.eval_shape(lambda v: uni.apply(v, b_uni, method="add"), v_uni)
    with pytest.raises(flax.errors.ModifyScopeVariableError, match="priorities"):
        jax.eval_shape(lambda v: pri.apply(v, b_pri, method="add", mutable=["replay"]), v_pri)

    # Reading: plain apply, no mutable collections; the default key comes from rngs["replay"].
    out = jax.eval_shape(lambda v: pri.apply(v, method="can_sample"), v_pri)
    assert out.shape == () and out.dtype == bool
    s = jax.eval_shape(lambda v: pri.apply(v, method="sample",
                                           rngs={"replay": jax.random.PRNGKey(1)}), v_pri)
    assert s.experience.first["obs"].shape == (4, 3)
    assert s.indices.shape == (4,)


class Agent(nn.Module):
    """A Q-regressor with its replay buffer as a submodule."""

    buffer: Any

    def setup(self) -> None:
        self.replay_buffer = fbx.linen.ReplayBuffer(buffer=self.buffer, experience=EXAMPLE)
        self.head = nn.Dense(1)

    def __call__(self, obs):
        self.replay_buffer()  # touch the buffer so that `init` creates its variables
        return self.head(obs)[..., 0]

    def observe(self, batch) -> None:
        self.replay_buffer.add(batch)

    def loss(self, rng):
        s = self.replay_buffer.sample(rng)
        err = self.head(s.experience.first["obs"])[..., 0] - s.experience.first["reward"]
        return jnp.mean(err**2), (s, jnp.abs(err))

    def set_priorities(self, sample, priorities) -> None:
        self.replay_buffer.set_priorities(sample, priorities)


def _reference_step(kind, params, state, batch, rng, lr):
    """What one training step must do, written with the functional API and plain jnp."""
    f = single(kind)
    state = f["add"](state, batch)
    s = f["sample"](state, rng)
    x, r = s.experience.first["obs"], s.experience.first["reward"]

    def loss(p):
        pred = x @ p["head"]["kernel"][:, 0] + p["head"]["bias"][0]
        return jnp.mean((pred - r) ** 2), jnp.abs(pred - r)

    (value, err), grads = jax.value_and_grad(loss, has_aux=True)(params)
    params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
    if CASES[kind].prioritised:
        state = f["set_priorities"](state, s.indices, err)
    return params, state, value


@pytest.mark.parametrize("kind", ["flat", "prioritised_flat"])
def test_linen_submodule_train_state_donated_step(kind):
    case, lr, f = CASES[kind], 0.1, single(kind)
    model = Agent(case.buffer)
    variables = model.init(jax.random.PRNGKey(0), EXAMPLE["obs"])
    cols = mutable_for_add(kind)
    assert set(variables) == {"params"} | set(cols)
    assert set(variables["params"]) == {"head"}
    assert all(set(variables[c]) == {"replay_buffer"} for c in cols)
    # Fill the buffer with the functional API: the collections are interchangeable.
    state = f["init"](EXAMPLE)
    for i in range(2):
        state = f["add"](state, make_batch(case, 10 + i))
    buffer_cols = fbx.to_collections(state)
    ts = fbx.TrainState.create(
        apply_fn=model.apply, params=variables["params"], tx=optax.sgd(lr),
        **{c: {"replay_buffer": buffer_cols[c]} for c in cols},
    )

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(ts, batch, rng):
        _, ts = ts.apply(batch, method="observe")

        def loss_fn(params):
            # The buffer and the parameters are used in the same apply.
            (loss, aux), _ = ts.apply(rng, params=params, method="loss")
            return loss, aux

        (loss, (sample, err)), grads = jax.value_and_grad(loss_fn, has_aux=True)(ts.params)
        ts = ts.apply_gradients(grads=grads)
        if case.prioritised:
            _, ts = ts.apply(sample, err, method="set_priorities")
        return ts, loss

    params = variables["params"]
    for i in range(3):
        params, state, ref_loss = _reference_step(kind, params, state, make_batch(case, i),
                                                  keys(i), lr)
        old = jax.tree.leaves((ts.params, ts.replay, ts.priorities))
        ts, loss = train_step(ts, make_batch(case, i), keys(i))
        assert all(x.is_deleted() for x in old)  # donated: nothing copied, nothing kept
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    got = fbx.from_collections(type(state), {c: getattr(ts, c)["replay_buffer"] for c in cols})
    assert_trees_equal(got.experience, state.experience)
    assert_trees_equal((got.current_index, got.is_full), (state.current_index, state.is_full))
    if case.prioritised:
        np.testing.assert_allclose(got.priority_state.sum_tree, state.priority_state.sum_tree,
                                   rtol=1e-5)
        assert float(got.priority_state.max_priority) != 1.0  # set_priorities took effect
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), ts.params, params)
    assert int(ts.step) == 3


# ------------------------------------------------------------------------------------ NNX
@pytest.mark.parametrize("kind", ["trajectory", "prioritised_flat"])
def test_nnx_in_place_under_donated_jit(kind):
    case, fns = CASES[kind], single(kind)
    m = fbx.nnx.ReplayBuffer(case.buffer, EXAMPLE)

    @nnx.jit(donate_argnums=0)
    def add(m, batch):
        m.add(batch)  # in place: nothing is returned

    expected = fns["init"](EXAMPLE)
    for i in range(3):
        expected = fns["add"](expected, make_batch(case, i))
        old = jax.tree.leaves(nnx.state(m))
        pointer = m.experience.get_value()["obs"].unsafe_buffer_pointer()
        add(m, make_batch(case, i))
        assert all(x.is_deleted() for x in old)
        assert m.experience.get_value()["obs"].unsafe_buffer_pointer() == pointer
    assert_trees_equal(m.state(), expected)

    if kind == "trajectory":
        # An `nnx.Rngs` works as the key: its default stream is used.
        got = nnx.jit(lambda m, rngs: m.sample(rngs))(m, nnx.Rngs(3))
        assert_trees_equal(got, fns["sample"](expected, nnx.Rngs(3)()))


class NnxAgent(nnx.Module):
    def __init__(self, buffer, rngs: nnx.Rngs):
        self.head = nnx.Linear(3, 1, rngs=rngs)
        self.buffer = fbx.nnx.ReplayBuffer(buffer, EXAMPLE)


@pytest.mark.parametrize("kind", ["flat", "prioritised_flat"])
def test_nnx_filters(kind):
    agent = NnxAgent(CASES[kind].buffer, nnx.Rngs(0))
    state = agent.buffer.state()
    cols = fbx.to_collections(state)

    replay = nnx.state(agent, fbx.Replay)
    assert set(replay) == {"buffer"}
    assert set(replay["buffer"]) == replay_fields(kind)
    assert_trees_equal(nnx.to_pure_dict(replay)["buffer"], cols["replay"])
    priorities = nnx.state(agent, fbx.Priorities)
    if CASES[kind].prioritised:
        assert set(priorities["buffer"]) == PRIORITY_FIELDS
        assert_trees_equal(nnx.to_pure_dict(priorities)["buffer"], cols["priorities"])
    else:
        assert not jax.tree.leaves(priorities)
    # The buffer module holds no other state (its definition is static).
    n_buffer = len(jax.tree.leaves(nnx.state(agent.buffer)))
    assert n_buffer == len(jax.tree.leaves(state))

    graphdef, params, replay, rest = nnx.split(agent, nnx.Param, fbx.Replay, ...)
    assert set(params) == {"head"} and set(params["head"]) == {"kernel", "bias"}
    assert set(replay["buffer"]) == replay_fields(kind)
    if CASES[kind].prioritised:
        assert set(rest) == {"buffer"} and set(rest["buffer"]) == PRIORITY_FIELDS
    else:
        assert not jax.tree.leaves(rest)
    param_leaves = {id(x) for x in jax.tree.leaves(params)}
    assert not param_leaves & {id(x) for x in jax.tree.leaves(replay)}

    merged = nnx.merge(graphdef, params, replay, rest)
    assert_trees_equal(merged.buffer.state(), state)


def test_both_views_take_the_same_argument_names_and_set_state():
    """`partition=` and `rng_key=` in both views (NNX keeps `sharding=` and `rng=` as aliases);
    `set_state` replaces the whole state (Linen: in a mutable apply)."""
    buf = fbx.make_prioritised_flat_buffer(max_length=32, min_length=2, sample_batch_size=4,
                                           add_batch_size=2)
    state = buf.init(EXAMPLE)
    for i in range(4):
        state = buf.add(state, jax.tree.map(lambda x, i=i: jnp.stack([x + i] * 2), EXAMPLE))
    key = jax.random.key(3)
    expected = buf.sample(state, key)

    model = fbx.nnx.ReplayBuffer(buf, EXAMPLE)
    model.set_state(state)
    assert_trees_equal(fbx.to_collections(model.state()), fbx.to_collections(state))
    for out in (model.sample(key), model.sample(rng_key=key), model.sample(rng=key)):
        assert_trees_equal(out, expected)
    with pytest.raises(ValueError, match="pass rng_key"):
        model.sample()
    with pytest.raises(ValueError, match="not both"):
        fbx.nnx.ReplayBuffer(buf, EXAMPLE, partition="data", sharding="data")

    module = fbx.linen.ReplayBuffer(buffer=buf, experience=EXAMPLE)
    variables = module.init(jax.random.key(0))
    _, variables = module.apply(variables, state, method="set_state",
                                mutable=["replay", "priorities"])
    out = module.apply(variables, rng_key=key, method="sample")
    assert_trees_equal(out, expected)
