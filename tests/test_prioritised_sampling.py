"""Prioritised sampling draws item i with probability p_i**alpha / sum_j p_j**alpha (chi-square
against an independent bookkeeping of the items), through wrap-around, overwrites and priority
updates; importance weights; stale and invalid priority updates are ignored."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import flax_replay as fbx

from one_row import add_steps, leaf_values, one_row_buffer

ALPHA = 0.6
ROWS, T = 2, 24  # make_prioritised_flat_buffer(max_length=48, add_batch_size=2)
DRAWS = 2000  # sample calls per chi-square test, of 32 each
CHUNK = 6  # steps per add


class Reference:
    """Independent bookkeeping of a prioritised flat buffer (period 1, items of L = 2 steps):
    which (row, start) items are stored and their raw priorities."""

    def __init__(self, rows, t, alpha, seq_len=2):
        self.rows, self.t, self.alpha, self.seq_len = rows, t, alpha, seq_len
        self.written = 0
        self.priority = {}  # (row, absolute start) -> raw priority
        self.max_priority = 1.0

    def starts(self):
        return range(max(self.written - self.t, 0), self.written - self.seq_len + 1)

    def add(self, steps):
        before = set(self.starts())
        self.written += steps
        now = set(self.starts())
        for r in range(self.rows):
            for s in before - now:
                del self.priority[r, s]
            for s in now - before:
                self.priority[r, s] = self.max_priority

    def item_at(self, leaf):
        row, slot = divmod(int(leaf), self.t)
        return next(((row, s) for s in self.starts() if s % self.t == slot), None)

    def set(self, leaves, priorities, versions=None):
        for i, (leaf, p) in enumerate(zip(leaves, priorities)):
            item = self.item_at(leaf)
            if item is None or (versions is not None and versions[i] != item[1]):
                continue
            self.priority[item] = float(p)
            self.max_priority = max(self.max_priority, float(p))

    def leaf_weights(self):
        """float64 `[rows * t]`: p**alpha of the item in each leaf, 0 for an empty leaf."""
        w = np.zeros(self.rows * self.t)
        for (r, s), p in self.priority.items():
            w[r * self.t + s % self.t] = p ** self.alpha
        return w


def make(sampling):
    return fbx.make_prioritised_flat_buffer(
        max_length=ROWS * T, min_length=1, sample_batch_size=32, add_sequences=True,
        add_batch_size=ROWS, priority_exponent=ALPHA, sampling=sampling,
    )


def steps(start, n):
    """`[ROWS, n]` steps whose obs encodes (row, absolute time): row * 1000 + t."""
    t = np.arange(start, start + n)
    return {"obs": jnp.asarray(np.arange(ROWS)[:, None] * 1000 + t[None], jnp.int32)}


@functools.lru_cache(maxsize=None)
def jitted(sampling):
    """`(buffer, add, set_priorities, draw)`, jitted once per module (shared by the tests);
    `draw(state, key)` is a PrioritisedSample of DRAWS x 32 items, one vmapped call."""
    buffer = make(sampling)
    draw = jax.jit(lambda state, key: jax.vmap(lambda k: buffer.sample(state, k))(
        jax.random.split(key, DRAWS)))
    return (buffer, jax.jit(buffer.add, donate_argnums=0),
            jax.jit(buffer.set_priorities, donate_argnums=0), draw)


def chi_square(counts, weights, label):
    """p-value of the sampled `counts` per leaf against `weights / sum`; fails outright if a
    leaf of weight 0 was drawn."""
    assert counts[weights == 0].sum() == 0, f"{label}: drew leaves of zero weight"
    keep = weights > 0
    expected = weights[keep] / weights[keep].sum() * counts.sum()
    assert expected.min() >= 5, "too few draws for a chi-square test"
    p = stats.chisquare(counts[keep], expected).pvalue
    print(f"{label}: chi-square p = {p:.4f} over {keep.sum()} items, {counts.sum()} draws")
    return p


def check_distribution(draw, state, ref, key, label):
    sample = draw(state, key)
    idx = np.asarray(sample.indices).ravel()
    versions = np.asarray(sample.versions).ravel()
    # Each sampled index names the item whose experience came back.
    row, slot = np.divmod(idx, T)
    np.testing.assert_array_equal(versions % T, slot)
    first = np.asarray(sample.experience.first["obs"]).ravel()
    np.testing.assert_array_equal(first, row * 1000 + versions)
    np.testing.assert_array_equal(np.asarray(sample.experience.second["obs"]).ravel(), first + 1)
    weights = ref.leaf_weights()
    np.testing.assert_allclose(np.asarray(sample.priorities).ravel(), weights[idx], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(sample.probabilities).ravel(),
                               weights[idx] / weights.sum(), rtol=1e-5)
    counts = np.bincount(idx, minlength=ROWS * T)
    assert chi_square(counts, weights, label) > 1e-3
    # The same draws against the raw priorities (alpha ignored) must be rejected: the test
    # has the power to see a wrong exponent.
    wrong = np.where(weights > 0, weights ** (1 / ALPHA), 0)
    assert chi_square(counts, wrong, label + " vs p**1 (must fail)") < 1e-3


@pytest.mark.parametrize("sampling", ["stratified", "independent"])
def test_sampling_matches_priorities_through_overwrites_and_updates(sampling):
    buffer, add, set_priorities, draw = jitted(sampling)
    ref = Reference(ROWS, T, ALPHA)
    rng = np.random.default_rng(0)
    state = buffer.init({"obs": jnp.int32(0)})
    for written in range(0, 30, CHUNK):  # W = 30 > T = 24: the time axis has wrapped
        state = add(state, steps(written, CHUNK))
        ref.add(CHUNK)
    # Priorities for every leaf, including the empty and broken ones (ignored there).
    leaves = rng.permutation(ROWS * T)
    prio = rng.uniform(0.05, 5.0, leaves.size).astype(np.float32)
    state = set_priorities(state, jnp.asarray(leaves, jnp.int32), jnp.asarray(prio))
    ref.set(leaves, prio)
    check_distribution(draw, state, ref, jax.random.key(1), f"{sampling}, wrapped")

    # Overwrites: 6 items per row break, 6 new ones enter at the max priority so far.
    state = add(state, steps(30, CHUNK))
    ref.add(CHUNK)
    check_distribution(draw, state, ref, jax.random.key(2), f"{sampling}, overwritten")

    # Updates of a random subset, some to 0 (never drawn again) and some to empty leaves.
    leaves = rng.choice(ROWS * T, 20, replace=False)
    prio = rng.uniform(0.0, 8.0, leaves.size).astype(np.float32)
    prio[:3] = 0.0
    state = set_priorities(state, jnp.asarray(leaves, jnp.int32), jnp.asarray(prio))
    ref.set(leaves, prio)
    np.testing.assert_allclose(float(state.priority_state.max_priority), ref.max_priority)
    check_distribution(draw, state, ref, jax.random.key(3), f"{sampling}, updated")


# -------------------------------------------------------------------- importance weights
def test_importance_weights_buffer_and_batch():
    buffer, add, set_priorities, draw = jitted("stratified")
    ref = Reference(ROWS, T, ALPHA)
    rng = np.random.default_rng(5)
    state = buffer.init({"obs": jnp.int32(0)})
    for written in range(0, 18, CHUNK):
        state = add(state, steps(written, CHUNK))
        ref.add(CHUNK)
    leaves = rng.permutation(ROWS * T)
    prio = rng.uniform(0.1, 3.0, leaves.size).astype(np.float32)
    state = set_priorities(state, jnp.asarray(leaves), jnp.asarray(prio))
    ref.set(leaves, prio)
    sample = jax.tree.map(lambda x: x[0], draw(state, jax.random.key(0)))  # one batch of 32
    idx = np.asarray(sample.indices)
    w = ref.leaf_weights()
    n = (w > 0).sum()
    probs = w / w.sum()
    for beta in (0.4, 1.0):
        # Schaul et al.: w_i = (N * P(i))**-beta, normalised by the largest weight.
        raw = (n * probs[idx]) ** -beta
        largest_in_buffer = ((n * probs[w > 0]) ** -beta).max()
        got = buffer.importance_weights(state, sample, beta)  # normalise="buffer" by default
        np.testing.assert_allclose(got, raw / largest_in_buffer, rtol=1e-5)
        got = buffer.importance_weights(state, sample, beta, normalise="batch")
        np.testing.assert_allclose(got, raw / raw.max(), rtol=1e-5)
        assert float(np.max(got)) == 1.0
    with pytest.raises(ValueError, match="normalise"):
        buffer.importance_weights(state, sample, 0.4, normalise="global")


# ------------------------------------------------------------- stale and invalid updates


def test_stale_updates_are_ignored_and_fresh_ones_apply():
    buffer = one_row_buffer()
    state = add_steps(buffer, buffer.init({"x": jnp.zeros(())}), range(16))  # items 0..14
    sample = buffer.sample(state, jax.random.key(0), batch_size=64)
    np.testing.assert_array_equal(np.unique(sample.indices), np.arange(15))
    np.testing.assert_array_equal(sample.versions, sample.indices)  # first lap: s == slot
    state = add_steps(buffer, state, range(16, 19))
    # W = 19: items 0, 1, 2 are gone; 15, 16, 17 are new (in slots 15, 0, 1) at max priority
    # 1; slot 2 will hold item 18, not complete yet.
    np.testing.assert_array_equal(leaf_values(buffer, state), [1, 1, 0] + [1] * 13)
    # Stale entries (items 0..2) carry a huge priority: it must neither land nor count as max.
    v = np.asarray(sample.versions)
    new_p = jnp.asarray(np.where(v < 3, 1000.0, 10.0 + v), jnp.float32)
    state = buffer.set_priorities(state, sample, new_p)
    expected = np.array([1, 1, 0, *range(13, 25), 1], np.float64) ** 0.5
    np.testing.assert_allclose(leaf_values(buffer, state), expected, rtol=1e-6)
    assert float(state.priority_state.max_priority) == 24.0
    # The same update given bare indices (no versions) is taken at its word, as in Flashbax:
    # slots 0 and 1 now hold items 16 and 17, and they get the priority.
    state2 = buffer.set_priorities(state, sample.indices, new_p)
    np.testing.assert_allclose(leaf_values(buffer, state2)[:2], [1000.0 ** 0.5] * 2, rtol=1e-6)
    assert leaf_values(buffer, state2)[2] == 0  # still no valid item there
    # ignore_stale_priorities=False: versions are accepted but not enforced.
    lax = fbx.make_prioritised_flat_buffer(max_length=16, min_length=1, sample_batch_size=4,
                                           priority_exponent=0.5, ignore_stale_priorities=False)
    state3 = lax.set_priorities(state, sample, new_p)
    np.testing.assert_allclose(leaf_values(lax, state3), leaf_values(buffer, state2), rtol=1e-6)


def test_updates_to_invalid_items_are_ignored():
    buffer = one_row_buffer()
    state = buffer.init({"x": jnp.zeros(())})
    # Nothing written: no leaf holds an item.
    empty = buffer.set_priorities(state, jnp.arange(16), jnp.full(16, 3.0))
    np.testing.assert_array_equal(empty.priority_state.sum_tree, state.priority_state.sum_tree)
    np.testing.assert_array_equal(empty.priority_state.min_tree, state.priority_state.min_tree)
    assert float(empty.priority_state.max_priority) == 1.0
    state = add_steps(buffer, state, range(3))  # W = 3: items start at 0 and 1
    state = buffer.set_priorities(state, jnp.array([1, 2, 5, 15]), jnp.array([4.0, 9.0, 9.0, 9.0]))
    np.testing.assert_allclose(leaf_values(buffer, state), [1, 2] + [0] * 14, rtol=1e-6)
    assert float(state.priority_state.max_priority) == 4.0
    assert float(state.priority_state.min_tree[0]) == 1.0
    # Broken by wrap-around: after 17 steps item 0 is gone and slot 0 waits for item 16.
    state = add_steps(buffer, state, range(3, 17))
    state = buffer.set_priorities(state, jnp.array([0]), jnp.array([50.0]))
    assert leaf_values(buffer, state)[0] == 0 and float(state.priority_state.max_priority) == 4.0
