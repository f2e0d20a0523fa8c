"""DQN with prioritised replay on gymnax CartPole-v1, the buffer living in the model.

    python examples/dqn_per.py            # trains, or resumes from checkpoints/dqn_per/
    python examples/dqn_per.py --fresh    # starts over
    python examples/dqn_per.py --stop-at 100000   # pauses there; a rerun continues the run

The agent is one Linen module: the online and target Q-networks and a
`flax_replay.linen.ReplayBuffer` submodule (a prioritised flat buffer, one row per
environment). Its state is a `flax_replay.TrainState`: `params` (both networks), `opt_state`,
and the buffer in the "replay" and "priorities" collections. One jitted, donated function runs
a chunk of steps with `jax.lax.scan`; each step acts in the vectorised environments, adds the
step to the buffer, samples a batch with its importance weights, takes a double-DQN gradient
step and sets the new priorities. Orbax checkpoints the whole state, buffer included, every few
chunks; a rerun resumes from the latest checkpoint (only the environments start new episodes).
After every chunk the greedy policy is evaluated; the curve, a summary and the checkpoints go
to `--checkpoint-dir` (`_report.py` draws and writes them).

The run's flags are stored with every checkpoint: a rerun with other flags (another
`--total-steps` would change every schedule, another `--batch-size` the buffer) is refused,
naming the flags that differ, unless they are in `SAFE_FLAGS` (output, checkpointing,
evaluation and `--stop-at`). The wall time in `summary.json` adds up over the reruns.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import gymnax
import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `_report`, run from anywhere

import flax_replay
from flax_replay import checkpoint

import _report


# ------------------------------------------------------------------------------------ flags
def parse_args(argv=None, run_name: str = "dqn_per", description: str = __doc__):
    """The defaults solve CartPole-v1 (greedy return >= 475; see README). Refuses flag
    combinations the chunked loop cannot honour."""
    p = argparse.ArgumentParser(description=description.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--env", default="CartPole-v1", help="gymnax environment id")
    a("--total-steps", type=int, default=400_000, help="environment steps (all envs)")
    a("--chunk-steps", type=int, default=10_000,
      help="environment steps per jitted, scanned chunk (one progress-bar update)")
    a("--num-envs", type=int, default=8, help="vectorised environments = add_batch_size")
    a("--buffer-size", type=int, default=100_000, help="replay capacity in transitions")
    a("--batch-size", type=int, default=256, help="sampled transitions per update")
    a("--learning-starts", type=int, default=5_000, help="env steps before learning")
    a("--train-every", type=int, default=1,
      help="vectorised env steps between gradient updates")
    a("--lr", type=float, default=1e-3, help="Adam learning rate at the first update")
    a("--lr-end", type=float, default=2e-5, help="learning rate at the last update")
    # A policy that balances for 500 steps keeps training on near-identical states; a learning
    # rate that is still high then can unlearn it. Cosine keeps it high early, tiny late.
    a("--lr-decay", choices=("linear", "cosine"), default="cosine",
      help="shape of the learning-rate decay from --lr to --lr-end")
    # A large epsilon damps Adam's steps when the gradients are tiny (a solved task), instead
    # of normalising noise up to full-size steps.
    a("--adam-eps", type=float, default=1e-3, help="Adam epsilon")
    a("--gamma", type=float, default=0.98, help="discount (0.99 was less stable here)")
    # Squared error: the rare terminal transitions (TD error ~ 1 / (1 - gamma)) must move the
    # network; Huber caps their gradient at 1 and the policy forgets why poles fall.
    a("--loss", choices=("mse", "huber"), default="mse", help="TD loss")
    a("--hidden", type=int, nargs="+", default=[128, 128], help="Q-network layer widths")
    a("--tau", type=float, default=0.005, help="Polyak rate of the target network per update")
    a("--eps-start", type=float, default=1.0)
    # Exploration that keeps some failures in the replay for the whole run.
    a("--eps-end", type=float, default=0.1)
    a("--eps-fraction", type=float, default=0.2,
      help="fraction of --total-steps over which epsilon decays")
    a("--alpha", type=float, default=0.6, help="priority exponent")
    a("--beta-start", type=float, default=0.4, help="importance exponent, annealed to 1")
    a("--priority-eps", type=float, default=1e-3, help="added to |TD error|")
    a("--weights", choices=("buffer", "batch"), default="buffer",
      help="importance weights normalised by the largest weight in the buffer or the batch")
    a("--seed", type=int, default=0)
    a("--eval-episodes", type=int, default=32, help="greedy evaluation episodes at the end")
    a("--checkpoint-dir", type=Path, default=checkpoint.default_directory(run_name),
      help="checkpoints, learning curve and summary go here")
    a("--checkpoint-every", type=int, default=4, help="chunks between checkpoints")
    a("--fresh", action="store_true", help="ignore (and replace) existing checkpoints")
    a("--no-progress", action="store_true", help="no progress bar (logs one line a chunk)")
    a("--stop-at", type=int, default=None,
      help="stop this invocation at this many env steps (checkpoint, evaluation, summary); "
           "the schedules still span --total-steps, and a rerun continues the run")
    args = p.parse_args(argv)
    if args.chunk_steps % args.num_envs:
        p.error(f"--chunk-steps ({args.chunk_steps}) must be a multiple of --num-envs "
                f"({args.num_envs})")
    if args.total_steps % args.chunk_steps:
        p.error(f"--total-steps ({args.total_steps}) must be a multiple of --chunk-steps "
                f"({args.chunk_steps})")
    if args.stop_at is not None and args.stop_at % args.chunk_steps:
        p.error(f"--stop-at ({args.stop_at}) must be a multiple of --chunk-steps "
                f"({args.chunk_steps})")
    return args


# Flags a rerun may change: where outputs go, how often checkpoints are written, how the
# policy is evaluated, where this invocation stops. Every other flag shapes the training
# (schedules, buffer, network, environment, seed): a run resumed with another value would be
# neither the old run nor a new one.
SAFE_FLAGS = ("checkpoint_dir", "checkpoint_every", "eval_episodes", "fresh", "no_progress",
              "stop_at")


def run_flags(args) -> dict:
    """The flags that define the run (JSON values), stored with every checkpoint."""
    return {k: v for k, v in json.loads(json.dumps(vars(args), default=str)).items()
            if k not in SAFE_FLAGS}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_rerun(manager, args, run_dir: Path) -> float:
    """Before resuming: refuses (SystemExit) flags that differ from those stored with the
    latest checkpoint, naming them; returns the wall time the run has taken so far (0 for a
    new run, or checkpoints that predate this record)."""
    if checkpoint.latest_step(manager) is None:
        return 0.0
    saved = checkpoint.run_metadata(manager) or {}
    before, now = saved.get("flags"), run_flags(args)
    if before is not None:
        diff = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
        if diff:
            lines = "\n".join(f"  {_flag(k)}: {before.get(k)!r} in the checkpoints, "
                              f"{now.get(k)!r} now" for k in diff)
            raise SystemExit(
                f"{run_dir} holds a run with other flags:\n{lines}\nRerun with the same values "
                "to continue it, run with --fresh to start over (its checkpoints and outputs "
                "are replaced), or pick another --checkpoint-dir. Flags that may change on a "
                "rerun: " + ", ".join(_flag(k) for k in SAFE_FLAGS) + ".")
    return float(saved.get("wall_time_s", 0.0))


# ----------------------------------------------------------------- environment and episodes
class VecEnv(NamedTuple):
    """A gymnax environment vectorised over `[n]` environments, with gymnax's auto-reset."""

    env: Any
    params: Any

    @classmethod
    def make(cls, name: str) -> "VecEnv":
        return cls(*gymnax.make(name))

    @property
    def num_actions(self) -> int:
        return self.env.action_space(self.params).n

    @property
    def obs_shape(self) -> tuple[int, ...]:
        return self.env.observation_space(self.params).shape

    def reset(self, key: jax.Array, n: int):
        """`(obs [n, *obs_shape], env_state)`."""
        return jax.vmap(self.env.reset, (0, None))(jax.random.split(key, n), self.params)

    def step(self, key: jax.Array, env_state, action: jax.Array):
        """`(obs, env_state, reward, terminated, truncated)`, each `[n, ...]`; where an episode
        ended, `obs` is already the first observation of the next one."""
        keys = jax.random.split(key, action.shape[0])
        obs, env_state, reward, terminated, truncated, _ = jax.vmap(
            self.env.step, (0, 0, 0, None))(keys, env_state, action, self.params)
        return obs, env_state, reward, terminated, truncated

    def stored_step(self) -> dict:
        """One step as the buffer stores it (no batch axes): the observation before the
        action, the action, its reward and episode end. The flat buffer pairs it with the next
        step (`first`, `second`)."""
        return {"obs": jnp.zeros(self.obs_shape, jnp.float32),
                "action": jnp.zeros((), jnp.int32), "reward": jnp.zeros((), jnp.float32),
                "terminated": jnp.zeros((), bool), "truncated": jnp.zeros((), bool)}


