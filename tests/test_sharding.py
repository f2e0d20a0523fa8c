"""Sharded buffers on 8 host devices (conftest): layout metadata, the collectives in the
compiled programs, agreement with single-device buffers, and the sampling distributions."""

from __future__ import annotations

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
def filled(mesh):
    """Sharded prioritised and uniform states after a few adds (the time axis wrapped)."""
    out = {}
    for prioritised in (False, True):
        sb = sharding.shard(_buffer(prioritised), mesh)
        state = sb.init(EXAMPLE)
        add = jax.jit(sb.add, donate_argnums=0)
        for i in range(4):
            state = add(state, _put(mesh, _rows(3 * i, 3, seed=i)))
        out[prioritised] = state
    return out


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


# ------------------------------------------------------------ agreement with one device
@settings(max_examples=6, phases=[Phase.explicit, Phase.reuse, Phase.generate])  # no shrinking: slow
@given(seeds=st.lists(st.integers(0, 2**16), min_size=2, max_size=4),
       scale=st.floats(0.1, 10.0))
def test_sharded_state_is_its_shards(mesh, seeds, scale):
    """The sharded state is the single-device buffer's experience, and shard k's trees are
    those of an independent single-device buffer holding rows [k R/S, (k+1) R/S); sampled
    indices are single-device leaf indices."""
    sb = sharding.shard(_buffer(True), mesh, sampling="local")
    single, local = sb.buffer, sb.local
    r = R // S
    state = sb.init(EXAMPLE)
    ref = single.init(EXAMPLE)
    shards = [local.init(EXAMPLE) for _ in range(S)]
    add, sample, update, local_add, local_update, single_add, gather = _jitted(sb)
    per, items = B // S, local.core.num_items
    for i, seed in enumerate(seeds):
        batch = _rows(3 * i, 3, seed)
        state = add(state, _put(mesh, batch))
        ref = single_add(ref, batch)
        shards = [local_add(sh, jax.tree.map(lambda x, k=k: x[k * r:(k + 1) * r], batch))
                  for k, sh in enumerate(shards)]
        s = sample(state, jax.random.key(seed))
        new = _put(mesh, scale * jax.random.uniform(jax.random.key(seed + 1), (B,)))
        state = update(state, s.indices, new, s.versions)
        idx, new, ver = (np.asarray(x) for x in (s.indices, new, s.versions))
        shards = [local_update(sh, idx[k * per:(k + 1) * per] - k * items,
                               new[k * per:(k + 1) * per], ver[k * per:(k + 1) * per])
                  for k, sh in enumerate(shards)]
        # The sample's items are the single-device items at those leaf indices.
        slots = local.core.slots_per_row
        row, slot = np.asarray(s.indices) // slots, np.asarray(s.indices) % slots
        np.testing.assert_array_equal(
            s.experience["step"], gather(ref.experience, row, slot)["step"])
    jax.tree.map(np.testing.assert_array_equal, state.experience, ref.experience)
    for name in ("current_index", "is_full", "running_index"):
        assert int(getattr(state, name)) == int(getattr(ref, name))
    for field in ("sum_tree", "min_tree", "max_priority"):
        expected = np.stack([getattr(sh.priority_state, field) for sh in shards])
        np.testing.assert_array_equal(getattr(state.priority_state, field), expected)


_JITTED: dict = {}


def _jitted(sb):
    if sb not in _JITTED:  # compile once for every hypothesis example
        _JITTED[sb] = (jax.jit(sb.add, donate_argnums=0), jax.jit(sb.sample),
                       jax.jit(sb.set_priorities, donate_argnums=0),
                       jax.jit(sb.local.add), jax.jit(sb.local.set_priorities),
                       jax.jit(sb.buffer.add), jax.jit(sb.buffer.core.gather))
    return _JITTED[sb]


