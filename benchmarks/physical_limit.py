"""How far each prioritised path is from what this machine's memory allows.

    python -m benchmarks.physical_limit            # 1e4, 1e5, 1e6 items
    python -m benchmarks.physical_limit --quick    # 1e4 only, fewer rounds

A floor per path, measured here by a C kernel (compiled with the system's C compiler through
ctypes) that does only the memory work an exact 4-ary sum tree cannot avoid, nothing else:

- sample B: B root-to-leaf walks, only their memory reads (one read of a node's children per
  level, the next node chosen from the value read, so each path's reads are dependent; the B
  walks are interleaved, so the memory system may overlap their misses), then the gather of
  the B first and B second items (flat buffer: 2 items per transition) into an output;
- set_priorities B: B leaf writes and, level by level, B parents re-summed from their 4
  children;
- add R rows: R items copied into the storage and R leaf paths re-summed;
- sample+set_priorities: both of the above.

The random numbers, the min tree, duplicate handling, importance weights and dispatch are
not in the floor: it is a lower bound, not a competitor. flax_replay's prioritised flat
buffer ((8,) float32 items, as benchmarks/run.py) runs each path in a jitted `lax.scan`
(time per operation), alternating with the floor in every round; a ratio is the median over
rounds. Writes benchmarks/results/physical_limit.md.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import flax_replay  # noqa: E402
from benchmarks import run as bench  # noqa: E402

warnings.filterwarnings("ignore")
B = bench.SAMPLE

_C = r"""
#include <stdint.h>
#include <string.h>

/* A 4-ary sum tree, levels stored root first in one array: level l has 4**l nodes from
   offset[l]; the leaves are the last level. */

void walk(const float *tree, const int64_t *offset, int depth, const float *targets, int n,
          int64_t *leaf, float *scratch) {
    /* Only the memory work of a walk: at each level one read of the node's children (one
       cache line), and the next node chosen from the value read (so the reads of a path are
       dependent). The prefix comparisons are left out: XLA vectorises them across paths. */
    uint32_t *bits = (uint32_t *)scratch;
    for (int b = 0; b < n; b++) { leaf[b] = 0; memcpy(&bits[b], &targets[b], 4); }
    for (int l = 1; l < depth; l++) {
        const float *level = tree + offset[l];
        for (int b = 0; b < n; b++) {  /* the B walks interleaved: their misses overlap */
            float v = level[4 * leaf[b]];
            uint32_t u;
            memcpy(&u, &v, 4);
            leaf[b] = 4 * leaf[b] + ((u ^ bits[b]) & 3);
        }
    }
}

void update(float *tree, const int64_t *offset, int depth, const int64_t *leaf,
            const float *value, int n, int64_t *node) {
    float *leaves = tree + offset[depth - 1];
    for (int b = 0; b < n; b++) { leaves[leaf[b]] = value[b]; node[b] = leaf[b]; }
    for (int l = depth - 2; l >= 0; l--) {
        float *child = tree + offset[l + 1], *parent = tree + offset[l];
        for (int b = 0; b < n; b++) {
            int64_t p = node[b] / 4;
            const float *c = child + 4 * p;
            parent[p] = (c[0] + c[1]) + (c[2] + c[3]);
            node[b] = p;
        }
    }
}

void gather(const char *store, const int64_t *rows, int n, int64_t row_bytes, char *out) {
    for (int b = 0; b < n; b++) memcpy(out + b * row_bytes, store + rows[b] * row_bytes,
                                       row_bytes);
}

void put(char *store, const int64_t *rows, int n, int64_t row_bytes, const char *src) {
    for (int b = 0; b < n; b++) memcpy(store + rows[b] * row_bytes, src + b * row_bytes,
                                       row_bytes);
}

/* `steps * reps` operations of one path in one call (their inputs cycling through `steps`
   drawn in advance), so that the call's own cost is a small part of an operation's time.
   path 0: sample, 1: set_priorities, 2: sample+set_priorities, 3: add of `rows` rows, row b
   of add k written at item (b * (capacity / rows) + k) % capacity: a write head per row. */