def end_episodes(running: jax.Array, reward: jax.Array, done: jax.Array):
    """The running return of each env `[n]` after this step's reward, restarted where an
    episode ended, and `(sum, count)` of the returns of the episodes that ended now."""
    total = running + reward
    return jnp.where(done, 0.0, total), jnp.sum(jnp.where(done, total, 0.0)), jnp.sum(done)


def greedy_returns(q_fn, env: VecEnv, key: jax.Array, episodes: int) -> jax.Array:
    """Returns `[episodes]` of the greedy policy `argmax q_fn(obs [n, ...])`, one full episode
    each, all in parallel."""
    k_reset, k_steps = jax.random.split(key)
    obs, env_state = env.reset(k_reset, episodes)

    def body(carry, key):
        obs, env_state, alive, ret = carry
        action = jnp.argmax(q_fn(obs), -1).astype(jnp.int32)
        obs, env_state, reward, terminated, truncated = env.step(key, env_state, action)
        ret = ret + jnp.where(alive, reward, 0.0)
        return (obs, env_state, alive & ~(terminated | truncated), ret), None

    init = (obs, env_state, jnp.ones((episodes,), bool), jnp.zeros((episodes,)))
    keys = jax.random.split(k_steps, int(env.params.max_steps_in_episode))
    return jax.lax.scan(body, init, keys)[0][-1]


