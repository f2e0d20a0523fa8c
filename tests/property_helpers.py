"""Shared machinery of the property tests: step data with unique ids, buffer "cases" (a
buffer with its reference model and layout), cached jitted functions, and the two drivers
that run a random operation sequence against `reference.py` and compare after every step.

Compilation dominates the cost, so in the default hypothesis profile a buffer configuration is
drawn from a small hand-picked pool per buffer kind (edge cases included) and its jitted
functions are cached; the operation sequences, batch shapes, keys and priorities are free.
With HYPOTHESIS_PROFILE=thorough the configurations themselves are drawn at random.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from types import SimpleNamespace
from typing import Any, Callable, Optional

import jax
import numpy as np
from hypothesis import event, settings
from hypothesis import strategies as st

import flax_replay as fbx
from flax_replay._src import sum_tree

import reference

THOROUGH = settings().max_examples > 25
BETA = 0.4
SHAPES = ((), (2,), (1, 3))
SEEDS = st.integers(0, 2**31 - 1)


def pick(pool: list, full: st.SearchStrategy) -> st.SearchStrategy:
    """Configurations: the pool in the default profile, anything `full` draws when thorough."""
    return full if THOROUGH else st.sampled_from(pool)


def quiet(make: Callable, *args, **kwargs):
    """Builds a buffer without the factories' advisory warnings (rounding, period > L)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make(*args, **kwargs)


# ------------------------------------------------------------------------------ step data
class Steps:
    """Unique step ids (1, 2, ...) and the step pytree each id stands for.

    Every leaf is a function of the id, so a sampled step identifies where it was written:
    "id" int32, "x" float32 `[*item_shape]` = id + 0.25 * arange. n-step data adds "reward"
    (float32) and an episode-end leaf ("done": 1 = the episode ended after this step, or
    "discount": 0 = ended), drawn at random per id. Id 0 is an empty slot: all zeros.
    """

    def __init__(self, item_shape: tuple = (), end_key: Optional[str] = None,
                 end_dtype: Any = np.float32, seed: int = 0, end_rate: float = 0.3):
        self.item_shape, self.end_key, self.end_dtype = item_shape, end_key, end_dtype
        self.rng = np.random.default_rng(seed)
        self.end_rate = end_rate
        self.count = 0
        self.rewards = {0: 0.0}
        self.ends = {0: False}

    def example(self) -> dict:
        return jax.tree.map(lambda x: x[0], self.tree(np.zeros((1,), np.int64)))

    def new(self, shape: tuple) -> np.ndarray:
        n = math.prod(shape)
        ids = np.arange(self.count + 1, self.count + n + 1).reshape(shape)
        for i in ids.reshape(-1).tolist():
            self.rewards[i] = float(np.float32(self.rng.uniform(-2.0, 2.0)))
            self.ends[i] = bool(self.rng.random() < self.end_rate)
        self.count += n
        return ids

    def tree(self, ids: Any) -> dict:
        """Step pytree (numpy) with leading shape `ids.shape`."""
        ids = np.asarray(ids, np.int64)
        size = math.prod(self.item_shape)
        x = ids[..., None] + 0.25 * np.arange(size) * (ids[..., None] > 0)
        out = {"id": ids.astype(np.int32),
               "x": x.reshape(ids.shape + self.item_shape).astype(np.float32)}
        if self.end_key is not None:
            flat = ids.reshape(-1).tolist()
            out["reward"] = np.array([self.rewards[i] for i in flat], np.float32).reshape(ids.shape)
            ends = np.array([self.ends[i] for i in flat]).reshape(ids.shape)
            if self.end_key == "discount":
                ends = ~ends & (ids > 0)  # continuation: 1 while the episode goes on
            out[self.end_key] = ends.astype(self.end_dtype)
        return out


