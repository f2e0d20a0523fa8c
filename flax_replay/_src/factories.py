"""Flashbax-compatible factories: Flashbax 0.1.3's names, defaults and validation.

Each returns a `Buffer` / `PrioritisedBuffer` / `TrajectoryQueue` whose methods are the pure
functions `init`, `add`, `sample`, `can_sample` (and `set_priorities`, `can_add`). Where we
differ from Flashbax it is to refuse what Flashbax silently gets wrong; each difference is
noted where it is made.
"""

from __future__ import annotations

import warnings
from typing import Callable, Mapping, Optional, cast

from flax_replay._src import checks, memory, sum_tree
from flax_replay._src.buffers import (
    Buffer,
    ItemLayout,
    NStepReturns,
    PrioritisedBuffer,
    TrajectoryLayout,
    TransitionLayout,
)
from flax_replay._src.core import TrajectoryCore
from flax_replay._src.episodes import EndKey, EpisodeOptions, episode_core
from flax_replay._src.frames import FrameStack, stacked_fields
from flax_replay._src.priorities import PrioritisedCore, PriorityOptions
from flax_replay._src.queue import TrajectoryQueue

_DEVICES = ("cpu", "gpu", "tpu")


# ------------------------------------------------------------------------------ shared checks
def _priority_options(priority_exponent: float, device: str, sampling: str, branching: int,
                      ignore_stale_priorities: bool) -> PriorityOptions:
    """The options every prioritised factory takes, checked once."""
    if device not in _DEVICES:
        # Flashbax warns and falls back to "cpu"; the argument changes nothing here (the same
        # code is fast on every backend), so it is accepted for compatibility only.
        warnings.warn(f"device={device!r} is not one of {_DEVICES}; it is ignored", stacklevel=3)
    return PriorityOptions(priority_exponent, sampling, branching, ignore_stale_priorities)


def _episodes(episode_end_key: Optional[EndKey], sequence_mode: Optional[str],
              period: int) -> Optional[EpisodeOptions]:
    """The episode options of a trajectory buffer (None: no episodes, today's behaviour)."""
    if episode_end_key is None:
        if sequence_mode is not None:
            raise ValueError(f"sequence_mode={sequence_mode!r} needs episode_end_key")
        return None
    return EpisodeOptions(episode_end_key, sequence_mode or "within_episode", period)


def _n_step_end(episode_end_key: Optional[EndKey]) -> Optional[EpisodeOptions]:
    return None if episode_end_key is None else EpisodeOptions(episode_end_key)


def _frames(frame_stack: Optional[Mapping[str, int]],
            episode_end_key: Optional[EndKey]) -> Optional[FrameStack]:
    """The frame stacking of a flat or n-step buffer. With an `episode_end_key`, frames from
    before an episode's first step are zeros (`frames.py`)."""
    return FrameStack.from_arg(frame_stack, episode_end_key)


def _flat_episodes(episode_end_key: Optional[EndKey],
                   stack: Optional[FrameStack]) -> Optional[EpisodeOptions]:
    """The episode options of a flat buffer: a pair is an item unless its `first` ends an
    episode; with frame stacks, the K - 1 steps before `first` are context (`lead`), where
    an earlier episode's end is zeroed in the stack, not refused."""
    if episode_end_key is None:
        return None
    lead = 0 if stack is None else stack.extra_steps()
    return EpisodeOptions(episode_end_key, "within_episode", 1, lead)


def _time_axis(max_size: Optional[int], max_length_time_axis: Optional[int],
               add_batch_size: int, *, max_size_overrides: bool = False,
               stacklevel: int = 4) -> int:
    """`max_length_time_axis`, or `max_size // add_batch_size` when `max_size` is given (as
    Flashbax: both at once is an error, except for the queue, where `max_size` wins)."""
    if max_size is not None and max_length_time_axis is not None and not max_size_overrides:
        raise ValueError("Cannot specify both `max_size` and `max_length_time_axis` arguments.")
    if max_size is None and max_length_time_axis is None:
        raise ValueError("One of `max_size` or `max_length_time_axis` must be given.")
    if max_size is not None:
        checks.positive_int("max_size", max_size)
        max_length_time_axis = max_size // add_batch_size
        warnings.warn(
            f"Setting max_size sets max_length_time_axis to max_size // add_batch_size = "
            f"{max_length_time_axis}.",
            stacklevel=stacklevel,  # the user's call of the factory
        )
    return checks.positive_int("max_length_time_axis", max_length_time_axis)


