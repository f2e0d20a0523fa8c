"""Fuzz test (issue 12, part 5): random sequences of valid and invalid operations on every
buffer kind, through the functional API and the Linen and NNX views.

Invalid operations: adds of the wrong shape, dtype or structure (and Python scalars of the
wrong kind), samples of a bad size or of a buffer that cannot be sampled, `set_priorities`
with out-of-range indices or NaN, negative, infinite, huge (above `largest_priority`)
priorities, or indices of the wrong rank. After every step:

* a refused operation raised a `ValueError` (or its subclass `checkify.JaxRuntimeError`, for
  value checks under `jit`) and the view's state is bit-identical to before;
* an accepted one kept the stored contents, write position, every sum-tree and min-tree node,
  `max_priority`, `running_index` and `can_sample` equal to `reference.py`, and every sampled
  item is a valid item holding exactly its data.

Each view's operations are jitted with `checkify` (compiled once per buffer kind and view and
cached), so a value check raises as it would eagerly. `_run` also takes a `checkpoint` step
(saves, intact and damaged restores; tests/test_fuzz_checkpoint.py), mixed into the operations.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any, Callable, Optional

import jax
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental import checkify
from test_property_uniform import FLAT_POOL, ITEM_POOL, N_STEP_POOL, TRAJECTORY_POOL

import flax_replay as fbx
from flax_replay._src.priorities import FLOAT32_TINY
from flax_replay._src.state import from_collections

import property_helpers as ph
import reference

PRIO = dict(priority_exponent=0.6)
# Exponent 1: any priority above float32 max / (2 N) is refused, and a subnormal one becomes
# exactly the smallest normal leaf (a float32 power of it is a few ulps off the model's).
LINEAR = dict(priority_exponent=1.0)
QUEUE_CFG = dict(T=6, R=2, A=2, L=3, shape=(2,))


def _queue_case(seed: int) -> ph.Case:
    c = QUEUE_CFG
    queue = fbx.make_trajectory_queue(c["T"], c["R"], c["A"], c["L"])
    model = reference.QueueModel(c["R"], c["T"], c["A"], c["L"])
    steps = ph.Steps(c["shape"], seed=seed)
    return ph.Case(queue, model, steps, ((c["R"], c["A"]),),  # type: ignore[arg-type]
                   lambda ids: np.asarray(ids, dtype=object).tolist(),
                   lambda ids: steps.tree(ids), lambda exp: exp["id"][:, 0])


KINDS = {
    "trajectory": lambda s: ph.trajectory_case(TRAJECTORY_POOL[0], seed=s),
    "flat": lambda s: ph.transition_case(FLAT_POOL[1], seed=s),
    "n_step": lambda s: ph.transition_case(N_STEP_POOL[0], seed=s),
    "item": lambda s: ph.item_case(ITEM_POOL[1], seed=s),
    "queue": _queue_case,
    "prioritised_trajectory": lambda s: ph.trajectory_case(TRAJECTORY_POOL[0], PRIO, seed=s),
    "prioritised_flat": lambda s: ph.transition_case(FLAT_POOL[1], LINEAR, seed=s),
    "prioritised_item": lambda s: ph.item_case(ITEM_POOL[1], LINEAR, seed=s),
}
VIEWS = ("functional", "linen", "nnx")


# ---------------------------------------------------------------------------------- views
def _checked(f):
    """`f` jitted under `checkify`: returns f's result or raises (a ValueError subclass)."""
    g = jax.jit(checkify.checkify(f, errors=checkify.user_checks))

    def call(*args):
        err, out = g(*args)
        err.throw()
        return out

    return call


