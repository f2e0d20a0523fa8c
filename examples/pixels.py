"""Pixel observations: store each 84x84 frame once, sample stacks of 4 (DQN on Atari).

A synthetic environment (a bright square moving over a noisy 84x84 uint8 screen, with
episodes of random length) feeds a prioritised 3-step buffer built with
`frame_stack={"obs": 4}`: every `add` carries one frame per step, every sample returns
`first["obs"]` and `second["obs"]` as `[B, 84, 84, 4]` stacks, oldest frame first. The script
checks a sampled stack against the frames it generated, then prints the bytes stored and
what storing the stacked observation would have taken.

    python examples/pixels.py [--capacity 100000] [--memory-kind pinned_host]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import flax_replay as fbx

FRAME, STACK, N_STEP = (84, 84), 4, 3


def env_step(t: jax.Array, key: jax.Array) -> dict:
    """Step t of the synthetic environment: a frame, an action, a reward, an episode end."""
    k_noise, k_end = jax.random.split(key)
    noise = jax.random.randint(k_noise, FRAME, 0, 32, jnp.int32)
    yy, xx = jnp.meshgrid(jnp.arange(FRAME[0]), jnp.arange(FRAME[1]), indexing="ij")
    pos = t % (FRAME[1] - 8)
    square = (yy >= 38) & (yy < 46) & (xx >= pos) & (xx < pos + 8)
    frame = jnp.where(square, 255, noise).astype(jnp.uint8)
    return {"obs": frame, "action": (t % 4).astype(jnp.int32),
            "reward": (t % 7 == 0).astype(jnp.float32),
            "done": jax.random.bernoulli(k_end, 0.01).astype(jnp.float32)}


def gb(tree) -> float:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)) / 1e9


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--capacity", type=int, default=100_000)
    p.add_argument("--memory-kind", default=None, help="None (device memory) or pinned_host")
    args = p.parse_args()

    example = {"obs": jnp.zeros(FRAME, jnp.uint8), "action": jnp.int32(0),
               "reward": jnp.float32(0), "done": jnp.float32(0)}
    buffer = fbx.make_prioritised_n_step_buffer(
        args.capacity, min(1000, args.capacity // 4), 32, n_step=N_STEP, gamma=0.99,
        frame_stack={"obs": STACK}, memory_kind=args.memory_kind)
    state = buffer.init(example)

    steps = min(args.capacity, 5_000)

    @jax.jit
    def generate(key):
        return jax.vmap(env_step)(jnp.arange(steps), jax.random.split(key, steps))

    trajectory = generate(jax.random.key(0))  # [steps, ...]: what the agent saw

    @jax.jit
    def fill(state, trajectory):
        def body(state, step):
            return buffer.add(state, step), None
        return jax.lax.scan(body, state, trajectory)[0]

    state = jax.jit(fill, donate_argnums=0)(state, trajectory)
    sample = jax.jit(buffer.sample)(state, jax.random.key(1))
    first = sample.experience.first
    print("sample first obs:", first["obs"].shape, first["obs"].dtype)
    print("sample second obs:", sample.experience.second["obs"].shape)

    # The stack of a sampled transition is the 4 frames the environment produced up to it.
    frames = np.asarray(trajectory["obs"])
    newest = np.asarray(first["obs"][0, ..., -1])  # the noise makes every frame unique
    s = int(np.flatnonzero(np.all(frames == newest, axis=(1, 2)))[0])
    assert np.array_equal(np.moveaxis(np.asarray(first["obs"][0]), -1, 0), frames[s - 3:s + 1])
    assert np.array_equal(np.moveaxis(np.asarray(sample.experience.second["obs"][0]), -1, 0),
                          frames[s + N_STEP - 3:s + N_STEP + 1])
    print("stack check: ok")

    stored = gb(jax.eval_shape(buffer.init, example))
    naive = fbx.make_prioritised_n_step_buffer(args.capacity, 0, 32, n_step=N_STEP)
    stacked_example = dict(example, obs=jnp.zeros(FRAME + (STACK,), jnp.uint8))
    stacked = gb(jax.eval_shape(naive.init, stacked_example))
    physical = args.capacity * (FRAME[0] * FRAME[1] + 12) / 1e9
    print(f"experience memory: {jax.tree.leaves(state.experience)[0].sharding.memory_kind}")
    print(f"capacity {args.capacity} transitions: stored {stored:.3f} GB "
          f"({stored / physical:.3f}x one frame per step); stacked observations would take "
          f"{stacked:.3f} GB; saved {stacked - stored:.3f} GB ({stacked / stored:.2f}x less)")


if __name__ == "__main__":
    main()