def _trajectory_fields(
    add_batch_size: int,
    sample_batch_size: int,
    sample_sequence_length: int,
    period: int,
    min_length_time_axis: int,
    max_size: Optional[int],
    max_length_time_axis: Optional[int],
) -> dict[str, int]:
    """The core's fields of a trajectory buffer, checked (Flashbax's rules and messages)."""
    checks.positive_int("add_batch_size", add_batch_size)
    checks.positive_int("sample_batch_size", sample_batch_size)
    checks.positive_int("sample_sequence_length", sample_sequence_length)
    checks.positive_int("period", period)
    checks.non_negative_int("min_length_time_axis", min_length_time_axis)
    max_length_time_axis = _time_axis(max_size, max_length_time_axis, add_batch_size)
    if period > max_length_time_axis:
        raise ValueError(
            f"`period` ({period}) exceeds `max_length_time_axis` ({max_length_time_axis}): "
            "items start every `period` steps, so the time axis must hold at least one period."
        )
    if sample_sequence_length > min_length_time_axis:
        warnings.warn(
            f"sample_sequence_length ({sample_sequence_length}) is greater than "
            f"min_length_time_axis ({min_length_time_axis}); min_length_time_axis is raised to "
            f"{sample_sequence_length}, since a sequence needs that many steps.",
            stacklevel=3,
        )
        min_length_time_axis = sample_sequence_length
    if period > sample_sequence_length:
        warnings.warn(
            f"period ({period}) > sample_sequence_length ({sample_sequence_length}): "
            f"{period - sample_sequence_length} steps of every period are never sampled.",
            stacklevel=3,
        )
    if sample_sequence_length > max_length_time_axis:
        raise ValueError(
            f"`sample_sequence_length` ({sample_sequence_length}) must be less than or equal "
            f"to `max_length_time_axis` ({max_length_time_axis})."
        )
    if min_length_time_axis > max_length_time_axis:
        raise ValueError(
            f"`min_length_time_axis` ({min_length_time_axis}) must be less than or equal to "
            f"`max_length_time_axis` ({max_length_time_axis})."
        )
    if max_length_time_axis % period:
        # Items live on a fixed period grid; a time axis that is a multiple of the period keeps
        # each item in one storage slot (Flashbax does this for its prioritised buffer only).
        rounded = max_length_time_axis - max_length_time_axis % period
        warnings.warn(
            f"max_length_time_axis ({max_length_time_axis}) is rounded down to {rounded}, a "
            f"multiple of period ({period}).",
            stacklevel=3,
        )
        max_length_time_axis = rounded
    if sample_sequence_length > max_length_time_axis - period + 1:
        raise ValueError(
            f"`sample_sequence_length` ({sample_sequence_length}) must be at most "
            f"max_length_time_axis - period + 1 = {max_length_time_axis - period + 1}, so that "
            "a full buffer always holds a sequence that starts on the period grid."
        )
    return dict(
        add_batch_size=add_batch_size,
        max_length_time_axis=max_length_time_axis,
        min_length_time_axis=min_length_time_axis,
        sample_batch_size=sample_batch_size,
        sample_sequence_length=sample_sequence_length,
        period=period,
    )


