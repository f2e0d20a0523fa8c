"""A damaged checkpoint never restores silently (issue 12, part 1): checksums recorded at save
and verified at restore, the buffer's invariants checked on what was read, old checkpoints
(no checksums) restored with one warning, and the items still plain Orbax."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import shutil
import sys
import time
import types
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import flax_replay as fbx
from flax_replay import checkpoint as ckpt
from flax_replay._src import checkpoint as ckpt_impl
from flax_replay._src import integrity, sum_tree

sys.path.insert(0, str(Path(__file__).resolve().parent))
import resume_job as job

ROWS, T, OBS = 4, 64, 256  # 256 KiB of observations: the largest file of the replay item


def _state(seed: int = 0, obs: int = OBS):
    """A TrainState holding a prioritised flat buffer with random experience and random
    priorities, set through the buffer's own functions (so its tree is valid)."""
    buffer = fbx.make_prioritised_flat_buffer(max_length=ROWS * T, min_length=1,
                                              sample_batch_size=4, add_batch_size=ROWS)
    state = buffer.init({"obs": jnp.zeros(obs), "reward": jnp.float32(0)})
    keys = jax.random.split(jax.random.key(seed), 3)
    add = jax.jit(buffer.add, donate_argnums=0)
    for i, k in enumerate(jax.random.split(keys[0], T + 5)):  # wraps: is_full, seam
        state = add(state, {"obs": jax.random.normal(k, (ROWS, obs)),
                            "reward": jnp.full((ROWS,), float(i))})
    idx = jnp.arange(buffer.core.num_items, dtype=jnp.int32)
    prio = jax.random.uniform(keys[1], idx.shape, minval=0.0, maxval=3.0)
    state = buffer.set_priorities(state, idx, jnp.where(idx % 7 == 0, 0.0, prio))
    cols = fbx.to_collections(state)
    return fbx.TrainState.create(apply_fn=None, params={"w": jnp.arange(3.0)},
                                 tx=optax.sgd(0.1), replay={"b": cols["replay"]},
                                 priorities={"b": cols["priorities"]})


def _host(tree):
    return jax.tree.map(np.asarray, tree)


