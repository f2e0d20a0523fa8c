"""Quickstart: the prioritised flat buffer, as in Flashbax's quickstart, with flax_replay.

The Flashbax notebook runs unchanged apart from the import (and `jax.tree_map`, gone from
JAX, spelled `jax.tree.map`). It calls `make_prioritised_n_step_buffer` positionally, a
factory Flashbax documents but never released; here it exists, with `n_step=1` by default, so
this is a prioritised flat buffer of (t, t + 1) transitions.

Then the same steps with the buffer as Flax state: a Linen module (collections "replay" and
"priorities") and an NNX module (`Replay` and `Priorities` Variables). All three views run the
same pure functions, so with the same keys they draw the same indices.

    python examples/quickstart_prioritised_flat_buffer.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import flax_replay as fbx

# First define hyper-parameters of the buffer.
max_length = 32  # Maximum number of experiences stored in the state.
min_length = 8  # Minimum number of experiences stored before we can sample.
sample_batch_size = 4  # Batch size of experience sampled from the buffer.
# The buffer is sampled with probability proportional to priority ** priority_exponent.
priority_exponent = 0.6
add_sequences = False  # We add single steps, not sequences ...
add_batch_size = 6  # ... in batches of 6 (one per environment).


def functional() -> np.ndarray:
    """The seed notebook, cell by cell. Returns the indices of the second sample."""
    buffer = fbx.make_prioritised_n_step_buffer(
        max_length, min_length, sample_batch_size, add_sequences, add_batch_size, priority_exponent
    )
    rng_key = jax.random.PRNGKey(0)

    # Initialise the state from one fake timestep (its tree structure, shapes and dtypes).
    fake_timestep = {"obs": jnp.array([5, 4]), "reward": jnp.array(1.0)}
    state = buffer.init(fake_timestep)

    # Fill the buffer above its minimum length. New items get the largest priority set so far.
    fake_batch = jax.tree.map(lambda x: jnp.stack([x + i for i in range(add_batch_size)]),
                              fake_timestep)
    state = buffer.add(state, fake_batch)
    assert buffer.can_sample(state) == False  # noqa: E712  (after one batch: not yet)
    state = buffer.add(state, fake_batch)
    assert buffer.can_sample(state)  # now it can

    # Sample: a PrioritisedSample with `experience` (an ExperiencePair of `first` and `second`
    # with a leading batch axis), `indices`, `priorities` (= p ** priority_exponent), and, new
    # here, `probabilities` and `versions` (for ignoring stale priority updates).
    rng_key, rng_subkey = jax.random.split(rng_key)
    batch = buffer.sample(state, rng_subkey)

    # Adjust priorities, usually to abs(td_error) of the sampled items.
    new_priorities = jnp.ones_like(batch.priorities) + 10007  # fake new priorities
    state = buffer.set_priorities(state, batch.indices, new_priorities)

    print(batch.__dict__.keys())
    print(f"indices: {batch.indices}")
    print(f"priorities: {batch.priorities}")
    print(f"experience keys: {batch.experience.first.keys()}")
    print(f"experience keys: {batch.experience.second.keys()}")
    print(f"obs shape: {batch.experience.first['obs'].shape}")

    # Sampled again, the items carry the new priorities.
    rng_key, rng_subkey = jax.random.split(rng_key)
    batch = buffer.sample(state, rng_subkey)
    print(batch.__dict__.keys())
    print(f"indices: {batch.indices}")
    # The seed printed 251.30885: float32 `pow` on TPU. On CPU, float32 gives 251.30925, the
    # correctly rounded 10008 ** float32(0.6) (float32(0.6) = 0.6000000238...); the exact
    # 10008 ** 0.6 is 251.309194 (float64). The buffer stores float32 priorities, so the sample
    # shows the float32 value.
    print(f"priorities: {batch.priorities} == new_priorities**priority_exponent == "
          f"{new_priorities[0]**priority_exponent}")
    print(f"float64: 10008.0 ** {priority_exponent} == {np.float64(10008.0) ** priority_exponent}")
    print(f"experience keys: {batch.experience.first.keys()}")
    print(f"experience keys: {batch.experience.second.keys()}")
    print(f"obs shape: {batch.experience.first['obs'].shape}")

    # The state: `experience` ([add_batch_size, max_length // add_batch_size, ...] per leaf),
    # `current_index`, `is_full`, `running_index` (steps written per row, never wrapped) and
    # `priority_state` (sum tree, min tree, max priority).
    print(state.__dict__.keys())
    print(state.experience.keys())
    print(state.experience["obs"].shape)  # (6, 5, 2) = (add_batch_size, 32 // 6, *obs.shape)
    return np.asarray(batch.indices)


def setup():
    """The notebook's buffer, fake timestep and fake batch, for the module views below."""
    buffer = fbx.make_prioritised_n_step_buffer(
        max_length, min_length, sample_batch_size, add_sequences, add_batch_size, priority_exponent
    )
    fake_timestep = {"obs": jnp.array([5, 4]), "reward": jnp.array(1.0)}
    fake_batch = jax.tree.map(lambda x: jnp.stack([x + i for i in range(add_batch_size)]),
                              fake_timestep)
    return buffer, fake_timestep, fake_batch


