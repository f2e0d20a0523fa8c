"""Save and restore time of a >= 1 GiB replay buffer with flax_replay.checkpoint (Orbax), against
writing and reading the same bytes with NumPy (np.save / np.load) on the same disk.

    python benchmarks/checkpoint_io.py [--gib 1.0] [--reps 3] [--dir DIR]

Measured, median of `--reps` (each repetition in a fresh directory, deleted afterwards):
  - Orbax save, asynchronous: the time `save` blocks the training loop, and until committed;
  - Orbax save, synchronous; Orbax restore into a template TrainState (arrays ready);
  - the same with the buffer items zstd-compressed (`make_manager(compress_buffer=True)`,
    what every item was before: Orbax's default), alternated with the others in one process;
  - NumPy: `np.save` of every leaf + fsync (Orbax's writes are durable too); `np.load` +
    `jax.device_put` (a restore gives device arrays).
Before every read the files are evicted from the page cache (posix_fadvise DONTNEED), so both
read from the disk. Writes a Markdown table to stdout and benchmarks/results/checkpoint_io.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import flax_replay as fbx  # noqa: E402
from flax_replay import checkpoint as ckpt  # noqa: E402
from flax_replay._src import checkpoint as ckpt_impl  # noqa: E402
from flax_replay._src import integrity  # noqa: E402

OBS = 1024  # float32 observation: 4 KiB a step
ROWS = 16


def make_state(gib: float, seed: int = 0) -> tuple[fbx.TrainState, int]:
    """A TrainState whose prioritised buffer holds >= `gib` GiB of random experience."""
    steps = int(np.ceil(gib * 2**30 / (OBS * 4 + 12)))
    max_length = -(-steps // ROWS) * ROWS
    buffer = fbx.make_prioritised_flat_buffer(
        max_length=max_length, min_length=1, sample_batch_size=1, add_batch_size=ROWS)
    example = {"obs": jnp.zeros(OBS), "action": jnp.int32(0), "reward": jnp.float32(0),
               "done": jnp.bool_(False)}
    cols = fbx.to_collections(buffer.init(example))
    key = jax.random.key(seed)
    # Random bytes: incompressible, so no format gains from compression.
    cols["replay"]["experience"] = {
        name: (jax.random.bits(jax.random.fold_in(key, i), x.shape, jnp.uint32)
               .view(jnp.float32) if x.dtype == jnp.float32 else
               jax.random.randint(jax.random.fold_in(key, i), x.shape, 0, 2).astype(x.dtype))
        for i, (name, x) in enumerate(sorted(cols["replay"]["experience"].items()))
    }
    params = {"w": jnp.ones((OBS, 4))}
    state = fbx.TrainState.create(apply_fn=None, params=params, tx=optax.adam(1e-3),
                                  replay={"buffer": cols["replay"]},
                                  priorities={"buffer": cols["priorities"]})
    jax.block_until_ready(state)
    nbytes = sum(x.nbytes for x in jax.tree.leaves((state.replay, state.priorities)))
    return state, nbytes


def _leaves(state) -> list[np.ndarray]:
    tree = (state.params, state.opt_state, state.replay, state.priorities, state.step)
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _evict(directory: Path, drop: bool = True) -> None:
    """fsyncs every file and (`drop`) drops its pages from the page cache, so the next read
    comes from the disk."""
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                if drop:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def orbax_once(state, rng, directory: Path, enable_async: bool,
               compress_buffer: bool = False) -> dict:
    manager = ckpt.make_manager(directory, enable_async=enable_async, max_to_keep=None,
                                compress_buffer=compress_buffer)
    t0 = time.perf_counter()
    ckpt.save(manager, 1, state, rng)
    t1 = time.perf_counter()
    manager.wait_until_finished()
    t2 = time.perf_counter()
    manager.close()
    out = {"blocking": t1 - t0, "save": t2 - t0, "bytes": _size(directory)}
    _evict(directory)
    manager = ckpt.make_manager(directory, enable_async=enable_async)
    t0 = time.perf_counter()
    restored, _, _ = ckpt.restore(manager, state, rng)
    jax.block_until_ready(restored)
    out["restore"] = time.perf_counter() - t0
    manager.close()
    # What the restore spent verifying (and the save checksumming), timed alone on the
    # restored arrays: CRC-32 of every array, then the buffer's invariants.
    items = {"params": restored.params, "opt_state": restored.opt_state,
             "replay": restored.replay, "priorities": restored.priorities}
    t0 = time.perf_counter()
    integrity.checksums(ckpt_impl._leaves(items))
    out["checksum"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert not integrity.buffer_problems(restored.replay, restored.priorities)
    out["invariants"] = time.perf_counter() - t0

    def bits(s):  # bitwise: random float bits include NaNs
        return np.asarray(s.replay["buffer"]["experience"]["obs"][0, :64]).view(np.uint32)

    assert np.array_equal(bits(restored), bits(state))
    del restored
    return out


def numpy_once(state, directory: Path) -> dict:
    directory.mkdir(parents=True)
    t0 = time.perf_counter()
    leaves = _leaves(state)
    for i, x in enumerate(leaves):
        with open(directory / f"{i}.npy", "wb") as f:
            np.save(f, x)
            f.flush()
            os.fsync(f.fileno())
    out = {"save": time.perf_counter() - t0, "bytes": _size(directory)}
    n = len(leaves)
    del leaves
    _evict(directory)
    device = jax.devices()[0]
    t0 = time.perf_counter()
    loaded = [jax.device_put(np.load(directory / f"{i}.npy"), device)
              for i in range(n)]
    jax.block_until_ready(loaded)
    out["restore"] = time.perf_counter() - t0
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dir", default=str(ckpt.default_directory("_bench_checkpoint_io")))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "checkpoint_io.md"))
    args = p.parse_args()

    base = Path(args.dir)
    shutil.rmtree(base, ignore_errors=True)
    state, nbytes = make_state(args.gib)
    rng = jax.random.key(0)
    runs: dict[str, list[dict]] = {"async": [], "sync": [], "compressed": [], "numpy": []}
    try:
        small, _ = make_state(0.002, seed=1)  # warm-up: Orbax's threads, jit of key_data
        for kind in ("async", "sync"):
            orbax_once(small, rng, base / f"warmup_{kind}", kind == "async")
        del small
        for rep in range(args.reps):
            for kind in runs:
                directory = base / f"{kind}{rep}"
                if kind == "numpy":
                    runs[kind].append(numpy_once(state, directory))
                else:
                    runs[kind].append(orbax_once(state, rng, directory, kind == "async",
                                                 compress_buffer=kind == "compressed"))
                shutil.rmtree(directory)
                print(kind, rep, {k: round(v, 3) if isinstance(v, float) else v
                                  for k, v in runs[kind][-1].items()}, flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    np_save, np_load = med["numpy"]["save"], med["numpy"]["restore"]
    crc, inv, restore = (med["sync"][k] for k in ("checksum", "invariants", "restore"))
    gib = nbytes / 2**30

    def paired(kind, metric):
        """Median over repetitions of each one's ratio to the NumPy run next to it (a
        restore to NumPy's load, any save time to its save): the machine's load drifts less
        within one repetition than across them."""
        ref = "restore" if metric == "restore" else "save"
        return statistics.median(r[metric] / n[ref] for r, n in zip(runs[kind], runs["numpy"]))

    def row(name, t, ref, kind="numpy", metric="save"):
        return (f"| {name} | {t:.2f} | {gib / t:.2f} | {t / ref:.2f} | "
                f"{paired(kind, metric):.2f} |")

    lines = [
        f"Buffer: {gib:.2f} GiB of random experience ({nbytes:,} bytes: prioritised flat "
        f"buffer, {ROWS} rows, float32[{OBS}] observations, sum tree) in a TrainState; "
        f"on disk: Orbax {med['sync']['bytes'] / 2**30:.2f} GiB (compressed "
        f"{med['compressed']['bytes'] / 2**30:.2f} GiB), NumPy "
        f"{med['numpy']['bytes'] / 2**30:.2f} GiB. Median of {args.reps}; page cache "
        "evicted before every read; NumPy writes are fsynced.",
        "",
        "| operation | seconds | GiB/s | ratio to NumPy | median of paired ratios |",
        "| --- | ---: | ---: | ---: | ---: |",
        row("NumPy `np.save` (+ fsync)", np_save, np_save),
        row("Orbax save, synchronous", med["sync"]["save"], np_save, "sync"),
        row("Orbax save, asynchronous: until committed", med["async"]["save"], np_save,
            "async"),
        row("Orbax save, asynchronous: training loop blocked", med["async"]["blocking"],
            np_save, "async", "blocking"),
        row("Orbax save, synchronous, buffer zstd-compressed (`compress_buffer=True`)",
            med["compressed"]["save"], np_save, "compressed"),
        row("NumPy `np.load` + `device_put`", np_load, np_load, "numpy", "restore"),
        row("Orbax restore (`checkpoint.restore`)", med["sync"]["restore"], np_load, "sync",
            "restore"),
        row("Orbax restore of the compressed step", med["compressed"]["restore"], np_load,
            "compressed", "restore"),
        "",
        f"Verification inside that restore (timed alone, median): CRC-32 of every array "
        f"{crc:.3f} s, buffer invariants {inv:.3f} s: {100 * (crc + inv) / restore:.1f}"
        "% of the restore. The same CRC pass runs in `save` before it returns (part of the "
        "blocking time above).",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f} at the end (shared), jax {jax.__version__}, "
        f"backend {jax.default_backend()}. Runs: "
        + "; ".join(f"{k} " + ", ".join(f"{r['save']:.2f}/{r['restore']:.2f}" for r in v)
                    for k, v in runs.items()) + " (save/restore seconds).",
        "",
        "Notes. Orbax writes one OCDBT/zarr store per item (six items, metadata, an atomic "
        "rename at commit; the buffer items uncompressed unless `compress_buffer=True`, each "
        "array one chunk) and reads through TensorStore; NumPy writes one flat file per leaf. "
        "On the CPU backend device arrays are host memory, so an asynchronous save blocks only "
        "to take references; a donated step issued while that save is still writing gets a "
        "copy instead of an in-place update (XLA will not donate a buffer Orbax still reads), "
        "so the checkpoint stays intact (tests/test_checkpoint.py) at the price of one buffer "
        "copy. On GPU/TPU the blocking part is the device-to-host copy.",
    ]
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# Checkpoint I/O: Orbax vs NumPy\n\n"
                   "`python benchmarks/checkpoint_io.py` (not a test).\n\n" + table + "\n")


if __name__ == "__main__":
    main()