@functools.lru_cache(maxsize=None)
def _view(buffer, view: str, example_key: str) -> SimpleNamespace:
    """A view's operations as functions of its own state object (the functional state, the
    Linen variables, or the NNX module's `nnx.State`): `add(v, batch) -> v`,
    `sample(v, key, size) -> (v, sample)`, `set(v, indices, priorities, versions) -> v`,
    `to_state(v)` (the buffer state dataclass, for the checks) and `make(example) -> v`."""
    queue = buffer.consumes_samples
    if view == "functional":
        def sample(v, key, size):
            return buffer.sample(v) if queue else (v, buffer.sample(v, key, size))

        return SimpleNamespace(
            make=buffer.init, to_state=lambda v: v,
            add=_checked(buffer.add), set=_checked(buffer.set_priorities)
            if hasattr(buffer, "set_priorities") else None,
            sample=_checked_sample(sample), can_sample=jax.jit(buffer.can_sample))
    if view == "linen":
        holder: dict = {}

        def module():
            return holder["module"]

        def make(example):
            holder["module"] = fbx.linen.ReplayBuffer(buffer=buffer, experience=example)
            holder["type"] = type(jax.eval_shape(buffer.init, example))
            return module().init(jax.random.key(0))

        def to_state(v):
            return from_collections(holder["type"], v)

        def add(v, batch):
            _, upd = module().apply(v, batch, method="add", mutable=["replay", "priorities"])
            return {**v, **upd}

        def sample(v, key, size):
            if queue:
                out, upd = module().apply(v, method="sample", mutable=["replay"])
                return {**v, **upd}, out
            return v, module().apply(v, key, size, method="sample")

        def set_p(v, indices, priorities, versions):
            _, upd = module().apply(v, indices, priorities, versions, method="set_priorities",
                                    mutable=["priorities"])
            return {**v, **upd}

        return SimpleNamespace(make=make, to_state=to_state, add=_checked(add),
                               set=_checked(set_p), sample=_checked_sample(sample),
                               can_sample=jax.jit(lambda v: module().apply(
                                   v, method="can_sample")))
    holder = {}

    def make_nnx(example):
        graphdef, state = nnx.split(fbx.nnx.ReplayBuffer(buffer, example))
        holder["graphdef"] = graphdef
        return state

    def call(method):
        def f(v, *args):
            # A fresh copy of the State's Variables: under `checkify` the ones passed in
            # belong to an outer trace, and NNX refuses to mutate them.
            m = nnx.merge(holder["graphdef"], jax.tree.map(lambda x: x, v))
            out = getattr(m, method)(*args)
            return nnx.state(m), out
        return f

    def add(v, batch):
        return call("add")(v, batch)[0]

    def sample(v, key, size):
        return call("sample")(v) if queue else call("sample")(v, key, size)

    def set_p(v, indices, priorities, versions):
        return call("set_priorities")(v, indices, priorities, versions)[0]

    return SimpleNamespace(
        make=make_nnx, to_state=lambda v: nnx.merge(holder["graphdef"], v).state(),
        add=_checked(add), set=_checked(set_p), sample=_checked_sample(sample),
        can_sample=jax.jit(lambda v: call("can_sample")(v)[1]))


def _checked_sample(f):
    """Samples: the size is static (a bad size is refused while tracing)."""
    cache: dict = {}

    def call(v, key, size):
        if size not in cache:
            cache[size] = _checked(lambda v, key: f(v, key, size))
        return cache[size](v, key)

    return call


# ------------------------------------------------------------------------------- the test
def _snapshot(v) -> list:
    return [np.array(x) for x in jax.tree.leaves(v)]


def _assert_unchanged(before: list, v) -> None:
    after = jax.tree.leaves(v)
    assert len(before) == len(after)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, np.asarray(b), err_msg="a refused op changed state")


def _bad_batch(data, batch: dict) -> Any:
    """A batch the buffer must refuse (structure, shape or dtype)."""
    how = data.draw(st.sampled_from(["drop_leaf", "extra_leaf", "dtype", "shape", "axis",
                                     "scalar"]), label="bad add")
    bad = dict(batch)
    if how == "drop_leaf":
        bad.pop("x")
    elif how == "extra_leaf":
        bad["extra"] = batch["id"]
    elif how == "dtype":
        bad["x"] = batch["x"].astype(np.float16)
    elif how == "shape":
        bad["x"] = np.concatenate([batch["x"], batch["x"]], axis=-1)
    elif how == "axis":
        bad["id"] = batch["id"][..., None]
    else:
        bad["id"] = 1.5  # a Python float for an int32 leaf
    return bad


BAD_PRIORITIES = [float("nan"), -1.0, float("inf"), 3e38]  # 3e38: with exponent 1 only
GOOD_PRIORITIES = [0.0, 0.5, 1.0, 2.5, 7.25]
SUBNORMAL = 1e-45


