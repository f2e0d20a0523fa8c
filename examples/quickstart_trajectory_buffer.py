"""Quickstart: the trajectory buffer, as in Flashbax's quickstart, with flax_replay.

The Flashbax notebook runs unchanged apart from the import (and `jax.tree_map`, gone from JAX,
spelled `jax.tree.map`): it prints the same keys and shapes. A trajectory buffer keeps
`[add_batch_size, max_length_time_axis]` rows of time steps, FIFO along time, and samples
sequences of `sample_sequence_length` steps that start on a `period` grid.

Then one buffer per device under `jax.pmap` (the 2 fake CPU devices the notebook sets up), and
the same steps with the buffer as Flax state: a Linen module (collection "replay") and an NNX
module (`Replay` Variables). All views run the same pure functions on the same state.

    python examples/quickstart_trajectory_buffer.py
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

# Set up fake devices before JAX starts - we use them with `jax.pmap` below.
DEVICE_COUNT_MOCK = 2
chex.set_n_cpu_devices(DEVICE_COUNT_MOCK)

from flax import nnx  # noqa: E402  (after the device set-up)

import flax_replay as fbx  # noqa: E402  (Flashbax: `import flashbax as fbx`)

# First define hyper-parameters of the buffer.
max_length_time_axis = 32  # Maximum length of the buffer along the time axis.
min_length_time_axis = 16  # Minimum length across the time axis before we can sample.
sample_batch_size = 4  # Batch size of trajectories sampled from the buffer.
add_batch_size = 6  # Batch size of trajectories added to the buffer.
sample_sequence_length = 8  # Sequence length of trajectories sampled from the buffer.
add_sequence_length = 10  # Sequence length of trajectories added to the buffer.
period = 1  # Period at which we sample trajectories from the buffer.

# A unit of experience: it fixes the tree structure, shapes and dtypes of what is stored.
fake_timestep = {"obs": jnp.array([5, 4]), "reward": jnp.array(1.0)}
# `add` takes batches of sequences, `[add_batch_size, add_sequence_length, ...]`.
def broadcast_fn(x):
    return jnp.broadcast_to(x, (add_batch_size, add_sequence_length, *x.shape))


fake_batch_sequence = jax.tree.map(broadcast_fn, fake_timestep)


def make_buffer() -> fbx.Buffer:
    return fbx.make_trajectory_buffer(
        max_length_time_axis=max_length_time_axis,
        min_length_time_axis=min_length_time_axis,
        sample_batch_size=sample_batch_size,
        add_batch_size=add_batch_size,
        sample_sequence_length=sample_sequence_length,
        period=period,
    )


def show(batch, state) -> None:
    """The notebook's prints: the sample, the state, the sample again."""
    print(batch.experience.keys())  # dict_keys(['obs', 'reward'])
    # (4, 8) = (sample_batch_size, sample_sequence_length, *fake_timestep['reward'].shape)
    print(batch.experience["reward"].shape)
    # The state: `experience` (the fake_timestep tree with [add_batch_size,
    # max_length_time_axis] in front), `current_index` (where along time the next add goes) and
    # `is_full` (True once the time axis has wrapped and old data is being overwritten).
    print(state.__dict__.keys())
    print(state.experience.keys())
    # (6, 32, 2) = (add_batch_size, max_length_time_axis, *fake_timestep['obs'].shape)
    print(state.experience["obs"].shape)
    print(batch.experience.keys())
    print(batch.experience["reward"].shape)


def functional() -> None:
    """The seed notebook, cell by cell."""
    print("== functional ==")
    # A Buffer: a frozen dataclass of the pure functions init, add, can_sample and sample.
    buffer = make_buffer()
    state = buffer.init(fake_timestep)

    # Fill the buffer above its minimum length.
    state = buffer.add(state, fake_batch_sequence)
    assert buffer.can_sample(state) == False  # noqa: E712  (10 steps per row: not yet)
    state = buffer.add(state, fake_batch_sequence)
    assert buffer.can_sample(state)  # 20 >= min_length_time_axis

    # Sample: a batch of sequences with the structure of fake_timestep.
    rng_key = jax.random.PRNGKey(0)
    batch = buffer.sample(state, rng_key)
    show(batch, state)


def pmapped() -> None:
    """One independent buffer per device: the same pure functions under `jax.pmap`."""
    print("== pmap ==")
    buffer = make_buffer()
    devices = jax.devices()[:DEVICE_COUNT_MOCK]
    stack = lambda x: jnp.stack([x] * len(devices))
    state = jax.pmap(buffer.init)(jax.tree.map(stack, fake_timestep))
    add = jax.pmap(buffer.add, donate_argnums=0)  # donated: each device's add is in place
    for _ in range(2):
        state = add(state, jax.tree.map(stack, fake_batch_sequence))
    keys = jax.random.split(jax.random.PRNGKey(0), len(devices))
    batch = jax.pmap(buffer.sample)(state, keys)
    print(f"devices: {len(devices)}")
    print(f"pmap experience shape: {state.experience['obs'].shape}")
    print(f"pmap sample shape: {batch.experience['reward'].shape}")


def linen() -> None:
    """The same steps with the buffer as Linen state, in the "replay" collection."""
    print("== linen ==")
    replay = fbx.linen.ReplayBuffer(buffer=make_buffer(), experience=fake_timestep)
    variables = replay.init(jax.random.PRNGKey(0))  # {"replay": {...}}: the empty buffer
    _, variables = replay.apply(variables, fake_batch_sequence, method="add", mutable=["replay"])
    assert replay.apply(variables, method="can_sample") == False  # noqa: E712
    _, variables = replay.apply(variables, fake_batch_sequence, method="add", mutable=["replay"])
    assert replay.apply(variables, method="can_sample")

    batch = replay.apply(variables, jax.random.PRNGKey(0), method="sample")  # no mutation
    show(batch, replay.apply(variables, method="state"))
    print(f"linen collections: {list(variables.keys())}")
    print(f"linen replay: {list(variables['replay'].keys())}")


def nnx_module() -> None:
    """The same steps with the buffer as NNX state, updated in place."""
    print("== nnx ==")
    replay = fbx.nnx.ReplayBuffer(make_buffer(), fake_timestep)

    @nnx.jit(donate_argnums=0)  # donated: the storage is written in place
    def add(replay, batch):
        replay.add(batch)

    add(replay, fake_batch_sequence)
    assert not replay.can_sample()
    add(replay, fake_batch_sequence)
    assert replay.can_sample()

    batch = replay.sample(jax.random.PRNGKey(0))
    show(batch, replay.state())
    print(f"nnx Replay: {sorted(nnx.state(replay, fbx.Replay).keys())}")


def main() -> None:
    functional()
    pmapped()
    linen()
    nnx_module()


if __name__ == "__main__":
    main()
