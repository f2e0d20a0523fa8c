"""benchmarks/device.sh must work before an accelerator runs it: its --smoke run, on CPU."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_script_smoke_run_writes_results(tmp_path):
    env = {**os.environ, "FLAX_REPLAY_NO_INSTALL": "1", "PYTHON": sys.executable,
           "JAX_PLATFORMS": "cpu"}
    out = tmp_path / "cpu"
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "device.sh"), "--smoke", "--out",
                          str(out), "--no-views"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    text = (out / "RESULTS.md").read_text()
    assert "CPU" in text.splitlines()[0]
    for item in ("| 8 |", "| 84x84uint8 |"):
        for op in ("add", "sample", "set_priorities", "sample+set_priorities"):
            for regime in ("call", "scan"):
                rows = [ln for ln in text.splitlines()
                        if item in ln and f"| {op} | {regime} |" in ln]
                assert rows, (item, op, regime)
                # flax_replay's and Flashbax's times are positive numbers.
                cells = [c.strip() for c in rows[0].split("|")]
                assert float(cells[7]) > 0 and float(cells[8]) > 0, rows[0]


def test_vmap_benchmark_tiny_run_gives_a_row_per_op_and_batch():
    """benchmarks/vmap.py at tiny sizes: every configuration runs (unbatched and vmapped,
    scanned), and the table has a row per operation and batch."""
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import vmap
    finally:
        sys.path.remove(str(ROOT))
    times = vmap.bench("flax_replay", "prioritised_flat", [2], max_length=64, add_batch=4,
                       sample_batch=4, reps=1, rounds=1, scan=2)
    assert set(times) == {("", 0), ("", 2)}
    assert all(set(per_op) == {"add", "sample", "set_priorities"} for per_op in times.values())
    rows = vmap.table(times)
    assert len(rows) == 2 + 3 * 2, rows  # header, rule, then (op, n) for 3 ops and n = 0, 2
    assert all(t > 0 for per_op in times.values() for ts in per_op.values() for t in ts)
