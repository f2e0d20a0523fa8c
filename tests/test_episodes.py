"""Episode-aware trajectory buffers against the NumPy reference (`reference.py`, episodes).

Random episode lengths (1, short, longer than the buffer) per row and random adds across
wraps: after every add the set of sampleable windows (the positive leaves of the uniform 0/1
tree or of the priority tree, and can_sample) equals the reference's; every sampled sequence
is checked step by step (consecutive steps of one row, stored, within one episode, or padded
with zeros and masked after its end). Chi-square tests of the window distribution (uniform and
prioritised) come with a power check: the law that ignores episodes is rejected.
"""

from __future__ import annotations

import warnings

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import flax_replay as fbx
from flax_replay._src import sum_tree

import reference

EXAMPLE = {"id": jnp.zeros((), jnp.int32), "done": jnp.zeros((), bool)}

# (rows, T, L, period, mode): a period grid with windows off it; padded windows that start
# at episode starts off the grid; L = T - period + 1 (and adds of T steps); L = 1. The default
# profile draws from the first four (compilation dominates), the thorough one from all.
CONFIGS = [
    (2, 8, 3, 1, "within_episode"),
    (1, 9, 4, 3, "within_episode"),
    (2, 8, 3, 2, "padded"),
    (2, 5, 5, 1, "within_episode"),
    (1, 6, 1, 1, "within_episode"),
    (1, 6, 4, 3, "padded"),
]


