"""Saving and resuming a training run, buffer included, with `orbax.checkpoint.CheckpointManager`.

One checkpoint step is one directory with six separate Orbax items:

    <directory>/<step>/params      model parameters
                      /opt_state   optimizer state
                      /replay      the "replay" collection (experience, write position, fill)
                      /priorities  the "priorities" collection (sum tree, ...); absent if uniform
                      /rng         {"key_data": uint32[..., 2]} (typed keys saved as their data)
                      /step        {"step": int32[]} (the TrainState's / optimizer's counter)

Items are separate so that `restore_params` reads `params` only (evaluation never touches the
buffer's gigabytes). Everything else is plain Orbax: a user can open the same checkpoint with
a plain `ocp.CheckpointManager(directory)` and
`manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))`.

Speed (benchmarks/results/checkpoint_io.md): the buffer items are written without compression.
Orbax's default, zstd over each array as one chunk, runs on one core per array and gained
nothing on experience that is mostly incompressible (float observations, rewards, a sum tree):
it made saves 2-2.6x and restores 1.0-1.9x slower than without it (0.25-1 GiB buffers).
`make_manager(..., compress_buffer=True)` turns it back on (e.g. for image frames that
compress several-fold, on a slow disk). An uncompressed item is still a plain zarr array in an
OCDBT store: Orbax and TensorStore take the compressor from each array's own metadata, so
steps written compressed (by earlier versions) restore unchanged.

Restores go into abstract targets (`jax.ShapeDtypeStruct`) made from a template state, each with
the template leaf's concrete sharding, so a restored buffer lands sharded as the template is
(or is resharded to it). Before reading any array the checkpoint's metadata is compared with
the template: another buffer capacity, a missing or extra leaf, another shape or dtype is a
`ValueError` that names it. Orbax itself would refuse some of these with a less specific
message; none is ever silently reshaped.

What was read is then verified (`integrity.py`): the CRC-32 of every array, recorded in the
step's metadata at save time (Orbax does not checksum array data), and the buffer's own
invariants (tree sums and mins, positions in range). Damage is a `CheckpointError` naming the
step, item and leaf; a step saved without checksums (older flax_replay) restores with a
one-line warning.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import warnings
import weakref
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from flax_replay._src import buffer_config, integrity

PyTree = Any

ITEMS = ("params", "opt_state", "replay", "priorities", "rng", "step")
BUFFER_ITEMS = ("replay", "priorities")  # the items that hold the buffers' bytes
METADATA_KEY = "flax_replay"  # our record in the step's custom metadata
_EXPERIENCE = "experience"  # the storage field of every buffer state (see state.py)


class CheckpointError(ValueError):
    """A checkpoint step exists but cannot be read (truncated, corrupted, or written by
    something else). The message names the step and the steps that remain."""


class UnverifiedCheckpointWarning(UserWarning):
    """A step saved without checksums (before flax_replay recorded them): restored, but its
    array data could not be verified."""


# ------------------------------------------------------------------------------ manager
def default_directory(name: str) -> epath.Path:
    """`<repo>/checkpoints/<name>` when flax_replay runs from its source tree (the examples'
    default), otherwise `./checkpoints/<name>` under the working directory."""
    repo = Path(__file__).resolve().parents[2]
    root = repo / "checkpoints" if (repo / "checkpoints").is_dir() else Path.cwd() / "checkpoints"
    return epath.Path(root / name)


def _absolute(directory: epath.PathLike) -> epath.Path:
    text = os.fspath(directory)
    if "://" in text:  # gs://, s3://, ...: already absolute for Orbax
        return epath.Path(directory)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def make_manager(
    directory: epath.PathLike,
    *,
    max_to_keep: Optional[int] = 3,
    save_interval_steps: int = 1,
    enable_async: bool = True,
    compress_buffer: bool = False,
) -> ocp.CheckpointManager:
    """A `CheckpointManager` for the six items above (relative paths made absolute).

    With `enable_async`, `save` returns once the arrays are on their way to host memory and
    writes in a background thread; a step becomes visible (`latest_step`) only when completely
    written (atomic rename), so a crash mid-save leaves the previous step as the latest. Call
    `manager.wait_until_finished()` (or `manager.close()`) before the process exits.

    `compress_buffer`: zstd-compress the `replay` and `priorities` items too (off by default:
    see the module docstring; the other items keep Orbax's default, compressed). Either way
    every step restores, whatever it was written with.
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        save_interval_steps=save_interval_steps,
        enable_async_checkpointing=enable_async,
        # Half-written steps of a crashed process are temporary directories: never listed as
        # steps, and removed when the next manager opens the directory.
        cleanup_tmp_directories=True,
    )
    manager = ocp.CheckpointManager(
        _absolute(directory),
        options=options,
        item_names=ITEMS,
        # Registered up front so that metadata and single items can be read by a fresh manager.
        item_handlers={name: _item_handler(name, compress_buffer) for name in ITEMS},
    )
    _PYTREE_MANAGERS.add(manager)
    return manager


