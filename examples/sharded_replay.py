"""A prioritised buffer sharded over a mesh of 8 host devices: add, sample in both modes,
set priorities, checkpoint with Orbax and restore, on the same mesh and on 4 devices.

    python examples/sharded_replay.py [--dir checkpoints/sharded_replay]

The same code runs on GPUs/TPUs and on several hosts (see docs/sharding.md): only the mesh
and, on a multi-host cluster, `jax.distributed.initialize()` change.
"""

from __future__ import annotations

import os

# 8 CPU devices: must be set before JAX starts (a real accelerator run leaves this out).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import flax_replay

NUM_ENVS, OBS = 64, 4  # add_batch_size: 8 rows (environments) per device
SHARDS, SLOTS = 8, 100  # devices; time slots per row (max_length / NUM_ENVS)
ITEMS_PER_SHARD = NUM_ENVS // SHARDS * SLOTS  # a flat buffer's item: a start slot in a row


def collectives(jitted, *args) -> str:
    """The cross-device collectives XLA compiled into `jitted(*args)`, with their result
    shapes (per device)."""
    text = jitted.lower(*args).compile().as_text()
    kinds = r"all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter"
    found = re.findall(rf"= (\S+) ({kinds})(?:-start)?\(", text)
    return ", ".join(f"{kind} {shape.split('{')[0]}" for shape, kind in found) or "none"


def total_priority(state) -> float:
    """The sum of all priorities (** exponent): the roots of the per-shard sum trees."""
    return float(np.sum(np.asarray(state.priority_state.sum_tree[:, 0], np.float64)))


