"""DQN with prioritised replay on gymnax CartPole-v1, the buffer living in the model.

    python examples/dqn_per.py            # trains, or resumes from checkpoints/dqn_per/
    python examples/dqn_per.py --fresh    # starts over

The agent is one Linen module: the online and target Q-networks and a
`flax_replay.linen.ReplayBuffer` submodule (a prioritised flat buffer, one row per
environment). Its state is a `flax_replay.TrainState`: `params` (both networks), `opt_state`,
and the buffer in the "replay" and "priorities" collections. One jitted, donated function runs
a chunk of steps with `jax.lax.scan`; each step acts in the vectorised environments, adds the
step to the buffer, samples a batch with its importance weights, takes a double-DQN gradient
step and sets the new priorities. Orbax checkpoints the whole state, buffer included, every few
chunks; a rerun resumes from the latest checkpoint (only the environments start new episodes).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `_common`, run from anywhere

import _common  # noqa: E402

import flax_replay  # noqa: E402


# -------------------------------------------------------------------------------- the model
class QNetwork(nn.Module):
    num_actions: int
    hidden: Sequence[int]

    @nn.compact
    def __call__(self, obs: jax.Array) -> jax.Array:
        x = obs
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_actions)(x)


class Agent(nn.Module):
    """Online and target Q-networks + the replay buffer.

    `__call__(obs [n, ...]) -> Q [n, A]` (online); `target_values(obs)` (target network). Both
    networks are in "params" (`{"online": ..., "target": ...}`, so one checkpoint holds both;
    the optimizer only trains "online"). The buffer methods need `mutable=["replay",
    "priorities"]`, which is what `TrainState.apply` passes.
    """

    num_actions: int
    hidden: Sequence[int]
    buffer: Any       # a flax_replay buffer definition (hashable)
    experience: Any   # one example step
    weights: str = "buffer"  # importance weights normalised over the "buffer" or "batch"

    def setup(self) -> None:
        self.online = QNetwork(self.num_actions, self.hidden)
        self.target = QNetwork(self.num_actions, self.hidden)
        self.replay = flax_replay.linen.ReplayBuffer(buffer=self.buffer,
                                                     experience=self.experience)

    def __call__(self, obs: jax.Array) -> jax.Array:
        if self.is_initializing():
            self.target(obs)
            self.replay()  # creates the empty buffer in "replay" and "priorities"
        return self.online(obs)

    def target_values(self, obs: jax.Array) -> jax.Array:
        return self.target(obs)

    def add(self, step: Any) -> None:
        self.replay.add(step)

    def sample(self, key: jax.Array, beta: jax.Array):
        """A prioritised sample of transitions and its importance weights `[B]`."""
        batch = self.replay.sample(key)
        return batch, self.replay.importance_weights(batch, beta, self.weights)

    def can_sample(self) -> jax.Array:
        return self.replay.can_sample()

    def set_priorities(self, batch, priorities: jax.Array) -> None:
        self.replay.set_priorities(batch, priorities)  # the sample: stale updates are dropped

    def running_index(self) -> jax.Array:
        return self.replay.state().running_index


# ------------------------------------------------------------------------------- the step
class Carry(NamedTuple):
    """What the scan carries. Only `state` and `key` are checkpointed; the environments are
    reset when a run resumes."""

    state: flax_replay.TrainState
    env_state: Any
    obs: jax.Array
    episodes: _common.Episodes
    key: jax.Array
    env_steps: jax.Array  # int32 [], for the schedules


def build(args, env: _common.Env, key: jax.Array):
    """The agent, its initial `TrainState`, the jitted, donated `train_chunk(carry) -> (carry,
    per-step metrics)` and `evaluate(params, key) -> greedy returns [eval_episodes]`."""
    buffer = flax_replay.make_prioritised_flat_buffer(
        max_length=args.buffer_size,
        min_length=args.batch_size,
        sample_batch_size=args.batch_size,
        add_batch_size=args.num_envs,
        priority_exponent=args.alpha,
    )
    agent = Agent(env.num_actions, tuple(args.hidden), buffer, _common.example_step(env),
                  args.weights)
    variables = agent.init(key, jnp.zeros((1, *env.obs_shape)))
    params = dict(variables["params"])
    params["target"] = jax.tree.map(jnp.copy, params["online"])  # own buffers: donated
    # Adam trains the online network only; the target follows it by Polyak averaging.
    tx = optax.multi_transform(
        {"train": _common.make_optimizer(args), "frozen": optax.set_to_zero()},
        lambda p: {k: "frozen" if k == "target" else "train" for k in p},
    )
    state = flax_replay.TrainState.create(
        apply_fn=agent.apply, params=params, tx=tx,
        replay=variables["replay"], priorities=variables["priorities"],
    )
    sched = _common.schedules(args)

    def q_values(params, obs, method=None):
        return state.apply_fn({"params": params}, obs, method=method)

    def learn(state: flax_replay.TrainState, key: jax.Array, env_steps: jax.Array):
        (batch, weights), state = state.apply(key, sched.beta(env_steps), method="sample")
        pair = batch.experience

        def loss_fn(params):
            td, has_target = _common.td_errors(
                q_values(params, pair.first["obs"]), q_values(params, pair.second["obs"]),
                q_values(params, pair.second["obs"], "target_values"), pair, args.gamma,
            )
            loss = jnp.mean(weights * has_target * _common.td_loss(td, args.loss))
            return loss, (td, has_target)

        (loss, (td, has_target)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        state = state.apply_gradients(grads=grads)
        params = dict(state.params)
        params["target"] = optax.incremental_update(params["online"], params["target"], args.tau)
        state = state.replace(params=params)
        # A truncated step has no target: priority 0 takes it out of the sampling for good.
        priorities = jnp.where(has_target > 0, jnp.abs(td) + args.priority_eps, 0.0)
        _, state = state.apply(batch, priorities, method="set_priorities")
        return state, loss

    def skip(state: flax_replay.TrainState, key: jax.Array, env_steps: jax.Array):
        return state, jnp.zeros((), jnp.float32)

    def step(carry: Carry, _):
        state, env_state, obs, episodes, key, t = carry
        key, k_act, k_env, k_learn = jax.random.split(key, 4)
        action = _common.epsilon_greedy(k_act, q_values(state.params, obs), sched.epsilon(t))
        next_obs, env_state, reward, terminated, truncated = env.step(k_env, env_state, action)
        transition = {"obs": obs, "action": action, "reward": reward,
                      "terminated": terminated, "truncated": truncated}
        _, state = state.apply(transition, method="add")
        t = t + args.num_envs
        episodes, (return_sum, finished) = _common.track_episodes(
            episodes, reward, terminated | truncated)
        can_sample, _ = state.apply(method="can_sample")
        learn_now = (can_sample & (t >= args.learning_starts)
                     & ((t // args.num_envs) % args.train_every == 0))
        state, loss = jax.lax.cond(learn_now, learn, skip, state, k_learn, t)
        metrics = {"return_sum": return_sum, "episodes": finished, "loss": loss,
                   "learned": learn_now}
        return Carry(state, env_state, next_obs, episodes, key, t), metrics

    @functools.partial(jax.jit, donate_argnums=0)
    def train_chunk(carry: Carry):
        return jax.lax.scan(step, carry, None, length=args.chunk_steps // args.num_envs)

    @jax.jit
    def evaluate(params, key):
        return _common.evaluate(functools.partial(q_values, params), env, key,
                                args.eval_episodes)

    return agent, state, train_chunk, evaluate


def start_carry(args, env: _common.Env, state: flax_replay.TrainState, key: jax.Array,
                env_steps: int) -> Carry:
    """New episodes in every environment around `state` (fresh or restored)."""
    k_reset, key = jax.random.split(key)
    obs, env_state = env.reset(k_reset, args.num_envs)
    carry = Carry(state, env_state, obs, _common.Episodes(jnp.zeros(args.num_envs)), key,
                  jnp.asarray(env_steps, jnp.int32))
    return _common.committed(carry)  # so that the chunk compiles once


def running_index(state: flax_replay.TrainState) -> int:
    index, _ = state.apply(method="running_index")
    return int(index)


# ------------------------------------------------------------------------------- the run
def main(argv: Sequence[str] | None = None) -> dict:
    from flax_replay import checkpoint

    args, timer, run_dir, env, k_init, rng, k_eval = _common.start_run(
        __doc__.splitlines()[0], "dqn_per", argv)
    agent, state, train_chunk, evaluate = build(args, env, k_init)

    manager = checkpoint.make_manager(run_dir, max_to_keep=2)
    start = 0
    if checkpoint.latest_step(manager) is not None:
        try:
            state, rng, start = checkpoint.restore(manager, state, rng)
        except ValueError as e:  # another buffer size, network, ...: say how to start over
            raise SystemExit(f"{e}\nRun with --fresh to start over, or pick another "
                             "--checkpoint-dir.") from e
        print(f"resumed from step {start} of {run_dir} (buffer running index "
              f"{running_index(state)}, {int(state.step)} updates)", flush=True)
    # The environments restart (their state is not checkpointed): one transition per env
    # pairs the last stored step with a fresh episode's first observation.
    carry = start_carry(args, env, state, jax.random.fold_in(rng, start), start)
    history = _common.History(run_dir, start)

    def chunk():
        nonlocal carry
        carry, metrics = train_chunk(carry)
        return int(carry.env_steps), metrics

    def save(steps):
        checkpoint.save(manager, steps, carry.state, carry.key, force=True)

    def greedy(steps):
        return evaluate(carry.state.params, jax.random.fold_in(k_eval, steps))

    steps = _common.run_chunks(args, start, chunk, greedy, save, history, timer)
    manager.wait_until_finished()
    return _common.finish(
        args, run_dir, history, jax.device_get(evaluate(carry.state.params, k_eval)),
        f"DQN + PER (Linen) on {args.env}",
        env_steps=steps, updates=int(carry.state.step),
        buffer_running_index=running_index(carry.state),
        wall_time_s=round(timer(), 1), resumed_from_step=start,
    )


if __name__ == "__main__":
    main()
