"""Per-buffer cost of vmapped buffer operations (one buffer per device/agent, the Stoix/Mava
structure) against the unbatched call, for flax_replay and (if installed) Flashbax 0.1.3.

    python -m benchmarks.vmap                 # batch 1, 2, 8; prints a Markdown table
    python -m benchmarks.vmap --lib flashbax  # the same code with `import flashbax as fbx`
    python -m benchmarks.vmap --buffer prioritised_trajectory --scan 32

`--buffer`: prioritised_flat (default), prioritised_trajectory, flat, trajectory (uniform
buffers have no set_priorities). `--ab-rev REV` (flax_replay only) also times every
configuration with the sum tree (`flax_replay/_src/sum_tree.py`) of git revision REV, in the
same alternated rounds, and prints before/after columns:

    python -m benchmarks.vmap --scan 32 --ab-rev 920168e

Every configuration is built first, then timed in alternating rounds (unbatched, vmap 1,
vmap 2, ...), so that the machine's load falls on all of them alike.

Each operation is one jitted call (donated when it writes the state), dispatch and
`block_until_ready` included, as an eager training loop runs it; and `--scan` times a jitted
`lax.scan` of 32 operations instead (a fully jitted loop). The figure is
`time(vmap over n buffers) / n / time(one unbatched call)`: 1.0 means vmapping costs nothing
per buffer beyond the work. The table gives, over `--rounds` rounds of `--reps` calls, the
median and (in brackets) the minimum, the steadier figure on a loaded machine.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import pathlib
import statistics
import subprocess
import time
import types
from typing import Any, Callable, Iterator, Optional

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

    state = jax.jit(init)(example)
    fill = jax.jit(lambda s: jax.lax.fori_loop(0, max_length // add_batch // steps + 1,
                                               lambda i, s: add(s, batch), s))
    state = fill(state)
    jax.block_until_ready(state)
    indices = jax.jit(sample)(state, key).indices if prioritised else None

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


def _sum_tree_at(rev: str) -> types.ModuleType:
    """The sum-tree module as it was at git revision `rev` of this repository."""
    root = pathlib.Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "show", f"{rev}:flax_replay/_src/sum_tree.py"], cwd=root,
                            check=True, capture_output=True, text=True).stdout
    module = types.ModuleType(f"sum_tree_{rev}")
    exec(compile(source, f"sum_tree@{rev}", "exec"), module.__dict__)
    return module


@contextlib.contextmanager
def _tree_module(module: Optional[types.ModuleType]) -> Iterator[None]:
    """Prioritised buffers traced inside use `module` as their sum tree."""
    from flax_replay._src import priorities
    saved = priorities.sum_tree
    if module is not None:
        priorities.sum_tree = module  # type: ignore[assignment]
    try:
        yield
    finally:
        priorities.sum_tree = saved


def bench(lib: str, buffer: str, batches: list[int], max_length: int, add_batch: int,
          sample_batch: int, reps: int, rounds: int, scan: int,
          trees: Optional[dict[str, Optional[types.ModuleType]]] = None,
          ) -> dict[tuple[str, int], dict[str, list[float]]]:
    """Seconds per call of each operation, per round: `{(tree, n): {op: [round times]}}` with
    `n = 0` the unbatched call and `tree` a key of `trees` (sum-tree modules, None: the
    current one); rounds alternate between all the configurations."""
    built = {}
    for name, module in (trees or {"": None}).items():
        with _tree_module(module):  # every function is traced (compiled) inside `build`
            for n in [0, *batches]:
                built[name, n] = build(lib, buffer, n, max_length, add_batch, sample_batch,
                                       scan)
    out: dict[tuple[str, int], dict[str, list[float]]] = {
        key: {op: [] for op in b[0]} for key, b in built.items()}
    for _ in range(rounds):
        for key, (ops, per) in built.items():
            for op, f in ops.items():
                out[key][op].append(_time(f, reps) / per)
    return out


def table(times: dict[tuple[str, int], dict[str, list[float]]]) -> list[str]:
    """Markdown rows: per operation and batch n (0: unbatched), per sum tree, the per-buffer
    median (min) in us and the ratio of medians (of minima) to the unbatched call."""
    names = list(dict.fromkeys(name for name, _ in times))
    ns = list(dict.fromkeys(n for _, n in times))
    lines = ["| op | n | " + " | ".join(
        f"{name + ': ' if name else ''}per buffer us, median (min) / ratio" for name in names)
        + " |", "| --- | --- |" + " --- |" * len(names)]
    for op in times[names[0], 0]:
        for n in ns:
            cells = []
            for name in names:
                t, base = times[name, n][op], times[name, 0][op]
                med, mn = statistics.median(t) / max(n, 1), min(t) / max(n, 1)
                cells.append(f"{1e6 * med:.1f} ({1e6 * mn:.1f}) / "
                             f"{med / statistics.median(base):.2f}x ({mn / min(base):.2f}x)")
            lines.append(f"| {op} | {n or 'unbatched'} | " + " | ".join(cells) + " |")
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
    p.add_argument("--ab-rev", default=None,
                   help="also time the sum tree of this git revision (before/after)")
    a = p.parse_args()
    batches = [int(n) for n in a.batches.split(",")]
    trees: Optional[dict[str, Optional[types.ModuleType]]] = None
    if a.ab_rev:
        trees = {f"before ({a.ab_rev})": _sum_tree_at(a.ab_rev), "after": None}
    times = bench(a.lib, a.buffer, batches, a.max_length, a.add_batch, a.sample_batch, a.reps,
                  a.rounds, a.scan, trees)
    print(f"{a.lib}, {a.buffer}, max_length={a.max_length}, add_batch_size {a.add_batch}, "
          f"sample {a.sample_batch}, {'scan of ' + str(a.scan) if a.scan else 'one jitted call'}"
          f", {a.rounds} alternated rounds of {a.reps} calls")
    print("\n".join(table(times)))


if __name__ == "__main__":
    main()