# Managers made by `make_manager`: their items take `PyTreeSave`/`PyTreeRestore` arguments.
# Any other manager (a user's own, with `StandardCheckpointHandler`s) gets the `Standard*`
# arguments, as before.
_PYTREE_MANAGERS: "weakref.WeakSet[ocp.CheckpointManager]" = weakref.WeakSet()


def _item_handler(name: str, compress_buffer: bool) -> ocp.PyTreeCheckpointHandler:
    # `StandardCheckpointHandler` is this handler with compression always on and no way to
    # turn it off; the concurrency limits are its defaults. The files are the same format.
    return ocp.PyTreeCheckpointHandler(
        save_concurrent_gb=96, restore_concurrent_gb=96,
        use_compression=compress_buffer or name not in BUFFER_ITEMS)


def _save_arg(manager: ocp.CheckpointManager, tree: PyTree) -> ocp.args.CheckpointArgs:
    if manager in _PYTREE_MANAGERS:
        return ocp.args.PyTreeSave(tree)
    return ocp.args.StandardSave(tree)


def _restore_arg(manager: ocp.CheckpointManager, target: PyTree) -> ocp.args.CheckpointArgs:
    """`target`: ShapeDtypeStructs with concrete shardings (`_abstract`)."""
    if manager in _PYTREE_MANAGERS:
        # What StandardRestore builds from such a target: strict shapes, the target's
        # shardings and dtypes.
        return ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))
    return ocp.args.StandardRestore(target)


def latest_step(manager: ocp.CheckpointManager) -> Optional[int]:
    """The newest completely written step, or None."""
    return manager.latest_step()


# ------------------------------------------------------------------------------ helpers
def _is_typed_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def _rng_item(rng: jax.Array) -> dict:
    return {"key_data": jax.random.key_data(rng) if _is_typed_key(rng) else rng}


def _rng_template(rng: Any) -> dict:
    if not _is_typed_key(rng):
        return {"key_data": rng}
    data = jax.eval_shape(jax.random.key_data, rng)
    # Key data has one trailing axis more; the key's sharding leaves it replicated.
    return {"key_data": jax.ShapeDtypeStruct(data.shape, data.dtype,
                                             sharding=getattr(rng, "sharding", None))}


def _step_item(step: Any) -> dict:
    # Flax's TrainState.create starts with a Python int 0; store an array either way.
    return {"step": step if isinstance(step, (jax.Array, jax.ShapeDtypeStruct))
            else jnp.asarray(step, jnp.int32)}


def _has_leaves(tree: PyTree) -> bool:
    return bool(jax.tree_util.tree_leaves(tree))


