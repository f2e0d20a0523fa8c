"""Property tests: the uniform buffers and the trajectory queue against the NumPy reference.

Random sequences of add / sample / can_sample with random batch shapes; after every add the
whole state (experience, current_index, is_full) and can_sample are compared with
`reference.py`, and every sampled item must be a currently valid item carrying exactly that
item's data (each step's leaves encode a unique id). At the end, repeated sampling must reach
every valid item and nothing else. See `property_helpers.py` for the machinery.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import flax_replay as fbx

import property_helpers as ph
import reference

# ------------------------------------------------------------------------- configurations
# Keys: R rows (add_batch_size), T max_length_time_axis, L sample_sequence_length, P period,
# min min_length_time_axis, B sample_batch_size, shape item shape, A add sequence lengths.
TRAJECTORY_POOL = [
    dict(R=2, T=8, L=3, P=2, min=4, B=4, shape=(2,), A=(1, 3)),
    dict(R=1, T=6, L=1, P=3, min=0, B=3, shape=(), A=(2, 6)),  # period > L; whole-axis adds
    dict(R=3, T=10, L=4, P=3, min=10, B=2, shape=(1, 3), A=(1, 5)),  # T rounded down to 9
    dict(R=2, T=5, L=5, P=1, min=2, B=1, shape=(), A=(1, 2)),  # L = T: one item per row
]


@st.composite
def trajectory_configs(draw):
    p = draw(st.integers(1, 3))
    cap = p * draw(st.integers(1, 4))
    lengths = draw(st.lists(st.integers(1, cap), min_size=1, max_size=2))
    return dict(R=draw(st.integers(1, 3)), T=cap + draw(st.integers(0, p - 1)),
                L=draw(st.integers(1, cap - p + 1)), P=p, min=draw(st.integers(0, cap)),
                B=draw(st.integers(1, 5)), shape=draw(st.sampled_from(ph.SHAPES)),
                A=tuple(sorted(set(lengths))))


# max / min: max_length / min_length; R: add_batch_size (None = no batch axis); seq:
# add_sequences; n, gamma, end_key: n-step buffers.
FLAT_POOL = [
    dict(max=5, min=3, B=3, seq=False, R=None, shape=(2,), A=(1,)),
    dict(max=12, min=4, B=2, seq=True, R=3, shape=(), A=(1, 3)),
    dict(max=9, min=0, B=4, seq=False, R=2, shape=(1, 3), A=(1,)),  # 9 // 2 = 4 per row
    dict(max=6, min=5, B=1, seq=True, R=None, shape=(), A=(2, 6)),  # sample only when full
]

N_STEP_POOL = [
    dict(max=10, min=2, B=3, seq=True, R=2, n=2, gamma=0.9, end_key="done", shape=(),
         A=(1, 3)),
    dict(max=6, min=0, B=2, seq=False, R=None, n=3, gamma=0.5, end_key="done", end_dtype=bool,
         shape=(2,), A=(1,)),
    dict(max=9, min=4, B=4, seq=True, R=None, n=1, gamma=0.99, end_key="done", shape=(),
         A=(2, 4)),
    dict(max=12, min=0, B=2, seq=False, R=3, n=2, gamma=0.8, end_key="discount", shape=(),
         A=(1,)),
]


@st.composite
def transition_configs(draw, n_step: bool = False):
    r = draw(st.sampled_from([None, 1, 2, 3]))
    rows = r or 1
    n = draw(st.integers(1, 3)) if n_step else 1
    t = draw(st.integers(n + 1, 6))
    max_length = rows * t + draw(st.integers(0, rows - 1))
    seq = draw(st.booleans())
    lengths = draw(st.lists(st.integers(1, t), min_size=1, max_size=2)) if seq else [1]
    cfg = dict(max=max_length, min=draw(st.integers(0, rows * (t - 1))),
               B=draw(st.integers(1, min(5, max_length))), seq=seq, R=r,
               shape=draw(st.sampled_from(ph.SHAPES)), A=tuple(sorted(set(lengths))))
    if n_step:
        cfg.update(n=n, gamma=draw(st.sampled_from([0.5, 0.9, 0.99])),
                   end_key=draw(st.sampled_from(["done", "discount"])),
                   end_dtype=draw(st.sampled_from([np.float32, bool])))
    return cfg


# dims: leading shapes of an add batch ([batch?, sequence?]), flattened into the one row.
ITEM_POOL = [
    dict(max=6, min=1, B=2, seq=False, batches=False, shape=(2,), dims=((),)),
    dict(max=7, min=3, B=3, seq=True, batches=True, shape=(), dims=((2, 2), (1, 3))),
    dict(max=5, min=0, B=5, seq=True, batches=False, shape=(1, 3), dims=((1,), (5,))),
    dict(max=4, min=4, B=1, seq=False, batches=True, shape=(), dims=((3,),)),
]


@st.composite
def item_configs(draw):
    max_length = draw(st.integers(1, 8))
    seq, batches = draw(st.booleans()), draw(st.booleans())
    dims = set()
    for _ in range(draw(st.integers(1, 2))):
        shape = ()
        for _ in range(int(seq) + int(batches)):
            shape += (draw(st.integers(1, max(1, max_length // max(1, np.prod(shape))))),)
        if int(np.prod(shape)) <= max_length:
            dims.add(shape)
    return dict(max=max_length, min=draw(st.integers(0, max_length)),
                B=draw(st.integers(1, min(5, max_length))), seq=seq, batches=batches,
                shape=draw(st.sampled_from(ph.SHAPES)), dims=tuple(sorted(dims)) or ((1,) * (
                    int(seq) + int(batches)),))


# T max_length_time_axis, R add_batch_size, A add_sequence_length, L sample_sequence_length,
# lengths: the add lengths used.
QUEUE_POOL = [
    dict(T=6, R=2, A=2, L=3, shape=(), lengths=(2, 1)),
    dict(T=5, R=1, A=5, L=1, shape=(2,), lengths=(5,)),
    dict(T=7, R=3, A=3, L=2, shape=(1, 3), lengths=(3, 1)),
    dict(T=4, R=1, A=1, L=4, shape=(), lengths=(1, 3)),
]


@st.composite
def queue_configs(draw):
    t = draw(st.integers(1, 7))
    a = draw(st.integers(1, t))
    return dict(T=t, R=draw(st.integers(1, 3)), A=a, L=draw(st.integers(1, t)),
                shape=draw(st.sampled_from(ph.SHAPES)),
                lengths=tuple(sorted({a, draw(st.integers(1, t))})))


# --------------------------------------------------------------------------------- tests
@given(cfg=ph.pick(TRAJECTORY_POOL, trajectory_configs()), seed=ph.SEEDS, data=st.data())
def test_trajectory_buffer_matches_reference(cfg, seed, data):
    ph.run_uniform(ph.trajectory_case(cfg, seed=seed), data)


@given(cfg=ph.pick(FLAT_POOL, transition_configs()), seed=ph.SEEDS, data=st.data())
def test_flat_buffer_matches_reference(cfg, seed, data):
    ph.run_uniform(ph.transition_case(cfg, seed=seed), data)


@given(cfg=ph.pick(N_STEP_POOL[:2], transition_configs(n_step=True)), seed=ph.SEEDS,
       data=st.data())
def test_n_step_buffer_matches_reference(cfg, seed, data):
    ph.run_uniform(ph.transition_case(cfg, seed=seed), data)


@given(cfg=ph.pick(ITEM_POOL, item_configs()), seed=ph.SEEDS, data=st.data())
def test_item_buffer_matches_reference(cfg, seed, data):
    ph.run_uniform(ph.item_case(cfg, seed=seed), data)


@functools.lru_cache(maxsize=None)
def _queue_fns(queue):
    def add(state, batch):
        state = queue.add(state, batch)
        return state, queue.can_sample(state), queue.can_add(state)

    def sample(state):
        state, out = queue.sample(state)
        return state, out, queue.can_sample(state), queue.can_add(state)

    return SimpleNamespace(init=jax.jit(queue.init), add=jax.jit(add), sample=jax.jit(sample))


def _check_queue_state(model, steps, state, can_sample, can_add):
    stored = np.array(model.storage(empty=0), dtype=np.int64)
    ph.assert_tree_close(steps.tree(stored), state.experience, "queue experience")
    assert int(state.write_index) == model.write_index
    assert int(state.read_index) == model.read_index
    assert bool(state.is_full) == model.is_full
    assert bool(can_sample) == model.can_sample()
    assert bool(can_add) == model.can_add()


@given(cfg=ph.pick(QUEUE_POOL, queue_configs()), seed=ph.SEEDS, data=st.data())
def test_trajectory_queue_matches_reference(cfg, seed, data):
    """FIFO order, refusal of adds that do not fit (state unchanged under jit, ValueError
    eagerly) and of samples of an under-filled queue, and the stored bytes."""
    queue = ph.quiet(fbx.make_trajectory_queue, max_length_time_axis=cfg["T"],
                     add_batch_size=cfg["R"], add_sequence_length=cfg["A"],
                     sample_sequence_length=cfg["L"])
    fns = _queue_fns(queue)
    model = reference.QueueModel(cfg["R"], cfg["T"], cfg["A"], cfg["L"])
    steps = ph.Steps(cfg["shape"], seed=seed)
    state = fns.init(steps.example())
    eager_checked = set()
    for _ in range(data.draw(st.integers(3, 16), label="number of operations")):
        if data.draw(st.booleans(), label="add?"):
            a = data.draw(st.sampled_from(cfg["lengths"]), label="length")
            batch = steps.tree(steps.new((cfg["R"], a)))
            if not model.can_add(a) and "add" not in eager_checked:
                with pytest.raises(ValueError, match="can_add"):
                    queue.add(state, batch)
                eager_checked.add("add")
            state, can_sample, can_add = fns.add(state, batch)
            model.add(batch["id"].tolist())
        else:
            if not model.can_sample() and "sample" not in eager_checked:
                with pytest.raises(ValueError, match="can_sample"):
                    queue.sample(state)
                eager_checked.add("sample")
            expected = model.sample()
            state, out, can_sample, can_add = fns.sample(state)
            if expected is not None:
                ph.assert_tree_close(steps.tree(np.array(expected)), out.experience,
                                     "queue sample")
        _check_queue_state(model, steps, state, can_sample, can_add)
