"""frame_stack on flat and n-step buffers (uniform and prioritised): one frame stored per step,
stacks assembled at sample time, checked against `reference.FrameStackModel` after every add of
random operation sequences (across wraps), under jit with donation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import flax_replay as fbx
from flax_replay import checkpoint as ckpt
from flax_replay._src import sum_tree
from flax_replay._src.buffers import Buffer, NStepReturns, TransitionLayout
from flax_replay._src.core import TrajectoryCore
from flax_replay._src.frames import FrameStack, stack_frames

import reference

FRAME = (2, 3)
GAMMA = 0.9


def frames_of(ids) -> np.ndarray:
    """int32 `[..., 2, 3]`: a frame that names its step id (id 0 / None: a zero frame)."""
    ids = np.asarray([0 if i is None else i for i in np.ravel(np.asarray(ids, object))],
                     np.int64).reshape(np.shape(ids))
    pattern = np.arange(6).reshape(FRAME) + 1
    ids = ids[..., None, None]
    return np.where(ids > 0, ids * 8 + pattern, 0).astype(np.int32)


class Data:
    """Steps with unique ids: obs/x frames, id, reward and done drawn per id."""

    def __init__(self, seed: int, end_rate: float = 0.3):
        self.rng = np.random.default_rng(seed)
        self.count = 0
        self.reward: dict = {}
        self.done: dict = {}
        self.end_rate = end_rate

    def example(self) -> dict:
        return {"obs": np.zeros(FRAME, np.int32), "x": np.zeros(FRAME, np.int32),
                "id": np.int32(0), "reward": np.float32(0), "done": np.float32(0),
                "end": np.bool_(False)}

    def new(self, rows: int, a: int) -> np.ndarray:
        ids = np.arange(self.count + 1, self.count + rows * a + 1).reshape(rows, a)
        self.count += rows * a
        for i in ids.ravel().tolist():
            self.reward[i] = float(np.float32(self.rng.uniform(-1, 1)))
            self.done[i] = bool(self.rng.random() < self.end_rate)
        return ids

    def tree(self, ids: np.ndarray) -> dict:
        flat = ids.ravel().tolist()
        return {"obs": frames_of(ids), "x": frames_of(ids) * 3, "id": ids.astype(np.int32),
                "reward": np.array([self.reward[i] for i in flat], np.float32).reshape(ids.shape),
                "done": np.array([self.done[i] for i in flat], np.float32).reshape(ids.shape),
                "end": np.array([self.done[i] for i in flat], bool).reshape(ids.shape)}


def _ended(step) -> jax.Array:
    """An episode-end signal given as a function of one step (the `done` leaf's)."""
    return step["done"] > 0


# (factory, max_length, add_batch_size, n_step, frame_stack, min_length, episode_end_key)
CONFIGS = {
    "flat": (fbx.make_flat_buffer, 8, None, 1, {"obs": 4}, 0, None),
    "flat_rows_two_keys": (fbx.make_flat_buffer, 14, 2, 1, {"obs": 3, "x": 2}, 5, None),
    "prioritised_flat": (fbx.make_prioritised_flat_buffer, 14, 2, 1, {"obs": 3}, 0, None),
    "n_step": (fbx.make_n_step_buffer, 18, 2, 3, {"obs": 4, "x": 1}, 0, None),
    "prioritised_n_step": (fbx.make_prioritised_n_step_buffer, 10, None, 3, {"obs": 4}, 6,
                           None),
    # Episode ends: earlier episodes' frames are zeros; a flat pair whose first ends an
    # episode is never sampled (and has a zero leaf), wherever its stack reaches.
    "flat_episodes": (fbx.make_flat_buffer, 14, 2, 1, {"obs": 3, "x": 2}, 0, "end"),
    "prioritised_flat_episodes": (fbx.make_prioritised_flat_buffer, 10, None, 1, {"obs": 4},
                                  3, "end"),
    "prioritised_n_step_episode_fn": (fbx.make_prioritised_n_step_buffer, 18, 2, 3,
                                      {"obs": 4}, 0, _ended),
}
FLAT = (fbx.make_flat_buffer, fbx.make_prioritised_flat_buffer)


@functools.lru_cache(maxsize=None)
def built(name: str):
    make, max_length, rows, n, stack, min_length, ends = CONFIGS[name]
    kwargs = dict(add_sequences=True, add_batch_size=rows, frame_stack=stack,
                  episode_end_key=ends)
    if n > 1:
        kwargs.update(n_step=n, gamma=GAMMA)
    buffer = make(max_length, min_length, 8, **kwargs)
    return buffer, jax.jit(buffer.add, donate_argnums=0), jax.jit(buffer.sample)


def _batch(data: Data, ids: np.ndarray, add_batches: bool) -> dict:
    tree = data.tree(ids)
    return tree if add_batches else jax.tree.map(lambda x: x[0], tree)


def check_against_model(name: str, buffer, state, sample, model, data: Data) -> None:
    make, _, rows, n, stack, _, ends = CONFIGS[name]
    r_count, cap = model.rows, model.capacity
    # Episode ends: the frames of earlier episodes are zeros; flat pairs ending one are out.
    frame_ends = None if ends is None else data.done
    pair_ends = data.done if ends is not None and make in FLAT else None
    # One frame per step is stored, and exactly the model's steps.
    assert state.experience["obs"].shape == (r_count, cap, *FRAME)
    np.testing.assert_array_equal(np.asarray(state.experience["obs"]), frames_of(model.stored()))
    assert bool(buffer.can_sample(state)) == model.can_sample(pair_ends)
    where = {i: (r, t) for r, steps in enumerate(model.history) for t, i in enumerate(steps)}
    sampleable = set(model.sampleable(pair_ends))
    k_max = max(stack.values())
    prioritised = isinstance(buffer, fbx.PrioritisedBuffer)
    if prioritised:
        leaf_values = np.asarray(sum_tree.leaves(state.priority_state.sum_tree,
                                                 buffer.core.tree_geometry))
        expected = {r * cap + (t - k_max + 1) % cap for r, t in sampleable}
        assert set(np.flatnonzero(leaf_values > 0).tolist()) == expected
    elif ends is not None:  # a uniform episode buffer: valid items counted per slot (column)
        counts = np.asarray(sum_tree.leaves(state.window_count, buffer.core.count_geometry))
        expected = np.zeros(cap)
        for _r, t in sampleable:
            expected[(t - k_max + 1) % cap] += 1
        np.testing.assert_array_equal(counts, expected)
    if sample is None:
        return
    exp = jax.device_get(sample.experience)
    for b, i in enumerate(np.asarray(exp.first["id"]).tolist()):
        r, t = where[i]
        assert (r, t) in sampleable, f"sampled transition {(r, t)} is not sampleable"
        steps = model.history[r]
        assert int(exp.second["id"][b]) == steps[t + n]
        for key in ("obs", "x"):
            if key in stack:
                k = stack[key]
                first = np.moveaxis(frames_of(model.stack(r, t, k, frame_ends)), 0, -1)
                second = np.moveaxis(frames_of(model.stack(r, t + n, k, frame_ends)), 0, -1)
                scale = 3 if key == "x" else 1
                np.testing.assert_array_equal(exp.first[key][b], first * scale, err_msg=key)
                np.testing.assert_array_equal(exp.second[key][b], second * scale, err_msg=key)
            else:
                np.testing.assert_array_equal(exp.first[key][b], frames_of(steps[t]) * 3)
        if n > 1:
            ret, disc = reference.n_step_return([data.reward[j] for j in steps[t:t + n]],
                                                [data.done[j] for j in steps[t:t + n]], GAMMA, n)
            np.testing.assert_allclose(exp.reward[b], ret, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(exp.discount[b], disc, rtol=1e-5, atol=1e-6)
        if prioritised:
            assert int(sample.indices[b]) == r * cap + (t - k_max + 1) % cap


@given(name=st.sampled_from([n for n in sorted(CONFIGS) if CONFIGS[n][-1] is None]),
       lengths=st.lists(st.sampled_from([1, 2, 3, 5]), min_size=1, max_size=9),
       seed=st.integers(0, 2**31 - 1))
def test_frame_stack_matches_model(name, lengths, seed):
    run_against_model(name, lengths, seed)


@pytest.mark.parametrize("name", [n for n in sorted(CONFIGS) if CONFIGS[n][-1] is not None])
def test_frame_stack_with_episode_ends_matches_model(name):
    """The episode configurations, each over a fixed run of adds that wraps the rows twice
    or more (kept out of the drawn runs above, whose budget they would thin out)."""
    run_against_model(name, [5, 3, 5, 3, 5, 3], seed=1)


def run_against_model(name: str, lengths: list, seed: int) -> None:
    buffer, add, sample = built(name)
    make, max_length, rows, n, stack, min_length, ends = CONFIGS[name]
    r_count = 1 if rows is None else rows
    cap = max_length // r_count
    model = reference.FrameStackModel(r_count, cap, n, max(stack.values()),
                                      max(min_length // r_count + 1, n + 1))
    data = Data(seed)
    state = buffer.init(data.example())
    key = jax.random.key(seed)
    for a in lengths:
        a = min(a, cap)
        ids = data.new(r_count, a)
        state = add(state, _batch(data, ids, rows is not None))
        model.add(ids.tolist())
        key, k = jax.random.split(key)
        pair_ends = data.done if ends is not None and make in FLAT else None
        out = sample(state, k) if model.can_sample(pair_ends) else None
        check_against_model(name, buffer, state, out, model, data)


def test_episode_starts_zero_earlier_frames():
    """The plug for episode ends: with `ends_key`, frames of an earlier episode are zeros."""
    n, k, cap = 2, 4, 12
    core = TrajectoryCore(add_batch_size=1, max_length_time_axis=cap, min_length_time_axis=n + k,
                          sample_batch_size=64, sample_sequence_length=n + k, period=1)
    stack = FrameStack((("obs", k),), ends_key="end")
    buffer = Buffer(core, TransitionLayout(True, True, n, NStepReturns(GAMMA), stack))
    data = Data(3, end_rate=0.35)
    model = reference.FrameStackModel(1, cap, n, k, n + k)
    state = buffer.init(data.example())
    add = jax.jit(buffer.add, donate_argnums=0)
    for _ in range(3):
        ids = data.new(1, 7)
        state = add(state, data.tree(ids))
        model.add(ids.tolist())
    exp = jax.device_get(jax.jit(buffer.sample)(state, jax.random.key(0)).experience)
    where = {i: t for t, i in enumerate(model.history[0])}
    zeroed = 0
    for b, i in enumerate(np.asarray(exp.first["id"]).tolist()):
        t = where[i]
        for at, out in ((t, exp.first["obs"][b]), (t + n, exp.second["obs"][b])):
            want = model.stack(0, at, k, data.done)
            zeroed += want.count(None)
            np.testing.assert_array_equal(out, np.moveaxis(frames_of(want), 0, -1))
    assert zeroed > 0  # the data do cross episode ends


def test_stack_frames_without_ends_is_a_window():
    x = jnp.arange(2 * 6 * 3).reshape(2, 6, 3)
    out = stack_frames(x, 3, 4)
    np.testing.assert_array_equal(out, np.moveaxis(np.asarray(x)[:, 2:5], 1, -1))


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("stack, match", [
    ({"obs": 0}, r"frame_stack\['obs'\]: the depth must be an integer >= 1, got 0"),
    ({"obs": 2.0}, r"depth must be an integer"),
    ({}, "non-empty"),
    ({1: 2}, "keys must be top-level"),
])
def test_bad_frame_stack_argument(stack, match):
    with pytest.raises(ValueError, match=match):
        fbx.make_prioritised_n_step_buffer(20, 0, 4, n_step=3, frame_stack=stack)


def test_stack_deeper_than_capacity():
    with pytest.raises(ValueError, match="spans 8 steps"):
        fbx.make_n_step_buffer(14, 0, 4, add_batch_size=2, n_step=3, frame_stack={"obs": 5})


def test_absent_key_named_at_init():
    buffer = fbx.make_flat_buffer(10, 0, 4, frame_stack={"pixels": 4})
    with pytest.raises(ValueError, match=r"no top-level key 'pixels'.*'obs'"):
        buffer.init(Data(0).example())


def test_stacked_leaf_instead_of_one_frame():
    buffer = fbx.make_flat_buffer(10, 0, 4, add_batch_size=2, frame_stack={"obs": 4})
    data = Data(0)
    state = buffer.init(data.example())
    before = jax.tree.map(np.asarray, state)
    batch = data.tree(data.new(2, 1)[:, 0])
    batch["obs"] = np.repeat(batch["obs"][..., None], 4, axis=-1)  # [2, 2, 3, 4]: a stack
    with pytest.raises(ValueError, match=r"frame_stack key 'obs' \(depth 4\) carries one frame"):
        buffer.add(state, batch)
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, state))


# ---------------------------------------------------- views, sharding, checkpoint unchanged
def _filled(buffer, steps: int = 9):
    data = Data(1)
    state = buffer.init(data.example())
    add = jax.jit(buffer.add)
    batches = []
    for _ in range(steps):
        batch = jax.tree.map(lambda x: x[:, 0], data.tree(data.new(2, 1)))
        batches.append(batch)
        state = add(state, batch)
    return data, state, batches


def test_linen_nnx_views_and_checkpoint(tmp_path):
    from flax import nnx

    buffer = fbx.make_prioritised_n_step_buffer(24, 0, 8, add_batch_size=2, n_step=3,
                                                frame_stack={"obs": 4})
    data, state, batches = _filled(buffer)
    key = jax.random.key(5)
    want = jax.jit(buffer.sample)(state, key)

    linen_buf = fbx.linen.ReplayBuffer(buffer=buffer, experience=data.example())
    variables = linen_buf.init(jax.random.key(0))

    @jax.jit
    def linen_add(variables, batch):
        _, updates = linen_buf.apply(variables, batch, method="add",
                                     mutable=["replay", "priorities"])
        return {**variables, **updates}

    for batch in batches:
        variables = linen_add(variables, batch)
    got = jax.jit(lambda v, k: linen_buf.apply(v, k, method="sample"))(variables, key)
    jax.tree.map(np.testing.assert_array_equal, want, got)

    nnx_buf = fbx.nnx.ReplayBuffer(buffer, data.example())
    nnx_add = nnx.jit(lambda m, batch: m.add(batch), donate_argnums=0)
    for batch in batches:
        nnx_add(nnx_buf, batch)
    got = nnx.jit(lambda m, k: m.sample(k))(nnx_buf, key)
    jax.tree.map(np.testing.assert_array_equal, want, got)

    # A checkpoint stores single frames and restores a state that samples the same.
    params = {"w": jnp.ones(3)}
    cols = fbx.to_collections(state)
    train = fbx.TrainState.create(apply_fn=lambda *a, **k: None, params=params,
                                  tx=optax.sgd(0.1), replay=cols["replay"],
                                  priorities=cols["priorities"])
    manager = ckpt.make_manager(tmp_path, enable_async=False)
    assert ckpt.save(manager, 1, train, key)
    manager.close()
    empty = fbx.to_collections(buffer.init(data.example()))
    template = train.replace(replay=empty["replay"], priorities=empty["priorities"])
    restored, _, _ = ckpt.restore(ckpt.make_manager(tmp_path), template, jax.random.key(0))
    assert restored.replay["experience"]["obs"].shape == (2, 12, *FRAME)
    back = fbx.from_collections(type(state), {"replay": restored.replay,
                                              "priorities": restored.priorities})
    jax.tree.map(np.testing.assert_array_equal, want, jax.jit(buffer.sample)(back, key))


def test_sharded_buffer_samples_stacks():
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    buffer = fbx.make_n_step_buffer(24, 0, 8, add_batch_size=2, n_step=3,
                                    frame_stack={"obs": 4})
    sharded = fbx.shard(buffer, mesh, "data")
    data = Data(2)
    state = sharded.init(data.example())
    ids = data.new(2, 9)
    for j in range(9):
        state = sharded.add(state, jax.tree.map(lambda x, j=j: x[:, j], data.tree(ids)))
    exp = jax.device_get(sharded.sample(state, jax.random.key(1)).experience)
    assert exp.first["obs"].shape == (8, *FRAME, 4)
    where = {int(i): (r, t) for r in range(2) for t, i in enumerate(ids[r])}
    for b, i in enumerate(np.asarray(exp.first["id"]).tolist()):
        r, t = where[i]
        assert t >= 3
        want = np.moveaxis(frames_of(ids[r, t - 3:t + 1]), 0, -1)
        np.testing.assert_array_equal(exp.first["obs"][b], want)


@pytest.mark.parametrize("make", [fbx.make_n_step_buffer, fbx.make_flat_buffer])
def test_frame_stack_zeroes_frames_before_an_episode_start(make):
    """With `episode_end_key`, stacks never show a previous episode's frames: those positions
    are zeros, flat and n-step buffers alike. A flat pair whose `first` ends an episode is
    never sampled; every other transition is, even where its stack reaches back past the
    episode's start (steps 4, 5, 8 and 9 here)."""
    kwargs = dict(reward_key="reward", done_key=None) if make is fbx.make_n_step_buffer else {}
    buf = make(max_length=16, min_length=4, sample_batch_size=16, frame_stack={"obs": 3},
               episode_end_key="done", **kwargs)
    state = buf.init({"obs": jnp.zeros((2,)), "reward": jnp.zeros(()),
                      "done": jnp.zeros((), bool)})
    steps = {"obs": np.repeat(np.arange(1, 11, dtype=np.float32)[:, None], 2, axis=1),
             "reward": np.arange(1, 11, dtype=np.float32),
             "done": np.isin(np.arange(1, 11), (3, 7))}  # episodes: steps 1-3, 4-7, 8-10
    add = jax.jit(buf.add)
    for t in range(10):
        state = add(state, jax.tree.map(lambda x, t=t: x[t], steps))
    exp = jax.jit(buf.sample, static_argnums=2)(state, jax.random.key(0), 256).experience
    episode = {t: (1 if t <= 3 else 2 if t <= 7 else 3) for t in range(1, 11)}
    firsts = set()
    for stack in np.asarray(exp.first["obs"])[:, 0]:
        last = int(stack[-1])
        firsts.add(last)
        want = [t if t >= 1 and episode[t] == episode[last] else 0
                for t in range(last - 2, last + 1)]
        np.testing.assert_array_equal(stack, want)
    # Steps 1-2 have no full stack in the row; the last pair starts at step 9.
    flat = make is not fbx.make_n_step_buffer
    assert firsts == ({4, 5, 6, 8, 9} if flat else {3, 4, 5, 6, 7, 8, 9})


@pytest.mark.parametrize("make", [fbx.make_flat_buffer, fbx.make_prioritised_flat_buffer])
def test_flat_frame_stack_bad_episode_end_key(make):
    buf = make(16, 4, 4, frame_stack={"obs": 2}, episode_end_key="terminal")
    with pytest.raises(ValueError, match="episode_end_key 'terminal' is not a top-level leaf"):
        buf.init({"obs": jnp.zeros((2,)), "done": jnp.zeros((), bool)})
    buf = make(16, 4, 4, frame_stack={"obs": 2}, episode_end_key="done")
    with pytest.raises(ValueError, match="episode_end_key 'done' must be bool, got float32"):
        buf.init({"obs": jnp.zeros((2,)), "done": jnp.zeros(())})
    with pytest.raises(ValueError, match=r"'done' must have shape \(\) per step.*\(2,\)"):
        buf.init({"obs": jnp.zeros((2,)), "done": jnp.zeros((2,), bool)})
