"""The call patterns of published Flashbax training programs, as short programs of our own.

benchmarks/published.py runs PureJaxRL's DQN, Stoix's DQN and Rainbow and JaxMARL's IQL with
only their imports changed (results: benchmarks/published.md). Each test here is the buffer
side of one of them, at toy size, checked against what the buffer must hold or return:

- PureJaxRL: a flat buffer whose functions are replaced by their jitted versions
  (`.replace(add=jax.jit(buffer.add, donate_argnums=0), ...)`), carried through a `lax.scan`
  inside `jax.jit(jax.vmap(train))` over seeds, learning under `lax.cond(can_sample, ...)`.
- Stoix: `from ...buffers.trajectory_buffer import BufferState`, a prioritised trajectory
  buffer sized by `max_size` with `device="tpu"`, `n`-step sequences, one state broadcast over
  an update-batch axis and replicated over devices, then `pmap(vmap(step))` with add, sample,
  importance weights from `probabilities`, `set_priorities(state, sample.indices, p)`.
- JaxMARL: a trajectory buffer whose item is a whole rollout of dict-of-agent fields in a
  frozen chex dataclass (`add` of `[envs, 1, steps, ...]`, `sample_sequence_length=1`).
"""

from __future__ import annotations

import chex
import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_replay as fbx
from flax_replay.buffers.trajectory_buffer import BufferState


@chex.dataclass(frozen=True)
class Step:
    obs: chex.Array
    action: chex.Array
    t: chex.Array
    env: chex.Array


