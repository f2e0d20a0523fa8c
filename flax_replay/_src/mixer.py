"""Sampling several buffers in fixed proportions.

Each buffer draws exactly its share of the batch with its own `sample(..., batch_size=n_i)`,
so every part has that buffer's own distribution. (Flashbax's mixer draws a full batch from
each buffer and keeps the first rows; a stratified prioritised sample is sorted by tree
position, so it only ever saw the low part of each tree.)

Episode-aware buffers in `"padded"` mode return a `mask` `[n_i, L]` beside the experience;
the masks are concatenated like the experience, and the part of a buffer whose samples carry
no mask (no episodes, or `"within_episode"`: every step is real) gets an all-True one.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp

from flax_replay._src import checks
from flax_replay._src.episodes import with_full_mask
from flax_replay._src.functions import FunctionFields


def _shares(batch: int, proportions: Sequence[float]) -> tuple[int, ...]:
    """Largest-remainder rounding of `batch * p / sum(p)`: integers that sum to `batch`."""
    total = float(sum(proportions))
    exact = [batch * p / total for p in proportions]
    sizes = [math.floor(x) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: sizes[i] - exact[i])
    for i in order[: batch - sum(sizes)]:
        sizes[i] += 1
    return tuple(sizes)


def _masked(parts: list) -> list:
    """`parts`, each with a `mask` `[n, L]` if any has one (all True where none was)."""
    if all(hasattr(p, "mask") for p in parts) or not any(hasattr(p, "mask") for p in parts):
        return parts
    length = next(p.mask.shape[1] for p in parts if hasattr(p, "mask"))
    return [p if hasattr(p, "mask") else with_full_mask(p, length) for p in parts]


@dataclasses.dataclass(frozen=True)
class Mixer(FunctionFields):
    """`sample(states, key)` concatenates each buffer's share along the batch axis;
    `split(sample)` gives the parts back (e.g. to set each buffer's priorities)."""

    buffers: tuple
    sample_batch_size: int
    proportions: tuple
    function_fields: ClassVar[tuple[str, ...]] = ("sample", "can_sample", "split")

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return _shares(self.sample_batch_size, self.proportions)

    def sample(self, states: Sequence[Any], rng_key: jax.Array) -> Any:
        if len(states) != len(self.buffers):
            raise ValueError(f"sample: got {len(states)} states for {len(self.buffers)} buffers")
        keys = jax.random.split(rng_key, len(self.buffers))
        parts = [
            buf.sample(state, key, batch_size=n)
            for buf, state, key, n in zip(self.buffers, states, keys, self.batch_sizes)
            if n > 0
        ]
        return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *_masked(parts))

    def split(self, sample: Any) -> list:
        """The per-buffer parts of a mixed sample (an empty part for a zero share)."""
        bounds = [0, *itertools.accumulate(self.batch_sizes)]
        return [jax.tree.map(lambda x, lo=lo, hi=hi: x[lo:hi], sample)
                for lo, hi in zip(bounds[:-1], bounds[1:])]

    def can_sample(self, states: Sequence[Any]) -> jax.Array:
        return jnp.all(jnp.stack([b.can_sample(s) for b, s in zip(self.buffers, states)]))


def make_mixer(buffers: Sequence[Any], sample_batch_size: int,
               proportions: Sequence[float]) -> Mixer:
    """Flashbax's `make_mixer(buffers, sample_batch_size, proportions)`."""
    checks.positive_int("sample_batch_size", sample_batch_size)
    if len(buffers) != len(proportions) or not buffers:
        raise ValueError(
            f"need one proportion per buffer, got {len(proportions)} for {len(buffers)} buffers"
        )
    if any(not (p >= 0) for p in proportions) or sum(proportions) <= 0:
        raise ValueError(f"proportions must be >= 0 with a positive sum, got {proportions}")
    prioritised = [hasattr(b, "set_priorities") for b in buffers]
    if any(prioritised) and not all(prioritised):
        # Their samples are different types (a prioritised one carries indices, priorities,
        # probabilities and versions): no batch can hold both.
        raise ValueError(
            "make_mixer: buffers " + str([i for i, p in enumerate(prioritised) if p])
            + " are prioritised and " + str([i for i, p in enumerate(prioritised) if not p])
            + " are not; a mixed batch needs one sample type. Sample the two kinds apart "
            "(`buffer.sample(state, key, batch_size=n)`) and concatenate their experience")
    return Mixer(tuple(buffers), sample_batch_size, tuple(float(p) for p in proportions))
