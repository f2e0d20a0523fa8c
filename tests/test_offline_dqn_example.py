"""examples/offline_dqn.py end to end with tiny flags, in a subprocess: the recorded vault must
hold every step the online agent took (its buffer wrapped twice in between), Flashbax must read
that vault, and the offline phase must load it into a ready buffer and produce its curve.
Learning itself is not tested here (see README, "Offline data", for a measured run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
NUM_ENVS, RECORD, BUFFER = 4, 1600, 800


def test_offline_dqn_example(tmp_path, monkeypatch):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)
    flags = ["--record-steps", str(RECORD), "--chunk-steps", "400", "--num-envs", str(NUM_ENVS),
             "--buffer-size", str(BUFFER), "--learning-starts", "100", "--batch-size", "16",
             "--updates", "100", "--update-chunk", "50", "--hidden", "16",
             "--eval-episodes", "2", "--out-dir", str(tmp_path)]
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "offline_dqn.py"), *flags],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    steps = RECORD // NUM_ENVS  # 400 per row; the online buffer holds 200 per row
    assert summary["record"]["vault_steps_per_row"] == steps
    assert summary["record"]["vault_rows"] == NUM_ENVS
    off = summary["offline"]
    assert [c["updates"] for c in off["curve"]] == [50, 100]
    # A buffer of exactly the vault's size, loaded full.
    assert off["offline_buffer_current_index"] == 0 and off["offline_buffer_is_full"]
    assert (tmp_path / "learning_curve.png").stat().st_size > 0

    from flashbax.vault import Vault as FlashbaxVault

    monkeypatch.chdir(tmp_path)
    data = FlashbaxVault("cartpole_dqn", rel_dir="vaults", vault_uid="record").read().experience
    assert data["obs"].shape == (NUM_ENVS, steps, 4)
    # Consecutive steps of an episode: CartPole's position moves by at most 0.02 * 10 a step.
    obs = np.asarray(data["obs"])
    ended = np.asarray(data["terminated"] | data["truncated"])[:, :-1]
    jump = np.abs(np.diff(obs[..., 0], axis=1))
    assert np.all(jump[~ended] < 0.25)