def linen() -> np.ndarray:
    """The same steps with the buffer as Linen state."""
    buffer, fake_timestep, fake_batch = setup()
    replay = fbx.linen.ReplayBuffer(buffer=buffer, experience=fake_timestep)
    variables = replay.init(jax.random.PRNGKey(0))  # {"replay": ..., "priorities": ...}
    for _ in range(2):
        _, variables = replay.apply(variables, fake_batch, method="add",
                                    mutable=["replay", "priorities"])
    assert replay.apply(variables, method="can_sample")

    rng_key = jax.random.PRNGKey(0)
    rng_key, rng_subkey = jax.random.split(rng_key)
    batch = replay.apply(variables, rng_subkey, method="sample")  # reading needs no mutation
    new_priorities = jnp.ones_like(batch.priorities) + 10007
    _, updated = replay.apply(variables, batch.indices, new_priorities, method="set_priorities",
                              mutable=["priorities"])
    variables = {**variables, **updated}

    rng_key, rng_subkey = jax.random.split(rng_key)
    batch = replay.apply(variables, rng_subkey, method="sample")
    print(f"linen collections: {list(variables.keys())}")
    print(f"linen replay: {list(variables['replay'].keys())}")
    print(f"linen priorities: {list(variables['priorities'].keys())}")
    print(f"linen indices: {batch.indices}")
    print(f"linen priorities: {batch.priorities}")
    print(f"linen obs shape: {batch.experience.first['obs'].shape}")
    print(f"linen experience shape: {variables['replay']['experience']['obs'].shape}")
    return np.asarray(batch.indices)


def nnx_module() -> np.ndarray:
    """The same steps with the buffer as NNX state, updated in place."""
    buffer, fake_timestep, fake_batch = setup()
    replay = fbx.nnx.ReplayBuffer(buffer, fake_timestep)

    @nnx.jit(donate_argnums=0)  # donated: the storage is written in place
    def add(replay, batch):
        replay.add(batch)

    add(replay, fake_batch)
    assert not replay.can_sample()
    add(replay, fake_batch)
    assert replay.can_sample()

    rng_key = jax.random.PRNGKey(0)
    rng_key, rng_subkey = jax.random.split(rng_key)
    batch = replay.sample(rng_subkey)
    replay.set_priorities(batch.indices, jnp.ones_like(batch.priorities) + 10007)

    rng_key, rng_subkey = jax.random.split(rng_key)
    batch = replay.sample(rng_subkey)
    print(f"nnx Replay: {sorted(nnx.state(replay, fbx.Replay).keys())}")
    print(f"nnx Priorities: {sorted(nnx.state(replay, fbx.Priorities).keys())}")
    print(f"nnx indices: {batch.indices}")
    print(f"nnx priorities: {batch.priorities}")
    print(f"nnx obs shape: {batch.experience.first['obs'].shape}")
    print(f"nnx experience shape: {replay.experience.get_value()['obs'].shape}")
    return np.asarray(batch.indices)


def main() -> None:
    indices = functional()
    print()
    assert np.array_equal(linen(), indices)
    print()
    assert np.array_equal(nnx_module(), indices)
    print("\nfunctional, Linen and NNX drew the same indices")


if __name__ == "__main__":
    main()