def _key(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _flat(tree: PyTree) -> dict[tuple[str, ...], Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(_key(k) for k in path): leaf for path, leaf in leaves}


def _show(item: str, path: tuple[str, ...]) -> str:
    return "/".join((item,) + path)


def _abstract(item: str, tree: PyTree) -> PyTree:
    """ShapeDtypeStructs with the template's concrete shardings (restore targets)."""

    def one(path, x):
        sharding = getattr(x, "sharding", None)
        if sharding is None:
            x = jnp.asarray(x)  # NumPy arrays and scalars: place on the default device
            sharding = x.sharding
        mesh = getattr(sharding, "mesh", None)
        if isinstance(mesh, jax.sharding.AbstractMesh):
            raise ValueError(
                f"restore target {_show(item, tuple(_key(k) for k in path))!r} has a sharding "
                f"over an AbstractMesh ({sharding}); Orbax needs concrete devices. Build the "
                "template with real arrays, or give it a NamedSharding over a concrete "
                "jax.sharding.Mesh."
            )
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(one, tree)


def _wrap_errors(manager: ocp.CheckpointManager, step: int, what: str, fn):
    """Runs `fn` (a read of step `step`); any error but a `CheckpointError` becomes a
    `CheckpointError` naming the step and the other steps.

    Every error is classified by where it happens, never by the text of Orbax's messages:
    reads of metadata come before any comparison, and arrays are read only after
    `check_compatible` found the template equal to the checkpoint's metadata (capacity,
    leaves, shapes, dtypes). So an error here, whatever Orbax says (tensorstore, OSError,
    JSON, or a "stored shape" that disagrees with the metadata), means that the step's
    files cannot be read as they describe themselves: damaged, or changed under us.
    """
    _mute_orbax_reads()
    try:
        return fn()
    except CheckpointError:
        raise
    except Exception as e:
        err = e
    _release_failed_reads(err)
    raise _damaged(manager, step, f"could not be read ({what}): it is truncated, corrupted or "
                   f"not a flax_replay checkpoint",
                   f"Cause: {type(err).__name__}: {str(err)[:500]}") from err


def _is_orbax_read(unraisable: Any) -> bool:
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None:
        return "orbax" in code.co_filename
    return _is_late_read_callback(unraisable)


def _is_late_read_callback(unraisable: Any) -> bool:
    """A TensorStore read that an abandoned restore left running finishes after Orbax closed
    its event loop: the read's done-callback (run on TensorStore's thread, so with no Python
    object to name) calls `loop.call_soon_threadsafe` and gets "Event loop is closed". Only
    exactly that is matched: a RuntimeError with that message raised by asyncio's
    `_check_closed` inside `call_soon_threadsafe`."""
    if unraisable.object is not None or not isinstance(unraisable.exc_value, RuntimeError):
        return False
    if str(unraisable.exc_value) != "Event loop is closed":
        return False
    frames = []
    tb = unraisable.exc_traceback
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return frames[-2:] == ["call_soon_threadsafe", "_check_closed"]


def _release_failed_reads(err: BaseException) -> None:
    """Finalises, silently, Orbax's read coroutines that a failed restore abandoned.

    When one array of a damaged step cannot be read, Orbax's other reads are left suspended,
    referenced from the traceback. Each one, when finally collected (at some later moment,
    in another test or at exit), raises from its `except` clause and Python prints ~100
    lines of "Exception ignored in <coroutine _read_array_index_and_device_put>" with
    TensorStore specs. Our `CheckpointError` says all of it in one line: the tracebacks of the
    cause chain are dropped (the exceptions and their messages are kept) and the coroutines
    are collected now. One still held by Orbax's own thread may be collected later: those are
    muted by `_mute_orbax_reads`, which `_wrap_errors` installed before the read.
    """
    seen: set[int] = set()
    e: Optional[BaseException] = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        e.__traceback__ = None
        e = e.__cause__ or e.__context__
    gc.collect()


def _mute_orbax_reads() -> None:
    """Makes `sys.unraisablehook` (once) drop exactly the reports of reads that a failed
    restore abandoned (Orbax coroutines, and the done-callbacks of reads that finish after
    Orbax closed its event loop) and pass everything else to the hook it wraps.

    Installed before a read starts, not when it has failed: such a done-callback runs on
    TensorStore's thread and can fire while the failure is still propagating through Orbax,
    before `_wrap_errors` sees it (tests/test_checkpoint_integrity.py's truncated step failed
    about one run in five while the hook was installed only after the failure).
    """
    previous = sys.unraisablehook
    if getattr(previous, "_flax_replay_mutes_orbax_reads", False):
        return

    def hook(unraisable: Any) -> None:
        if not _is_orbax_read(unraisable):
            previous(unraisable)

    hook._flax_replay_mutes_orbax_reads = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def _damaged(manager: ocp.CheckpointManager, step: int, what: str,
             detail: str = "") -> CheckpointError:
    others = [s for s in manager.all_steps() if s != step]
    return CheckpointError(
        f"checkpoint step {step} in {manager.directory} {what}. Other steps available: "
        f"{others or 'none'} (restore one with step=...).{' ' + detail if detail else ''}"
    )


def _step_directory(manager: ocp.CheckpointManager, step: int) -> epath.Path:
    """The directory of checkpoint `step` of `manager` (to read single items' metadata).

    The one use of a private Orbax API in this module: Orbax 0.12 has no public way to ask
    a `CheckpointManager` for a step's directory (its `step_name_format` is private too),
    and only `_get_read_step_directory` honours a `step_name_format` a user gave their own
    manager. Without it, the standard name format (what `make_manager` uses) is assumed.
    tests/test_checkpoint.py (`test_step_directory_*`) fails if an Orbax release changes
    either path.
    """
    read_step_directory = getattr(manager, "_get_read_step_directory", None)
    if read_step_directory is not None:
        return read_step_directory(step, manager.directory)
    return ocp.step.standard_name_format().find_step(manager.directory, step).path


def _metadata(manager: ocp.CheckpointManager, step: int, items) -> dict[str, PyTree]:
    """The tree metadata (shapes, dtypes) of `items` only: other items' files are not read
    (`manager.item_metadata` would read them all)."""

    def read():
        root = _step_directory(manager, step)
        out = {}
        for item in items:
            if (root / item).exists():
                meta = ocp.StandardCheckpointHandler().metadata(root / item)
                out[item] = getattr(meta, "tree", meta)
        return out

    return _wrap_errors(manager, step, "metadata", read)


def _buffers(flat: dict[tuple[str, ...], Any]) -> dict[tuple[str, ...], tuple[int, int]]:
    """For each buffer in a "replay" tree: its location -> (rows, time) of its storage."""
    out: dict[tuple[str, ...], tuple[int, int]] = {}
    for path, leaf in flat.items():
        if _EXPERIENCE in path and len(getattr(leaf, "shape", ())) >= 2:
            out.setdefault(path[: path.index(_EXPERIENCE)], tuple(leaf.shape[:2]))
    return out


def check_compatible(manager: ocp.CheckpointManager, step: int,
                     templates: dict[str, PyTree]) -> None:
    """Raises a ValueError naming every difference between the checkpoint's items and the
    template trees (`{item: tree}`): buffer capacity, missing/extra leaves, shapes, dtypes."""
    meta = _metadata(manager, step, tuple(templates))
    problems: list[str] = []
    for item, template in templates.items():
        want = _flat(template) if _has_leaves(template) else {}
        if item not in meta:
            if want:
                problems.append(f"item '{item}' is in the template but not in the checkpoint")
            continue
        have = _flat(meta[item])
        if not want:
            problems.append(f"item '{item}' is in the checkpoint but empty in the template")
            continue
        if item == "replay":
            b_have, b_want = _buffers(have), _buffers(want)
            for loc in sorted(set(b_have) & set(b_want)):
                (r0, t0), (r1, t1) = b_have[loc], b_want[loc]
                if (r0, t0) != (r1, t1):
                    problems.append(
                        f"buffer capacity differs at '{_show(item, loc)}': the checkpoint "
                        f"stores {r0} rows x {t0} steps = {r0 * t0}, the template {r1} rows x "
                        f"{t1} steps = {r1 * t1} (add_batch_size x max_length_time_axis)"
                    )
        for path in sorted(set(want) - set(have)):
            problems.append(f"leaf '{_show(item, path)}' is in the template but not in the "
                            "checkpoint")
        for path in sorted(set(have) - set(want)):
            problems.append(f"leaf '{_show(item, path)}' is in the checkpoint but not in the "
                            "template")
        for path in sorted(set(have) & set(want)):
            h, w = have[path], want[path]
            hs, ws = tuple(getattr(h, "shape", ())), tuple(np.shape(w))
            if hs != ws:
                problems.append(f"leaf '{_show(item, path)}': shape {hs} in the checkpoint, "
                                f"{ws} in the template")
            hd, wd = getattr(h, "dtype", None), getattr(w, "dtype", None)
            if hd is not None and wd is not None and np.dtype(hd) != np.dtype(wd):
                problems.append(f"leaf '{_show(item, path)}': dtype {np.dtype(hd)} in the "
                                f"checkpoint, {np.dtype(wd)} in the template")
    if problems:
        shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12
                                 else [])
        raise ValueError(
            f"checkpoint step {step} in {manager.directory} does not match the template "
            "(refusing to reshape):\n  " + "\n  ".join(shown)
        )


