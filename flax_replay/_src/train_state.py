"""A Flax `TrainState` that carries the buffer: `params`, `opt_state`, and the "replay" and
"priorities" collections, so one jitted, donated step can act, add, sample, learn and set
priorities, and one Orbax checkpoint holds all of it.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from flax import struct
from flax.training import train_state

from flax_replay._src.state import PRIORITIES, REPLAY


class TrainState(train_state.TrainState):
    """`flax.training.train_state.TrainState` + `replay` + `priorities` (the collections of every
    buffer in the model, e.g. `{"buffer": {...}}` for a submodule named `buffer`).

    `apply_gradients` works unchanged (it touches `params`/`opt_state` only). `apply` runs the
    model with all collections and returns `(output, new_state)`, the buffer updated in place
    when the step is jitted with the state donated.
    """

    replay: Any = struct.field(default_factory=dict)
    priorities: Any = struct.field(default_factory=dict)

    @property
    def variables(self) -> dict:
        return {"params": self.params, REPLAY: self.replay, PRIORITIES: self.priorities}

    def apply(
        self,
        *args: Any,
        params: Any = None,
        method: Optional[Callable | str] = None,
        rngs: Any = None,
        mutable: Sequence[str] = (REPLAY, PRIORITIES),
        **kwargs: Any,
    ) -> tuple[Any, "TrainState"]:
        """`apply_fn` with this state's variables (or `params` instead of `self.params`, for a
        gradient), mutating the buffer collections; returns `(output, new_state)`."""
        variables = dict(self.variables)
        if params is not None:
            variables["params"] = params
        out, updates = self.apply_fn(
            variables, *args, method=method, rngs=rngs, mutable=list(mutable), **kwargs
        )
        return out, self.replace(**{k: updates[k] for k in mutable if k in updates})

    @classmethod
    def create(cls, *, apply_fn: Callable, params: Any, tx: Any, replay: Any = None,
               priorities: Any = None, **kwargs: Any) -> "TrainState":
        """Like Flax's `create`, with the buffer collections (e.g. `variables["replay"]`)."""
        return super().create(
            apply_fn=apply_fn, params=params, tx=tx, replay={} if replay is None else replay,
            priorities={} if priorities is None else priorities, **kwargs,
        )
