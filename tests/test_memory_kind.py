"""memory_kind="pinned_host" on every buffer, sharded ones too: the experience leaves in host
memory, counters and trees in device memory, samples returned in device memory; states and
samples identical to the default buffer's; donated adds update the storage in place (compiled
program); checkpoints restore into the same memory kind; bad kinds are refused with the
devices' kinds listed."""

from __future__ import annotations

import re
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import flax_replay as fbx
from flax_replay import checkpoint as ckpt

from buffer_cases import CASES, EXAMPLE, assert_trees_equal, make_batch, new_priorities

HOST = "pinned_host"

# The buffers of buffer_cases, made through their factories with a memory_kind.
MAKERS = {
    "flat": lambda mk: fbx.make_flat_buffer(32, 4, 4, add_batch_size=2, memory_kind=mk),
    "trajectory": lambda mk: fbx.make_trajectory_buffer(
        2, 3, 4, 2, 4, max_length_time_axis=16, memory_kind=mk),
    "item": lambda mk: fbx.make_item_buffer(16, 2, 3, add_batches=True, memory_kind=mk),
    "queue": lambda mk: fbx.make_trajectory_queue(12, 2, 4, 4, memory_kind=mk),
    "prioritised_flat": lambda mk: fbx.make_prioritised_flat_buffer(
        32, 4, 4, add_batch_size=2, priority_exponent=0.6, memory_kind=mk),
    "prioritised_trajectory": lambda mk: fbx.make_prioritised_trajectory_buffer(
        2, 3, 4, 2, 4, max_length_time_axis=16, priority_exponent=0.5, memory_kind=mk),
    "prioritised_item": lambda mk: fbx.make_prioritised_item_buffer(
        16, 2, 3, add_batches=True, memory_kind=mk),
    "n_step": lambda mk: fbx.make_n_step_buffer(32, 4, 4, add_batch_size=2, n_step=2,
                                                done_key=None, memory_kind=mk),
}


def kinds(tree) -> set:
    return {x.sharding.memory_kind for x in jax.tree.leaves(tree)}


def check_placement(state) -> None:
    assert kinds(state.experience) == {HOST}
    rest = [x for name, x in vars(state).items() if name != "experience"]
    assert kinds(rest) == {"device"}


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_identical_to_device_memory(kind):
    case = CASES[kind]
    runs = []
    for mk in (None, HOST):
        buf = MAKERS[kind](mk)
        add = jax.jit(buf.add, donate_argnums=0)
        sample = jax.jit(buf.sample) if case.queue else jax.jit(buf.sample, static_argnums=2)
        state = buf.init(EXAMPLE)
        if mk:
            check_placement(state)
        outs = []
        for i in range(4):
            state = add(state, make_batch(case, i))
            if mk:
                check_placement(state)
            if case.queue:
                state, out = jax.jit(buf.sample, donate_argnums=0)(state)
            elif bool(jax.jit(buf.can_sample)(state)):
                out = sample(state, jax.random.key(i), None)
                if case.prioritised:
                    state = jax.jit(buf.set_priorities, donate_argnums=0)(
                        state, out.indices, new_priorities(out))
            else:
                continue
            assert kinds(out) == {"device"}  # a sample comes back in device memory
            outs.append(jax.device_get(out))
        if mk:
            check_placement(state)
        runs.append((jax.device_get(state), outs))
    assert runs[1][1], "nothing was sampled"
    assert_trees_equal(runs[0], runs[1])


def _storage_param_numbers(hlo: str) -> list[int]:
    """Numbers of the entry parameters laid out in host memory (`S(5)`)."""
    layout = re.search(r"entry_computation_layout=\{\((.*?)\)->", hlo).group(1)
    params, depth, current = [], 0, ""
    for ch in layout:  # split at the commas outside [...], {...} and (...)
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == "," and depth == 0:
            params.append(current)
            current = ""
        else:
            current += ch
    params.append(current)
    return [i for i, p in enumerate(params) if ":S(5)" in p]


def assert_add_in_place(add, state, batch) -> Any:
    """The compiled `add` takes the storage in host memory, aliases it to the output
    (donation) and holds no copy of it; the donated input is consumed. Returns the new state."""
    hlo = jax.jit(add, donate_argnums=0).lower(state, batch).compile().as_text()
    header = hlo.splitlines()[0]
    host_params = _storage_param_numbers(header)
    assert len(host_params) == len(jax.tree.leaves(state.experience))
    aliased = {int(p) for p in re.findall(r"\{\d*\}: \((\d+), \{\}, may-alias\)", header)}
    assert set(host_params) <= aliased, (host_params, aliased)
    # Shapes of the storage as one device holds it (a shard's block when sharded).
    storage_shapes = {tuple(x.sharding.shard_shape(x.shape))
                      for x in jax.tree.leaves(state.experience)}
    for line in hlo.splitlines():
        m = re.search(r"= \w+\[([\d,]*)\]\{[^}]*\} copy\(", line)
        if m:
            shape = tuple(int(d) for d in m.group(1).split(",") if d)
            assert shape not in storage_shapes, f"storage copied: {line.strip()}"
    new = jax.jit(add, donate_argnums=0)(state, batch)
    assert all(x.is_deleted() for x in jax.tree.leaves(state.experience))
    return new


