"""flax_replay against Flashbax 0.1.3 and NumPy, on CPU, in one process and one run.

    python -m benchmarks.run            # the full sweep (about 17 minutes on 2 cores)
    python -m benchmarks.run --quick    # a smaller sweep (a few minutes)

Workloads: flat, trajectory, prioritised flat and prioritised trajectory buffers built by the
Flashbax-compatible factories (the same code runs both libraries: `import flashbax as fbx` or
`import flax_replay as fbx`), and the same flax_replay buffers through the Linen and NNX
modules; `add` of 1 row and of 128 rows (one time step each), `sample` of 256,
`set_priorities` of 256 and, for prioritised buffers, `sample` then `set_priorities`; items of
shape (8,) and (32, 32, 3) float32; capacities 1e4, 1e5 and 1e6 items (combinations over
`--max-gb` are skipped and listed).

Two regimes: "call", one jitted call (donated when it writes), timed with dispatch and
`block_until_ready`, as an eager training loop runs it; "scan", a jitted `lax.scan` of
`--steps` operations (8 times as many for `add`, its inputs cycling through `--steps`
batches by an index read from an argument: see `_cycled`), the time per operation, as a
fully jitted training loop runs it.

Every buffer is filled completely before timing (untouched pages make first reads look
fast or slow). In each round the arms run back to back in alternating order, and each ratio
is the median over rounds of the per-round ratios; Flashbax is timed twice per round, and the
median of those two timings' ratio (A/A) estimates the noise of the machine. NumPy is the
physical reference: `add` copies the same bytes into a preallocated array of the buffer's
size, `sample` is `np.take` of the same number of rows into a preallocated output.

Writes benchmarks/results/RESULTS.md (tables), results.json (raw) and ratios.png, and runs
the memory benchmark (`benchmarks/memory.py`, in a subprocess).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if "--device" not in sys.argv:  # the accelerator sweep runs where JAX finds a device
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import flax_replay  # noqa: E402

try:
    import flashbax
except ImportError:  # the `bench` extra installs it
    flashbax = None

warnings.filterwarnings("ignore")  # both libraries warn about max_size rounding

SAMPLE = 256  # sample_batch_size, and set_priorities batch
# (shape, dtype) of the items of the CPU sweeps (the --device sweep adds uint8 frames).
FLOAT_ITEMS = (((8,), "float32"), ((32, 32, 3), "float32"))
SEQ, PERIOD = 4, 2  # trajectory buffers: sequences of 4 steps starting every 2 steps
# A scanned add runs ADD_SCAN * --steps operations (its inputs cycling through --steps
# batches): an add can take well under a microsecond, and the fixed cost of a call must not
# be a large part of its time.
ADD_SCAN = 8
ALPHA = 0.6
KINDS = ("flat", "trajectory", "prioritised flat", "prioritised trajectory")


# ----------------------------------------------------------------------------------- cases
@dataclasses.dataclass(frozen=True)
class Case:
    kind: str
    rows: int  # rows per add (add_batch_size), one time step each
    item: tuple[int, ...]
    capacity: int
    dtype: str = "float32"  # uint8 for pixel-like items

    @property
    def prioritised(self) -> bool:
        return self.kind.startswith("prioritised")

    @property
    def flat(self) -> bool:
        return self.kind.endswith("flat")

    @property
    def item_bytes(self) -> int:
        return np.dtype(self.dtype).itemsize * math.prod(self.item)

    @property
    def steps(self) -> int:
        """Time steps per row (the buffer's time axis), a multiple of the period."""
        t = self.capacity // self.rows
        return t if self.flat else t - t % PERIOD

    @property
    def buffer_bytes(self) -> int:
        return self.rows * self.steps * self.item_bytes

    @property
    def seq(self) -> int:
        """Steps per sampled item: first and second for flat buffers."""
        return 2 if self.flat else SEQ

    def label(self) -> str:
        item = "x".join(map(str, self.item)) + ("" if self.dtype == "float32" else self.dtype)
        return f"{self.kind} | {item} | {self.capacity:.0e} | {self.rows}"


def make_buffer(lib, case: Case, **kw):
    add_batch = None if case.rows == 1 else case.rows
    if case.kind == "flat":
        return lib.make_flat_buffer(max_length=case.capacity, min_length=SAMPLE,
                                    sample_batch_size=SAMPLE, add_batch_size=add_batch)
    if case.kind == "prioritised flat":
        return lib.make_prioritised_flat_buffer(
            max_length=case.capacity, min_length=SAMPLE, sample_batch_size=SAMPLE,
            add_batch_size=add_batch, priority_exponent=ALPHA, **kw)
    common = dict(add_batch_size=case.rows, sample_batch_size=SAMPLE,
                  sample_sequence_length=SEQ, period=PERIOD, min_length_time_axis=SEQ,
                  max_length_time_axis=case.steps)
    if case.kind == "trajectory":
        return lib.make_trajectory_buffer(**common)
    return lib.make_prioritised_trajectory_buffer(**common, priority_exponent=ALPHA, **kw)


def batch_shape(case: Case) -> tuple[int, ...]:
    """The shape of one `add` batch: a transition, [rows] of them, or [rows, 1 step]."""
    if case.flat:
        return case.item if case.rows == 1 else (case.rows, *case.item)
    return (case.rows, 1, *case.item)


# ---------------------------------------------------------------------------- operations
def consume(sample) -> jax.Array:
    """A scalar that reads every sampled value, so that XLA cannot skip the gather."""
    return sum(jnp.sum(x) for x in jax.tree.leaves(sample.experience))


def new_priorities(sample, key) -> jax.Array:
    """Priorities from the sampled data (like a TD error), `[SAMPLE]`, > 0."""
    first = jax.tree.leaves(sample.experience)[0]
    err = jnp.mean(first.reshape(first.shape[0], -1), axis=1)
    return jnp.abs(err) + jax.random.uniform(key, err.shape, minval=0.1, maxval=1.0)


class Functional:
    """The Flashbax-style functional API (flax_replay or Flashbax: the same code)."""

    def __init__(self, buffer):
        self.buffer = buffer

    def to_state(self, state):  # the arm's state from a functional state
        return state

    def from_state(self, state):
        return state

    def add(self, state, batch):
        return self.buffer.add(state, batch)

    def sample(self, state, key):
        return self.buffer.sample(state, key)

    def set_priorities(self, state, indices, priorities):
        return self.buffer.set_priorities(state, indices, priorities)


class Linen(Functional):
    """The same buffer as `flax_replay.linen.ReplayBuffer` variables, through `apply`."""

    def __init__(self, buffer, example):
        super().__init__(buffer)
        self.module = flax_replay.linen.ReplayBuffer(buffer=buffer, experience=example)
        self.state_type = type(jax.eval_shape(buffer.init, example))

    def to_state(self, state):
        return flax_replay.to_collections(state)

    def from_state(self, variables):
        return flax_replay.from_collections(self.state_type, variables)

    def add(self, v, batch):
        _, upd = self.module.apply(v, batch, method="add", mutable=list(v))
        return {**v, **upd}

    def sample(self, v, key):
        return self.module.apply(v, key, method="sample")

    def set_priorities(self, v, indices, priorities):
        _, upd = self.module.apply(v, indices, priorities, method="set_priorities",
                                   mutable=["priorities"])
        return {**v, **upd}


class NNX(Functional):
    """The same buffer as `flax_replay.nnx.ReplayBuffer`: `nnx.jit` for single calls, and
    split/merge around `lax.scan` for the scanned regime (its state is a pytree)."""

    def __init__(self, buffer, example):
        super().__init__(buffer)
        self.module = flax_replay.nnx.ReplayBuffer(buffer, example)

    def to_state(self, state):
        self.module.set_state(state)
        return self.module

    def from_state(self, module):
        return module.state()

    def add(self, m, batch):
        m.add(batch)
        return m

    def sample(self, m, key):
        return m.sample(key)

    def set_priorities(self, m, indices, priorities):
        m.set_priorities(indices, priorities)
        return m


def _scan_state(api, body):
    """A jitted scan `fn(state, xs, *consts)` of `body(state, x, *consts) -> state` over `xs`
    (`consts` are arguments every step reads whole); NNX: split/merge around it."""
    if isinstance(api, NNX):
        def run(m, xs, *consts):
            graphdef, state = nnx.split(m)

            def step(s, x):
                mod = nnx.merge(graphdef, s)
                body(mod, x, *consts)
                return nnx.state(mod), None

            state, _ = jax.lax.scan(step, state, xs)
            nnx.update(m, state)
        return nnx.jit(run, donate_argnums=0)
    return jax.jit(lambda s, xs, *consts: jax.lax.scan(
        lambda s, x: (body(s, x, *consts), None), s, xs)[0], donate_argnums=0)


def _cycled(body):
    """`body(state, x)` as a step `(state, i, pool) -> state` whose input is `pool[i]`, `i`
    scanned from an argument. Why: a scanned add needs many operations (a call's fixed cost,
    15-30 us warm, would otherwise be much of a sub-microsecond add), too many stored inputs
    of 128 rows of frames to hold; and an index read from an argument keeps the loop as a
    training loop runs: with stored inputs or a constant index, XLA:CPU compiles a loop of
    nothing but a small add into one function (its rule for loops that touch under 256
    bytes), which a loop that also learns never is (a one-row prioritised add then measured
    0.2-0.4 us instead of 1.1-1.8). The read is the same in every arm."""
    return lambda s, i, pool: body(s, jax.tree.map(lambda x: x[i], pool))


def _scan_read(api, read):
    """A jitted scan of `read(state, x) -> scalar` over `xs`, summed (state not written)."""
    def run(s, xs):
        return jax.lax.scan(lambda acc, x: (acc + read(s, x), None), jnp.float32(0), xs)[0]
    return nnx.jit(run, donate_argnums=0) if isinstance(api, NNX) else jax.jit(run)


def _call(api, fn, donate):
    """One jitted call of `fn(state, *args)` (donated when it writes)."""
    if isinstance(api, NNX):
        return nnx.jit(fn, donate_argnums=0 if donate else ())
    return jax.jit(fn, donate_argnums=0 if donate else ())


@dataclasses.dataclass
class Op:
    """A timed operation: `fn(state, args) -> state` (writes) or `-> output` (reads)."""

    fn: Callable
    args: tuple
    writes: bool
    per_call: int  # operations per call of fn (the scan length, or 1)


def build_ops(api, case: Case, regime: str, steps: int, inputs: dict) -> dict[str, Op]:
    ops = {}
    if regime == "call":
        if isinstance(api, NNX):
            add = _call(api, lambda m, x: m.add(x), True)
            # Donated although it only reads: graph-mode nnx.jit returns the module's state,
            # so without donation every call would copy the whole buffer.
            sample = _call(api, lambda m, k: m.sample(k), True)
            setp = _call(api, lambda m, i, p: m.set_priorities(i, p), True)

            def both(m, k):
                s = m.sample(k)
                m.set_priorities(s.indices, new_priorities(s, k))
            both = _call(api, both, True)
            nnx_out = True
        else:
            add = _call(api, api.add, True)
            sample = _call(api, api.sample, False)
            setp = _call(api, api.set_priorities, True)

            def both(s, k):
                smp = api.sample(s, k)
                return api.set_priorities(s, smp.indices, new_priorities(smp, k))
            both = _call(api, both, True)
            nnx_out = False
        ops["add"] = Op(add, (inputs["batch"],), True, 1)
        ops["sample"] = Op(sample, (inputs["key"],), False, 1)
        if case.prioritised:
            ops["set_priorities"] = Op(setp, (inputs["indices"], inputs["priorities"]), True, 1)
            ops["sample+set_priorities"] = Op(both, (inputs["key"],), True, 1)
        if nnx_out:  # nnx.jit updates the module in place: the "state" is the module
            for op in ops.values():
                if op.writes:
                    op.writes = "inplace"
        return ops

    def add_body(s, x):
        return api.add(s, x)

    def setp_body(s, x):
        return api.set_priorities(s, x[0], x[1])

    def both_body(s, k):
        smp = api.sample(s, k)
        return api.set_priorities(s, smp.indices, new_priorities(smp, k))

    inplace = isinstance(api, NNX)
    add_steps = ADD_SCAN * steps
    index = jnp.arange(add_steps, dtype=jnp.int32) % steps  # the batches, cycled
    ops["add"] = Op(_scan_state(api, _cycled(add_body)), (index, inputs["batches"]),
                    "inplace" if inplace else True, add_steps)
    ops["sample"] = Op(_scan_read(api, lambda s, k: consume(api.sample(s, k))),
                       (inputs["keys"],), False, steps)
    if case.prioritised:
        ops["set_priorities"] = Op(_scan_state(api, setp_body),
                                   ((inputs["indices_s"], inputs["priorities_s"]),),
                                   "inplace" if inplace else True, steps)
        ops["sample+set_priorities"] = Op(_scan_state(api, both_body),
                                          (inputs["keys"],), "inplace" if inplace else True,
                                          steps)
    return ops


def make_inputs(case: Case, steps: int, indices: jax.Array) -> dict:
    key = jax.random.key(1)
    k1, k2, k3 = jax.random.split(key, 3)
    shape = batch_shape(case)
    if indices is None:
        indices = jnp.zeros((SAMPLE,), jnp.int32)
    def data(k, shape):  # uint8 items: the same uniform draws, scaled to 0..255
        x = jax.random.uniform(k, shape)
        return x if case.dtype == "float32" else (x * 255).astype(case.dtype)

    return dict(
        batch=data(k1, shape),
        batches=data(k2, (steps, *shape)),
        key=jax.random.key(2),
        keys=jax.random.split(jax.random.key(3), steps),
        indices=indices,
        priorities=jax.random.uniform(k3, (SAMPLE,), minval=0.1, maxval=2.0),
        indices_s=jnp.stack([jnp.roll(indices, i) for i in range(steps)]),
        priorities_s=jax.random.uniform(k3, (steps, SAMPLE), minval=0.1, maxval=2.0),
    )


def fill(buffer, case: Case):
    """A completely filled state (every slot written, the write head wrapped once)."""
    state = buffer.init(jnp.zeros(case.item, case.dtype))
    x = jnp.full(batch_shape(case), 1, case.dtype)
    n = case.steps + 1

    def run(s):
        def body(i, s):
            return buffer.add(s, x * (i % 7).astype(case.dtype))
        return jax.lax.fori_loop(0, n, body, s)

    return jax.block_until_ready(jax.jit(run, donate_argnums=0)(state))


# --------------------------------------------------------------------------------- timing
def block(x):
    if isinstance(x, nnx.Module):
        return jax.block_until_ready(nnx.state(x))
    return jax.block_until_ready(x)


class Arm:
    """One implementation of one operation, with the state it runs on."""

    def __init__(self, op: Op, calls: int):
        self.op, self.calls = op, calls

    def run(self, state):
        """Returns (seconds per operation, new state)."""
        op = self.op
        n = self.calls if op.per_call == 1 else 1
        t0 = time.perf_counter()
        for _ in range(n):
            out = op.fn(state, *op.args)
            if op.writes is True:
                state = out
            block(state if op.writes else out)
        dt = time.perf_counter() - t0
        return dt / (n * op.per_call), state


def time_numpy(case: Case, steps: int, rounds: int) -> dict[str, float]:
    """Seconds per operation: copying one add's bytes into a preallocated array of the
    buffer's size, and `np.take` of one sample's rows into a preallocated output."""
    rng = np.random.default_rng(0)
    rows, t = case.rows, case.steps
    store = np.ones((rows, t, *case.item), case.dtype)  # written: every page is touched
    src = (rng.random((steps, rows, *case.item), dtype=np.float32) * 200).astype(case.dtype)
    flat = store.reshape(rows * t, *case.item)
    n = SAMPLE * case.seq
    idx = np.empty((steps, n), np.int64)
    for i in range(steps):
        r = rng.integers(0, rows, SAMPLE)
        s = rng.integers(0, t, SAMPLE)
        idx[i] = (r[:, None] * t + (s[:, None] + np.arange(case.seq)) % t).reshape(-1)
    out = np.empty((n, *case.item), case.dtype)
    best_add, best_take = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for i in range(steps):
            store[:, i % t] = src[i]
        best_add.append((time.perf_counter() - t0) / steps)
        t0 = time.perf_counter()
        for i in range(steps):
            np.take(flat, idx[i], axis=0, out=out)
        best_take.append((time.perf_counter() - t0) / steps)
    del store, flat, src, out
    return {"add": statistics.median(best_add), "sample": statistics.median(best_take)}


def measure_case(case: Case, args, libs: dict, log) -> list[dict]:
    """All operations and regimes of one case; returns result rows."""
    results = []
    steps = args.steps
    bufs = {name: make_buffer(lib, case) for name, lib in libs.items()}
    example = jnp.zeros(case.item, case.dtype)
    t_fill = time.perf_counter()
    states = {name: fill(buf, case) for name, buf in bufs.items()}
    log(f"  filled in {time.perf_counter() - t_fill:.1f} s")
    # set_priorities writes the indices of one sample (drawn from flax_replay's buffer; the
    # leaf numbering is the same: row * items_per_row + slot).
    indices = None
    if case.prioritised:
        s = jax.jit(bufs["flax_replay"].sample)(states["flax_replay"], jax.random.key(9))
        indices = s.indices
    inputs = make_inputs(case, steps, indices)
    fr_buf = bufs["flax_replay"]
    views = args.views and case.item == (8,) and not (args.quick and case.capacity > 10**4)
    regimes = ("call", "scan")
    for regime in regimes:
        apis = {"flax_replay": Functional(fr_buf)}
        if "flashbax" in bufs:
            apis["flashbax"] = Functional(bufs["flashbax"])
        if views:
            apis["linen"] = Linen(fr_buf, example)
            apis["nnx"] = NNX(fr_buf, example)
        ops = {name: build_ops(api, case, regime, steps, inputs) for name, api in apis.items()}
        for op_name in ops["flax_replay"]:
            t0 = time.perf_counter()
            calls = args.calls
            # flax_replay, Linen and NNX share one state (views of the same buffer), handed
            # from arm to arm; Flashbax has its own.
            arms = {name: Arm(ops[name][op_name], calls) for name in apis}
            own = {"flax_replay": "flax_replay", "flashbax": "flashbax",
                   "linen": "flax_replay", "nnx": "flax_replay"}

            def run(name, apis=apis, arms=arms, own=own, states=states):
                api = apis[name]
                s = api.to_state(states[own[name]])
                dt, s = arms[name].run(s)
                states[own[name]] = api.from_state(s)
                return dt

            for name in apis:  # compile and warm up
                run(name)
                run(name)
            order = ["flax_replay"] + (["flashbax", "flashbax"] if "flashbax" in apis else [])
            order += [v for v in ("linen", "nnx") if v in apis]
            times = {k: [] for k in ("flax_replay", "flashbax", "flashbax2", "linen", "nnx")}
            for r in range(args.rounds):
                seq = order if r % 2 == 0 else order[::-1]
                seen_fb = 0
                for name in seq:
                    key = name
                    if name == "flashbax":
                        key = "flashbax" if seen_fb == 0 else "flashbax2"
                        seen_fb += 1
                    times[key].append(run(name))
            row = dict(kind=case.kind, item=case.label().split(" | ")[1],
                       capacity=case.capacity, rows=case.rows, op=op_name, regime=regime,
                       fr_us=statistics.median(times["flax_replay"]) * 1e6)
            if times["flashbax"]:
                row["fb_us"] = statistics.median(times["flashbax"]) * 1e6
                row["fr_fb"] = statistics.median(
                    a / b for a, b in zip(times["flax_replay"], times["flashbax"]))
                row["aa"] = statistics.median(
                    a / b for a, b in zip(times["flashbax2"], times["flashbax"]))
            for v in ("linen", "nnx"):
                if times[v]:
                    row[f"{v}_fr"] = statistics.median(
                        a / b for a, b in zip(times[v], times["flax_replay"]))
            results.append(row)
            log(f"  {regime:4s} {op_name:22s} fr {row['fr_us']:9.1f} us"
                + (f"  fb {row['fb_us']:9.1f} us  fr/fb {row['fr_fb']:.2f}  A/A {row['aa']:.2f}"
                   if "fb_us" in row else "")
                + "".join(f"  {v}/fr {row[v + '_fr']:.2f}" for v in ("linen", "nnx")
                          if v + "_fr" in row)
                + f"  ({time.perf_counter() - t0:.0f} s)")
        del ops, arms
        gc.collect()
    del states, bufs, inputs
    gc.collect()
    if args.numpy:  # after the buffers are freed: the reference holds a buffer-sized array
        ref = time_numpy(case, steps, args.rounds)
        for row in results:
            if row["op"] in ref:
                row["np_us"] = ref[row["op"]] * 1e6
                row["fr_np"] = row["fr_us"] / row["np_us"]
        log(f"  numpy add {ref['add'] * 1e6:.1f} us  take {ref['sample'] * 1e6:.1f} us")
    return results


# --------------------------------------------------------------------- branching sweep
def branching_sweep(args, log) -> list[dict]:
    """Prioritised flat buffer, item (8,), 1 row per add, scanned: add and
    sample+set_priorities per step, for several sum-tree branching factors."""
    out = []
    for capacity in args.branch_capacities:
        case = Case("prioritised flat", 1, (8,), capacity)
        inputs = None
        for k in args.branchings:
            buf = make_buffer(flax_replay, case, branching=k)
            state = fill(buf, case)
            if inputs is None:
                idx = jax.jit(buf.sample)(state, jax.random.key(9)).indices
                inputs = make_inputs(case, args.steps, idx)
            ops = build_ops(Functional(buf), case, "scan", args.steps, inputs)
            for name in ("add", "sample+set_priorities"):
                arm = Arm(ops[name], 1)
                for _ in range(2):
                    _, state = arm.run(state)
                ts = []
                for _ in range(args.rounds):
                    dt, state = arm.run(state)
                    ts.append(dt)
                us = statistics.median(ts) * 1e6
                out.append(dict(capacity=capacity, branching=k, op=name, us=us))
                log(f"  branching {k:3d} {capacity:.0e} {name:22s} {us:8.1f} us")
            del state, ops
            gc.collect()
    return out


# -------------------------------------------------------------------------------- report
def _version(package: str) -> str:
    try:
        from importlib.metadata import version
        return version(package)
    except Exception:
        return "absent"


def fmt(x: Optional[float], digits: int = 2) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def summarise(rows: list[dict], branch: list[dict], memory: list[dict], skipped: list[str],
              args, elapsed: float) -> str:
    noise = [abs(r["aa"] - 1) for r in rows if "aa" in r]
    band = float(np.percentile(noise, 90)) if noise else 0.0
    lines = [f"# flax_replay vs Flashbax 0.1.3 vs NumPy ({jax.default_backend().upper()}: "
             f"{jax.devices()[0].device_kind})", ""]
    flags = "".join(" " + (a if re.fullmatch(r"[\w./=-]+", a) else repr(a)) for a in args.argv)
    lines += [f"Command: `python -m benchmarks.run{flags}`; "
              f"{platform.processor() or platform.machine()}, "
              f"{len(os.sched_getaffinity(0))} of {os.cpu_count()} cores, "
              f"jax {jax.__version__}, flashbax {_version('flashbax')}; "
              f"{elapsed / 60:.0f} min. Times are medians over {args.rounds} rounds; ratios are "
              f"medians of per-round ratios (< 1: flax_replay is faster). Scan: "
              f"{args.steps} operations per jitted `lax.scan` ({ADD_SCAN * args.steps} for `add`), "
              "time per operation. Call: one "
              "jitted call, dispatch and `block_until_ready` included.", ""]
    lines += [f"A/A noise (Flashbax against itself): 90% of workloads within "
              f"+-{band * 100:.0f}% (median |A/A - 1| = "
              f"{statistics.median(noise) * 100 if noise else 0:.0f}%).", ""]
    lines += targets(rows, band)
    for v, name in (("linen_fr", "Linen"), ("nnx_fr", "NNX")):
        for regime in ("call", "scan"):
            vals = [r[v] for r in rows if v in r and r["regime"] == regime]
            if vals:
                lines.append(f"{name} module over the functional call, {regime}: median "
                             f"{statistics.median(vals):.2f}x (range {min(vals):.2f}-"
                             f"{max(vals):.2f}x, item (8,) workloads).")
    lines.append("")
    if branch:
        lines += ["", "## Sum-tree branching (prioritised flat, item (8,), 1 row, scan)", "",
                  "| capacity | branching | add us | sample+set_priorities us |",
                  "| --- | --- | --- | --- |"]
        keyed = {}
        for b in branch:
            keyed.setdefault((b["capacity"], b["branching"]), {})[b["op"]] = b["us"]
        for (cap, k), v in sorted(keyed.items()):
            lines.append(f"| {cap:.0e} | {k} | {fmt(v.get('add'), 1)} | "
                         f"{fmt(v.get('sample+set_priorities'), 1)} |")
    if memory:
        lines += ["", "## Memory (peak resident set while filling, separate process)", "",
                  "| library | buffer | buffer GB | baseline GB | peak GB | "
                  "(peak - baseline) / buffer |", "| --- | --- | --- | --- | --- | --- |"]
        for m in memory:
            lines.append(f"| {m['library']} | {m['buffer']} | {m['buffer_gb']:.2f} | "
                         f"{m['baseline_gb']:.2f} | {m['peak_gb']:.2f} | "
                         f"{m['excess_ratio']:.3f} |")
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped) + "."]
    lines += ["", "## All workloads", "",
              "fr/fb = flax_replay / Flashbax time; A/A = Flashbax / Flashbax; fr/np = "
              "flax_replay / NumPy (add: copy of the same bytes, sample: np.take of the same "
              "rows); linen/fr and nnx/fr = the module's time over the functional call's.", "",
              "| buffer | item | capacity | rows | op | regime | fr us | fb us | fr/fb | A/A | "
              "fr/np | linen/fr | nnx/fr |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['item']} | {r['capacity']:.0e} | {r['rows']} | {r['op']} | "
            f"{r['regime']} | {fmt(r['fr_us'], 1)} | {fmt(r.get('fb_us'), 1)} | "
            f"{fmt(r.get('fr_fb'))} | {fmt(r.get('aa'))} | {fmt(r.get('fr_np'))} | "
            f"{fmt(r.get('linen_fr'))} | {fmt(r.get('nnx_fr'))} |")
    return "\n".join(lines) + "\n"


