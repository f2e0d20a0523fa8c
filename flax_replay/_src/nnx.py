"""NNX view: a module whose state lives in `Replay` and `Priorities` Variables.

    buf = flax_replay.nnx.ReplayBuffer(make_flat_buffer(...), example_step)
    @nnx.jit(donate_argnums=0)
    def step(buf, batch): buf.add(batch)          # in place
    nnx.state(buf, Replay)                        # exactly the stored experience and indices

Methods read the Variables into the state dataclass, call the buffer definition's pure
function and write the result back (`views.ViewMethods`): no logic lives here. Under
`nnx.jit`, donate the module even to sample (`nnx.jit(f, donate_argnums=0)`): `nnx.jit`
returns the module's state, so without donation each call copies the whole buffer.
"""

from __future__ import annotations

from typing import Any, Optional

from flax import nnx

from flax_replay._src.state import (
    COLLECTIONS,
    PRIORITIES,
    REPLAY,
    from_collections,
    template,
    to_collections,
)
from flax_replay._src.typing import Array, Axis, PyTree
from flax_replay._src.views import ViewMethods


class Replay(nnx.Variable):
    """Stored experience, write position and fill state (the Linen collection "replay")."""


class Priorities(nnx.Variable):
    """Sum tree, min tree and max priority (the Linen collection "priorities")."""


_TYPES = {REPLAY: Replay, PRIORITIES: Priorities}


class ReplayBuffer(ViewMethods, nnx.Module):
    """A replay buffer as NNX state.

    Args:
      buffer: a buffer definition from a `make_*` factory (functional API).
      experience: one example step (arrays or `jax.ShapeDtypeStruct`s), no batch axes.
      partition: optional mesh axis name(s) for the row (add-batch) axis, recorded as the
        Variables' `out_sharding` metadata (see `flax_replay.sharding`); `sharding` is an
        accepted alias.
    """

    def __init__(self, buffer: Any, experience: PyTree, *, partition: Optional[Axis] = None,
                 sharding: Optional[Axis] = None):
        if partition is not None and sharding is not None:
            raise ValueError("pass partition or its alias sharding, not both")
        partition = partition if partition is not None else sharding
        self.buffer = buffer
        state = buffer.init(experience)
        self._state_type = template(state)  # type and static fields
        self._names = {}
        for col, values in to_collections(state).items():
            self._names[col] = tuple(values)
            for name, value in values.items():
                metadata = {}
                if partition is not None:
                    from flax_replay._src.layout import nnx_metadata

                    metadata = nnx_metadata(col, name, value, partition)
                setattr(self, name, _TYPES[col](value, **metadata))

    def state(self) -> Any:
        """The buffer state dataclass (what the functional API works on)."""
        cols = {
            col: {n: getattr(self, n).get_value() for n in names}
            for col, names in self._names.items()
        }
        return from_collections(self._state_type, cols)

    def _write(self, state: Any, collections: tuple[str, ...] = COLLECTIONS) -> None:
        for col, values in to_collections(state).items():
            if col in collections:
                for name, value in values.items():
                    getattr(self, name).set_value(value)

    def _as_key(self, key: Any) -> Array:
        return key() if isinstance(key, nnx.Rngs) else key
