"""Every public name of Flashbax 0.1.3's modules exists at the same path under flax_replay
(`flashbax.buffers.trajectory_buffer.BufferState` ->
`flax_replay.buffers.trajectory_buffer.BufferState`), except the ones listed in `ABSENT` with
the reason. The list of Flashbax's names is read from the installed package, not written
here, so a name Flashbax has and we lack fails this test."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import types

import pytest

flashbax = pytest.importorskip("flashbax")

MODULES = ("", ".utils", ".buffers", ".buffers.flat_buffer", ".buffers.trajectory_buffer",
           ".buffers.item_buffer", ".buffers.trajectory_queue",
           ".buffers.prioritised_flat_buffer", ".buffers.prioritised_trajectory_buffer",
           ".buffers.prioritised_item_buffer", ".buffers.mixer", ".buffers.sum_tree",
           ".vault")

_VALIDATION = ("argument checks of Flashbax's factories; ours check the same arguments inside "
               "the make_* factories and raise ValueError naming them")
ABSENT = {
    "flashbax.vault": {"vault": "the implementation module flashbax.vault.vault; user code "
                       "imports Vault from flashbax.vault, as from flax_replay.vault"},
    "flashbax.buffers.flat_buffer": {
        "validate_flat_buffer_args": _VALIDATION,
        "validate_max_length_add_batch_size": _VALIDATION, "validate_min_length": _VALIDATION,
        "validate_sample_batch_size": _VALIDATION},
    "flashbax.buffers.item_buffer": {
        "validate_item_buffer_args": _VALIDATION,
        "validate_min_length": _VALIDATION, "validate_sample_batch_size": _VALIDATION},
    "flashbax.buffers.trajectory_buffer": {
        "validate_size": _VALIDATION, "validate_trajectory_buffer_args": _VALIDATION},
    "flashbax.buffers.trajectory_queue": {"validate_trajectory_queue_args": _VALIDATION},
    "flashbax.buffers.prioritised_flat_buffer": {
        "validate_device": _VALIDATION, "validate_flat_buffer_args": _VALIDATION,
        "validate_priority_exponent": _VALIDATION},
    "flashbax.buffers.prioritised_item_buffer": {
        "validate_device": _VALIDATION,
        "validate_item_buffer_args": _VALIDATION, "validate_priority_exponent": _VALIDATION},
    "flashbax.buffers.prioritised_trajectory_buffer": {
        "validate_device": _VALIDATION, "validate_priority_exponent": _VALIDATION,
        "validate_trajectory_buffer_args": _VALIDATION,
        "get_invalid_indices": (
            "the item slots a sample must avoid, from Flashbax's earlier masking (its add and "
            "sample no longer call it); ours zero those leaves on add (PrioritisedCore.add)")},
    "flashbax.buffers.mixer": {
        "can_sample_mixer_fn": "Flashbax's helpers behind make_mixer; our Mixer's methods",
        "sample_mixer_fn": "Flashbax's helpers behind make_mixer; our Mixer's methods"},
}


def public_names(module: types.ModuleType) -> set[str]:
    """Names a user can import from `module`: not private, and defined by Flashbax (not
    `jax`, `chex`, `typing`, ... re-exported by its imports)."""
    out = set()
    for name in dir(module):
        if name.startswith("_") or name == "TYPE_CHECKING":
            continue
        value = getattr(module, name)
        if isinstance(value, types.ModuleType):
            if value.__name__.startswith("flashbax"):
                out.add(name)
            continue
        origin = getattr(value, "__module__", None) or ""
        if origin.startswith("flashbax") or (not inspect.isroutine(value)
                                            and not inspect.isclass(value)
                                            and origin == ""):
            out.add(name)
    return out


@pytest.mark.parametrize("suffix", MODULES)
def test_flashbax_names_exist_under_flax_replay(suffix):
    theirs = importlib.import_module("flashbax" + suffix)
    ours = importlib.import_module("flax_replay" + suffix)
    absent = ABSENT.get("flashbax" + suffix, {})
    names = public_names(theirs)
    if suffix == "" and importlib.util.find_spec("flashbax.vault") is not None:
        names.add("vault")  # a subpackage Flashbax ships (imported on demand)
    missing = sorted(n for n in names - set(absent) if not hasattr(ours, n))
    assert not missing, f"flax_replay{suffix} lacks Flashbax's {missing}"
    # The absence list names only real Flashbax names that we really lack.
    assert set(absent) <= names, sorted(set(absent) - names)
    present = sorted(n for n in absent if hasattr(ours, n))
    assert not present, f"listed as absent but present: {present}"


def test_module_functions_agree_with_flashbax():
    """The module-level functions with Flashbax's signatures, on the same data: the queue is
    deterministic (same contents), the trajectory buffer's sample is random (same shapes,
    and every sampled sequence is a stored one starting on the period grid)."""
    import jax
    import numpy as np

    import flax_replay as fr

    fb = flashbax
    example = {"x": np.zeros((2,), np.float32)}
    data = {"x": np.arange(2 * 6 * 2, dtype=np.float32).reshape(2, 6, 2)}
    for lib in (fb, fr):
        q = lib.trajectory_queue
        s = q.add(q.init(example, 2, 8), data)
        assert bool(q.can_sample(s, 4, 8)) and not bool(q.can_add(s, 4, 8))
        s, out = q.sample(s, 4)
        np.testing.assert_array_equal(np.asarray(out.experience["x"]), data["x"][:, :4])
        assert not bool(q.can_sample(s, 4, 8))
        t = lib.trajectory_buffer
        st = t.add(t.init(example, 2, 8), data)
        assert not bool(t.can_sample(st, 7)) and bool(t.can_sample(st, 6))
        np.testing.assert_array_equal(np.asarray(lib.utils.get_timestep_count(st)), 12)
        smp = t.sample(st, jax.random.PRNGKey(0), 5, 3, 2)
        seqs = np.asarray(smp.experience["x"])
        assert seqs.shape == (5, 3, 2)
        if lib is fr:  # our grid: starts at 0, 2 (a sequence of 3 must end by step 6)
            for seq in seqs:
                row, start = divmod(int(seq[0, 0]) // 2, 6)
                assert start % 2 == 0
                np.testing.assert_array_equal(seq, data["x"][row, start:start + 3])
    assert fr.utils.get_tree_shape_prefix(data, 2) == fb.utils.get_tree_shape_prefix(data, 2)
    f = fr.utils.add_dim_to_args(lambda s, x: x["x"].shape)
    assert f(None, data) == fb.utils.add_dim_to_args(lambda s, x: x["x"].shape)(None, data)


def test_sum_tree_functions_agree_with_flashbax():
    """`buffers.sum_tree` over our exact tree: a tree from `init` has Flashbax's node layout,
    so after the same writes (integer values: every sum exact) the nodes are Flashbax's."""
    import jax
    import numpy as np

    import flax_replay as fr

    fb = flashbax
    index = np.array([3, 0, 9, 3, 5], np.int32)  # a repeat: the last occurrence wins
    values = np.array([2.0, 7.0, 1.0, 4.0, 0.0], np.float32)
    trees = []
    for lib in (fb, fr):
        t = lib.buffers.sum_tree
        s = t.set_batch_scan(t.init(10), index, values)
        s = t.set_non_batched(s, 12, 6.0)
        assert (s.tree_depth, s.capacity) == (4, 10)
        assert float(s.nodes[t.get_tree_index(s.tree_depth, 3)]) == 4.0
        np.testing.assert_array_equal(t.get_batch(s, index), [4.0, 7.0, 1.0, 4.0, 0.0])
        np.testing.assert_allclose(t.get_probability(s, 0), 7.0 / 18.0, rtol=1e-6)
        assert float(s.max_recorded_priority) == 7.0
        drawn = t.stratified_sample(s, 6, jax.random.PRNGKey(0))
        assert np.all(np.asarray(t.get(s, drawn)) > 0)
        assert int(t.sample(s, query_value=0.99)) == 12  # the last positive leaf
        trees.append(np.asarray(s.nodes))
    np.testing.assert_array_equal(trees[1], trees[0])


