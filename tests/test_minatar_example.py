"""examples/minatar_dqn.py runs as a script with a tiny budget: the bytes line says one frame per
step is about 4x less than stacks, the sampled stacks have 4 frames, every chunk learned with a
finite loss, and the curve's PNG is written. Learning itself is not tested (see README for the
measured default run)."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--total-steps", "1024", "--chunk-steps", "512", "--num-envs", "8",
        "--learning-starts", "128", "--buffer-size", "2048", "--batch-size", "16",
        "--eval-episodes", "2"]


def test_minatar_dqn_example(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device is enough
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    png = tmp_path / "curve.png"
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "minatar_dqn.py"), *TINY,
                          "--out", str(png)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout

    stored, stacked, ratio = map(float, re.search(
        r"buffer state: ([\d.]+) MB with one frame per step; storing 4-frame stacks: "
        r"([\d.]+) MB \(([\d.]+)x more\)", out).groups())
    # 2048 steps of 10x10x4 uint8 screens: 0.8 MB stored once, 3.3 MB as stacks.
    assert 0.8 <= stored < 1.0 and 3.3 <= stacked < 3.5 and 3.5 < ratio < 4.0, out

    chunks = re.findall(r"step +(\d+) .* episodes +(\d+) +mean return +([\d.]+) +loss (\S+)",
                        out)
    assert [int(c[0]) for c in chunks] == [512, 1024], out
    assert all(math.isfinite(float(c[3])) and float(c[3]) >= 0 for c in chunks), out
    assert "sampled stacks: first (16, 10, 10, 4, 4) second (16, 10, 10, 4, 4) uint8" in out

    random_return = float(re.search(r"random policy: mean return ([\d.]+) over 2", out)[1])
    greedy_return = float(re.search(r"greedy policy: mean return ([\d.]+) over 2", out)[1])
    assert 0 <= random_return < 50 and 0 <= greedy_return < 1000, out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
