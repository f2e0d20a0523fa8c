"""Pixel buffers on an accelerator: `memory_kind` None (device memory) vs "pinned_host".

    python benchmarks/pixels_accelerator.py [--capacity 100000] [--rounds 5]

For each memory kind: an Atari-shaped prioritised 3-step buffer with `frame_stack={"obs": 4}`
(84x84 uint8 frames) is filled, then timed in jitted scans of 64 operations: add of one step,
sample of 32 transitions (benchmarks/memory.py, `atari_times`), and the sample throughput in
transitions per second. The stacked-observation buffer is timed alongside as the reference.
Under 5 minutes at the default capacity on one GPU; it runs on CPU too (where both memories
are the same RAM). GPU/TPU figures are not measured yet.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from benchmarks.memory import atari_times  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--capacity", type=float, default=1e5)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    rows = []
    for kind in (None, "pinned_host"):
        t = atari_times(int(args.capacity), kind, rounds=args.rounds)
        t.update(memory_kind=kind, backend=jax.default_backend(),
                 sample_transitions_per_s=32 / (t["frame_stack_sample_us"] * 1e-6))
        rows.append(t)
    if args.json:
        print(json.dumps(rows))
        return
    print(f"backend {jax.default_backend()}, capacity {int(args.capacity)}, us per operation")
    print("| memory_kind | add (frame_stack / stacked) | sample 32 (frame_stack / stacked) "
          "| sampled transitions/s |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['memory_kind']} | {r['frame_stack_add_us']:.1f} / {r['stacked_add_us']:.1f} "
              f"| {r['frame_stack_sample_us']:.1f} / {r['stacked_sample_us']:.1f} "
              f"| {r['sample_transitions_per_s']:.3g} |")


if __name__ == "__main__":
    main()
