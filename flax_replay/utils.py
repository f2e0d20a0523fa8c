"""Flashbax's public utilities (`flashbax.utils`), written for flax_replay states."""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from flax_replay._src.typing import Array, PyTree


def get_tree_shape_prefix(tree: PyTree, n_axes: int = 1) -> tuple[int, ...]:
    """The first `n_axes` dimensions shared by every leaf of `tree`; ValueError naming the
    leaf whose leading dimensions differ."""
    paths = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not paths:
        raise ValueError("get_tree_shape_prefix: the tree has no leaves")
    prefix = tuple(paths[0][1].shape[:n_axes])
    for path, leaf in paths:
        if tuple(leaf.shape[:n_axes]) != prefix:
            raise ValueError(
                f"get_tree_shape_prefix: leaf {jax.tree_util.keystr(path)} has leading shape "
                f"{tuple(leaf.shape[:n_axes])}, expected {prefix}")
    return prefix


def add_dim_to_args(func: Callable, axis: int = 1, starting_arg_index: Optional[int] = 1,
                    ending_arg_index: Optional[int] = None,
                    kwargs_on_device_keys: Optional[list] = None) -> Callable:
    """`func` with a new axis `axis` inserted into every leaf of positional arguments
    `starting_arg_index:ending_arg_index` and of the keyword arguments named in
    `kwargs_on_device_keys` (all of them when None); e.g. a flat buffer's `add` of single
    transitions onto a trajectory buffer's `[batch, time]` layout."""

    def expand(tree: PyTree, ax: int) -> PyTree:
        return jax.tree.map(lambda x: jnp.expand_dims(x, ax), tree)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        lo = starting_arg_index or 0
        hi = len(args) if ending_arg_index is None else ending_arg_index
        new_args = [expand(a, axis) if lo <= i < hi else a for i, a in enumerate(args)]
        new_kwargs = {k: expand(v, 1) if kwargs_on_device_keys is None
                      or k in kwargs_on_device_keys else v for k, v in kwargs.items()}
        return func(*new_args, **new_kwargs)

    return wrapper


def get_timestep_count(buffer_state: Any) -> Array:
    """Time steps stored in a buffer state: rows x (T when full, else the write index)."""
    for name in ("experience", "current_index", "is_full"):
        if not hasattr(buffer_state, name):
            raise ValueError(f"get_timestep_count: the state has no field {name!r}")
    rows, t = get_tree_shape_prefix(buffer_state.experience, 2)
    return rows * jnp.where(buffer_state.is_full, t, buffer_state.current_index)


__all__ = ["get_tree_shape_prefix", "add_dim_to_args", "get_timestep_count"]