def _resolve_step(manager: ocp.CheckpointManager, step: Optional[int]) -> int:
    if step is None:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    elif step not in manager.all_steps():
        raise FileNotFoundError(f"no checkpoint step {step} in {manager.directory} "
                                f"(steps: {list(manager.all_steps())})")
    return int(step)


def _leaves(items: dict[str, PyTree]) -> integrity.Leaves:
    return {item: {"/".join(path): x for path, x in _flat(tree).items()}
            for item, tree in items.items() if _has_leaves(tree)}


def _save_items(manager, step, items: dict[str, PyTree], force: bool,
                buffers: dict[str, dict], metadata: Optional[dict]) -> bool:
    args = {k: _save_arg(manager, v) for k, v in items.items() if _has_leaves(v)}
    if not manager.should_save(int(step)) and not force:
        return False  # not on the interval: no checksum pass either
    # Checksums of what is saved, taken now: the arrays are immutable (a donated step while
    # Orbax still writes gets a copy), and on CPU this reads them in place.
    record = {"checksums": integrity.checksums(_leaves(items)), "buffers": buffers}
    if metadata is not None:
        record["metadata"] = json.loads(json.dumps(metadata))  # JSON now, not in the thread
    return manager.save(int(step), args=ocp.args.Composite(**args), force=force,
                        custom_metadata={METADATA_KEY: record})