def make(cfg, alpha=None, batch=16, **kw):
    rows, t, l, p, mode = cfg
    args = dict(add_batch_size=rows, sample_batch_size=batch, sample_sequence_length=l,
                period=p, min_length_time_axis=l, max_length_time_axis=t,
                episode_end_key="done", sequence_mode=mode, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if alpha is None:
            return fbx.make_trajectory_buffer(**args)
        return fbx.make_prioritised_trajectory_buffer(priority_exponent=alpha, **args)


class Episodes:
    """Unique step ids per row, with episode ends drawn as random episode lengths."""

    def __init__(self, rows: int, t: int, rng: np.random.Generator):
        self.rng, self.t = rng, t
        self.next_id = 1
        self.left = [self._length() for _ in range(rows)]
        self.done: dict[int, bool] = {}

    def _length(self) -> int:
        # 1, short, around L, and longer than the buffer.
        return int(self.rng.choice([1, 2, 3, 5, self.t + 3, int(self.rng.integers(1, 3 * self.t))]))

    def batch(self, a: int) -> dict:
        rows = len(self.left)
        ids = np.arange(self.next_id, self.next_id + rows * a).reshape(rows, a)
        self.next_id += rows * a
        done = np.zeros((rows, a), bool)
        for r in range(rows):
            for k in range(a):
                self.left[r] -= 1
                if self.left[r] == 0:
                    done[r, k] = True
                    self.left[r] = self._length()
                self.done[int(ids[r, k])] = bool(done[r, k])
        return {"id": ids.astype(np.int32), "done": done}

    def end(self, step) -> bool:
        return self.done[step]


_JIT: dict = {}


def jitted(buf, name):
    key = (buf, name)
    if key not in _JIT:
        fn = getattr(buf, name)
        _JIT[key] = jax.jit(fn, donate_argnums=0) if name in ("add", "set_priorities") \
            else jax.jit(fn)
    return _JIT[key]


def positive_leaves(buf, state) -> set:
    core = buf.core
    if hasattr(state, "window_count"):
        leaves = core.sampleable(state)
    else:
        leaves = sum_tree.leaves(state.priority_state.sum_tree, core.tree_geometry)
    return set(np.flatnonzero(np.asarray(leaves) > 0).tolist())


def consecutive(model: reference.TrajectoryModel, ids: np.ndarray) -> None:
    """The steps `ids` are consecutive steps of one row, all still stored."""
    where = [model.find(int(i)) for i in ids]
    assert len({r for r, _ in where}) == 1
    times = [t for _, t in where]
    assert times == list(range(times[0], times[0] + len(times)))
    assert times[0] >= model.written - model.capacity and times[-1] < model.written


def check_sample(sample, model: reference.TrajectoryModel, mode: str, l: int) -> None:
    ids = np.asarray(sample.experience["id"])
    done = np.asarray(sample.experience["done"])
    valid = set(model.valid_items())
    for b in range(ids.shape[0]):
        row, s = model.find(int(ids[b, 0]))
        assert (row, s) in valid, f"sampled window {(row, s)} is not valid"
        expected = [0 if x is None else x for x in model.steps(row, s)]
        np.testing.assert_array_equal(ids[b], expected)
        if mode == "padded":
            mask = np.asarray(sample.mask[b])
            np.testing.assert_array_equal(mask, [x is not None for x in model.steps(row, s)])
            # Independent of the model: real steps are consecutive ids of one row, the only
            # end among them is the last real one, and padding is all zeros.
            consecutive(model, ids[b][mask])
            assert not done[b][mask][:-1].any()
            assert (ids[b][~mask] == 0).all() and not done[b][~mask].any()
        else:
            assert not hasattr(sample, "mask")
            consecutive(model, ids[b])
            assert not done[b][: l - 1].any()  # never crosses an episode end


def run(cfg, alpha, seed, adds, with_priorities):
    rows, t, l, p, mode = cfg
    buf = make(cfg, alpha)
    rng = np.random.default_rng(seed)
    eps = Episodes(rows, t, rng)
    model = reference.TrajectoryModel(rows, t, l, p, l, priority_exponent=alpha,
                                      end=eps.end, mode=mode)
    state = buf.init(EXAMPLE)
    key = jax.random.key(seed)
    for a in adds:
        batch = eps.batch(a)
        state = jitted(buf, "add")(state, batch)
        model.add(batch["id"].tolist())
        assert bool(buf.can_sample(state)) == model.can_sample()
        expected = {model.leaf(r, s) for r, s in model.valid_items()}
        if alpha is None:
            assert positive_leaves(buf, state) == expected
        else:
            got = np.asarray(sum_tree.leaves(state.priority_state.sum_tree,
                                             buf.core.tree_geometry))
            np.testing.assert_allclose(got, model.leaves, rtol=1e-5)
        if not model.can_sample():
            with pytest.raises(ValueError, match="no valid sequence exists yet"):
                buf.sample(state, key)
            continue
        key, k1, k2 = jax.random.split(key, 3)
        sample = jitted(buf, "sample")(state, k1)
        check_sample(sample, model, mode, l)
        if alpha is not None and with_priorities:
            # The sample's own items, and random leaves (many of them invalid windows, which
            # must stay 0 and never raise the max priority).
            n = buf.core.num_items
            idx = np.concatenate([np.asarray(sample.indices), rng.integers(0, n, 8)])
            pri = rng.uniform(0.0, 5.0, idx.shape).astype(np.float32)
            state = jitted(buf, "set_priorities")(state, jnp.asarray(idx, jnp.int32),
                                                   jnp.asarray(pri))
            model.set_priorities(idx.tolist(), pri.tolist())
            np.testing.assert_allclose(float(state.priority_state.max_priority),
                                       model.max_priority, rtol=1e-6)


# Each configuration compiles its own add/sample functions: fewer examples than the default
# profile keep this file to about a minute on 2 cores (the thorough profile runs more).
FEW = settings(max_examples=max(6, settings().max_examples // 4))
ADDS = st.lists(st.sampled_from([1, 5]), min_size=3, max_size=14)
POOL = st.sampled_from(CONFIGS if settings().max_examples > 25 else CONFIGS[:4])


@FEW
@given(cfg=POOL, seed=st.integers(0, 2**31 - 1), adds=ADDS)
def test_uniform_episode_buffer_matches_reference(cfg, seed, adds):
    run(cfg, None, seed, [min(a, cfg[1]) for a in adds], False)


@FEW
@given(cfg=POOL, seed=st.integers(0, 2**31 - 1), adds=ADDS,
       alpha=st.sampled_from([0.6, 1.0]))
def test_prioritised_episode_buffer_matches_reference(cfg, seed, adds, alpha):
    run(cfg, alpha, seed, [min(a, cfg[1]) for a in adds], True)


# --------------------------------------------------------------------------- distribution
def fixed_state(cfg, alpha, seed=3, adds=12):
    rows, t, l, p, mode = cfg
    buf = make(cfg, alpha, batch=64)
    eps = Episodes(rows, t, np.random.default_rng(seed))
    model = reference.TrajectoryModel(rows, t, l, p, l, priority_exponent=alpha,
                                      end=eps.end, mode=mode)
    state = buf.init(EXAMPLE)
    for _ in range(adds):
        batch = eps.batch(2)
        state = jitted(buf, "add")(state, batch)
        model.add(batch["id"].tolist())
    return buf, state, model, eps


def window_counts(buf, state, model, draws=300):
    sample = jax.jit(jax.vmap(buf.sample, in_axes=(None, 0)))(
        state, jax.random.split(jax.random.key(7), draws))
    ids = np.asarray(sample.experience["id"])[:, :, 0].reshape(-1)
    counts: dict = {}
    for i in ids.tolist():
        counts[model.find(i)] = counts.get(model.find(i), 0) + 1
    return counts


def chi_square(counts: dict, weights: dict) -> float:
    items = sorted(weights)
    observed = np.array([counts.get(i, 0) for i in items], float)
    expected = np.array([weights[i] for i in items], float)
    assert set(counts) <= set(items)
    expected = expected / expected.sum() * observed.sum()
    assert expected.min() >= 5
    return float(stats.chisquare(observed, expected).pvalue)


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[2]])
def test_uniform_window_distribution(cfg):
    buf, state, model, eps = fixed_state(cfg, None)
    counts = window_counts(buf, state, model)
    valid = model.valid_items()
    assert len(valid) >= 2
    assert chi_square(counts, {i: 1.0 for i in valid}) > 1e-3
    # Power: the law that ignores episodes (every stored window on the slot grid) is rejected.
    plain = reference.TrajectoryModel(cfg[0], cfg[1], cfg[2], model.slot_period, cfg[2])
    plain.history = model.history
    everything = set(plain.valid_items())
    assert everything > set(valid), "the fixture must hold invalid windows"
    observed = {i: counts.get(i, 0) for i in everything}
    assert chi_square(observed, {i: 1.0 for i in everything}) < 1e-3


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[2]])
def test_prioritised_window_distribution(cfg):
    alpha = 0.6
    buf, state, model, eps = fixed_state(cfg, alpha)
    valid = model.valid_items()
    leaves = [model.leaf(r, s) for r, s in valid]
    pri = np.linspace(0.5, 4.0, len(leaves)).astype(np.float32)
    state = buf.set_priorities(state, jnp.asarray(leaves, jnp.int32), jnp.asarray(pri))
    # Invalid windows given a priority stay at probability 0.
    invalid = sorted(set(range(buf.core.num_items)) - set(leaves))
    state = buf.set_priorities(state, jnp.asarray(invalid, jnp.int32),
                               jnp.full(len(invalid), 9.0, jnp.float32))
    assert float(state.priority_state.max_priority) == pytest.approx(4.0)
    counts = window_counts(buf, state, model)
    weights = {item: float(p) ** alpha for item, p in zip(valid, pri)}
    assert chi_square(counts, weights) > 1e-3
    wrong = {item: float(p) for item, p in zip(valid, pri)}  # p ** 1: must be rejected
    assert chi_square(counts, wrong) < 1e-3