def targets(rows: list[dict], band: float) -> list[str]:
    """The issue's targets, each with the measured figure and met / missed."""
    out = ["## Targets", "", "| target | measured | met |", "| --- | --- | --- |"]

    def verdict(ok):
        return "yes" if ok else "**no**"

    vs = [r for r in rows if "fr_fb" in r]
    if vs:
        worst = max(vs, key=lambda r: r["fr_fb"])
        n_over = sum(r["fr_fb"] > 1 + band for r in vs)
        out.append(f"| every path at least as fast as Flashbax (fr/fb <= 1 + A/A band "
                   f"{1 + band:.2f}) | {len(vs) - n_over}/{len(vs)} paths; worst "
                   f"{worst['fr_fb']:.2f} ({worst['kind']}, {worst['item']}, "
                   f"{worst['capacity']:.0e}, {worst['rows']} rows, {worst['op']}, "
                   f"{worst['regime']}) | {verdict(n_over == 0)} |")
    big = [r for r in vs if r["capacity"] == 10**6 and r["regime"] == "scan" and r["kind"]
           .startswith("prioritised") and r["op"] in ("add", "sample+set_priorities")]
    if big:
        worst = max(big, key=lambda r: r["fr_fb"])
        out.append(f"| prioritised add and sample+set_priorities, scan, 1e6: fr/fb <= 0.5 | "
                   f"worst {worst['fr_fb']:.2f} ({worst['kind']}, {worst['rows']} rows, "
                   f"{worst['op']}) | {verdict(worst['fr_fb'] <= 0.5)} |")
    growth = []
    for r in rows:
        if r["regime"] == "scan" and r["capacity"] == 10**6:
            small = [s for s in rows if s["regime"] == "scan" and s["capacity"] == 10**4
                     and all(s[k] == r[k] for k in ("kind", "item", "rows", "op"))]
            if small:
                growth.append((r["fr_us"] / small[0]["fr_us"], r,
                               r.get("fb_us", 0) / small[0].get("fb_us", 1)))
    if growth:
        worst = max(growth, key=lambda g: g[0])
        fb = statistics.median(g[2] for g in growth)
        out.append(f"| scan, time per step at 1e6 <= 1.5x at 1e4 | worst {worst[0]:.2f}x "
                   f"({worst[1]['kind']}, {worst[1]['rows']} rows, {worst[1]['op']}); median "
                   f"{statistics.median(g[0] for g in growth):.2f}x (Flashbax median "
                   f"{fb:.2f}x) | {verdict(worst[0] <= 1.5)} |")
    for op, what in (("add", "NumPy copy"), ("sample", "NumPy np.take")):
        cand = [r for r in rows if r["regime"] == "scan" and r["op"] == op and "fr_np" in r]
        if cand:
            worst = max(cand, key=lambda r: r["fr_np"])
            out.append(f"| scan {op}: bytes/s >= 1/3 of {what} (fr/np <= 3) | worst "
                       f"{worst['fr_np']:.2f} ({worst['kind']}, {worst['item']}, "
                       f"{worst['capacity']:.0e}, {worst['rows']} rows); median "
                       f"{statistics.median(r['fr_np'] for r in cand):.2f} | "
                       f"{verdict(worst['fr_np'] <= 3)} |")
    return out


