"""DQN with prioritised replay on gymnax CartPole-v1, in Flax NNX.

    python examples/dqn_per_nnx.py            # trains, or resumes from checkpoints/dqn_per_nnx/
    python examples/dqn_per_nnx.py --fresh    # starts over

The same loop as `dqn_per.py`, the NNX way: the agent is an `nnx.Module` holding the online
and target Q-networks and a `flax_replay.nnx.ReplayBuffer` (its state in `Replay` and
`Priorities` Variables); `nnx.Optimizer` trains the online `nnx.Param`s. One `nnx.jit`
(agent and optimizer donated) runs a chunk with `nnx.scan`, which carries the module's
mutations from step to step (a raw `jax.lax.scan` over a module would silently drop them).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `_common`, run from anywhere

import _common  # noqa: E402

import flax_replay  # noqa: E402

ONLINE = nnx.All(nnx.Param, nnx.PathContains("online"))  # what the optimizer trains


class QNetwork(nnx.Module):
    def __init__(self, obs_dim: int, num_actions: int, hidden: Sequence[int], rngs: nnx.Rngs):
        widths = [obs_dim, *hidden]
        self.layers = nnx.List(nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths, widths[1:]))
        self.head = nnx.Linear(widths[-1], num_actions, rngs=rngs)

    def __call__(self, obs: jax.Array) -> jax.Array:
        for layer in self.layers:
            obs = nnx.relu(layer(obs))
        return self.head(obs)


class Agent(nnx.Module):
    """Online and target Q-networks (both `nnx.Param`, so one checkpoint holds both) and the
    replay buffer, one row per environment."""

    def __init__(self, env: _common.Env, args, rngs: nnx.Rngs):
        obs_dim = env.obs_shape[0]
        self.online = QNetwork(obs_dim, env.num_actions, args.hidden, rngs)
        self.target = QNetwork(obs_dim, env.num_actions, args.hidden, rngs)
        # Own copies, not shared arrays: both are donated to the jitted chunk.
        nnx.update(self.target, jax.tree.map(jnp.copy, nnx.state(self.online, nnx.Param)))
        buffer = flax_replay.make_prioritised_flat_buffer(
            max_length=args.buffer_size, min_length=args.batch_size,
            sample_batch_size=args.batch_size, add_batch_size=args.num_envs,
            priority_exponent=args.alpha,
        )
        self.replay = flax_replay.nnx.ReplayBuffer(buffer, _common.example_step(env))


def make_train_chunk(args, env: _common.Env):
    sched = _common.schedules(args)

    def learn(agent: Agent, optimizer: nnx.Optimizer, key: jax.Array, t: jax.Array):
        batch = agent.replay.sample(key)
        weights = agent.replay.importance_weights(batch, sched.beta(t), args.weights)
        pair = batch.experience
        q_target = agent.target(pair.second["obs"])

        def loss_fn(agent: Agent):
            td, has_target = _common.td_errors(
                agent.online(pair.first["obs"]), agent.online(pair.second["obs"]), q_target,
                pair, args.gamma)
            return jnp.mean(weights * has_target * _common.td_loss(td, args.loss)), (td, has_target)

        grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, ONLINE), has_aux=True)
        (loss, (td, has_target)), grads = grad_fn(agent)
        optimizer.update(agent, grads)
        online = nnx.state(agent.online, nnx.Param)
        target = nnx.state(agent.target, nnx.Param)
        nnx.update(agent.target, optax.incremental_update(online, target, args.tau))
        priorities = jnp.where(has_target > 0, jnp.abs(td) + args.priority_eps, 0.0)
        agent.replay.set_priorities(batch, priorities)  # the sample: stale updates dropped
        return loss

    def skip(agent, optimizer, key, t):
        return jnp.zeros((), jnp.float32)

    def step(carry, key):
        agent, optimizer, (env_state, obs, episodes, t) = carry
        k_act, k_env, k_learn = jax.random.split(key, 3)
        action = _common.epsilon_greedy(k_act, agent.online(obs), sched.epsilon(t))
        next_obs, env_state, reward, terminated, truncated = env.step(k_env, env_state, action)
        agent.replay.add({"obs": obs, "action": action, "reward": reward,
                          "terminated": terminated, "truncated": truncated})
        t = t + args.num_envs
        episodes, (return_sum, finished) = _common.track_episodes(
            episodes, reward, terminated | truncated)
        learn_now = (agent.replay.can_sample() & (t >= args.learning_starts)
                     & ((t // args.num_envs) % args.train_every == 0))
        loss = nnx.cond(learn_now, learn, skip, agent, optimizer, k_learn, t)
        metrics = {"return_sum": return_sum, "episodes": finished, "loss": loss,
                   "learned": learn_now}
        return (agent, optimizer, (env_state, next_obs, episodes, t)), metrics

    @nnx.jit(donate_argnums=(0, 1, 2))
    def train_chunk(agent: Agent, optimizer: nnx.Optimizer, envs: Any, keys: jax.Array):
        (_, _, envs), metrics = nnx.scan(step)((agent, optimizer, envs), keys)
        return envs, metrics

    @nnx.jit
    def evaluate(q_network: QNetwork, key: jax.Array):  # the network only, not the buffer
        return _common.evaluate(q_network, env, key, args.eval_episodes)

    return train_chunk, evaluate


def main(argv: Sequence[str] | None = None) -> dict:
    from flax_replay import checkpoint

    args, timer, run_dir, env, k_init, rng, k_eval = _common.start_run(
        __doc__.splitlines()[0], "dqn_per_nnx", argv)
    agent = Agent(env, args, nnx.Rngs(k_init))
    optimizer = nnx.Optimizer(agent, _common.make_optimizer(args), wrt=ONLINE)
    train_chunk, evaluate = make_train_chunk(args, env)

    manager = checkpoint.make_manager(run_dir, max_to_keep=2)
    start = 0
    if checkpoint.latest_step(manager) is not None:
        try:
            rng, start = checkpoint.restore_nnx(manager, agent, optimizer, rng)
        except ValueError as e:  # another buffer size, network, ...: say how to start over
            raise SystemExit(f"{e}\nRun with --fresh to start over, or pick another "
                             "--checkpoint-dir.") from e
        print(f"resumed from step {start} of {run_dir} (buffer running index "
              f"{int(agent.replay.running_index[...])})", flush=True)
    k_reset, rng = jax.random.split(jax.random.fold_in(rng, start))
    obs, env_state = env.reset(k_reset, args.num_envs)
    envs = (env_state, obs, _common.Episodes(jnp.zeros(args.num_envs)),
            jnp.asarray(start, jnp.int32))
    envs = _common.committed(envs)
    for obj in (agent, optimizer):
        nnx.update(obj, _common.committed(nnx.state(obj)))
    history = _common.History(run_dir, start)

    def chunk():
        nonlocal envs, rng
        rng, k_chunk = jax.random.split(rng)
        keys = jax.random.split(k_chunk, args.chunk_steps // args.num_envs)
        envs, metrics = train_chunk(agent, optimizer, envs, keys)
        return int(envs[-1]), metrics

    def save(steps):
        checkpoint.save_nnx(manager, steps, agent, optimizer, rng, force=True)

    def greedy(steps):
        return evaluate(agent.online, jax.random.fold_in(k_eval, steps))

    steps = _common.run_chunks(args, start, chunk, greedy, save, history, timer)
    manager.wait_until_finished()
    return _common.finish(
        args, run_dir, history, jax.device_get(evaluate(agent.online, k_eval)),
        f"DQN + PER (NNX) on {args.env}",
        env_steps=steps, updates=int(optimizer.step[...]),
        buffer_running_index=int(agent.replay.running_index[...]),
        wall_time_s=round(timer(), 1), resumed_from_step=start,
    )


if __name__ == "__main__":
    main()