def _equal(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(np.array_equal, _host(a), _host(b))))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Steps 1 and 2 of the same state, saved synchronously."""
    state = _state()
    root = tmp_path_factory.mktemp("saved")
    manager = ckpt.make_manager(root, enable_async=False)
    assert ckpt.save(manager, 1, state, jax.random.key(1))
    assert ckpt.save(manager, 2, state, jax.random.key(1))
    manager.close()
    return root, state


def _copy(saved_root: Path, tmp_path: Path) -> Path:
    shutil.copytree(saved_root, tmp_path / "c")
    return tmp_path / "c"


def _largest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _xor_middle(path: Path, n: int = 16) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + n):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("item, leaf", [("replay", "b/experience/obs"),
                                        ("priorities", "b/")])
def test_flipped_bytes_in_the_largest_data_file_are_a_checkpoint_error(saved, tmp_path, item,
                                                                       leaf):
    root, state = saved
    root = _copy(root, tmp_path)
    target = _largest_file(root / "2" / item)
    assert target.stat().st_size > 1000, target  # the array data, not an index
    _xor_middle(target)
    manager = ckpt.make_manager(root)
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.restore(manager, state, jax.random.key(0))
    message = str(info.value)
    assert "checkpoint step 2" in message and "Other steps available: [1]" in message, message
    assert f"item '{item}' leaf '{leaf}" in message, message
    # The other step is intact and restores exactly.
    new, _, step = ckpt.restore(manager, state, jax.random.key(0), step=1)
    assert step == 1 and _equal((new.params, new.replay, new.priorities),
                                (state.params, state.replay, state.priorities))


def test_checksums_are_in_the_step_metadata_and_items_stay_plain_orbax(saved):
    root, state = saved
    manager = ckpt.make_manager(root)
    record = manager.metadata(2).custom_metadata[ckpt_impl.METADATA_KEY]["checksums"]
    assert record["algorithm"] == "crc32"
    obs = np.asarray(state.replay["b"]["experience"]["obs"])
    want = integrity.zlib.crc32(obs.tobytes())  # independent: one CRC of the whole leaf
    crcs = record["leaves"]["replay"]["b/experience/obs"]
    assert obs.nbytes <= record["chunk_bytes"] and crcs == [want]
    # Every item with arrays (plain SGD has no optimizer state).
    assert set(record["leaves"]) == {"params", "replay", "priorities", "rng", "step"}
    # Orbax alone, without flax_replay, reads an item of the same step.
    plain = ocp.CheckpointManager(root, item_names=("replay",))
    out = plain.restore(2, args=ocp.args.Composite(replay=ocp.args.StandardRestore()))
    np.testing.assert_array_equal(out["replay"]["b"]["experience"]["obs"], obs)


def _item_bytes(root: Path, step: int, item: str) -> int:
    return sum(p.stat().st_size for p in (root / str(step) / item).rglob("*") if p.is_file())


@pytest.mark.parametrize("compress_buffer", [False, True])
def test_buffer_items_are_uncompressed_unless_asked_and_every_step_restores(tmp_path,
                                                                           compress_buffer):
    """`make_manager` writes the buffer items without Orbax's default zstd (experience is
    mostly incompressible: it cost time for no space) unless `compress_buffer`; the other
    items keep it. Zeros compress many-fold, so the files' sizes tell which is which. Either
    step restores with flax_replay (whatever the manager's own setting) and with plain
    Orbax."""
    state = _state()
    state = state.replace(params={"w": jnp.zeros((256, 256))},
                          replay=jax.tree.map(jnp.zeros_like, state.replay))
    manager = ckpt.make_manager(tmp_path, enable_async=False, compress_buffer=compress_buffer)
    assert ckpt.save(manager, 1, state, jax.random.key(1))
    manager.close()
    obs = state.replay["b"]["experience"]["obs"].nbytes
    if compress_buffer:
        assert _item_bytes(tmp_path, 1, "replay") < obs // 8
    else:
        assert _item_bytes(tmp_path, 1, "replay") >= obs
    assert _item_bytes(tmp_path, 1, "params") < state.params["w"].nbytes // 8
    template = _state(seed=1).replace(params={"w": jnp.ones((256, 256))})
    assert not _equal(template.replay, state.replay)
    new, _, step = ckpt.restore(ckpt.make_manager(tmp_path, compress_buffer=not compress_buffer),
                                template, jax.random.key(0))
    assert step == 1 and _equal((new.params, new.replay, new.priorities),
                                (state.params, state.replay, state.priorities))
    plain = ocp.CheckpointManager(tmp_path, item_names=("replay", "params"))
    out = plain.restore(1, args=ocp.args.Composite(replay=ocp.args.StandardRestore(),
                                                   params=ocp.args.StandardRestore()))
    assert _equal((out["replay"], out["params"]), (state.replay, state.params))


def test_chunked_checksums_find_the_damaged_chunk():
    a = np.arange(1000, dtype=np.float32)
    record = integrity.checksums({"replay": {"x": a}}, chunk_bytes=1024)
    assert len(record["leaves"]["replay"]["x"]) == 4  # 4000 bytes in chunks of 1024
    assert integrity.mismatches(record, {"replay": {"x": a}}) == []
    b = a.copy()
    b[600] = -1  # byte 2400: chunk 2
    (bad,) = integrity.mismatches(record, {"replay": {"x": b}})
    assert bad[:2] == ("replay", "x") and "chunk(s) [2]" in bad[2]


def test_step_without_checksums_restores_with_one_warning(tmp_path, saved):
    """A step as flax_replay wrote it before checksums: the same items, no record."""
    _, state = saved
    rng = jax.random.key(1)
    items = {"params": state.params, "opt_state": state.opt_state, "replay": state.replay,
             "priorities": state.priorities, "rng": {"key_data": jax.random.key_data(rng)},
             "step": {"step": jnp.asarray(state.step, jnp.int32)}}
    # The manager older flax_replay made: StandardCheckpointHandlers (compressed items).
    manager = ocp.CheckpointManager(
        tmp_path, options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False),
        item_names=ckpt_impl.ITEMS,
        item_handlers={name: ocp.StandardCheckpointHandler() for name in ckpt_impl.ITEMS})
    manager.save(3, args=ocp.args.Composite(**{k: ocp.args.StandardSave(v)
                                               for k, v in items.items() if jax.tree.leaves(v)}))
    manager.close()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new, _, step = ckpt.restore(ckpt.make_manager(tmp_path), state, jax.random.key(0))
    ours = [w for w in caught if issubclass(w.category, ckpt_impl.UnverifiedCheckpointWarning)]
    assert len(ours) == 1 and "\n" not in str(ours[0].message), [str(w.message) for w in caught]
    assert "step 3" in str(ours[0].message) and "cannot be verified" in str(ours[0].message)
    assert step == 3 and _equal((new.replay, new.priorities), (state.replay, state.priorities))


# ------------------------------------------------------------------------------ invariants
def _damage(state, kind: str):
    pri = dict(state.priorities["b"])
    rep = dict(state.replay["b"])
    sums, mins = np.array(pri["sum_tree"]), np.array(pri["min_tree"])
    geo = sum_tree.geometry(ROWS * T)
    leaf = geo.offsets[-1] + 5
    if kind == "negative leaf":
        sums[leaf] = -1.0
    elif kind == "nan leaf":
        sums[leaf] = np.nan
    elif kind == "parent":
        sums[geo.offsets[-2] + 1] *= 1.001  # 1000x the rounding allowed
    elif kind == "min parent":
        mins[0] = mins[0] * 0.5
    elif kind == "min leaf":
        mins[leaf] = mins[leaf] * 2
    elif kind == "max_priority":
        pri["max_priority"] = np.float32(np.inf)
    elif kind == "current_index":
        rep["current_index"] = np.int32(T)
    pri["sum_tree"], pri["min_tree"] = sums, mins
    return state.replace(priorities={"b": pri}, replay={"b": rep})


DAMAGE = ["negative leaf", "nan leaf", "parent", "min parent", "min leaf", "max_priority",
          "current_index"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_invalid_buffer_in_a_checkpoint_is_a_checkpoint_error(tmp_path, saved, kind):
    """Checksums match (the damage was saved as is), the invariants do not."""
    _, state = saved
    manager = ckpt.make_manager(tmp_path, enable_async=False)
    assert ckpt.save(manager, 1, state, jax.random.key(1))
    assert ckpt.save(manager, 2, _damage(state, kind), jax.random.key(1))
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint step 2 .* holds an invalid "
                                                   r"buffer: (priorities|replay)/b") as info:
        ckpt.restore(manager, state, jax.random.key(0))
    assert "Other steps available: [1]" in str(info.value)
    word = {"current_index": "current_index", "max_priority": "max_priority",
            "min parent": "min_tree", "min leaf": "min_tree"}.get(kind, "sum_tree")
    assert word in str(info.value), str(info.value)
    assert ckpt.restore(manager, state, jax.random.key(0), step=1)[2] == 1


def _numpy_tree(values: np.ndarray, branching: int):
    """A valid (sum, min) tree built here with NumPy, level by level, from the geometry."""
    geo = sum_tree.geometry(values.size, branching)
    sums = np.zeros(geo.num_nodes, np.float32)
    mins = np.full(geo.num_nodes, np.inf, np.float32)
    leaf0 = geo.offsets[-1]
    sums[leaf0:leaf0 + values.size] = values
    mins[leaf0:leaf0 + values.size] = np.where(values > 0, values, np.inf)
    for d in range(geo.depth - 1, -1, -1):
        child = geo.offsets[d + 1]
        n = geo.sizes[d + 1] // branching
        rows = slice(child, child + geo.sizes[d + 1])
        sums[geo.offsets[d]:geo.offsets[d] + n] = sums[rows].reshape(n, branching).sum(1)
        mins[geo.offsets[d]:geo.offsets[d] + n] = mins[rows].reshape(n, branching).min(1)
    return sums, mins


def test_invariants_hold_for_valid_trees_of_every_branching():
    """No false alarm: valid trees of several branchings and sizes (padding at every level)
    pass, their geometry found from the node count; one tree from the library's own
    update agrees with the NumPy one and passes too."""
    rng = np.random.default_rng(0)
    for branching in (2, 3, 4, 8):
        for leaves in (1, 5, 64, 1000):
            values = rng.uniform(0, 1e3, leaves).astype(np.float32) * (rng.random(leaves) > .2)
            sums, mins = _numpy_tree(values, branching)
            assert integrity.tree_problems(sums, mins, 1.0, branching) == [], (branching, leaves)
            if branching == 4:  # unknown branching: the default is tried first
                assert integrity.tree_problems(sums, mins, 1.0) == []
    geo = sum_tree.geometry(1000)
    sums, mins = sum_tree.update_sum_min(
        sum_tree.init(geo, 0.0), sum_tree.init(geo, jnp.inf), geo, jnp.arange(1000),
        jnp.asarray(values), jnp.ones(1000, bool))
    np.testing.assert_allclose(np.asarray(sums), _numpy_tree(values, 4)[0], rtol=1e-6)
    assert integrity.tree_problems(np.asarray(sums), np.asarray(mins), 1.0) == []


@pytest.fixture(autouse=True)
def _collect():
    yield
    gc.collect()  # Orbax's failed reads: their warnings here, not in a later test


# ------------------------------------------------------------------------------ configuration
def _linen(**options):
    """The resume job's Linen state, its buffer built with `options`."""
    kwargs = dict(max_length=48, min_length=8, sample_batch_size=8, add_batch_size=job.ENVS,
                  priority_exponent=0.6)
    kwargs.update(options)
    return job.linen_setup(fbx.make_prioritised_flat_buffer(**kwargs))[0]


def test_buffer_configuration_is_recorded_and_another_is_refused(tmp_path):
    state = _linen()
    manager = ckpt.make_manager(tmp_path, enable_async=False)
    assert ckpt.save(manager, 1, state, jax.random.key(1), metadata={"flags": {"lr": 0.1}})
    record = json.loads((tmp_path / "1" / "_CHECKPOINT_METADATA").read_text())
    buffers = record["custom_metadata"]["flax_replay"]["buffers"]
    assert list(buffers) == ["replay"]  # the LinenAgent's submodule named "replay"
    assert buffers["replay"]["core.options.priority_exponent"] == 0.6
    assert buffers["replay"]["core.add_batch_size"] == job.ENVS
    assert ckpt.run_metadata(manager) == {"flags": {"lr": 0.1}}

    with pytest.raises(ValueError, match=r"checkpoint step 1 .*configured otherwise") as info:
        ckpt.restore(manager, _linen(priority_exponent=0.5, sampling="independent"),
                     jax.random.key(0))
    message = str(info.value)
    assert ("buffer 'replay': core.options.priority_exponent is 0.6 in the checkpoint, 0.5 in "
            "the template") in message, message
    assert "sampling" not in message  # how samples are drawn may change
    assert not isinstance(info.value, ckpt.CheckpointError)
    # Fields that only say how samples are drawn may change.
    new, _, _ = ckpt.restore(manager, _linen(sample_batch_size=16, min_length=4,
                                             sampling="independent"), jax.random.key(0))
    assert _equal(new.priorities, state.priorities)


def test_nnx_buffer_configuration_is_recorded_and_another_is_refused(tmp_path, monkeypatch):
    model, optimizer = job.nnx_setup()
    manager = ckpt.make_manager(tmp_path, enable_async=False)
    assert ckpt.save_nnx(manager, 1, model, optimizer, jax.random.key(1))
    assert ckpt.run_metadata(manager) is None
    monkeypatch.setattr(job, "make_buffer", lambda: fbx.make_prioritised_flat_buffer(
        max_length=48, min_length=8, sample_batch_size=8, add_batch_size=job.ENVS,
        priority_exponent=1.0))
    other, other_opt = job.nnx_setup()
    with pytest.raises(ValueError, match=r"buffer 'replay': core.options.priority_exponent is "
                                         r"0.6 in the checkpoint, 1.0 in the template"):
        ckpt.restore_nnx(manager, other, other_opt, jax.random.key(0))
    monkeypatch.undo()
    rng, step = ckpt.restore_nnx(manager, *job.nnx_setup(), jax.random.key(0))
    assert step == 1


def test_leftover_tmp_directory_is_ignored_without_warnings(tmp_path, saved, caplog):
    """What a save killed mid-write leaves: ignored, removed, and nothing logged above INFO."""
    _, state = saved
    manager = ckpt.make_manager(tmp_path, enable_async=False)
    assert ckpt.save(manager, 1, state, jax.random.key(1))
    manager.close()
    shutil.copytree(tmp_path / "1", tmp_path / "2.orbax-checkpoint-tmp")
    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manager = ckpt.make_manager(tmp_path)
        assert manager.all_steps() == [1]
        assert ckpt.restore(manager, state, jax.random.key(0))[2] == 1
        manager.wait_until_finished()
    assert not caught, [str(w.message) for w in caught]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    for _ in range(100):  # removed in the background
        if not (tmp_path / "2.orbax-checkpoint-tmp").exists():
            break
        time.sleep(0.05)
    assert not (tmp_path / "2.orbax-checkpoint-tmp").exists()


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_truncated_step_is_one_error_without_orbax_tracebacks(saved, tmp_path):
    """Orbax abandons its other reads when one fails; collected later, each printed a long
    traceback ("Exception ignored in ... _read_array_index_and_device_put"). They are
    finalised, silently, before the CheckpointError is raised."""
    root, state = saved
    root = _copy(root, tmp_path)
    target = _largest_file(root / "2" / "replay")
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    seen = []
    previous = sys.unraisablehook
    sys.unraisablehook = seen.append
    try:
        with pytest.raises(ckpt.CheckpointError, match=r"checkpoint step 2 .*could not be "
                                                       r"read.*Other steps available: \[1\]"):
            ckpt.restore(ckpt.make_manager(root), state, jax.random.key(0))
        gc.collect()
    finally:
        sys.unraisablehook = previous
    assert not seen, [str(u.exc_value)[:200] for u in seen]


def _unraisable(exc: BaseException, obj=None):
    return types.SimpleNamespace(exc_type=type(exc), exc_value=exc,
                                 exc_traceback=exc.__traceback__, err_msg=None, object=obj)


def test_only_late_read_callbacks_on_a_closed_loop_are_muted():
    """After a failed restore, a read Orbax abandoned may finish on TensorStore's thread once
    Orbax's loop is closed; its callback's "Event loop is closed" is muted, and nothing that
    merely looks like it."""
    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(lambda: None)
    except RuntimeError as e:
        late = e
    assert ckpt_impl._is_orbax_read(_unraisable(late))
    assert not ckpt_impl._is_orbax_read(_unraisable(late, obj=object()))
    try:
        raise RuntimeError("Event loop is closed")
    except RuntimeError as e:
        elsewhere = e
    assert not ckpt_impl._is_orbax_read(_unraisable(elsewhere))
    never_run = asyncio.sleep(0)
    try:
        loop.run_until_complete(never_run)
    except RuntimeError as e:
        other = e
    finally:
        never_run.close()  # refused by the closed loop: no "never awaited" warning
    assert not ckpt_impl._is_orbax_read(_unraisable(other))


def test_configuration_fields_added_later_match_older_checkpoints():
    """A checkpoint recorded before `core.episodes.lead` existed lacks it; its implicit value
    (0) matches a template with lead 0 and no other."""
    from flax_replay._src import buffer_config

    def described(frames):
        return buffer_config.describe(fbx.make_flat_buffer(
            32, 4, 4, episode_end_key="done", frame_stack={"obs": 3} if frames else None))

    older = {"replay": {k: v for k, v in described(False).items()
                        if k != "core.episodes.lead"}}
    assert described(False)["core.episodes.lead"] == 0
    assert buffer_config.differences(older, {"replay": described(False)}) == []
    assert any("core.episodes.lead is 0 in the checkpoint, 2 in the template" in line
               for line in buffer_config.differences(older, {"replay": described(True)}))
