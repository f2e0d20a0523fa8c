"""Checkpoint and resume (flax_replay.checkpoint): exact resume after SIGKILL in real processes,
crash safety of asynchronous saves, damaged checkpoints, params-only restore, and the mismatch
errors. The training run is tests/resume_job.py."""

from __future__ import annotations

import asyncio
import gc
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import flax_replay as fbx
from flax_replay import checkpoint as ckpt
from flax_replay._src import checkpoint as ckpt_impl

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import resume_job as job  # noqa: E402

TOTAL = 10  # learning starts after job.WARMUP = 4 steps


# ------------------------------------------------------------------------------ processes
_CACHE: list[Path] = []


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """The children share a persistent compilation cache: only the first one compiles the
    training step (~5 s of CPU), the others load it."""
    _CACHE[:] = [tmp_path_factory.mktemp("jax_cache")]
    yield
    _CACHE.clear()


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one device per child: faster start-up
    env["JAX_PLATFORMS"] = "cpu"
    if _CACHE:
        env["JAX_COMPILATION_CACHE_DIR"] = str(_CACHE[0])
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def _start(tmp_path: Path, name: str, *args: str) -> subprocess.Popen:
    err = open(tmp_path / f"{name}.stderr", "w")
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "resume_job.py"), *map(str, args)],
        stdout=subprocess.PIPE, stderr=err, text=True, env=_env())
    err.close()
    timer = threading.Timer(240, proc.kill)  # a hung child must not hang the suite
    timer.daemon = True
    timer.start()
    return proc


def _stderr(tmp_path: Path, name: str) -> str:
    return (tmp_path / f"{name}.stderr").read_text()[-3000:]


def _finish(proc: subprocess.Popen, tmp_path: Path, name: str) -> list[str]:
    out, _ = proc.communicate()
    assert proc.returncode == 0, _stderr(tmp_path, name)
    return out.split()


def _kill_at(proc: subprocess.Popen, line: str, tmp_path: Path, name: str) -> list[str]:
    """Reads the child's output until `line`, then SIGKILLs it; returns what it printed."""
    seen = []
    for out in proc.stdout:
        seen.append(out.strip())
        if out.strip() == line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, (seen, _stderr(tmp_path, name))
    return seen


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("flavour", ["linen", "nnx"])
def test_resume_after_sigkill_is_bit_identical(tmp_path, flavour):
    kill_at = random.Random(flavour).randint(job.WARMUP + 1, TOTAL - 2)
    # The uninterrupted reference never checkpoints; it runs first and fills the cache.
    ref = _start(tmp_path, "ref", tmp_path / "ref", TOTAL, flavour, "--save-every", 0,
                 "--out", tmp_path / "ref.npz")
    _finish(ref, tmp_path, "ref")
    run = tmp_path / "run"
    victim = _start(tmp_path, "victim", run, TOTAL, flavour)
    seen = _kill_at(victim, f"step {kill_at}", tmp_path, "victim")
    assert "done" not in seen and f"step {kill_at}" in seen
    assert ckpt.latest_step(ckpt.make_manager(run)) < TOTAL

    resumed = _finish(_start(tmp_path, "resumed", run, TOTAL, flavour,
                             "--out", tmp_path / "run.npz"), tmp_path, "resumed")
    start = int(resumed[resumed.index("start") + 1])
    assert job.WARMUP < start < TOTAL, resumed  # resumed mid-run, after learning began

    a, b = _load(tmp_path / "ref.npz"), _load(tmp_path / "run.npz")
    assert sorted(a) == sorted(b)
    names = " ".join(a)
    for part in ("sum_tree", "experience", "rng", "kernel", "mu", "nu", "step"):
        assert part in names
    different = [k for k in a if a[k].dtype != b[k].dtype or not np.array_equal(a[k], b[k])]
    assert not different, different
    # Not vacuous: the run learned and the buffer holds data.
    assert any(v.any() for k, v in a.items() if "sum_tree" in k)


