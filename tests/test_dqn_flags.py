"""The DQN example's rerun rules, in-process and without training (fast): the flags stored with
its checkpoints, a rerun with other flags refused naming them (and --fresh), the flags that
may change, and the cumulative wall time. tests/test_dqn_example.py runs the whole thing."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import pytest

import flax_replay as fbx
from flax_replay import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import dqn_per as dqn

BASE = ["--total-steps", "4000", "--chunk-steps", "200", "--num-envs", "4", "--batch-size",
        "16"]


def _checkpoint(directory: Path, argv: list[str], wall: float) -> None:
    """A checkpoint step as the example writes it: some state, and the run's metadata."""
    args = dqn.parse_args(argv + ["--checkpoint-dir", str(directory)])
    state = fbx.TrainState.create(apply_fn=None, params={"w": jnp.ones(2)}, tx=optax.sgd(0.1))
    manager = checkpoint.make_manager(directory, enable_async=False)
    assert checkpoint.save(manager, 200, state, jax.random.key(0),
                           metadata=dqn.run_metadata(args, wall))
    manager.close()


def _check(directory: Path, argv: list[str]) -> float:
    args = dqn.parse_args(argv + ["--checkpoint-dir", str(directory)])
    return dqn.check_rerun(checkpoint.make_manager(directory), args, directory)


def test_rerun_with_other_flags_is_refused_naming_them(tmp_path):
    _checkpoint(tmp_path, BASE, wall=12.5)
    with pytest.raises(SystemExit) as info:
        _check(tmp_path, ["--total-steps", "8000", "--chunk-steps", "200", "--num-envs", "4",
                          "--batch-size", "32", "--alpha", "0.5"])
    message = str(info.value.code)
    assert "--total-steps: 4000 in the checkpoints, 8000 now" in message, message
    assert "--batch-size: 16 in the checkpoints, 32 now" in message
    assert "--alpha: 0.6 in the checkpoints, 0.5 now" in message
    assert "--fresh" in message and "--num-envs" not in message  # only what differs
    for safe in ("--stop-at", "--checkpoint-every", "--eval-episodes", "--no-progress"):
        assert safe in message.split("may change on a rerun:")[1]


def test_rerun_with_the_same_or_safe_flags_continues_with_the_wall_time_so_far(tmp_path):
    _checkpoint(tmp_path, BASE, wall=12.5)
    assert _check(tmp_path, BASE) == 12.5
    assert _check(tmp_path, BASE + ["--stop-at", "400", "--checkpoint-every", "9",
                                    "--eval-episodes", "3", "--no-progress"]) == 12.5


def test_new_run_and_old_checkpoints_have_no_flags_to_compare(tmp_path):
    assert _check(tmp_path / "new", BASE) == 0.0  # no checkpoint yet
    state = fbx.TrainState.create(apply_fn=None, params={"w": jnp.ones(2)}, tx=optax.sgd(0.1))
    manager = checkpoint.make_manager(tmp_path / "old", enable_async=False)
    assert checkpoint.save(manager, 200, state, jax.random.key(0))  # no metadata
    manager.close()
    assert _check(tmp_path / "old", ["--batch-size", "64"]) == 0.0


def test_stored_flags_are_json_and_exclude_the_safe_ones(tmp_path):
    args = dqn.parse_args(BASE + ["--checkpoint-dir", str(tmp_path), "--stop-at", "400"])
    flags = dqn.run_flags(args)
    assert not set(flags) & set(dqn.SAFE_FLAGS)
    assert flags["total_steps"] == 4000 and flags["hidden"] == [128, 128]
    assert dqn.stop_at(args) == 400
    assert dqn.stop_at(dqn.parse_args(BASE + ["--stop-at", "8000"])) == 4000
    with pytest.raises(SystemExit):  # a stop between chunks cannot be honoured
        dqn.parse_args(BASE + ["--stop-at", "300"])
