"""Sharded buffers on 8 host devices (conftest): layout metadata, the collectives in the
compiled programs, the state and samples against the NumPy reference model (tests/reference.py,
one model per shard), agreement with single-device buffers where the documentation promises it
(global uniform sampling, resharding), and the sampling distributions."""

from __future__ import annotations

import copy
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from jax.experimental import checkify
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from scipy import stats

import flax_replay
from flax_replay import sharding
from flax_replay._src import sum_tree

import reference
from property_helpers import reference_tree

S, R, T, B = 8, 16, 8, 16  # shards, rows, time axis, sample batch
EXAMPLE = {"obs": jnp.zeros((2,), jnp.float32), "step": jnp.zeros((), jnp.int32),
           "done": jnp.zeros((), bool)}


def _buffer(prioritised: bool, sampling: str = "stratified", batch: int = B):
    kwargs = dict(add_batch_size=R, sample_batch_size=batch, sample_sequence_length=2,
                  period=1, min_length_time_axis=2, max_length_time_axis=T)
    if prioritised:
        return flax_replay.make_prioritised_trajectory_buffer(
            **kwargs, priority_exponent=0.7, sampling=sampling)
    return flax_replay.make_trajectory_buffer(**kwargs)


def _rows(first_step: int, length: int, seed: int = 0) -> dict:
    """Steps `first_step..` of every row: obs = [row, step] + noise, step = 100 row + step."""
    r, t = np.meshgrid(np.arange(R), np.arange(first_step, first_step + length), indexing="ij")
    noise = np.random.default_rng(seed).normal(size=(R, length, 2)).astype(np.float32)
    return {"obs": jnp.asarray(np.stack([r, t], -1) + noise),
            "step": jnp.asarray(100 * r + t, jnp.int32),
            "done": jnp.asarray((r + t) % 3 == 0)}


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((S,), ("data",), axis_types=(AxisType.Explicit,))


def _put(mesh, batch):
    return jax.device_put(batch, NamedSharding(mesh, P("data")))


# ------------------------------------------------------------------- the reference model
PER = R // S  # rows per shard
ITEMS = PER * T  # items (sum-tree leaves) per shard: period 1
ALPHA = 0.7


