"""Vaults: Flashbax 0.1.3's on-disk format both ways, incremental writes across wraps, reads,
streaming, loading into buffers, and bad input. Every expectation is computed from the known
stream of steps that was added (step k of row r carries the value 1000 r + k)."""

from __future__ import annotations

import glob
import json
import os
import shutil
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flashbax.vault import Vault as FlashbaxVault
from hypothesis import given, settings
from hypothesis import strategies as st

import flax_replay as fbx
from flax_replay._src import sum_tree
from flax_replay.vault import Vault, VaultError


class Inner(NamedTuple):
    reward: jnp.ndarray
    done: jnp.ndarray


def step_tree(values: np.ndarray) -> dict:
    """A nested experience whose every leaf is a function of the step value `values`."""
    v = np.asarray(values)  # NumPy, not jnp: eager JAX ops would compile for every shape
    return {
        "obs": (v[..., None] + np.arange(3)).astype(np.float32),
        "extras": {"inner": Inner(reward=(v * 0.5).astype(np.float32), done=v % 7 == 0)},
        "action": (v % 5).astype(np.int32),
    }


EXAMPLE = jax.tree.map(lambda x: x[0, 0], step_tree(np.zeros((1, 1))))
ROWS = 2


def rows_of(start: int, a: int) -> dict:
    """`[ROWS, a]` steps start..start+a of every row."""
    k = np.arange(start, start + a)
    return step_tree(1000 * np.arange(ROWS)[:, None] + k[None, :])


def expected(lo: int, hi: int) -> dict:
    """The experience of steps lo..hi of every row, as a vault holds it."""
    return jax.tree.map(np.asarray, rows_of(lo, hi - lo))


def assert_tree_equal(a, b) -> None:
    """Equal leaves under the same key paths (NamedTuples compared as the dicts they read as)."""
    a, b = as_dict(a), as_dict(b)
    fa, ta = jax.tree_util.tree_flatten_with_path(a)
    fb, _ = jax.tree_util.tree_flatten_with_path(b)
    assert len(fa) == len(fb), (ta, jax.tree_util.tree_structure(b))
    for (pa, xa), (_, xb) in zip(fa, fb):
        np.testing.assert_array_equal(np.asarray(xa), np.asarray(xb),
                                      err_msg=jax.tree_util.keystr(pa))


def as_dict(tree):
    """A NamedTuple-bearing tree as the dict tree a vault read without a structure gives."""
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return {k: as_dict(v) for k, v in tree._asdict().items()}
    if isinstance(tree, dict):
        return {k: as_dict(v) for k, v in tree.items()}
    return tree


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


TRAJ = fbx.make_trajectory_buffer(max_length_time_axis=8, min_length_time_axis=2,
                                  sample_batch_size=2, add_batch_size=ROWS,
                                  sample_sequence_length=2, period=1)
ADD = jax.jit(TRAJ.add, donate_argnums=0)


def run(adds, write_every=1, vaults=()):
    """Adds sequences of the lengths in `adds`, writing every vault after every
    `write_every` adds; returns the final state and the number of steps added."""
    state, k = TRAJ.init(EXAMPLE), 0
    for i, a in enumerate(adds):
        state = ADD(state, rows_of(k, a))
        k += a
        if (i + 1) % write_every == 0:
            for v in vaults:
                v.write(state)
    return state, k


# ------------------------------------------------------------------------- Flashbax format
def test_same_format_both_ways_across_wraps(in_tmp):
    state0 = TRAJ.init(EXAMPLE)
    ours = Vault("v", state0.experience, vault_uid="ours", metadata={"env": "x", "n": 3})
    theirs = FlashbaxVault("v", state0.experience, vault_uid="fbx", metadata={"env": "x", "n": 3})
    # Lengths 3, 5, 7 cross the 8-step time axis at every phase, never 8 at once.
    adds = [3, 5, 7, 5, 3, 7, 7, 3]
    _, k = run(adds, vaults=(ours, theirs))
    assert ours.vault_index == theirs.vault_index == k
    meta = {u: open(in_tmp / "vaults" / "v" / u / "metadata.json").read() for u in ("ours", "fbx")}
    assert meta["ours"] == meta["fbx"]
    assert json.loads(meta["ours"])["env"] == "x"
    # Each reads the other's vault: all k steps, in order, nested leaves intact.
    want = expected(0, k)
    assert_tree_equal(Vault("v", vault_uid="fbx").read().experience, as_dict(want))
    assert_tree_equal(Vault("v", EXAMPLE_STATE_EXPERIENCE(), vault_uid="fbx").read().experience,
                      want)
    assert_tree_equal(FlashbaxVault("v", vault_uid="ours").read().experience, as_dict(want))
    # The arrays' own (zarr) metadata: dtype, shape, chunks, compressor, fill value.
    ours_store = Vault("v", vault_uid="ours")._stores
    fbx_store = Vault("v", vault_uid="fbx")._stores
    for a, b in zip(ours_store, fbx_store):
        assert a.spec().to_json()["metadata"] == b.spec().to_json()["metadata"]