@pytest.fixture(scope="module")
def skewed(mesh, filled):
    """`{prioritised: (sharded state, single-device state)}` after the same adds, with very
    unequal priorities (shard 0's items about 10x more likely) set on every item of both."""
    out = {}
    for prioritised in (False, True):
        single = _buffer(prioritised)
        ref = single.init(EXAMPLE)
        add = jax.jit(single.add, donate_argnums=0)
        for i in range(4):
            ref = add(ref, _rows(3 * i, 3, seed=i))
        state = filled[prioritised]
        if prioritised:
            n = single.core.num_items
            idx = jnp.arange(n)
            p = 1.0 + (idx * 37 % 11).astype(jnp.float32) + 40.0 * (idx < n // S)
            state = sharding.shard(single, mesh, sampling="global").set_priorities(state, idx, p)
            ref = jax.jit(single.set_priorities)(ref, idx, p)
        out[prioritised] = (state, ref)
    return out


def test_global_uniform_sample_is_the_single_device_sample(mesh, skewed):
    sb = sharding.shard(_buffer(False), mesh, sampling="global")
    state, ref = skewed[False]
    for seed in range(3):
        key = jax.random.key(seed)
        got, want = jax.jit(sb.sample)(state, key), jax.jit(sb.buffer.sample)(ref, key)
        jax.tree.map(np.testing.assert_array_equal, got.experience, want.experience)


def test_reshard_and_unshard_round_trip(mesh, skewed):
    """Unsharded -> sharded -> unsharded keeps every leaf and the exact trees, on 8 and 2
    devices."""
    _, ref = skewed[True]
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
def test_global_sampling_matches_single_device(mesh, skewed, prioritised):
    sb = sharding.shard(_buffer(prioritised, "independent", 512), mesh, sampling="global")
    state, ref = skewed[prioritised]
    core = sb.buffer.core
    n, slots = core.num_items, core.slots_per_row
    if prioritised:
        leaves = np.asarray(sum_tree.leaves(ref.priority_state.sum_tree, core.tree_geometry))
    else:
        lo, count = core.valid_window(core.written(ref))
        starts = (int(lo) + np.arange(int(count))) % T
        leaves = np.zeros(n)
        leaves[(np.arange(R)[:, None] * slots + starts).reshape(-1)] = 1.0
    expected = leaves / leaves.sum()
    counts = _counts(jax.jit(sb.sample), state, 16, n, slots)
    support = expected > 0
    assert counts[~support].sum() == 0
    chi2, p = stats.chisquare(counts[support], _expected(counts, expected, support))
    print(f"global {'prioritised' if prioritised else 'uniform'}: chi2={chi2:.1f}, p={p:.3f}")
    assert p > 1e-3
    if prioritised:
        s = jax.jit(sb.sample)(state, jax.random.key(0))
        np.testing.assert_allclose(s.probabilities, expected[np.asarray(s.indices)], rtol=1e-5)
        # The same through the single-device weights formula.
        s_ref = s.replace(priorities=jnp.asarray(leaves[np.asarray(s.indices)]))
        want = sb.buffer.importance_weights(ref, s_ref, 0.5)
        np.testing.assert_allclose(sb.importance_weights(state, s, 0.5), want, rtol=1e-5)


def test_local_sampling_is_per_shard(mesh, skewed):
    """Local sampling draws B/S items of each shard from its own tree: shard k's share of
    the batch has probabilities leaf / (S total_k), which the skewed buffer makes differ
    from the global distribution (and the chi-square test sees it)."""
    state, ref = skewed[True]
    sb = sharding.shard(_buffer(True, "independent", 512), mesh, sampling="global")
    local = sharding.shard(sb.buffer, mesh, sampling="local")
    core, lc = sb.buffer.core, local.local.core
    leaves = np.asarray(sum_tree.leaves(ref.priority_state.sum_tree, core.tree_geometry))
    per_shard = leaves.reshape(S, -1)
    expected = (per_shard / per_shard.sum(1, keepdims=True) / S).reshape(-1)
    sample = jax.jit(local.sample)
    s = sample(state, jax.random.key(0))
    owner = np.asarray(s.indices) // lc.num_items
    np.testing.assert_array_equal(owner, np.arange(512) // (512 // S))
    np.testing.assert_allclose(s.probabilities, expected[np.asarray(s.indices)], rtol=1e-5)
    counts = _counts(sample, state, 8, core.num_items, core.slots_per_row)
    support = expected > 0
    _, p_local = stats.chisquare(counts[support], _expected(counts, expected, support))
    glob = leaves / leaves.sum()
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
    with pytest.raises(Exception, match="cannot be sampled yet"):
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
    with pytest.raises(Exception, match="not on the shard"):
        jax.device_get(err).throw()
    jax.tree.map(np.testing.assert_array_equal, new.priority_state, state.priority_state)


def _expected(counts: np.ndarray, probabilities: np.ndarray, support: np.ndarray) -> np.ndarray:
    """Expected counts on `support`, summing exactly to the observed total (float64)."""
    p = np.asarray(probabilities, np.float64)[support]
    return counts.sum() * p / p.sum()
