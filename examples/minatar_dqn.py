"""DQN on MinAtar Breakout with a prioritised 3-step buffer that stores each frame once.

    python examples/minatar_dqn.py                  # about 2 minutes on 2 busy CPU cores
    python examples/minatar_dqn.py --out curve.png  # also draws the learning curve

gymnax's `Breakout-MinAtar` gives a 10x10x4 binary screen per step. The agent sees the last 4
screens on a new trailing axis, oldest first (`[10, 10, 4, 4]` uint8), but the buffer keeps
ONE screen per step: `frame_stack={"obs": 4}` rebuilds the stacks of `first` (t) and `second`
(t + 3) at sample time, and `episode_end_key="done"` zeros the screens from before an
episode's first step (the agent's own stacks are built the same way while it acts), so no
stack reaches into the previous episode. The n-step return and its bootstrap discount stop at
the same episode end.

Everything from acting to the gradient step is one `lax.scan` over a chunk of vectorised steps,
jitted with the carry donated (the buffer is updated in place). The script prints the bytes of
the buffer state against storing stacked observations, the mean training return per chunk, and
the return of the greedy policy at the end next to that of a uniformly random policy.
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import gymnax
import jax
import jax.numpy as jnp
import numpy as np
import optax

import flax_replay as fbx


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--env", default="Breakout-MinAtar")
    a("--total-steps", type=int, default=160_000, help="environment steps (all envs)")
    a("--chunk-steps", type=int, default=16_000, help="env steps per jitted chunk")
    a("--num-envs", type=int, default=16)
    a("--buffer-size", type=int, default=100_000, help="capacity in steps (= frames)")
    a("--batch-size", type=int, default=64)
    a("--learning-starts", type=int, default=5_000)
    a("--stack", type=int, default=4, help="frames per observation")
    a("--n-step", type=int, default=3)
    a("--gamma", type=float, default=0.99)
    a("--lr", type=float, default=5e-4)
    a("--tau", type=float, default=0.01, help="Polyak rate of the target network")
    a("--eps-end", type=float, default=0.05)
    a("--eps-fraction", type=float, default=0.3, help="of --total-steps, epsilon 1 -> end")
    a("--eval-episodes", type=int, default=64)
    a("--seed", type=int, default=0)
    a("--out", default=None, help="write the learning curve to this PNG")
    args = p.parse_args(argv)
    if args.chunk_steps % args.num_envs or args.total_steps % args.chunk_steps:
        p.error("--chunk-steps must divide --total-steps and be a multiple of --num-envs")
    return args


class QNetwork(nn.Module):
    """`[B, 10, 10, C, K]` uint8 stacks -> Q-values `[B, A]`. A plain MLP: on CPU, the
    gradient of a 16-filter 3x3 conv net (batch 64) took 20x the time of this one's."""

    num_actions: int

    @nn.compact
    def __call__(self, stack: jax.Array) -> jax.Array:
        x = stack.reshape(stack.shape[0], -1).astype(jnp.float32)
        x = nn.relu(nn.Dense(256)(x))
        x = nn.relu(nn.Dense(256)(x))
        return nn.Dense(self.num_actions)(x)


def push(stack: jax.Array, obs: jax.Array, new_episode: jax.Array) -> jax.Array:
    """Stacks `[n, ..., K]` with `obs` `[n, ...]` appended as the newest frame; all older
    frames zero where a new episode starts (as the buffer rebuilds them)."""
    kept = jnp.where(new_episode[:, None, None, None, None], 0, stack[..., 1:])
    return jnp.concatenate([kept, obs[..., None]], -1)


