"""Checkpoint and resume a run, buffer included, with `orbax.checkpoint.CheckpointManager`.

    from flax_replay import checkpoint as ckpt
    manager = ckpt.make_manager(ckpt.default_directory("dqn"))    # <repo>/checkpoints/dqn
    if ckpt.latest_step(manager) is not None:
        state, rng, start = ckpt.restore(manager, state, rng)    # state: template TrainState
    for step in range(start, total):
        state, rng = train_step(state, rng)                      # jitted, state donated
        ckpt.save(manager, step + 1, state, rng)                 # async, every save_interval
    manager.wait_until_finished()

    params = ckpt.restore_params(manager, state.params)          # evaluation: params only

One checkpoint step holds the items params, opt_state, replay, priorities, rng, step; a
restore compares the checkpoint's metadata with the template and refuses another buffer
capacity, leaf structure, shape, dtype or buffer configuration with a ValueError naming it,
and verifies what it read (checksums recorded at save, the buffer's invariants): a damaged
step is a CheckpointError naming the step, item and leaf. `save(..., metadata={...})` stores
a run's own record (e.g. its flags) with the step; `run_metadata(manager)` reads it back.
NNX: `save_nnx` / `restore_nnx(manager, model, optimizer, rng)` (restored in place).
"""

from flax_replay._src.checkpoint import (
    ITEMS,
    CheckpointError,
    UnverifiedCheckpointWarning,
    check_compatible,
    default_directory,
    latest_step,
    make_manager,
    restore,
    restore_nnx,
    restore_params,
    run_metadata,
    save,
    save_nnx,
)

__all__ = [
    "ITEMS", "CheckpointError", "check_compatible", "default_directory", "latest_step",
    "make_manager", "restore", "restore_nnx", "restore_params", "run_metadata", "save",
    "save_nnx", "UnverifiedCheckpointWarning",
]