def test_kill_during_async_save_keeps_previous_step(tmp_path):
    run = tmp_path / "run"
    # The commit of checkpoint 2 never completes: the process is killed with it in flight.
    proc = _start(tmp_path, "hang", run, 2, "linen", "--hang-commit-at", 2)
    seen = _kill_at(proc, "in flight 2", tmp_path, "hang")
    assert "step 1" in seen
    leftovers = [p.name for p in run.iterdir() if p.name.startswith("2")]
    assert leftovers and all(".orbax-checkpoint-tmp" in n for n in leftovers), leftovers

    manager = ckpt.make_manager(run)  # ignores, then (in the background) removes, step 2
    assert ckpt.latest_step(manager) == 1 and manager.all_steps() == [1]
    state, _ = job.linen_setup()[:2]
    restored, rng, step = ckpt.restore(manager, state, jax.random.key(7))
    assert step == 1
    assert int(restored.replay["replay"]["current_index"]) == 1  # one add of 4 rows
    assert int(restored.step) == 0  # no learning step before WARMUP
    np.testing.assert_array_equal(jax.random.key_data(rng).shape, (2,))
    for _ in range(100):
        if not any(p.name.startswith("2") for p in run.iterdir()):
            break
        time.sleep(0.1)
    assert not any(p.name.startswith("2") for p in run.iterdir())


# ------------------------------------------------------------------------------ in-process
@pytest.fixture(scope="module")
def trained():
    """A Linen state after a few learning steps, and its RNG."""
    state, step, _ = job.linen_setup()
    rng = jax.random.key(3)
    for t in range(job.WARMUP + 2):
        state, rng = step(state, rng, t >= job.WARMUP)
    return jax.tree.map(np.asarray, (state.params, state.opt_state, state.replay,
                                     state.priorities)), state, rng


@pytest.fixture(scope="module")
def saved(tmp_path_factory, trained):
    """A directory with checkpoints 1 and 2 of the trained state (synchronous saves)."""
    _, state, rng = trained
    root = tmp_path_factory.mktemp("saved")
    manager = ckpt.make_manager(root, enable_async=False)
    assert ckpt.save(manager, 1, state, rng) and ckpt.save(manager, 2, state, rng)
    manager.close()
    return root


def _copy(saved: Path, tmp_path: Path) -> Path:
    shutil.copytree(saved, tmp_path / "c")
    return tmp_path / "c"


def _equal(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(x, y), a, b)))


def test_restore_roundtrip_with_typed_and_raw_keys(tmp_path, trained):
    host, state, rng = trained
    for key in (rng, jax.random.key_data(rng)):  # typed key, raw uint32 key
        directory = tmp_path / str(key.dtype)
        manager = ckpt.make_manager(directory)  # asynchronous
        assert ckpt.save(manager, 5, state, key)
        manager.wait_until_finished()
        template, _, _ = job.linen_setup()
        new, new_key, step = ckpt.restore(ckpt.make_manager(directory), template,
                                          jnp.zeros_like(key) if key.dtype == jnp.uint32
                                          else jax.random.key(0))
        assert step == 5 and new_key.dtype == key.dtype
        np.testing.assert_array_equal(jax.random.key_data(new_key) if key.dtype != jnp.uint32
                                      else new_key, jax.random.key_data(rng))
        assert _equal((new.params, new.opt_state, new.replay, new.priorities), host)
        assert int(new.step) == int(state.step) > 0


@pytest.fixture
def held_write(monkeypatch):
    """Test instrumentation: Orbax's write of any array of shape `held_write.shape` waits
    (in Orbax's background thread) until `held_write.release` is set, after setting
    `held_write.started`. Patches Orbax's private serialization module: if Orbax stops
    calling it, `started` is never set and the test fails instead of passing vacuously."""
    from orbax.checkpoint._src.serialization import serialization

    original = serialization.async_serialize_from_host
    held = types.SimpleNamespace(shape=None, started=threading.Event(),
                                 release=threading.Event(), finished=threading.Event())

    async def hold(rslices_on_host, tensorstore_spec, **kwargs):
        if tuple(rslices_on_host.global_shape) == held.shape:
            held.started.set()
            await asyncio.to_thread(held.release.wait, 60)  # bounded: never hang the suite
            await original(rslices_on_host, tensorstore_spec, **kwargs)
            held.finished.set()
        else:
            await original(rslices_on_host, tensorstore_spec, **kwargs)

    monkeypatch.setattr(serialization, "async_serialize_from_host", hold)
    yield held
    held.release.set()


