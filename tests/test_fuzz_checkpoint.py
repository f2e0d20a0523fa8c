"""Fuzz test (issue 12, part 5) with checkpoints: the random valid and invalid operations of
tests/test_fuzz.py, with one more operation mixed in (and run once at the end) that saves the
view's state with `flax_replay.checkpoint` and then

* restores it intact into a fresh, empty buffer of the same view: every leaf is bit-identical
  (values, dtypes, shapes) to what was saved, and so is the rng key;
* flips bytes in the largest data file of one item (as in tests/test_checkpoint_integrity.py)
  and restores again, with the live state as template: a `CheckpointError`, and the live state
  (and, for NNX, the module restored into) is bit-identical to before.

The fuzz then carries on from the restored state, so later adds, samples and priority updates
check it against the NumPy model too. One buffer kind per view (checkpoints cost ~0.5 s each).
"""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import test_fuzz
from flax import nnx
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import flax_replay as fbx
from flax_replay import checkpoint as ckpt
from flax_replay._src.state import from_collections, to_collections

import property_helpers as ph

# One kind per view; between them uniform, prioritised and the queue.
CASES = [("prioritised_flat", "functional"), ("queue", "linen"),
         ("prioritised_trajectory", "nnx")]


def _largest_data_file(item: Path) -> Path:
    """The largest file of an item's OCDBT data (`<item>/d/`, what a restore reads; the
    per-process `ocdbt.process_0/d/` copies are not read once merged), not its JSON metadata,
    which at these small sizes is the item's largest file. Arrays this small share their
    file with the OCDBT index, so the flipped bytes may hit either: both must be refused."""
    return max((p for p in (item / "d").iterdir() if p.is_file()),
               key=lambda p: p.stat().st_size)


def _xor_middle(path: Path, n: int = 16) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, min(mid + n, len(data))):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def _assert_identical(expected: list, tree: Any, what: str) -> None:
    leaves = jax.tree.leaves(tree)
    assert len(leaves) == len(expected), what
    for a, b in zip(expected, leaves):
        b = np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype)
        np.testing.assert_array_equal(a, b, err_msg=what)


# --------------------------------------------- a view's state <-> what checkpoint.py saves
def _train_state(collections: Any) -> fbx.TrainState:
    return fbx.TrainState.create(apply_fn=None, params={"w": jnp.arange(3.0)},
                                 tx=optax.sgd(0.1), replay=dict(collections["replay"]),
                                 priorities=dict(collections.get("priorities", {})))


def _save(view: str, v: Any, buffer: Any, manager, step: int, rng: jax.Array) -> None:
    if view == "functional":
        assert ckpt.save(manager, step, _train_state(to_collections(v)), rng)
    elif view == "linen":
        assert ckpt.save(manager, step, _train_state(v), rng)
    else:
        model, optimizer = _nnx(buffer, v)
        assert ckpt.save_nnx(manager, step, model, optimizer, rng)


def _restore(view: str, template: Any, buffer: Any, manager, rng: jax.Array,
             model: Any = None) -> tuple[Any, jax.Array]:
    """Restores the latest step into `template` (a view's state; for NNX, into `model` if
    given); returns the view's state and the rng key."""
    if view == "nnx":
        model, optimizer = _nnx(buffer, template) if model is None else model
        rng, _ = ckpt.restore_nnx(manager, model, optimizer, rng)
        return nnx.state(model), rng
    cols = to_collections(template) if view == "functional" else template
    new, rng, _ = ckpt.restore(manager, _train_state(cols), rng)
    out = {"replay": new.replay}
    if "priorities" in cols:
        out["priorities"] = new.priorities
    return (from_collections(type(template), out) if view == "functional" else out), rng


def _nnx(buffer: Any, state: nnx.State) -> tuple[Any, Any]:
    """An NNX ReplayBuffer holding (a copy of) `state`, and an optimizer over it."""
    graphdef, _ = nnx.split(_NNX_TEMPLATES[id(buffer)])
    model = nnx.merge(graphdef, jax.tree.map(jnp.array, state))
    return model, nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)


_NNX_TEMPLATES: dict[int, Any] = {}


# ------------------------------------------------------------------- the checkpoint step
def _checkpoint(case: ph.Case, view: str, ops, v: Any, data) -> Any:
    buffer = case.buffer
    example = case.steps.example()
    if view == "nnx":
        _NNX_TEMPLATES.setdefault(id(buffer), fbx.nnx.ReplayBuffer(buffer, example))
    saved = [np.array(x) for x in jax.tree.leaves(v)]
    rng = jax.random.key(data.draw(ph.SEEDS, label="rng"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manager = ckpt.make_manager(root, enable_async=False)
        _save(view, v, buffer, manager, 1, rng)
        manager.close()
        manager = ckpt.make_manager(root, enable_async=False)

        # Intact: into a fresh, empty buffer of the same view.
        fresh = ops.make(example)
        restored, key = _restore(view, fresh, buffer, manager, jax.random.key(0))
        _assert_identical(saved, restored, "intact restore")
        _assert_identical([np.asarray(jax.random.key_data(rng))], jax.random.key_data(key),
                          "the restored rng")
        _assert_identical(saved, v, "the saved state after a save")

        # Damaged: one item's largest data file.
        items = ["replay"] + (["priorities"] if hasattr(buffer, "set_priorities") else [])
        item = data.draw(st.sampled_from(items), label="damaged item")
        target = _largest_data_file(root / "1" / item)
        _xor_middle(target)
        manager.close()
        manager = ckpt.make_manager(root, enable_async=False)
        model = _nnx(buffer, v) if view == "nnx" else None
        with pytest.raises(ckpt.CheckpointError, match="checkpoint step 1"):
            _restore(view, v, buffer, manager, jax.random.key(0), model)
        _assert_identical(saved, v, "the live state after a damaged restore")
        if model is not None:
            _assert_identical(saved, nnx.state(model[0]), "the module after a damaged restore")
        manager.close()
    gc.collect()  # Orbax's abandoned reads: their warnings here, not in a later test
    return restored


@pytest.mark.parametrize("kind, view", CASES)
# No shrinking: every step saves and restores a checkpoint, so shrinking takes minutes.
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(seed=ph.SEEDS, data=st.data())
def test_fuzz_with_checkpoints(kind, view, seed, data):
    test_fuzz._run(kind, view, seed, data, checkpoint=_checkpoint)
