"""What the Linen and NNX modules share: every buffer method reads the state out of the
module's variables, calls the buffer definition's pure function, and writes the result back.

A view provides `state()` (the state dataclass) and `_write(state, collections)`; the methods
below are the whole of what it does with them.
"""

from __future__ import annotations

from typing import Any, Optional

import jax

from flax_replay._src.state import COLLECTIONS, PRIORITIES, REPLAY
from flax_replay._src.typing import Array, PyTree


class ViewMethods:
    """The buffer methods of `flax_replay.linen.ReplayBuffer` and `flax_replay.nnx.ReplayBuffer`."""

    buffer: Any

    # Provided by each view.
    def state(self) -> Any:
        """The buffer state dataclass (what the functional API works on)."""
        raise NotImplementedError

    def _write(self, state: Any, collections: tuple[str, ...] = COLLECTIONS) -> None:
        raise NotImplementedError

    def _default_key(self) -> Array:
        raise ValueError("sample: pass rng_key, a PRNG key or an nnx.Rngs (only the queue "
                         "samples without one)")

    # Shared.
    def set_state(self, state: Any) -> None:
        """Replaces the whole buffer state with `state` (a state of this buffer, e.g. from
        `buffer.init`, a restore, or a functional step)."""
        self._write(state)

    def add(self, batch: PyTree) -> None:
        """Writes `batch` (Linen: needs `mutable=["replay", "priorities"]`, or `["replay"]`)."""
        self._write(self.buffer.add(self.state(), batch))

    def sample(self, rng_key: Optional[Array] = None, batch_size: Optional[int] = None, *,
               rng: Optional[Array] = None) -> Any:
        """A sample of `batch_size` (default `sample_batch_size`) items. `rng` is an accepted
        alias of `rng_key`. The queue takes no key and consumes what it returns (Linen: its
        `sample` needs `mutable=["replay"]`)."""
        if self.buffer.consumes_samples:
            state, out = self.buffer.sample(self.state())
            self._write(state, (REPLAY,))
            return out
        key = rng_key if rng_key is not None else rng
        key = self._default_key() if key is None else self._as_key(key)
        return self.buffer.sample(self.state(), key, batch_size)

    def _as_key(self, key: Any) -> Array:
        return key

    def can_sample(self) -> Array:
        return self.buffer.can_sample(self.state())

    def can_add(self) -> Array:
        """The queue only: whether an add of `add_sequence_length` steps fits."""
        return self.buffer.can_add(self.state())

    def set_priorities(self, indices: Any, priorities: Array,
                       versions: Optional[Array] = None) -> None:
        """Sets raw priorities (Linen: needs `mutable=["priorities"]`); pass the sample as
        `indices` to drop stale updates."""
        state = self.buffer.set_priorities(self.state(), indices, priorities, versions)
        self._write(state, (PRIORITIES,))

    def importance_weights(self, sample: Any, beta: float | Array = 0.4,
                           normalise: str = "buffer") -> jax.Array:
        return self.buffer.importance_weights(self.state(), sample, beta, normalise)
