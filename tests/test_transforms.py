"""Buffers under JAX transformations: `jit` with the state donated (the add is in place: the
input arrays are deleted and the compiled add aliases the experience storage), `vmap` over
independent buffers and `pmap` over 2 host devices (both equal to running each buffer alone).
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from buffer_cases import (
    CASES,
    EXAMPLE,
    TRANSFORM_KINDS,
    assert_trees_equal,
    keys,
    make_batch,
    new_priorities,
    single,
    stack,
    unstack,
)

# `input_output_alias={ {0}: (0, {}, may-alias), ... }` in the compiled HLO: output {i} reuses
# parameter j. jax 0.10 on CPU prints `may-alias` for donated buffers.
_ALIAS = re.compile(r"\{(\d+)\}: \((\d+), \{\}, (?:may|must)-alias\)")


def aliases(compiled) -> dict[int, int]:
    """{output index: parameter index} of a compiled function's input/output aliases."""
    text = compiled.as_text()
    header = next(line for line in text.splitlines() if line.startswith("HloModule"))
    assert "input_output_alias" in header, header[:300]
    return {int(o): int(p) for o, p in _ALIAS.findall(header)}


def n_experience_leaves(state) -> int:
    return len(jax.tree.leaves(state.experience))


def run_script(kind: str, fns: dict, example, batches: list, rngs: list, priorities=None):
    """The same operations for every execution mode: three adds, a sample, (set priorities and
    sample again) — the queue: add, add, sample, add, sample. Returns (state, samples)."""
    state = fns["init"](example)
    samples = []
    if CASES[kind].queue:
        state = fns["add"](state, batches[0])
        state = fns["add"](state, batches[1])
        state, s = fns["sample"](state)
        samples.append(s)
        state = fns["add"](state, batches[2])
        state, s = fns["sample"](state)
        samples.append(s)
        return state, samples
    for b in batches:
        state = fns["add"](state, b)
    samples.append(fns["sample"](state, rngs[0]))
    if CASES[kind].prioritised:
        s = samples[0]
        p = new_priorities(s) if priorities is None else priorities
        state = fns["set_priorities"](state, s.indices, p)
        samples.append(fns["sample"](state, rngs[1]))
    return state, samples


# ------------------------------------------------------------------------------ jit + donate
@pytest.mark.parametrize("kind", TRANSFORM_KINDS)
def test_jit_donated_add_is_in_place(kind):
    case = CASES[kind]
    buf, ref = case.buffer, single(kind)
    batch = make_batch(case, 1)
    state = buf.init(EXAMPLE)
    compiled = jax.jit(buf.add, donate_argnums=0).lower(state, batch).compile()
    # An eagerly initialised state: its fields must be distinct buffers to be donatable.
    state = compiled(state, make_batch(case, 0))
    expected = ref["add"](state, batch)  # not donated: the reference
    n = n_experience_leaves(state)
    alias = aliases(compiled)
    # The state is the first argument, experience its first field: parameters 0..n-1, and the
    # new experience is outputs 0..n-1. Each must reuse its own input buffer.
    for i in range(n):
        assert alias.get(i) == i, f"experience leaf {i} not aliased: {alias}"
    # Every state leaf is donated and reused (the indices too), so nothing is copied.
    assert set(alias) == set(range(len(jax.tree.leaves(state)))), alias

    old_leaves = jax.tree.leaves(state)
    pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(state.experience)]
    new_state = compiled(state, batch)
    assert all(x.is_deleted() for x in old_leaves)
    assert [x.unsafe_buffer_pointer() for x in jax.tree.leaves(new_state.experience)] == pointers
    assert_trees_equal(new_state, expected)


def test_set_priorities_jit_donated_aliases_storage():
    case = CASES["prioritised_flat"]
    buf, ref = case.buffer, single("prioritised_flat")
    state = ref["init"](EXAMPLE)
    for i in range(3):
        state = ref["add"](state, make_batch(case, i))
    sample = ref["sample"](state, keys(0))
    prios = new_priorities(sample)
    expected = ref["set_priorities"](state, sample.indices, prios)

    compiled = (
        jax.jit(buf.set_priorities, donate_argnums=0).lower(state, sample.indices, prios).compile()
    )
    alias = aliases(compiled)
    n_state = len(jax.tree.leaves(state))
    # set_priorities does not touch the experience, yet the donated storage is passed through
    # in place (aliased), not copied; the trees are updated in place too.
    assert all(alias.get(i) == i for i in range(n_state)), alias

    old_leaves = jax.tree.leaves(state)
    pointers = [x.unsafe_buffer_pointer() for x in old_leaves]
    new_state = compiled(state, sample.indices, prios)
    assert all(x.is_deleted() for x in old_leaves)
    exp_ptrs = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(new_state.experience)]
    assert exp_ptrs == pointers[: n_experience_leaves(state)]
    assert_trees_equal(new_state, expected)
    # The update did something: the sampled items now have the new priorities.
    got = new_state.priority_state.max_priority
    np.testing.assert_allclose(got, jnp.max(prios))


