"""Frame stacking without duplication: store each frame once, stack at sample time.

A flat or n-step buffer built with `frame_stack={"obs": k}` stores one frame per step for the
key `obs` (`add` carries `obs: [..., *frame]`) and returns, for `first` (step t) and `second`
(step t + n), the k frames up to that step on a new trailing axis, oldest first:
`[B, *frame, k]`.

How it is done without a second implementation of anything: with K the largest depth, an item
of the storage core becomes the `n + K` consecutive steps `t - K + 1, ..., t + n` (a sequence
of `sample_sequence_length = n + K` that starts K - 1 steps before the transition). The core's
rule for sequences (every step still stored, none past the write head) then says exactly when
a transition is sampleable: its oldest frame must not have been overwritten, and it must have
been written at all (a transition at one of the first K - 1 steps of a row has no full stack
and is never sampled). `can_sample`, the valid items and the prioritised sum tree follow from
that rule, as for sequences; a sample's `indices`/`versions` name the item by the slot of its
oldest frame. Every other key is read at steps t .. t + n only (the n-step return too).

Episode starts. Given the buffer's `episode_end_key` (a leaf's name or `step -> bool[]`,
`episodes.py`; True where the episode ended after the step, the `done` convention of the
n-step returns), frames before the first step of the transition's episode are zeros:
`stack_frames` takes the end flags of the item's steps, read from the item itself, so flat and
n-step buffers share this one implementation. Which transitions are items is the buffer's own
rule, unchanged by the stacks: an n-step buffer keeps them all (the return stops at the end);
a flat buffer drops a pair whose `first` ends an episode, and only that pair: its episode core
checks the end flags from step t on (`EpisodeOptions.lead` = K - 1 context steps), so a stack
reaching into an earlier episode never makes a transition invalid. Without `episode_end_key` a
stack may span an episode boundary. A transition at one of the first K - 1 steps ever written
to a row is never sampled, episode start or not (its item would begin before the row).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from flax_replay._src.episodes import EndKey, EpisodeOptions
from flax_replay._src.typing import Array, PyTree


def _keys_of(tree: Any) -> Optional[list[str]]:
    """The top-level keys of a dict or the fields of a NamedTuple / dataclass (None if
    `tree` has no named top level)."""
    if isinstance(tree, Mapping):
        return [str(k) for k in tree]
    if hasattr(tree, "_fields"):
        return list(tree._fields)
    if dataclasses.is_dataclass(tree):
        return [f.name for f in dataclasses.fields(tree)]
    return None


def get_key(tree: Any, key: str) -> Any:
    """The sub-tree at a top-level key (dict key or attribute)."""
    return tree[key] if isinstance(tree, Mapping) else getattr(tree, key)


def _replace(tree: Any, updates: dict[str, Any]) -> Any:
    if isinstance(tree, Mapping):
        out: dict = dict(tree)
        out.update(updates)
        # The user's mapping type (e.g. an OrderedDict) is kept; a plain dict stays a dict.
        return out if type(tree) is dict else type(tree)(out)  # type: ignore[call-arg]
    if hasattr(tree, "_replace"):
        return tree._replace(**updates)
    if hasattr(tree, "replace"):
        return tree.replace(**updates)
    return dataclasses.replace(tree, **updates)


def stack_frames(frames: Array, depth: int, end: int, ends: Optional[Array] = None) -> Array:
    """The `depth` frames up to position `end` of `frames` `[B, S, *frame]`, stacked on a new
    trailing axis, oldest first: `[B, *frame, depth]`.

    `ends` `[B, S]` (optional): 1 where the episode ended after that step. A frame is zeroed
    when an episode ended at or after it and before `end` (it belongs to an earlier episode).
    """
    window = frames[:, end - depth + 1:end + 1]  # [B, depth, *frame]
    if ends is not None:
        e = jnp.asarray(ends[:, end - depth + 1:end], jnp.int32)  # ends between the frames
        # keep[d] = no episode end at positions d .. depth - 2 of the window.
        after = jnp.flip(jnp.cumsum(jnp.flip(e, axis=1), axis=1), axis=1)
        keep = jnp.concatenate([after == 0, jnp.ones_like(e[:, :1], bool)], axis=1)
        keep = keep.reshape(keep.shape + (1,) * (window.ndim - 2))
        window = jnp.where(keep, window, jnp.zeros((), window.dtype))
    return jnp.moveaxis(window, 1, -1)


@dataclasses.dataclass(frozen=True)
class FrameStack:
    """Which top-level keys are stacked and how deep: `depths` `((key, k), ...)` (hashable,
    so a buffer stays a static jit argument). `ends_key`: the buffer's `episode_end_key` (a
    bool leaf's name or `step -> bool[]`), used to zero frames of earlier episodes (None:
    stacks may span episodes)."""

    depths: tuple[tuple[str, int], ...]
    ends_key: Optional[EndKey] = None

    @classmethod
    def from_arg(cls, frame_stack: Optional[Mapping[str, int]],
                 ends_key: Optional[EndKey] = None) -> Optional["FrameStack"]:
        """Checks a factory's `frame_stack` argument (None or `{key: depth >= 1}`)."""
        if frame_stack is None:
            return None
        if not isinstance(frame_stack, Mapping) or not frame_stack:
            raise ValueError(
                f"frame_stack must be a non-empty dict {{key: depth}}, got {frame_stack!r}")
        depths = []
        for key, depth in frame_stack.items():
            if not isinstance(key, str):
                raise ValueError(f"frame_stack: keys must be top-level experience keys "
                                 f"(str), got {key!r}")
            if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 1:
                raise ValueError(f"frame_stack[{key!r}]: the depth must be an integer >= 1, "
                                 f"got {depth!r}")
            depths.append((key, int(depth)))
        return cls(tuple(depths), ends_key)

    @property
    def max_depth(self) -> int:
        return max(k for _, k in self.depths)

    def extra_steps(self) -> int:
        """Steps an item reaches back before its transition: K - 1."""
        return self.max_depth - 1

    def check_example(self, experience: PyTree) -> None:
        """ValueError unless every stacked key is a top-level key of `experience` and the
        episode-end signal (if any) is one bool per step."""
        keys = _keys_of(experience)
        for key, _ in self.depths:
            if keys is None or key not in keys:
                raise ValueError(
                    f"frame_stack: the experience has no top-level key {key!r}; its keys are "
                    f"{keys if keys is not None else 'none (not a dict or NamedTuple)'}")
        if self.ends is not None:
            self.ends.check_experience(experience)

    @property
    def ends(self) -> Optional[EpisodeOptions]:
        """The episode-end signal as `episodes.py` reads it (None without `ends_key`)."""
        return None if self.ends_key is None else EpisodeOptions(self.ends_key)

    def check_add(self, batch: PyTree, storage: PyTree, n_prefix: int, what: str) -> None:
        """A clear error when a stacked key's leaf is not one frame per step (e.g. a stack was
        passed): its trailing shape must be the stored frame's."""
        keys = _keys_of(batch)
        if keys is None:
            return  # the generic structure check reports it
        for key, depth in self.depths:
            if key not in keys:
                continue
            store_leaves = jax.tree_util.tree_leaves_with_path(get_key(storage, key))
            batch_leaves = jax.tree_util.tree_leaves(get_key(batch, key))
            if len(store_leaves) != len(batch_leaves):
                continue
            for (path, stored), leaf in zip(store_leaves, batch_leaves):
                frame = tuple(stored.shape[2:])
                shape = tuple(np.shape(leaf))
                if len(shape) < len(frame) or shape[len(shape) - len(frame):] != frame \
                        or len(shape) != n_prefix + len(frame):
                    name = key + jax.tree_util.keystr(path)
                    raise ValueError(
                        f"{what}: frame_stack key {name!r} (depth {depth}) carries one frame "
                        f"per step, shape (..., {', '.join(map(str, frame))}) with {n_prefix} "
                        f"batch/time axes; got {shape}")

    def transition(self, seq: PyTree, n: int) -> tuple[PyTree, PyTree, PyTree]:
        """`(first, second, steps)` of sequences `[B, n + K, ...]`: `first`/`second` with the
        stacked keys `[B, *frame, k]`, and `steps` = the sequences from step t on (`[B, n + 1,
        ...]`, for the n-step returns)."""
        k_max = self.max_depth
        t = k_max - 1
        steps = jax.tree.map(lambda x: x[:, t:], seq)
        first = jax.tree.map(lambda x: x[:, 0], steps)
        second = jax.tree.map(lambda x: x[:, n], steps)
        ends = None if self.ends is None else self.ends.flags(seq, 2)  # [B, n + K]

        def stacked(end: int) -> dict[str, Any]:
            return {key: jax.tree.map(lambda x, k=k: stack_frames(x, k, end, ends),
                                      get_key(seq, key))
                    for key, k in self.depths}

        return _replace(first, stacked(t)), _replace(second, stacked(t + n)), steps


def stacked_fields(fields: dict[str, int], stack: Optional[FrameStack]) -> dict[str, int]:
    """A flat buffer's core fields (items of `n + 1` steps) extended K - 1 steps back for the
    frames (items of `n + K` steps); ValueError if they no longer fit the time axis."""
    if stack is None:
        return fields
    extra = stack.extra_steps()
    length = fields["sample_sequence_length"] + extra
    if length > fields["max_length_time_axis"]:
        raise ValueError(
            f"frame_stack: a transition with a stack of {stack.max_depth} frames spans {length} "
            f"steps, more than max_length // add_batch_size = {fields['max_length_time_axis']}")
    return dict(fields, sample_sequence_length=length,
                min_length_time_axis=max(fields["min_length_time_axis"], length))
