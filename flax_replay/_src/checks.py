"""Input checks shared by every buffer: clear errors that name the leaf, shape and dtype.

Checks on shapes, dtypes and tree structure are static, so they run at trace time and raise
`ValueError` before anything is written. Checks on *values* (can we sample, is a priority
finite) raise `ValueError` when the inputs are concrete (eager calls) and become
`checkify.debug_check`s under a transformation: free under plain `jax.jit`, and raised by
`checkify.checkify(f, errors=checkify.user_checks)`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify


def leaf_name(path: tuple) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def check_tree(
    batch: Any,
    storage: Any,
    n_storage_prefix: int,
    expected_prefix: tuple,
    what: str,
    axis_names: tuple[str, ...] = (),
) -> None:
    """Checks that `batch` has the tree structure, dtypes and shapes the buffer expects.

    A storage leaf has shape `[*storage_prefix, *item_shape]` (its first `n_storage_prefix`
    axes are the buffer's own); the matching batch leaf must be `[*expected_prefix,
    *item_shape]`, where `None` in `expected_prefix` admits any size. Only shapes and dtypes
    are read, so this runs at trace time.
    """
    store_paths, store_def = jax.tree_util.tree_flatten_with_path(storage)
    batch_paths, batch_def = jax.tree_util.tree_flatten_with_path(batch)
    if batch_def != store_def:
        raise ValueError(
            f"{what}: the tree structure does not match the buffer's.\n"
            f"  expected: {store_def}\n  received: {batch_def}"
        )
    n = len(expected_prefix)
    for (path, stored), (_, leaf) in zip(store_paths, batch_paths):
        name = leaf_name(path)
        item_shape = tuple(stored.shape[n_storage_prefix:])
        shape = tuple(np.shape(leaf))
        ok = len(shape) == n + len(item_shape) and shape[n:] == item_shape
        ok = ok and all(e is None or e == s for e, s in zip(expected_prefix, shape[:n]))
        if not ok:
            expected = tuple("?" if e is None else e for e in expected_prefix) + item_shape
            axes = f" = ({', '.join(axis_names)}, *item_shape)" if axis_names else ""
            raise ValueError(
                f"{what}: leaf {name} has shape {shape}; expected {_fmt(expected)}{axes}"
            )
        dtype = jnp.result_type(leaf)
        if dtype != stored.dtype:
            raise ValueError(
                f"{what}: leaf {name} has dtype {dtype}; the buffer stores {stored.dtype}"
            )


def check_leading_sizes(batch: Any, n_axes: int, what: str) -> tuple[int, ...]:
    """The common leading sizes of all leaves; a clear error names the leaf that disagrees."""
    paths, _ = jax.tree_util.tree_flatten_with_path(batch)
    if not paths:
        raise ValueError(f"{what}: the batch has no array leaves")
    first_path, first = paths[0]
    prefix = tuple(np.shape(first)[:n_axes])
    if len(prefix) < n_axes:
        raise ValueError(
            f"{what}: leaf {leaf_name(first_path)} has shape {np.shape(first)}; expected at "
            f"least {n_axes} leading axes"
        )
    for path, leaf in paths[1:]:
        if tuple(np.shape(leaf)[:n_axes]) != prefix:
            raise ValueError(
                f"{what}: leaf {leaf_name(path)} has leading shape {np.shape(leaf)[:n_axes]} "
                f"but leaf {leaf_name(first_path)} has {prefix}"
            )
    return prefix


def _fmt(shape: tuple) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def is_concrete(*xs: Any) -> bool:
    """True when every leaf is a concrete array (an eager call), False under a transformation."""
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(xs))


def value_check(pred: jax.Array, message: str, **fmt: Any) -> None:
    """Raises ValueError eagerly; under jit a `checkify.debug_check` (see module docstring)."""
    if is_concrete(pred, fmt):
        if not bool(np.all(np.asarray(pred))):
            raise ValueError(message.format(**{k: np.asarray(v) for k, v in fmt.items()}))
    else:
        checkify.debug_check(jnp.all(pred), message, **fmt)


def positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)