def plot(rows: list[dict], band: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(op, regime) for regime in ("call", "scan")
              for op in ("add", "sample", "set_priorities", "sample+set_priorities")]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, key, title in ((axes[0], "fr_fb", "flax_replay / Flashbax"),
                           (axes[1], "fr_np", "flax_replay / NumPy")):
        xs, ys, cs = [], [], []
        for g, (op, regime) in enumerate(groups):
            vals = [r[key] for r in rows if r["op"] == op and r["regime"] == regime
                    and key in r]
            if not vals:
                continue
            jitter = np.linspace(-0.3, 0.3, len(vals)) if len(vals) > 1 else [0.0]
            xs += list(g + np.asarray(jitter))
            ys += vals
            cs += ["tab:blue" if regime == "call" else "tab:orange"] * len(vals)
        ax.scatter(xs, ys, c=cs, s=9)
        ax.axhline(1.0, color="k", lw=0.8)
        if key == "fr_fb":
            ax.axhspan(1 - band, 1 + band, color="0.85", zorder=0)
            ax.axhline(0.5, color="k", lw=0.5, ls="--")
        else:
            ax.axhline(3.0, color="k", lw=0.5, ls="--")
        ax.set_yscale("log")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{op.replace('sample+set_priorities', 's+sp')}\n{regime}"
                            for op, regime in groups], fontsize=6)
        ax.set_title(title, fontsize=9)
    axes[0].set_ylabel("time ratio (log; < 1: flax_replay faster)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smaller sweep")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--max-gb", type=float, default=1.5,
                   help="skip cases whose buffer is larger (each library holds one)")
    p.add_argument("--only", default="", help="run only cases whose label contains this")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-branching", action="store_true")
    p.add_argument("--no-views", action="store_true", help="skip the Linen and NNX arms")
    p.add_argument("--device", action="store_true",
                   help="the accelerator sweep of benchmarks/device.sh: prioritised flat "
                        "buffers, (8,) float32 and (84, 84) uint8 items, 1e5 and 1e6 items; "
                        "writes to benchmarks/results/<platform>/ unless --out is given")
    p.add_argument("--smoke", action="store_true",
                   help="with --device: tiny sizes and few rounds, to check that it runs")
    p.add_argument("--cores", type=int, default=0,
                   help="pin the process to this many cores (0: all). XLA:CPU splits every "
                        "gather or scatter on an array over 256 KB across up to sqrt(cores) "
                        "threads; with one core nothing is split")
    args = p.parse_args(argv)
    if args.device and args.out == p.get_default("out"):
        args.out = str(Path(args.out) / jax.default_backend())
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.cores:  # before the first computation creates the CPU client and its threads
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])
    args.views = not args.no_views
    args.numpy = True
    kinds = KINDS
    if args.device:
        kinds = ("prioritised flat",)
        args.steps, args.rounds, args.calls = 50, 5, 10
        caps, rowss = (10**5, 10**6), (1, 128)
        items = (((8,), "float32"), ((84, 84), "uint8"))
        args.no_branching = args.no_memory = True
        if args.smoke:
            args.steps, args.rounds, args.calls = 4, 2, 2
            caps, rowss, args.views = (2_000,), (128,), False
    elif args.quick:
        args.steps, args.rounds, args.calls = 50, 7, 10
        caps, items, rowss = (10**4, 10**6), FLOAT_ITEMS, (1, 128)
        args.branchings, args.branch_capacities = (4, 16), (10**6,)
    else:
        args.steps, args.rounds, args.calls = 64, 15, 16
        caps, items, rowss = (10**4, 10**5, 10**6), FLOAT_ITEMS, (1, 128)
        args.branchings, args.branch_capacities = (4, 8, 16, 32), (10**4, 10**6)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    libs = {"flax_replay": flax_replay}
    if flashbax is None:
        print("flashbax is not installed (pip install -e '.[bench]'): timing flax_replay, its "
              "views and NumPy only", flush=True)
    else:
        libs["flashbax"] = flashbax

    def log(msg):
        print(msg, flush=True)

    cases, skipped = [], []
    for kind in kinds:
        for item, dtype in items:
            for cap in caps:
                for rows in rowss:
                    case = Case(kind, rows, item, cap, dtype)
                    if args.only and args.only not in case.label():
                        continue
                    if args.quick and not args.device and item != (8,) and (
                            cap > 10**4 or rows == 1):
                        continue  # the quick sweep: large items at 1e4, 128 rows only
                    if case.buffer_bytes > args.max_gb * 1e9:
                        skipped.append(f"{case.label()} ({case.buffer_bytes / 1e9:.1f} GB per "
                                       "buffer)")
                        continue
                    cases.append(case)
    start = time.perf_counter()
    rows = []
    for i, case in enumerate(cases):
        log(f"[{i + 1}/{len(cases)}] {case.label()}  ({case.buffer_bytes / 1e6:.0f} MB)")
        rows += measure_case(case, args, libs, log)
        (out / "results.json").write_text(json.dumps(dict(rows=rows), indent=1))
    branch = [] if args.no_branching or args.only else branching_sweep(args, log)
    memory = []
    if not args.no_memory and not args.only:
        for lib in libs:
            cmd = [sys.executable, str(ROOT / "benchmarks" / "memory.py"), "--library", lib,
                   "--gb", "2.0", "--json"]
            log("memory: " + " ".join(cmd[1:]))
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            if res.returncode == 0:
                memory.append(json.loads(res.stdout.strip().splitlines()[-1]))
                log(f"  {memory[-1]}")
            else:
                log(res.stderr[-2000:])
    elapsed = time.perf_counter() - start
    noise = [abs(r["aa"] - 1) for r in rows if "aa" in r]
    band = float(np.percentile(noise, 90)) if noise else 0.0
    text = summarise(rows, branch, memory, skipped, args, elapsed)
    (out / "RESULTS.md").write_text(text)
    (out / "results.json").write_text(json.dumps(
        dict(rows=rows, branching=branch, memory=memory, skipped=skipped), indent=1))
    if rows:
        plot(rows, band, out / "ratios.png")
    print(text)


if __name__ == "__main__":
    main()