# -------------------------------------------------------------------------------- DQN maths
def epsilon_greedy(key: jax.Array, q: jax.Array, eps: jax.Array) -> jax.Array:
    """Actions `[n]` from Q-values `[n, A]`: random with probability `eps`, else greedy."""
    k_explore, k_action = jax.random.split(key)
    random_action = jax.random.randint(k_action, q.shape[:1], 0, q.shape[-1])
    explore = jax.random.uniform(k_explore, q.shape[:1]) < eps
    return jnp.where(explore, random_action, jnp.argmax(q, -1)).astype(jnp.int32)


def td_errors(q_first, q_second_online, q_second_target, pair, gamma: float):
    """Double-DQN TD errors `[B]` and a mask `[B]` of the transitions that have a target.

    `pair.first` is the step at t, `pair.second` the step at t + 1. Where the episode was
    truncated at t, `second.obs` is already the next episode's start, so there is no target:
    the mask is 0 there (terminal steps bootstrap with 0, as usual).
    """
    first = pair.first
    a_star = jnp.argmax(q_second_online, -1)
    bootstrap = jnp.take_along_axis(q_second_target, a_star[:, None], -1)[:, 0]
    target = first["reward"] + gamma * (1.0 - first["terminated"]) * bootstrap
    q_taken = jnp.take_along_axis(q_first, first["action"][:, None], -1)[:, 0]
    has_target = ~first["truncated"] | first["terminated"]
    return q_taken - jax.lax.stop_gradient(target), has_target.astype(jnp.float32)


def td_loss(td: jax.Array, kind: str) -> jax.Array:
    """Per-item loss `[B]`: squared, or Huber (delta 1)."""
    return 0.5 * jnp.square(td) if kind == "mse" else optax.huber_loss(td)


def schedules(args):
    """`(epsilon, beta)` as functions of env steps, and the optimizer (its learning rate a
    function of the update count)."""
    updates = max(1, (args.total_steps - args.learning_starts) // (args.num_envs
                                                                    * args.train_every))
    epsilon = optax.linear_schedule(args.eps_start, args.eps_end,
                                    int(args.eps_fraction * args.total_steps))
    beta = optax.linear_schedule(args.beta_start, 1.0, args.total_steps)
    lr = (optax.cosine_decay_schedule(args.lr, updates, args.lr_end / args.lr)
          if args.lr_decay == "cosine" else optax.linear_schedule(args.lr, args.lr_end, updates))
    optimizer = optax.chain(optax.clip_by_global_norm(10.0), optax.adam(lr, eps=args.adam_eps))
    return epsilon, beta, optimizer


# -------------------------------------------------------------------------------- the agent
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
    experience: Any   # one stored step
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

    def can_sample(self) -> jax.Array:
        return self.replay.can_sample()

    def sample(self, key: jax.Array, beta: jax.Array):
        """A prioritised sample of transitions and its importance weights `[B]`."""
        batch = self.replay.sample(key)
        return batch, self.replay.importance_weights(batch, beta, self.weights)

    def set_priorities(self, batch, priorities: jax.Array) -> None:
        self.replay.set_priorities(batch, priorities)  # the sample: stale updates are dropped

    def running_index(self) -> jax.Array:
        return self.replay.state().running_index