@pytest.mark.parametrize("kind", ["prioritised_flat", "trajectory"])
def test_donated_add_is_in_place(kind):
    buf = MAKERS[kind](HOST)
    check_placement(assert_add_in_place(buf.add, buf.init(EXAMPLE), make_batch(CASES[kind], 0)))


def test_frame_stack_in_host_memory():
    ex = {"obs": jnp.zeros((4, 5), jnp.uint8), "reward": jnp.float32(0), "done": jnp.float32(0)}
    out = []
    for mk in (None, HOST):
        buf = fbx.make_prioritised_n_step_buffer(40, 0, 6, add_sequences=True, add_batch_size=2,
                                                 n_step=3, frame_stack={"obs": 4}, memory_kind=mk)
        state = buf.init(ex)
        rng = np.random.default_rng(0)
        batch = {"obs": rng.integers(0, 255, (2, 13, 4, 5)).astype(np.uint8),
                 "reward": rng.normal(size=(2, 13)).astype(np.float32),
                 "done": (rng.random((2, 13)) < 0.2).astype(np.float32)}
        state = jax.jit(buf.add, donate_argnums=0)(state, batch)
        sample = jax.jit(buf.sample)(state, jax.random.key(1))
        assert sample.experience.first["obs"].shape == (6, 4, 5, 4)
        assert kinds(sample) == {"device"}
        out.append(jax.device_get((state, sample)))
    assert_trees_equal(out[0], out[1])


def test_views_and_checkpoint_keep_memory_kind(tmp_path):
    from flax import nnx

    buf = MAKERS["prioritised_flat"](HOST)
    case = CASES["prioritised_flat"]
    module = fbx.nnx.ReplayBuffer(buf, EXAMPLE)
    step = nnx.jit(lambda m, b: m.add(b), donate_argnums=0)
    for i in range(3):
        step(module, make_batch(case, i))
    assert kinds(nnx.state(module, fbx.Replay)["experience"]) == {HOST}

    linen = fbx.linen.ReplayBuffer(buffer=buf, experience=EXAMPLE)
    variables = jax.jit(linen.init)(jax.random.key(0))
    assert kinds(variables["replay"]["experience"]) == {HOST}

    state = buf.init(EXAMPLE)
    for i in range(3):
        state = jax.jit(buf.add, donate_argnums=0)(state, make_batch(case, i))
    cols = fbx.to_collections(state)
    train = fbx.TrainState.create(apply_fn=lambda *a, **k: None, params={"w": jnp.ones(2)},
                                  tx=optax.sgd(0.1), replay=cols["replay"],
                                  priorities=cols["priorities"])
    manager = ckpt.make_manager(tmp_path, enable_async=False)
    assert ckpt.save(manager, 1, train, jax.random.key(0))
    manager.close()
    empty = fbx.to_collections(buf.init(EXAMPLE))
    template = train.replace(replay=empty["replay"], priorities=empty["priorities"])
    restored, _, _ = ckpt.restore(ckpt.make_manager(tmp_path), template, jax.random.key(1))
    assert kinds(restored.replay["experience"]) == {HOST}
    assert kinds(restored.priorities) == {"device"}
    assert_trees_equal(jax.device_get(restored.replay), jax.device_get(cols["replay"]))


# ------------------------------------------------------------------------ sharded buffers
SHARDS = 4
FRAME_EXAMPLE = {"obs": jnp.zeros((2, 3), jnp.uint8), "reward": jnp.float32(0),
                 "done": jnp.bool_(False)}
# name: (make(memory_kind) -> buffer, sampling, example, leading axes of one add)
SHARDED = {
    "prioritised_flat_global": (lambda mk: fbx.make_prioritised_flat_buffer(
        32, 4, 8, add_batch_size=4, priority_exponent=0.6, memory_kind=mk), "global", EXAMPLE,
        (4,)),
    # frame stacks zeroed at episode starts: the episode flags and window tree per shard.
    "flat_frames_episodes_local": (lambda mk: fbx.make_flat_buffer(
        40, 4, 8, add_sequences=True, add_batch_size=4, frame_stack={"obs": 3},
        episode_end_key="done", memory_kind=mk), "local", FRAME_EXAMPLE, (4, 3)),
}


