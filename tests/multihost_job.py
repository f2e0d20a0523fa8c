"""One process of a multi-process run of a sharded buffer (tests/test_multihost.py starts two).

    python tests/multihost_job.py --process-id I --num-processes N --port PORT --dir DIR

Each process holds `jax.local_device_count()` host devices (XLA_FLAGS from the caller); with
`jax.distributed.initialize` they form one global mesh. Every process adds its own rows
(`jax.make_array_from_process_local_data`), samples in both modes, sets priorities, and saves
and restores the sharded buffer with Orbax; process 0 writes the gathered global state and
samples to DIR/result.npz for the caller to check against what was added.

Row r, step t holds obs = [r, t] and step = 100 r + t, so anyone can tell what belongs where.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

ROWS, ADD_LEN, ADDS, T = 8, 2, 4, 6  # 8 steps written per row into 6: the time axis wraps


def experience_of(rows: np.ndarray, steps: np.ndarray) -> dict:
    """The steps `steps` of rows `rows`: leaves `[len(rows), len(steps), ...]`."""
    r, t = np.meshgrid(rows, steps, indexing="ij")
    return {"obs": np.stack([r, t], -1).astype(np.float32), "step": (100 * r + t).astype(np.int32)}


def priority_of(index: np.ndarray) -> np.ndarray:
    return (1.0 + (index * 7) % 5).astype(np.float32)


def make_buffer(sampling: str = "stratified"):
    import flax_replay

    return flax_replay.make_prioritised_trajectory_buffer(
        add_batch_size=ROWS, sample_batch_size=8, sample_sequence_length=2, period=1,
        min_length_time_axis=2, max_length_time_axis=T, priority_exponent=0.5,
        sampling=sampling)


def example():
    import jax
    import jax.numpy as jnp

    return {"obs": jax.ShapeDtypeStruct((2,), jnp.float32),
            "step": jax.ShapeDtypeStruct((), jnp.int32)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", required=True)
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    import jax

    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}",
                               num_processes=args.num_processes, process_id=args.process_id,
                               initialization_timeout=60)
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from jax.experimental import multihost_utils
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import flax_replay
    from flax_replay import sharding as frs

    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Explicit,))
    local_buffer = frs.shard(make_buffer(), mesh, "data", "local")
    global_buffer = frs.shard(make_buffer(), mesh, "data", "global")
    state = local_buffer.init(example())

    # The rows this process's devices hold: it adds exactly those.
    rows_sharding = NamedSharding(mesh, P("data"))
    index_map = rows_sharding.addressable_devices_indices_map((ROWS, ADD_LEN))
    mine = sorted({r for idx in index_map.values() for r in range(*idx[0].indices(ROWS))})
    assert mine == list(range(mine[0], mine[-1] + 1)), mine  # a contiguous block
    add = jax.jit(local_buffer.add, donate_argnums=0)
    for a in range(ADDS):
        steps = np.arange(a * ADD_LEN, (a + 1) * ADD_LEN)
        local = experience_of(np.array(mine), steps)
        batch = jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(
                rows_sharding, x, (ROWS,) + x.shape[1:]), local)
        state = add(state, batch)

    def gather(x):  # a global array, whole, on every process
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    out = {}
    for name, buf in (("local", local_buffer), ("global", global_buffer)):
        sample = jax.jit(buf.sample)(state, jax.random.key(7))
        for field in ("indices", "probabilities", "versions"):
            out[f"{name}_{field}"] = gather(getattr(sample, field))
        out[f"{name}_step"] = gather(sample.experience["step"])
        if name == "local":
            new = jnp.asarray(priority_of(out["local_indices"]))
            new = jax.device_put(new, NamedSharding(mesh, P("data")))
            state = jax.jit(buf.set_priorities)(state, sample.indices, new, sample.versions)

    saved = flax_replay.to_collections(state)
    path = os.path.join(args.dir, "checkpoint")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, saved)
    checkpointer.wait_until_finished()
    target = flax_replay.to_collections(local_buffer.abstract_state(example()))
    restored = checkpointer.restore(path, target)
    same = jax.tree.map(lambda a, b: bool(np.array_equal(gather(a), gather(b))), saved, restored)
    assert all(jax.tree.leaves(same)), same
    shardings = jax.tree.map(lambda x: x.sharding.spec, restored)
    assert shardings == jax.tree.map(lambda x: x.sharding.spec, saved), shardings

    flat = jax.tree_util.tree_flatten_with_path(saved)[0]
    for path_, leaf in flat:
        out["state" + jax.tree_util.keystr(path_)] = gather(leaf)
    if jax.process_index() == 0:
        np.savez(os.path.join(args.dir, "result.npz"), **out)
    multihost_utils.sync_global_devices("done")
    print(f"process {jax.process_index()}: rows {mine}, {jax.device_count()} devices, OK",
          flush=True)


if __name__ == "__main__":
    main()