def make_state(args, env: VecEnv, key: jax.Array) -> flax_replay.TrainState:
    """The agent's initial `TrainState`: both networks, Adam on the online one, empty buffer."""
    buffer = flax_replay.make_prioritised_flat_buffer(
        max_length=args.buffer_size, min_length=args.batch_size,
        sample_batch_size=args.batch_size, add_batch_size=args.num_envs,
        priority_exponent=args.alpha,
    )
    agent = Agent(env.num_actions, tuple(args.hidden), buffer, env.stored_step(), args.weights)
    variables = agent.init(key, jnp.zeros((1, *env.obs_shape)))
    params = dict(variables["params"])
    params["target"] = jax.tree.map(jnp.copy, params["online"])  # own arrays: both donated
    _, _, optimizer = schedules(args)
    tx = optax.multi_transform(  # the target follows the online network by Polyak averaging
        {"train": optimizer, "frozen": optax.set_to_zero()},
        lambda p: {k: "frozen" if k == "target" else "train" for k in p},
    )
    return flax_replay.TrainState.create(
        apply_fn=agent.apply, params=params, tx=tx,
        replay=variables["replay"], priorities=variables["priorities"],
    )


def running_index(state: flax_replay.TrainState) -> int:
    """Transitions ever added to each row of the buffer."""
    return int(state.apply(method="running_index")[0])


# --------------------------------------------------------------------------------- the step
class Carry(NamedTuple):
    """What the scan carries. Only `state` and `key` are checkpointed; the environments start
    new episodes when a run resumes."""

    state: flax_replay.TrainState
    env_state: Any
    obs: jax.Array
    ep_return: jax.Array  # [num_envs], the return so far of each env's episode
    key: jax.Array
    env_steps: jax.Array  # int32 [], for the schedules



def initial_carry(args, env: VecEnv, state: flax_replay.TrainState, rng: jax.Array,
                  start: int) -> Carry:
    """The scan's carry at env step `start`, from the run's key `rng`. New episodes in every
    environment (their state is not checkpointed): on a resume, one transition per env pairs
    the last stored step with a new episode's first observation."""
    k_reset, key = jax.random.split(jax.random.fold_in(rng, start))
    obs, env_state = env.reset(k_reset, args.num_envs)
    carry = Carry(state, env_state, obs, jnp.zeros(args.num_envs), key,
                  jnp.asarray(start, jnp.int32))
    # All on one device, "committed" like the chunk's outputs: mixing committed (restored,
    # jitted) and uncommitted (fresh) arrays is another jit cache key, a second compilation.
    return jax.device_put(carry, jax.local_devices()[0])

