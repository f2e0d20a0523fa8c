"""The DQN examples end to end, in subprocesses, with tiny settings: the Linen example is killed
(SIGKILL) once a checkpoint exists and resumes from it when run again, then writes its learning
curve and summary; the NNX example runs a few chunks and resumes too. The counts a resumed run
reaches (env steps, gradient updates, the buffer's running index) must equal those of an
uninterrupted run, computed here from the flags; the history must have one row per chunk.
Learning itself is not tested here (see README for the measured default run)."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
NUM_ENVS, CHUNK, LEARNING_STARTS = 4, 200, 100
TINY = [
    "--num-envs", str(NUM_ENVS), "--chunk-steps", str(CHUNK), "--checkpoint-every", "1",
    "--buffer-size", "2000", "--batch-size", "16", "--learning-starts", str(LEARNING_STARTS),
    "--hidden", "16", "--eval-episodes", "2", "--no-progress",
]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("XLA_FLAGS", None)  # one host device is all the examples use
    return env


def _launch(script: str, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(EXAMPLES / script), *TINY, *flags], env=_env(), cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _steps(directory: Path) -> list[int]:
    """Finished checkpoint steps (Orbax renames a step's directory into place when done)."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _finish(proc: subprocess.Popen, timeout: float) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{out[-4000:]}"
    return out


def _updates(env_steps: int) -> int:
    """Gradient updates an uninterrupted run has taken after `env_steps`: one per vectorised
    step from the one that reaches --learning-starts on (--train-every 1; the 16-item batch
    can be sampled long before)."""
    return sum(1 for t in range(NUM_ENVS, env_steps + 1, NUM_ENVS) if t >= LEARNING_STARTS)


def _history(directory: Path) -> list[dict]:
    return [json.loads(r) for r in (directory / "history.jsonl").read_text().splitlines()]


def _outputs(directory: Path, total: int, resumed_from: int) -> dict:
    """Checks the run's outputs against an uninterrupted run of `total` env steps; returns
    the summary."""
    png = directory / "learning_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "learning_curve.png is not a PNG"
    summary = json.loads((directory / "summary.json").read_text())
    assert summary["env_steps"] == total and summary["resumed_from_step"] == resumed_from
    assert summary["buffer_running_index"] == total // NUM_ENVS  # one transition per env step
    assert summary["updates"] == _updates(total)
    assert _steps(directory)[-1] == total  # the last checkpoint is the end of the run
    # A greedy CartPole return is a whole number of steps in [1, 500]: the mean of 2 episodes
    # a multiple of 1/2, never below their minimum.
    final, low = summary["final_greedy_return"], summary["final_greedy_return_min"]
    assert summary["eval_episodes"] == 2 and isinstance(final, float)
    assert 1 <= low <= final <= 500 and (2 * final).is_integer() and low.is_integer()
    assert summary["solved"] is (final >= 475)
    # One row a chunk, the whole run (rows from before a kill kept); every chunk learned, so
    # every loss is a finite number, and every chunk ended some (whole-step) episodes.
    rows = _history(directory)
    assert [r["step"] for r in rows] == list(range(CHUNK, total + 1, CHUNK))
    for r in rows:
        assert isinstance(r["loss"], float) and math.isfinite(r["loss"]) and r["loss"] >= 0, r
        assert r["episodes"] >= 1 and 1 <= r["return"] <= 500, r
        assert 1 <= r["greedy"] <= 500 and (2 * r["greedy"]).is_integer() and r["sps"] > 0, r
    return summary


def _resumed(out: str) -> tuple[int, int, int]:
    """(step, buffer running index, updates) of the "resumed from" line."""
    match = re.search(r"resumed from step (\d+) .*buffer running index (\d+), (\d+) updates",
                      out)
    assert match, out[-4000:]
    return tuple(map(int, match.groups()))


def test_linen_example_resumes_after_sigkill_and_nnx_example_runs(tmp_path):
    linen_dir, nnx_dir = tmp_path / "linen", tmp_path / "nnx"
    # Runs far longer than the test waits: it is killed once a checkpoint is on disk. Every
    # rerun keeps its flags (other flags are refused); --stop-at may change.
    long = ["--total-steps", str(1000 * CHUNK)]
    first = _launch("dqn_per.py", "--checkpoint-dir", str(linen_dir), *long)
    nnx_steps = 3 * CHUNK
    nnx_flags = ["--checkpoint-dir", str(nnx_dir), "--total-steps", str(nnx_steps + CHUNK)]
    nnx_run = _launch("dqn_per_nnx.py", *nnx_flags, "--stop-at", str(nnx_steps),
                      "--checkpoint-every", "2")
    try:
        deadline = time.monotonic() + 600  # generous: a loaded machine is slow, not wrong
        while not _steps(linen_dir):
            assert first.poll() is None, f"exited early:\n{first.stdout.read()[-4000:]}"
            assert time.monotonic() < deadline, "no checkpoint written in time"
            time.sleep(0.2)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        assert first.returncode == -signal.SIGKILL
        nnx_out = _finish(nnx_run, timeout=240)
    finally:
        for proc in (first, nnx_run):
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    # NNX: ran, checkpointed, evaluated and wrote its figures.
    _outputs(nnx_dir, nnx_steps, resumed_from=0)
    assert "learning curve:" in nnx_out

    # Linen: the rerun resumes from the newest finished checkpoint, buffer and optimizer
    # included, and ends where an uninterrupted run ends. The NNX run resumes alongside.
    saved = _steps(linen_dir)[-1]
    assert saved > 0 and saved % CHUNK == 0
    assert not (linen_dir / "summary.json").exists()  # killed before the end
    before = _history(linen_dir)  # may have rows past `saved`: chunks done after that save
    assert [r["step"] for r in before][: saved // CHUNK] == list(range(CHUNK, saved + 1, CHUNK))
    total = saved + 2 * CHUNK
    from flax_replay import checkpoint  # the wall time the killed run had stored

    wall_saved = checkpoint.run_metadata(checkpoint.make_manager(linen_dir))["wall_time_s"]
    assert wall_saved > 0
    rerun = _launch("dqn_per.py", "--checkpoint-dir", str(linen_dir), *long, "--stop-at",
                    str(total))
    nnx_rerun = _launch("dqn_per_nnx.py", *nnx_flags)
    try:
        out, nnx_out = _finish(rerun, timeout=240), _finish(nnx_rerun, timeout=240)
    finally:
        for proc in (rerun, nnx_rerun):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    # A fresh buffer would say running index 0, a fresh optimizer 0 updates.
    assert _resumed(out) == (saved, saved // NUM_ENVS, _updates(saved))
    assert f"step {saved + CHUNK}:" in out and f"step {saved}:" not in out  # no rerun chunks
    summary = _outputs(linen_dir, total, resumed_from=saved)
    assert _history(linen_dir)[: saved // CHUNK] == before[: saved // CHUNK]
    # Cumulative wall time: the killed run's (up to its checkpoint) + this invocation's.
    assert summary["wall_time_s"] >= wall_saved + summary["wall_time_this_invocation_s"] - 0.2
    assert _resumed(nnx_out) == (nnx_steps, nnx_steps // NUM_ENVS, _updates(nnx_steps))
    _outputs(nnx_dir, nnx_steps + CHUNK, resumed_from=nnx_steps)

    # Run again at its end: resumes, trains nothing, evaluates and rewrites the same figures.
    out = _finish(_launch("dqn_per.py", "--checkpoint-dir", str(linen_dir), *long,
                          "--stop-at", str(total)), timeout=240)
    assert _resumed(out) == (total, total // NUM_ENVS, _updates(total))
    assert not re.search(r"^step \d+:", out, re.M), out
    _outputs(linen_dir, total, resumed_from=total)

    # Other schedules, batch size or buffer capacity cannot resume this run: refused (before
    # any training), each flag named, with the way out.
    other = _launch("dqn_per.py", "--checkpoint-dir", str(linen_dir), "--total-steps",
                    str(total + CHUNK), "--buffer-size", "4000", "--batch-size", "32")
    out, _ = other.communicate(timeout=120)
    assert other.returncode != 0 and "--fresh" in out, out
    for flag in ("--total-steps", "--buffer-size", "--batch-size"):
        assert f"{flag}: " in out, (flag, out)
    assert _steps(linen_dir)[-1] == total

    # --fresh starts over in the same directory: the old checkpoints and history are gone.
    out = _finish(_launch("dqn_per.py", "--checkpoint-dir", str(linen_dir), "--total-steps",
                          str(CHUNK), "--fresh"), timeout=240)
    assert "resumed" not in out
    _outputs(linen_dir, CHUNK, resumed_from=0)
    assert _steps(linen_dir) == [CHUNK]


def test_example_refuses_flags_it_cannot_honour(tmp_path):
    out = subprocess.run(  # a chunk must be a whole number of vectorised steps
        [sys.executable, str(EXAMPLES / "dqn_per.py"), "--num-envs", "4", "--chunk-steps",
         "202", "--total-steps", "404", "--checkpoint-dir", str(tmp_path)],
        env=_env(), cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode != 0 and "must be a multiple of" in out.stderr, out.stderr
