"""Errors: a bad `add` is refused at trace time with a ValueError that names the leaf and both
shapes / dtypes (and a refused donated call leaves the state alive and unchanged); invalid
configurations name the parameter, with Flashbax 0.1.3's rules and warnings; sampling too
early and adding to a full queue are refused eagerly and reported by checkify under jit.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from flax import nnx
from jax.experimental import checkify

import flax_replay as fbx

from buffer_cases import CASES, EXAMPLE, assert_trees_equal, keys, make_batch, single

ALL_KINDS = tuple(CASES)


def _fmt(shape) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def _expected_prefix(case) -> tuple:
    """The batch prefix as the message prints it: axes of free size are `?`."""
    free = {"sequence_length", "batch"}
    return tuple("?" if n in free else s for s, n in zip(case.batch_prefix, case.axis_names))


def bad_batches(case):
    """(description, batch, regex the message must match) for one buffer kind."""
    good = make_batch(case, 0)
    prefix = case.batch_prefix
    out = []
    missing = {k: v for k, v in good.items() if k != "step"}
    out.append(("missing leaf", missing, r"tree structure does not match(.|\n)*expected(.|\n)*"
                                         r"received"))
    extra = dict(good, extra=good["reward"])
    out.append(("extra leaf", extra, r"tree structure does not match"))
    out.append(("list for dict", list(good.values()), r"tree structure does not match"))
    wrong_item = dict(good, obs=np.zeros(prefix + (4,), np.float32))
    out.append(("item shape", wrong_item,
                re.escape(f"leaf ['obs'] has shape {_fmt(prefix + (4,))}; expected "
                          f"{_fmt(_expected_prefix(case) + (3,))}")))
    wrong_rank = dict(good, reward=good["reward"][..., None])
    out.append(("item rank", wrong_rank,
                re.escape(f"leaf ['reward'] has shape {_fmt(prefix + (1,))}; expected "
                          f"{_fmt(_expected_prefix(case))}")))
    wrong_dtype = dict(good, step=good["step"].astype(np.float32))
    out.append(("dtype", wrong_dtype,
                re.escape("leaf ['step'] has dtype float32; the buffer stores int32")))
    wrong_dtype2 = dict(good, obs=good["obs"].astype(np.int32))
    out.append(("dtype int for float", wrong_dtype2,
                re.escape("leaf ['obs'] has dtype int32; the buffer stores float32")))
    if case.axis_names[0] == "add_batch_size":
        bigger = (prefix[0] + 1,) + prefix[1:]
        wrong_batch = {k: np.concatenate([v, v[:1]]) for k, v in good.items()}
        out.append(("batch size", wrong_batch,
                    re.escape(f"leaf ['obs'] has shape {_fmt(bigger + (3,))}; expected "
                              f"{_fmt(_expected_prefix(case) + (3,))} = (add_batch_size")))
    # A missing batch axis: one step where a batch was expected.
    out.append(("no batch axis", dict(EXAMPLE), r"leaf \['(obs|reward|step)'\] has shape"))
    return out


BAD = [(kind, desc, batch, match) for kind in ALL_KINDS
       for desc, batch, match in bad_batches(CASES[kind])]


@pytest.fixture(scope="module")
def states():
    """An empty state per kind, and a NumPy copy of its values (what must survive)."""
    out = {}
    for kind in ALL_KINDS:
        state = CASES[kind].buffer.init(EXAMPLE)
        out[kind] = (state, jax.tree.map(np.array, state))
    return out


@pytest.mark.parametrize("kind,desc,batch,match", BAD, ids=[f"{k}-{d}" for k, d, _, _ in BAD])
def test_bad_add_is_refused_at_trace_time(states, kind, desc, batch, match):
    buf = CASES[kind].buffer
    state, saved = states[kind]
    with pytest.raises(ValueError, match=match):
        buf.add(state, batch)
    # Under jit with the state donated: refused while tracing, so nothing ran, nothing was
    # donated: the stored arrays are alive and unchanged.
    with pytest.raises(ValueError, match=match):
        jax.jit(buf.add, donate_argnums=0)(state, batch)
    assert not any(x.is_deleted() for x in jax.tree.leaves(state))
    assert_trees_equal(state, saved)


def test_sequence_longer_than_the_time_axis():
    case = CASES["trajectory"]
    long = {k: np.concatenate([v] * 4, axis=1) for k, v in make_batch(case, 0).items()}  # 20
    with pytest.raises(ValueError, match="sequence length 20 must be between 1 and "
                                         "max_length_time_axis=16"):
        jax.eval_shape(case.buffer.add, case.buffer.init(EXAMPLE), long)
    queue = CASES["queue"]
    long = {k: np.concatenate([v] * 4, axis=1) for k, v in make_batch(queue, 0).items()}  # 16
    with pytest.raises(ValueError, match="sequence length 16 must be between 1 and 12"):
        jax.eval_shape(queue.buffer.add, queue.buffer.init(EXAMPLE), long)


def test_views_give_the_same_errors():
    """The Linen and NNX views call the same functions, so they refuse the same batches."""
    case = CASES["prioritised_flat"]
    _, batch, match = next(b for b in bad_batches(case) if b[0] == "item shape")
    mod = fbx.linen.ReplayBuffer(buffer=case.buffer, experience=EXAMPLE)
    variables = jax.eval_shape(mod.init, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda v: mod.apply(v, batch, method="add",
                                           mutable=["replay", "priorities"]), variables)
    m = fbx.nnx.ReplayBuffer(case.buffer, EXAMPLE)
    before = jax.tree.map(np.array, nnx.state(m))
    with pytest.raises(ValueError, match=match):
        nnx.jit(lambda m, b: m.add(b), donate_argnums=0)(m, batch)
    assert not any(x.is_deleted() for x in jax.tree.leaves(nnx.state(m)))
    assert_trees_equal(nnx.state(m), before)
    # NNX has no default key stream: sampling without one says so.
    with pytest.raises(ValueError, match="sample: pass rng_key"):
        m.sample()


# ---------------------------------------------------------------------------- configuration
TRAJ = dict(add_batch_size=2, sample_batch_size=4, sample_sequence_length=4, period=1,
            min_length_time_axis=4, max_length_time_axis=16)
FLAT = dict(max_length=32, min_length=4, sample_batch_size=4)
ITEM = dict(max_length=16, min_length=2, sample_batch_size=4)
QUEUE = dict(max_length_time_axis=12, add_batch_size=2, add_sequence_length=4,
             sample_sequence_length=4)


def _with(base, **changes):
    out = dict(base, **changes)
    return {k: v for k, v in out.items() if v is not _DROP}


_DROP = object()

INVALID = [
    # Trajectory buffers (uniform and prioritised share the rules).
    ("trajectory", _with(TRAJ, max_size=32),
     "Cannot specify both `max_size` and `max_length_time_axis`"),
    ("trajectory", _with(TRAJ, max_length_time_axis=_DROP),
     "One of `max_size` or `max_length_time_axis` must be given"),
    ("trajectory", _with(TRAJ, sample_sequence_length=17, min_length_time_axis=17),
     r"`sample_sequence_length` \(17\) must be less than or equal to `max_length_time_axis` "
     r"\(16\)"),
    ("trajectory", _with(TRAJ, min_length_time_axis=17),
     r"`min_length_time_axis` \(17\) must be less than or equal to `max_length_time_axis` "
     r"\(16\)"),
    ("trajectory", _with(TRAJ, add_batch_size=0), "add_batch_size must be >= 1, got 0"),
    ("trajectory", _with(TRAJ, sample_batch_size=2.0), "sample_batch_size must be an int"),
    ("trajectory", _with(TRAJ, period=0), "period must be >= 1, got 0"),
    ("trajectory", _with(TRAJ, min_length_time_axis=-1), "min_length_time_axis must be >= 0"),
    ("trajectory", _with(TRAJ, max_length_time_axis=0), "max_length_time_axis must be >= 1"),
    ("prioritised_trajectory", _with(TRAJ, min_length_time_axis=17),
     r"`min_length_time_axis` \(17\) must be less than or equal"),
    # Flat buffers: Flashbax's three rules.
    ("flat", _with(FLAT, sample_batch_size=33),
     r"sample_batch_size \(33\) must be less than or equal to max_length \(32\)"),
    ("flat", _with(FLAT, min_length=64, add_batch_size=2),
     r"min_length \(64\) used is too large for the buffer size"),
    ("flat", _with(FLAT, max_length=3, sample_batch_size=2, min_length=0, add_batch_size=2),
     r"max_length//add_batch_size must be at least 2\. It is currently 3//2 = 1"),
    ("flat", _with(FLAT, add_batch_size=0), "add_batch_size must be >= 1, got 0"),
    ("prioritised_flat", _with(FLAT, sample_batch_size=33),
     r"sample_batch_size \(33\) must be less than or equal to max_length"),
    # Item buffers.
    ("item", _with(ITEM, sample_batch_size=17),
     r"sample_batch_size \(17\) must be less than or equal to max_length \(16\)"),
    ("item", _with(ITEM, min_length=17), r"min_length \(17\) cannot be larger than max_length"),
    ("prioritised_item", _with(ITEM, min_length=17), r"min_length \(17\) cannot be larger"),
    # Queue.
    ("queue", _with(QUEUE, sample_sequence_length=13),
     r"`sample_sequence_length` \(13\) must be less than or equal to `max_length_time_axis` "
     r"\(12\)"),
    ("queue", _with(QUEUE, add_sequence_length=13),
     r"`add_sequence_length` \(13\) must be less than or equal to `max_length_time_axis`"),
    ("queue", _with(QUEUE, add_batch_size=0), "add_batch_size must be >= 1, got 0"),
]
# priority_exponent must lie in [0, 1], for every prioritised factory.
for _kind, _base in [("prioritised_trajectory", TRAJ), ("prioritised_flat", FLAT),
                     ("prioritised_item", ITEM), ("prioritised_n_step", FLAT)]:
    for _alpha in (-0.1, 1.5):
        INVALID.append((_kind, _with(_base, priority_exponent=_alpha),
                        rf"priority_exponent must be in \[0, 1\], got {_alpha}"))

FACTORIES = {
    "trajectory": fbx.make_trajectory_buffer,
    "prioritised_trajectory": fbx.make_prioritised_trajectory_buffer,
    "flat": fbx.make_flat_buffer,
    "prioritised_flat": fbx.make_prioritised_flat_buffer,
    "item": fbx.make_item_buffer,
    "prioritised_item": fbx.make_prioritised_item_buffer,
    "queue": fbx.make_trajectory_queue,
    "n_step": fbx.make_n_step_buffer,
    "prioritised_n_step": fbx.make_prioritised_n_step_buffer,
}


@pytest.mark.parametrize("kind,kwargs,match", INVALID,
                         ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(INVALID)])
def test_invalid_configuration_names_the_parameter(kind, kwargs, match):
    with pytest.raises(ValueError, match=match):
        FACTORIES[kind](**kwargs)


@pytest.mark.parametrize("kind", ["prioritised_trajectory", "prioritised_flat",
                                  "prioritised_item"])
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_priority_exponent_bounds_are_inclusive(kind, alpha):
    base = {"prioritised_trajectory": TRAJ, "prioritised_flat": FLAT,
            "prioritised_item": ITEM}[kind]
    buf = FACTORIES[kind](**_with(base, priority_exponent=alpha))
    assert buf.core.priority_exponent == alpha


@pytest.mark.parametrize("factory", [fbx.make_trajectory_buffer,
                                     fbx.make_prioritised_trajectory_buffer])
def test_trajectory_rules_and_warnings(factory):
    # min_length_time_axis is raised to sample_sequence_length, with a warning.
    with pytest.warns(UserWarning, match=r"min_length_time_axis is raised to 6"):
        buf = factory(**_with(TRAJ, sample_sequence_length=6, min_length_time_axis=2))
    assert buf.core.min_length_time_axis == 6
    # max_size sets max_length_time_axis = max_size // add_batch_size, with a warning.
    with pytest.warns(UserWarning, match=r"max_length_time_axis to max_size // add_batch_size"
                                         r" = 20"):
        buf = factory(**_with(TRAJ, max_length_time_axis=_DROP, max_size=41))
    assert buf.core.max_length_time_axis == 20
    # A period longer than the sequence leaves steps unsampled: a warning.
    with pytest.warns(UserWarning, match=r"period \(5\) > sample_sequence_length \(4\)"):
        factory(**_with(TRAJ, period=5, max_length_time_axis=20))
    # A time axis that is not a multiple of the period is rounded down, with a warning.
    with pytest.warns(UserWarning, match=r"max_length_time_axis \(17\) is rounded down to 16"):
        buf = factory(**_with(TRAJ, period=2, max_length_time_axis=17))
    assert buf.core.max_length_time_axis == 16


def test_flat_item_and_queue_rules():
    # Flat: the time axis is max_length // add_batch_size and sampling needs
    # min_length // add_batch_size + 1 steps per row (Flashbax 0.1.3).
    core = fbx.make_flat_buffer(**_with(FLAT, add_batch_size=3)).core
    assert (core.add_batch_size, core.max_length_time_axis, core.min_length_time_axis) == (3, 10, 2)
    core = fbx.make_flat_buffer(**FLAT).core  # no add_batch_size: one row
    assert (core.add_batch_size, core.max_length_time_axis, core.min_length_time_axis) == (1, 32, 5)
    # Item: one row of max_length items.
    core = fbx.make_item_buffer(**ITEM).core
    assert (core.add_batch_size, core.max_length_time_axis) == (1, 16)
    # Queue: max_size sets the time axis, with a warning.
    with pytest.warns(UserWarning, match=r"max_length_time_axis to max_size // add_batch_size"
                                         r" = 10"):
        queue = fbx.make_trajectory_queue(**_with(QUEUE, max_size=21))
    assert queue.max_length_time_axis == 10


def test_unknown_device_warns():
    with pytest.warns(UserWarning, match="device='npu'"):
        fbx.make_prioritised_flat_buffer(**FLAT, device="npu")


# ----------------------------------------------------------------------- sampling too early
@pytest.mark.parametrize("kind", ["trajectory", "prioritised_flat"])
def test_sampling_before_can_sample(kind):
    case, f = CASES[kind], single(kind)
    empty = case.buffer.init(EXAMPLE)
    one = f["add"](empty, make_batch(case, 0))  # flat: 1 step per row, 3 needed
    partial = empty if kind == "trajectory" else one
    assert not bool(f["can_sample"](partial))
    with pytest.raises(ValueError, match=r"cannot be sampled yet .*check can_sample\(state\)"):
        case.buffer.sample(partial, keys(0))

    checked = jax.jit(checkify.checkify(case.buffer.sample, errors=checkify.user_checks))
    err, _ = checked(partial, keys(0))
    assert err.get() is not None and "cannot be sampled yet" in err.get()
    with pytest.raises(checkify.JaxRuntimeError, match="cannot be sampled yet"):
        err.throw()
    # The same compiled check is silent once the buffer can be sampled.
    full = one
    for i in range(1, 3):
        full = f["add"](full, make_batch(case, i))
    assert bool(f["can_sample"](full))
    err, _ = checked(full, keys(0))
    assert err.get() is None


# ------------------------------------------------------------------------- the full queue
def test_queue_refuses_to_overwrite():
    case, f = CASES["queue"], single("queue")
    queue = case.buffer
    state = f["init"](EXAMPLE)
    for i in range(3):  # 3 x 4 steps = T = 12: full
        assert bool(f["can_add"](state))
        state = f["add"](state, make_batch(case, i))
    assert not bool(f["can_add"](state)) and bool(state.is_full)
    saved = jax.tree.map(np.array, state)
    batch = make_batch(case, 3)

    with pytest.raises(ValueError, match=r"the queue is full \(12 of 12 steps per row\).*"
                                         r"can_add\(state\)"):
        queue.add(state, batch)
    assert_trees_equal(state, saved)

    # Under jit (donated): the add is refused, the state comes back unchanged ...
    refused = jax.jit(queue.add, donate_argnums=0)(state, batch)
    assert_trees_equal(refused, saved)
    # ... and checkify reports it.
    err, refused = jax.jit(checkify.checkify(queue.add, errors=checkify.user_checks))(
        refused, batch)
    assert err.get() is not None and "the queue is full" in err.get()
    assert_trees_equal(refused, saved)

    # After a read there is room again: the same add goes through and checkify is silent.
    state, first = f["sample"](refused)
    np.testing.assert_array_equal(first.experience["obs"], make_batch(case, 0)["obs"])
    err, state = jax.jit(checkify.checkify(queue.add, errors=checkify.user_checks))(state, batch)
    assert err.get() is None
    assert bool(state.is_full)


def test_queue_sample_when_empty():
    case = CASES["queue"]
    empty = case.buffer.init(EXAMPLE)
    with pytest.raises(ValueError, match=r"the queue holds 0 steps per row, fewer than "
                                         r"sample_sequence_length=4"):
        case.buffer.sample(empty)
    checked = jax.jit(checkify.checkify(case.buffer.sample, errors=checkify.user_checks))
    err, (state, _) = checked(empty)
    assert "fewer than sample_sequence_length" in err.get()
    assert_trees_equal(state, jax.tree.map(np.array, empty))  # nothing consumed
