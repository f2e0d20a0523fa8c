"""Peak resident memory while filling a replay buffer of >= 2 GB, in a fresh process.

    python benchmarks/memory.py [--library flax_replay|flashbax] [--gb 2.0] [--json]
    python benchmarks/memory.py --atari [--capacities 1e4 1e5] [--json]   # pixel buffers

`--atari`: see `atari_main` (Atari-shaped prioritised n-step buffers, `frame_stack` against
stacked observations).

A flat buffer of (32, 32, 3) float32 items (12 KiB each), 128 rows per add, is created and
filled completely by one jitted, donated `lax.fori_loop` of adds. The process's own
accounting is read from /proc/self/status: VmRSS after the imports and the compilation of a
tiny buffer (the fixed overhead), and VmHWM (the peak) after the fill. With the buffer written
in place, the peak is the buffer plus that overhead; a hidden copy would show as a peak near
twice the buffer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

ITEM = (32, 32, 3)
ROWS = 128


def status_gb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM), in GB (1e9 bytes)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / 1e9
    raise KeyError(field)


def filler(lib, max_length: int):
    buffer = lib.make_flat_buffer(max_length=max_length, min_length=1, sample_batch_size=1,
                                  add_batch_size=ROWS)
    steps = max_length // ROWS

    def fill(state):
        x = jnp.ones((ROWS, *ITEM), jnp.float32)
        return jax.lax.fori_loop(
            0, steps, lambda i, s: buffer.add(s, x * i.astype(jnp.float32)), state)

    return buffer, jax.jit(fill, donate_argnums=0)


def main() -> None:
    if "--atari" in sys.argv or "--atari-one" in sys.argv:
        return atari_main()
    p = argparse.ArgumentParser()
    p.add_argument("--library", default="flax_replay", choices=["flax_replay", "flashbax"])
    p.add_argument("--gb", type=float, default=2.0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.library == "flashbax":
        import flashbax as lib
    else:
        import flax_replay as lib
    item_bytes = 4 * ITEM[0] * ITEM[1] * ITEM[2]
    max_length = -(-int(args.gb * 1e9) // (item_bytes * ROWS)) * ROWS
    example = jnp.zeros(ITEM, jnp.float32)
    # The same program on a tiny buffer: imports, compiler and runtime are the baseline.
    small, small_fill = filler(lib, 4 * ROWS)
    jax.block_until_ready(small_fill(small.init(example)))
    baseline = status_gb("VmRSS")
    buffer, fill = filler(lib, max_length)
    state = fill(buffer.init(example))
    jax.block_until_ready(state)
    leaf = jax.tree.leaves(state.experience)[0]
    assert float(leaf[0, -1, 0, 0, 0]) == max_length // ROWS - 1  # every step written
    size = sum(x.nbytes for x in jax.tree.leaves(state)) / 1e9
    peak = status_gb("VmHWM")
    result = dict(library=args.library, buffer=f"flat, {max_length} x 32x32x3 float32",
                  buffer_gb=size, baseline_gb=baseline, peak_gb=peak,
                  excess_ratio=(peak - baseline) / size,
                  ok=peak < 1.2 * size + baseline)
    print(json.dumps(result) if args.json else result)


# ------------------------------------------------------------------------ Atari-shaped buffers
FRAME = (84, 84)
STACK, N_STEP, CHUNK = 4, 3, 100


def atari_example(stacked: bool) -> dict:
    """One step of an Atari DQN: a uint8 frame (or the naive stack of 4), action, reward, done."""
    obs = jnp.zeros(FRAME + ((STACK,) if stacked else ()), jnp.uint8)
    return {"obs": obs, "action": jnp.int32(0), "reward": jnp.float32(0),
            "done": jnp.float32(0)}


def atari_buffer(arm: str, capacity: int, memory_kind=None):
    """`frame_stack`: flax_replay, prioritised n-step 3 storing one frame per step;
    `stacked`: the same buffer storing the stacked observation; `flashbax`: Flashbax 0.1.3's
    prioritised trajectory buffer storing the stacked observation, sequences of n + 1 steps
    (its n-step buffer was never released)."""
    if arm == "flashbax":
        import flashbax

        return flashbax.make_prioritised_trajectory_buffer(
            add_batch_size=1, sample_batch_size=32, sample_sequence_length=N_STEP + 1,
            period=1, min_length_time_axis=N_STEP + 1, max_length_time_axis=capacity)
    import flax_replay

    return flax_replay.make_prioritised_n_step_buffer(
        capacity, 0, 32, add_sequences=True, add_batch_size=1, n_step=N_STEP,
        frame_stack={"obs": STACK} if arm == "frame_stack" else None, memory_kind=memory_kind)


def atari_batch(arm: str, i, steps: int) -> dict:
    """`steps` new steps of one row; frames vary with i so that nothing is constant-folded."""
    stacked = arm != "frame_stack"
    shape = (1, steps) + FRAME + ((STACK,) if stacked else ())
    return {"obs": jnp.full(shape, i % 251, jnp.uint8),
            "action": jnp.zeros((1, steps), jnp.int32),
            "reward": jnp.ones((1, steps), jnp.float32),
            "done": jnp.zeros((1, steps), jnp.float32)}


def atari_fill(arm: str, capacity: int):
    """A full buffer: a jitted, donated fori_loop of adds of CHUNK steps."""
    buffer = atari_buffer(arm, capacity)
    state = jax.jit(buffer.init)(atari_example(arm != "frame_stack"))
    chunk = CHUNK if capacity % CHUNK == 0 else 1

    def fill(state):
        return jax.lax.fori_loop(0, capacity // chunk,
                                 lambda i, s: buffer.add(s, atari_batch(arm, i, chunk)), state)

    return jax.block_until_ready(jax.jit(fill, donate_argnums=0)(state))


def atari_one(arm: str, capacity: int) -> dict:
    """Fill one buffer in this process; the state's bytes and the peak RSS above the baseline
    (imports, compiler and runtime: the same program run on a tiny buffer first)."""
    atari_fill(arm, 4 * CHUNK)
    baseline = status_gb("VmRSS")
    state = atari_fill(arm, capacity)
    return dict(arm=arm, capacity=capacity,
                state_gb=sum(x.nbytes for x in jax.tree.leaves(state)) / 1e9,
                peak_gb=status_gb("VmHWM") - baseline)


def physical_gb(capacity: int) -> float:
    """One frame per step plus the step's other leaves (action, reward, done): the least any
    buffer of these transitions can store."""
    return capacity * (FRAME[0] * FRAME[1] + 4 + 4 + 4) / 1e9


def shape_gb(arm: str, capacity: int) -> float:
    """The state's bytes from its shapes alone (no allocation)."""
    buffer = atari_buffer(arm, capacity)
    shapes = jax.eval_shape(buffer.init, atari_example(arm != "frame_stack"))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes)) / 1e9