def test_donated_step_during_async_save_leaves_checkpoint_intact(tmp_path, held_write):
    """Orbax keeps references to the arrays while it writes (on CPU, zero-copy views): a
    donated step issued meanwhile must not overwrite what is being written. The race is
    made certain: the write of the experience is held back until the donated step has
    run, and the test checks that it had started and not finished at that moment."""
    buffer = fbx.make_prioritised_flat_buffer(max_length=4096, min_length=1,
                                              sample_batch_size=1, add_batch_size=4)
    cols = fbx.to_collections(buffer.init({"obs": jnp.zeros(1024)}))
    cols["replay"]["experience"]["obs"] = jax.random.normal(jax.random.key(0),
                                                            (4, 1024, 1024))  # 16 MiB
    state = fbx.TrainState.create(apply_fn=None, params={"w": jnp.ones(3)},
                                  tx=job.optax.sgd(0.1), replay={"b": cols["replay"]},
                                  priorities={"b": cols["priorities"]})
    before = np.array(state.replay["b"]["experience"]["obs"])

    def overwrite(state):
        b = state.replay["b"]
        experience = {"obs": b["experience"]["obs"] + 1}
        return state.replace(replay={"b": {**b, "experience": experience}})

    overwrite = jax.jit(overwrite, donate_argnums=0)
    manager = ckpt.make_manager(tmp_path)
    held_write.shape = before.shape
    try:
        assert ckpt.save(manager, 1, state, jax.random.key(1))
        assert held_write.started.wait(60), "Orbax never wrote the experience (hook not called)"
        assert manager.is_saving_in_progress() and not held_write.finished.is_set()
        state = jax.block_until_ready(overwrite(state))  # donated, while the save is held
        assert not held_write.finished.is_set()  # the race happened
    finally:
        held_write.release.set()
    manager.wait_until_finished()
    assert held_write.finished.is_set()
    np.testing.assert_array_equal(np.asarray(state.replay["b"]["experience"]["obs"]),
                                  before + 1)
    restored, _, _ = ckpt.restore(manager, state, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(restored.replay["b"]["experience"]["obs"]),
                                  before)


def test_save_respects_interval_and_max_to_keep(tmp_path, trained):
    _, state, rng = trained
    manager = ckpt.make_manager(tmp_path, max_to_keep=2, save_interval_steps=2,
                                enable_async=False)
    # Orbax always saves the first step it is given, then every save_interval_steps.
    assert [ckpt.save(manager, s, state, rng) for s in range(1, 7)] == [
        True, True, False, True, False, True]
    assert ckpt.save(manager, 7, state, rng, force=True)
    assert manager.all_steps() == [6, 7] and ckpt.latest_step(manager) == 7


def test_restore_into_concrete_named_sharding(saved, trained):
    host, state, rng = trained
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    rows = NamedSharding(mesh, P("data"))  # the add-batch axis of the experience
    replicated = NamedSharding(mesh, P())

    def target(path, x):
        name = jax.tree_util.keystr(path)
        sharding = rows if "experience" in name else replicated
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    template = state.replace(
        replay=jax.tree_util.tree_map_with_path(target, state.replay),
        priorities=jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                               sharding=replicated),
                                state.priorities))
    new, _, step = ckpt.restore(ckpt.make_manager(saved), template, rng)
    assert step == 2
    obs = new.replay["replay"]["experience"]["obs"]
    assert obs.sharding == rows and len(obs.addressable_shards) == 4
    assert new.priorities["replay"]["sum_tree"].sharding == replicated
    assert _equal((new.replay, new.priorities), host[2:])


