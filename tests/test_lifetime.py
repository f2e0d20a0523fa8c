"""A buffer lives forever: int32 step counters never overflow (issue 12, part 2).

Prioritised buffers count the steps written per row in `running_index`; it is kept below
`counter_modulus + T` (M, a multiple of T, about 2**30) by subtracting multiples of M, and a
sample's `versions` are start times modulo M. Two kinds of test:

* Real adds past 2**31 steps per row (one row, whole-axis adds inside a jitted `fori_loop`)
  for the buffers whose adds are cheap per step: the prioritised and uniform trajectory
  buffers (few items per row) and the queue. Sampling, `set_priorities`, the stale-update
  guard across a reduction of the counter, and a checkpoint save/restore at that point.
* The reference-model property test of every prioritised kind (trajectory, flat, item) with
  M lowered to a few times T, so that the counter is reduced many times in a short random
  sequence of adds, samples and (stale) `set_priorities`: the same code that runs at 2**30.
  (A real 2**31-step run of an item or flat buffer writes one sum-tree leaf per step, about a
  minute here: too slow for the suite.)
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_property_uniform import FLAT_POOL, ITEM_POOL, TRAJECTORY_POOL

import flax_replay as fbx
from flax_replay import checkpoint
from flax_replay._src import sum_tree
from flax_replay._src.state import from_collections, to_collections

import property_helpers as ph

T = 2 ** 20          # steps per row (one row)
P = 2 ** 18          # period: 4 items per row, so an add touches at most 4 sum-tree leaves
L = 8                # sequence length
BIG = 2 ** 31
# A step's data is its absolute time modulo 2**32 (int32 arithmetic wraps), which names it
# uniquely within any window of T steps.
MOD = 2 ** 32
DTYPE = jnp.int32


def _trajectory(prioritised: bool):
    kw = dict(add_batch_size=1, sample_batch_size=16, sample_sequence_length=L, period=P,
              min_length_time_axis=L, max_length_time_axis=T)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # period > sample_sequence_length
        if prioritised:
            return fbx.make_prioritised_trajectory_buffer(**kw, priority_exponent=1.0)
        return fbx.make_trajectory_buffer(**kw)


def _steps(start: int, a: int) -> jax.Array:
    """`[1, a]` data of absolute steps start..start+a-1 (modulo 2**32)."""
    return ((jnp.uint32(start % MOD) + jnp.arange(a, dtype=jnp.uint32)).astype(DTYPE))[None]


@jax.jit
def _fill(state, n_adds, start):
    """`n_adds` whole-axis adds of the steps from absolute time `start` (uint32 `[]`)."""
    buf = _BUFFERS[type(state).__name__]

    def body(i, s):
        first = start + jnp.uint32(T) * i.astype(jnp.uint32)
        x = (first + jnp.arange(T, dtype=jnp.uint32)).astype(DTYPE)[None]
        return buf.add(s, {"t": x})

    return jax.lax.fori_loop(0, n_adds, body, state)


_BUFFERS = {"PrioritisedTrajectoryBufferState": _trajectory(True),
            "TrajectoryBufferState": _trajectory(False)}
# Jitted (an eager call of a 2**20-step buffer compiles every operation on its own).
_add = jax.jit(lambda state, x: _BUFFERS[type(state).__name__].add(state, {"t": x}))
_sample = jax.jit(lambda state, key, b: _BUFFERS[type(state).__name__].sample(state, key, b),
                  static_argnums=2)
_set = jax.jit(lambda state, sample, p: _BUFFERS[type(state).__name__].set_priorities(
    state, sample, p))


def _absolute_starts(t_data: np.ndarray, written: int) -> list[int]:
    """The absolute start time of each sampled sequence, from its first step's data (the
    absolute time modulo 2**32): the one in the valid window [W - T, W - L]."""
    out = []
    for v in np.asarray(t_data).astype(np.int64):
        s = written - L - ((written - L - v) % MOD)
        out.append(int(s))
    return out


def _check_sample(sample, written: int) -> list[int]:
    """Every sequence is L consecutive steps of a valid item on the period grid."""
    data = np.asarray(sample.experience["t"]).astype(np.int64)
    np.testing.assert_array_equal((data - data[:, :1]) % MOD,
                                  np.broadcast_to(np.arange(L), data.shape))
    starts = _absolute_starts(data[:, 0], written)
    for s in starts:
        assert s % P == 0 and written - T <= s <= written - L, (s, written)
    return starts


def test_prioritised_trajectory_buffer_past_2_31_steps(tmp_path):
    buf = _BUFFERS["PrioritisedTrajectoryBufferState"]
    m = buf.core.counter_modulus
    assert m == 2 ** 30 and m % T == 0
    state = buf.init({"t": jnp.zeros((), DTYPE)})
    # 2**31 real steps: 2048 whole-axis adds (the counter is reduced once on the way).
    state = _fill(state, BIG // T, jnp.uint32(0))
    written = BIG
    assert int(state.running_index) == m          # W = 2M, held as M (< M + T)
    # Three period-long adds: W = 2**31 + 3P, held as M + T - P.
    for _ in range(3):
        state = _add(state, _steps(written, P))
        written += P
    assert int(state.running_index) == m + T - P
    assert bool(buf.can_sample(state))
    sample = _sample(state, jax.random.key(0), 16)
    starts = _check_sample(sample, written)
    np.testing.assert_array_equal(sample.versions % m, np.asarray(starts) % m)
    # Crossing the reduction: the next period-long add rewrites only the oldest slot.
    state = _add(state, _steps(written, P))
    written += P
    assert int(state.running_index) == T          # reduced by M; still reads as full
    new_p = 0.5 + 0.25 * np.asarray(sample.indices, np.float32)
    before = sum_tree.leaves(state.priority_state.sum_tree, buf.core.tree_geometry)
    state = _set(state, sample, new_p)
    leaves = np.asarray(sum_tree.leaves(state.priority_state.sum_tree, buf.core.tree_geometry))
    for idx, p, s in zip(np.asarray(sample.indices), new_p, starts):
        if s >= written - T:   # still stored: the update applies across the reduction
            assert leaves[idx] == pytest.approx(p), (idx, s)
        else:                  # its slot was rewritten: the stale update is ignored
            assert leaves[idx] == before[idx] == 1.0, (idx, s)
    assert {s >= written - T for s in starts} == {True, False}, "both cases must occur"
    # Sampling is still right, and the new priorities are drawn.
    sample = _sample(state, jax.random.key(1), 64)
    _check_sample(sample, written)
    np.testing.assert_allclose(sample.probabilities,
                               leaves[np.asarray(sample.indices)] / leaves.sum(), rtol=1e-6)
    # A checkpoint at this point restores the same state, which keeps working.
    cols = to_collections(state)
    train = fbx.TrainState.create(apply_fn=None, params={"w": jnp.ones(2)}, tx=optax.sgd(0.1),
                                  replay=cols["replay"], priorities=cols["priorities"])
    manager = checkpoint.make_manager(tmp_path, enable_async=False)
    assert checkpoint.save(manager, 1, train, jax.random.key(0))
    template = jax.tree.map(jnp.zeros_like, train)
    back, _, step = checkpoint.restore(checkpoint.make_manager(tmp_path), template,
                                       jax.random.key(1))
    restored = from_collections(state, {"replay": back.replay,
                                              "priorities": back.priorities})
    assert step == 1
    jax.tree.map(np.testing.assert_array_equal, restored, state)
    restored = _fill(restored, 2, jnp.uint32(written % MOD))
    written += 2 * T
    _check_sample(_sample(restored, jax.random.key(2), 16), written)


def test_uniform_trajectory_buffer_past_2_31_steps():
    buf = _BUFFERS["TrajectoryBufferState"]
    state = buf.init({"t": jnp.zeros((), DTYPE)})
    state = _fill(state, BIG // T + 1, jnp.uint32(0))
    written = BIG + T
    state = _add(state, _steps(written, P + 3))
    written += P + 3
    assert bool(buf.can_sample(state))
    _check_sample(_sample(state, jax.random.key(0), 64), written)


def test_queue_past_2_31_steps():
    half = T // 2
    queue = fbx.make_trajectory_queue(T, 1, half, half)
    state = queue.init({"t": jnp.zeros((), DTYPE)})

    @jax.jit
    def cycle(state, n):
        def body(i, carry):
            s, ok = carry
            x = (i.astype(jnp.uint32) * jnp.uint32(half)
                 + jnp.arange(half, dtype=jnp.uint32)).astype(DTYPE)[None]
            s = queue.add(s, {"t": x})
            s, out = queue.sample(s)
            return s, ok & jnp.all(out.experience["t"] == x)

        return jax.lax.fori_loop(0, n, body, (state, jnp.bool_(True)))

    n = BIG // half + 2
    state, ok = cycle(state, n)
    assert bool(ok), "a read did not return the steps just written (FIFO order)"
    assert not bool(queue.can_sample(state)) and bool(queue.can_add(state))
    written = n * half
    x = _steps(written, half)
    state = queue.add(state, {"t": x})
    state, out = queue.sample(state)
    np.testing.assert_array_equal(out.experience["t"], x)


# --------------------------------------------- every prioritised kind, counter reduced often
def _lowered(case: ph.Case, k: int) -> ph.Case:
    """The case with the counter reduced modulo k * T (k >= 1) in the buffer and the model."""
    core = case.buffer.core
    assert core.max_length_time_axis == case.model.capacity
    core = dataclasses.replace(core, counter_span=k * core.max_length_time_axis)
    case.buffer = dataclasses.replace(case.buffer, core=core)
    case.model.counter_modulus = core.counter_modulus
    return case


PRIO = dict(priority_exponent=0.6)
# M = k * T: k = 1 (every slot's version repeats after one overwrite: a stale update of a slot
# rewritten once is applied, as documented) and k = 2. Two configurations per kind, each
# compiled once; the operation sequences are free (compilation dominates the cost).
FEW = settings(max_examples=10)


def _pairs(pool):
    return st.sampled_from([(pool[0], 1), (pool[1], 2)])


@FEW
@given(cfg=_pairs(TRAJECTORY_POOL), seed=ph.SEEDS, data=st.data())
def test_prioritised_trajectory_buffer_with_reduced_counter(cfg, seed, data):
    ph.run_prioritised(_lowered(ph.trajectory_case(cfg[0], PRIO, seed=seed), cfg[1]), data)


@FEW
@given(cfg=_pairs(FLAT_POOL), seed=ph.SEEDS, data=st.data())
def test_prioritised_flat_buffer_with_reduced_counter(cfg, seed, data):
    ph.run_prioritised(_lowered(ph.transition_case(cfg[0], PRIO, seed=seed), cfg[1]), data)


@FEW
@given(cfg=_pairs(ITEM_POOL), seed=ph.SEEDS, data=st.data())
def test_prioritised_item_buffer_with_reduced_counter(cfg, seed, data):
    ph.run_prioritised(_lowered(ph.item_case(cfg[0], PRIO, seed=seed), cfg[1]), data)