def atari_times(capacity: int, memory_kind=None, rounds: int = 5, ops: int = 64) -> dict:
    """Microseconds per add (one step) and per sample (32 transitions), in a jitted scan of
    `ops` operations over a full buffer, frame_stack vs the stacked observation stored
    naively (same transitions); the median of `rounds` runs, arms alternating."""
    import time

    out: dict = {}
    fns = {}
    for arm in ("frame_stack", "stacked"):
        buffer = atari_buffer(arm, capacity, memory_kind)
        state = jax.jit(buffer.init)(atari_example(arm == "stacked"))
        fill = jax.jit(lambda s, b=buffer, a=arm: jax.lax.fori_loop(
            0, capacity // CHUNK, lambda i, s: b.add(s, atari_batch(a, i, CHUNK)), s),
            donate_argnums=0)
        state = fill(state)

        def adds(s, b=buffer, a=arm):
            return jax.lax.fori_loop(0, ops, lambda i, s: b.add(s, atari_batch(a, i, 1)), s)

        def samples(s, key, b=buffer):
            def body(acc, k):
                t = b.sample(s, k).experience
                return acc + t.first["obs"].sum() + t.second["obs"].sum() + t.reward.sum(), None
            return jax.lax.scan(body, jnp.float32(0), jax.random.split(key, ops))[0]

        fns[arm] = [state, jax.jit(adds, donate_argnums=0), jax.jit(samples)]
    times: dict = {(arm, op): [] for arm in fns for op in ("add", "sample")}
    for r in range(rounds + 1):  # round 0 compiles
        for arm in (fns if r % 2 else reversed(list(fns))):
            state, adds, samples = fns[arm]
            t0 = time.perf_counter()
            state = jax.block_until_ready(adds(state))
            t1 = time.perf_counter()
            jax.block_until_ready(samples(state, jax.random.key(r)))
            t2 = time.perf_counter()
            fns[arm][0] = state
            if r:
                times[(arm, "add")].append((t1 - t0) / ops * 1e6)
                times[(arm, "sample")].append((t2 - t1) / ops * 1e6)
    for (arm, op), values in times.items():
        out[f"{arm}_{op}_us"] = sorted(values)[len(values) // 2]
    for op in ("add", "sample"):
        out[f"{op}_ratio"] = out[f"frame_stack_{op}_us"] / out[f"stacked_{op}_us"]
    return out


def atari_main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--atari", action="store_true")
    p.add_argument("--atari-one", nargs=2, metavar=("ARM", "CAPACITY"))
    p.add_argument("--capacities", nargs="+", type=float, default=[1e4, 1e5])
    p.add_argument("--time-capacity", type=float, default=1e4)
    p.add_argument("--memory-kind", default=None)
    p.add_argument("--no-flashbax", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.atari_one:
        print(json.dumps(atari_one(args.atari_one[0], int(float(args.atari_one[1])))))
        return
    import subprocess

    arms = ["frame_stack"] + ([] if args.no_flashbax else ["flashbax"])
    rows = []
    for cap in [int(c) for c in args.capacities]:
        row: dict = {"capacity": cap, "physical_gb": physical_gb(cap)}
        for arm in arms:  # each fill in a fresh process: its own peak RSS
            res = subprocess.run([sys.executable, __file__, "--atari-one", arm, str(cap)],
                                 capture_output=True, text=True, check=True)
            one = json.loads(res.stdout.strip().splitlines()[-1])
            row[f"{arm}_state_gb"], row[f"{arm}_peak_gb"] = one["state_gb"], one["peak_gb"]
        rows.append(row)
    big = 1_000_000
    computed = {"capacity": big, "physical_gb": physical_gb(big),
                "frame_stack_state_gb": shape_gb("frame_stack", big),
                "stacked_state_gb": shape_gb("stacked", big)}
    times = atari_times(int(args.time_capacity), args.memory_kind)
    result = {"filled": rows, "computed_1e6": computed, "times": times,
              "memory_kind": args.memory_kind}
    if args.json:
        print(json.dumps(result))
        return
    print("| capacity | physical limit GB | frame_stack state GB (x limit) | frame_stack peak "
          "RSS GB | Flashbax stacked state GB | Flashbax peak RSS GB | Flashbax / frame_stack |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        fb = r.get("flashbax_state_gb")
        print(f"| {r['capacity']:.0e} | {r['physical_gb']:.3f} | {r['frame_stack_state_gb']:.3f} "
              f"({r['frame_stack_state_gb'] / r['physical_gb']:.3f}) | "
              f"{r['frame_stack_peak_gb']:.3f} | "
              + (f"{fb:.3f} | {r['flashbax_peak_gb']:.3f} | "
                 f"{fb / r['frame_stack_state_gb']:.2f} |" if fb else "| | |"))
    c = computed
    print(f"| 1e6 (shapes) | {c['physical_gb']:.3f} | {c['frame_stack_state_gb']:.3f} "
          f"({c['frame_stack_state_gb'] / c['physical_gb']:.3f}) | | "
          f"{c['stacked_state_gb']:.3f} (stacked, ours) | | "
          f"{c['stacked_state_gb'] / c['frame_stack_state_gb']:.2f} |")
    print(f"\nscan, capacity {int(args.time_capacity):.0e}, memory_kind={args.memory_kind}: "
          f"add {times['frame_stack_add_us']:.1f} us vs {times['stacked_add_us']:.1f} us "
          f"stacked ({times['add_ratio']:.2f}x); sample of 32 {times['frame_stack_sample_us']:.1f}"
          f" us vs {times['stacked_sample_us']:.1f} us ({times['sample_ratio']:.2f}x)")


if __name__ == "__main__":
    main()