def _sharded_batch(example, prefix, i: int) -> dict:
    rng = np.random.default_rng(i)
    out = {}
    for name, x in example.items():
        shape = prefix + tuple(x.shape)
        if x.dtype == jnp.bool_:
            out[name] = rng.random(shape) < 0.3
        elif jnp.issubdtype(x.dtype, jnp.integer):
            out[name] = rng.integers(0, 100, shape).astype(x.dtype)
        else:
            out[name] = rng.normal(size=shape).astype(x.dtype)
    return out


def check_sharded_placement(state, memory_kind: str) -> None:
    for x in jax.tree.leaves(state.experience):
        assert x.sharding.memory_kind == memory_kind
        assert x.sharding.spec[0] == "data"  # rows still sharded
    rest = [x for name, x in vars(state).items() if name != "experience"]
    assert kinds(rest) == {"device"}


def _mesh():
    return jax.make_mesh((SHARDS,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,),
                         devices=jax.devices()[:SHARDS])


def test_sharded_donated_add_is_in_place():
    """Each device's block of the storage is a host-memory parameter of the compiled add,
    aliased to its output, never copied."""
    make, sampling, example, prefix = SHARDED["prioritised_flat_global"]
    mesh = _mesh()
    sb = fbx.shard(make(HOST), mesh, "data", sampling)
    batch = jax.device_put(_sharded_batch(example, prefix, 0),
                           jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    check_sharded_placement(assert_add_in_place(sb.add, sb.init(example), batch), HOST)


@pytest.mark.parametrize("name", sorted(SHARDED))
def test_sharded_identical_to_device_memory(name, tmp_path):
    """A sharded buffer with memory_kind: the experience shards in host memory (spec
    unchanged), the rest in device memory, the same states and samples as without it, and a
    checkpoint restored into abstract_state's targets lands in host memory again."""
    make, sampling, example, prefix = SHARDED[name]
    mesh = _mesh()
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    runs = []
    for mk in (None, HOST):
        sb = fbx.shard(make(mk), mesh, "data", sampling)
        prioritised = sb.prioritised
        add = jax.jit(sb.add, donate_argnums=0)
        state = sb.init(example)
        check_sharded_placement(state, mk or "device")
        outs = []
        for i in range(4):
            state = add(state, jax.device_put(_sharded_batch(example, prefix, i), rows))
            check_sharded_placement(state, mk or "device")
            if not bool(sb.can_sample(state)):
                continue
            out = jax.jit(sb.sample)(state, jax.random.key(i))
            assert kinds(out) == {"device"}
            if prioritised:
                state = jax.jit(sb.set_priorities, donate_argnums=0)(
                    state, out, jnp.abs(out.probabilities) + 0.5)
                check_sharded_placement(state, mk or "device")
            outs.append(jax.device_get(out))
        runs.append((jax.device_get(state), outs))
    assert len(runs[1][1]) >= 2, "too little was sampled"
    assert_trees_equal(runs[0], runs[1])

    # Checkpoint (Orbax, as examples/sharded_replay.py): restored into the sharded buffer's
    # abstract state, the experience lands in host memory again.
    cols = fbx.to_collections(state)
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.save(1, args=ocp.args.Composite(
            **{c: ocp.args.StandardSave(v) for c, v in cols.items()}))
        manager.wait_until_finished()
        target = fbx.to_collections(sb.abstract_state(example))
        for x in jax.tree.leaves(target["replay"]["experience"]):
            assert x.sharding.memory_kind == HOST
        restored = manager.restore(1, args=ocp.args.Composite(
            **{c: ocp.args.StandardRestore(v) for c, v in target.items()}))
    back = fbx.from_collections(state, dict(restored))
    check_sharded_placement(back, HOST)
    assert_trees_equal(jax.device_get(back), jax.device_get(state))
    if not sb.episodes:  # regrouping keeps the memory kind (episode buffers: not supported)
        check_sharded_placement(sb.unshard(back), HOST)


def test_bad_memory_kind_lists_device_kinds():
    with pytest.raises(ValueError, match=r"memory_kind='hbm'.*kinds are \['device', "
                                         r"'pinned_host', 'unpinned_host'\]"):
        fbx.make_flat_buffer(32, 4, 4, memory_kind="hbm")
    with pytest.raises(ValueError, match=r"'unpinned_host' is offered.*cannot hold a buffer"):
        fbx.make_prioritised_n_step_buffer(32, 4, 4, n_step=3, memory_kind="unpinned_host")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="memory_kind=3"):
            fbx.make_trajectory_queue(12, 2, 4, 4, memory_kind=3)  # type: ignore[arg-type]
    # "device" is the default memory: the same buffer as None.
    assert fbx.make_flat_buffer(32, 4, 4, memory_kind="device") == fbx.make_flat_buffer(32, 4, 4)
