"""Input checks shared by every buffer: clear errors that name the leaf, shape and dtype.

Checks on shapes, dtypes and tree structure are static, so they run at trace time and raise
`ValueError` before anything is written. Checks on *values* (can we sample, is a priority
finite) raise `ValueError` when the inputs are concrete (eager calls); under a
transformation they are checks that `checkify.checkify(f, errors=checkify.user_checks)`
raises and that plain `jax.jit` drops (see `_make_silent_check`).
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
    if batch_def != store_def:  # type: ignore[operator]  # PyTreeDef has !=
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


def scalars_as_arrays(tree: Any) -> Any:
    """Python scalar leaves (which `init` accepts as an example step) as arrays of JAX's default
    dtype, as `init` stores them; other leaves unchanged."""
    def one(x):
        return jnp.asarray(x) if isinstance(x, (bool, int, float, complex)) else x

    return jax.tree.map(one, tree)


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
    elif _silent_check_p is not None:
        _silent_debug_check(jnp.all(pred), message, **fmt)
    else:
        checkify.debug_check(jnp.all(pred), message, **fmt)


# `checkify.debug_check` gives the jaxpr an error *effect* even when no checkify transform is
# applied, and JAX dispatches a jitted function with effects through its slower Python path
# (tens to hundreds of microseconds a call; the sample itself costs a few). This primitive is
# the same check without the effect: plain jit drops it, and `checkify` discharges it exactly
# like `debug_check` (same error type, message and payload). It is built on JAX internals
# (jax._src.checkify); if they move, `value_check` falls back to `debug_check`, and
# tests/test_checks.py fails so that the loss of the fast path is noticed.
def _make_silent_check():
    try:
        from jax._src import checkify as ck
        from jax._src import core
        from jax._src.interpreters import ad, batching, mlir

        reduce_any = ck._reduce_any_error  # looked up now: a missing name fails here
        prim = core.Primitive("flax_replay_debug_check")
        prim.multiple_results = True  # zero results
        prim.def_impl(lambda *args, err_tree, debug: [])
        prim.def_abstract_eval(lambda *args, err_tree, debug: [])
        mlir.register_lowering(prim, lambda ctx, *args, err_tree, debug: [])

        def batch(args, dims, *, err_tree, debug):
            size = next(x.shape[d] for x, d in zip(args, dims) if d is not None)
            args = [batching.bdim_at_front(x, d, size) for x, d in zip(args, dims)]
            error = reduce_any(jax.tree_util.tree_unflatten(err_tree, args))
            flat, tree = jax.tree_util.tree_flatten(error)
            prim.bind(*flat, err_tree=tree, debug=debug)
            return [], []

        def jvp(primals, tangents, *, err_tree, debug):
            prim.bind(*primals, err_tree=err_tree, debug=debug)
            return [], []

        batching.primitive_batchers[prim] = batch
        ad.primitive_jvps[prim] = jvp
        ck.error_checks[prim] = ck.check_discharge_rule
        # Everything `check` needs, looked up now, so that a missing name fails here.
        failed, traceback, assert_func, init_error = (
            ck.FailedCheckError, ck.get_traceback, ck.assert_func, ck.init_error)

        def check(pred, message, **fmt):
            failure = failed(traceback(), message, **fmt)
            error = assert_func(init_error, jnp.logical_not(pred), failure)
            flat, tree = jax.tree_util.tree_flatten(error)
            prim.bind(*flat, err_tree=tree, debug=True)

        return prim, check
    except (ImportError, AttributeError, TypeError):  # the internals moved: public API
        return None, None


_silent_check_p, _silent_debug_check = _make_silent_check()


def positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """`value` as an int, or a ValueError naming `name` unless it is an int >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def non_negative_int(name: str, value: Any) -> int:
    return positive_int(name, value, 0)