def _flat_fields(max_length: int, min_length: int, sample_batch_size: int,
                add_batch_size: Optional[int], n_step: int) -> dict[str, int]:
    """The core's fields of a flat (n-step) buffer: one row per `add_batch_size`, items of
    `n_step + 1` consecutive steps."""
    checks.positive_int("max_length", max_length)
    checks.non_negative_int("min_length", min_length)
    checks.positive_int("sample_batch_size", sample_batch_size)
    checks.positive_int("n_step", n_step)
    rows = 1 if add_batch_size is None else checks.positive_int("add_batch_size", add_batch_size)
    if sample_batch_size > max_length:
        raise ValueError(
            f"sample_batch_size ({sample_batch_size}) must be less than or equal to "
            f"max_length ({max_length})"
        )
    if min_length // rows + 1 > max_length:
        raise ValueError(f"min_length ({min_length}) used is too large for the buffer size.")
    if max_length // rows < 2:
        raise ValueError(
            f"max_length//add_batch_size must be at least 2. It is currently "
            f"{max_length}//{rows} = {max_length // rows}"
        )
    time_axis = max_length // rows
    if n_step + 1 > time_axis:
        raise ValueError(
            f"n_step ({n_step}) must be below max_length // add_batch_size ({time_axis})"
        )
    return dict(
        add_batch_size=rows,
        max_length_time_axis=time_axis,
        min_length_time_axis=max(min_length // rows + 1, n_step + 1),
        sample_batch_size=sample_batch_size,
        sample_sequence_length=n_step + 1,
        period=1,
    )


def _item_fields(max_length: int, min_length: int, sample_batch_size: int) -> dict[str, int]:
    """The core's fields of an item buffer: one row, items of one step."""
    checks.positive_int("max_length", max_length)
    checks.non_negative_int("min_length", min_length)
    checks.positive_int("sample_batch_size", sample_batch_size)
    if sample_batch_size > max_length:
        raise ValueError(
            f"sample_batch_size ({sample_batch_size}) must be less than or equal to "
            f"max_length ({max_length})"
        )
    if min_length > max_length:
        raise ValueError(f"min_length ({min_length}) cannot be larger than max_length "
                         f"({max_length}).")
    return dict(
        add_batch_size=1,
        max_length_time_axis=max_length,
        min_length_time_axis=max(min_length, 1),
        sample_batch_size=sample_batch_size,
        sample_sequence_length=1,
        period=1,
    )


# ------------------------------------------------------------------------------ uniform
def make_trajectory_buffer(
    add_batch_size: int,
    sample_batch_size: int,
    sample_sequence_length: int,
    period: int,
    min_length_time_axis: int,
    max_size: Optional[int] = None,
    max_length_time_axis: Optional[int] = None,
    *,
    memory_kind: Optional[str] = None,
    episode_end_key: Optional[EndKey] = None,
    sequence_mode: Optional[str] = None,
) -> Buffer:
    """Rows of trajectories `[add_batch_size, T]`; samples `[sample_batch_size,
    sample_sequence_length]` sequences starting on the `period` grid.

    `episode_end_key` (a top-level bool leaf's name, or `step -> bool[]`) and `sequence_mode`
    ("within_episode", the default with a key, or "padded") make the sequences respect
    episode ends (`episodes.py`); None: sequences may cross them (Flashbax's behaviour).
    """
    episodes = _episodes(episode_end_key, sequence_mode, period)
    fields = _trajectory_fields(add_batch_size, sample_batch_size, sample_sequence_length,
                                period, min_length_time_axis, max_size, max_length_time_axis)
    core = TrajectoryCore(**fields, memory_kind=memory.checked(memory_kind))
    return Buffer(episode_core(core, episodes), TrajectoryLayout())


def make_flat_buffer(
    max_length: int,
    min_length: int,
    sample_batch_size: int,
    add_sequences: bool = False,
    add_batch_size: Optional[int] = None,
    *,
    frame_stack: Optional[Mapping[str, int]] = None,
    memory_kind: Optional[str] = None,
    episode_end_key: Optional[EndKey] = None,
) -> Buffer:
    """Transitions; a sample's experience is `ExperiencePair(first, second)`, consecutive steps.
    `frame_stack={"obs": k}`: one frame stored per step, `k` stacked at sample (`frames.py`).

    `episode_end_key` (see `make_trajectory_buffer`): a pair has no discount to flag an episode
    end, so a pair whose `first` ends an episode (its `second` would be the next episode's
    first step) is never sampled; the pair ending on the last step is. None: every pair.
    With `frame_stack` too, frames from before the episode's first step are zeros.
    """
    stack = _frames(frame_stack, episode_end_key)
    fields = stacked_fields(
        _flat_fields(max_length, min_length, sample_batch_size, add_batch_size, 1), stack)
    core = episode_core(TrajectoryCore(**fields, memory_kind=memory.checked(memory_kind)),
                        _flat_episodes(episode_end_key, stack))
    return Buffer(core, TransitionLayout(add_batch_size is not None, add_sequences,
                                         frames=stack))


def make_item_buffer(
    max_length: int,
    min_length: int,
    sample_batch_size: int,
    add_sequences: bool = False,
    add_batches: bool = False,
    *,
    memory_kind: Optional[str] = None,
) -> Buffer:
    """Independent items, no time structure; samples `[sample_batch_size, ...]`."""
    fields = _item_fields(max_length, min_length, sample_batch_size)
    return Buffer(TrajectoryCore(**fields, memory_kind=memory.checked(memory_kind)),
                  ItemLayout(add_batches, add_sequences))


def make_n_step_buffer(
    max_length: int,
    min_length: int,
    sample_batch_size: int,
    add_sequences: bool = False,
    add_batch_size: Optional[int] = None,
    *,
    n_step: int = 1,
    gamma: float = 0.99,
    reward_key: str = "reward",
    done_key: Optional[str] = "done",
    discount_key: Optional[str] = None,
    n_step_fn: Optional[Callable] = None,
    frame_stack: Optional[Mapping[str, int]] = None,
    memory_kind: Optional[str] = None,
    episode_end_key: Optional[EndKey] = None,
) -> Buffer:
    """Transitions `first` at t, `second` at t + n, with the n-step return and bootstrap
    discount computed at sample time (`NStepTransition`, see `NStepReturns`).

    `episode_end_key` (see `make_trajectory_buffer`) is then the end signal of the return (in
    place of `done_key` / `discount_key`): the return stops after the first end and the
    discount is 0, which flags inside the transition that `second` lies past the end. Every
    transition stays sampleable (those ending an episode carry its last rewards).
    """
    stack = _frames(frame_stack, episode_end_key)
    core = TrajectoryCore(**stacked_fields(_flat_fields(max_length, min_length, sample_batch_size,
                                                        add_batch_size, n_step), stack),
                          memory_kind=memory.checked(memory_kind))
    returns = NStepReturns(gamma, reward_key, done_key, discount_key, n_step_fn,
                           _n_step_end(episode_end_key))
    return Buffer(core, TransitionLayout(add_batch_size is not None, add_sequences, n_step,
                                         returns, stack))


def make_trajectory_queue(
    max_length_time_axis: int,
    add_batch_size: int,
    add_sequence_length: int,
    sample_sequence_length: int,
    max_size: Optional[int] = None,
    *,
    memory_kind: Optional[str] = None,
) -> TrajectoryQueue:
    """A FIFO queue of `[add_batch_size, T]`; `sample` consumes `sample_sequence_length` steps."""
    checks.positive_int("add_batch_size", add_batch_size)
    checks.positive_int("add_sequence_length", add_sequence_length)
    checks.positive_int("sample_sequence_length", sample_sequence_length)
    max_length_time_axis = _time_axis(max_size, max_length_time_axis, add_batch_size,
                                      max_size_overrides=True, stacklevel=3)
    if sample_sequence_length > max_length_time_axis:
        raise ValueError(
            f"`sample_sequence_length` ({sample_sequence_length}) must be less than or equal "
            f"to `max_length_time_axis` ({max_length_time_axis})."
        )
    if add_sequence_length > max_length_time_axis:
        raise ValueError(
            f"`add_sequence_length` ({add_sequence_length}) must be less than or equal to "
            f"`max_length_time_axis` ({max_length_time_axis})."
        )
    return TrajectoryQueue(max_length_time_axis, add_batch_size, add_sequence_length,
                           sample_sequence_length, memory.checked(memory_kind))


# ----------------------------------------------------------------------------- prioritised
def make_prioritised_trajectory_buffer(
    add_batch_size: int,
    sample_batch_size: int,
    sample_sequence_length: int,
    period: int,
    min_length_time_axis: int,
    max_size: Optional[int] = None,
    max_length_time_axis: Optional[int] = None,
    priority_exponent: float = 0.6,
    device: str = "cpu",
    *,
    sampling: str = "stratified",
    branching: int = sum_tree.DEFAULT_BRANCHING,
    ignore_stale_priorities: bool = True,
    memory_kind: Optional[str] = None,
    episode_end_key: Optional[EndKey] = None,
    sequence_mode: Optional[str] = None,
) -> PrioritisedBuffer:
    """A trajectory buffer sampled with probability `priority ** priority_exponent / total`.

    `sampling`: "stratified" (one draw per equal slice of the total, as Flashbax) or
    "independent" (i.i.d. draws). `branching`: children per sum-tree node.
    `episode_end_key`, `sequence_mode`: as `make_trajectory_buffer` (a window that crosses an
    episode end has priority 0 and never gets the max priority).
    """
    options = _priority_options(priority_exponent, device, sampling, branching,
                                ignore_stale_priorities)
    episodes = _episodes(episode_end_key, sequence_mode, period)
    fields = _trajectory_fields(add_batch_size, sample_batch_size, sample_sequence_length,
                                period, min_length_time_axis, max_size, max_length_time_axis)
    core = episode_core(PrioritisedCore(**fields, options=options,
                                        memory_kind=memory.checked(memory_kind)), episodes)
    return PrioritisedBuffer(cast(PrioritisedCore, core), TrajectoryLayout())


def make_prioritised_flat_buffer(
    max_length: int,
    min_length: int,
    sample_batch_size: int,
    add_sequences: bool = False,
    add_batch_size: Optional[int] = None,
    priority_exponent: float = 0.6,
    device: str = "cpu",
    *,
    sampling: str = "stratified",
    branching: int = sum_tree.DEFAULT_BRANCHING,
    ignore_stale_priorities: bool = True,
    frame_stack: Optional[Mapping[str, int]] = None,
    memory_kind: Optional[str] = None,
    episode_end_key: Optional[EndKey] = None,
) -> PrioritisedBuffer:
    """A prioritised flat buffer (PER, Schaul et al. 2015); `episode_end_key` as
    `make_flat_buffer`."""
    options = _priority_options(priority_exponent, device, sampling, branching,
                                ignore_stale_priorities)
    stack = _frames(frame_stack, episode_end_key)
    fields = stacked_fields(
        _flat_fields(max_length, min_length, sample_batch_size, add_batch_size, 1), stack)
    core = episode_core(PrioritisedCore(**fields, options=options,
                                        memory_kind=memory.checked(memory_kind)),
                        _flat_episodes(episode_end_key, stack))
    return PrioritisedBuffer(cast(PrioritisedCore, core),
                             TransitionLayout(add_batch_size is not None, add_sequences,
                                              frames=stack))


def make_prioritised_item_buffer(
    max_length: int,
    min_length: int,
    sample_batch_size: int,
    add_sequences: bool = False,
    add_batches: bool = False,
    priority_exponent: float = 0.6,
    device: str = "cpu",
    *,
    sampling: str = "stratified",
    branching: int = sum_tree.DEFAULT_BRANCHING,
    ignore_stale_priorities: bool = True,
    memory_kind: Optional[str] = None,
) -> PrioritisedBuffer:
    """Prioritised independent items."""
    options = _priority_options(priority_exponent, device, sampling, branching,
                                ignore_stale_priorities)
    core = PrioritisedCore(**_item_fields(max_length, min_length, sample_batch_size),
                           options=options, memory_kind=memory.checked(memory_kind))
    return PrioritisedBuffer(core, ItemLayout(add_batches, add_sequences))


def make_prioritised_n_step_buffer(
    max_length: int,
    min_length: int,
    sample_batch_size: int,
    add_sequences: bool = False,
    add_batch_size: Optional[int] = None,
    priority_exponent: float = 0.6,
    device: str = "cpu",
    *,
    n_step: int = 1,
    gamma: float = 0.99,
    reward_key: str = "reward",
    done_key: Optional[str] = "done",
    discount_key: Optional[str] = None,
    n_step_fn: Optional[Callable] = None,
    sampling: str = "stratified",
    branching: int = sum_tree.DEFAULT_BRANCHING,
    ignore_stale_priorities: bool = True,
    frame_stack: Optional[Mapping[str, int]] = None,
    memory_kind: Optional[str] = None,
    episode_end_key: Optional[EndKey] = None,
) -> PrioritisedBuffer:
    """The prioritised n-step buffer of the Flashbax quickstart (never released there):
    `make_prioritised_n_step_buffer(max_length, min_length, sample_batch_size, add_sequences,
    add_batch_size, priority_exponent, n_step=3)`; `episode_end_key` as `make_n_step_buffer`."""
    options = _priority_options(priority_exponent, device, sampling, branching,
                                ignore_stale_priorities)
    stack = _frames(frame_stack, episode_end_key)
    fields = stacked_fields(
        _flat_fields(max_length, min_length, sample_batch_size, add_batch_size, n_step), stack)
    core = PrioritisedCore(**fields, options=options, memory_kind=memory.checked(memory_kind))
    returns = NStepReturns(gamma, reward_key, done_key, discount_key, n_step_fn,
                           _n_step_end(episode_end_key))
    return PrioritisedBuffer(
        core, TransitionLayout(add_batch_size is not None, add_sequences, n_step, returns, stack)
    )