# ------------------------------------------------------------------------------ behaviour
def test_default_is_todays_buffer():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = fbx.make_trajectory_buffer(2, 4, 3, 1, 3, max_length_time_axis=8)
    assert type(plain.core) is fbx._src.core.TrajectoryCore  # type: ignore[attr-defined]
    assert type(plain.init(EXAMPLE)) is fbx.TrajectoryBufferState


def test_short_episodes_are_sampleable_only_padded():
    batch = {"id": jnp.arange(1, 9, dtype=jnp.int32)[None], "done": jnp.ones((1, 8), bool)}
    within = make((1, 8, 3, 1, "within_episode"))
    state = jax.jit(within.add)(within.init(EXAMPLE), batch)
    assert not bool(within.can_sample(state))
    with pytest.raises(ValueError, match="no valid sequence exists yet.*shorter than"):
        within.sample(state, jax.random.key(0))
    padded = make((1, 8, 3, 1, "padded"))
    state = jax.jit(padded.add)(padded.init(EXAMPLE), batch)
    s = jax.jit(padded.sample)(state, jax.random.key(0))
    np.testing.assert_array_equal(s.mask, np.tile([True, False, False], (16, 1)))
    assert (s.experience["id"][:, 1:] == 0).all()


def test_callable_end_key_and_dataclass_experience():
    @flax.struct.dataclass
    class Step:
        obs: jax.Array
        discount: jax.Array

    buf = make((1, 8, 2, 1, "within_episode")).core
    import dataclasses
    core = dataclasses.replace(buf, episodes=fbx.EpisodeOptions(lambda s: s.discount == 0))
    state = core.init(Step(jnp.zeros((2,)), jnp.ones(())))
    disc = jnp.array([[1.0, 0.0, 1.0, 1.0, 0.0, 1.0]])
    state = core.add(state, Step(jnp.zeros((1, 6, 2)), disc))
    np.testing.assert_array_equal(state.window_valid[0, :5], [True, False, True, True, False])


