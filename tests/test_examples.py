"""The trajectory quickstart example runs as a script and prints what the seed notebook did."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "quickstart_trajectory_buffer.py"

# What the Flashbax trajectory-buffer quickstart printed, in order.
SEED_LINES = [
    "dict_keys(['obs', 'reward'])",
    "(4, 8)",
    "dict_keys(['experience', 'current_index', 'is_full'])",
    "dict_keys(['obs', 'reward'])",
    "(6, 32, 2)",
    "dict_keys(['obs', 'reward'])",
    "(4, 8)",
]


def _sections(out: str) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    name = None
    for line in out.splitlines():
        if line.startswith("== ") and line.endswith(" =="):
            name = line[3:-3]
            sections[name] = []
        elif name is not None:
            sections[name].append(line)
    return sections


def test_quickstart_trajectory():
    # The script sets its own device count (chex.set_n_cpu_devices(2), as the seed does): drop
    # the 8-device flag the test process runs with.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    sections = _sections(run.stdout)
    assert list(sections) == ["functional", "pmap", "linen", "nnx"], run.stdout
    # The functional API prints exactly what Flashbax printed; the views print the same.
    assert sections["functional"] == SEED_LINES, run.stdout
    assert sections["linen"][: len(SEED_LINES)] == SEED_LINES, run.stdout
    assert sections["nnx"][: len(SEED_LINES)] == SEED_LINES, run.stdout
    # The buffer is Flax state: exactly the buffer's fields, in "replay" / `Replay`.
    assert "linen collections: ['replay']" in sections["linen"]
    assert "linen replay: ['current_index', 'experience', 'is_full']" in sections["linen"]
    assert "nnx Replay: ['current_index', 'experience', 'is_full']" in sections["nnx"]
    # One buffer per device on the 2 devices the script sets up.
    assert sections["pmap"] == [
        "devices: 2",
        "pmap experience shape: (2, 6, 32, 2)",
        "pmap sample shape: (2, 4, 8)",
    ]