def _run(kind: str, view: str, seed: int, data,
         checkpoint: Optional[Callable[..., Any]] = None) -> None:
    """`checkpoint(case, view, ops, v, data) -> v`, if given, is one more operation (also run
    once at the end): it returns the view's state to carry on with."""
    case = KINDS[kind](seed)
    buffer, m = case.buffer, case.model
    prioritised = hasattr(buffer, "set_priorities")
    queue = buffer.consumes_samples
    ops = _view(buffer, view, kind)
    v = ops.make(case.steps.example())
    samples: list = []
    for _ in range(data.draw(st.integers(8, 16), label="number of operations")):
        op = data.draw(st.sampled_from(
            ["add", "add", "bad_add", "sample", "bad_sample"]
            + (["set", "set", "bad_set"] if prioritised else [])
            + (["checkpoint"] if checkpoint else [])), label="op")
        before = _snapshot(v)
        if op == "checkpoint":
            assert checkpoint is not None
            v = checkpoint(case, view, ops, v, data)
        elif op in ("add", "bad_add"):
            shape = data.draw(st.sampled_from(case.batch_shapes), label="add shape")
            ids = case.steps.new(shape)
            batch = case.steps.tree(ids)
            if op == "bad_add":
                with pytest.raises(ValueError):
                    ops.add(v, _bad_batch(data, batch))
                _assert_unchanged(before, v)
                continue
            if queue and not m.can_add(shape[1]):
                with pytest.raises(ValueError, match="queue is full"):
                    ops.add(v, batch)
                _assert_unchanged(before, v)
                continue
            v = ops.add(v, batch)
            m.add(case.to_rows(ids))
        elif op == "bad_sample":
            if queue:
                continue  # the queue's sample takes no size
            size = data.draw(st.sampled_from([-1, -3, 2.5]), label="bad size")
            with pytest.raises(ValueError, match="batch_size"):
                ops.sample(v, jax.random.key(0), size)
            _assert_unchanged(before, v)
            continue
        elif op == "sample":
            key = jax.random.key(data.draw(ph.SEEDS, label="key"))
            if not m.can_sample():
                with pytest.raises(ValueError):
                    ops.sample(v, key, None)
                _assert_unchanged(before, v)
                continue
            v, out = ops.sample(v, key, None)
            if queue:
                expected = m.sample()
                ph.assert_tree_close(case.steps.tree(np.asarray(expected, np.int64)),
                                     out.experience, "queue sample")
            else:
                ph.check_sampled_items(case, out.experience)
                if prioritised:
                    p = np.asarray(out.probabilities)
                    assert np.isfinite(p).all() and (p > 0).all()
                    samples.append(jax.device_get(out))
        else:  # set / bad_set
            n = len(m.leaves)
            b = buffer.core.sample_batch_size
            if op == "set" and samples and data.draw(st.booleans(), label="from a sample"):
                s = data.draw(st.sampled_from(samples), label="sample")
                indices, versions = np.asarray(s.indices), np.asarray(s.versions)
            else:
                indices = np.asarray(data.draw(st.lists(st.integers(0, n - 1), min_size=b,
                                                        max_size=b), label="indices"), np.int32)
                versions = None
            linear = buffer.core.priority_exponent == 1.0
            good = GOOD_PRIORITIES + ([SUBNORMAL] if linear else [])
            values = data.draw(st.lists(st.sampled_from(good), min_size=b, max_size=b),
                               label="priorities")
            if op == "bad_set":
                j = data.draw(st.integers(0, b - 1), label="bad entry")
                what = data.draw(st.sampled_from(["index", "value", "rank"]), label="bad")
                if what == "index":
                    indices = indices.copy()
                    indices[j] = data.draw(st.sampled_from([-1, n, n + 5]), label="index")
                elif what == "value":
                    bad = BAD_PRIORITIES if linear else BAD_PRIORITIES[:3]
                    values[j] = data.draw(st.sampled_from(bad), label="value")
                else:
                    indices = indices[:, None]
            values = np.asarray(values, np.float32)
            if op == "bad_set":
                with pytest.raises(ValueError):
                    ops.set(v, indices, values, versions)
                _assert_unchanged(before, v)
                continue
            v = ops.set(v, indices, values, versions)
            # Subnormal priorities are raised to the smallest normal float32 (documented).
            model_values = [FLOAT32_TINY if 0 < x < FLOAT32_TINY else float(x) for x in values]
            m.set_priorities(indices.tolist(), model_values,
                             None if versions is None else versions.tolist())
        _check(case, ops, v)
    if checkpoint is not None:
        v = checkpoint(case, view, ops, v, data)
        _check(case, ops, v)


def _check(case: ph.Case, ops, v) -> None:
    state = ops.to_state(v)
    m = case.model
    if case.buffer.consumes_samples:
        stored = np.array(m.storage(empty=0), dtype=np.int64)
        ph.assert_tree_close(case.steps.tree(stored), state.experience, "queue experience")
        assert int(state.write_index) == m.write_index
        assert int(state.read_index) == m.read_index
        assert bool(state.is_full) == m.is_full
        return
    ph.check_storage(case, state)
    if m.prioritised:
        ph.check_priorities(case, state)
        assert np.isfinite(np.asarray(state.priority_state.sum_tree)).all()
    assert bool(ops.can_sample(v)) == m.can_sample()


@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize("kind", list(KINDS))
@settings(max_examples=2)
@given(seed=ph.SEEDS, data=st.data())
def test_fuzz(kind, view, seed, data):
    _run(kind, view, seed, data)