def test_purejaxrl_replaced_jitted_flat_buffer_in_vmapped_scan():
    envs, batch, steps = 4, 8, 12
    buffer = fbx.make_flat_buffer(max_length=32, min_length=batch, sample_batch_size=batch,
                                  add_sequences=False, add_batch_size=envs)
    buffer = buffer.replace(init=jax.jit(buffer.init),
                            add=jax.jit(buffer.add, donate_argnums=0),
                            sample=jax.jit(buffer.sample),
                            can_sample=jax.jit(buffer.can_sample))

    def train(rng):
        example = Step(obs=jnp.zeros(3), action=jnp.int32(0), t=jnp.int32(0), env=jnp.int32(0))
        state = buffer.init(example)

        def update(carry, t):
            state, rng = carry
            rng, key_a, key_s = jax.random.split(rng, 3)
            step = Step(obs=jax.random.normal(key_a, (envs, 3)),
                        action=jax.random.randint(key_a, (envs,), 0, 2),
                        t=jnp.full((envs,), t, jnp.int32), env=jnp.arange(envs, dtype=jnp.int32))
            state = buffer.add(state, step)
            learned = jax.lax.cond(
                buffer.can_sample(state),
                lambda s: buffer.sample(s, key_s).experience,
                # Both branches are traced (PureJaxRL's learn phase samples under the cond).
                lambda s: jax.tree.map(lambda x: jnp.full_like(x, -1),
                                       buffer.sample(s, key_s).experience),
                state)
            first, second = learned.first, learned.second
            return (state, rng), (buffer.can_sample(state), first.t, second.t, first.env,
                                  second.env, first.obs, second.obs)

        (state, _), out = jax.lax.scan(update, (state, rng), jnp.arange(steps))
        return state, out

    state, (ready, t1, t2, e1, e2, o1, o2) = jax.jit(jax.vmap(train))(
        jax.random.split(jax.random.key(0), 2))
    ready, t1, t2, e1, e2 = map(np.asarray, (ready, t1, t2, e1, e2))
    # As Flashbax: min_length counts items over all rows, and a pair needs one step more, so
    # ready once min_length // add_batch_size + 1 = 3 steps are in (step index 2).
    assert (ready == (np.arange(steps) >= batch // envs)[None]).all(), ready
    learned = ready[:, :, None].repeat(batch, 2)
    # Every learned pair is two consecutive steps of one environment, written before `t`.
    assert (t2[learned] == t1[learned] + 1).all()
    assert (e1[learned] == e2[learned]).all()
    assert (t2 <= np.arange(steps)[None, :, None])[learned].all()
    assert (t1[~learned] == -1).all()
    # The two seeds' buffers are separate: their observations differ.
    assert not np.allclose(np.asarray(o1)[0][ready[0]], np.asarray(o1)[1][ready[1]])
    assert state.current_index.shape == (2,)


def _stoix_like(n_devices, update_batch, n_step=3, envs=2, rollout=4, batch=4):
    with pytest.warns(UserWarning, match="max_size"):  # as Flashbax, which Stoix sees too
        buffer = fbx.make_prioritised_trajectory_buffer(
            max_size=64, min_length_time_axis=n_step, sample_batch_size=batch,
            add_batch_size=envs, sample_sequence_length=n_step, period=1,
            priority_exponent=0.5, device="tpu")
    example = {"obs": jnp.zeros(2), "reward": jnp.float32(0.0)}
    state: BufferState = buffer.init(example)

    def step(state, key):
        key_d, key_s = jax.random.split(key)
        traj = {"obs": jax.random.normal(key_d, (envs, rollout, 2)),
                "reward": jax.random.uniform(key_d, (envs, rollout))}
        state = buffer.add(state, traj)
        sample = buffer.sample(state, key_s)
        weights = (1.0 / sample.probabilities) ** 0.4
        weights = weights / jnp.max(weights)
        # n-step "TD error" of the sampled sequences, as a priority.
        td = jnp.abs(sample.experience["reward"].sum(-1) - sample.experience["obs"][:, 0, 0])
        state = buffer.set_priorities(state, sample.indices, td * weights + 1e-3)
        return state, (sample.indices, sample.probabilities, sample.experience["reward"])

    return buffer, state, step


def test_stoix_pmap_vmap_prioritised_trajectory_buffer():
    n_devices, update_batch, updates = 2, 2, 2
    buffer, state, step = _stoix_like(n_devices, update_batch)
    stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (update_batch,) + x.shape), state)
    stacked = flax.jax_utils.replicate(stacked, devices=jax.devices()[:n_devices])
    keys = jax.random.split(jax.random.key(1), updates * n_devices * update_batch)
    keys = keys.reshape(updates, n_devices, update_batch)
    pstep = jax.pmap(jax.vmap(step), axis_name="device", devices=jax.devices()[:n_devices])
    outs = []
    for u in range(updates):
        stacked, out = pstep(stacked, keys[u])
        outs.append(out)
    # Outside the maps, as Stoix's evaluator and checks do.
    assert np.asarray(buffer.can_sample(stacked)).shape == (n_devices, update_batch)
    assert np.asarray(buffer.can_sample(stacked)).all()
    # Each of the 4 buffers is what the unbatched program gives on its own keys.
    for d in range(n_devices):
        for b in range(update_batch):
            single = state
            for u in range(updates):
                single, want = jax.jit(step)(single, keys[u, d, b])
                for got_leaf, want_leaf in zip(outs[u], want):
                    np.testing.assert_allclose(np.asarray(got_leaf)[d, b],
                                               np.asarray(want_leaf), rtol=1e-6)
            got_state = jax.tree.map(lambda x, d=d, b=b: x[d, b], stacked)
            for g, w in zip(jax.tree.leaves(got_state), jax.tree.leaves(single)):
                np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6)
    # The buffers saw different data (their keys differ).
    r = np.asarray(outs[-1][2])
    assert not np.allclose(r[0, 0], r[1, 1])


@chex.dataclass(frozen=True)
class AgentsStep:
    obs: dict
    actions: dict
    dones: dict


