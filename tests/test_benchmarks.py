"""The benchmarks work before they are run for real: device.sh's --smoke run on CPU, vmap.py and
e2e.py at tiny sizes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_e2e_benchmark_runs_both_arms_the_same_number_of_steps(tmp_path):
    """benchmarks/e2e.py at tiny sizes: the example's training on flax_replay's buffer and on
    Flashbax's (through the benchmark's adapter) runs the same env steps and updates, both
    learn from the same initial parameters, and the report gives the ratio. (The breakdown's
    six scans would double the test's time: left to the real run.)"""
    pytest.importorskip("flashbax")
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import e2e
    finally:
        sys.path.remove(str(ROOT))
    out = tmp_path / "e2e.md"
    result = e2e.main(["--total-steps", "400", "--rounds", "1", "--no-breakdown",
                       "--out", str(out), "--",
                       "--num-envs", "4", "--chunk-steps", "200", "--buffer-size", "2000",
                       "--batch-size", "16", "--learning-starts", "100", "--hidden", "16",
                       "--eval-episodes", "2"])
    ours, theirs = result["runs"]["flax_replay"][0], result["runs"]["flashbax"][0]
    assert ours["env_steps"] == theirs["env_steps"] == 400
    # One update per vectorised step from step 100 on (the first at t = 100).
    assert ours["updates"] == theirs["updates"] == (400 - 100) // 4 + 1
    assert result["ratio"] == pytest.approx(ours["sps"] / theirs["sps"])
    for o in (ours, theirs):
        assert o["sps"] > 0 and 0 < o["greedy_return"] <= 500
    text = out.read_text()
    assert f"{result['ratio']:.3f}" in text and "load average" in text
    assert "| 1 | flax_replay | " in text and "| 1 | flashbax | " in text