def EXAMPLE_STATE_EXPERIENCE():
    return TRAJ.init(EXAMPLE).experience


def test_partial_reads_match_flashbax(in_tmp):
    state0 = TRAJ.init(EXAMPLE)
    ours = Vault("v", state0.experience, vault_uid="a")
    theirs = FlashbaxVault("v", state0.experience, vault_uid="b")
    _, k = run([5, 6, 7, 3], vaults=(ours, theirs))
    for kw in ({"timesteps": 4}, {"timesteps": k}, {"percentiles": (10, 60)},
               {"percentiles": (0, 100)}):
        a, b = ours.read(**kw).experience, theirs.read(**kw).experience
        assert_tree_equal(as_dict(a), b)
    lo, hi = int(k * 0.1), int(k * 0.6)
    assert_tree_equal(ours.read(percentiles=(10, 60)).experience, expected(lo, hi))
    assert_tree_equal(ours.read(timesteps=4).experience, expected(k - 4, k))


def test_first_write_of_an_exactly_full_buffer(in_tmp):
    """Flashbax writes nothing (its issue 66); here all T steps, oldest first."""
    state, k = run([3, 5, 8, 4, 4])  # k = 24: full, current_index 0
    assert bool(state.is_full) and int(state.current_index) == 0
    theirs = FlashbaxVault("v", state.experience, vault_uid="fbx")
    assert theirs.write(state) == 0
    ours = Vault("v", state.experience, vault_uid="ours")
    assert ours.write(state) == 8
    assert_tree_equal(ours.read().experience, expected(k - 8, k))
    # Full and wrapped mid-axis: oldest first too.
    state, k = run([3, 5, 8, 4, 3])
    v = Vault("v", state.experience, vault_uid="mid")
    assert v.write(state) == 8
    assert_tree_equal(v.read().experience, expected(k - 8, k))
    # Read back by Flashbax.
    assert_tree_equal(FlashbaxVault("v", vault_uid="mid").read().experience,
                      as_dict(expected(k - 8, k)))


def test_reopened_vault_appends(in_tmp):
    state, k = run([4])
    Vault("v", state.experience, vault_uid="u").write(state)
    # A new run (a fresh buffer) appends after what is on disk.
    again = Vault("v", state.experience, vault_uid="u")
    assert again.vault_index == 4
    state2, _ = run([3])
    assert again.write(state2) == 3
    got = again.read().experience
    assert_tree_equal(got, jax.tree.map(lambda a, b: np.concatenate([a, b], 1),
                                        expected(0, 4), expected(0, 3)))


def test_explicit_interval_and_dest_as_flashbax(in_tmp):
    state, _ = run([6, 5])  # steps 8, 9, 10 at time indices 0..2; steps 3..7 at 3..7
    ours = Vault("v", state.experience, vault_uid="a")
    theirs = FlashbaxVault("v", state.experience, vault_uid="b")
    for v in (ours, theirs):
        assert v.write(state, source_interval=(6, 2)) == 4  # wraps
        assert v.write(state, source_interval=(0, 2), dest_start=1) == 2
    # The same 4 steps at the same places. (Flashbax then counts 6 steps, the last 2 never
    # written; here the vault still ends at 4, as positions 1..3 were rewritten in place.)
    assert ours.vault_index == 4 and theirs.vault_index == 6
    assert_tree_equal(ours.read().experience,
                      jax.tree.map(lambda x: x[:, :4], theirs.read().experience))
    step = np.asarray(ours.read().experience["action"])
    np.testing.assert_array_equal(step[0], np.array([6, 8, 9, 9]) % 5)