STEP_METADATA_FILE = "_CHECKPOINT_METADATA"  # where Orbax writes a step's custom metadata


def _record(manager: ocp.CheckpointManager, step: int) -> Optional[dict]:
    """Our record in the step's metadata, or None (a step saved without it).

    Read from the step's metadata file itself: `manager.metadata(step)` would also read
    every item's metadata, and `restore_params` must not touch the buffer's files.
    """

    def read():
        path = _step_directory(manager, step) / STEP_METADATA_FILE
        if not path.exists():
            return None
        custom = json.loads(path.read_text()).get("custom_metadata") or {}
        return custom.get(METADATA_KEY)

    return _wrap_errors(manager, step, "step metadata", read)


def run_metadata(manager: ocp.CheckpointManager, step: Optional[int] = None) -> Optional[dict]:
    """The `metadata` given to `save` for checkpoint `step` (default: latest), or None (none
    given, or a step saved by an older flax_replay). Reads one small file."""
    step = _resolve_step(manager, step)
    return (_record(manager, step) or {}).get("metadata")


def _verify(manager, step: int, record: Optional[dict], restored: dict[str, PyTree],
            buffers: dict[str, dict]) -> None:
    """Raises a CheckpointError if what was read is not what was saved, or is no valid
    buffer; warns once if the step has no checksums to compare with."""
    if record is None or "checksums" not in record:
        warnings.warn(f"checkpoint step {step} in {manager.directory} has no checksums (saved "
                      "by an older flax_replay): its array data cannot be verified",
                      UnverifiedCheckpointWarning, stacklevel=4)
    else:
        bad = integrity.mismatches(record["checksums"], _leaves(restored))
        if bad:
            shown = "; ".join(f"item '{i}' leaf '{leaf}': {what}" for i, leaf, what in bad[:8])
            raise _damaged(manager, step, "is corrupted: the data read differ from the data "
                           f"saved ({shown})")
    problems = integrity.buffer_problems(restored.get("replay", {}),
                                         restored.get("priorities", {}),
                                         buffer_config.branchings(buffers))
    if problems:
        raise _damaged(manager, step, "holds an invalid buffer: " + "; ".join(problems[:8]))