def assert_tree_close(expected: Any, actual: Any, what: str, rtol: float = 1e-5) -> None:
    actual = jax.device_get(actual)
    assert jax.tree.structure(expected) == jax.tree.structure(actual), (
        f"{what}: structure {jax.tree.structure(actual)} != {jax.tree.structure(expected)}")
    for (path, e), a in zip(jax.tree_util.tree_flatten_with_path(expected)[0],
                            jax.tree.leaves(actual)):
        name = f"{what}{jax.tree_util.keystr(path)}"
        assert np.shape(e) == np.shape(a), f"{name}: shape {np.shape(a)} != {np.shape(e)}"
        if np.issubdtype(np.asarray(e).dtype, np.floating):
            np.testing.assert_allclose(a, e, rtol=rtol, atol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(a, e, err_msg=name)


# ---------------------------------------------------------------------------------- cases
@dataclasses.dataclass
class Case:
    """A buffer, the reference model of its semantics, and its layout.

    batch_shapes: leading shapes a user `add` batch may have (steps are drawn per shape).
    to_rows: the reference layout, user batch of ids -> `[R][A]` rows of ids.
    expect: the expected sample experience of one item, from its L step ids.
    first_id: `[B]` id of each sampled item's first step, from the sample experience.
    """

    buffer: Any
    model: reference.TrajectoryModel
    steps: Steps
    batch_shapes: tuple
    to_rows: Callable[[np.ndarray], list]
    expect: Callable[[list], Any]
    first_id: Callable[[Any], np.ndarray]
    branching: int = sum_tree.DEFAULT_BRANCHING
    sampling: str = "stratified"


def trajectory_case(cfg: dict, prio: Optional[dict] = None, seed: int = 0) -> Case:
    kw = dict(add_batch_size=cfg["R"], sample_batch_size=cfg["B"],
              sample_sequence_length=cfg["L"], period=cfg["P"],
              min_length_time_axis=cfg["min"], max_length_time_axis=cfg["T"])
    if prio is None:
        buffer = quiet(fbx.make_trajectory_buffer, **kw)
    else:
        buffer = quiet(fbx.make_prioritised_trajectory_buffer, **kw, **prio)
    model = reference.TrajectoryModel(
        cfg["R"], reference.trajectory_capacity(cfg["T"], cfg["P"]), cfg["L"], cfg["P"],
        cfg["min"], **_model_prio(prio))
    steps = Steps(cfg["shape"], seed=seed)
    return Case(buffer, model, steps, tuple((cfg["R"], a) for a in cfg["A"]),
                lambda ids: np.asarray(ids, dtype=object).tolist(),
                lambda ids: steps.tree(ids), lambda exp: exp["id"][:, 0], **_tree_opts(prio))


def transition_case(cfg: dict, prio: Optional[dict] = None, seed: int = 0) -> Case:
    """Flat buffers (`n` absent) and n-step buffers (`n`, `gamma`, `end_key` given)."""
    n = cfg.get("n")
    kw = dict(add_sequences=cfg["seq"], add_batch_size=cfg["R"])
    if n is None:
        make = fbx.make_flat_buffer if prio is None else fbx.make_prioritised_flat_buffer
        steps = Steps(cfg["shape"], seed=seed)
    else:
        make = fbx.make_n_step_buffer if prio is None else fbx.make_prioritised_n_step_buffer
        end_key = cfg["end_key"]
        kw.update(n_step=n, gamma=cfg["gamma"], done_key="done",
                  discount_key="discount" if end_key == "discount" else None)
        steps = Steps(cfg["shape"], end_key, cfg.get("end_dtype", np.float32), seed=seed)
    buffer = quiet(make, cfg["max"], cfg["min"], cfg["B"], **kw, **(prio or {}))
    geo = reference.flat_geometry(cfg["max"], cfg["min"], cfg["R"], n or 1)
    model = reference.TrajectoryModel(**geo, **_model_prio(prio))
    rows = () if cfg["R"] is None else (cfg["R"],)
    shapes = tuple(rows + ((a,) if cfg["seq"] else ()) for a in cfg["A"])

    def expect(ids: list):
        first, second = steps.tree(ids[0]), steps.tree(ids[-1])
        if n is None:
            return fbx.ExperiencePair(first=first, second=second)
        ret, disc = reference.n_step_return([steps.rewards[i] for i in ids],
                                            [steps.ends[i] for i in ids], cfg["gamma"], n)
        return fbx.NStepTransition(first=first, second=second, reward=np.float32(ret),
                                   discount=np.float32(disc))

    return Case(buffer, model, steps, shapes,
                lambda ids: reference.transition_rows(ids, cfg["R"] is not None, cfg["seq"]),
                expect, lambda exp: exp.first["id"], **_tree_opts(prio))


def item_case(cfg: dict, prio: Optional[dict] = None, seed: int = 0) -> Case:
    kw = dict(add_sequences=cfg["seq"], add_batches=cfg["batches"])
    make = fbx.make_item_buffer if prio is None else fbx.make_prioritised_item_buffer
    buffer = quiet(make, cfg["max"], cfg["min"], cfg["B"], **kw, **(prio or {}))
    model = reference.TrajectoryModel(**reference.item_geometry(cfg["max"], cfg["min"]),
                                      **_model_prio(prio))
    steps = Steps(cfg["shape"], seed=seed)
    return Case(buffer, model, steps, tuple(cfg["dims"]), reference.item_rows,
                lambda ids: steps.tree(ids[0]), lambda exp: exp["id"], **_tree_opts(prio))


def _model_prio(prio: Optional[dict]) -> dict:
    if prio is None:
        return {}
    return dict(priority_exponent=prio["priority_exponent"],
                ignore_stale_priorities=prio.get("ignore_stale_priorities", True))


def _tree_opts(prio: Optional[dict]) -> dict:
    prio = prio or {}
    return dict(branching=prio.get("branching", sum_tree.DEFAULT_BRANCHING),
                sampling=prio.get("sampling", "stratified"))


# ----------------------------------------------------------------------- jitted functions
@functools.lru_cache(maxsize=None)
def uniform_fns(buffer) -> SimpleNamespace:
    def add(state, batch):
        state = buffer.add(state, batch)
        return state, buffer.can_sample(state)

    return SimpleNamespace(init=jax.jit(buffer.init), add=jax.jit(add),
                           sample=jax.jit(buffer.sample))


@functools.lru_cache(maxsize=None)
def prioritised_fns(buffer) -> SimpleNamespace:
    def add(state, batch):
        state = buffer.add(state, batch)
        return state, buffer.can_sample(state)

    def sample(state, key):
        s = buffer.sample(state, key)
        return (s, buffer.importance_weights(state, s, BETA),
                buffer.importance_weights(state, s, BETA, "batch"))

    def set_priorities(state, sample, priorities):
        # The sample itself is passed: its indices and versions (stale detection).
        state = buffer.set_priorities(state, sample, priorities)
        return state, buffer.can_sample(state)

    return SimpleNamespace(init=jax.jit(buffer.init), add=jax.jit(add), sample=jax.jit(sample),
                           set_priorities=jax.jit(set_priorities))


# ------------------------------------------------------------------------------- checking
def check_storage(case: Case, state) -> None:
    m = case.model
    stored = np.array(m.storage(empty=0), dtype=np.int64)
    assert_tree_close(case.steps.tree(stored), state.experience, "state.experience")
    assert int(state.current_index) == m.current_index, (int(state.current_index),
                                                         m.current_index)
    assert bool(state.is_full) == m.is_full


def check_sampled_items(case: Case, experience) -> list[tuple[int, int]]:
    """Every sampled item is a currently valid item and its data is exactly that item's."""
    experience = jax.device_get(experience)
    m = case.model
    items = []
    for b, first in enumerate(np.asarray(case.first_id(experience)).tolist()):
        row, s = m.find(first)
        assert m.is_valid(row, s), f"sampled item (row {row}, start {s}) is not valid"
        assert_tree_close(case.expect(m.steps(row, s)),
                          jax.tree.map(lambda x, b=b: x[b], experience), f"sample[{b}]")
        items.append((row, s))
    return items


def reference_tree(leaves: np.ndarray, geo, reduce: Callable, identity: float) -> np.ndarray:
    """Every level of a `branching`-ary tree over `leaves`, root first, as one flat array."""
    levels = [np.concatenate([leaves, np.full(geo.sizes[-1] - leaves.size, identity)])]
    for size in reversed(geo.sizes[:-1]):
        below = levels[0]
        padded = np.full(size * geo.branching, identity)
        padded[: below.size] = below
        levels.insert(0, reduce(padded.reshape(size, geo.branching), axis=1))
    return np.concatenate(levels)


def check_priorities(case: Case, state) -> None:
    m = case.model
    assert int(state.running_index) == m.counter, (int(state.running_index), m.counter)
    ps = jax.device_get(state.priority_state)
    geo = sum_tree.geometry(len(m.leaves), case.branching)
    np.testing.assert_allclose(sum_tree.leaves(ps.sum_tree, geo), m.leaves, rtol=1e-6, atol=0,
                               err_msg="sum-tree leaves")
    np.testing.assert_allclose(ps.sum_tree, reference_tree(m.leaves, geo, np.sum, 0.0),
                               rtol=1e-5, atol=0, err_msg="sum-tree nodes (root first)")
    assert ps.sum_tree[0] > 0 or not m.leaves.any()
    min_leaves = np.where(m.leaves > 0, m.leaves, np.inf)
    np.testing.assert_allclose(ps.min_tree, reference_tree(min_leaves, geo, np.min, np.inf),
                               rtol=1e-6, atol=0, err_msg="min tree")
    np.testing.assert_allclose(ps.max_priority, m.max_priority, rtol=1e-7,
                               err_msg="max_priority")


def check_prioritised_sample(case: Case, sample, weights, batch_weights) -> list:
    m = case.model
    sample = jax.device_get(sample)
    items = check_sampled_items(case, sample.experience)
    leaves = [m.leaf(r, s) for r, s in items]
    np.testing.assert_array_equal(sample.indices, leaves, err_msg="indices")
    np.testing.assert_array_equal(sample.versions, [m.version(s) for _, s in items],
                                  err_msg="versions")
    ref = m.leaves[leaves]
    assert (ref > 0).all(), f"sampled zero-priority leaves {np.array(leaves)[ref == 0]}"
    np.testing.assert_allclose(sample.priorities, ref, rtol=1e-6, err_msg="priorities")
    np.testing.assert_allclose(sample.probabilities, ref / m.leaves.sum(), rtol=1e-5,
                               err_msg="probabilities")
    np.testing.assert_allclose(weights, (ref / m.min_positive_leaf()) ** -BETA, rtol=1e-5,
                               err_msg="importance weights (buffer)")
    w = ref ** -BETA
    np.testing.assert_allclose(batch_weights, w / w.max(), rtol=1e-5,
                               err_msg="importance weights (batch)")
    if case.sampling == "stratified":
        # Draw b lands in the b-th equal slice of the total: its leaf's CDF interval must meet it.
        b = len(leaves)
        total = m.leaves.sum()
        cum = np.cumsum(m.leaves)
        for j, leaf in enumerate(leaves):
            lo, hi = cum[leaf] - m.leaves[leaf], cum[leaf]
            tol = 1e-5 * total
            assert lo <= (j + 1) * total / b + tol and hi >= j * total / b - tol, (
                f"stratified draw {j} of {b} took leaf {leaf} with CDF [{lo}, {hi}] of {total}")
    return items


# -------------------------------------------------------------------------------- drivers
def _add(case: Case, fns, state, data=None, shape: Optional[tuple] = None):
    """One add of a batch of `shape` (drawn from `data` if not given), checked whole."""
    if shape is None:
        shape = data.draw(st.sampled_from(case.batch_shapes), label="add batch shape")
    ids = case.steps.new(shape)
    state, can = fns.add(state, case.steps.tree(ids))
    before = set(case.model.valid_items())
    case.model.add(case.to_rows(ids))
    if case.model.prioritised and set(case.model.valid_items()) - before:
        fractional = case.model.max_priority != int(case.model.max_priority)
        event(f"items entered with a fractional max priority: {fractional}")
    check_storage(case, state)
    if case.model.prioritised:
        check_priorities(case, state)
    assert bool(can) == case.model.can_sample(), "can_sample after add"
    return state


def _check_refuses_early_sample(case: Case, state) -> None:
    """Sampling what cannot be sampled raises ValueError in an eager call."""
    try:
        case.buffer.sample(state, jax.random.key(0))
    except ValueError as e:
        assert "can_sample" in str(e)
    else:
        raise AssertionError("sample() of a buffer that cannot be sampled did not raise")


def _until_sampleable(case: Case, fns, state):
    """Adds batches (of the first batch shape, each checked like any add) until the model can
    sample, so that every example ends with a support check. Terminates: once the rows have
    been written over, every valid item is new and has a positive priority (the largest
    recorded, >= 1), and the minimum length is met."""
    m = case.model
    event(f"sampleable after the random operations: {m.can_sample()}")
    steps_per_add = math.prod(case.batch_shapes[0]) // m.rows or 1
    for _ in range(-(-(m.capacity + m.min_length + m.sequence_length) // steps_per_add) + 1):
        if m.can_sample():
            return state
        state = _add(case, fns, state, shape=case.batch_shapes[0])
    raise AssertionError(f"the model still cannot sample after {m.written} steps per row")


def _check_support(case: Case, sample_fn, state, prioritised: bool) -> None:
    """Over many draws every item that should be reachable is reached, and nothing else is:
    uniform, every valid item; prioritised, every item of probability at least
    10 / draws (a miss then has chance below e^-10). The state must be sampleable (see
    `_until_sampleable`): a support check that is skipped proves nothing."""
    m = case.model
    assert m.can_sample(), "the support check needs a sampleable state"
    items = set(m.valid_items())
    n_calls, b = 200, case.buffer.core.sample_batch_size
    if prioritised:
        p = m.probabilities()
        need = {it for it in items if p[m.leaf(*it)] >= 10 / (n_calls * b)}
    else:
        need = items
    seen: set = set()
    for seed in range(n_calls):
        out = sample_fn(state, jax.random.key(seed))
        experience = out[0].experience if prioritised else out.experience
        firsts = np.asarray(case.first_id(jax.device_get(experience))).tolist()
        seen.update(m.find(i) for i in firsts)
        if need <= seen:
            break
    assert seen <= items, f"sampled invalid items {sorted(seen - items)}"
    assert need <= seen, f"never sampled {sorted(need - seen)} of {len(items)} valid items"


def run_uniform(case: Case, data) -> None:
    """Random adds and samples; after every add the whole state and can_sample are compared
    with the model, and every sampled item must be a valid item with exactly its data."""
    fns = uniform_fns(case.buffer)
    state = fns.init(case.steps.example())
    check_storage(case, state)
    checked_early = False
    for _ in range(data.draw(st.integers(6, 24), label="number of operations")):
        if data.draw(st.sampled_from(("add", "add", "sample")), label="op") == "add":
            state = _add(case, fns, state, data)
        elif case.model.can_sample():
            sample = fns.sample(state, jax.random.key(data.draw(SEEDS, label="key")))
            check_sampled_items(case, sample.experience)
        elif not checked_early:
            _check_refuses_early_sample(case, state)
            checked_early = True
    state = _until_sampleable(case, fns, state)
    _check_support(case, fns.sample, state, prioritised=False)
    _events(case)


PRIORITY_VALUES = st.one_of(
    st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.5, 3.75, 7.25]),  # fractional maxima matter
    st.floats(2.0**-13, 10.0, width=32),
)
BAD_PRIORITY_VALUES = st.sampled_from([-1.0, float("nan"), float("inf")])


def run_prioritised(case: Case, data) -> None:
    """Random adds, samples and set_priorities (from the latest or an older, possibly stale,
    sample; or random indices with duplicates, out-of-range indices, bad values and random
    versions). After every step the whole state, every tree node, max_priority and
    can_sample are compared with the model; every sample is checked item by item."""
    fns = prioritised_fns(case.buffer)
    m = case.model
    b = case.buffer.core.sample_batch_size
    state = fns.init(case.steps.example())
    template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                            jax.eval_shape(case.buffer.sample, state, jax.random.key(0)))
    samples = []
    checked_early = False
    ops = ("add",) * 4 + ("sample",) * 2 + ("set",) * 2 + ("set_random",)
    for _ in range(data.draw(st.integers(10, 30), label="number of operations")):
        op = data.draw(st.sampled_from(ops), label="op")
        if op == "add":
            state = _add(case, fns, state, data)
            continue
        if op == "sample":
            if not m.can_sample():
                if not checked_early:
                    _check_refuses_early_sample(case, state)
                    checked_early = True
                continue
            out = fns.sample(state, jax.random.key(data.draw(SEEDS, label="key")))
            check_prioritised_sample(case, *out)
            samples.append(jax.device_get(out[0]))
            continue
        if op == "set":
            if not samples:
                continue
            sample = data.draw(st.sampled_from(samples), label="sample to update")
            values = data.draw(st.lists(PRIORITY_VALUES, min_size=b, max_size=b),
                               label="priorities")
        else:
            n = len(m.leaves)
            indices = data.draw(st.lists(st.integers(-1, n), min_size=b, max_size=b),
                                label="indices")
            versions = []
            for i in indices:
                item = m.item_at_leaf(i) if 0 <= i < n else None
                current = m.version(item[1]) if item else 0
                versions.append(data.draw(st.sampled_from(
                    [current, current, current - m.capacity, current + m.period]),
                    label="version"))
            values = data.draw(st.lists(st.one_of(PRIORITY_VALUES, BAD_PRIORITY_VALUES),
                                        min_size=b, max_size=b), label="priorities")
            sample = template.replace(indices=np.asarray(indices, np.int32),
                                      versions=np.asarray(versions, np.int32))
        values = np.asarray(values, np.float32)
        state, can = fns.set_priorities(state, sample, values)
        m.set_priorities(sample.indices.tolist(), values.tolist(), sample.versions.tolist())
        check_storage(case, state)
        check_priorities(case, state)
        assert bool(can) == m.can_sample(), "can_sample after set_priorities"
    state = _until_sampleable(case, fns, state)
    _check_support(case, fns.sample, state, prioritised=True)
    _events(case)


def _events(case: Case) -> None:
    """Coverage statistics (pytest --hypothesis-show-statistics)."""
    m = case.model
    event(f"time axis filled {min(m.written // m.capacity, 3)}+ times")
