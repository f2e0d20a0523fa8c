"""Multi-process: two processes on 127.0.0.1 with 2 host devices each (a global mesh of 4),
started here as subprocesses (tests/multihost_job.py), each add their own rows, sample, set
priorities, and save and restore the sharded buffer with Orbax. This process then checks the
global state against what was added, and restores the 4-device checkpoint on 2 and on 8
devices (resharding the per-shard sum trees)."""

from __future__ import annotations

import ast
import os
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType
from scipy import stats

import flax_replay
from flax_replay import sharding

sys.path.insert(0, os.path.dirname(__file__))
import multihost_job as job

TIMEOUT = 240  # seconds for both processes; they take ~20 s on an idle machine
SHARDS = 4  # 2 processes x 2 devices
SLOTS = job.T  # period 1: one item slot per time step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Runs the two processes once; returns (directory, result.npz contents)."""
    directory = tmp_path_factory.mktemp("multihost")
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    procs = [
        subprocess.Popen(
            [sys.executable, job.__file__, "--process-id", str(i), "--num-processes", "2",
             "--port", str(port), "--dir", str(directory)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    outputs = ["", ""]
    deadline = time.monotonic() + TIMEOUT
    try:
        for i, p in enumerate(procs):
            outputs[i] = p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0]
    except subprocess.TimeoutExpired:
        pytest.fail(f"the two processes did not finish within {TIMEOUT} s")
    finally:
        for p in procs:  # only the processes started here
            if p.poll() is None:
                p.kill()
                p.communicate()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} failed:\n{outputs[i][-4000:]}"
        assert f"process {i}: rows" in outputs[i] and "4 devices, OK" in outputs[i]
    with np.load(directory / "result.npz") as data:
        return directory, dict(data)


def _expected_experience():
    """The ring after 8 steps per row into 6 slots: slot t % 6 holds step t, t in [2, 8)."""
    steps = np.arange(job.ADDS * job.ADD_LEN - job.T, job.ADDS * job.ADD_LEN)
    out = job.experience_of(np.arange(job.ROWS), steps)
    order = np.argsort(steps % job.T)
    return {k: v[:, order] for k, v in out.items()}


def _leaves(tree: np.ndarray) -> np.ndarray:
    """Leaf values in single-device leaf order from per-shard trees `[S, nodes]`."""
    s = tree.shape[0]
    geo = flax_replay._src.sum_tree.geometry(job.ROWS * SLOTS // s)
    return np.concatenate([np.asarray(flax_replay._src.sum_tree.leaves(t, geo)) for t in tree])


def _expected_leaves(result) -> np.ndarray:
    """p ** 0.5 for the items given priorities by the processes, 1 for the other valid items
    (new items get the initial max priority 1), 0 for invalid ones."""
    valid = np.zeros((job.ROWS, SLOTS))
    valid[:, [2, 3, 4, 5, 0]] = 1.0  # starts 2..6 (s + 2 <= 8), slot = s % 6
    leaves = valid.reshape(-1)
    idx = result["local_indices"]
    leaves[idx] = job.priority_of(idx) ** 0.5
    return leaves


def _check_sample(indices, versions, steps):
    """Each sampled item is the item of its leaf index, read at its start (version)."""
    row, slot = indices // SLOTS, indices % SLOTS
    np.testing.assert_array_equal(versions % SLOTS, slot)
    np.testing.assert_array_equal(steps, 100 * row[:, None] + versions[:, None] + np.arange(2))


def test_processes_add_sample_save_restore(run):
    _, result = run
    expected = _expected_experience()
    for name, value in expected.items():
        np.testing.assert_array_equal(result[f"state['replay']['experience']['{name}']"], value)
    assert int(result["state['replay']['current_index']"]) == 2
    assert bool(result["state['replay']['is_full']"])
    assert int(result["state['replay']['running_index']"]) == 8

    sums = result["state['priorities']['sum_tree']"]
    assert sums.shape[0] == SHARDS
    np.testing.assert_allclose(_leaves(sums), _expected_leaves(result), rtol=1e-6)
    idx = result["local_indices"]
    per_shard = idx // (job.ROWS * SLOTS // SHARDS)
    want_max = [max([1.0] + list(job.priority_of(idx[per_shard == k]))) for k in range(SHARDS)]
    np.testing.assert_array_equal(result["state['priorities']['max_priority']"], want_max)

    # Local: each shard's two draws come from its own rows, at probability 1 / (S * 10).
    np.testing.assert_array_equal(per_shard, np.arange(8) // 2)
    np.testing.assert_allclose(result["local_probabilities"], 1 / (SHARDS * 10), rtol=1e-6)
    # Global (after the priorities were set): probability leaf / total over all shards.
    leaves = _expected_leaves(result)
    np.testing.assert_allclose(result["global_probabilities"],
                               leaves[result["global_indices"]] / leaves.sum(), rtol=1e-5)
    for mode in ("local", "global"):
        _check_sample(result[f"{mode}_indices"], result[f"{mode}_versions"],
                      result[f"{mode}_step"])


@pytest.mark.parametrize("devices", [2, 8])
def test_restore_on_other_meshes(run, devices):
    """The 4-device checkpoint restored on 2 and on 8 devices: the same contents, one tree
    per new shard, and sampling with the saved priorities."""
    directory, result = run
    mesh = jax.make_mesh((devices,), ("data",), axis_types=(AxisType.Explicit,),
                         devices=jax.devices()[:devices])
    # i.i.d. draws (the state does not depend on it) so that the chi-square test is exact.
    sb = sharding.shard(job.make_buffer("independent"), mesh, sampling="global")
    path = os.path.join(directory, "checkpoint")
    checkpointer = ocp.StandardCheckpointer()
    saved = checkpointer.metadata(path).item_metadata["priorities"]["sum_tree"].shape[0]
    assert saved == SHARDS
    target = flax_replay.to_collections(sb.abstract_state(job.example(), num_shards=saved))
    restored = checkpointer.restore(path, target)
    state_type = type(jax.eval_shape(sb.buffer.init, job.example()))
    state = sb.reshard(flax_replay.from_collections(state_type, restored))

    assert state.experience["step"].sharding.num_devices == devices
    for name, value in _expected_experience().items():
        np.testing.assert_array_equal(state.experience[name], value)
    assert int(state.current_index) == 2 and int(state.running_index) == 8
    sums = np.asarray(state.priority_state.sum_tree)
    assert sums.shape[0] == devices
    leaves = _leaves(sums)
    np.testing.assert_array_equal(leaves, _leaves(result["state['priorities']['sum_tree']"]))
    np.testing.assert_array_equal(
        _leaves(np.asarray(state.priority_state.min_tree)),
        _leaves(result["state['priorities']['min_tree']"]))
    old_max = result["state['priorities']['max_priority']"]
    rows_max = np.repeat(old_max, job.ROWS // SHARDS)
    np.testing.assert_array_equal(state.priority_state.max_priority,
                                  rows_max.reshape(devices, -1).max(1))

    # Global sampling draws the saved leaves' distribution, and each item is the right one.
    sample = jax.jit(sb.sample, static_argnums=2)
    counts = np.zeros(leaves.shape[0])
    for seed in range(4):
        s = sample(state, jax.random.key(seed), 512)
        idx, versions = np.asarray(s.indices), np.asarray(s.versions)
        _check_sample(idx, versions, np.asarray(s.experience["step"]))
        counts += np.bincount(idx, minlength=leaves.shape[0])
    support = leaves > 0
    assert counts[~support].sum() == 0
    weights = leaves[support].astype(np.float64)
    expected = counts.sum() * weights / weights.sum()
    _, p = stats.chisquare(counts[support], expected)
    print(f"restored on {devices} devices: chi-square p={p:.3f}")
    assert p > 1e-3


def _figures(pattern: str, text: str) -> list:
    """Every match of `pattern` in the example's output (each line a candidate)."""
    found = re.findall(pattern, text, re.M)
    assert found, f"{pattern!r} not in:\n{text[-3000:]}"
    return found


def test_sharded_replay_example(tmp_path):
    """examples/sharded_replay.py, checked against figures computed here: the buffer holds
    exactly the steps the example generates (and so does the checkpoint restored on 4
    devices), every valid item starts at priority 1, local sampling keeps each device's draws
    in its own shard at the exact probability, the sum tree's total after set_priorities is
    what the new priorities make it, and add / local sample / set_priorities compile with no
    collective."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)  # the example sets its own 8 devices
    steps, envs, slots, batch = 48, 64, 100, 256  # --steps; the example's buffer
    out = subprocess.run(
        [sys.executable, os.path.join(root, "examples", "sharded_replay.py"),
         "--dir", str(tmp_path / "ckpt"), "--steps", str(steps)],
        env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert "collectives in add: none" in text
    assert "collectives in set_priorities: none" in text
    local = text.split("local sample:")[1].split("global sample:")[0]
    assert "collectives: none" in local

    # The layout: rows over the 8 devices, one sum tree per device.
    assert re.search(rf"\['experience'\]\['obs'\]\s+\({envs}, {slots}, 4\)\s+"
                     r"P\('data', None, None\)", text)
    assert re.search(r"\['sum_tree'\]\s+\(8, \d+\)\s+P\('data', None\)", text)

    # The write position and the contents: the example's fake steps, regenerated here.
    (current, running, full, can), = _figures(
        r"current_index (\d+), running_index (\d+), is_full (\w+), can_sample (\w+)", text)
    assert (int(current), int(running), full, can) == (steps, steps, "False", "True")
    want = {"obs": 0.0, "reward": 0.0, "done": 0.0}
    for i in range(steps // 4):
        k1, k2, k3 = jax.random.split(jax.random.fold_in(jax.random.key(0), i), 3)
        for name, x in (("obs", jax.random.normal(k1, (envs, 4, 4))),
                        ("reward", jax.random.uniform(k2, (envs, 4))),
                        ("done", jax.random.bernoulli(k3, 0.05, (envs, 4)))):
            want[name] += float(np.sum(np.asarray(x, np.float64)))
    sums = [ast.literal_eval(s) for s in _figures(r"experience sums: (\{.*\})", text)]
    assert len(sums) == 2  # after adding, and restored on 4 devices
    for got in sums:
        assert got.keys() == want.keys()
        for name in want:
            assert got[name] == pytest.approx(want[name], rel=1e-9, abs=1e-9), name

    # Priorities: a flat item is a step and the next, so a row holds steps - 1 valid items,
    # each at the initial priority 1; sampling is uniform over them.
    valid = envs * (steps - 1)
    (total,) = _figures(r"^priority total ([\d.]+)$", text)
    assert float(total) == valid
    lines = {m[0]: m[1:] for m in re.findall(
        r"^(local|global) sample: first.obs \((\d+), 4\).*items per shard \[([\d ]+)\]; "
        r"probabilities ([\d.e-]+)\.\.([\d.e-]+)$", text, re.M)}
    assert set(lines) == {"local", "global"}, text
    for mode, (b, per_shard, p_min, p_max) in lines.items():
        counts = [int(c) for c in per_shard.split()]
        assert int(b) == batch and sum(counts) == batch and len(counts) == 8, mode
        assert float(p_min) == pytest.approx(1 / valid) and float(p_max) == pytest.approx(
            1 / valid), mode
    assert [int(c) for c in lines["local"][1].split()] == [batch // 8] * 8
    (slices,) = _figures(r"shards in each device's slice: (.*)", text)
    assert slices == "0 1 2 3 4 5 6 7"

    # set_priorities: the new priorities replace 1 for the distinct items sampled; the tree's
    # total (on 8 devices, and restored on 4) is exactly that.
    (distinct, new, after), = _figures(r"set priorities of (\d+) distinct items, sum of p \*\* "
                                       r"0\.6 ([\d.e-]+); priority total ([\d.e-]+)", text)
    assert 0 < int(distinct) <= batch
    expected = valid - int(distinct) + float(new)
    assert float(after) == pytest.approx(expected, rel=1e-6)
    (w_min, w_max), = _figures(r"importance weights of the next sample in ([\d.e-]+)\.\."
                               r"([\d.e-]+)", text)
    assert 0 < float(w_min) <= float(w_max) <= 1

    # Checkpoint: every array back on 8 devices; on 4, one tree per new shard, same total.
    (same, arrays), = _figures(r"restored on 8 devices: (\d+) of (\d+) arrays identical", text)
    layout = re.findall(r"^  \['(?:replay|priorities)'\]", text, re.M)
    assert int(same) == int(arrays) == len(layout) > 0
    (total4,) = _figures(r"restored on 4 devices: sum_tree \(4, \d+\), priority total "
                         r"([\d.e-]+)", text)
    assert float(total4) == pytest.approx(expected, rel=1e-6)
    assert "sample on 4 devices: (256, 4) P('data', None)" in text
