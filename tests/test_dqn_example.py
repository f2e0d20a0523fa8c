"""The DQN examples end to end, in subprocesses, with tiny settings: the Linen example is killed
(SIGKILL) once a checkpoint exists and resumes from it when run again (env steps, update count
and the buffer's running index restored), then writes its learning curve and summary; the NNX
example runs a few chunks. Learning itself is not tested here (see README for the measured
default run)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
NUM_ENVS, CHUNK = 4, 200
TINY = [
    "--num-envs", str(NUM_ENVS), "--chunk-steps", str(CHUNK), "--checkpoint-every", "1",
    "--buffer-size", "2000", "--batch-size", "16", "--learning-starts", "100",
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


def _outputs(directory: Path) -> dict:
    png = directory / "learning_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "learning_curve.png is not a PNG"
    return json.loads((directory / "summary.json").read_text())


def test_linen_example_resumes_after_sigkill_and_nnx_example_runs(tmp_path):
    linen_dir, nnx_dir = tmp_path / "linen", tmp_path / "nnx"
    # Runs far longer than the test waits: it is killed once a checkpoint is on disk.
    first = _launch("dqn_per.py", "--checkpoint-dir", str(linen_dir), "--total-steps",
                    str(1000 * CHUNK))
    nnx_steps = 3 * CHUNK
    nnx_run = _launch("dqn_per_nnx.py", "--checkpoint-dir", str(nnx_dir), "--total-steps",
                      str(nnx_steps), "--checkpoint-every", "2")
    try:
        deadline = time.monotonic() + 150
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
    nnx = _outputs(nnx_dir)
    assert nnx["env_steps"] == nnx_steps and nnx["resumed_from_step"] == 0
    assert nnx["buffer_running_index"] == nnx_steps // NUM_ENVS
    assert _steps(nnx_dir)[-1] == nnx_steps, nnx_out
    assert "learning curve:" in nnx_out

    # Linen: the rerun resumes from the newest finished checkpoint, buffer included.
    saved = _steps(linen_dir)[-1]
    assert saved > 0 and saved % CHUNK == 0
    assert not (linen_dir / "summary.json").exists()  # killed before the end
    total = saved + 2 * CHUNK
    out = _finish(_launch("dqn_per.py", "--checkpoint-dir", str(linen_dir), "--total-steps",
                          str(total)), timeout=240)
    match = re.search(r"resumed from step (\d+) .*buffer running index (\d+), (\d+) updates",
                      out)
    assert match, out[-4000:]
    step, running_index, updates = map(int, match.groups())
    assert step == saved
    assert running_index == saved // NUM_ENVS  # a fresh buffer would say 0
    assert updates > 0  # the optimizer's step counter came back too
    assert f"step {saved + CHUNK}:" in out and f"step {saved}:" not in out  # no rerun chunks

    summary = _outputs(linen_dir)
    assert summary["resumed_from_step"] == saved
    assert summary["env_steps"] == total
    assert summary["buffer_running_index"] == total // NUM_ENVS
    assert summary["eval_episodes"] == 2 and 0 < summary["final_greedy_return"] <= 500
    assert _steps(linen_dir)[-1] == total
    # The learning curve spans the whole run: rows from before the kill are kept.
    rows = [json.loads(r) for r in (linen_dir / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(CHUNK, total + 1, CHUNK))

    # Another buffer capacity cannot resume this run: refused (before any training), with
    # the way out named.
    other = _launch("dqn_per.py", "--checkpoint-dir", str(linen_dir), "--total-steps",
                    str(total + CHUNK), "--buffer-size", "4000")
    out, _ = other.communicate(timeout=120)
    assert other.returncode != 0 and "buffer capacity differs" in out and "--fresh" in out, out
    assert _steps(linen_dir)[-1] == total


def test_example_refuses_flags_it_cannot_honour(tmp_path):
    out = subprocess.run(  # a chunk must be a whole number of vectorised steps
        [sys.executable, str(EXAMPLES / "dqn_per.py"), "--num-envs", "4", "--chunk-steps",
         "202", "--total-steps", "404", "--checkpoint-dir", str(tmp_path)],
        env=_env(), cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode != 0 and "must be a multiple of" in out.stderr, out.stderr
