"""What a restore checks before it hands back a buffer: the bytes read are the bytes saved
(checksums), and the buffer's own invariants hold (a damaged tree is never sampled).

Orbax stores no checksum of array data: flipped bytes in a saved array restore silently. So
`checkpoint.save` records, in the step's metadata (`_CHECKPOINT_METADATA`, key
"flax_replay"), a CRC-32 of every `CHUNK_BYTES` of every array leaf, and `checkpoint.restore`
recomputes them on what it read. The items stay plain Orbax items: Orbax alone still opens
them and ignores the record.

Cost: CRC-32 (zlib, released GIL, one thread per core) over host memory. On CPU the host
view of a device array is the array itself (no copy, no extra pass over device memory); on
GPU/TPU it is one device-to-host copy at save (Orbax makes its own) and at restore. Leaves
that are not fully addressable (a buffer sharded over several processes) get no checksum:
each process holds only its shards, and the record is written by one process.

Invariants (`buffer_problems`), checked on host arrays whatever their source:
  - sum tree: every node finite and >= 0, every parent the float32 sum of its children
    (within rounding), the padding 0;
  - min tree: every parent the min of its children; every leaf its sum leaf, or inf where
    that is 0;
  - max_priority finite and >= 0;
  - write/read positions (`current_index`, `write_index`, `read_index`) in [0, T).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Optional

import jax
import numpy as np

from flax_replay._src import sum_tree

ALGORITHM = "crc32"
CHUNK_BYTES = 32 << 20  # 32 MiB: enough chunks for every core, few numbers to store

Leaves = dict[str, dict[str, Any]]  # {item: {"a/b/leaf": array}}


# ------------------------------------------------------------------------------ checksums
def host_view(x: Any) -> Optional[np.ndarray]:
    """The array as a contiguous NumPy array (a view on CPU), or None when this process
    does not hold all of it."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return None
    return np.ascontiguousarray(np.asarray(x))


def _chunks(a: np.ndarray, chunk_bytes: int) -> list[memoryview]:
    data = memoryview(a.reshape(-1).view(np.uint8)) if a.size else memoryview(b"")  # type: ignore[arg-type]
    return [data[i:i + chunk_bytes] for i in range(0, max(len(data), 1), chunk_bytes)]


def checksums(leaves: Leaves, chunk_bytes: int = CHUNK_BYTES) -> dict[str, Any]:
    """The record `checkpoint.save` stores: `{"algorithm", "chunk_bytes", "leaves": {item:
    {leaf: [crc32 of each chunk]}}}` over every fully addressable leaf of `leaves`."""
    jobs: list[tuple[str, str, memoryview]] = []
    for item, flat in leaves.items():
        for name, x in flat.items():
            a = host_view(x)
            if a is not None:
                jobs.extend((item, name, c) for c in _chunks(a, chunk_bytes))
    out: dict[str, dict[str, list[int]]] = {}
    for (item, name, _), crc in zip(jobs, _map_crc([c for *_, c in jobs])):
        out.setdefault(item, {}).setdefault(name, []).append(crc)
    return {"algorithm": ALGORITHM, "chunk_bytes": chunk_bytes, "leaves": out}


def _map_crc(chunks: list[memoryview]) -> list[int]:
    # zlib releases the GIL on large buffers: the chunks are checksummed in parallel.
    if len(chunks) <= 1:
        return [zlib.crc32(c) for c in chunks]
    with ThreadPoolExecutor(max_workers=min(len(chunks), os.cpu_count() or 1)) as pool:
        return list(pool.map(zlib.crc32, chunks))


def mismatches(record: Mapping[str, Any], leaves: Leaves) -> list[tuple[str, str, str]]:
    """`(item, leaf, what)` for every leaf of `leaves` whose checksum differs from `record`
    (or that `record` says was saved with another size). Leaves absent from the record, or
    not fully addressable here, are not checked."""
    if record.get("algorithm") != ALGORITHM:
        return [("*", "*", f"unknown checksum algorithm {record.get('algorithm')!r}")]
    chunk_bytes = int(record["chunk_bytes"])
    saved = record.get("leaves", {})
    jobs: list[memoryview] = []
    names: list[tuple[str, str, int, int]] = []
    for item, flat in leaves.items():
        for name, x in flat.items():
            want = saved.get(item, {}).get(name)
            a = None if want is None else host_view(x)
            if a is None:
                continue
            chunks = _chunks(a, chunk_bytes)
            if len(chunks) != len(want):
                return [(item, name, f"{len(chunks)} chunks read, {len(want)} saved")]
            jobs.extend(chunks)
            names.extend((item, name, i, w) for i, w in enumerate(want))
    bad: dict[tuple[str, str], list[int]] = {}
    for (item, name, i, want), got in zip(names, _map_crc(jobs)):
        if got != want:
            bad.setdefault((item, name), []).append(i)
    return [(item, name, f"CRC-32 differs in chunk(s) {chunks} of {chunk_bytes} bytes")
            for (item, name), chunks in bad.items()]


# ------------------------------------------------------------------------------ invariants
def _nodes(tree: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Mapping]]:
    """Every mapping in a nested tree of mappings, with its path."""
    if isinstance(tree, Mapping):
        yield prefix, tree
        for k, v in tree.items():
            yield from _nodes(v, prefix + (str(k),))