# ------------------------------------------------------------------------ lost steps refused
def test_overrun_refused_for_prioritised_state(in_tmp):
    buf = fbx.make_prioritised_trajectory_buffer(
        max_length_time_axis=8, min_length_time_axis=2, sample_batch_size=2,
        add_batch_size=ROWS, sample_sequence_length=2, period=1)
    state = buf.init(EXAMPLE)
    add = jax.jit(buf.add)
    v = Vault("v", state.experience, vault_uid="u")
    state = add(state, rows_of(0, 5))
    v.write(state, buffer=buf)
    state = add(state, rows_of(5, 8))
    assert v.write(state, buffer=buf) == 8  # exactly a time axis: nothing lost
    state = add(state, rows_of(13, 5))
    state = add(state, rows_of(18, 4))  # 9 steps since the last write
    with pytest.raises(VaultError, match="9 steps per row were added since the last write"):
        v.write(state)
    assert v.vault_index == 13
    assert Vault("v", vault_uid="u").vault_index == 13
    assert_tree_equal(v.read().experience, as_dict(expected(0, 13)) | {})


def test_overrun_refused_for_uniform_state(in_tmp):
    state, _ = run([5])
    v = Vault("v", state.experience, vault_uid="u")
    v.write(state)
    state = ADD(state, rows_of(5, 6))  # wraps from 5 to 3: 6 steps, fine
    assert v.write(state) == 6
    w = Vault("v", TRAJ.init(EXAMPLE).experience, vault_uid="w")
    state, _ = run([5])
    w.write(state)
    state = ADD(state, rows_of(5, 8))
    state = ADD(state, rows_of(13, 1))  # from 5 (not full) past a whole axis to 6
    with pytest.raises(VaultError, match="more than the buffer's time axis"):
        w.write(state)
    # A full buffer cannot tell wraps apart alone: `written=` makes the check exact.
    x = Vault("v", TRAJ.init(EXAMPLE).experience, vault_uid="x")
    state, k = run([8, 2])
    x.write(state, written=k)
    state = ADD(state, rows_of(k, 8))
    state = ADD(state, rows_of(k + 8, 3))
    with pytest.raises(VaultError, match="11 steps per row"):
        x.write(state, written=k + 11)
    assert x.vault_index == 8


# ----------------------------------------------------------------------- streaming, loading
def test_iter_chunks_streams_the_vault(in_tmp):
    state0 = TRAJ.init(EXAMPLE)
    v = Vault("v", state0.experience, vault_uid="u")
    _, k = run([5, 7, 3, 7, 5], vaults=(v,))
    chunks = list(v.iter_chunks(6, start=2))
    assert [c["action"].shape[1] for c in chunks] == [6, 6, 6, 6, 1]
    assert_tree_equal(jax.tree.map(lambda *xs: np.concatenate(xs, 1), *chunks), expected(2, k))


@pytest.mark.parametrize("capacity", [6, 8, 40])
def test_into_trajectory_and_flat_buffers(in_tmp, capacity):
    state0 = TRAJ.init(EXAMPLE)
    v = Vault("v", state0.experience, vault_uid="u")
    _, k = run([5, 7, 3, 7], vaults=(v,))  # k = 22
    buf = fbx.make_trajectory_buffer(max_length_time_axis=capacity, min_length_time_axis=3,
                                     sample_batch_size=4, add_batch_size=ROWS,
                                     sample_sequence_length=3, period=1)
    s = v.into_buffer(buf)
    m = min(k, capacity)
    assert int(s.current_index) == m % capacity and bool(s.is_full) == (k >= capacity)
    assert_tree_equal(jax.tree.map(lambda x: np.asarray(x)[:, :m], s.experience),
                      expected(k - m, k))
    # Samples are runs of consecutive steps of one row (value 1000 r + step).
    a = np.asarray(buf.sample(s, jax.random.key(0)).experience["obs"][..., 0])
    assert np.all(np.diff(a, axis=1) == 1) and np.all(a % 1000 >= k - m)
    flat = fbx.make_flat_buffer(max_length=ROWS * capacity, min_length=2, sample_batch_size=4,
                                add_batch_size=ROWS)
    f = v.into_buffer(flat, timesteps=10)
    m = min(10, capacity)
    assert int(f.current_index) == m % capacity and bool(f.is_full) == (m >= capacity)
    pair = flat.sample(f, jax.random.key(1)).experience
    np.testing.assert_array_equal(pair.second["obs"] - pair.first["obs"], 1)