def experience_sums(state) -> dict:
    """A checksum of the stored experience: the sum of each leaf."""
    return {k: float(np.sum(np.asarray(v, np.float64))) for k, v in state.experience.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=str(Path(__file__).resolve().parent.parent
                                             / "checkpoints" / "sharded_replay"))
    parser.add_argument("--steps", type=int, default=40,
                        help="environment steps to add, in sequences of 4")
    args = parser.parse_args()
    if args.steps % 4:
        parser.error(f"--steps ({args.steps}) must be a multiple of 4")

    mesh = jax.make_mesh((SHARDS,), ("data",), axis_types=(AxisType.Explicit,))
    buffer = flax_replay.make_prioritised_flat_buffer(
        max_length=NUM_ENVS * SLOTS, min_length=NUM_ENVS * 4, sample_batch_size=256,
        add_sequences=True, add_batch_size=NUM_ENVS, priority_exponent=0.6)
    example = {"obs": jnp.zeros((OBS,), jnp.float32), "reward": jnp.zeros((), jnp.float32),
               "done": jnp.zeros((), bool)}
    local = flax_replay.shard(buffer, mesh, axis="data", sampling="local")
    glob = flax_replay.shard(buffer, mesh, axis="data", sampling="global")

    state = local.init(example)
    print("state layout (global shape, PartitionSpec):")
    for path, x in jax.tree_util.tree_flatten_with_path(flax_replay.to_collections(state))[0]:
        print(f"  {jax.tree_util.keystr(path):45s} {str(x.shape):14s} {x.sharding.spec}")
    # The same layout as Flax metadata, for a buffer inside a Linen model.
    module = flax_replay.linen.ReplayBuffer(buffer=local, experience=example, partition="data")
    specs = nn.get_partition_spec(jax.eval_shape(module.init, jax.random.key(0)))
    print("Linen nn.get_partition_spec, priorities:", specs["priorities"])

    # Acting: each device's environments produce its own rows; `add` touches local memory.
    rows = NamedSharding(mesh, P("data"))
    add = jax.jit(local.add, donate_argnums=0)

    def fake_steps(key, length):
        k1, k2, k3 = jax.random.split(key, 3)
        return jax.device_put({
            "obs": jax.random.normal(k1, (NUM_ENVS, length, OBS)),
            "reward": jax.random.uniform(k2, (NUM_ENVS, length)),
            "done": jax.random.bernoulli(k3, 0.05, (NUM_ENVS, length)),
        }, rows)

    key = jax.random.key(0)
    for i in range(args.steps // 4):
        state = add(state, fake_steps(jax.random.fold_in(key, i), 4))
    print(f"\nadded {args.steps} steps x {NUM_ENVS} envs: current_index "
          f"{int(state.current_index)}, running_index {int(state.running_index)}, is_full "
          f"{bool(state.is_full)}, can_sample {bool(local.can_sample(state))}")
    # Every item that can be sampled (a step and the next) has priority 1 ** 0.6 so far.
    print(f"priority total {total_priority(state)!r}")
    print("experience sums:", experience_sums(state))
    print("collectives in add:", collectives(add, state, fake_steps(key, 4)))

    # Sampling: local (no experience crosses devices) and global (the exact distribution).
    for name, buf in (("local", local), ("global", glob)):
        sample_fn = jax.jit(buf.sample)
        s = sample_fn(state, jax.random.key(1))
        owners = np.asarray(s.indices) // ITEMS_PER_SHARD  # the shard of each item
        p_min, p_max = float(s.probabilities.min()), float(s.probabilities.max())
        print(f"\n{name} sample: first.obs {s.experience.first['obs'].shape} sharded "
              f"{s.experience.first['obs'].sharding.spec}; items per shard "
              f"{np.bincount(owners, minlength=SHARDS)}; probabilities "
              f"{p_min!r}..{p_max!r}")
        if name == "local":  # each device's slice of the batch holds its own shard's items
            print("  shards in each device's slice:", " ".join(
                ",".join(map(str, np.unique(o))) for o in owners.reshape(SHARDS, -1)))
        print(f"  collectives: {collectives(sample_fn, state, jax.random.key(1))}")

    # Learning: new priorities (here |TD error| stand-ins) for the local sample's items.
    s = jax.jit(local.sample)(state, jax.random.key(2))
    td = jnp.abs(s.experience.first["reward"] - s.experience.second["reward"]) + 0.01
    update = jax.jit(local.set_priorities, donate_argnums=0)
    print("\ncollectives in set_priorities:", collectives(update, state, s, td))
    items, first = np.unique(np.asarray(s.indices), return_index=True)  # a batch may repeat
    new = float(np.sum(np.asarray(td, np.float64)[first] ** 0.6))
    state = update(state, s, td)
    print(f"set priorities of {items.size} distinct items, sum of p ** 0.6 {new!r}; "
          f"priority total {total_priority(state)!r}")
    s = jax.jit(local.sample)(state, jax.random.key(3))
    weights = local.importance_weights(state, s, beta=0.4)
    print(f"importance weights of the next sample in {float(weights.min())!r}.."
          f"{float(weights.max())!r}")
    print("max priority per shard", np.round(np.asarray(state.priority_state.max_priority), 3))

    # Checkpoint: the two collections as Orbax items, written by every process.
    cols = flax_replay.to_collections(state)
    with ocp.CheckpointManager(Path(args.dir).resolve()) as manager:
        step = (manager.latest_step() or 0) + 1
        manager.save(step, args=ocp.args.Composite(
            replay=ocp.args.StandardSave(cols["replay"]),
            priorities=ocp.args.StandardSave(cols["priorities"])))
        manager.wait_until_finished()
        print(f"\nsaved step {step} to {args.dir}")

        # Restore into targets that carry this mesh's shardings.
        target = flax_replay.to_collections(local.abstract_state(example))
        restored = manager.restore(step, args=ocp.args.Composite(
            replay=ocp.args.StandardRestore(target["replay"]),
            priorities=ocp.args.StandardRestore(target["priorities"])))
        same = jax.tree.map(lambda a, b: np.array_equal(a, b), cols,
                            {"replay": restored["replay"], "priorities": restored["priorities"]})
        same = jax.tree.leaves(same)
        print(f"restored on 8 devices: {sum(same)} of {len(same)} arrays identical")

        # The same checkpoint on 4 devices: rows regrouped, one sum tree per new shard.
        mesh4 = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Explicit,),
                              devices=jax.devices()[:4])
        four = flax_replay.shard(buffer, mesh4, sampling="global")
        target = flax_replay.to_collections(four.abstract_state(example, num_shards=8))
        restored = manager.restore(step, args=ocp.args.Composite(
            replay=ocp.args.StandardRestore(target["replay"]),
            priorities=ocp.args.StandardRestore(target["priorities"])))
    state_type = type(jax.eval_shape(buffer.init, example))
    state4 = four.reshard(flax_replay.from_collections(state_type, dict(restored)))
    print(f"restored on 4 devices: sum_tree {state4.priority_state.sum_tree.shape}, "
          f"priority total {total_priority(state4)!r}")
    print("experience sums:", experience_sums(state4))
    s4 = jax.jit(four.sample)(state4, jax.random.key(4))
    print("sample on 4 devices:", s4.experience.first["obs"].shape,
          s4.experience.first["obs"].sharding.spec)


if __name__ == "__main__":
    main()
