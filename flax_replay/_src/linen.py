"""Linen view: a module whose variables are the buffer state, in "replay" and "priorities".

    buf = flax_replay.linen.ReplayBuffer(buffer=make_flat_buffer(...), experience=example_step)
    variables = buf.init(jax.random.key(0))                       # {"replay": ..., ...}
    _, variables = buf.apply(variables, batch, method="add", mutable=["replay", "priorities"])
    sample = buf.apply(variables, key, method="sample")          # no mutation needed

Every method reads the variables into the state dataclass, calls the pure function of the
buffer definition, and writes the result back (`views.ViewMethods`): no logic lives here.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
from flax.core import FrozenDict, unfreeze

from flax_replay._src.state import COLLECTIONS, from_collections, template, to_collections
from flax_replay._src.typing import Array, Axis, PyTree
from flax_replay._src.views import ViewMethods


def _example(experience: PyTree) -> PyTree:
    # Linen freezes dict attributes; the buffer must store the user's own tree type.
    return unfreeze(experience) if isinstance(experience, FrozenDict) else experience


class ReplayBuffer(ViewMethods, nn.Module):
    """A replay buffer as Linen state.

    Attributes:
      buffer: a buffer definition from a `make_*` factory (functional API).
      experience: one example step (arrays or `jax.ShapeDtypeStruct`s), no batch axes.
      partition: optional mesh axis name(s) for the buffer's row (add-batch) axis; the
        variables are then `nn.Partitioned` so that `nn.get_sharding` and `jax.jit` see it.
    """

    buffer: Any
    experience: Any
    partition: Optional[Axis] = None

    def setup(self) -> None:
        example = _example(self.experience)
        cache: dict = {}

        def initial(col: str, name: str):
            if "cols" not in cache:  # allocate the state once, not once per variable
                cache["cols"] = to_collections(self.buffer.init(example))
            value = cache["cols"][col][name]
            if self.partition is not None:
                from flax_replay._src.layout import box_linen

                value = box_linen(col, name, value, self.partition)
            return value

        abstract = jax.eval_shape(lambda: to_collections(self.buffer.init(example)))
        self._state_type = template(jax.eval_shape(self.buffer.init, example))
        self._vars = {
            col: {name: self.variable(col, name, initial, col, name) for name in abstract[col]}
            for col in COLLECTIONS
            if col in abstract
        }

    def state(self) -> Any:
        """The buffer state dataclass (what the functional API works on)."""
        return from_collections(
            self._state_type,
            {col: {n: v.value for n, v in vs.items()} for col, vs in self._vars.items()},
        )

    def _write(self, state: Any, collections: tuple[str, ...] = COLLECTIONS) -> None:
        cols = to_collections(state)
        for col, vs in self._vars.items():
            if col not in collections:
                continue  # untouched collections may be immutable in this apply
            for name, var in vs.items():
                var.value = cols[col][name]

    def _default_key(self) -> Array:
        return self.make_rng("replay")

    def __call__(self, batch: Optional[PyTree] = None) -> None:
        """`init(key)` creates the empty buffer; `apply(v, batch, mutable=...)` adds."""
        if batch is None:
            self.state()  # touching the variables creates them during init
        else:
            self.add(batch)

    def add(self, batch: PyTree) -> None:
        """Writes `batch` (needs `mutable=["replay", "priorities"]`, or `["replay"]`)."""
        if self.is_initializing():
            return  # `init(key, batch)` only creates the empty buffer
        ViewMethods.add(self, batch)

    # Linen gives scopes (and runs `setup`) only to methods a module class defines itself:
    # the shared methods are bound here by name.
    sample = ViewMethods.sample
    can_sample = ViewMethods.can_sample
    can_add = ViewMethods.can_add
    set_priorities = ViewMethods.set_priorities
    importance_weights = ViewMethods.importance_weights
    set_state = ViewMethods.set_state
