"""Per-buffer cost of vmapped buffer operations (one buffer per device/agent, the Stoix/Mava
structure) against the unbatched call, for flax_replay and (if installed) Flashbax 0.1.3.

    python -m benchmarks.vmap                 # batch 1, 2, 8; prints a Markdown table
    python -m benchmarks.vmap --lib flashbax  # the same code with `import flashbax as fbx`

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


def _median_time(fn: Callable[[], Any], reps: int, rounds: int) -> float:
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        out.append((time.perf_counter() - t0) / reps)
    return statistics.median(out)


def _stack(tree: Any, n: int) -> Any:
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)).copy(), tree)


def bench(lib: str, n: int, max_length: int, add_batch: int, sample_batch: int,
          reps: int, rounds: int, scan: int) -> dict[str, float]:
    """Seconds per call: unbatched (`n=0`) or vmapped over `n` buffers."""
    fbx = importlib.import_module(lib)
    buf = fbx.make_prioritised_flat_buffer(
        max_length=max_length, min_length=8, sample_batch_size=sample_batch,
        add_batch_size=add_batch, priority_exponent=0.6)
    example = {"obs": jnp.zeros((8,), jnp.float32), "reward": jnp.zeros((), jnp.float32)}
    batch = jax.tree.map(lambda x: jnp.ones((add_batch, *x.shape), x.dtype), example)
    key = jax.random.PRNGKey(0)
    prio = jnp.linspace(0.5, 2.0, sample_batch)

    init, add, sample, setp = buf.init, buf.add, buf.sample, buf.set_priorities
    if n:
        init_n = init
        init = lambda e: _stack(init_n(e), n)
        add, sample, setp = jax.vmap(add), jax.vmap(sample), jax.vmap(setp)
        batch = _stack(batch, n)
        key = jax.random.split(key, n)
        prio = _stack(prio, n)

    state = init(example)
    fill = jax.jit(lambda s: jax.lax.fori_loop(0, max_length // add_batch + 1,
                                               lambda i, s: add(s, batch), s))
    state = fill(state)
    jax.block_until_ready(state)
    indices = sample(state, key).indices

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
        setp_fn = jax.jit(many(lambda s: setp(s, indices, prio)), donate_argnums=0)

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

    for f in (run_add, run_setp, run_sample):
        f()  # compile
    return {name: _median_time(f, reps, rounds) / per
            for name, f in (("add", run_add), ("sample", run_sample),
                            ("set_priorities", run_setp))}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lib", default="flax_replay")
    p.add_argument("--batches", default="1,2,8")
    p.add_argument("--max-length", type=int, default=10_000)
    p.add_argument("--add-batch", type=int, default=16)
    p.add_argument("--sample-batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--scan", type=int, default=0)
    a = p.parse_args()
    args = (a.max_length, a.add_batch, a.sample_batch, a.reps, a.rounds, a.scan)
    base = bench(a.lib, 0, *args)
    print(f"{a.lib}, prioritised flat, max_length={a.max_length}, add {a.add_batch}, sample "
          f"{a.sample_batch}, {'scan of ' + str(a.scan) if a.scan else 'one jitted call'}")
    print("| op | unbatched (us) | " + " | ".join(
        f"vmap {n}: per buffer (us) / ratio" for n in map(int, a.batches.split(","))) + " |")
    rows = {op: [f"{1e6 * t:.1f}"] for op, t in base.items()}
    for n in map(int, a.batches.split(",")):
        res = bench(a.lib, n, *args)
        for op, t in res.items():
            rows[op].append(f"{1e6 * t / n:.1f} / {t / n / base[op]:.2f}x")
    for op, cells in rows.items():
        print(f"| {op} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