def test_abstract_mesh_target_is_refused(saved, trained):
    _, state, rng = trained
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    abstract = NamedSharding(mesh.abstract_mesh, P())
    template = state.replace(priorities=jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=abstract), state.priorities))
    with pytest.raises(ValueError, match=r"priorities/replay/\w+.*AbstractMesh"):
        ckpt.restore(ckpt.make_manager(saved), template, rng)


def test_params_only_restore_without_buffer_files(saved, trained, tmp_path):
    host, state, rng = trained
    root = _copy(saved, tmp_path)
    for item in ("replay", "priorities", "opt_state", "rng", "step"):
        shutil.rmtree(root / "2" / item)
    manager = ckpt.make_manager(root)
    template = jax.tree.map(jnp.zeros_like, state.params)
    params = ckpt.restore_params(manager, template)
    assert _equal(params, host[0]) and not _equal(template, host[0])
    with pytest.raises(ValueError, match="item 'opt_state' is in the template but not"):
        ckpt.restore(manager, state, rng)


@pytest.mark.parametrize("damage", ["truncate", "flip", "metadata"])
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # Orbax threads
def test_damaged_checkpoint_names_step_and_previous_restores(saved, trained, tmp_path, damage):
    host, state, rng = trained
    root = _copy(saved, tmp_path)
    item = root / "2" / "replay"
    if damage == "metadata":
        (item / "_METADATA").write_text('{"tree_metadata": ')
    else:
        for f in (item / "d").iterdir():  # the OCDBT data files of the replay item
            data = bytearray(f.read_bytes())
            if damage == "truncate":
                data = data[: len(data) // 2]
            else:
                data[len(data) // 2] ^= 0xFF
            f.write_bytes(bytes(data))
    manager = ckpt.make_manager(root)
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint step 2 .*Other steps "
                                                   r"available: \[1\]"):
        ckpt.restore(manager, state, rng)
    new, _, step = ckpt.restore(manager, state, rng, step=1)
    assert step == 1 and _equal((new.params, new.replay, new.priorities),
                                (host[0], host[2], host[3]))
    # The params item is intact, so evaluation still works from the damaged step.
    assert _equal(ckpt.restore_params(manager, state.params), host[0])
    gc.collect()  # Orbax's failed reads: their warnings here, not in a later test


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # Orbax threads
def test_read_error_after_the_check_is_a_checkpoint_error(saved, trained, monkeypatch):
    """Arrays are read only after the metadata matched the template, so whatever Orbax
    raises then (here its real shape error, as if the files had changed between the check
    and the read) is a CheckpointError naming the step, whatever its message says."""
    _, _, rng = trained
    monkeypatch.setattr(ckpt_impl, "check_compatible", lambda *args: None)
    # The recorded buffer configuration (another max_length) would be refused first, too.
    monkeypatch.setattr(ckpt_impl.buffer_config, "differences", lambda *args: [])
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint step 2 .*could not be read "
                                                   r"\(arrays\).*Other steps available: \[1\]"
                       ) as info:
        ckpt.restore(ckpt.make_manager(saved), _template(max_length=64), rng)
    assert isinstance(info.value.__cause__, ValueError), info.value.__cause__
    del info
    gc.collect()  # Orbax's failed reads: their warnings here, not in a later test


def _custom_manager(directory):
    """A user's own CheckpointManager, with another step name format: ckpt_000003."""
    options = ocp.CheckpointManagerOptions(
        step_name_format=ocp.step.standard_name_format(step_prefix="ckpt",
                                                       step_format_fixed_length=6))
    return ocp.CheckpointManager(
        directory, options=options, item_names=ckpt.ITEMS,
        item_handlers={name: ocp.StandardCheckpointHandler() for name in ckpt.ITEMS})


