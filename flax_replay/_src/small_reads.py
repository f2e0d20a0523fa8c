"""Small reads of large arrays, kept on one thread by XLA:CPU.

A sample reads a few kilobytes (256 tree rows, 256 sequences of small items) out of arrays of
megabytes. XLA:CPU's cost model charges such a read by the array it reads, so it splits the
read across its thread pool; in a jitted scan the pool's workers are awake and the split is
cheap, but in a single call each split read waits for a sleeping worker. `unsplit` keeps
these reads on the calling thread (CPU only); the reads that move more than SPLIT_BYTES are
left to XLA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# XLA:CPU charges an operation by the bytes of the arrays it reads (a gather by its whole
# operand) and splits any charged over twice this across its thread pool, however little it
# moves. In a single call the split's hand-off waits for a sleeping worker: tens of us per
# split read at 1e6 leaves (a profile of one `set_priorities` call: 93 of 180 us in its three
# split gathers of 256 rows), against ~1 us of work.
SPLIT_BYTES = 256 << 10


def unsplit(out: jax.Array, operand_bytes: int) -> jax.Array:
    """`out`, a small read (under SPLIT_BYTES) of an array of `operand_bytes`, arranged so
    that XLA:CPU runs it on one thread: the read becomes the update of an in-place
    dynamic-update-slice into a scratch row block, which XLA never splits. The same values
    (a copy); other backends get `out` as it is (`tests/test_sum_tree.py` compares both)."""
    if out.ndim == 0 or operand_bytes < 2 * SPLIT_BYTES or out.nbytes >= SPLIT_BYTES:
        return out
    return jax.lax.platform_dependent(out, cpu=_through_update, default=lambda x: x)


def _through_update(x: jax.Array) -> jax.Array:
    # The offset is hidden behind a barrier so that XLA cannot fold the write and the read
    # back into the plain value.
    at = (jax.lax.optimization_barrier(jnp.int32(0)),) + (0,) * (x.ndim - 1)
    scratch = jnp.zeros((x.shape[0] + 1, *x.shape[1:]), x.dtype)
    return jax.lax.dynamic_slice(jax.lax.dynamic_update_slice(scratch, x, at), at, x.shape)
