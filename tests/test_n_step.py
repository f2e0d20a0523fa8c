"""n-step buffers: `first` at t, `second` at t + n, the discounted n-step return and bootstrap
discount truncated at the first episode end, against a direct NumPy computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_replay as fbx

ROWS, T, TOTAL, N, GAMMA = 3, 16, 44, 3, 0.9  # 44 steps per row: the time axis wraps twice


def episode_data(seed, end_rate=0.3):
    """Per-row streams of TOTAL steps: obs encodes (row, absolute time) as row * 10_000 + t;
    episode ends are dense (30%), so sampled windows have ends at every offset."""
    rng = np.random.default_rng(seed)
    t = np.arange(TOTAL)
    obs = (np.arange(ROWS)[:, None] * 10_000 + t[None]).astype(np.int32)
    reward = rng.normal(size=(ROWS, TOTAL)).astype(np.float32)
    done = rng.random((ROWS, TOTAL)) < end_rate
    return {"obs": obs, "reward": reward, "done": done,
            "discount": (~done).astype(np.float32)}


def fill(buffer, data, keys):
    add = jax.jit(buffer.add, donate_argnums=0)
    state = buffer.init({k: jnp.asarray(data[k][0, 0]) for k in keys})
    for lo in range(0, TOTAL, 11):  # chunks of 11 steps
        state = add(state, {k: jnp.asarray(data[k][:, lo : lo + 11]) for k in keys})
    return state


def many(buffer, state, draws=64):
    keys = jax.random.split(jax.random.key(0), draws)
    out = jax.jit(jax.vmap(buffer.sample, in_axes=(None, 0)))(state, keys)
    return jax.tree.map(lambda x: np.asarray(x).reshape(-1, *x.shape[2:]), out)


def n_step_reference(rewards, ends, gamma, n):
    """The textbook loop: add gamma**k r_k until an episode ends (its reward included)."""
    ret, disc = 0.0, 1.0
    for k in range(n):
        ret += disc * rewards[k]
        if ends[k]:
            return ret, 0.0
        disc *= gamma
    return ret, disc


def check_transitions(exp, data, n, gamma, end_key):
    """Checks every sampled transition; returns the offsets of the first episode end seen."""
    first = exp.first["obs"]
    row, t = np.divmod(first, 10_000)
    np.testing.assert_array_equal(exp.second["obs"], first + n)  # second at t + n, same row
    # Only stored steps: never across the write head or from before an overwrite.
    assert t.min() >= TOTAL - T and (t + n).max() <= TOTAL - 1
    for leaf in ("reward", end_key):
        np.testing.assert_array_equal(exp.first[leaf], data[leaf][row, t])
        np.testing.assert_array_equal(exp.second[leaf], data[leaf][row, t + n])
    ends = data["done"]
    offsets = []
    for i, (r, s) in enumerate(zip(row, t)):
        want_ret, want_disc = n_step_reference(data["reward"][r, s : s + n], ends[r, s : s + n],
                                               gamma, n)
        np.testing.assert_allclose(exp.reward[i], want_ret, rtol=1e-5, atol=1e-6,
                                   err_msg=f"return of row {r}, t {s}")
        np.testing.assert_allclose(exp.discount[i], want_disc, rtol=1e-6,
                                   err_msg=f"discount of row {r}, t {s}")
        hit = np.flatnonzero(ends[r, s : s + n + 1])
        offsets.append(hit[0] if hit.size else n + 1)
    return set(offsets)


@pytest.mark.parametrize("end_key", ["done", "discount"])
def test_n_step_buffer_returns_truncate_at_episode_ends(end_key):
    data = episode_data(0)
    keys = ("obs", "reward", end_key)
    kwargs = dict(done_key="done") if end_key == "done" else dict(discount_key="discount")
    buffer = fbx.make_n_step_buffer(ROWS * T, 4, 32, True, ROWS, n_step=N, gamma=GAMMA,
                                    **kwargs)
    state = fill(buffer, data, keys)
    exp = many(buffer, state).experience
    assert isinstance(exp, fbx.NStepTransition)
    offsets = check_transitions(exp, data, N, GAMMA, end_key)
    # Ends at every offset of the window: at t, inside, on its last reward, right after the
    # window (t + n: no effect) and none at all.
    assert offsets == set(range(N + 2)), offsets


def test_prioritised_n_step_buffer_positional_call_and_returns():
    data = episode_data(1)
    keys = ("obs", "reward", "discount")
    buffer = fbx.make_prioritised_n_step_buffer(ROWS * T, 4, 32, True, ROWS, 0.6, n_step=N,
                                                gamma=GAMMA, discount_key="discount")
    state = fill(buffer, data, keys)
    sample = many(buffer, state)
    offsets = check_transitions(sample.experience, data, N, GAMMA, "discount")
    assert offsets == set(range(N + 2)), offsets
    row, t = np.divmod(sample.experience.first["obs"], 10_000)
    np.testing.assert_array_equal(sample.indices, row * T + t % T)
    np.testing.assert_array_equal(sample.versions, t)
    # The priorities act on the n-step items: raise one item and it dominates.
    state = buffer.set_priorities(state, jnp.array([T + 5]), jnp.array([1e12]))
    top = buffer.sample(state, jax.random.key(3))
    assert np.all(np.asarray(top.indices) == T + 5)
    first = np.asarray(top.experience.first["obs"])
    assert np.all(first // 10_000 == 1) and np.all(first % T == 5)


def test_custom_n_step_fn():
    data = episode_data(2)
    keys = ("obs", "reward", "done")
    seen = {}

    def fn(seq, n):
        seen["shape"] = seq["reward"].shape
        return 2.0 * seq["reward"][:, :n].sum(axis=1), seq["reward"][:, n]

    buffer = fbx.make_n_step_buffer(ROWS * T, 4, 32, True, ROWS, n_step=N, n_step_fn=fn)
    state = fill(buffer, data, keys)
    exp = many(buffer, state).experience
    assert seen["shape"] == (32, N + 1)  # the whole window, first to second
    row, t = np.divmod(exp.first["obs"], 10_000)
    windows = data["reward"][row[:, None], t[:, None] + np.arange(N + 1)]
    np.testing.assert_allclose(exp.reward, 2.0 * windows[:, :N].sum(axis=1), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_array_equal(exp.discount, windows[:, N])


def test_seed_positional_call_defaults_to_one_step():
    # The seed: make_prioritised_n_step_buffer(max_length, min_length, sample_batch_size,
    # add_sequences, add_batch_size, priority_exponent), no n_step.
    buffer = fbx.make_prioritised_n_step_buffer(32, 8, 4, False, 6, 0.6)
    assert buffer.core.sample_sequence_length == 2 and buffer.core.priority_exponent == 0.6
    state = buffer.init({"obs": jnp.array([5, 4]), "reward": jnp.array(1.0)})
    add = jax.jit(buffer.add)
    for step in range(4):
        state = add(state, {"obs": jnp.stack([jnp.array([5, 4]) + 10 * i + step
                                              for i in range(6)]),
                            "reward": jnp.arange(6.0) + 0.1 * step})
    sample = buffer.sample(state, jax.random.key(0))
    exp = sample.experience
    np.testing.assert_array_equal(exp.second["obs"], exp.first["obs"] + 1)  # t + 1
    np.testing.assert_array_equal(exp.reward, exp.first["reward"])  # the 1-step return
    np.testing.assert_allclose(exp.discount, 0.99)  # no "done" leaf: never truncated
    assert exp.first["obs"].shape == (4, 2)
