"""Small buffers of every kind and deterministic batches for them, shared by the transform,
view and error tests. Sizes are tiny so that each compiled function builds in milliseconds."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import flax_replay as fbx

# One time step: a float vector, a float scalar and an int scalar (so dtype errors are testable).
EXAMPLE = {
    "obs": jnp.zeros((3,), jnp.float32),
    "reward": jnp.zeros((), jnp.float32),
    "step": jnp.zeros((), jnp.int32),
}


@dataclasses.dataclass(frozen=True)
class Case:
    """A buffer kind: how to make it, and the leading axes of one `add` batch."""

    name: str
    make: Callable[[], Any]
    batch_prefix: tuple[int, ...]
    axis_names: tuple[str, ...]  # the names the error message uses for `batch_prefix`
    prioritised: bool = False
    queue: bool = False

    @functools.cached_property
    def buffer(self):
        return self.make()


CASES = {
    "flat": Case(
        "flat",
        lambda: fbx.make_flat_buffer(max_length=32, min_length=4, sample_batch_size=4,
                                     add_batch_size=2),
        (2,), ("add_batch_size",),
    ),
    "trajectory": Case(
        "trajectory",
        lambda: fbx.make_trajectory_buffer(add_batch_size=2, sample_batch_size=3,
                                           sample_sequence_length=4, period=2,
                                           min_length_time_axis=4, max_length_time_axis=16),
        (2, 5), ("add_batch_size", "sequence_length"),
    ),
    "item": Case(
        "item",
        lambda: fbx.make_item_buffer(max_length=16, min_length=2, sample_batch_size=3,
                                     add_batches=True),
        (3,), ("batch",),
    ),
    "queue": Case(
        "queue",
        lambda: fbx.make_trajectory_queue(max_length_time_axis=12, add_batch_size=2,
                                          add_sequence_length=4, sample_sequence_length=4),
        (2, 4), ("add_batch_size", "sequence_length"), queue=True,
    ),
    "prioritised_flat": Case(
        "prioritised_flat",
        lambda: fbx.make_prioritised_flat_buffer(max_length=32, min_length=4,
                                                 sample_batch_size=4, add_batch_size=2,
                                                 priority_exponent=0.6),
        (2,), ("add_batch_size",), prioritised=True,
    ),
    "prioritised_trajectory": Case(
        "prioritised_trajectory",
        lambda: fbx.make_prioritised_trajectory_buffer(
            add_batch_size=2, sample_batch_size=3, sample_sequence_length=4, period=2,
            min_length_time_axis=4, max_length_time_axis=16, priority_exponent=0.5),
        (2, 5), ("add_batch_size", "sequence_length"), prioritised=True,
    ),
    "prioritised_item": Case(
        "prioritised_item",
        lambda: fbx.make_prioritised_item_buffer(max_length=16, min_length=2,
                                                 sample_batch_size=3, add_batches=True),
        (3,), ("batch",), prioritised=True,
    ),
    "n_step": Case(
        "n_step",
        lambda: fbx.make_n_step_buffer(max_length=32, min_length=4, sample_batch_size=4,
                                       add_batch_size=2, n_step=2, done_key=None),
        (2,), ("add_batch_size",),
    ),
}

# The buffers the transform tests cover: every uniform kind and the prioritised flat buffer.
TRANSFORM_KINDS = ("flat", "trajectory", "item", "queue", "prioritised_flat")


# Test data is handled in NumPy: every eager jnp op on a new shape is a small XLA compile.
def make_batch(case: Case, i: int, lead: tuple[int, ...] = ()) -> dict:
    """Batch number `i` for `case`: distinct values per call, shape `[*lead, *prefix, *item]`."""
    rng = np.random.default_rng(1000 + i)
    shape = lead + case.batch_prefix
    return {
        "obs": rng.normal(size=shape + (3,)).astype(np.float32),
        "reward": rng.normal(size=shape).astype(np.float32),
        "step": rng.integers(0, 1000, size=shape).astype(np.int32),
    }


def keys(seed: int, n: int | None = None) -> np.ndarray:
    """Raw uint32 PRNG keys (`[2]`, or `[n, 2]` for n buffers), as NumPy arrays."""
    key = jax.random.PRNGKey(seed)
    return np.asarray(key if n is None else jax.random.split(key, n))


def stack(trees: list) -> Any:
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def unstack(tree: Any, n: int) -> list:
    return [jax.tree.map(lambda x, i=i: np.asarray(x)[i], tree) for i in range(n)]


def assert_trees_equal(a: Any, b: Any) -> None:
    """Same structure, and every leaf bit-identical (storage and samples are copies and
    gathers), except `probabilities`: a division that XLA may compile as a multiplication by
    the reciprocal in one program and not in another (1 ulp)."""
    la, ta = jax.tree_util.tree_flatten_with_path(a)
    lb, tb = jax.tree_util.tree_flatten_with_path(b)
    assert ta == tb, f"tree structures differ:\n{ta}\n{tb}"
    for (path, x), (_, y) in zip(la, lb):
        name = jax.tree_util.keystr(path)
        if name.endswith(".probabilities"):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)


def new_priorities(sample: Any) -> np.ndarray:
    """Deterministic, distinct raw priorities for a prioritised sample (any leading axes)."""
    idx = sample.indices
    return 0.5 + np.arange(idx.size, dtype=np.float32).reshape(idx.shape)


@functools.cache
def single(kind: str) -> dict:
    """Jitted functions of one buffer (the functional reference; cached across tests)."""
    buf = CASES[kind].buffer
    fns = {"init": jax.jit(buf.init), "add": jax.jit(buf.add), "sample": jax.jit(buf.sample)}
    if CASES[kind].prioritised:
        fns["set_priorities"] = jax.jit(buf.set_priorities)
    if CASES[kind].queue:
        fns["can_add"] = jax.jit(buf.can_add)
    fns["can_sample"] = jax.jit(buf.can_sample)
    return fns