def test_into_item_buffer_time_major(in_tmp):
    v = Vault("v", TRAJ.init(EXAMPLE).experience, vault_uid="u")
    _, k = run([5, 4], vaults=(v,))
    items = fbx.make_item_buffer(max_length=7, min_length=1, sample_batch_size=3)
    s = v.into_buffer(items)
    # Steps 0..8 of two rows in time order (step t of row 0, of row 1, then t + 1): the last 7.
    order = np.asarray(expected(0, k)["action"]).T.reshape(-1)[-7:]
    np.testing.assert_array_equal(np.asarray(s.experience["action"])[0], order)
    assert bool(s.is_full) and int(s.current_index) == 0


def test_prioritised_round_trip_keeps_priorities(in_tmp):
    buf = fbx.make_prioritised_trajectory_buffer(
        max_length_time_axis=8, min_length_time_axis=2, sample_batch_size=2,
        add_batch_size=ROWS, sample_sequence_length=2, period=2, priority_exponent=0.5)
    state = buf.init(EXAMPLE)
    v = Vault("v", state.experience, vault_uid="u")
    rng = np.random.default_rng(0)
    k = 0
    add, set_priorities = jax.jit(buf.add), jax.jit(buf.set_priorities)
    for a in [3, 5, 5, 3]:
        state = add(state, rows_of(k, a))
        k += a
        idx = np.arange(buf.core.num_items, dtype=np.int32)
        state = set_priorities(state, idx, rng.uniform(0.1, 5.0, idx.shape))
        v.write(state, buffer=buf)
    # Flashbax reads it (the priorities are an extra array it ignores).
    assert_tree_equal(FlashbaxVault("v", vault_uid="u").read().experience,
                      as_dict(expected(0, k)))
    # Leaf value of each valid item by (row, absolute start), from the writer's tree.
    geo = buf.core.tree_geometry
    leaves = np.asarray(sum_tree.leaves(state.priority_state.sum_tree, geo))
    lo, n = (int(x) for x in buf.core.valid_window(state.running_index))
    want = {(r, s): leaves[r * 4 + (s % 8) // 2] for r in range(ROWS)
            for s in range(lo, lo + 2 * n, 2)}
    back = v.into_buffer(buf)
    assert int(back.running_index) == 8 and bool(back.is_full)
    got_leaves = np.asarray(sum_tree.leaves(back.priority_state.sum_tree, geo))
    # The loaded buffer holds steps k-8..k at times 0..8; item at time j starts at k-8+j.
    for (r, s), val in want.items():
        assert got_leaves[r * 4 + (s - (k - 8)) // 2] == pytest.approx(val, rel=0, abs=0)
    assert float(back.priority_state.max_priority) == float(state.priority_state.max_priority)
    assert float(sum_tree.root(back.priority_state.sum_tree)) == pytest.approx(
        float(np.sum(got_leaves)), rel=1e-6)
    # Without saved priorities every loaded item gets the new-item priority.
    plain = Vault("v", state.experience, vault_uid="plain")
    plain.write(state)
    fresh = plain.into_buffer(buf)
    lv = np.asarray(sum_tree.leaves(fresh.priority_state.sum_tree, geo))
    np.testing.assert_array_equal(lv[lv > 0], 1.0)


# ------------------------------------------------------------------------------ bad input
def test_missing_vault_without_structure(in_tmp):
    with pytest.raises(VaultError, match="does not exist and no experience_structure"):
        Vault("nope", vault_uid="u")
    assert not os.path.exists(in_tmp / "vaults" / "nope")


def test_mismatched_structure_and_state(in_tmp):
    state, _ = run([4])
    v = Vault("v", state.experience, vault_uid="u")
    v.write(state)
    bad_dtype = jax.tree.map(lambda x: x, state.experience)
    bad_dtype["action"] = bad_dtype["action"].astype(jnp.float32)
    with pytest.raises(VaultError, match=r"leaf 'action\.' has dtype float32"):
        Vault("v", bad_dtype, vault_uid="u")
    missing = {k: x for k, x in state.experience.items() if k != "obs"}
    with pytest.raises(VaultError, match=r"vault leaves not in the structure \['obs\.'\]"):
        Vault("v", missing, vault_uid="u")
    wrong_item = dict(state.experience, obs=jnp.zeros((ROWS, 8, 4)))
    with pytest.raises(VaultError, match=r"leaf 'obs\.' has shape \(2, 8, 4\)"):
        v.write(TRAJ.init(EXAMPLE).replace(experience=wrong_item))
    other_rows = jax.tree.map(lambda x: x[:1], state.experience)
    with pytest.raises(VaultError, match=r"state leaf '\w+\.' has shape \(1, 8"):
        v.write(TRAJ.init(EXAMPLE).replace(experience=other_rows))
    # Nothing on disk changed.
    assert Vault("v", vault_uid="u").vault_index == 4
    assert_tree_equal(Vault("v", state.experience, vault_uid="u").read().experience,
                      expected(0, 4))


def test_damaged_arrays_are_reported(in_tmp):
    state, k = run([5, 6])
    Vault("v", state.experience, vault_uid="u").write(state)
    root = in_tmp / "vaults" / "v" / "u"
    pristine = in_tmp / "pristine"
    shutil.copytree(root, pristine)
    files = sorted(glob.glob(str(root / "d" / "*"))) + [str(root / "manifest.ocdbt")]
    silent, reported = [], 0
    for f in files:
        size = os.path.getsize(f)
        damage = [("flip", pos) for pos in range(0, size, max(1, size // 4))]
        for mode, pos in damage + [("truncate", size // 2)]:
            shutil.rmtree(root)
            shutil.copytree(pristine, root)
            data = bytearray(open(f, "rb").read())
            if mode == "flip":
                data[pos] ^= 0x10
            else:
                data = data[:pos]
            open(f, "wb").write(bytes(data))
            try:
                got = Vault("v", state.experience, vault_uid="u").read().experience
            except VaultError as e:
                assert str(root) in str(e)
                reported += 1
                continue
            try:
                assert_tree_equal(got, expected(k - 8, k))
            except AssertionError:
                silent.append((os.path.basename(f), pos, mode))
    assert not silent, f"damage read back silently: {silent}"
    assert reported > 0


def test_damaged_leaf_is_named(in_tmp):
    state, _ = run([5])
    Vault("v", state.experience, vault_uid="u").write(state)
    root = in_tmp / "vaults" / "v" / "u"
    # Truncate each data file in turn; at least one read names the leaf whose chunk it held.
    named = set()
    pristine = in_tmp / "pristine"
    shutil.copytree(root, pristine)
    for f in sorted(glob.glob(str(root / "d" / "*"))):
        shutil.rmtree(root)
        shutil.copytree(pristine, root)
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
        try:
            Vault("v", vault_uid="u").read()
        except VaultError as e:
            named.update(n for n in ("obs.", "action.", "extras.inner.reward.",
                                     "extras.inner.done.") if f"leaf '{n}'" in str(e))
    assert named


def test_bad_read_arguments(in_tmp):
    state, _ = run([4])
    v = Vault("v", state.experience, vault_uid="u")
    v.write(state)
    with pytest.raises(VaultError, match="timesteps=9"):
        v.read(timesteps=9)
    with pytest.raises(VaultError, match="percentiles"):
        v.read(percentiles=(50, 10))
    with pytest.raises(VaultError, match="add_batch_size"):
        v.into_buffer(fbx.make_trajectory_buffer(
            max_length_time_axis=8, min_length_time_axis=2, sample_batch_size=2,
            add_batch_size=3, sample_sequence_length=2, period=1))


# ------------------------------------------------------------------------ inspect, recipes
def test_inspect_and_command_line(in_tmp, capsys):
    from flax_replay import vault as vault_module

    v = Vault("v", TRAJ.init(EXAMPLE).experience, vault_uid="u", metadata={"env": "cartpole"})
    _, k = run([5, 6], vaults=(v,))
    info = vault_module.inspect(str(in_tmp / "vaults" / "v" / "u"))
    assert info["steps"] == k and info["rows"] == ROWS and info["version"] == 1.2
    assert info["leaves"]["obs."] == {"shape": [ROWS, k, 3], "dtype": "float32"}
    assert info["leaves"]["extras.inner.done."] == {"shape": [ROWS, k], "dtype": "bool"}
    assert info["compression"] == {"id": "gzip", "level": 5}
    assert info["metadata"] == {"env": "cartpole"} and info["priorities"] is False
    on_disk = sum(p.stat().st_size for p in (in_tmp / "vaults").rglob("*") if p.is_file())
    assert info["bytes_on_disk"] == on_disk
    assert info["bytes_uncompressed"] == ROWS * k * (3 * 4 + 4 + 1 + 4)
    assert vault_module.main([str(in_tmp / "vaults" / "v" / "u")]) == 0
    out = capsys.readouterr().out
    assert f"steps: {k} per row x {ROWS} rows" in out and "obs." in out
    assert vault_module.main([str(in_tmp / "vaults" / "missing")]) == 1
    assert "is not a vault" in capsys.readouterr().out


def test_offline_to_online_in_one_jitted_step(in_tmp):
    """The README recipe: a read-only buffer loaded from a vault mixed with an online one."""
    flat_kw = dict(max_length=32, min_length=4, sample_batch_size=8, add_batch_size=ROWS)
    recorded = fbx.make_flat_buffer(**flat_kw)
    state = recorded.init(EXAMPLE)
    vault = Vault("offline", state.experience, vault_uid="run0")
    record = jax.jit(recorded.add, donate_argnums=0)
    for i in range(10):  # offline steps: values 0..9 in row 0
        state = record(state, jax.tree.map(lambda x: x[:, 0], rows_of(i, 1)))
    vault.write(state)

    offline = fbx.make_flat_buffer(**flat_kw)
    online = fbx.make_flat_buffer(**flat_kw)
    online_state = online.init(EXAMPLE)
    # Opened with the experience structure, the vault reads back NamedTuples, not dicts.
    offline_state = Vault("offline", online_state.experience, vault_uid="run0").into_buffer(offline)
    mixer = fbx.make_mixer([offline, online], sample_batch_size=8, proportions=[3, 1])

    def step(online_state, offline_state, transition, key):
        online_state = online.add(online_state, transition)
        batch = mixer.sample([offline_state, online_state], key)
        return online_state, batch

    step = jax.jit(step, donate_argnums=0)  # the online state is updated in place
    for i in range(6):  # online steps start at 500: told apart from offline ones (< 10)
        online_state, batch = step(online_state, offline_state,
                                   jax.tree.map(lambda x: x[:, 0], rows_of(500 + i, 1)),
                                   jax.random.key(i))
    pair = batch.experience
    first = np.asarray(pair.first["obs"][:, 0]) % 1000
    assert mixer.batch_sizes == (6, 2)
    assert np.all(first[:6] < 10) and np.all(first[6:] >= 500)
    np.testing.assert_array_equal(pair.second["obs"] - pair.first["obs"], 1)
    # The offline buffer was only read: still the vault's 10 steps.
    assert int(offline_state.current_index) == 10 and not bool(offline_state.is_full)


@settings(max_examples=6)
@given(st.lists(st.tuples(st.integers(1, 8), st.booleans()), min_size=1, max_size=10),
       st.booleans())
def test_random_adds_and_writes_keep_every_step(tmp_path_factory, ops, count):
    """Random add lengths and write points (never more than a time axis apart): the vault is
    the whole stream of steps, in order; with `written=` or without. Without it, writes are
    at most T - 1 steps apart: a uniform full buffer that received exactly T steps looks
    as it did (the documented limit; `written=` or a prioritised state lifts it)."""
    root = tmp_path_factory.mktemp("vaults")
    state = TRAJ.init(EXAMPLE)
    v = Vault("h", state.experience, rel_dir=str(root), vault_uid="u")
    k = since = 0
    gap = 8 if count else 7
    for a, write in ops:
        a = min(a, gap)
        if since + a > gap:  # this add would lose steps (or be invisible): write first
            v.write(state, written=k if count else None)
            since = 0
        state = ADD(state, rows_of(k, a))
        k, since = k + a, since + a
        if write:
            v.write(state, written=k if count else None)
            since = 0
    v.write(state, written=k if count else None)
    assert v.vault_index == k
    assert_tree_equal(v.read().experience, expected(0, k))
