"""Offline datasets on disk in Flashbax 0.1.3's Vault format (read and written both ways).

On-disk format (the one Flashbax 0.1.3 reads and writes; version 1.2):

    <cwd>/<rel_dir>/<vault_name>/<vault_uid>/
        metadata.json      {"version": 1.2, "structure_shape": {...: "(B, T, ...)"},
                            "structure_dtype": {...: "float32"}, **user metadata}
        (an OCDBT key-value store holding zarr arrays)
            "<key>.<key>."  one array per experience leaf, `[B, 10**13, *item_shape]`, time
                            extended as steps are written (gzip level 5 by default)
            "vault_index"   int32 `[1]`: the number of time steps written per row

The leaf names join the keys of the path with a "." after each (dict keys and attribute
names alike, so a vault written from a NamedTuple reads as a dict). Flashbax writes nothing
for a sequence index (two tuple elements would collide); here a sequence index is written as
its number.

Extras that Flashbax ignores: a prioritised state's leaf values (`priority **
priority_exponent`) are saved in a float32 array "priorities" `[B, 10**13]` (the value at a
time step is the item starting there; NaN where no item starts or it is not known), and its
`max_priority` in "max_priority" `[1]`.

Damage: TensorStore reports a flipped or truncated byte of an array's data (OCDBT and the
codec check it; tests/test_vault.py flips bytes all over a vault), and a read names the leaf.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import json
import os
from datetime import datetime
from typing import Any, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts
from orbax.checkpoint.utils import serialize_tree

from flax_replay._src import sum_tree
from flax_replay._src.core import TrajectoryBufferState
from flax_replay._src.typing import PyTree

VERSION = 1.2
METADATA_FILE = "metadata.json"
TIME_AXIS_MAX_LENGTH = int(10e12)  # Flashbax's bound on a vault's time axis
COMPRESSION_DEFAULT = {"id": "gzip", "level": 5}
INDEX_NAME = "vault_index"
PRIORITIES_NAME = "priorities"
MAX_PRIORITY_NAME = "max_priority"


class VaultError(ValueError):
    """A vault that cannot be opened, read or written as asked (names the vault and leaf)."""


# ------------------------------------------------------------------------------ tree helpers
def _key_name(key: Any) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    raise VaultError(f"unsupported key {key!r} in the experience tree")


def leaf_store_name(path: tuple) -> str:
    """The name of a leaf's array in the vault: every key followed by "." (Flashbax's names)."""
    return "".join(_key_name(k) + "." for k in path)


def _flat_names(tree: PyTree, is_leaf=None) -> tuple[list[str], list[Any], Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [leaf_store_name(p) for p, _ in flat], [x for _, x in flat], treedef


def _parse_shape(s: str) -> tuple[int, ...]:
    return tuple(int(d) for d in ast.literal_eval(s))


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """One experience leaf as the vault records it: `shape` `[B, T_buffer, *item]`, `dtype`."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def item_shape(self) -> tuple[int, ...]:
        return self.shape[2:]