def _restore_items(manager, step: Optional[int], templates: dict[str, PyTree],
                   buffers: Optional[dict[str, dict]] = None) -> tuple[dict[str, PyTree], int]:
    step = _resolve_step(manager, step)
    check_compatible(manager, step, templates)
    record = _record(manager, step)
    saved_buffers = (record or {}).get("buffers") or {}
    diff = buffer_config.differences(saved_buffers, buffers or {})
    if diff:
        raise ValueError(
            f"checkpoint step {step} in {manager.directory} was saved by a buffer configured "
            "otherwise (its stored state would be misread):\n  " + "\n  ".join(diff))
    args = {k: _restore_arg(manager, _abstract(k, v))
            for k, v in templates.items() if _has_leaves(v)}
    restored = _wrap_errors(manager, step, "arrays",
                            lambda: manager.restore(step, args=ocp.args.Composite(**args)))
    restored = {k: restored[k] for k in args}
    _verify(manager, step, record, restored, {**saved_buffers, **(buffers or {})})
    # Empty items (no priorities for a uniform buffer) come back as the template.
    return {k: restored[k] if k in args else v for k, v in templates.items()}, step


def _restored_rng(template: Any, data: jax.Array) -> jax.Array:
    if _is_typed_key(template):
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(template))
    return data


# ------------------------------------------------------------------------------ Linen
def save(manager: ocp.CheckpointManager, step: int, state: Any, rng: jax.Array, *,
         force: bool = False, metadata: Optional[dict] = None) -> bool:
    """Saves `state` (a `flax_replay.TrainState`) and `rng` as checkpoint `step`.

    Returns whether a save started (False when `step` is not on `save_interval_steps`, unless
    `force`; Orbax always saves the first step it sees). Asynchronous by default, and safe with
    donation: on GPU/TPU the arrays are copied to host before this returns; on CPU Orbax keeps
    references while it writes, and a donated step issued meanwhile makes XLA copy the buffer
    instead of updating it in place (correct, but a copy: for a large buffer, save every few
    hundred steps rather than every step).

    Also recorded in the step's metadata: a checksum of every array, the configuration of
    every buffer found in `state.apply_fn`'s module (see `buffer_config`), and `metadata`
    (any JSON-serialisable dict, e.g. a run's flags; read back with `run_metadata`).
    """
    return _save_items(manager, step, {
        "params": state.params, "opt_state": state.opt_state, "replay": state.replay,
        "priorities": state.priorities, "rng": _rng_item(rng), "step": _step_item(state.step),
    }, force, buffer_config.of_linen(state), metadata)


