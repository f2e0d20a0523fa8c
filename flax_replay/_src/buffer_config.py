"""A buffer's configuration as a checkpoint records it, and the comparison a restore makes.

The arrays of a checkpoint do not say how they are to be read: a sum tree of
`priority ** 0.6` restored into a buffer with `priority_exponent=0.5` has the right shape and
the wrong meaning. So `checkpoint.save` records, for every buffer it can find in the state
(the `flax_replay.linen.ReplayBuffer` submodules of a `TrainState`'s module, the
`flax_replay.nnx.ReplayBuffer`s of an NNX model), the buffer definition's fields, flattened
(`{"type": "PrioritisedBuffer", "core.add_batch_size": 8, "core.options.priority_exponent":
0.6, ...}`), keyed by the buffer's path in the collections ("replay" for a submodule named
`replay`). A restore into a buffer whose fields differ is refused, naming each difference,
except for the fields in `SAFE_TO_CHANGE`: they only say how samples are drawn, not what
the stored state means.

Linen: buffers created in `setup` (or the module itself) are found; a buffer created inline
in an `nn.compact` method is not (it exists only while the method runs), and then nothing is
recorded or compared for it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

SAFE_TO_CHANGE = frozenset({
    "core.sample_batch_size",               # how many items a sample draws
    "core.min_length_time_axis",            # when sampling may start
    "core.options.sampling",                # stratified or independent draws
    "core.options.ignore_stale_priorities",  # whether set_priorities drops stale updates
})

# Fields added to buffer definitions after checkpoints recorded them, with the value an older
# checkpoint (which lacks the field) implicitly had.
ADDED_FIELDS: dict[str, Any] = {
    "core.episodes.lead": 0,  # flat buffers' frame-stack context steps (`episodes.py`)
}


def describe(buffer: Any) -> dict[str, Any]:
    """The flattened fields of a buffer definition (JSON values: numbers, strings, bools)."""
    out: dict[str, Any] = {}

    def visit(prefix: str, obj: Any) -> None:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            out[prefix + "type"] = type(obj).__name__
            for f in dataclasses.fields(obj):
                visit(f"{prefix}{f.name}.", getattr(obj, f.name))
            return
        key = prefix[:-1]
        if obj is None or isinstance(obj, (bool, int, float, str)):
            out[key] = obj
        elif callable(obj):
            out[key] = f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', obj)}"
        else:
            out[key] = repr(obj)

    visit("", buffer)
    return out


def of_linen(state: Any) -> dict[str, dict[str, Any]]:
    """`{path: describe(buffer)}` for the buffers of a `TrainState` whose `apply_fn` is a Linen
    module's `apply` (found by binding the module to the state's variables and running
    `setup`); {} when there is no such module."""
    import flax.linen as nn

    from flax_replay._src.linen import ReplayBuffer

    module = getattr(getattr(state, "apply_fn", None), "__self__", None)
    if not isinstance(module, nn.Module):
        return {}
    variables = {"params": state.params, "replay": state.replay,
                 "priorities": state.priorities}
    found: dict[str, dict[str, Any]] = {}

    def visit(m: Any) -> None:
        if isinstance(m, ReplayBuffer):
            found["/".join(m.path)] = describe(m.buffer)
            return
        m._try_setup()  # submodules made in `setup` become attributes
        for v in list(vars(m).values()):
            values = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) \
                else (v,)
            for child in values:
                if isinstance(child, nn.Module) and child.scope is not None:
                    visit(child)

    try:
        visit(module.bind({k: v for k, v in variables.items() if v}))
    except Exception:  # a module we cannot set up without its inputs: record nothing
        return {}
    return found


def of_nnx(model: Any) -> dict[str, dict[str, Any]]:
    """`{path: describe(buffer)}` for every `flax_replay.nnx.ReplayBuffer` in an NNX model."""
    from flax import nnx

    from flax_replay._src.nnx import ReplayBuffer

    return {"/".join(map(str, path)): describe(node.buffer)
            for path, node in nnx.iter_graph(model) if isinstance(node, ReplayBuffer)}


def differences(saved: dict[str, dict[str, Any]], current: dict[str, dict[str, Any]]
                ) -> list[str]:
    """One line per field (not in `SAFE_TO_CHANGE`) that differs between a checkpoint's
    buffers and the template's, for the buffers both have."""
    out = []
    for path in sorted(set(saved) & set(current)):
        a, b = saved[path], current[path]
        for field in sorted(set(a) | set(b)):
            absent = ADDED_FIELDS.get(field, "(absent)")
            was, now = a.get(field, absent), b.get(field, absent)
            if field in SAFE_TO_CHANGE or was == now:
                continue
            out.append(f"buffer '{path}': {field} is {was!r} in the checkpoint, {now!r} in "
                       "the template")
    return out


def branchings(configs: dict[str, dict[str, Any]]) -> dict[str, int]:
    """`{path: sum-tree branching}` of the prioritised buffers among `configs`."""
    return {path: int(c["core.options.branching"]) for path, c in configs.items()
            if isinstance(c.get("core.options.branching"), int)}
