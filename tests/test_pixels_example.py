"""examples/pixels.py runs as a script: stacks checked against the generated frames, and the
bytes it reports are one frame per step, about 4x less than stacked observations."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_pixels_example():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "pixels.py"), "--capacity",
                          "1000", "--memory-kind", "pinned_host"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert "sample first obs: (32, 84, 84, 4) uint8" in out
    assert "stack check: ok" in out
    assert "experience memory: pinned_host" in out
    limit, less = re.search(r"\(([\d.]+)x one frame per step\).*\(([\d.]+)x less\)", out).groups()
    assert 1.0 <= float(limit) <= 1.05 and 3.8 <= float(less) <= 4.0, out