def test_jaxmarl_rollout_items_of_agent_dicts():
    agents, envs, steps, batch = ("a0", "a1", "a2"), 3, 5, 4

    def rollout(u):
        # [steps, envs, ...] as a scan over environment steps returns it; values name
        # (update, step, env, agent) so a sample can be checked.
        s = jnp.arange(steps)[:, None]
        e = jnp.arange(envs)[None, :]
        return AgentsStep(
            obs={a: (1000 * u + 100 * s + 10 * e + i)[..., None] * jnp.ones(2)
                 for i, a in enumerate(agents)},
            actions={a: (1000 * u + 100 * s + 10 * e + i).astype(jnp.int32)
                     for i, a in enumerate(agents)},
            dones={**{a: s * 0 + e * 0 == 1 for a in agents}, "__all__": (s + e) % 4 == 0})

    buffer = fbx.make_trajectory_buffer(max_length_time_axis=16, min_length_time_axis=batch,
                                        sample_batch_size=batch, add_batch_size=envs,
                                        sample_sequence_length=1, period=1)
    state = buffer.init(jax.tree.map(lambda x: x[:, 0], rollout(0)))  # one env's rollout

    @jax.jit
    def update(state, u, key):
        traj = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1)[:, np.newaxis], rollout(u))
        state = buffer.add(state, traj)
        minibatch = buffer.sample(state, key).experience
        return state, jax.tree.map(lambda x: jnp.swapaxes(x[:, 0], 0, 1), minibatch)

    for u in range(batch):
        assert not bool(buffer.can_sample(state))
        state, mb = update(state, u, jax.random.key(u))
    assert bool(buffer.can_sample(state))
    acts = {a: np.asarray(mb.actions[a]) for a in agents}  # [steps, batch]
    assert acts["a0"].shape == (steps, batch)
    for i, a in enumerate(agents):
        code = acts[a]
        # Each sampled item is one whole rollout of one env: steps 0..4 in order, one update,
        # one env, this agent.
        assert (code % 10 == i).all()
        assert (np.diff(code // 100 % 10, axis=0) == 1).all()
        assert (code[:, :] // 1000 == code[0] // 1000).all() and (code // 1000 < batch).all()
        np.testing.assert_array_equal(np.asarray(mb.obs[a])[..., 0], code)
    np.testing.assert_array_equal(acts["a1"] - acts["a0"], 1)
    # "__all__" travels with its item too.
    all_done = np.asarray(mb.dones["__all__"])
    s = np.arange(steps)[:, None]
    np.testing.assert_array_equal(all_done, (s + acts["a0"] // 10 % 10) % 4 == 0)


def test_published_harness_rewrites_only_flashbax_imports(tmp_path):
    import pathlib
    import sys

    root = str(pathlib.Path(__file__).resolve().parent.parent)
    if root not in sys.path:  # `pytest` run without the repository on the path
        sys.path.insert(0, root)
    from benchmarks import published

    source = "\n".join([
        "import flashbax as fbx",
        "import flashbax",
        "  import flashbax.buffers.sum_tree  # comment",
        "from flashbax.buffers.trajectory_buffer import BufferState, TrajectoryBufferSample",
        "    from flashbax import utils",
        "import flashbax_extra",
        "x = 'import flashbax as fbx'  # in a string, on a code line",
        "import jax, flashbax",  # two modules on a line: left alone (then fails loudly)
    ])
    out, n = published.rewrite_imports(source)
    assert n == 5
    assert out.splitlines() == [
        "import flax_replay as fbx",
        "import flax_replay as flashbax",
        "  import flax_replay.buffers.sum_tree; import flax_replay as flashbax",
        "from flax_replay.buffers.trajectory_buffer import BufferState, TrajectoryBufferSample",
        "    from flax_replay import utils",
        "import flashbax_extra",
        "x = 'import flashbax as fbx'  # in a string, on a code line",
        "import jax, flashbax",
    ]
    # The name scan reads imports and attribute chains, and finds what flax_replay lacks.
    (tmp_path / "prog.py").write_text(
        "import flashbax as fbx\n"
        "from flashbax.buffers.trajectory_buffer import BufferState\n"
        "b = fbx.make_prioritised_trajectory_buffer\n"
        "s = fbx.trajectory_buffer.TrajectoryBufferState\n"
        "v = fbx.no_such_name\n")
    names = published.flashbax_names(str(tmp_path))
    assert ("flashbax", "make_prioritised_trajectory_buffer", "prog.py") in names
    assert ("flashbax.buffers.trajectory_buffer", "BufferState", "prog.py") in names
    assert published.missing_in_flax_replay(names) == [("flashbax", "no_such_name", "prog.py")]