@pytest.mark.parametrize("alpha", [None, 0.6])
def test_bad_input(alpha):
    buf = make((1, 8, 3, 1, "within_episode"), alpha)
    with pytest.raises(ValueError, match="'done' is not a top-level leaf"):
        buf.init({"id": jnp.zeros((), jnp.int32)})
    with pytest.raises(ValueError, match="'done' must be bool, got float32"):
        buf.init({"done": jnp.zeros((), jnp.float32)})
    with pytest.raises(ValueError, match=r"'done' must have shape \(\) per step.*\(4,\)"):
        buf.init({"done": jnp.zeros((4,), bool)})
    with pytest.raises(ValueError, match="function's result\\) must be bool"):
        make((1, 8, 3, 1, "padded"), alpha).core.__class__(
            **{**{f: getattr(buf.core, f) for f in buf.core.__dataclass_fields__},
               "episodes": fbx.EpisodeOptions(lambda s: s["id"])}).init(EXAMPLE)
    with pytest.raises(ValueError, match="sequence_mode must be 'within_episode' or 'padded'"):
        make((1, 8, 3, 1, "episodes"), alpha)
    with pytest.raises(ValueError, match="sequence_mode='padded' needs episode_end_key"):
        fbx.make_trajectory_buffer(1, 4, 3, 1, 3, max_length_time_axis=8,
                                   sequence_mode="padded")
    state = buf.init(EXAMPLE)
    with pytest.raises(ValueError, match="no valid sequence exists yet"):
        buf.sample(state, jax.random.key(0))


def test_sequence_priorities():
    rng = np.random.default_rng(0)
    td = rng.normal(size=(5, 7)).astype(np.float32)
    mask = rng.random((5, 7)) < 0.6
    mask[:, 0] = True
    mask[4] = False
    got = np.asarray(fbx.sequence_priorities(td, mask, eta=0.9))
    for b in range(5):
        real = np.abs(td[b][mask[b]])
        want = 0.0 if real.size == 0 else 0.9 * real.max() + 0.1 * real.mean()
        assert got[b] == pytest.approx(want, rel=1e-6)
    full = np.asarray(fbx.sequence_priorities(td, eta=0.5))
    np.testing.assert_allclose(full, 0.5 * np.abs(td).max(1) + 0.5 * np.abs(td).mean(1),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="must be \\[B, L\\]"):
        fbx.sequence_priorities(td[0])


@pytest.mark.parametrize("alpha", [None, 0.6])
def test_linen_and_nnx_views(alpha):
    from flax import nnx

    buf = make((2, 8, 3, 2, "padded"), alpha)
    eps = Episodes(2, 8, np.random.default_rng(1))
    batch = eps.batch(6)
    ref = buf.sample(buf.add(buf.init(EXAMPLE), batch), jax.random.key(4))

    lin = fbx.linen.ReplayBuffer(buffer=buf, experience=EXAMPLE)
    variables = lin.init(jax.random.key(0))
    _, variables = lin.apply(variables, batch, method="add", mutable=["replay", "priorities"])
    s = lin.apply(variables, jax.random.key(4), method="sample")
    np.testing.assert_array_equal(s.mask, ref.mask)
    np.testing.assert_array_equal(s.experience["id"], ref.experience["id"])

    mod = fbx.nnx.ReplayBuffer(buf, EXAMPLE)
    mod.add(batch)
    s = mod.sample(jax.random.key(4))
    np.testing.assert_array_equal(s.mask, ref.mask)
    np.testing.assert_array_equal(s.experience["id"], ref.experience["id"])
    assert isinstance(nnx.state(mod, fbx.Replay), nnx.State)


