"""Peak resident memory while filling a replay buffer of >= 2 GB, in a fresh process.

    python benchmarks/memory.py [--library flax_replay|flashbax] [--gb 2.0] [--json]

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


if __name__ == "__main__":
    main()