void run(int path, int steps, int reps, float *tree, const int64_t *offset, int depth,
         int64_t capacity, char *store, int64_t row_bytes, const float *targets,
         const float *values, const int64_t *set_leaves, int rows,
         const char *src, int n, int64_t *leaf, float *scratch, int64_t *node, int64_t *pair,
         char *out) {
    for (int64_t k = 0; k < (int64_t)steps * reps; k++) {
        int64_t i = k % steps;
        if (path == 3) {
            for (int b = 0; b < rows; b++) pair[b] = (b * (capacity / rows) + k) % capacity;
            put(store, pair, rows, row_bytes, src);
            update(tree, offset, depth, pair, values + i * n, rows, node);
            continue;
        }
        if (path != 1) {
            walk(tree, offset, depth, targets + (int64_t)i * n, n, leaf, scratch);
            for (int b = 0; b < n; b++) {
                leaf[b] %= capacity;  /* the memory-only walk may end in the padding */
                pair[b] = leaf[b];
                pair[n + b] = (leaf[b] + 1) % capacity;  /* `second` of each transition */
            }
            gather(store, pair, 2 * n, row_bytes, out);
        }
        if (path == 1) update(tree, offset, depth, set_leaves + (int64_t)i * n,
                              values + (int64_t)i * n, n, node);
        if (path == 2) update(tree, offset, depth, leaf, values + (int64_t)i * n, n, node);
    }
}
"""

_i64p = np.ctypeslib.ndpointer(np.int64, flags="C_CONTIGUOUS")
_f32p = np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS")
_u8p = np.ctypeslib.ndpointer(np.uint8, flags="C_CONTIGUOUS")


def load_kernel() -> ctypes.CDLL:
    """Compiles the kernel (cc -O2) into a temporary directory and loads it."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise SystemExit("physical_limit needs a C compiler (cc or gcc) for its kernel")
    tmp = Path(tempfile.mkdtemp(prefix="flax_replay_floor_"))
    src, lib = tmp / "floor.c", tmp / "floor.so"
    src.write_text(_C)
    subprocess.run([cc, "-O3", "-march=native", "-shared", "-fPIC", "-o", str(lib), str(src)],
                   check=True)
    k = ctypes.CDLL(str(lib))
    i, i64 = ctypes.c_int, ctypes.c_int64
    k.run.argtypes = [i, i, i, _f32p, _i64p, i, i64, _u8p, i64, _f32p, _f32p, _i64p, i,
                      _u8p, i, _i64p, _f32p, _i64p, _i64p, _u8p]
    return k


class Floor:
    """The floor's data for a buffer of `capacity` items of `item_bytes` bytes: a 4-ary sum
    tree over `capacity` leaves (padded to a power of 4) and the storage."""

    def __init__(self, kernel: ctypes.CDLL, capacity: int, item_bytes: int, steps: int,
                 rng: np.random.Generator):
        self.k, self.capacity, self.item_bytes, self.steps = kernel, capacity, item_bytes, steps
        depth = 1
        while 4 ** (depth - 1) < capacity:
            depth += 1
        self.depth = depth
        sizes = [4**level for level in range(depth)]
        self.offset = np.cumsum([0] + sizes[:-1]).astype(np.int64)
        self.tree = np.zeros(sum(sizes), np.float32)
        leaves = self.tree[self.offset[-1]:]
        leaves[:capacity] = rng.uniform(0.1, 2.0, capacity).astype(np.float32)
        for level in range(depth - 2, -1, -1):  # parents from children, as the C kernel sums
            c = self.tree[self.offset[level + 1]: self.offset[level + 1] + 4 ** (level + 1)]
            c = c.reshape(-1, 4)
            self.tree[self.offset[level]: self.offset[level] + 4**level] = (
                (c[:, 0] + c[:, 1]) + (c[:, 2] + c[:, 3]))
        self.store = np.ones(capacity * item_bytes, np.uint8)  # every page touched
        total = float(self.tree[0])
        # Inputs of `steps` operations, drawn in advance (the floor draws no random numbers).
        self.targets = (rng.random((steps, B)) * total * 0.999).astype(np.float32)
        self.values = rng.uniform(0.1, 2.0, (steps, B)).astype(np.float32)
        self.src = rng.integers(0, 255, (128 * item_bytes,), dtype=np.uint8)
        self.leaf = np.zeros(B, np.int64)
        self.scratch = np.zeros(B, np.float32)
        self.node = np.zeros(max(B, 128), np.int64)
        self.out = np.zeros(2 * B * item_bytes, np.uint8)
        self.pair = np.zeros(2 * B, np.int64)
        self.set_leaves = rng.integers(0, capacity, (steps, B)).astype(np.int64)

    def run(self, path: str) -> float:
        """Seconds per operation of `path`, over `steps` operations (ADD_REPS * `steps` for
        an add: one takes tens of nanoseconds, and a ctypes call of this many arguments
        microseconds) in one C call."""
        rows = int(path.split()[1]) if path.startswith("add") else 1
        code = {"sample": 0, "set_priorities": 1, "sample+set_priorities": 2}.get(path, 3)
        reps = ADD_REPS if code == 3 else 1
        t0 = time.perf_counter()
        self.k.run(code, self.steps, reps, self.tree, self.offset, self.depth, self.capacity,
                   self.store, self.item_bytes, self.targets, self.values, self.set_leaves,
                   rows, self.src, B, self.leaf, self.scratch, self.node, self.pair, self.out)
        return (time.perf_counter() - t0) / (self.steps * reps)


