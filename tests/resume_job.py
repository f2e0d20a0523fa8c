"""A small resumable training run (network, optimizer, prioritised buffer, RNG), used by
tests/test_checkpoint.py in real subprocesses.

    python tests/resume_job.py DIRECTORY TOTAL_STEPS linen|nnx [--out final.npz]
                               [--hang-commit-at STEP] [--save-every N (0: never)]

Resumes from the latest checkpoint in DIRECTORY if there is one, prints `start S` and then
`step N` after each completed step (flushed, so a parent can kill it at any step), saves
asynchronously after every step, and at the end writes every leaf of the final state (params,
optimizer state, buffer, sum tree, RNG key data, step) to `--out` and prints `done`.
`--hang-commit-at K` stalls the commit of checkpoint K forever after printing `in flight K`
(the test then kills the process while that save is in flight).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import flax_replay as fbx
from flax_replay import checkpoint as ckpt

OBS, ACTIONS, ENVS, WARMUP = 4, 2, 4, 4  # learning starts after WARMUP steps (16 transitions)
EXAMPLE = {"obs": jnp.zeros(OBS), "action": jnp.int32(0), "reward": jnp.float32(0.0)}


def make_buffer():
    return fbx.make_prioritised_flat_buffer(
        max_length=48, min_length=8, sample_batch_size=8, add_batch_size=ENVS,
        priority_exponent=0.6)


def observe(key):
    return jax.random.normal(key, (ENVS, OBS))


def environment(obs, q_values):
    """Fake environment step: greedy actions on random observations, a reward of them."""
    action = jnp.argmax(q_values, axis=-1).astype(jnp.int32)
    reward = jnp.tanh(obs[:, 0]) * (2 * action - 1)
    return {"obs": obs, "action": action, "reward": reward.astype(jnp.float32)}


def td_errors(q, q_next, exp):
    a = exp.first["action"]
    target = exp.first["reward"] + 0.9 * jnp.max(q_next, axis=-1)
    return jnp.take_along_axis(q, a[:, None], axis=-1)[:, 0] - jax.lax.stop_gradient(target)


# ------------------------------------------------------------------------------ Linen
class LinenAgent(nn.Module):
    buffer: fbx.PrioritisedBuffer
    example: dict

    def setup(self):
        self.hidden = nn.Dense(16)
        self.out = nn.Dense(ACTIONS)
        self.replay = fbx.linen.ReplayBuffer(self.buffer, experience=self.example)

    def __call__(self, obs):
        self.replay()
        return self.out(nn.relu(self.hidden(obs)))

    def add(self, batch):
        self.replay.add(batch)

    def sample(self, key):
        return self.replay.sample(key)

    def weights(self, batch):
        return self.replay.importance_weights(batch, 0.4)

    def set_priorities(self, batch, priorities):
        self.replay.set_priorities(batch, priorities)


def linen_setup(buffer=None, example=EXAMPLE):
    """(TrainState, jitted step, leaves-to-save function); `buffer`/`example` change the
    buffer only (the network always reads [*, OBS] observations)."""
    agent = LinenAgent(make_buffer() if buffer is None else buffer, example)
    variables = agent.init(jax.random.key(0), jnp.zeros((1, OBS)))
    state = fbx.TrainState.create(
        apply_fn=agent.apply, params=variables["params"], tx=optax.adam(3e-3),
        replay=variables["replay"], priorities=variables.get("priorities"))

    def step(state, rng, learn: bool):
        rng, k_env, k_sample = jax.random.split(rng, 3)
        obs = observe(k_env)
        q, _ = state.apply(obs)
        batch = environment(obs, q)
        _, state = state.apply(batch, method="add")
        if learn:
            sample, _ = state.apply(k_sample, method="sample")
            weights, _ = state.apply(sample, method="weights")
            exp = sample.experience

            def loss(params):
                q, _ = state.apply(exp.first["obs"], params=params)
                q_next, _ = state.apply(exp.second["obs"], params=params)
                td = td_errors(q, q_next, exp)
                return jnp.mean(weights * td**2), td

            grads, td = jax.grad(loss, has_aux=True)(state.params)
            state = state.apply_gradients(grads=grads)
            _, state = state.apply(sample, jnp.abs(td) + 1e-3, method="set_priorities")
        return state, rng

    jitted = jax.jit(step, donate_argnums=(0, 1), static_argnums=2)

    def leaves(state, rng):
        return {"params": state.params, "opt_state": state.opt_state, "replay": state.replay,
                "priorities": state.priorities, "rng": jax.random.key_data(rng),
                "step": state.step}

    return state, jitted, leaves


# ------------------------------------------------------------------------------ NNX
class NNXAgent(nnx.Module):
    def __init__(self, buffer, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(OBS, 16, rngs=rngs)
        self.out = nnx.Linear(16, ACTIONS, rngs=rngs)
        self.replay = fbx.nnx.ReplayBuffer(buffer, EXAMPLE)

    def __call__(self, obs):
        return self.out(nnx.relu(self.hidden(obs)))


@nnx.jit(donate_argnums=(0, 1, 2), static_argnums=3)
def nnx_step(model, optimizer, rng, learn: bool):
    rng, k_env, k_sample = jax.random.split(rng, 3)
    obs = observe(k_env)
    batch = environment(obs, model(obs))
    model.replay.add(batch)
    if learn:
        sample = model.replay.sample(k_sample)
        weights = model.replay.importance_weights(sample, 0.4)
        exp = sample.experience

        def loss(model):
            td = td_errors(model(exp.first["obs"]), model(exp.second["obs"]), exp)
            return jnp.mean(weights * td**2), td

        (_, td), grads = nnx.value_and_grad(loss, has_aux=True)(model)
        optimizer.update(model, grads)
        model.replay.set_priorities(sample, jnp.abs(td) + 1e-3)
    return rng


def nnx_setup():
    model = NNXAgent(make_buffer(), nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    return model, optimizer


# ------------------------------------------------------------------------------ main
def hang_commit_at(k: int) -> None:
    """Test instrumentation: the commit (atomic rename) of checkpoint k never happens."""
    from orbax.checkpoint._src.path import atomicity

    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self):
        if self.get_final().name == str(k):
            print(f"in flight {k}", flush=True)
            while True:
                time.sleep(1)
        return await original(self)

    atomicity.AtomicRenameTemporaryPath.finalize = finalize


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("directory")
    p.add_argument("total", type=int)
    p.add_argument("flavour", choices=("linen", "nnx"))
    p.add_argument("--out")
    p.add_argument("--hang-commit-at", type=int)
    p.add_argument("--save-every", type=int, default=1)
    args = p.parse_args(argv)
    if args.hang_commit_at is not None:
        hang_commit_at(args.hang_commit_at)

    # --save-every 0: a reference run that never checkpoints.
    manager = ckpt.make_manager(args.directory, max_to_keep=3,
                                save_interval_steps=max(args.save_every, 1))
    save = args.save_every > 0
    rng = jax.random.key(42)
    start = 0
    if args.flavour == "linen":
        state, step_fn, leaves = linen_setup()
        if ckpt.latest_step(manager) is not None:
            state, rng, start = ckpt.restore(manager, state, rng)
    else:
        model, optimizer = nnx_setup()
        if ckpt.latest_step(manager) is not None:
            rng, start = ckpt.restore_nnx(manager, model, optimizer, rng)
    print(f"start {start}", flush=True)

    for t in range(start, args.total):
        learn = t >= WARMUP
        if args.flavour == "linen":
            state, rng = step_fn(state, rng, learn)
            if save:
                ckpt.save(manager, t + 1, state, rng)
        else:
            rng = nnx_step(model, optimizer, rng, learn)
            if save:
                ckpt.save_nnx(manager, t + 1, model, optimizer, rng)
        print(f"step {t + 1}", flush=True)
    manager.wait_until_finished()

    if args.out:
        if args.flavour == "linen":
            tree = leaves(state, rng)
        else:
            tree = {"state": nnx.state((model, optimizer)).to_pure_dict(),
                    "rng": jax.random.key_data(rng)}
        flat = {jax.tree_util.keystr(path): np.asarray(x)
                for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
        np.savez(args.out, **flat)
    manager.close()
    print("done", flush=True)


if __name__ == "__main__":
    sys.exit(main())
