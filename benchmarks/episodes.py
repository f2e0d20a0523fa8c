"""The cost of episode-aware sequences: trajectory buffers with `episode_end_key` against the
same buffers without it, in a jitted `lax.scan` (time per operation).

    python -m benchmarks.episodes                 # 1e4 and 1e6 items, ~2 minutes on 2 cores
    python -m benchmarks.episodes --rounds 3 --capacities 10000

Workloads: uniform and prioritised trajectory buffers, R rows, items of shape (D,) float32
(`--workloads RxD ...`, default 16 rows of 8 floats, and 128 rows of 64 floats: one add per
step of 128 environments), sequences of 8 steps on a period-2 grid, episodes ending with
probability 1/50 per step; `add` of one step per row and `sample` of 256 sequences (every
leaf summed, so that no gather is skipped), scanned `--add-steps` (4096) and `--steps` (64)
times: enough that the fixed cost of a call is a few percent of the time. Each buffer is
filled completely first. In each round the arms (no episodes, "within_episode", "padded")
run back to back in rotating order; a ratio is the median over rounds of the
per-round ratios to the arm without episodes. Writes benchmarks/results/episodes.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import flax_replay  # noqa: E402

SEQ, PERIOD, BATCH, END_RATE, POOL = 8, 2, 256, 1 / 50, 64
MODES = (None, "within_episode", "padded")


def make(capacity: int, prioritised: bool, mode, rows: int = 16):
    kw = dict(add_batch_size=rows, sample_batch_size=BATCH, sample_sequence_length=SEQ,
              period=PERIOD, min_length_time_axis=SEQ, max_length_time_axis=capacity // rows)
    if mode is not None:
        kw.update(episode_end_key="done", sequence_mode=mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if prioritised:
            return flax_replay.make_prioritised_trajectory_buffer(**kw)
        return flax_replay.make_trajectory_buffer(**kw)


def steps(rng: np.random.Generator, n: int, rows: int = 16, dim: int = 8) -> dict:
    return {"obs": jnp.asarray(rng.normal(size=(rows, n, dim)), jnp.float32),
            "done": jnp.asarray(rng.random((rows, n)) < END_RATE)}


def arm(capacity: int, prioritised: bool, mode, n_steps: int, rows: int = 16, dim: int = 8,
        add_steps: int = 4096):
    """(filled state, jitted scanned add, its pool of steps, jitted scanned sample, its keys)
    of one buffer."""
    buf = make(capacity, prioritised, mode, rows)
    rng = np.random.default_rng(0)
    state = buf.init({"obs": jnp.zeros((dim,), jnp.float32), "done": jnp.zeros((), bool)})
    state = jax.jit(buf.add, donate_argnums=0)(
        state, steps(rng, buf.core.max_length_time_axis, rows, dim))
    pool = steps(rng, POOL, rows, dim)
    pool = jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0)[:, :, None], pool)  # [P, R, 1, ...]

    def add_all(s, pool):
        # The steps cycle through a pool (storing n steps of 128 rows would take GBs); the
        # dynamic read of one is the same in every arm. (By a constant index: unlike
        # benchmarks/run.py's one-row prioritised adds, these measured the same with the
        # index read from an argument, 2026-12-03.)
        def body(s, i):
            return buf.add(s, jax.tree.map(lambda x: x[i % POOL], pool)), None
        return jax.lax.scan(body, s, jnp.arange(add_steps))[0]

    def sample_all(s, keys):
        def body(acc, k):
            out = buf.sample(s, k)
            # Every leaf is read, as a learner does (else the arm without episodes would skip
            # gathering "done", which the padded mode reads for its mask).
            x = out.experience
            return acc + jnp.sum(x["obs"]) + jnp.sum(x["done"]), None
        return jax.lax.scan(body, jnp.float32(0), keys)[0]

    keys = jax.random.split(jax.random.key(1), n_steps)
    return (state, jax.jit(add_all, donate_argnums=0), pool,
            jax.jit(sample_all), keys)


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    return time.perf_counter() - t0, out


def run(capacities, rounds: int, n_steps: int, rows: int = 16, dim: int = 8,
        add_steps: int = 4096) -> list[str]:
    lines = ["| buffer | capacity | op | mode | us/op (no episodes) | ratio |",
             "| --- | --- | --- | --- | --- | --- |"]
    for capacity in capacities:
        for prioritised in (False, True):
            arms = {m: arm(capacity, prioritised, m, n_steps, rows, dim, add_steps) for m in MODES}
            states = {m: a[0] for m, a in arms.items()}
            for m, (_, add, adds, sample, keys) in arms.items():  # compile
                states[m] = add(states[m], adds)
                jax.block_until_ready(sample(states[m], keys))
            times: dict = {(op, m): [] for op in ("add", "sample") for m in MODES}
            for r in range(rounds):
                order = MODES[r % 3:] + MODES[: r % 3]
                for m in order:
                    _, add, adds, sample, keys = arms[m]
                    dt, states[m] = timed(add, states[m], adds)
                    times[("add", m)].append(dt / add_steps)
                    dt, _ = timed(sample, states[m], keys)
                    times[("sample", m)].append(dt / n_steps)
            name = "prioritised trajectory" if prioritised else "trajectory"
            for op in ("add", "sample"):
                base = times[(op, None)]
                for m in MODES[1:]:
                    ratio = statistics.median(t / b for t, b in zip(times[(op, m)], base))
                    line = (f"| {name} | {capacity:.0e} | {op} | {m} | "
                            f"{statistics.median(base) * 1e6:.1f} | {ratio:.2f} |")
                    print(line, flush=True)
                    lines.append(line)
            del arms, states
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--capacities", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=64, help="samples per timed scan")
    parser.add_argument("--add-steps", type=int, default=4096,
                        help="adds per timed scan: enough that a call's fixed cost (15-150 us "
                        "after other work) is under 0.04 us per add")
    parser.add_argument("--workloads", nargs="+", default=["16x8", "128x64"],
                        help="ROWSxDIM: rows per add and floats per item")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "episodes.md"))
    args = parser.parse_args()
    text = ("# Episode-aware trajectory buffers: cost against the same buffer without "
            "episodes\n\n`python -m benchmarks.episodes` (jax " + jax.__version__ + ", "
            + str(os.cpu_count()) + " CPUs); load average at the start "
            + f"{os.getloadavg()[0]:.1f}.\n")
    for workload in args.workloads:
        rows, dim = (int(x) for x in workload.split("x"))
        lines = run(args.capacities, args.rounds, args.steps, rows, dim, args.add_steps)
        text += (f"\n## {rows} rows, items ({dim},) float32\n\nSequences of {SEQ}, period "
                 f"{PERIOD}, `add` of 1 step per row scanned "
                 f"{args.add_steps} times, `sample` of {BATCH} scanned {args.steps} times; "
                 f"median over {args.rounds} rounds of the per-round ratio.\n\n"
                 + "\n".join(lines) + "\n")
    text += f"\nLoad average at the end {os.getloadavg()[0]:.1f}.\n"
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