def test_prioritised_module_functions_agree_with_flashbax():
    """`prioritised_init/add/sample` and `set_priorities(state, i, p, exponent, device)`: the
    same leaves and `max_recorded_priority` (after the exponent) as Flashbax's on the same
    data, and a buffer's state takes its own exponent."""
    import jax
    import numpy as np

    import flax_replay as fr

    example = {"x": np.zeros((), np.float32)}
    data = {"x": np.arange(2 * 6, dtype=np.float32).reshape(2, 6)}
    leaves = []
    for lib in (flashbax, fr):
        m = lib.buffers.prioritised_trajectory_buffer
        s = m.prioritised_add(m.prioritised_init(example, 2, 8, 2), data, 3, 2, "cpu")
        smp = m.prioritised_sample(s, jax.random.PRNGKey(0), 4, 3, 2)
        assert smp.experience["x"].shape == (4, 3)
        # Valid items start at 0 and 2 in each row: leaves 0, 1, 4, 5.
        idx = np.array([0, 5, 4], np.int32)
        s = m.set_priorities(s, idx, np.array([4.0, 0.0, 9.0], np.float32), 0.5, "cpu")
        assert float(s.sum_tree_state.max_recorded_priority) == 3.0  # 9 ** 0.5
        leaves.append(np.asarray(lib.buffers.sum_tree.get(s.sum_tree_state, np.arange(8))))
        s = m.prioritised_add(s, {"x": data["x"][:, :2]}, 3, 2, "cpu")  # item 2 enters
        assert float(lib.buffers.sum_tree.get(s.sum_tree_state, 2)) == 3.0
    np.testing.assert_allclose(leaves[1], leaves[0], rtol=1e-6)
    np.testing.assert_allclose(leaves[1], [2.0, 1.0, 0, 0, 3.0, 0.0, 0, 0], rtol=1e-6)

    buffer = fr.make_prioritised_trajectory_buffer(2, 4, 3, 2, 3, max_length_time_axis=8,
                                                   priority_exponent=0.5)
    s = buffer.add(buffer.init(example), data)
    s = fr.buffers.prioritised_trajectory_buffer.set_priorities(
        s, np.array([1], np.int32), np.array([16.0], np.float32), 0.5, "cpu")
    assert float(s.sum_tree_state.max_recorded_priority) == 4.0
    with pytest.raises(ValueError, match="priority_exponent=0.5, got priority_exponent=0.6"):
        fr.buffers.prioritised_trajectory_buffer.set_priorities(
            s, np.array([1], np.int32), np.array([1.0], np.float32), 0.6, "cpu")