class Expected:
    """What the sharded buffer should hold, from the NumPy reference model (tests/reference.py,
    independent of flax_replay): one model per shard, holding that shard's rows, because a
    new item gets the largest priority set so far on its own shard. Steps are their "step"
    ids (100 row + t); `obs` keeps each id's observation to check contents."""

    def __init__(self, prioritised: bool):
        self.prioritised = prioritised
        self.models = [reference.TrajectoryModel(PER, T, 2, 1, 2,
                                                 priority_exponent=ALPHA if prioritised
                                                 else None) for _ in range(S)]
        self.obs: dict[int, np.ndarray] = {}

    def add(self, batch: dict) -> None:
        step, obs = np.asarray(batch["step"]), np.asarray(batch["obs"])
        self.obs.update(zip(step.reshape(-1).tolist(), obs.reshape(-1, 2)))
        for k, m in enumerate(self.models):
            m.add(step[k * PER:(k + 1) * PER].tolist())

    def set_priorities(self, indices, priorities, versions=None) -> None:
        """Each entry goes to the shard that holds its item (its leaf index // ITEMS)."""
        indices, priorities = np.asarray(indices), np.asarray(priorities)
        versions = None if versions is None else np.asarray(versions)
        for k, m in enumerate(self.models):
            mine = indices // ITEMS == k
            m.set_priorities((indices[mine] - k * ITEMS).tolist(), priorities[mine].tolist(),
                             None if versions is None else versions[mine].tolist())

    def item(self, step_id: int) -> tuple[int, int, int]:
        """(shard, row within the shard, start time) of the item starting at `step_id`."""
        row, t = divmod(int(step_id), 100)
        return row // PER, row % PER, t

    def leaves(self) -> np.ndarray:
        """`[R * T]` float64: every shard's leaves, in the single-device leaf order."""
        return np.concatenate([m.leaves for m in self.models])

    def valid_leaves(self) -> np.ndarray:
        """The single-device leaf index of every sampleable item."""
        return np.array([k * ITEMS + m.leaf(r, s) for k, m in enumerate(self.models)
                         for r, s in m.valid_items()])

    def check_state(self, state) -> None:
        """Experience, write position and fill, and (prioritised) every node of every shard's
        trees and each shard's max priority."""
        state = jax.device_get(state)
        ids = [row for m in self.models for row in m.storage(empty=None)]
        step = np.array([[0 if i is None else i for i in row] for row in ids])
        obs = np.array([[self.obs.get(i, np.zeros(2, np.float32)) for i in row] for row in ids])
        done = np.array([[i is not None and (i // 100 + i % 100) % 3 == 0 for i in row]
                         for row in ids])
        np.testing.assert_array_equal(state.experience["step"], step)
        np.testing.assert_array_equal(state.experience["obs"], obs)
        np.testing.assert_array_equal(state.experience["done"], done)
        m = self.models[0]
        assert int(state.current_index) == m.current_index
        assert bool(state.is_full) == m.is_full
        if not self.prioritised:
            return
        assert int(state.running_index) == m.written
        geo = sum_tree.geometry(ITEMS)
        ps = state.priority_state
        for k, m in enumerate(self.models):
            np.testing.assert_allclose(ps.sum_tree[k], reference_tree(m.leaves, geo, np.sum, 0.0),
                                       rtol=1e-5, atol=0, err_msg=f"shard {k}: sum tree")
            mins = np.where(m.leaves > 0, m.leaves, np.inf)
            np.testing.assert_allclose(ps.min_tree[k], reference_tree(mins, geo, np.min, np.inf),
                                       rtol=1e-5, atol=0, err_msg=f"shard {k}: min tree")
        np.testing.assert_allclose(ps.max_priority, [m.max_priority for m in self.models],
                                   rtol=1e-6)

    def check_sample(self, s, sampling: str) -> None:
        """Every sampled item is a valid item with exactly its steps; a prioritised sample's
        indices, versions, priorities and probabilities (of the sampling mode's law) are the
        model's; a local sample's share b of the batch comes from shard b // (B / S)."""
        s = jax.device_get(s)
        b_total = s.experience["step"].shape[0]
        total = self.leaves().sum() if self.prioritised else None
        for b, first in enumerate(s.experience["step"][:, 0].tolist()):
            k, r, t = self.item(first)
            m = self.models[k]
            assert m.is_valid(r, t), f"sample[{b}]: item {first} is not valid"
            steps = m.steps(r, t)
            np.testing.assert_array_equal(s.experience["step"][b], steps)
            np.testing.assert_array_equal(s.experience["obs"][b], [self.obs[i] for i in steps])
            if sampling == "local":
                assert k == b // (b_total // S), f"sample[{b}] is from shard {k}"
            if not self.prioritised:
                continue
            leaf = m.leaf(r, t)
            assert int(s.indices[b]) == k * ITEMS + leaf and int(s.versions[b]) == t
            np.testing.assert_allclose(s.priorities[b], m.leaves[leaf], rtol=1e-5)
            law = S * m.leaves.sum() if sampling == "local" else total
            np.testing.assert_allclose(s.probabilities[b], m.leaves[leaf] / law, rtol=1e-5)


# ------------------------------------------------------------------------ HLO collectives
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(\(.*?\)|\S+)\s+([\w\-]+)\((.*?)\)")
_KINDS = ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter")


def _dims(hlo_type: str) -> list[tuple[int, ...]]:
    return [tuple(int(d) for d in s.split(",") if d)
            for s in re.findall(r"[a-z]+\d*\[([\d,]*)\]", hlo_type)]


def collectives(compiled) -> list[tuple[str, list[tuple[int, ...]]]]:
    """`(kind, operand shapes)` of every cross-device collective in a compiled program."""
    types, found = {}, []
    for line in compiled.as_text().splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, hlo_type, op, operands = m.groups()
        types[name] = hlo_type
        kind = next((k for k in _KINDS if op in (k, k + "-start")), None)
        if kind is not None:
            names = re.findall(r"%([\w.\-]+)", operands)
            found.append((kind, [d for n in names for d in _dims(types.get(n, ""))]))
    return found


@pytest.fixture(scope="module")
def filled_and_expected(mesh):
    """`{prioritised: (state, Expected)}`: sharded states after a few adds (the time axis
    wrapped), and the reference model of each."""
    out = {}
    for prioritised in (False, True):
        sb = sharding.shard(_buffer(prioritised), mesh)
        state, expected = sb.init(EXAMPLE), Expected(prioritised)
        add = jax.jit(sb.add, donate_argnums=0)
        for i in range(4):
            batch = _rows(3 * i, 3, seed=i)
            state = add(state, _put(mesh, batch))
            expected.add(batch)
        out[prioritised] = (state, expected)
    return out


@pytest.fixture(scope="module")
def filled(filled_and_expected):
    return {k: state for k, (state, _) in filled_and_expected.items()}


@pytest.mark.parametrize("prioritised", [False, True], ids=["uniform", "prioritised"])
def test_filled_state_is_the_reference(filled_and_expected, prioritised):
    state, expected = filled_and_expected[prioritised]
    expected.check_state(state)


@pytest.mark.parametrize("prioritised", [False, True], ids=["uniform", "prioritised"])
def test_compiled_collectives(mesh, filled, prioritised):
    state, key = filled[prioritised], jax.random.key(0)
    local = sharding.shard(_buffer(prioritised), mesh, sampling="local")
    glob = sharding.shard(_buffer(prioritised), mesh, sampling="global")
    batch = _put(mesh, _rows(0, 3))
    assert collectives(jax.jit(local.add, donate_argnums=0).lower(state, batch).compile()) == []

    sample = jax.jit(local.sample)
    assert collectives(sample.lower(state, key).compile()) == []
    # Checkified, prioritised sampling asks every shard whether its total priority is
    # positive: a scalar all-reduce (uniform shards all know it already).
    checked = jax.jit(checkify.checkify(local.sample, errors=checkify.user_checks))
    found = collectives(checked.lower(state, key).compile())
    assert all(k == "all-reduce" and all(s == () for s in shapes) for k, shapes in found), found
    assert len(found) == (1 if prioritised else 0)
    # can_sample itself: uniform shards know it from the replicated write position.
    for sb in (local, glob):
        found = collectives(jax.jit(sb.can_sample).lower(state).compile())
        assert found == ([("all-reduce", [()])] if prioritised else []), found

    # Global sampling moves only the sampled items (reduce-scatter of [B, ...]) and, when
    # prioritised, the S shard totals; never anything of the buffer's size.
    found = collectives(jax.jit(glob.sample).lower(state, key).compile())
    kinds = {k for k, _ in found}
    assert kinds == ({"reduce-scatter", "all-gather"} if prioritised else {"reduce-scatter"})
    for kind, shapes in found:
        for shape in shapes:
            if kind == "all-gather":
                assert shape in ((), (1,)), (kind, shape)  # one float per shard
            else:
                assert shape[0] == B and int(np.prod(shape)) <= B * 2 * 2, (kind, shape)

    if prioritised:
        s = sample(state, key)
        update = jax.jit(local.set_priorities, donate_argnums=0).lower(
            state, s.indices, s.priorities, s.versions)
        assert collectives(update.compile()) == []
        # The parser does see collectives: gathering the indices for global updates.
        found = collectives(jax.jit(glob.set_priorities).lower(
            state, s.indices, s.priorities, s.versions).compile())
        assert {k for k, _ in found} == {"all-gather"}


# ----------------------------------------------------------------------------- metadata
def test_partition_metadata(mesh):
    sb = sharding.shard(_buffer(True), mesh)
    state = sb.init(EXAMPLE)
    rows, tree = P("data", None), P("data", None)
    expected = {
        "replay": {"experience": {"obs": P("data", None, None), "step": rows, "done": rows},
                   "current_index": P(), "is_full": P(), "running_index": P()},
        "priorities": {"sum_tree": tree, "min_tree": tree, "max_priority": P("data")},
    }
    specs = jax.tree.map(lambda x: x.sharding.spec, flax_replay.to_collections(state))
    assert specs == expected
    assert state.priority_state.sum_tree.shape[0] == S

    # Linen: nn.Partitioned boxes; get_partition_spec / get_sharding / jit out_shardings.
    module = flax_replay.linen.ReplayBuffer(buffer=sb, experience=EXAMPLE, partition="data")
    abstract = jax.eval_shape(module.init, jax.random.key(0))
    assert nn.get_partition_spec(abstract) == expected
    variables = jax.jit(module.init, out_shardings=nn.get_sharding(abstract, mesh))(
        jax.random.key(0))
    assert jax.tree.map(lambda x: x.sharding.spec, nn.unbox(variables)) == expected

    @jax.jit
    def add_and_sample(variables, batch, key):
        _, variables = module.apply(variables, batch, method="add",
                                    mutable=["replay", "priorities"])
        return variables, module.apply(variables, key, method="sample")

    variables, s = add_and_sample(variables, _put(mesh, _rows(0, 3)), jax.random.key(1))
    assert nn.get_partition_spec(variables) == expected
    assert s.indices.sharding.spec == P("data")

    # NNX: out_sharding metadata (the experience Variable's leaves share the row axis).
    model = flax_replay.nnx.ReplayBuffer(sb, EXAMPLE, sharding="data")
    specs = nnx.get_partition_spec(nnx.state(model))
    assert specs["experience"].get_value() == P("data")
    assert specs["sum_tree"].get_value() == tree and specs["max_priority"].get_value() == P("data")
    assert specs["current_index"].get_value() == P()

    @nnx.jit(donate_argnums=0)
    def nnx_add(model, batch):
        model.add(batch)

    nnx_add(model, _put(mesh, _rows(0, 3)))
    assert int(model.current_index[...]) == 3
    assert model.experience.get_value()["obs"].sharding.spec == P("data", None, None)

    # An unsharded buffer with partition metadata: one replicated tree.
    plain = flax_replay.linen.ReplayBuffer(buffer=_buffer(True), experience=EXAMPLE,
                                           partition="data")
    specs = nn.get_partition_spec(jax.eval_shape(plain.init, jax.random.key(0)))
    assert specs["priorities"]["sum_tree"] == P(None)
    assert specs["replay"]["experience"]["step"] == rows


# ------------------------------------------------------------ agreement with the reference
# No shrinking: slow.
@settings(max_examples=6, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(seeds=st.lists(st.integers(0, 2**16), min_size=2, max_size=4),
       scale=st.floats(0.1, 10.0))
def test_sharded_buffer_matches_the_reference(mesh, seeds, scale):
    """Adds, local samples and priority updates from those samples: after each step the
    sharded state is what the reference model says (experience, write position, every node
    of each shard's trees, each shard's max priority), and every sampled item is a valid
    item with its data, single-device leaf index, version, priority and probability."""
    sb = sharding.shard(_buffer(True), mesh, sampling="local")
    add, sample, update = _jitted(sb)
    state, expected = sb.init(EXAMPLE), Expected(True)
    for i, seed in enumerate(seeds):
        batch = _rows(3 * i, 3, seed)
        state = add(state, _put(mesh, batch))
        expected.add(batch)
        expected.check_state(state)
        s = sample(state, jax.random.key(seed))
        expected.check_sample(s, "local")
        new = _put(mesh, scale * jax.random.uniform(jax.random.key(seed + 1), (B,)))
        state = update(state, s.indices, new, s.versions)
        expected.set_priorities(s.indices, new, s.versions)
        expected.check_state(state)


_JITTED: dict = {}


def _jitted(sb):
    if sb not in _JITTED:  # compile once for every hypothesis example
        _JITTED[sb] = (jax.jit(sb.add, donate_argnums=0), jax.jit(sb.sample),
                       jax.jit(sb.set_priorities, donate_argnums=0))
    return _JITTED[sb]


@pytest.fixture(scope="module")
def skewed(mesh, filled_and_expected):
    """`{prioritised: (sharded state, single-device state, Expected)}` after the same adds,
    with very unequal priorities (shard 0's items about 10x more likely) set on every item."""
    out = {}
    for prioritised in (False, True):
        single = _buffer(prioritised)
        ref = single.init(EXAMPLE)
        add = jax.jit(single.add, donate_argnums=0)
        for i in range(4):
            ref = add(ref, _rows(3 * i, 3, seed=i))
        state, expected = filled_and_expected[prioritised]
        expected = copy.deepcopy(expected)
        if prioritised:
            n = R * T
            idx = jnp.arange(n)
            p = 1.0 + (idx * 37 % 11).astype(jnp.float32) + 40.0 * (idx < n // S)
            state = sharding.shard(single, mesh, sampling="global").set_priorities(state, idx, p)
            ref = jax.jit(single.set_priorities)(ref, idx, p)
            expected.set_priorities(idx, p)
            expected.check_state(state)
        out[prioritised] = (state, ref, expected)
    return out


def test_global_uniform_sample_is_the_single_device_sample(mesh, skewed):
    sb = sharding.shard(_buffer(False), mesh, sampling="global")
    state, ref, _ = skewed[False]
    for seed in range(3):
        key = jax.random.key(seed)
        got, want = jax.jit(sb.sample)(state, key), jax.jit(sb.buffer.sample)(ref, key)
        jax.tree.map(np.testing.assert_array_equal, got.experience, want.experience)


def test_reshard_and_unshard_round_trip(mesh, skewed):
    """Unsharded -> sharded -> unsharded keeps every leaf and the exact trees, on 8 and 2
    devices."""
    _, ref, _ = skewed[True]
    for devices in (8, 2):
        sub = jax.make_mesh((devices,), ("data",), (AxisType.Explicit,),
                            devices=jax.devices()[:devices])
        sb = sharding.shard(_buffer(True), sub)
        state = sb.reshard(ref)
        assert state.priority_state.sum_tree.shape[0] == devices
        assert state.priority_state.sum_tree.sharding.spec == P("data", None)
        jax.tree.map(np.testing.assert_array_equal, sb.unshard(state), ref)


# ---------------------------------------------------------------- sampling distributions
def _counts(sample_fn, state, n_keys: int, num_items: int, slots: int) -> np.ndarray:
    indices = []
    for seed in range(n_keys):
        s = sample_fn(state, jax.random.key(seed))
        indices.append(np.asarray(s.indices) if hasattr(s, "indices") else
                       _uniform_index(s, slots))
    return np.bincount(np.concatenate(indices), minlength=num_items)


def _uniform_index(s, slots):
    """The leaf index (row * slots + slot) of a uniform sample's items, from their content."""
    step = np.asarray(s.experience["step"][:, 0])
    return (step // 100) * slots + (step % 100) % T


@pytest.mark.parametrize("prioritised", [False, True], ids=["uniform", "prioritised"])
def test_global_sampling_matches_the_reference_distribution(mesh, skewed, prioritised):
    """Global sampling draws the whole buffer's law: uniform over the model's valid items, or
    leaf / total; never anything else (chi-square over 16 x 512 draws)."""
    sb = sharding.shard(_buffer(prioritised, "independent", 512), mesh, sampling="global")
    state, _, model = skewed[prioritised]
    n = R * T
    if prioritised:
        leaves = model.leaves()
    else:
        leaves = np.zeros(n)
        leaves[model.valid_leaves()] = 1.0
    expected = leaves / leaves.sum()
    counts = _counts(jax.jit(sb.sample), state, 16, n, T)
    support = expected > 0
    assert counts[~support].sum() == 0
    chi2, p = stats.chisquare(counts[support], _expected(counts, expected, support))
    print(f"global {'prioritised' if prioritised else 'uniform'}: chi2={chi2:.1f}, p={p:.3f}")
    assert p > 1e-3
    s = jax.jit(sb.sample)(state, jax.random.key(0))
    model.check_sample(s, "global")
    if prioritised:
        # Weights (N P(i))^-beta normalised by the largest in the buffer: (P(i) / P_min)^-beta.
        p_min = expected[support].min()
        np.testing.assert_allclose(sb.importance_weights(state, s, 0.5),
                                   (expected[np.asarray(s.indices)] / p_min) ** -0.5, rtol=1e-5)


def test_local_sampling_is_per_shard(mesh, skewed):
    """Local sampling draws B/S items of each shard from its own tree: shard k's share of
    the batch has probabilities leaf / (S total_k), which the skewed buffer makes differ
    from the global distribution (and the chi-square test sees it)."""
    state, _, model = skewed[True]
    local = sharding.shard(_buffer(True, "independent", 512), mesh, sampling="local")
    per_shard = model.leaves().reshape(S, -1)
    expected = (per_shard / per_shard.sum(1, keepdims=True) / S).reshape(-1)
    sample = jax.jit(local.sample)
    s = sample(state, jax.random.key(0))
    model.check_sample(s, "local")
    counts = _counts(sample, state, 8, R * T, T)
    support = expected > 0
    _, p_local = stats.chisquare(counts[support], _expected(counts, expected, support))
    glob = model.leaves() / model.leaves().sum()
    _, p_global = stats.chisquare(counts[support], _expected(counts, glob, support))
    print(f"local sampling: p={p_local:.3f} vs its own law, p={p_global:.2e} vs the global law")
    assert p_local > 1e-3 and p_global < 1e-6
    w = np.asarray(local.importance_weights(state, s, 0.5))
    p_min = expected[support].min()
    np.testing.assert_allclose(w, (np.asarray(s.probabilities) / p_min) ** -0.5, rtol=1e-5)


# ------------------------------------------------------------------------------- errors
def test_errors(mesh, filled):
    with pytest.raises(ValueError, match="add_batch_size"):
        sharding.shard(flax_replay.make_prioritised_flat_buffer(64, 4, 8, add_batch_size=12),
                       mesh)
    with pytest.raises(ValueError, match="sample_batch_size"):
        sharding.shard(_buffer(True, batch=12), mesh)
    with pytest.raises(ValueError, match="item buffers"):
        sharding.shard(flax_replay.make_item_buffer(64, 4, 8), mesh)
    with pytest.raises(ValueError, match="no axis 'rows'"):
        sharding.shard(_buffer(True), mesh, axis="rows")

    sb = sharding.shard(_buffer(True), mesh)
    with pytest.raises(ValueError, match="num_shards"):
        sb.abstract_state(EXAMPLE, num_shards=3)
    empty = sb.init(EXAMPLE)
    with pytest.raises(ValueError, match="cannot be sampled yet"):
        sb.sample(empty, jax.random.key(0))
    err, _ = checkify.checkify(jax.jit(sb.sample), errors=checkify.user_checks)(
        empty, jax.random.key(0))
    with pytest.raises(checkify.JaxRuntimeError, match="cannot be sampled yet"):
        jax.device_get(err).throw()  # device_get: the error may be sharded (Explicit axes)
    with pytest.raises(ValueError, match="shape"):
        sb.add(empty, _put(mesh, jax.tree.map(lambda x: x[:, :, None], _rows(0, 2))))

    state = filled[True]
    s = jax.jit(sb.sample)(state, jax.random.key(0))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 128\)"):
        sb.set_priorities(state, s.indices + 1000, s.priorities)
    with pytest.raises(ValueError, match="finite and >= 0"):
        sb.set_priorities(state, s.indices, -s.priorities)
    # Local updates must reach the shard that sampled them; reversed, none does.
    update = checkify.checkify(jax.jit(sb.set_priorities), errors=checkify.user_checks)
    err, new = update(state, s.indices[::-1], s.priorities + 1.0)
    with pytest.raises(checkify.JaxRuntimeError, match="not on the shard"):
        jax.device_get(err).throw()
    jax.tree.map(np.testing.assert_array_equal, new.priority_state, state.priority_state)


def _expected(counts: np.ndarray, probabilities: np.ndarray, support: np.ndarray) -> np.ndarray:
    """Expected counts on `support`, summing exactly to the observed total (float64)."""
    p = np.asarray(probabilities, np.float64)[support]
    return counts.sum() * p / p.sum()


def test_checkpoint_restores_sharded_prioritised_state_and_checks_each_shards_tree(
        mesh, tmp_path):
    """`flax_replay.checkpoint` saves and restores a sharded prioritised buffer (one tree per
    shard) in a TrainState, into the template's shardings, bit for bit; the restore-time
    invariant check runs on every shard's tree and names the shard whose tree is broken."""
    import optax

    from flax_replay import checkpoint as ckpt
    from flax_replay._src import integrity

    sb = sharding.shard(_buffer(True), mesh, sampling="local")
    state = jax.jit(sb.add)(sb.init(EXAMPLE), _put(mesh, _rows(0, 5)))
    cols = flax_replay.to_collections(state)
    train = flax_replay.TrainState.create(apply_fn=None, params={"w": jnp.ones(3)},
                                          tx=optax.sgd(0.1), replay={"b": cols["replay"]},
                                          priorities={"b": cols["priorities"]})
    manager = ckpt.make_manager(tmp_path)
    ckpt.save(manager, 1, train, jax.random.key(1))
    manager.wait_until_finished()
    template = jax.tree.map(jnp.zeros_like, train)
    restored, _, step = ckpt.restore(manager, template, jax.random.key(0))
    assert step == 1
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(train)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves((restored.replay, restored.priorities)),
                    jax.tree.leaves((train.replay, train.priorities))):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (a.sharding, b.sharding)
    # One shard's leaf made negative: found, and that shard named.
    prio = jax.tree.map(np.asarray, cols["priorities"])
    assert integrity.buffer_problems(cols["replay"], prio) == []
    sums = prio["sum_tree"].copy()
    sums[3, -1] = -1.0
    problems = integrity.buffer_problems(cols["replay"], {**prio, "sum_tree": sums})
    assert problems and all(p.startswith("priorities: tree (3,): ") for p in problems), problems
