"""Property tests: every prioritised buffer against the NumPy reference.

Random adds (overwrites included), samples and `set_priorities` calls: with a sample's own
indices and versions (the latest sample, or an older one whose slots may have been rewritten),
and with random indices (duplicates, out-of-range indices, zero / negative / NaN / infinite
priorities, current and stale versions) under jit, where bad entries must be ignored. After
every step the stored experience, every sum-tree and min-tree node, max_priority,
running_index and can_sample are compared with `reference.py`; every sample is checked item by
item (valid, positive priority, exact data, indices, versions, priorities, probabilities,
importance weights, the stratified slice it was drawn from), and the n-step buffer's returns
and discounts against a direct NumPy computation around episode ends.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from test_property_uniform import (
    FLAT_POOL,
    ITEM_POOL,
    N_STEP_POOL,
    TRAJECTORY_POOL,
    item_configs,
    trajectory_configs,
    transition_configs,
)

import property_helpers as ph

# Paired with the pools' configurations in order (default profile): exponents 0 (every
# positive or zero priority weighs 1), fractional and 1; tree branching 2 and 3 (deep trees
# over a few leaves) and the default; both sampling schemes; stale updates applied or not.
PRIORITY_POOL = [
    dict(priority_exponent=0.6),
    dict(priority_exponent=1.0, branching=2),
    dict(priority_exponent=0.0, sampling="independent", branching=3),
    dict(priority_exponent=0.35, branching=2, ignore_stale_priorities=False),
]

priority_options = st.fixed_dictionaries(dict(
    priority_exponent=st.sampled_from([0.0, 0.35, 0.6, 1.0]),
    branching=st.sampled_from([2, 3, 16]),
    sampling=st.sampled_from(["stratified", "independent"]),
    ignore_stale_priorities=st.booleans(),
))


def _paired(pool, full):
    """(config, priority options): the pools zipped in the default profile, free if thorough.
    (The layouts' variants are all covered by the uniform tests; three configurations of the
    prioritised flat, item and n-step buffers keep the compile time down.)"""
    pairs = list(zip(pool, PRIORITY_POOL[len(PRIORITY_POOL) - len(pool):]))
    return ph.pick(pairs, st.tuples(full, priority_options))


@given(cfg=_paired(TRAJECTORY_POOL, trajectory_configs()), seed=ph.SEEDS, data=st.data())
def test_prioritised_trajectory_buffer_matches_reference(cfg, seed, data):
    ph.run_prioritised(ph.trajectory_case(*cfg, seed=seed), data)


@given(cfg=_paired(FLAT_POOL[1:], transition_configs()), seed=ph.SEEDS, data=st.data())
def test_prioritised_flat_buffer_matches_reference(cfg, seed, data):
    ph.run_prioritised(ph.transition_case(*cfg, seed=seed), data)


@given(cfg=_paired(ITEM_POOL[1:], item_configs()), seed=ph.SEEDS, data=st.data())
def test_prioritised_item_buffer_matches_reference(cfg, seed, data):
    ph.run_prioritised(ph.item_case(*cfg, seed=seed), data)


@given(cfg=_paired(N_STEP_POOL[1:], transition_configs(n_step=True)), seed=ph.SEEDS,
       data=st.data())
def test_prioritised_n_step_buffer_matches_reference(cfg, seed, data):
    ph.run_prioritised(ph.transition_case(*cfg, seed=seed), data)