PATHS = ("add 1", "add 128", "sample", "set_priorities", "sample+set_priorities")
ADD_REPS = 64  # the floor's adds per input drawn in advance


def ours(capacity: int, steps: int) -> dict[str, object]:
    """flax_replay's scanned operations, per path: (op, state) ready to time with bench.Arm."""
    arms = {}
    for rows in (1, 128):
        case = bench.Case("prioritised flat", rows, (8,), capacity)
        buf = bench.make_buffer(flax_replay, case)
        state = bench.fill(buf, case)
        idx = jax.jit(buf.sample)(state, jax.random.key(9)).indices
        ops = bench.build_ops(bench.Functional(buf), case, "scan", steps,
                              bench.make_inputs(case, steps, idx))
        arms[f"add {rows}"] = [bench.Arm(ops["add"], 1), state]
        if rows == 1:
            # Each path works on its own copy: a donated scan consumes its input state.
            for name in ("sample", "set_priorities", "sample+set_priorities"):
                arms[name] = [bench.Arm(ops[name], 1), jax.tree.map(lambda x: x.copy(), state)]
    return arms


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1e4 only, 5 rounds")
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--steps", type=int, default=64, help="operations per timed scan")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "physical_limit.md"))
    args = p.parse_args(argv)
    caps = (10**4,) if args.quick else (10**4, 10**5, 10**6)
    rounds = 5 if args.quick else args.rounds
    kernel = load_kernel()
    rng = np.random.default_rng(0)
    rows = []
    for cap in caps:
        floor = Floor(kernel, cap, 8 * 4, args.steps, rng)
        arms = ours(cap, args.steps)
        for path in PATHS:
            arm, state = arms[path]
            _, state = arm.run(state)  # compile and warm up
            floor.run(path)
            ratios, fl, fr = [], [], []
            for r in range(rounds):
                if r % 2:
                    t_floor = floor.run(path)
                    t_ours, state = arm.run(state)
                else:
                    t_ours, state = arm.run(state)
                    t_floor = floor.run(path)
                fl.append(t_floor)
                fr.append(t_ours)
                ratios.append(t_ours / t_floor)
            arms[path][1] = state
            row = dict(capacity=cap, path=path, floor_us=statistics.median(fl) * 1e6,
                       ours_us=statistics.median(fr) * 1e6, ratio=statistics.median(ratios))
            rows.append(row)
            print(f"{cap:.0e} {path:22s} floor {row['floor_us']:8.2f} us  flax_replay "
                  f"{row['ours_us']:8.2f} us  ratio {row['ratio']:6.2f}", flush=True)
        del arms, floor
    load = os.getloadavg()[0]
    lines = [
        "# Distance to the physical limit (prioritised flat buffer, (8,) float32 items)",
        "",
        f"`python -m benchmarks.physical_limit{' --quick' if args.quick else ''}`: floor = a C "
        "kernel doing only the unavoidable memory work of each path (tree walks with dependent "
        "reads, leaf-path re-sums, item copies; see the module docstring); flax_replay = the "
        f"same path in a jitted `lax.scan` of {args.steps} operations "
        f"({bench.ADD_SCAN * args.steps} for an add), time per operation. "
        f"Median of {rounds} alternated rounds; jax {jax.__version__}, "
        f"{os.cpu_count()} CPUs, load average {load:.1f} at the end.",
        "",
        "| capacity | path | floor (us) | flax_replay (us) | flax_replay / floor |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['capacity']:.0e} | {r['path']} | {r['floor_us']:.2f} | "
                     f"{r['ours_us']:.2f} | {r['ratio']:.1f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
