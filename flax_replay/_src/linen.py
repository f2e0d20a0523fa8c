"""Linen view: a module whose variables are the buffer state, in "replay" and "priorities".

    buf = flax_replay.linen.ReplayBuffer(buffer=make_flat_buffer(...), experience=example_step)
    variables = buf.init(jax.random.key(0))                       # {"replay": ..., ...}
    _, variables = buf.apply(variables, batch, method="add", mutable=["replay", "priorities"])
    sample = buf.apply(variables, key, method="sample")          # no mutation needed

Every method reads the variables into the state dataclass, calls the pure function of the
buffer definition, and writes the result back: no logic lives here.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
from flax.core import FrozenDict, unfreeze

from flax_replay._src.queue import TrajectoryQueue
from flax_replay._src.state import COLLECTIONS, from_collections, to_collections

PyTree = Any


def _example(experience: PyTree) -> PyTree:
    # Linen freezes dict attributes; the buffer must store the user's own tree type.
    return unfreeze(experience) if isinstance(experience, FrozenDict) else experience


class ReplayBuffer(nn.Module):
    """A replay buffer as Linen state.

    Attributes:
      buffer: a buffer definition from a `make_*` factory (functional API).
      experience: one example step (arrays or `jax.ShapeDtypeStruct`s), no batch axes.
      partition: optional mesh axis name(s) for the buffer's row (add-batch) axis; the
        variables are then `nn.Partitioned` so that `nn.get_sharding` and `jax.jit` see it.
    """

    buffer: Any
    experience: Any
    partition: Optional[Any] = None

    def setup(self) -> None:
        example = _example(self.experience)
        cache: dict = {}

        def initial(col: str, name: str):
            if "cols" not in cache:  # allocate the state once, not once per variable
                cache["cols"] = to_collections(self.buffer.init(example))
            value = cache["cols"][col][name]
            if self.partition is not None:
                from flax_replay._src.sharding import box_linen

                value = box_linen(col, name, value, self.partition)
            return value

        abstract = jax.eval_shape(lambda: to_collections(self.buffer.init(example)))
        self._state_type = type(jax.eval_shape(self.buffer.init, example))
        self._vars = {
            col: {name: self.variable(col, name, initial, col, name) for name in abstract[col]}
            for col in COLLECTIONS
            if col in abstract
        }

    # ------------------------------------------------------------------------------ state
    def state(self):
        """The buffer state dataclass (what the functional API works on)."""
        return from_collections(
            self._state_type,
            {col: {n: v.value for n, v in vs.items()} for col, vs in self._vars.items()},
        )

    def _write(self, state, collections: tuple[str, ...] = COLLECTIONS) -> None:
        cols = to_collections(state)
        for col, vs in self._vars.items():
            if col not in collections:
                continue  # untouched collections may be immutable in this apply
            for name, var in vs.items():
                var.value = cols[col][name]

    def __call__(self, batch: Optional[PyTree] = None) -> None:
        """`init(key)` creates the empty buffer; `apply(v, batch, mutable=...)` adds."""
        if batch is None:
            self.state()  # touching the variables creates them during init
        else:
            self.add(batch)

    # ---------------------------------------------------------------------------- methods
    def add(self, batch: PyTree) -> None:
        """Writes `batch` (needs `mutable=["replay", "priorities"]`, or `["replay"]`)."""
        if self.is_initializing():
            return  # `init(key, batch)` only creates the empty buffer
        self._write(self.buffer.add(self.state(), batch))

    def sample(self, rng_key: Optional[jax.Array] = None, batch_size: Optional[int] = None):
        """A sample; `rng_key` defaults to `self.make_rng("replay")`. The queue consumes what it
        returns, so its `sample` needs `mutable=["replay"]`."""
        if isinstance(self.buffer, TrajectoryQueue):
            state, out = self.buffer.sample(self.state())
            self._write(state, ("replay",))
            return out
        key = self.make_rng("replay") if rng_key is None else rng_key
        return self.buffer.sample(self.state(), key, batch_size)

    def can_sample(self) -> jax.Array:
        return self.buffer.can_sample(self.state())

    def can_add(self) -> jax.Array:
        return self.buffer.can_add(self.state())

    def set_priorities(self, indices, priorities, versions=None) -> None:
        """Needs `mutable=["priorities"]`; pass the sample as `indices` to drop stale updates."""
        state = self.buffer.set_priorities(self.state(), indices, priorities, versions)
        self._write(state, ("priorities",))

    def importance_weights(self, sample, beta=0.4, normalise: str = "buffer") -> jax.Array:
        return self.buffer.importance_weights(self.state(), sample, beta, normalise)
