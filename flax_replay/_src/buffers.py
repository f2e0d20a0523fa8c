"""Buffers = the storage core + a layout that says how user batches and samples look.

| layout      | a user's `add` batch                      | a sample's `experience`            |
|-------------|-------------------------------------------|------------------------------------|
| trajectory  | `[add_batch_size, A, ...]`                | `[B, sample_sequence_length, ...]` |
| transitions | `[add_batch_size?, A?, ...]` (flags)       | `ExperiencePair(first, second)` or |
|             |                                           | `NStepTransition` (n-step)         |
| items       | `[batch?, A?, ...]`, flattened into 1 row  | `[B, ...]`                         |

A `Buffer` is a frozen (hashable) dataclass whose methods are pure functions of the state, so
`buffer.add` can be passed to `jax.jit(..., donate_argnums=0)`, `vmap`, `pmap` or `scan` as is,
and the Linen and NNX modules call exactly these methods.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, ClassVar, NamedTuple, Optional

import jax
import jax.numpy as jnp

from flax_replay._src import checks
from flax_replay._src.core import Sample, TrajectoryBufferState, TrajectoryCore
from flax_replay._src.episodes import EpisodeOptions
from flax_replay._src.frames import FrameStack
from flax_replay._src.functions import FunctionFields
from flax_replay._src.priorities import (
    PrioritisedCore,
    PrioritisedSample,
    PrioritisedTrajectoryBufferState,
)
from flax_replay._src.typing import Array, Layout, PyTree


class ExperiencePair(NamedTuple):
    """`first`: the step at t; `second`: the step at t + 1 (t + n for n-step buffers)."""

    first: PyTree
    second: PyTree


class NStepTransition(NamedTuple):
    """An n-step transition: `first` at t, `second` at t + n, `reward` the discounted n-step
    return `sum_k gamma^k r_{t+k}` truncated at the first episode end, `discount` the bootstrap
    factor `gamma^n` (0 if the episode ended within the n steps). Both `[B]`."""

    first: PyTree
    second: PyTree
    reward: Array
    discount: Array


# ------------------------------------------------------------------------------------ layouts
@dataclasses.dataclass(frozen=True)
class TrajectoryLayout:
    def to_rows(self, batch: PyTree, storage: PyTree, core: TrajectoryCore) -> PyTree:
        checks.check_tree(batch, storage, 2, (core.add_batch_size, None), "add",
                          ("add_batch_size", "sequence_length"))
        return batch

    def from_sequences(self, seq: PyTree) -> PyTree:
        return seq


@dataclasses.dataclass(frozen=True)
class TransitionLayout:
    """Flat and n-step buffers: a sequence of `n_step + 1` steps becomes a transition (with
    `frames`, `n_step + K` steps whose last `n_step + 1` are the transition; see `frames.py`)."""

    add_batches: bool
    add_sequences: bool
    n_step: int = 1
    returns: Optional["NStepReturns"] = None
    frames: Optional[FrameStack] = None

    def check_example(self, experience: PyTree) -> None:
        if self.frames is not None:
            self.frames.check_example(experience)

    def to_rows(self, batch: PyTree, storage: PyTree, core: TrajectoryCore) -> PyTree:
        prefix = ((core.add_batch_size,) if self.add_batches else ()) + (
            (None,) if self.add_sequences else ()
        )
        names = (("add_batch_size",) if self.add_batches else ()) + (
            ("sequence_length",) if self.add_sequences else ()
        )
        if self.frames is not None:
            self.frames.check_add(batch, storage, len(prefix), "add")
        checks.check_tree(batch, storage, 2, prefix, "add", names)
        batch = checks.scalars_as_arrays(batch)  # one step of Python scalars, as init takes
        if not self.add_batches:
            batch = jax.tree.map(lambda x: x[None], batch)
        if not self.add_sequences:
            batch = jax.tree.map(lambda x: x[:, None], batch)
        return batch

    def from_sequences(self, seq: PyTree) -> PyTree:
        if self.frames is not None:
            first, second, seq = self.frames.transition(seq, self.n_step)
        else:
            first = jax.tree.map(lambda x: x[:, 0], seq)
            second = jax.tree.map(lambda x: x[:, self.n_step], seq)
        if self.returns is None:
            return ExperiencePair(first=first, second=second)
        reward, discount = self.returns(seq, self.n_step)
        return NStepTransition(first=first, second=second, reward=reward, discount=discount)


@dataclasses.dataclass(frozen=True)
class ItemLayout:
    """Independent items: every added batch is flattened into the single storage row."""

    add_batches: bool
    add_sequences: bool

    def to_rows(self, batch: PyTree, storage: PyTree, core: TrajectoryCore) -> PyTree:
        prefix = ((None,) if self.add_batches else ()) + ((None,) if self.add_sequences else ())
        names = (("batch",) if self.add_batches else ()) + (
            ("sequence_length",) if self.add_sequences else ()
        )
        checks.check_tree(batch, storage, 2, prefix, "add", names)
        batch = checks.scalars_as_arrays(batch)  # one item of Python scalars, as init takes
        k = len(prefix)
        return jax.tree.map(lambda x: x.reshape((1, -1) + x.shape[k:]), batch)

    def from_sequences(self, seq: PyTree) -> PyTree:
        return jax.tree.map(lambda x: x[:, 0], seq)


# ---------------------------------------------------------------------------- n-step returns
def _leaf(tree: PyTree, key: str) -> Optional[Array]:
    if isinstance(tree, dict):
        return tree.get(key)
    return getattr(tree, key, None)


@dataclasses.dataclass(frozen=True)
class NStepReturns:
    """Discounted n-step return and bootstrap discount from a `[B, n + 1, ...]` sequence.

    `reward_key` names the reward leaf (a dict key or attribute); the episode-end signal is
    either `done_key` (1 = the episode ended after this step) or `discount_key` (the
    environment's per-step continuation, 0 at termination). Rewards and ends at step t are
    those of the transition from step t to t + 1, as in a flat buffer's `first`. `fn`, if
    given, replaces all of this: `fn(sequence, n) -> (reward [B], discount [B])`. `end`, if
    given (the buffer's `episode_end_key`), is the episode-end signal in place of `done_key` /
    `discount_key`.
    """

    gamma: float = 0.99
    reward_key: str = "reward"
    done_key: Optional[str] = "done"
    discount_key: Optional[str] = None
    fn: Optional[Callable] = None
    end: Optional[EpisodeOptions] = None

    def __call__(self, seq: PyTree, n: int) -> tuple[Array, Array]:
        if self.fn is not None:
            return self.fn(seq, n)
        reward = _leaf(seq, self.reward_key)
        if reward is None:
            raise ValueError(
                f"n-step buffer: the experience has no leaf {self.reward_key!r} for the reward; "
                "pass reward_key=... or n_step_fn=..."
            )
        reward = reward[:, :n].astype(jnp.float32)
        if self.end is not None:
            ends = self.end.flags(jax.tree.map(lambda x: x[:, :n], seq), 2)
            cont = 1.0 - ends.astype(jnp.float32)
        elif self.discount_key is not None:
            given = _leaf(seq, self.discount_key)
            if given is None:
                raise ValueError(f"n-step buffer: no leaf {self.discount_key!r} (discount_key)")
            cont = given[:, :n].astype(jnp.float32)
        elif (done := None if self.done_key is None else _leaf(seq, self.done_key)) is not None:
            cont = 1.0 - done[:, :n].astype(jnp.float32)
        else:
            if self.done_key is not None and n > 1:
                warnings.warn(
                    f"n-step buffer: the experience has no {self.done_key!r} leaf, so returns "
                    "are not truncated at episode ends (pass done_key=None to silence this)",
                    stacklevel=2,
                )
            cont = jnp.ones_like(reward)
        # alive[k] = prod_{j<k} cont[j]: reward k counts only if no episode ended before it.
        alive = jnp.cumprod(jnp.concatenate([jnp.ones_like(cont[:, :1]), cont], axis=1), axis=1)
        powers = self.gamma ** jnp.arange(n + 1, dtype=jnp.float32)
        ret = jnp.sum(reward * alive[:, :n] * powers[:n], axis=1)
        return ret, alive[:, n] * powers[n]


# ------------------------------------------------------------------------------------ buffers
@dataclasses.dataclass(frozen=True)
class Buffer(FunctionFields):
    """A uniform buffer: `init`, `add`, `sample`, `can_sample`, pure functions of the state
    (Flashbax's function fields: `buffer.replace(add=jax.jit(buffer.add, ...))` works)."""

    core: TrajectoryCore
    layout: Layout
    function_fields: ClassVar[tuple[str, ...]] = ("init", "add", "sample", "can_sample")
    # The trajectory queue's `sample` consumes (returns a new state); a buffer's never does.
    consumes_samples: ClassVar[bool] = False

    def init(self, experience: PyTree) -> TrajectoryBufferState:
        """Empty state for experience shaped like `experience` (one step, no batch axes)."""
        check_example = getattr(self.layout, "check_example", None)
        if check_example is not None:
            check_example(experience)
        returns = getattr(self.layout, "returns", None)
        if returns is not None and returns.end is not None:  # n-step episode_end_key
            returns.end.check_experience(experience)
        return self.core.init(experience)

    def add(self, state: TrajectoryBufferState, batch: PyTree) -> TrajectoryBufferState:
        """New state with `batch` written; the batch's axes are given by the layout."""
        return self.core.add(state, self.layout.to_rows(batch, state.experience, self.core))

    def sample(self, state: TrajectoryBufferState, rng_key: Array,
               batch_size: Optional[int] = None) -> Sample:
        """A sample of `batch_size` (default `sample_batch_size`) items."""
        s = self.core.sample(state, rng_key, batch_size)
        return s.replace(experience=self.layout.from_sequences(s.experience))

    def can_sample(self, state: TrajectoryBufferState) -> Array:
        """bool `[]`: whether `sample` may be called."""
        return self.core.can_sample(state)


@dataclasses.dataclass(frozen=True)
class PrioritisedBuffer(Buffer):
    """A prioritised buffer: a `Buffer` with `set_priorities` and `importance_weights`."""

    core: PrioritisedCore
    function_fields: ClassVar[tuple[str, ...]] = (
        "init", "add", "sample", "can_sample", "set_priorities", "importance_weights")

    def set_priorities(self, state: PrioritisedTrajectoryBufferState,
                       indices: Array | PrioritisedSample, priorities: Array,
                       versions: Optional[Array] = None) -> PrioritisedTrajectoryBufferState:
        """Sets raw priorities `[B]` at `indices` `[B]` (`batch.indices`).

        Passing the sample itself in place of `indices` also passes its `versions`, so updates
        for items overwritten since the sample are ignored (`ignore_stale_priorities`).
        """
        if isinstance(indices, PrioritisedSample):
            sample = indices
            indices, versions = sample.indices, sample.versions
        return self.core.set_priorities(state, indices, priorities, versions)

    def importance_weights(self, state: PrioritisedTrajectoryBufferState,
                           sample: PrioritisedSample, beta: float | Array = 0.4,
                           normalise: str = "buffer") -> Array:
        """`[B]` importance weights of `sample` (see `PrioritisedCore.importance_weights`)."""
        return self.core.importance_weights(state, sample, beta, normalise)


__all__ = [
    "Buffer",
    "PrioritisedBuffer",
    "ExperiencePair",
    "NStepTransition",
    "NStepReturns",
    "Sample",
    "PrioritisedSample",
]