def restore(manager: ocp.CheckpointManager, state: Any, rng: jax.Array,
            step: Optional[int] = None) -> tuple[Any, jax.Array, int]:
    """Restores checkpoint `step` (default: latest) into the shapes, dtypes and shardings of
    the template `state` and `rng` (arrays or ShapeDtypeStructs with concrete shardings).

    Returns `(state, rng, step)`; `rng` is a typed key if the template is. Raises
    `FileNotFoundError` if there is no such step, `ValueError` naming the capacity, leaf, shape,
    dtype or buffer configuration (e.g. `priority_exponent`) that differs from the template,
    `CheckpointError` if the step is damaged (checksum or buffer invariant).
    """
    templates = {
        "params": state.params, "opt_state": state.opt_state, "replay": state.replay,
        "priorities": state.priorities, "rng": _rng_template(rng),
        "step": _step_item(state.step),
    }
    out, step = _restore_items(manager, step, templates, buffer_config.of_linen(state))
    new_state = state.replace(params=out["params"], opt_state=out["opt_state"],
                              replay=out["replay"], priorities=out["priorities"],
                              step=out["step"]["step"])
    return new_state, _restored_rng(rng, out["rng"]["key_data"]), step


def restore_params(manager: ocp.CheckpointManager, params_template: PyTree,
                   step: Optional[int] = None) -> PyTree:
    """The `params` item alone (e.g. for evaluation), into the template's shapes and shardings;
    no other item's files are opened."""
    out, _ = _restore_items(manager, step, {"params": params_template})
    return out["params"]


# ------------------------------------------------------------------------------ NNX
def _nnx_items(model: Any, optimizer: Any) -> dict[str, PyTree]:
    from flax import nnx

    from flax_replay._src.nnx import Priorities, Replay

    opt = nnx.to_pure_dict(nnx.state(optimizer, nnx.OptState))
    step = opt.pop("step", jnp.zeros((), jnp.uint32))
    return {
        "params": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
        "opt_state": opt,
        "replay": nnx.to_pure_dict(nnx.state(model, Replay)),
        "priorities": nnx.to_pure_dict(nnx.state(model, Priorities)),
        "step": _step_item(step),
    }


def _nnx_assign(obj: Any, filt: Any, pure: dict) -> None:
    """Sets every Variable of `obj` matching `filt` from `pure` (a tree like
    `nnx.to_pure_dict`'s; a Variable's value may itself be a tree, e.g. `experience`)."""
    from flax import nnx

    flat = []
    for path, var in nnx.to_flat_state(nnx.state(obj, filt)):
        node = pure
        for k in path:
            node = node[k]
        flat.append((path, var.replace(node)))
    nnx.update(obj, nnx.from_flat_state(flat))


def save_nnx(manager: ocp.CheckpointManager, step: int, model: Any, optimizer: Any,
             rng: jax.Array, *, force: bool = False, metadata: Optional[dict] = None) -> bool:
    """`save` for NNX: `nnx.Param`s of `model` -> params, the `nnx.OptState`s of `optimizer`
    -> opt_state (its `step` counter -> step), `Replay`/`Priorities` Variables -> replay and
    priorities. Same items, so `restore_params` works on either flavour's checkpoints."""
    items = _nnx_items(model, optimizer)
    items["rng"] = _rng_item(rng)
    return _save_items(manager, step, items, force, buffer_config.of_nnx(model), metadata)


def restore_nnx(manager: ocp.CheckpointManager, model: Any, optimizer: Any, rng: jax.Array,
                step: Optional[int] = None) -> tuple[jax.Array, int]:
    """Restores `model` and `optimizer` in place (their current arrays are the template:
    shapes, dtypes, shardings) and returns `(rng, step)`. Errors as `restore`."""
    from flax import nnx

    from flax_replay._src.nnx import Priorities, Replay

    templates = _nnx_items(model, optimizer)
    templates["rng"] = _rng_template(rng)
    out, step = _restore_items(manager, step, templates, buffer_config.of_nnx(model))
    _nnx_assign(model, nnx.Param, out["params"])
    _nnx_assign(model, Replay, out["replay"])
    _nnx_assign(model, Priorities, out["priorities"])
    _nnx_assign(optimizer, nnx.OptState, {**out["opt_state"], "step": out["step"]["step"]})
    return _restored_rng(rng, out["rng"]["key_data"]), step