class Carry(NamedTuple):
    params: Any            # {"online": ..., "target": ...}
    opt_state: Any
    buffer_state: Any
    env_state: Any
    stack: jax.Array       # [n, 10, 10, C, K] uint8, what the agent sees
    ep_return: jax.Array   # [n]
    key: jax.Array
    t: jax.Array           # env steps so far


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    env, env_params = gymnax.make(args.env)
    n, num_actions = args.num_envs, env.action_space(env_params).n
    frame = jnp.zeros(env.observation_space(env_params).shape, jnp.uint8)  # [10, 10, C]

    def env_step(key, s, action):  # gymnax resets an ended episode: obs is then the new first
        obs, s, r, term, trunc, _ = jax.vmap(env.step, (0, 0, 0, None))(
            jax.random.split(key, n), s, action, env_params)
        return obs.astype(jnp.uint8), s, r, term | trunc

    # One step as stored: the screen before the action, the action, its reward, and whether
    # the episode ended with it (the 1000-step time limit counts as an end: no bootstrap).
    example = {"obs": frame, "action": jnp.int32(0), "reward": jnp.float32(0),
               "done": jnp.bool_(False)}
    buffer = fbx.make_prioritised_n_step_buffer(
        args.buffer_size, args.batch_size, args.batch_size, add_batch_size=n,
        n_step=args.n_step, gamma=args.gamma, frame_stack={"obs": args.stack},
        episode_end_key="done")
    net = QNetwork(num_actions)
    k_init, k_reset, k_run, k_eval = jax.random.split(jax.random.key(args.seed), 4)
    # Jitted: one compiled program; eager init runs op by op, seconds of tiny compilations.
    online = jax.jit(net.init)(k_init, jnp.zeros((1, *frame.shape, args.stack), jnp.uint8))
    tx = optax.chain(optax.clip_by_global_norm(10.0), optax.adam(args.lr))
    buffer_state = buffer.init(example)

    stored = sum(x.nbytes for x in jax.tree.leaves(buffer_state))
    obs_bytes = buffer_state.experience["obs"].nbytes
    stacked = stored + (args.stack - 1) * obs_bytes
    print(f"buffer state: {stored / 1e6:.1f} MB with one frame per step; storing "
          f"{args.stack}-frame stacks: {stacked / 1e6:.1f} MB ({stacked / stored:.2f}x more)",
          flush=True)

    epsilon = optax.linear_schedule(1.0, args.eps_end, int(args.eps_fraction * args.total_steps))
    beta = optax.linear_schedule(0.4, 1.0, args.total_steps)

    def learn(params, opt_state, buffer_state, key, t):
        sample = buffer.sample(buffer_state, key)
        weights = buffer.importance_weights(buffer_state, sample, beta(t))
        tr = sample.experience  # NStepTransition: first, second, reward, discount

        def loss_fn(online):
            q = net.apply(online, tr.first["obs"])
            q_taken = jnp.take_along_axis(q, tr.first["action"][:, None], -1)[:, 0]
            a_star = jnp.argmax(net.apply(online, tr.second["obs"]), -1)  # double DQN
            q_next = net.apply(params["target"], tr.second["obs"])
            bootstrap = jnp.take_along_axis(q_next, a_star[:, None], -1)[:, 0]
            target = tr.reward + tr.discount * bootstrap  # discount: 0 past an episode end
            td = q_taken - jax.lax.stop_gradient(target)
            return jnp.mean(weights * optax.huber_loss(td)), td

        (loss, td), grads = jax.value_and_grad(loss_fn, has_aux=True)(params["online"])
        updates, opt_state = tx.update(grads, opt_state)
        online = optax.apply_updates(params["online"], updates)
        params = {"online": online,
                  "target": optax.incremental_update(online, params["target"], args.tau)}
        buffer_state = buffer.set_priorities(buffer_state, sample, jnp.abs(td) + 1e-3)
        return params, opt_state, buffer_state, loss

    def skip(params, opt_state, buffer_state, key, t):
        return params, opt_state, buffer_state, jnp.float32(jnp.nan)  # nan: no update

    def step(c: Carry, _):
        key, k_act, k_explore, k_env, k_learn = jax.random.split(c.key, 5)
        greedy = jnp.argmax(net.apply(c.params["online"], c.stack), -1)
        explore = jax.random.uniform(k_explore, (n,)) < epsilon(c.t)
        action = jnp.where(explore, jax.random.randint(k_act, (n,), 0, num_actions), greedy)
        obs, env_state, reward, done = env_step(k_env, c.env_state, action)
        buffer_state = buffer.add(c.buffer_state, {"obs": c.stack[..., -1], "action": action,
                                                   "reward": reward, "done": done})
        t = c.t + n
        go = buffer.can_sample(buffer_state) & (t >= args.learning_starts)
        params, opt_state, buffer_state, loss = jax.lax.cond(
            go, learn, skip, c.params, c.opt_state, buffer_state, k_learn, t)
        total = c.ep_return + reward
        metrics = {"return_sum": jnp.sum(jnp.where(done, total, 0.0)), "episodes": jnp.sum(done),
                   "loss": loss, "epsilon": epsilon(c.t)}
        return Carry(params, opt_state, buffer_state, env_state, push(c.stack, obs, done),
                     jnp.where(done, 0.0, total), key, t), metrics

    @functools.partial(jax.jit, donate_argnums=0)
    def train_chunk(carry: Carry):
        return jax.lax.scan(step, carry, None, length=args.chunk_steps // n)

    @jax.jit
    def evaluate(online, key, eps):
        """Returns `[eval_episodes]`, one full episode each: greedy (eps 0) or random (eps 1)."""
        m = args.eval_episodes
        k_reset, k_steps = jax.random.split(key)
        obs, s = jax.vmap(env.reset, (0, None))(jax.random.split(k_reset, m), env_params)
        stack = push(jnp.zeros((m, *frame.shape, args.stack), jnp.uint8),
                     obs.astype(jnp.uint8), jnp.ones(m, bool))

        def body(carry, key):
            stack, s, alive, ret = carry
            k_a, k_e, k_env = jax.random.split(key, 3)
            action = jnp.where(jax.random.uniform(k_e, (m,)) < eps,
                               jax.random.randint(k_a, (m,), 0, num_actions),
                               jnp.argmax(net.apply(online, stack), -1))
            obs, s, r, term, trunc, _ = jax.vmap(env.step, (0, 0, 0, None))(
                jax.random.split(k_env, m), s, action, env_params)
            done = term | trunc
            stack = push(stack, obs.astype(jnp.uint8), done)
            return (stack, s, alive & ~done, ret + jnp.where(alive, r, 0.0)), None

        init = (stack, s, jnp.ones(m, bool), jnp.zeros(m))
        keys = jax.random.split(k_steps, int(env_params.max_steps_in_episode))
        return jax.lax.scan(body, init, keys)[0][-1]

    random_return = float(np.mean(evaluate(online, k_eval, 1.0)))
    print(f"random policy: mean return {random_return:.2f} over {args.eval_episodes} episodes")

    @jax.jit  # one program, not dozens of eager ones
    def start(online, buffer_state, k_reset, key):
        obs, env_state = jax.vmap(env.reset, (0, None))(jax.random.split(k_reset, n), env_params)
        stack = push(jnp.zeros((n, *frame.shape, args.stack), jnp.uint8),
                     obs.astype(jnp.uint8), jnp.ones(n, bool))
        # Copies: jit would return an unchanged input as that same array (donated below).
        params = {k: jax.tree.map(jnp.copy, online) for k in ("online", "target")}
        return Carry(params, tx.init(online), buffer_state, env_state, stack, jnp.zeros(n),
                     key, jnp.int32(0))

    carry = start(online, buffer_state, k_reset, k_run)
    curve: list[tuple[int, float]] = []
    losses: list[float] = []
    t_train = time.perf_counter()
    for _ in range(args.total_steps // args.chunk_steps):
        tick = time.perf_counter()
        carry, m = train_chunk(carry)
        m = jax.device_get(m)
        steps, episodes = int(carry.t), int(m["episodes"].sum())
        mean_return = float(m["return_sum"].sum()) / max(episodes, 1)
        loss = float(np.nanmean(m["loss"])) if np.isfinite(m["loss"]).any() else float("nan")
        curve.append((steps, mean_return))
        losses.append(loss)
        print(f"step {steps:>8}  epsilon {m['epsilon'][-1]:.2f}  episodes {episodes:>5}  "
              f"mean return {mean_return:6.2f}  loss {loss:.4f}  "
              f"{args.chunk_steps / (time.perf_counter() - tick):,.0f} steps/s", flush=True)
    train_s = time.perf_counter() - t_train

    sample = jax.eval_shape(buffer.sample, carry.buffer_state, jax.random.key(1)).experience
    print("sampled stacks: first", sample.first["obs"].shape, "second",
          sample.second["obs"].shape, sample.first["obs"].dtype)
    greedy_return = float(np.mean(evaluate(carry.params["online"], k_eval, 0.0)))
    wall = time.perf_counter() - t_start
    print(f"greedy policy: mean return {greedy_return:.2f} over {args.eval_episodes} episodes "
          f"(random policy {random_return:.2f}); training {train_s:.0f} s, total {wall:.0f} s")

    if args.out:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(*zip(*curve), marker="o", label="training episodes (epsilon-greedy)")
        ax.axhline(random_return, color="grey", ls="--", label="random policy")
        ax.plot([curve[-1][0]], [greedy_return], "r*", ms=12, label="greedy, end")
        ax.set(xlabel="environment steps", ylabel="mean episode return", title=args.env)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out, dpi=100)
        print(f"wrote {args.out}")
    return {"curve": curve, "losses": losses, "random_return": random_return,
            "greedy_return": greedy_return, "wall_time_s": wall, "buffer_bytes": stored,
            "stacked_bytes": stacked}


if __name__ == "__main__":
    main()
