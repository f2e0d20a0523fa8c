"""NNX view: a module whose state lives in `Replay` and `Priorities` Variables.

    buf = flax_replay.nnx.ReplayBuffer(make_flat_buffer(...), example_step)
    @nnx.jit(donate_argnums=0)
    def step(buf, batch): buf.add(batch)          # in place
    nnx.state(buf, Replay)                        # exactly the stored experience and indices

Methods read the Variables into the state dataclass, call the buffer definition's pure
function and write the result back: no logic lives here.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
from flax import nnx

from flax_replay._src.queue import TrajectoryQueue
from flax_replay._src.state import PRIORITIES, REPLAY, from_collections, to_collections

PyTree = Any


class Replay(nnx.Variable):
    """Stored experience, write position and fill state (the Linen collection "replay")."""


class Priorities(nnx.Variable):
    """Sum tree, min tree and max priority (the Linen collection "priorities")."""


_TYPES = {REPLAY: Replay, PRIORITIES: Priorities}


class ReplayBuffer(nnx.Module):
    """A replay buffer as NNX state.

    Args:
      buffer: a buffer definition from a `make_*` factory (functional API).
      experience: one example step (arrays or `jax.ShapeDtypeStruct`s), no batch axes.
      sharding: optional mesh axis name(s) for the row (add-batch) axis, recorded as the
        Variables' `sharding_names` metadata (see `flax_replay.sharding`).
    """

    def __init__(self, buffer: Any, experience: PyTree, *, sharding: Optional[Any] = None):
        self.buffer = buffer
        state = buffer.init(experience)
        self._state_type = type(state)
        self._names = {}
        for col, values in to_collections(state).items():
            self._names[col] = tuple(values)
            for name, value in values.items():
                metadata = {}
                if sharding is not None:
                    from flax_replay._src.sharding import nnx_metadata

                    metadata = nnx_metadata(col, name, value, sharding)
                setattr(self, name, _TYPES[col](value, **metadata))

    def state(self):
        """The buffer state dataclass (what the functional API works on)."""
        cols = {
            col: {n: getattr(self, n).get_value() for n in names}
            for col, names in self._names.items()
        }
        return from_collections(self._state_type, cols)

    def _write(self, state, collections=(REPLAY, PRIORITIES)) -> None:
        for col, values in to_collections(state).items():
            if col in collections:
                for name, value in values.items():
                    getattr(self, name).set_value(value)

    def add(self, batch: PyTree) -> None:
        self._write(self.buffer.add(self.state(), batch))

    def sample(self, rng: jax.Array | nnx.Rngs | None = None, batch_size: Optional[int] = None):
        """A sample; `rng` is a key or an `nnx.Rngs` (its default stream is used). The queue
        takes no key and consumes what it returns."""
        if isinstance(self.buffer, TrajectoryQueue):
            state, out = self.buffer.sample(self.state())
            self._write(state, (REPLAY,))
            return out
        if rng is None:
            raise ValueError("sample: pass rng, a PRNG key or an nnx.Rngs (only the queue "
                             "samples without one)")
        key = rng() if isinstance(rng, nnx.Rngs) else rng
        return self.buffer.sample(self.state(), key, batch_size)

    def can_sample(self) -> jax.Array:
        return self.buffer.can_sample(self.state())

    def can_add(self) -> jax.Array:
        return self.buffer.can_add(self.state())

    def set_priorities(self, indices, priorities, versions=None) -> None:
        state = self.buffer.set_priorities(self.state(), indices, priorities, versions)
        self._write(state, (PRIORITIES,))

    def importance_weights(self, sample, beta=0.4, normalise: str = "buffer") -> jax.Array:
        return self.buffer.importance_weights(self.state(), sample, beta, normalise)
