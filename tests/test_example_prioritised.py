"""The prioritised quickstart example runs as a script and prints what the seed notebook did."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "quickstart_prioritised_flat_buffer.py"


def test_quickstart_prioritised():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    print(out)
    lines = out.splitlines()
    # The seed's keys (ours add probabilities and versions) and shapes.
    assert lines.count(
        "dict_keys(['experience', 'indices', 'priorities', 'probabilities', 'versions'])") == 2
    assert lines.count("experience keys: dict_keys(['obs', 'reward'])") == 4
    assert lines.count("obs shape: (4, 2)") == 2
    assert "priorities: [1. 1. 1. 1.]" in lines
    assert "dict_keys(['experience', 'current_index', 'is_full', 'running_index', " \
           "'priority_state'])" in lines
    assert "(6, 5, 2)" in lines
    # The priority after set_priorities: 10008 ** 0.6 in float32 on CPU, and in float64.
    assert re.search(r"^priorities: \[251\.30925( 251\.30925){3}\] == "
                     r"new_priorities\*\*priority_exponent == 251\.3092", out, re.M), out
    assert re.search(r"^float64: 10008\.0 \*\* 0\.6 == 251\.30919441", out, re.M)
    # Linen and NNX: the same draws and shapes from their collections / Variables.
    indices = re.search(r"^indices: (\[.*\])$", out, re.M)[1]
    for view in ("linen", "nnx"):
        assert f"{view} indices: {indices}" in lines
        assert f"{view} priorities: [251.30925 251.30925 251.30925 251.30925]" in lines
        assert f"{view} obs shape: (4, 2)" in lines
        assert f"{view} experience shape: (6, 5, 2)" in lines
    assert "linen collections: ['replay', 'priorities']" in lines
    assert "nnx Priorities: ['max_priority', 'min_tree', 'sum_tree']" in lines
    assert lines[-1] == "functional, Linen and NNX drew the same indices"
