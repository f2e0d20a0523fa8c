"""Per-buffer cost of vmapped buffer operations (one buffer per device/agent, the Stoix/Mava
structure) against the unbatched call, for flax_replay and (if installed) Flashbax 0.1.3.

    python -m benchmarks.vmap                 # batch 1, 2, 8; prints a Markdown table
    python -m benchmarks.vmap --lib flashbax  # the same code with `import flashbax as fbx`
    python -m benchmarks.vmap --buffer prioritised_trajectory --scan 32

`--buffer`: prioritised_flat (default), prioritised_trajectory, flat, trajectory (uniform
buffers have no set_priorities). Every configuration is built first, then timed in
alternating rounds (unbatched, vmap 1, vmap 2, ...), so that the machine's load falls on all
of them alike; the table gives medians and (minima).

Each operation is one jitted call (donated when it writes the state), dispatch and
`block_until_ready` included, as an eager training loop runs it; and `--scan` times a jitted
`lax.scan` of 32 operations instead (a fully jitted loop). The figure is
`time(vmap over n buffers) / n / time(one unbatched call)`: 1.0 means vmapping costs nothing
per buffer beyond the work. Timings are medians of `--rounds` rounds of `--reps` calls.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp


def _time(fn: Callable[[], Any], reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def _stack(tree: Any, n: int) -> Any:
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)).copy(), tree)


BUFFERS = ("prioritised_flat", "prioritised_trajectory", "flat", "trajectory")


def _make(fbx: Any, buffer: str, max_length: int, add_batch: int, sample_batch: int) -> Any:
    make = getattr(fbx, f"make_{buffer}_buffer")
    kw = {"priority_exponent": 0.6} if buffer.startswith("prioritised") else {}
    if buffer.endswith("flat"):
        return make(max_length=max_length, min_length=8, sample_batch_size=sample_batch,
                    add_batch_size=add_batch, **kw)
    # Rows of 8-step sequences on a period-2 grid, an add of 2 steps per row.
    return make(add_batch_size=add_batch, sample_batch_size=sample_batch,
                sample_sequence_length=8, period=2, min_length_time_axis=8,
                max_length_time_axis=max_length // add_batch, **kw)


def build(lib: str, buffer: str, n: int, max_length: int, add_batch: int, sample_batch: int,
          scan: int) -> tuple[dict[str, Callable[[], None]], int]:
    """One closure per operation, each running it once (`scan` times if `scan`, the second
    value) on its own state: unbatched (`n=0`) or vmapped over `n` buffers."""
    fbx = importlib.import_module(lib)
    buf = _make(fbx, buffer, max_length, add_batch, sample_batch)
    prioritised = buffer.startswith("prioritised")
    steps = 1 if buffer.endswith("flat") else 2
    example = {"obs": jnp.zeros((8,), jnp.float32), "reward": jnp.zeros((), jnp.float32)}
    lead = (add_batch,) if buffer.endswith("flat") else (add_batch, steps)
    batch = jax.tree.map(lambda x: jnp.ones((*lead, *x.shape), x.dtype), example)
    key = jax.random.PRNGKey(0)
    prio = jnp.linspace(0.5, 2.0, sample_batch)

    init, add, sample = buf.init, buf.add, buf.sample
    setp = buf.set_priorities if prioritised else None
    if n:
        init_n = init
        init = lambda e: _stack(init_n(e), n)
        add, sample = jax.vmap(add), jax.vmap(sample)
        setp = jax.vmap(setp) if prioritised else None
        batch = _stack(batch, n)
        key = jax.random.split(key, n)
        prio = _stack(prio, n)

    state = init(example)
    fill = jax.jit(lambda s: jax.lax.fori_loop(0, max_length // add_batch // steps + 1,
                                               lambda i, s: add(s, batch), s))
    state = fill(state)
    jax.block_until_ready(state)
    indices = sample(state, key).indices if prioritised else None

    def sample_sum(s, k):
        out = sample(s, k)
        return jax.tree.map(jnp.sum, out.experience)

    if scan:
        def many(op):
            def run(s):
                def body(s, _):
                    return op(s), None
                return jax.lax.scan(body, s, None, length=scan)[0]
            return run
        add_fn = jax.jit(many(lambda s: add(s, batch)), donate_argnums=0)
        setp_fn = jax.jit(many(lambda s: setp(s, indices, prio)), donate_argnums=0)  # type: ignore[misc]

        def sample_loop(s):
            def body(c, k):
                return c + jax.tree.reduce(jnp.add, sample_sum(s, k)).sum(), None
            ks = jax.random.split(jax.random.PRNGKey(1), scan)
            if n:
                ks = jax.vmap(lambda k: jax.random.split(k, n))(ks)
            return jax.lax.scan(body, jnp.zeros(()), ks)[0]
        sample_fn = jax.jit(sample_loop)
        per = scan
    else:
        add_fn = jax.jit(lambda s: add(s, batch), donate_argnums=0)
        setp_fn = jax.jit(lambda s: setp(s, indices, prio), donate_argnums=0)
        sample_fn = jax.jit(lambda s: sample_sum(s, key))
        per = 1

    holder = {"s": state}

    def run_add():
        holder["s"] = add_fn(holder["s"])
        jax.block_until_ready(holder["s"])

    def run_setp():
        holder["s"] = setp_fn(holder["s"])
        jax.block_until_ready(holder["s"])

    def run_sample():
        jax.block_until_ready(sample_fn(holder["s"]))

    ops = {"add": run_add, "sample": run_sample, "set_priorities": run_setp}
    if not prioritised:
        del ops["set_priorities"]
    for f in ops.values():
        f()  # compile
    return ops, per


def bench(lib: str, buffer: str, batches: list[int], max_length: int, add_batch: int,
          sample_batch: int, reps: int, rounds: int, scan: int,
          ) -> dict[int, dict[str, list[float]]]:
    """Seconds per call of each operation, per round: `{n: {op: [round times]}}` with `n = 0`
    the unbatched call; rounds alternate between the configurations."""
    built = {n: build(lib, buffer, n, max_length, add_batch, sample_batch, scan)
             for n in [0, *batches]}
    out: dict[int, dict[str, list[float]]] = {n: {op: [] for op in b[0]} for n, b in built.items()}
    for _ in range(rounds):
        for n, (ops, per) in built.items():
            for op, f in ops.items():
                out[n][op].append(_time(f, reps) / per)
    return out


def table(times: dict[int, dict[str, list[float]]]) -> list[str]:
    """Markdown rows: per operation, the unbatched median (min) in us, then per batch n the
    per-buffer median (min) and the ratio of medians (of minima) to the unbatched call."""
    ns = [n for n in times if n]
    lines = ["| op | unbatched (us) | " + " | ".join(
        f"vmap {n}: per buffer (us) / ratio" for n in ns) + " |",
        "| --- |" + " --- |" * (len(ns) + 1)]
    for op, base in times[0].items():
        bmed, bmin = statistics.median(base), min(base)
        cells = [f"{1e6 * bmed:.1f} ({1e6 * bmin:.1f})"]
        for n in ns:
            med, mn = statistics.median(times[n][op]) / n, min(times[n][op]) / n
            cells.append(f"{1e6 * med:.1f} ({1e6 * mn:.1f}) / {med / bmed:.2f}x "
                         f"({mn / bmin:.2f}x)")
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lib", default="flax_replay")
    p.add_argument("--buffer", default="prioritised_flat", choices=BUFFERS)
    p.add_argument("--batches", default="1,2,8")
    p.add_argument("--max-length", type=int, default=10_000)
    p.add_argument("--add-batch", type=int, default=16)
    p.add_argument("--sample-batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--scan", type=int, default=0)
    a = p.parse_args()
    batches = [int(n) for n in a.batches.split(",")]
    times = bench(a.lib, a.buffer, batches, a.max_length, a.add_batch, a.sample_batch, a.reps,
                  a.rounds, a.scan)
    print(f"{a.lib}, {a.buffer}, max_length={a.max_length}, add_batch_size {a.add_batch}, "
          f"sample {a.sample_batch}, {'scan of ' + str(a.scan) if a.scan else 'one jitted call'}"
          f", {a.rounds} alternated rounds of {a.reps} calls")
    print("\n".join(table(times)))


if __name__ == "__main__":
    main()
