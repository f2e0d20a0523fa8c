"""DQN with prioritised replay on gymnax CartPole-v1, in Flax NNX.

    python examples/dqn_per_nnx.py            # trains, or resumes from checkpoints/dqn_per_nnx/
    python examples/dqn_per_nnx.py --fresh    # starts over

The same program as `dqn_per.py`, the NNX way; its flags, environment and DQN maths (nothing
that touches the buffer) are imported from there. The agent is an `nnx.Module` holding the
online and target Q-networks and a `flax_replay.nnx.ReplayBuffer` (its state in `Replay` and
`Priorities` Variables); `nnx.Optimizer` trains the online `nnx.Param`s. One `nnx.jit` (agent
and optimizer donated) runs a chunk with `nnx.scan`, which carries the module's mutations from
step to step (a raw `jax.lax.scan` over a module would silently drop them). Orbax checkpoints
agent (buffer included) and optimizer with `checkpoint.save_nnx`; a rerun resumes.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `dqn_per`, `_report`

import flax_replay
from flax_replay import checkpoint

import _report
import dqn_per as dqn

ONLINE = nnx.All(nnx.Param, nnx.PathContains("online"))  # what the optimizer trains


# -------------------------------------------------------------------------------- the agent
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

    def __init__(self, env: dqn.VecEnv, args, rngs: nnx.Rngs):
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
        self.replay = flax_replay.nnx.ReplayBuffer(buffer, env.stored_step())


# --------------------------------------------------------------------------------- the step
def make_train_chunk(args, env: dqn.VecEnv):
    """`train_chunk(agent, optimizer, envs, keys) -> (envs, per-step metrics)`: one step per
    key, the agent and optimizer updated in place (donated), `envs = (env_state, obs,
    ep_return, env_steps)`."""
    epsilon, beta, _ = dqn.schedules(args)

    def learn(agent: Agent, optimizer: nnx.Optimizer, key: jax.Array, t: jax.Array):
        batch = agent.replay.sample(key)
        weights = agent.replay.importance_weights(batch, beta(t), args.weights)
        pair = batch.experience
        q_target = agent.target(pair.second["obs"])

        def loss_fn(agent: Agent):
            td, has_target = dqn.td_errors(agent.online(pair.first["obs"]),
                                           agent.online(pair.second["obs"]), q_target, pair,
                                           args.gamma)
            return jnp.mean(weights * has_target * dqn.td_loss(td, args.loss)), (td, has_target)

        grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, ONLINE), has_aux=True)
        (loss, (td, has_target)), grads = grad_fn(agent)
        optimizer.update(agent, grads)
        online = nnx.state(agent.online, nnx.Param)
        target = nnx.state(agent.target, nnx.Param)
        nnx.update(agent.target, optax.incremental_update(online, target, args.tau))
        # A truncated step has no target: priority 0 takes it out of the sampling for good.
        priorities = jnp.where(has_target > 0, jnp.abs(td) + args.priority_eps, 0.0)
        agent.replay.set_priorities(batch, priorities)  # the sample: stale updates dropped
        return loss

    def skip(agent, optimizer, key, t):
        return jnp.zeros((), jnp.float32)

    def step(carry, key):
        agent, optimizer, (env_state, obs, ep_return, t) = carry
        k_act, k_env, k_learn = jax.random.split(key, 3)
        action = dqn.epsilon_greedy(k_act, agent.online(obs), epsilon(t))
        next_obs, env_state, reward, terminated, truncated = env.step(k_env, env_state, action)
        agent.replay.add({"obs": obs, "action": action, "reward": reward,
                          "terminated": terminated, "truncated": truncated})
        t = t + args.num_envs
        ep_return, return_sum, finished = dqn.end_episodes(ep_return, reward,
                                                           terminated | truncated)
        learn_now = (agent.replay.can_sample() & (t >= args.learning_starts)
                     & ((t // args.num_envs) % args.train_every == 0))
        loss = nnx.cond(learn_now, learn, skip, agent, optimizer, k_learn, t)
        metrics = {"return_sum": return_sum, "episodes": finished, "loss": loss,
                   "learned": learn_now}
        return (agent, optimizer, (env_state, next_obs, ep_return, t)), metrics

    @nnx.jit(donate_argnums=(0, 1, 2))
    def train_chunk(agent: Agent, optimizer: nnx.Optimizer, envs: Any, keys: jax.Array):
        (_, _, envs), metrics = nnx.scan(step)((agent, optimizer, envs), keys)
        return envs, metrics

    return train_chunk


# ---------------------------------------------------------------------------------- the run
def main(argv: Sequence[str] | None = None) -> dict:
    args = dqn.parse_args(argv, "dqn_per_nnx", __doc__)
    t0 = time.perf_counter()
    run_dir = args.checkpoint_dir.resolve()
    if args.fresh:
        _report.clear(run_dir)
    env = dqn.VecEnv.make(args.env)
    k_init, rng, k_eval = jax.random.split(jax.random.key(args.seed), 3)
    agent = Agent(env, args, nnx.Rngs(k_init))
    _, _, adam = dqn.schedules(args)
    optimizer = nnx.Optimizer(agent, adam, wrt=ONLINE)
    train_chunk = make_train_chunk(args, env)

    @nnx.jit
    def evaluate(q_network: QNetwork, key: jax.Array):  # the network only, not the buffer
        return dqn.greedy_returns(q_network, env, key, args.eval_episodes)

    # Resume: agent (buffer included), optimizer and key from the latest checkpoint, in place.
    manager = checkpoint.make_manager(run_dir, max_to_keep=2)
    wall_before = dqn.check_rerun(manager, args, run_dir)
    start = 0
    if checkpoint.latest_step(manager) is not None:
        try:
            rng, start = checkpoint.restore_nnx(manager, agent, optimizer, rng)
        except ValueError as e:  # another buffer size, network, ...: say how to start over
            raise SystemExit(f"{e}\nRun with --fresh to start over, or pick another "
                             "--checkpoint-dir.") from e
        print(f"resumed from step {start} of {run_dir} (buffer running index "
              f"{int(agent.replay.running_index[...])}, {int(optimizer.step[...])} updates)",
              flush=True)
    # New episodes in every environment (their state is not checkpointed).
    k_reset, rng = jax.random.split(jax.random.fold_in(rng, start))
    obs, env_state = env.reset(k_reset, args.num_envs)
    envs = (env_state, obs, jnp.zeros(args.num_envs), jnp.asarray(start, jnp.int32))
    # All on one device, "committed" like the chunk's outputs: mixing committed (restored,
    # jitted) and uncommitted (fresh) arrays is another jit cache key, a second compilation.
    device = jax.local_devices()[0]
    envs = jax.device_put(envs, device)
    for obj in (agent, optimizer):
        nnx.update(obj, jax.device_put(nnx.state(obj), device))

    report = _report.Report(run_dir, args.total_steps, start, bar=not args.no_progress)
    steps, chunks, end = start, 0, dqn.stop_at(args)
    while steps < end:
        tick = time.perf_counter()
        rng, k_chunk = jax.random.split(rng)
        keys = jax.random.split(k_chunk, args.chunk_steps // args.num_envs)
        envs, metrics = train_chunk(agent, optimizer, envs, keys)
        metrics, steps = jax.device_get((metrics, envs[-1]))
        steps = int(steps)
        sps = args.chunk_steps / (time.perf_counter() - tick)  # training only
        greedy = jax.device_get(evaluate(agent.online, jax.random.fold_in(k_eval, steps)))
        report.chunk(steps, wall_before + time.perf_counter() - t0, sps, metrics, greedy)
        chunks += 1
        if chunks % args.checkpoint_every == 0 or steps >= end:
            checkpoint.save_nnx(manager, steps, agent, optimizer, rng, force=True,  # async
                                metadata=dqn.run_metadata(args, wall_before
                                                          + time.perf_counter() - t0))
            report.log(f"checkpoint at step {steps}")
    manager.wait_until_finished()

    returns = jax.device_get(evaluate(agent.online, k_eval))
    return report.finish(
        returns, f"DQN + PER (NNX) on {args.env}", env=args.env, env_steps=steps,
        updates=int(optimizer.step[...]), buffer_running_index=int(agent.replay.running_index[...]),
        wall_time_s=round(wall_before + time.perf_counter() - t0, 1),
        wall_time_this_invocation_s=round(time.perf_counter() - t0, 1), resumed_from_step=start,
    )


if __name__ == "__main__":
    main()