def test_step_directory_honours_a_custom_step_name_format(tmp_path, trained):
    """Our one private Orbax call (`_step_directory`) finds a custom-named step, so restores
    and mismatch checks work on a user's manager. Fails if an Orbax release drops or changes
    `CheckpointManager._get_read_step_directory`."""
    host, state, rng = trained
    manager = _custom_manager(tmp_path)
    assert ckpt.save(manager, 3, state, rng)
    manager.wait_until_finished()
    assert ckpt_impl._step_directory(manager, 3) == tmp_path / "ckpt_000003"
    assert (tmp_path / "ckpt_000003" / "replay").is_dir()
    new, _, step = ckpt.restore(_custom_manager(tmp_path), state, rng)
    assert step == 3 and _equal((new.params, new.replay, new.priorities),
                                (host[0], host[2], host[3]))
    with pytest.raises(ValueError, match="buffer capacity differs"):
        ckpt.restore(manager, _template(max_length=64), rng)


def test_step_directory_fallback_is_the_standard_format(saved):
    """Without the private method (an object that lacks it; Orbax itself needs it on a
    real manager), `make_manager`'s (standard) step directories are found."""
    assert ckpt_impl._step_directory(ckpt.make_manager(saved), 2) == saved / "2"
    without = types.SimpleNamespace(directory=ckpt.make_manager(saved).directory)
    assert ckpt_impl._step_directory(without, 1) == saved / "1"
    assert ckpt_impl._step_directory(without, 2) == saved / "2"


def test_missing_step_and_empty_directory(tmp_path, saved, trained):
    _, state, rng = trained
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        ckpt.restore(ckpt.make_manager(tmp_path / "empty"), state, rng)
    with pytest.raises(FileNotFoundError, match="no checkpoint step 9"):
        ckpt.restore(ckpt.make_manager(saved), state, rng, step=9)


# ------------------------------------------------------------------------------ mismatches
def _template(max_length=48, example=job.EXAMPLE, prioritised=True):
    kwargs = dict(max_length=max_length, min_length=8, sample_batch_size=8,
                  add_batch_size=job.ENVS)
    buffer = (fbx.make_prioritised_flat_buffer(**kwargs) if prioritised
              else fbx.make_flat_buffer(**kwargs))
    return job.linen_setup(buffer, example)[0]


@pytest.mark.parametrize("case, pattern", [
    ("capacity", r"buffer capacity differs at 'replay/replay': the checkpoint stores 4 rows x "
                 r"12 steps = 48, the template 4 rows x 16 steps = 64"),
    ("leaf", r"leaf 'replay/replay/experience/done' is in the template but not in the "
             r"checkpoint"),
    ("shape", r"leaf 'replay/replay/experience/obs': shape \(4, 12, 4\) in the checkpoint, "
              r"\(4, 12, 5\) in the template"),
    ("dtype", r"leaf 'replay/replay/experience/obs': dtype float32 in the checkpoint, "
              r"float16 in the template"),
    ("uniform", r"item 'priorities' is in the checkpoint but empty in the template"),
], ids=["capacity", "leaf", "shape", "dtype", "uniform"])
def test_mismatch_is_refused_naming_what_differs(saved, trained, case, pattern):
    _, state, rng = trained
    example = dict(job.EXAMPLE)
    if case == "leaf":
        example["done"] = jnp.bool_(False)
    elif case == "shape":
        example["obs"] = jnp.zeros(5)
    elif case == "dtype":
        example["obs"] = jnp.zeros(4, jnp.float16)
    template = _template(max_length=64 if case == "capacity" else 48, example=example,
                         prioritised=case != "uniform")
    manager = ckpt.make_manager(saved)
    with pytest.raises(ValueError, match=pattern) as info:
        ckpt.restore(manager, template, rng)
    assert "checkpoint step 2" in str(info.value)
    assert not isinstance(info.value, ckpt.CheckpointError)
    # The params still fit, whatever the buffer: restore_params ignores the buffer.
    assert _equal(ckpt.restore_params(manager, template.params), trained[0][0])


def test_default_directory_and_relative_paths(tmp_path, monkeypatch):
    assert ckpt.default_directory("dqn_per") == (HERE.parent / "checkpoints" / "dqn_per")
    monkeypatch.chdir(tmp_path)
    manager = ckpt.make_manager("relative/x", enable_async=False)
    assert Path(str(manager.directory)) == tmp_path / "relative" / "x"