def make_train_chunk(args, env: VecEnv):
    """`train_chunk(carry) -> (carry, per-step metrics)`: `--chunk-steps` environment steps,
    jitted and scanned, the carry donated (the buffer is updated in place)."""
    epsilon, beta, _ = schedules(args)

    def learn(state: flax_replay.TrainState, key: jax.Array, t: jax.Array):
        (batch, weights), state = state.apply(key, beta(t), method="sample")
        pair = batch.experience

        def loss_fn(params):
            q = functools.partial(state.apply_fn, {"params": params})
            td, has_target = td_errors(q(pair.first["obs"]), q(pair.second["obs"]),
                                       q(pair.second["obs"], method="target_values"),
                                       pair, args.gamma)
            return jnp.mean(weights * has_target * td_loss(td, args.loss)), (td, has_target)

        (loss, (td, has_target)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        state = state.apply_gradients(grads=grads)
        params = dict(state.params)
        params["target"] = optax.incremental_update(params["online"], params["target"], args.tau)
        state = state.replace(params=params)
        # A truncated step has no target: priority 0 takes it out of the sampling for good.
        priorities = jnp.where(has_target > 0, jnp.abs(td) + args.priority_eps, 0.0)
        _, state = state.apply(batch, priorities, method="set_priorities")
        return state, loss

    def skip(state: flax_replay.TrainState, key: jax.Array, t: jax.Array):
        return state, jnp.zeros((), jnp.float32)

    def step(carry: Carry, _):
        state, env_state, obs, ep_return, key, t = carry
        key, k_act, k_env, k_learn = jax.random.split(key, 4)
        q = state.apply_fn({"params": state.params}, obs)
        action = epsilon_greedy(k_act, q, epsilon(t))
        next_obs, env_state, reward, terminated, truncated = env.step(k_env, env_state, action)
        _, state = state.apply({"obs": obs, "action": action, "reward": reward,
                                "terminated": terminated, "truncated": truncated},
                               method="add")
        t = t + args.num_envs
        ep_return, return_sum, finished = end_episodes(ep_return, reward,
                                                       terminated | truncated)
        can_sample, _ = state.apply(method="can_sample")
        learn_now = (can_sample & (t >= args.learning_starts)
                     & ((t // args.num_envs) % args.train_every == 0))
        state, loss = jax.lax.cond(learn_now, learn, skip, state, k_learn, t)
        metrics = {"return_sum": return_sum, "episodes": finished, "loss": loss,
                   "learned": learn_now}
        return Carry(state, env_state, next_obs, ep_return, key, t), metrics

    @functools.partial(jax.jit, donate_argnums=0)
    def train_chunk(carry: Carry):
        return jax.lax.scan(step, carry, None, length=args.chunk_steps // args.num_envs)

    return train_chunk


# ---------------------------------------------------------------------------------- the run
def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    t0 = time.perf_counter()
    run_dir = args.checkpoint_dir.resolve()
    if args.fresh:
        _report.clear(run_dir)
    env = VecEnv.make(args.env)
    k_init, rng, k_eval = jax.random.split(jax.random.key(args.seed), 3)
    state = make_state(args, env, k_init)
    train_chunk = make_train_chunk(args, env)

    @jax.jit
    def evaluate(params, key):  # the params only, not the buffer
        q = functools.partial(state.apply_fn, {"params": params})
        return greedy_returns(q, env, key, args.eval_episodes)

    # Resume: the state (buffer included) and the key from the latest checkpoint, if any.
    manager = checkpoint.make_manager(run_dir, max_to_keep=2)
    wall_before = check_rerun(manager, args, run_dir)
    start = 0
    if checkpoint.latest_step(manager) is not None:
        try:
            state, rng, start = checkpoint.restore(manager, state, rng)
        except ValueError as e:  # another buffer size, network, ...: say how to start over
            raise SystemExit(f"{e}\nRun with --fresh to start over, or pick another "
                             "--checkpoint-dir.") from e
        print(f"resumed from step {start} of {run_dir} (buffer running index "
              f"{running_index(state)}, {int(state.step)} updates)", flush=True)
    carry = initial_carry(args, env, state, rng, start)

    report = _report.Report(run_dir, args.total_steps, start, bar=not args.no_progress)
    steps, chunks, end = start, 0, stop_at(args)
    while steps < end:
        tick = time.perf_counter()
        carry, metrics = train_chunk(carry)
        metrics, steps = jax.device_get((metrics, carry.env_steps))
        steps = int(steps)
        sps = args.chunk_steps / (time.perf_counter() - tick)  # training only
        k = jax.random.fold_in(k_eval, steps)
        greedy = jax.device_get(evaluate(carry.state.params, k))
        report.chunk(steps, wall_before + time.perf_counter() - t0, sps, metrics, greedy)
        chunks += 1
        if chunks % args.checkpoint_every == 0 or steps >= end:
            checkpoint.save(manager, steps, carry.state, carry.key, force=True,  # async
                            metadata=run_metadata(args, wall_before + time.perf_counter() - t0))
            report.log(f"checkpoint at step {steps}")
    manager.wait_until_finished()

    returns = jax.device_get(evaluate(carry.state.params, k_eval))
    return report.finish(
        returns, f"DQN + PER (Linen) on {args.env}", env=args.env, env_steps=steps,
        updates=int(carry.state.step), buffer_running_index=running_index(carry.state),
        wall_time_s=round(wall_before + time.perf_counter() - t0, 1),
        wall_time_this_invocation_s=round(time.perf_counter() - t0, 1), resumed_from_step=start,
    )


def stop_at(args) -> int:
    """Where this invocation stops: --total-steps, or --stop-at if that is earlier."""
    return args.total_steps if args.stop_at is None else min(args.stop_at, args.total_steps)


def run_metadata(args, wall_time_s: float) -> dict:
    """What each checkpoint stores about the run: its flags and the wall time so far."""
    return {"flags": run_flags(args), "wall_time_s": round(wall_time_s, 3)}


if __name__ == "__main__":
    main()