# ------------------------------------------------------------------------ flat and n-step
@pytest.mark.parametrize("prioritised", [False, True])
def test_flat_pairs_never_start_on_an_episode_end(prioritised):
    make_flat = fbx.make_prioritised_flat_buffer if prioritised else fbx.make_flat_buffer
    buf = make_flat(max_length=16, min_length=2, sample_batch_size=16, add_sequences=True,
                    add_batch_size=2, episode_end_key="done")
    eps = Episodes(2, 8, np.random.default_rng(5))
    model = reference.TrajectoryModel(2, 8, 2, 1, 2, priority_exponent=0.6 if prioritised
                                      else None, end=eps.end)
    state = buf.init(EXAMPLE)
    add, sample = jax.jit(buf.add), jax.jit(buf.sample)
    for k in range(6):
        batch = eps.batch(3)
        state = add(state, batch)
        model.add(batch["id"].tolist())
        if not model.can_sample():
            continue
        pair = sample(state, jax.random.key(k)).experience
        assert not np.asarray(pair.first["done"]).any()
        for a, b in zip(np.asarray(pair.first["id"]).tolist(),
                        np.asarray(pair.second["id"]).tolist()):
            row, s = model.find(a)
            assert (row, s) in model.valid_items() and model.steps(row, s) == [a, b]
    got = positive_leaves(buf, state)
    assert got == {model.leaf(r, s) for r, s in model.valid_items()}


@pytest.mark.parametrize("prioritised", [False, True])
def test_n_step_returns_stop_at_episode_end_key(prioritised):
    make_n = fbx.make_prioritised_n_step_buffer if prioritised else fbx.make_n_step_buffer
    example = {"id": jnp.zeros((), jnp.int32), "reward": jnp.zeros(()),
               "discount": jnp.ones(())}
    # The end signal is a function of the step (no "done" leaf): discount == 0.
    buf = make_n(max_length=32, min_length=4, sample_batch_size=32, add_sequences=True,
                 n_step=3, gamma=0.9, episode_end_key=lambda s: s["discount"] == 0.0)
    rng = np.random.default_rng(2)
    ids = np.arange(1, 25, dtype=np.int32)
    rewards = rng.uniform(-1, 1, 24).astype(np.float32)
    disc = (rng.random(24) > 0.3).astype(np.float32)
    state = buf.add(buf.init(example), {"id": ids, "reward": rewards, "discount": disc})
    out = jax.jit(buf.sample)(state, jax.random.key(0)).experience
    for i, ret, d in zip(np.asarray(out.first["id"]), np.asarray(out.reward),
                         np.asarray(out.discount)):
        t = int(i) - 1
        want = reference.n_step_return(rewards[t:t + 3], disc[t:t + 3] == 0, 0.9, 3)
        assert ret == pytest.approx(want[0], abs=1e-5) and d == pytest.approx(want[1])
    with pytest.raises(ValueError, match="function's result\\) must be bool"):
        make_n(max_length=32, min_length=4, sample_batch_size=4, n_step=3,
               episode_end_key=lambda s: s["discount"]).init(example)


