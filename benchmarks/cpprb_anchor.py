"""flax_replay's prioritised buffer against cpprb's C++ sum tree, in one process and one run.

    python -m benchmarks.cpprb_anchor            # 1e4, 1e5, 1e6 items
    python -m benchmarks.cpprb_anchor --quick    # 1e4 only, fewer rounds

cpprb's `PrioritizedReplayBuffer` is what a CPU user would pick: a C++ sum tree called from
Python. The workloads are those of benchmarks/run.py's prioritised flat buffer with (8,)
float32 items: `add` of 1 and of 128 transitions, `sample` of 256, `set_priorities`
(cpprb: `update_priorities`) of 256. cpprb is timed per Python call (its only way to run);
flax_replay per jitted call (donated when it writes, with dispatch) and per operation in a
jitted `lax.scan` of `--steps` (512) operations (how a jitted training loop runs it). Arms alternate
within each round; a ratio is the median over rounds of the per-round ratios (< 1: flax_replay
faster). Writes benchmarks/results/cpprb.md.
"""

from __future__ import annotations

import argparse
import itertools
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

warnings.filterwarnings("ignore")
SAMPLE, ALPHA, ITEM = 256, 0.6, 8
OPS = ("add 1", "add 128", "sample 256", "set_priorities 256")


def _best(fn, reps: int) -> float:
    """Median seconds per call of `fn()` over `reps` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cpprb_arm(capacity: int, rng: np.random.Generator) -> dict:
    import cpprb

    rb = cpprb.PrioritizedReplayBuffer(capacity, {"obs": {"shape": ITEM}}, alpha=ALPHA)
    for _ in range(capacity // 1000):
        rb.add(obs=rng.random((1000, ITEM), np.float32))
    one, many = rng.random((1, ITEM), np.float32), rng.random((128, ITEM), np.float32)
    # A new set of random indices at each call, as flax_replay's scan has (the same 256
    # indices every time would keep their tree paths in cache).
    pool = [(rng.integers(0, capacity, SAMPLE), rng.random(SAMPLE) + 0.1) for _ in range(64)]
    turn = itertools.count()

    def update():
        idx, p = pool[next(turn) % len(pool)]
        rb.update_priorities(idx, p)

    return {
        "add 1": lambda: rb.add(obs=one),
        "add 128": lambda: rb.add(obs=many),
        "sample 256": lambda: rb.sample(SAMPLE, beta=0.4),
        "set_priorities 256": update,
    }


def flax_replay_arms(capacity: int, steps: int, rng: np.random.Generator) -> tuple[dict, dict]:
    """(per-call ops, per-scanned-op ops): each a zero-argument function that blocks."""
    bufs = {rows: flax_replay.make_prioritised_flat_buffer(
        max_length=capacity, min_length=SAMPLE, sample_batch_size=SAMPLE,
        add_batch_size=None if rows == 1 else rows, priority_exponent=ALPHA)
        for rows in (1, 128)}
    fill = jax.jit(bufs[128].add, donate_argnums=0)
    state = bufs[128].init({"obs": jnp.zeros((ITEM,), jnp.float32)})
    for _ in range(-(-capacity // 128) + 1):
        state = fill(state, {"obs": jnp.asarray(rng.random((128, ITEM), np.float32))})
    holder = {"s": state}  # single-row adds use a state of the one-row buffer
    holder["s1"] = bufs[1].init({"obs": jnp.zeros((ITEM,), jnp.float32)})
    fill1 = jax.jit(lambda s, x: jax.lax.scan(lambda s, x: (bufs[1].add(s, {"obs": x}), None),
                                              s, x)[0], donate_argnums=0)
    holder["s1"] = fill1(holder["s1"], jnp.asarray(rng.random((capacity + 1, ITEM), np.float32)))
    buf = bufs[128]
    one = {"obs": jnp.asarray(rng.random((ITEM,), np.float32))}
    many = {"obs": jnp.asarray(rng.random((128, ITEM), np.float32))}
    idx = jnp.asarray(rng.integers(0, capacity, SAMPLE), jnp.int32)
    p = jnp.asarray(rng.random(SAMPLE) + 0.1, jnp.float32)
    key = jax.random.key(0)

    def run(name, fn, *args):
        def go():
            holder[name] = jax.block_until_ready(fn(holder[name], *args))
        return go

    add1 = jax.jit(bufs[1].add, donate_argnums=0)
    add128 = jax.jit(buf.add, donate_argnums=0)
    setp = jax.jit(buf.set_priorities, donate_argnums=0)
    sample = jax.jit(buf.sample)
    call = {
        "add 1": run("s1", add1, one),
        "add 128": run("s", add128, many),
        "sample 256": lambda: jax.block_until_ready(sample(holder["s"], key)),
        "set_priorities 256": run("s", setp, idx, p),
    }

    def scanned(b, body, xs):
        f = jax.jit(lambda s, xs: jax.lax.scan(lambda s, x: (body(b, s, x), None), s, xs)[0],
                    donate_argnums=0)
        return f, xs

    keys = jax.random.split(key, steps)
    ones = jnp.asarray(rng.random((steps, ITEM), np.float32))
    manys = jnp.asarray(rng.random((steps, 128, ITEM), np.float32))
    idxs = jnp.asarray(rng.integers(0, capacity, (steps, SAMPLE)), jnp.int32)
    ps = jnp.asarray(rng.random((steps, SAMPLE)) + 0.1, jnp.float32)
    read = jax.jit(lambda s, ks: jax.lax.scan(
        lambda acc, k: (acc + jnp.sum(buf.sample(s, k).experience.first["obs"]), None),
        jnp.float32(0), ks)[0])
    def scanned_add(b):
        # Each step's input read by an index from an argument, as benchmarks/run.py does
        # (`_cycled`): with the inputs scanned directly XLA:CPU compiles a loop of nothing but
        # a one-row add into one function, which a training loop never is.
        return jax.jit(lambda s, index, store: jax.lax.scan(
            lambda s, i: (b.add(s, {"obs": store[i]}), None), s, index)[0], donate_argnums=0)

    index = jnp.arange(steps, dtype=jnp.int32)
    f1, f128 = scanned_add(bufs[1]), scanned_add(buf)
    fset, _ = scanned(buf, lambda b, s, x: b.set_priorities(s, x[0], x[1]), (idxs, ps))
    scan = {
        "add 1": run("s1", f1, index, ones),
        "add 128": run("s", f128, index, manys),
        "sample 256": lambda: jax.block_until_ready(read(holder["s"], keys)),
        "set_priorities 256": run("s", fset, (idxs, ps)),
    }
    return call, scan


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=7)
    # 512: a scanned one-row add takes well under a microsecond, and a call's fixed cost
    # (15-30 us) must not be most of what is timed.
    p.add_argument("--steps", type=int, default=512, help="operations per timed scan")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpprb.md"))
    args = p.parse_args()
    capacities = [10_000] if args.quick else [10_000, 100_000, 1_000_000]
    rounds = 3 if args.quick else args.rounds
    rng = np.random.default_rng(0)
    lines = ["# flax_replay vs cpprb (PrioritizedReplayBuffer)", "",
             f"`python -m benchmarks.cpprb_anchor{' --quick' if args.quick else ''}`; "
             f"{os.cpu_count()} cores; prioritised flat buffer, (8,) float32 items; ratios "
             "flax_replay / cpprb, < 1: flax_replay faster; medians over rounds.", "",
             "| capacity | operation | cpprb us | flax_replay call us | call ratio "
             "| flax_replay scan us | scan ratio |", "|---|---|---|---|---|---|---|"]
    for capacity in capacities:
        cp = cpprb_arm(capacity, rng)
        call, scan = flax_replay_arms(capacity, args.steps, rng)
        res = {op: {"cpprb": [], "call": [], "scan": []} for op in OPS}
        for r in range(rounds):
            for op in OPS:
                arms = [("cpprb", cp[op], 1), ("call", call[op], 1),
                        ("scan", scan[op], args.steps)]
                for name, fn, per in (arms if r % 2 == 0 else arms[::-1]):
                    reps = 3 if name == "scan" else 30
                    res[op][name].append(_best(fn, reps) / per)
        for op in OPS:
            d = res[op]
            med = {a: statistics.median(d[a]) * 1e6 for a in d}
            ratio = {a: statistics.median(x / c for x, c in zip(d[a], d["cpprb"])) for a in d}
            row = (f"| {capacity:.0e} | {op} | {med['cpprb']:.1f} | {med['call']:.1f} | "
                   f"{ratio['call']:.2f} | {med['scan']:.1f} | {ratio['scan']:.2f} |")
            print(row, flush=True)
            lines.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