def _tree_geometry(num_nodes: int, branching: Optional[int]) -> Optional[sum_tree.Geometry]:
    """The geometry of a flat tree of `num_nodes` nodes: the node count grows strictly with
    the (padded) leaf level, so a bisection finds it. Tries the default branching first."""
    for b in ([branching] if branching else [sum_tree.DEFAULT_BRANCHING, 2, 8, 16, 3, 5, 6, 7]):
        lo, hi = 1, max(1, num_nodes // b + 1)
        while lo <= hi:
            mid = (lo + hi) // 2
            geo = sum_tree.geometry(mid * b, b)
            if geo.num_nodes == num_nodes:
                return geo
            lo, hi = (mid + 1, hi) if geo.num_nodes < num_nodes else (lo, mid - 1)
    return None


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask.reshape(-1))[0])


def tree_problems(sums: np.ndarray, mins: np.ndarray, max_priority: Any,
                  branching: Optional[int] = None) -> list[str]:
    """What is wrong with a priority state (host arrays); [] if nothing.

    `sums`, `mins`: `[..., nodes]`; leading axes (a sharded buffer's shards, a vmapped
    buffer's copies) are separate trees, each checked, with `max_priority` `[...]` or `[]`."""
    sums, mins = np.asarray(sums, np.float32), np.asarray(mins, np.float32)
    if sums.shape != mins.shape or sums.ndim < 1:
        return [f"sum_tree {sums.shape} and min_tree {mins.shape} must be equal shapes "
                "[..., nodes]"]
    if sums.ndim > 1:
        lead = sums.shape[:-1]
        mp = np.asarray(max_priority, np.float32)
        if mp.shape not in ((), lead):
            return [f"max_priority {mp.shape} must be [] or {lead}, as the trees' leading axes"]
        mp = np.broadcast_to(mp, lead)
        return [f"tree {i}: {p}" for i in np.ndindex(lead)
                for p in tree_problems(sums[i], mins[i], mp[i], branching)]
    problems = []
    geo = _tree_geometry(sums.size, branching)
    if geo is None:
        return [f"sum_tree: {sums.size} nodes is no tree of branching {branching or 'any'}"]
    bad = ~np.isfinite(sums) | (sums < 0)
    if bad.any():
        problems.append(f"sum_tree: {int(bad.sum())} node(s) negative, NaN or inf (first at "
                        f"node {_first(bad)}: {sums.reshape(-1)[_first(bad)]})")
    bad = np.isnan(mins) | (mins < 0)
    if bad.any():
        problems.append(f"min_tree: {int(bad.sum())} node(s) negative or NaN (first at node "
                        f"{_first(bad)})")
    mp = np.asarray(max_priority, np.float32)
    if not (np.isfinite(mp).all() and (mp >= 0).all()):
        problems.append(f"max_priority is {mp}, must be finite and >= 0")
    if problems:
        return problems
    eps = np.finfo(np.float32).eps
    k = geo.branching
    leaf0 = geo.offsets[-1]
    leaf_sums, leaf_mins = sums[leaf0:], mins[leaf0:]
    want_mins = np.where(leaf_sums > 0, leaf_sums, np.float32(np.inf))
    if not np.array_equal(leaf_mins, want_mins):
        problems.append(f"min_tree leaf {_first(leaf_mins != want_mins)} is not its sum_tree "
                        "leaf (or inf where that is 0)")
    for d in range(geo.depth):
        off, size, child_size = geo.offsets[d], geo.sizes[d], geo.sizes[d + 1]
        n = child_size // k
        ch = sums[geo.offsets[d + 1]:geo.offsets[d + 1] + child_size].reshape(n, k)
        exact = ch.astype(np.float64).sum(1)
        got = sums[off:off + n].astype(np.float64)
        wrong = np.abs(got - exact) > 2 * k * eps * exact + 1e-45
        if wrong.any() or (sums[off + n:off + size] != 0).any():
            i = _first(wrong) if wrong.any() else n
            problems.append(f"sum_tree: node {off + i} (depth {d}) is not the sum of its "
                            "children")
        ch = mins[geo.offsets[d + 1]:geo.offsets[d + 1] + child_size].reshape(n, k)
        wrong = mins[off:off + n] != ch.min(1)
        if wrong.any() or (mins[off + n:off + size] != np.inf).any():
            i = _first(wrong) if wrong.any() else n
            problems.append(f"min_tree: node {off + i} (depth {d}) is not the min of its "
                            "children")
    return problems


def buffer_problems(replay: Any, priorities: Any,
                    branching: Optional[dict[str, int]] = None) -> list[str]:
    """The broken invariants of every buffer in a "replay" and a "priorities" tree (nested
    mappings of host or device arrays, as a checkpoint holds them), each naming the buffer's
    path; `branching` maps a buffer's path ("a/b") to its tree's branching if known."""
    problems = []
    for path, node in _nodes(priorities):
        if "sum_tree" in node and "min_tree" in node:
            where = "/".join(("priorities",) + path)
            b = (branching or {}).get("/".join(path))
            sums, mins = host_view(node["sum_tree"]), host_view(node["min_tree"])
            if sums is None or mins is None:
                continue  # spread over processes: this one cannot see the whole tree
            problems += [f"{where}: {p}" for p in tree_problems(
                sums, mins, host_view(node.get("max_priority", 0.0)), b)]
    for path, node in _nodes(replay):
        storage = jax.tree_util.tree_leaves(node.get("experience"))
        if not storage or np.ndim(storage[0]) < 2:
            continue
        t = np.shape(storage[0])[1]
        for name in ("current_index", "write_index", "read_index"):
            if name in node:
                i = host_view(node[name])
                if i is not None and not ((i >= 0) & (i < t)).all():
                    problems.append(f"{'/'.join(('replay',) + path + (name,))} is {i}, "
                                    f"outside [0, {t}) (max_length_time_axis)")
    return problems