# ------------------------------------------------------------------------------------ Vault
class Vault:
    """A dataset of time steps on disk, in Flashbax 0.1.3's Vault format.

    `Vault(vault_name, experience_structure=None, rel_dir="vaults", vault_uid=None,
    compression=None, metadata=None)` opens `<cwd>/<rel_dir>/<vault_name>/<vault_uid>` (the
    uid defaults to the current time, as Flashbax), creating it from `experience_structure`
    (usually `state.experience`, leaves `[B, T, *item_shape]`) when it does not exist.
    `write(state)` appends the steps the buffer received since the last write; `read()`
    returns steps as a state whose experience leaves are `[B, n, *item_shape]`;
    `iter_chunks(n)` streams them; `into_buffer(buffer)` loads a ready buffer state.

    Args beyond Flashbax's (keyword only): `save_priorities`, whether `write` of a
    prioritised state also saves its priorities (default True; Flashbax ignores them).
    """

    def __init__(
        self,
        vault_name: str,
        experience_structure: Optional[PyTree] = None,
        rel_dir: str = "vaults",
        vault_uid: Optional[str] = None,
        compression: Optional[dict] = None,
        metadata: Optional[dict] = None,
        *,
        save_priorities: bool = True,
    ) -> None:
        uid = vault_uid if vault_uid else datetime.now().strftime("%Y%m%d%H%M%S")
        self._base_path = os.path.normpath(os.path.join(os.getcwd(), rel_dir, vault_name, uid))
        self.save_priorities = save_priorities
        meta_path = os.path.join(self._base_path, METADATA_FILE)
        exists = os.path.exists(self._base_path)
        if exists:
            self._metadata = self._load_metadata(meta_path)
        elif experience_structure is None:
            raise VaultError(
                f"vault {self._base_path} does not exist and no experience_structure was given "
                "to create it (pass experience_structure=state.experience)"
            )
        else:
            self._metadata = self._new_metadata(experience_structure, metadata)
        self._compression = compression
        self._specs, self._treedef = self._leaf_specs(experience_structure)
        if not exists:
            os.makedirs(self._base_path)
            # The arrays first, the metadata last: a directory without metadata.json is a
            # vault whose creation did not finish (and it says so when opened).
            self._stores = self._open_stores(create=True)
            self._index_store = ts.open(self._spec(INDEX_NAME), dtype=ts.int32, shape=(1,),
                                        create=True).result()
            with open(meta_path, "w") as f:
                f.write(json.dumps(self._metadata))
        else:
            self._stores = self._open_stores(create=False)
            self._index_store = self._open_existing(INDEX_NAME)
        self.vault_index = int(self._index_store.read().result()[0])
        self._priority_stores: Optional[tuple[Any, Any]] = None
        # What this object last received from a buffer: time index, fill state and steps
        # written per row (if the state counts them), to append only the new steps.
        self._last_index, self._last_full, self._last_written = 0, False, 0
        self._received = False
        self._run_offset: Optional[int] = None  # vault position of the buffer's time 0
        self._run_start = 0

    # --------------------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str, **kwargs: Any) -> "Vault":
        """Opens the existing vault at directory `path` (`<rel_dir>/<vault_name>/<uid>`)."""
        path = os.path.normpath(os.path.abspath(path))
        if not os.path.exists(os.path.join(path, METADATA_FILE)):
            raise VaultError(f"{path} is not a vault (no {METADATA_FILE})")
        rel_dir, name = os.path.split(os.path.dirname(path))
        return cls(name, rel_dir=rel_dir, vault_uid=os.path.basename(path), **kwargs)

    @property
    def path(self) -> str:
        """The vault's directory."""
        return self._base_path

    @property
    def metadata(self) -> dict:
        """The contents of metadata.json (version, structure, the user's metadata)."""
        return dict(self._metadata)

    def _load_metadata(self, meta_path: str) -> dict:
        try:
            with open(meta_path) as f:
                meta = json.loads(f.read())
        except FileNotFoundError:
            raise VaultError(f"vault {self._base_path} has no {METADATA_FILE} (its creation "
                             "did not finish, or this is not a vault)") from None
        except json.JSONDecodeError as e:
            raise VaultError(f"vault {self._base_path}: {METADATA_FILE} is damaged ({e})") from None
        if not isinstance(meta, dict) or not {"version", "structure_shape",
                                               "structure_dtype"} <= set(meta):
            raise VaultError(f"vault {self._base_path}: {METADATA_FILE} lacks version/structure")
        if int(meta["version"]) != int(VERSION):
            raise VaultError(f"vault {self._base_path} has format version {meta['version']}; "
                             f"this reads version {int(VERSION)}.x")
        return meta

    @staticmethod
    def _new_metadata(structure: PyTree, metadata: Optional[dict]) -> dict:
        abstract = jax.eval_shape(lambda: structure)
        serial = serialize_tree(abstract)
        # User metadata that JSON cannot hold is saved as its str (as Flashbax does).
        user = jax.tree.map(
            lambda x: x if isinstance(x, (bool, str, int, float, type(None))) else str(x),
            metadata)
        return {
            "version": VERSION,
            "structure_shape": jax.tree.map(lambda x: str(tuple(x.shape)), serial),
            "structure_dtype": jax.tree.map(lambda x: x.dtype.name, serial),
            **(user or {}),
        }

    def _leaf_specs(self, structure: Optional[PyTree]) -> tuple[list[LeafSpec], Any]:
        """The leaves in the order of the user's structure (or the metadata's dict)."""
        is_str = lambda x: isinstance(x, str)
        names, shapes, treedef = _flat_names(self._metadata["structure_shape"], is_str)
        dnames, dtypes, _ = _flat_names(self._metadata["structure_dtype"], is_str)
        if names != dnames:
            raise VaultError(f"vault {self._base_path}: {METADATA_FILE} has different leaves "
                             f"for shapes {names} and dtypes {dnames}")
        stored = {n: LeafSpec(n, _parse_shape(s), np.dtype(d))
                  for n, s, d in zip(names, shapes, dtypes)}
        if structure is None:
            return [stored[n] for n in names], treedef
        unames, uleaves, utreedef = _flat_names(jax.eval_shape(lambda: structure))
        missing = [n for n in unames if n not in stored]
        extra = [n for n in names if n not in set(unames)]
        if missing or extra:
            raise VaultError(
                f"vault {self._base_path}: the experience structure does not match the "
                f"vault's: leaves not in the vault {missing}, vault leaves not in the "
                f"structure {extra}")
        for n, x in zip(unames, uleaves):
            self._check_leaf(stored[n], tuple(x.shape), np.dtype(x.dtype), "structure")
        return [stored[n] for n in unames], utreedef

    def _check_leaf(self, spec: LeafSpec, shape: tuple[int, ...], dtype: np.dtype,
                    what: str) -> None:
        """A `[B, T, *item]` leaf fits the vault's if B, the item shape and dtype agree (T is
        the buffer's own time axis, free)."""
        if len(shape) < 2 or shape[0] != spec.rows or shape[2:] != spec.item_shape:
            raise VaultError(
                f"vault {self._base_path}: {what} leaf {spec.name!r} has shape {shape}; the "
                f"vault's is {(spec.rows, 'T', *spec.item_shape)} (rows, any time T, item "
                "shape)".replace("'T'", "T"))
        if dtype != spec.dtype:
            raise VaultError(f"vault {self._base_path}: {what} leaf {spec.name!r} has dtype "
                             f"{dtype}; the vault's is {spec.dtype}")

    def _spec(self, name: str) -> dict:
        return {"driver": "zarr",
                "kvstore": {"driver": "ocdbt", "base": f"file://{self._base_path}",
                            "path": name}}

    def _open_existing(self, name: str) -> Any:
        try:
            return ts.open(self._spec(name), open=True).result()
        except Exception as e:  # TensorStore raises ValueError for missing/damaged metadata
            raise VaultError(f"vault {self._base_path}: cannot open array {name!r}: {e}") from None

    def _open_stores(self, create: bool) -> list[Any]:
        futures = []
        for spec in self._specs:
            if create:
                s = self._spec(spec.name)
                s["metadata"] = {"compressor": (COMPRESSION_DEFAULT if self._compression is None
                                                else self._compression)}
                futures.append(ts.open(s, create=True, dtype=spec.dtype.name,
                                       shape=(spec.rows, TIME_AXIS_MAX_LENGTH, *spec.item_shape)))
            else:
                futures.append(ts.open(self._spec(spec.name), open=True))
        stores = []
        for spec, fut in zip(self._specs, futures):
            try:
                store = fut.result()
            except Exception as e:
                raise VaultError(f"vault {self._base_path}: cannot open leaf {spec.name!r}: "
                                 f"{e}") from None
            want = (spec.rows, TIME_AXIS_MAX_LENGTH, *spec.item_shape)
            if tuple(store.shape) != want or np.dtype(store.dtype.numpy_dtype) != spec.dtype:
                raise VaultError(
                    f"vault {self._base_path}: leaf {spec.name!r} is stored as {store.dtype} "
                    f"{tuple(store.shape)}, but {METADATA_FILE} says {spec.dtype} {want}")
            stores.append(store)
        return stores

    # ----------------------------------------------------------------------------- write
    def write(self, state: Any, source_interval: tuple[int, int] = (0, 0),
              dest_start: Optional[int] = None, *, written: Optional[int] = None,
              buffer: Any = None) -> int:
        """Appends the buffer's new steps; returns how many time steps per row were written.

        By default (`source_interval=(0, 0)`) the steps received since the previous `write`
        of this object (the whole buffer on the first, in time order, also when it is exactly
        full) go to the end of the vault. Refuses (VaultError, nothing written) when more than
        a time axis of steps went by since the last write: they are lost. A prioritised
        state counts its steps (`running_index`), so this is exact; for a uniform state pass
        `written=` (steps per row ever added) to have it exact, else only a wrap seen from a
        not-yet-full buffer is caught, and a full buffer must be written at least every T - 1
        steps (after exactly T it looks as it did: nothing new). An explicit
        `source_interval=(a, b)` writes time indices a..b of the buffer (wrapping past the end
        if b < a) at `dest_start` (default: the end of the vault), as Flashbax does.

        `buffer=` the `PrioritisedBuffer` of a prioritised state: its priorities are saved
        too (unless `save_priorities=False`), the value of each stored item at the vault
        position of its first step, rewritten at every write (items complete and their
        priorities change while they stay in the buffer).
        """
        experience = state.experience
        t = self._check_state(experience)
        cur, full = int(state.current_index), bool(state.is_full)
        counted = getattr(state, "running_index", None)
        w = int(counted) if counted is not None else written
        explicit = tuple(source_interval) != (0, 0)
        if explicit:
            a, b = (int(i) for i in source_interval)
            if not (0 <= a <= t and 0 <= b <= t):
                raise VaultError(f"vault {self._base_path}: source_interval {source_interval} "
                                 f"lies outside the buffer's time axis [0, {t}]")
            n = b - a if b >= a else t - a + b
        else:
            n = self._new_steps(t, cur, full, w)
        dest = self.vault_index if dest_start is None else int(dest_start)
        if not 0 <= dest <= self.vault_index:
            raise VaultError(f"vault {self._base_path}: dest_start={dest_start} would leave a "
                             f"gap after the {self.vault_index} steps written")
        start = a if explicit else (cur - n) % t
        if n > 0:
            self._write_steps(experience, start, n, t, dest)
        core = getattr(buffer, "core", None)
        if (not explicit and counted is not None and self.save_priorities and n > 0
                and hasattr(core, "tree_geometry")):
            self._write_priorities(state, core, t, w, n, dest)  # type: ignore[arg-type]
        if n > 0:
            self.vault_index = max(self.vault_index, dest + n)
            self._index_store.write(np.array([self.vault_index], np.int32)).result()
        self._last_index, self._last_full, self._received = cur, full, True
        self._last_written = w if w is not None else self._last_written + n
        return n

    def _check_state(self, experience: PyTree) -> int:
        """The time axis T of a state's experience after checking it against the vault."""
        names, leaves, _ = _flat_names(experience)
        want = [s.name for s in self._specs]
        if sorted(names) != sorted(want):
            raise VaultError(
                f"vault {self._base_path}: the state's experience has leaves {names}; the "
                f"vault's are {want}")
        by_name = dict(zip(names, leaves))
        times = set()
        for spec in self._specs:
            x = by_name[spec.name]
            self._check_leaf(spec, tuple(np.shape(x)), np.dtype(jnp.result_type(x)), "state")
            times.add(np.shape(x)[1])
        if len(times) != 1:
            raise VaultError(f"vault {self._base_path}: the state's leaves have different time "
                             f"axes {sorted(times)}")
        return times.pop()

    def _new_steps(self, t: int, cur: int, full: bool, w: Optional[int]) -> int:
        """Steps per row received since the last write (raises if some are already lost)."""
        where = f"vault {self._base_path}: "
        if not self._received:
            # The first write takes what the buffer holds, whatever came before it.
            return t if full else cur
        if w is not None:
            n = w - self._last_written
            if n < 0:
                raise VaultError(where + f"the state has {w} steps per row written, fewer than "
                                 f"the {self._last_written} already saved from it (a different "
                                 "buffer? use a new Vault object for it)")
        elif not full:
            n = cur - self._last_index
            if self._last_full or n < 0:
                raise VaultError(where + f"the state's write index went back from "
                                 f"{self._last_index} to {cur} without wrapping (a different "
                                 "buffer? use a new Vault object for it)")
        elif not self._last_full:
            # It wrapped since the last write: T - last + cur steps (T if cur == last).
            n = t - self._last_index + cur
        else:
            n = (cur - self._last_index) % t
        if n > t:
            raise VaultError(
                where + f"{n} steps per row were added since the last write, more than the "
                f"buffer's time axis of {t}: {n - t} of them are overwritten and lost. Write at "
                f"least every {t} steps (nothing was written)")
        return n

    def _write_steps(self, experience: PyTree, start: int, n: int, t: int, dest: int) -> None:
        """Time indices start..start+n (mod T) of every leaf to vault positions dest..dest+n."""
        names, leaves, _ = _flat_names(experience)
        by_name = dict(zip(names, leaves))
        pieces = [(start, min(start + n, t))]
        if start + n > t:
            pieces.append((0, start + n - t))
        futures = []
        offset = dest
        for lo, hi in pieces:
            for spec, store in zip(self._specs, self._stores):
                data = _host_slice(by_name[spec.name], lo, hi)
                futures.append(store[:, offset:offset + hi - lo].write(data))
            offset += hi - lo
        errors = []
        for f in futures:
            try:
                f.result()
            except Exception as e:  # every failure collected before raising
                errors.append(str(e))
        if errors:
            raise VaultError(f"vault {self._base_path}: writing failed (vault_index unchanged "
                             f"at {self.vault_index}): {errors[0]}")

    def _priority_arrays(self, create: bool) -> Optional[tuple[Any, Any]]:
        if self._priority_stores is None:
            rows = self._specs[0].rows
            spec = self._spec(PRIORITIES_NAME)
            mspec = self._spec(MAX_PRIORITY_NAME)
            try:
                if create:
                    spec["metadata"] = {"compressor": COMPRESSION_DEFAULT, "fill_value": "NaN",
                                        "dtype": "<f4", "shape": [rows, TIME_AXIS_MAX_LENGTH]}
                    p = ts.open(spec, open=True, create=True).result()
                    m = ts.open(mspec, open=True, create=True, dtype=ts.float32,
                                shape=(1,)).result()
                else:
                    p = ts.open(spec, open=True).result()
                    m = ts.open(mspec, open=True).result()
            except ValueError:
                if create:
                    raise
                return None
            self._priority_stores = (p, m)
        return self._priority_stores

    def _write_priorities(self, state: Any, core: Any, t: int, w: int, n: int,
                          dest: int) -> None:
        """The leaf value of every item stored in the buffer at the vault position of its
        first step (NaN where no complete item starts), for the steps of this run."""
        period, length = core.period, core.sample_sequence_length
        if core.max_length_time_axis != t:
            raise VaultError(f"vault {self._base_path}: buffer= has time axis "
                             f"{core.max_length_time_axis}, the state {t}")
        if self._run_offset is None:
            # A new run of incremental writes: buffer time s is at vault position s + offset.
            self._run_offset, self._run_start = dest - (w - n), dest
        offset = self._run_offset
        lo = max(w - t, self._run_start - offset)
        s = np.arange(lo, w)
        slots = core.slots_per_row
        geo = core.tree_geometry  # the leaf level, sliced on the host (no compile per write)
        leaves = np.asarray(state.priority_state.sum_tree)[
            geo.offsets[-1]:geo.offsets[-1] + geo.num_leaves]
        leaf = np.arange(core.add_batch_size)[:, None] * slots + (s % t)[None, :] // period
        unknown = (s % period != 0) | (s + length > w)
        vals = np.where(unknown[None, :], np.nan, leaves[leaf]).astype(np.float32)
        pstore, mstore = self._priority_arrays(create=True)  # type: ignore[misc]
        pstore[:, offset + lo:offset + w].write(vals).result()
        mstore.write(np.asarray([state.priority_state.max_priority], np.float32)).result()

    # ------------------------------------------------------------------------------ read
    def _interval(self, timesteps: Optional[int], percentiles: Optional[Sequence[float]],
                  ) -> tuple[int, int]:
        n = self.vault_index
        if timesteps is not None:
            if not 0 <= int(timesteps) <= n:
                raise VaultError(f"vault {self._base_path}: timesteps={timesteps} must be in "
                                 f"[0, {n}] (steps in the vault)")
            return n - int(timesteps), n
        if percentiles is not None:
            lo, hi = percentiles
            if not 0 <= lo < hi <= 100:
                raise VaultError(f"vault {self._base_path}: percentiles {percentiles} must "
                                 "satisfy 0 <= lo < hi <= 100")
            return int(n * (lo / 100)), int(n * (hi / 100))
        return 0, n

    def read_interval(self, start: int, stop: int) -> PyTree:
        """Experience (NumPy leaves `[B, stop - start, *item_shape]`) of vault steps start..stop."""
        self._check_interval(start, stop)
        return self._collect([store[:, start:stop].read() for store in self._stores],
                             "(damaged?)")

    def _check_interval(self, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= self.vault_index:
            raise VaultError(f"vault {self._base_path}: interval [{start}, {stop}) is outside "
                             f"the {self.vault_index} steps written")

    def _collect(self, futures: list, where: str) -> PyTree:
        """The experience tree from one pending TensorStore read per leaf; a failed read is a
        VaultError naming the leaf."""
        out = []
        for spec, fut in zip(self._specs, futures):
            try:
                out.append(fut.result())
            except Exception as e:
                raise VaultError(f"vault {self._base_path}: leaf {spec.name!r} cannot be read "
                                 f"{where}: {e}") from None
        return jax.tree_util.tree_unflatten(self._treedef, out)

    def read(self, timesteps: Optional[int] = None,
             percentiles: Optional[tuple[int, int]] = None) -> TrajectoryBufferState:
        """All steps, the last `timesteps`, or the `percentiles` range, as a state whose
        experience leaves are `[B, n, *item_shape]` (current_index 0, is_full True as a full
        buffer of exactly n steps; False if n = 0). To load a buffer of any capacity with its
        fill state, use `into_buffer`."""
        start, stop = self._interval(timesteps, percentiles)
        exp = jax.tree.map(jnp.asarray, self.read_interval(start, stop))
        return TrajectoryBufferState(experience=exp, current_index=jnp.array(0, jnp.int32),
                                     is_full=jnp.array(stop > start))

    def iter_chunks(self, steps: int, start: int = 0,
                    stop: Optional[int] = None) -> Iterator[PyTree]:
        """Streams vault steps start..stop in chunks of `steps` per row (the last may be
        shorter): NumPy experience `[B, <= steps, *item_shape]`; one chunk in memory at a time
        (the next is read while the caller works on this one)."""
        if steps < 1:
            raise VaultError(f"vault {self._base_path}: iter_chunks needs steps >= 1, got {steps}")
        stop = self.vault_index if stop is None else stop
        self._check_interval(start, stop)
        bounds = list(range(start, stop, steps))
        pending = [s[:, bounds[0]:min(bounds[0] + steps, stop)].read()
                   for s in self._stores] if bounds else []
        for i, lo in enumerate(bounds):
            current = pending
            if i + 1 < len(bounds):
                nlo = bounds[i + 1]
                pending = [s[:, nlo:min(nlo + steps, stop)].read() for s in self._stores]
            yield self._collect(current, f"at steps {lo}..")

    def read_priorities(self, start: int, stop: int) -> Optional[np.ndarray]:
        """Saved leaf values `[B, stop - start]` (NaN: no item starts there), or None."""
        stores = self._priority_arrays(create=False)
        if stores is None:
            return None
        return np.asarray(stores[0][:, start:stop].read().result())

    def read_max_priority(self) -> Optional[float]:
        stores = self._priority_arrays(create=False)
        return None if stores is None else float(stores[1].read().result()[0])

    def into_buffer(self, buffer: Any, timesteps: Optional[int] = None,
                    percentiles: Optional[tuple[int, int]] = None,
                    interval: Optional[tuple[int, int]] = None) -> Any:
        """A ready state of `buffer` (flat, trajectory, item, n-step; uniform or prioritised)
        holding the selected vault steps (all by default, or the last `timesteps`, the
        `percentiles` range, or `interval=(start, stop)`).

        The buffer keeps the newest of them that fit (its capacity may differ from the
        writer's; only those are read from disk) and its `current_index`, `is_full` (and
        `running_index`) are those of a buffer that was given exactly these steps. A
        prioritised buffer gets the saved priorities of the items that have them and its
        new-item priority (the saved `max_priority`, at least 1) for the rest. An item buffer
        takes the rows' steps in time order (step t of every row before step t + 1); the
        other buffers need `add_batch_size` equal to the vault's rows.
        """
        core = buffer.core
        if interval is not None:
            start, stop = (int(i) for i in interval)
            if not 0 <= start <= stop <= self.vault_index:
                raise VaultError(f"vault {self._base_path}: interval {interval} is outside the "
                                 f"{self.vault_index} steps written")
        else:
            start, stop = self._interval(timesteps, percentiles)
        rows, t = self.rows, core.max_length_time_axis
        items = type(getattr(buffer, "layout", None)).__name__ == "ItemLayout"
        if items:
            if core.add_batch_size != 1:
                raise VaultError("into_buffer: an item buffer has one storage row")
            steps = min(stop - start, -(-t // rows))  # vault steps holding the newest t items
        else:
            if core.add_batch_size != rows:
                raise VaultError(
                    f"vault {self._base_path}: has {rows} rows (the writer's add_batch_size); "
                    f"the buffer's add_batch_size is {core.add_batch_size} (a row is one "
                    "stream of consecutive steps, so they must match)")
            steps = min(stop - start, t)
        lo = stop - steps
        data = self.read_interval(lo, stop)
        prios = self.read_priorities(lo, stop) if hasattr(core, "tree_geometry") else None
        if items:
            data, prios = (jax.tree.map(lambda x: _time_major(x, t), data),
                           None if prios is None else _time_major(prios, t))
        state = buffer.init(self.structure)
        m = jax.tree_util.tree_leaves(data)[0].shape[1]
        if m == 0:
            return state
        state = _add_rows(core, state, data)
        if prios is None:
            return state
        return _set_saved_priorities(state, core, np.asarray(prios)[:, :m],
                                     self.read_max_priority())

    @property
    def structure(self) -> PyTree:
        """`jax.ShapeDtypeStruct` of one step per leaf (no batch or time axes)."""
        return jax.tree_util.tree_unflatten(
            self._treedef, [jax.ShapeDtypeStruct(s.item_shape, s.dtype) for s in self._specs])

    @property
    def rows(self) -> int:
        """Rows (the buffer's add_batch_size) per time step."""
        return self._specs[0].rows

    def __repr__(self) -> str:
        return f"Vault({self._base_path!r}, steps={self.vault_index})"


def _time_major(x: np.ndarray, t: int) -> np.ndarray:
    """`[B, n, ...]` -> `[1, min(B n, t), ...]`: steps in time order, rows within a step,
    the newest t kept."""
    flat = np.swapaxes(x, 0, 1).reshape((-1, *x.shape[2:]))
    return flat[max(flat.shape[0] - t, 0):][None]


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _add_rows(core: Any, state: Any, rows: PyTree) -> Any:
    """`core.add`, compiled once per buffer and shape (the core is static and hashable)."""
    return core.add(state, rows)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _set_leaves(core: Any, state: Any, index: Any, values: Any, mask: Any,
                max_priority: Any) -> Any:
    ps = state.priority_state
    sum_t, min_t = sum_tree.update_sum_min(ps.sum_tree, ps.min_tree, core.tree_geometry,
                                           index, values, mask)
    return state.replace(priority_state=ps.replace(
        sum_tree=sum_t, min_tree=min_t, max_priority=jnp.maximum(ps.max_priority, max_priority)))


def _set_saved_priorities(state: Any, core: Any, prios: np.ndarray,
                          max_priority: Optional[float]) -> Any:
    """Leaf values of the valid items of a freshly loaded prioritised state (written per row
    = the m loaded steps, so slot k holds the item starting at time k * period) from `prios`
    `[rows, m]` where not NaN; the others keep the new-item priority."""
    m = prios.shape[1]
    period, slots, length = core.period, core.slots_per_row, core.sample_sequence_length
    starts = np.arange(slots) * period
    # Valid items of a buffer that received exactly m <= T steps: starts 0, P, ... <= m - L.
    valid = starts + length <= m
    vals = prios[:, np.minimum(starts, m - 1)]
    mask = valid[None, :] & ~np.isnan(vals)
    index = np.arange(core.add_batch_size * slots, dtype=np.int32)
    return _set_leaves(core, state, index, np.nan_to_num(vals).reshape(-1).astype(np.float32),
                       mask.reshape(-1), np.float32(1.0 if max_priority is None else max_priority))


def _host_slice(x: Any, lo: int, hi: int) -> np.ndarray:
    """`x[:, lo:hi]` on the host. A CPU array is viewed in place (an eager JAX slice would
    compile a new program for every interval); elsewhere only the slice is copied over."""
    if isinstance(x, jax.Array) and any(d.platform != "cpu" for d in x.devices()):
        return np.asarray(jax.device_get(x[:, lo:hi]))
    return np.asarray(x)[:, lo:hi]


# ----------------------------------------------------------------------------------- inspect
def inspect(path: str) -> dict:
    """What the vault at directory `path` holds: format version, rows, steps, each leaf's
    shape (`[rows, steps, *item_shape]`) and dtype, bytes on disk and uncompressed, the
    compression of each leaf, whether priorities are saved, and the user's metadata."""
    v = Vault.open(path)
    leaves, compression = {}, {}
    raw = 0
    for spec, store in zip(v._specs, v._stores):
        leaves[spec.name] = {"shape": [spec.rows, v.vault_index, *spec.item_shape],
                             "dtype": spec.dtype.name}
        compression[spec.name] = store.spec().to_json()["metadata"].get("compressor")
        raw += spec.rows * v.vault_index * int(np.prod(spec.item_shape)) * spec.dtype.itemsize
    on_disk = sum(os.path.getsize(os.path.join(d, f))
                  for d, _, files in os.walk(v.path) for f in files)
    reserved = {"version", "structure_shape", "structure_dtype"}
    kinds = {json.dumps(c, sort_keys=True) for c in compression.values()}
    return {
        "path": v.path,
        "version": v.metadata["version"],
        "rows": v.rows,
        "steps": v.vault_index,
        "leaves": leaves,
        "bytes_on_disk": on_disk,
        "bytes_uncompressed": raw,
        "compression": (next(iter(compression.values())) if len(kinds) == 1 else compression),
        "priorities": v._priority_arrays(create=False) is not None,
        "metadata": {k: x for k, x in v.metadata.items() if k not in reserved},
    }


def format_inspection(info: dict) -> str:
    """`inspect(path)` as text, one leaf a line."""
    lines = [f"vault {info['path']} (format {info['version']})",
             f"  steps: {info['steps']} per row x {info['rows']} rows",
             f"  size: {info['bytes_on_disk']:,} bytes on disk, "
             f"{info['bytes_uncompressed']:,} uncompressed",
             f"  compression: {json.dumps(info['compression'])}",
             f"  priorities saved: {'yes' if info['priorities'] else 'no'}",
             "  leaves:"]
    width = max(len(n) for n in info["leaves"])
    for name, leaf in info["leaves"].items():
        lines.append(f"    {name:<{width}}  {leaf['dtype']:<8} {tuple(leaf['shape'])}")
    if info["metadata"]:
        lines.append(f"  metadata: {json.dumps(info['metadata'])}")
    return "\n".join(lines)
