"""Where the experience lives: `memory_kind` (None = the devices' default memory, or
"pinned_host").

With `memory_kind="pinned_host"` the experience leaves of a buffer state live in host memory,
while the indices, counters and the sum tree stay in device memory. JAX types an array's memory
space (`uint8<host>[...]`) and refuses to mix spaces in one operation, so the three places
that touch the experience say where each operand lives:

- `init`: the empty storage is placed in host memory (`to_storage`);
- `add`: the time indices and the new steps are moved to host memory, and the scatter writes
  them into the host storage (`to_storage`); under `jit` with the state donated the storage
  is updated in place (the compiled program aliases it, no copy);
- `sample`: the indices are moved to host memory, the batch is gathered there and the gathered
  batch (only it) is moved to device memory (`to_device`).

All of it inside one jitted program: no Python round trip. On CPU the host and device memories
are the same RAM, so this is tested for identical states and samples here. On GPU/TPU the
storage sits in pinned host RAM: an `add` sends the new steps (`[rows, A, ...]`) host-ward and
a `sample` brings only the `[B, ...]` batch device-ward over PCIe/DMA; the scatter and gather
themselves run where XLA places host-memory computations (not measured yet: see
benchmarks/README.md).

Sharded buffers (`sharding.py`) keep the same rule per device: the experience leaves
`NamedSharding(mesh, spec, memory_kind=...)` carry the kind (their row sharding unchanged),
each shard's block is written and gathered in host memory inside the `shard_map`, and
`abstract_state` gives Orbax targets in that memory kind.

"unpinned_host" is refused with jax 0.10.2 (re-checked on CPU with a minimal reproduction):
inside `jit`, `device_put(x, jax.memory.Space.Host)` lands in pinned_host, while
`device_put` / `with_sharding_constraint` to an unpinned_host sharding, and a nested jit with
such `out_shardings`, all land in device memory. Only the outermost `jax.jit(f,
out_shardings=<unpinned_host>)` places a result there (donated, it is then aliased in place);
the same donated update without those `out_shardings` aborts the process (PjRt: "memory kind
does not match sharding's memory kind"). A buffer's methods are pure functions the caller
jits, scans and nests in a train step, so one forgotten `out_shardings` would kill the
process instead of raising: refused until a transfer inside `jit` can target it.
"""

from __future__ import annotations

from typing import Optional

import jax

from flax_replay._src.typing import PyTree

SUPPORTED = ("pinned_host",)


def device_kinds() -> list[str]:
    """The memory kinds every local device offers (in the first device's order)."""
    devices = jax.local_devices()
    kinds = [m.kind for m in devices[0].addressable_memories()]
    return [k for k in kinds if all(k in {m.kind for m in d.addressable_memories()}
                                    for d in devices)]


def checked(memory_kind: Optional[str]) -> Optional[str]:
    """`memory_kind` as a buffer stores it: None for the default (device) memory,
    "pinned_host"; ValueError naming it and the kinds the devices have otherwise."""
    if memory_kind is None:
        return None
    kinds = device_kinds()
    default = jax.local_devices()[0].default_memory().kind
    if memory_kind not in kinds:
        raise ValueError(f"memory_kind={memory_kind!r} is not a memory of the devices "
                         f"({jax.local_devices()[0].platform}); their kinds are {kinds}")
    if memory_kind == default:
        return None
    if memory_kind not in SUPPORTED:
        raise ValueError(
            f"memory_kind={memory_kind!r} is offered by the devices ({kinds}) but cannot hold "
            f"a buffer with jax {jax.__version__}: no transfer inside jit can target it (the "
            "result lands in device memory; only the outermost jit's out_shardings can), and a "
            "donated jitted update of such an array without them aborts the process; use "
            "memory_kind='pinned_host' or None")
    return memory_kind


def to_storage(tree: PyTree, memory_kind: Optional[str]) -> PyTree:
    """`tree` in the storage's memory (a no-op for the default memory)."""
    if memory_kind is None:
        return tree
    return jax.device_put(tree, jax.memory.Space.Host)


def to_device(tree: PyTree, memory_kind: Optional[str]) -> PyTree:
    """`tree`, gathered from the storage, in device memory (a no-op for the default)."""
    if memory_kind is None:
        return tree
    return jax.device_put(tree, jax.memory.Space.Device)