# ---------------------------------------------------------------------------------- vmap
N_VMAP = 3


@functools.cache
def vmapped(kind: str):
    buf = CASES[kind].buffer
    fns = {"init": jax.jit(jax.vmap(buf.init)), "add": jax.jit(jax.vmap(buf.add))}
    fns["sample"] = jax.jit(jax.vmap(buf.sample))
    if CASES[kind].prioritised:
        fns["set_priorities"] = jax.jit(jax.vmap(buf.set_priorities))
    return fns


def _inputs(kind: str, n: int, seed: int):
    case = CASES[kind]
    # Different examples per buffer only matter through their structure; the batches differ.
    examples = stack([EXAMPLE] * n)
    batches = [make_batch(case, 10 * j, lead=(n,)) for j in range(3)]
    rngs = [keys(seed + j, n) for j in range(2)]
    b = getattr(case.buffer, "core", None)
    b = b.sample_batch_size if b is not None else 1
    priorities = 0.5 + np.arange(n * b, dtype=np.float32).reshape(n, b)  # distinct per buffer
    return examples, batches, rngs, priorities


def _reference(kind: str, n: int, batches: list, rngs: list, priorities):
    """Each buffer run alone with the jitted single-buffer functions, then stacked."""
    runs = [
        run_script(kind, single(kind), EXAMPLE, [b[i] for b in _unstacked(batches, n)],
                   [k[i] for k in rngs], priorities[i])
        for i in range(n)
    ]
    states = stack([r[0] for r in runs])
    samples = [stack([r[1][j] for r in runs]) for j in range(len(runs[0][1]))]
    return states, samples


def _unstacked(batches: list, n: int) -> list:
    return [unstack(b, n) for b in batches]


@pytest.mark.parametrize("kind", TRANSFORM_KINDS)
def test_vmap_equals_independent_buffers(kind):
    examples, batches, rngs, prios = _inputs(kind, N_VMAP, seed=1)
    state, samples = run_script(kind, vmapped(kind), examples, batches, rngs, prios)
    ref_state, ref_samples = _reference(kind, N_VMAP, batches, rngs, prios)
    assert_trees_equal(state, ref_state)
    assert len(samples) == len(ref_samples)
    for s, r in zip(samples, ref_samples):
        assert_trees_equal(s, r)
    # The buffers really are independent: different batches, different contents.
    exp = jax.tree.leaves(state.experience)[0]
    assert not np.array_equal(exp[0], exp[1])


# ---------------------------------------------------------------------------------- pmap
N_DEV = 2


@functools.cache
def pmapped(kind: str):
    buf = CASES[kind].buffer
    devices = jax.devices()[:N_DEV]
    pmap = functools.partial(jax.pmap, devices=devices)
    fns = {"init": pmap(buf.init), "add": pmap(buf.add, donate_argnums=0)}
    fns["sample"] = pmap(buf.sample)
    if CASES[kind].prioritised:
        fns["set_priorities"] = pmap(buf.set_priorities, donate_argnums=0)
    return fns


@pytest.mark.parametrize("kind", TRANSFORM_KINDS)
def test_pmap_equals_each_device_alone(kind):
    assert len(jax.devices()) >= N_DEV, "tests/conftest.py sets 8 host devices"
    examples, batches, rngs, prios = _inputs(kind, N_DEV, seed=2)
    fns = pmapped(kind)
    state = fns["init"](examples)
    # One buffer per device, as in the Flashbax quickstarts.
    leaf = jax.tree.leaves(state.experience)[0]
    assert {s.device for s in leaf.addressable_shards} == set(jax.devices()[:N_DEV])
    # The donated add consumes its input on every device.
    old = jax.tree.leaves(state)
    state = fns["add"](state, batches[0])
    assert all(x.is_deleted() for x in old)

    state, samples = run_script(kind, fns, examples, batches, rngs, prios)
    ref_state, ref_samples = _reference(kind, N_DEV, batches, rngs, prios)
    assert_trees_equal(state, ref_state)
    for s, r in zip(samples, ref_samples):
        assert_trees_equal(s, r)