# ----------------------------------------------------------------------------- sharded
@pytest.mark.parametrize("alpha,mode", [(None, "within_episode"), (0.6, "padded")])
def test_sharded_local_sampling_same_laws(alpha, mode):
    """4 rows over 2 devices: the state equals the unsharded one's, every shard's valid
    windows are the reference's, each shard's half of the sample lies in its own rows, and
    the windows of each shard are drawn uniformly / by priority (chi-square)."""
    from jax.sharding import AxisType

    cfg = (4, 8, 3, 1, mode)
    buf = make(cfg, alpha, batch=64)
    mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Explicit,))
    sharded = fbx.shard(buf, mesh, "data", sampling="local")
    eps = Episodes(4, 8, np.random.default_rng(11))
    model = reference.TrajectoryModel(4, 8, 3, 1, 3, priority_exponent=alpha, end=eps.end,
                                      mode=mode)
    state, plain = sharded.init(EXAMPLE), buf.init(EXAMPLE)
    add = jax.jit(sharded.add, donate_argnums=0)
    for _ in range(7):
        batch = eps.batch(2)
        state, plain = add(state, batch), buf.add(plain, batch)
        model.add(batch["id"].tolist())
    np.testing.assert_array_equal(state.episode_ends, plain.episode_ends)
    np.testing.assert_array_equal(state.window_valid, plain.window_valid)
    assert bool(sharded.can_sample(state)) == model.can_sample()
    valid = model.valid_items()
    sample_many = jax.jit(jax.vmap(sharded.sample, in_axes=(None, 0)))
    out = sample_many(state, jax.random.split(jax.random.key(3), 200))
    ids = np.asarray(out.experience["id"])  # [draws, 64, L]
    counts: dict = {}
    for d in range(ids.shape[0]):
        for b in range(ids.shape[1]):
            row, s = model.find(int(ids[d, b, 0]))
            assert (row, s) in valid
            assert row // 2 == b // 32  # shard k's half of the batch comes from its rows
            counts[(row, s)] = counts.get((row, s), 0) + 1
    if mode == "padded":
        check_sample(jax.tree.map(lambda x: np.asarray(x)[0], out), model, mode, 3)
    for shard in (0, 1):
        mine = [i for i in valid if i[0] // 2 == shard]
        # Uniform, and prioritised with every window at the initial max priority 1.
        weights = {i: 1.0 for i in mine}
        assert chi_square({i: counts.get(i, 0) for i in mine}, weights) > 1e-3
    # Power: a law over the shard's windows that ignores episodes is rejected.
    plain_model = reference.TrajectoryModel(4, 8, 3, 1, 3)
    plain_model.history = model.history
    every = [i for i in plain_model.valid_items() if i[0] // 2 == 0]
    if len(every) > len([i for i in valid if i[0] // 2 == 0]):
        assert chi_square({i: counts.get(i, 0) for i in every}, {i: 1.0 for i in every}) < 1e-3


@pytest.mark.parametrize("alpha,mode", [(None, "within_episode"), (0.6, "padded")])
def test_sharded_global_sampling_and_reshard(alpha, mode):
    """8 rows over 4 devices, global sampling: the windows of all shards are drawn uniformly /
    by priority together (chi-square, p > 0.001), with padding masked as unsharded; the law
    that ignores episodes is rejected. Resharding to 2 shards and unsharding give exactly the
    states of buffers that were sharded that way (or not) from the start."""
    from jax.sharding import AxisType

    p = 1 if mode == "within_episode" else 2  # padded: off-grid windows not starting one
    cfg = (8, 8, 3, p, mode)
    buf = make(cfg, alpha, batch=64)
    mesh4, mesh2 = (jax.make_mesh((n,), ("data",), axis_types=(AxisType.Explicit,),
                                  devices=jax.devices()[:n]) for n in (4, 2))
    sharded = fbx.shard(buf, mesh4, "data", sampling="global")
    halves = fbx.shard(buf, mesh2, "data", sampling="global")
    eps = Episodes(8, 8, np.random.default_rng(12))
    model = reference.TrajectoryModel(8, 8, 3, p, 3, priority_exponent=alpha, end=eps.end,
                                      mode=mode)
    state, two, plain = sharded.init(EXAMPLE), halves.init(EXAMPLE), buf.init(EXAMPLE)
    add4, add2 = jax.jit(sharded.add), jax.jit(halves.add)
    for _ in range(6):
        batch = eps.batch(2)
        state, two, plain = add4(state, batch), add2(two, batch), buf.add(plain, batch)
        model.add(batch["id"].tolist())
    for got, want in [(sharded.unshard(state), plain), (halves.reshard(state), two)]:
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(a, b)
    assert bool(sharded.can_sample(state)) == model.can_sample()
    valid = model.valid_items()
    out = jax.jit(jax.vmap(sharded.sample, in_axes=(None, 0)))(
        state, jax.random.split(jax.random.key(3), 100))
    if mode == "padded":
        check_sample(jax.tree.map(lambda x: np.asarray(x)[0], out), model, mode, 3)
    ids = np.asarray(out.experience["id"])[:, :, 0].reshape(-1)
    counts: dict = {}
    for i in ids.tolist():
        counts[model.find(i)] = counts.get(model.find(i), 0) + 1
    assert len({r // 2 for r, _ in counts}) == 4  # every shard's windows are drawn
    # Uniform, and prioritised with every window at the initial max priority 1.
    assert chi_square(counts, {i: 1.0 for i in valid}) > 1e-3
    plain_model = reference.TrajectoryModel(8, 8, 3, model.slot_period, 3)
    plain_model.history = model.history
    every = plain_model.valid_items()
    assert set(every) > set(valid), "the fixture must hold invalid windows"
    assert chi_square({i: counts.get(i, 0) for i in every}, {i: 1.0 for i in every}) < 1e-3


def test_checkpoint_roundtrip_keeps_episode_state(tmp_path):
    """An episode-aware buffer saved and restored with the model (Orbax) resumes exactly:
    flags, valid windows, trees and the next sample are identical."""
    import optax

    from flax_replay import checkpoint as ckpt

    buf = make((2, 8, 3, 2, "padded"), 0.6)
    eps = Episodes(2, 8, np.random.default_rng(8))
    state = jitted(buf, "add")(buf.init(EXAMPLE), eps.batch(7))
    cols = fbx.to_collections(state)
    params = {"w": jnp.ones((2,))}
    train = fbx.TrainState.create(apply_fn=None, params=params, tx=optax.sgd(0.1),
                                  replay=cols["replay"], priorities=cols["priorities"])
    manager = ckpt.make_manager(tmp_path / "run")
    ckpt.save(manager, 1, train, jax.random.key(0), force=True)
    manager.wait_until_finished()
    empty = fbx.to_collections(buf.init(EXAMPLE))
    template = train.replace(replay=empty["replay"], priorities=empty["priorities"])
    restored, _, _ = ckpt.restore(manager, template, jax.random.key(1))
    back = fbx.from_collections(type(state), {"replay": restored.replay,
                                              "priorities": restored.priorities})
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(back)):
        np.testing.assert_array_equal(a, b)
    key = jax.random.key(5)
    sample = jitted(buf, "sample")
    np.testing.assert_array_equal(sample(back, key).mask, sample(state, key).mask)


@pytest.mark.parametrize("width", [1, 2, 5, 16, 31, 32, 33, 40, 64, 100, 128])
def test_kth_true_matches_numpy(width):
    """The row draw of uniform sampling: the k-th True of a column, from population counts of
    its 32-bit words (one word up to 32 rows, several above); k past the last True gives
    `width`."""
    from flax_replay._src.episodes import kth_true

    rng = np.random.default_rng(width)
    flags = rng.random((500, width)) < rng.random((500, 1))
    k = rng.integers(0, width + 2, 500)
    want = [np.flatnonzero(f)[j] if j < f.sum() else width for f, j in zip(flags, k)]
    got = jax.jit(kth_true)(jnp.asarray(flags), jnp.asarray(k, jnp.int32))
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("rows", [3, 40])
def test_uniform_draw_is_a_bijection_onto_valid_windows(rows):
    """Targets j + 0.5 for j < total reach every sampleable window exactly once (each has
    probability exactly 1 / total), with one 32-bit word per column (3 rows) or two (40)."""
    buf = make((rows, 12, 3, 1, "within_episode"))
    rng = np.random.default_rng(rows)
    state = buf.init(EXAMPLE)
    for _ in range(3):  # across a wrap
        n = 7
        state = jax.jit(buf.add)(state, {
            "id": jnp.asarray(rng.integers(1, 100, (rows, n)), jnp.int32),
            "done": jnp.asarray(rng.random((rows, n)) < 0.2)})
    core = buf.core
    total = int(sum_tree.root(state.window_count))
    row, start = core.items_at(state, jnp.arange(total, dtype=jnp.float32) + 0.5)
    slot = np.asarray(start) // core.period
    got = sorted(zip(np.asarray(row).tolist(), slot.tolist()))
    valid = np.asarray(core.sampleable(state)).reshape(rows, -1)
    assert total > rows and got == sorted(zip(*np.nonzero(valid)))
