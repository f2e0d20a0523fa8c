"""Recurrent DQN with R2D2-style sequence replay on a memory task, against a feed-forward DQN.

    python examples/r2d2_sequences.py                 # ~1-3 minutes on CPU, writes a PNG
    python examples/r2d2_sequences.py --iterations 600 --out curves.png

The task (cue recall, written here in JAX): an episode is `--episode-length` steps. The first
observation shows a cue (one of two), the next ones are blank, and the last one asks a
question; the action taken then earns +1 if it names the cue and -1 otherwise (other actions
earn 0). A feed-forward agent sees the same blank question whatever the cue, so its best
return is 0; an agent with memory can reach +1.

The replay: `make_prioritised_trajectory_buffer(..., episode_end_key="done",
sequence_mode="padded")`. Sequences start on the period grid or at an episode start, never run
into the next episode (padded with zeros, `mask` False), and carry the LSTM state stored when
their first step was acted on (R2D2's stored state). The learner unrolls `--burn-in` steps
without gradient to refresh that state, learns on the rest of the sequence's real steps, and
writes back `sequence_priorities(td, mask)` (R2D2's 0.9 max + 0.1 mean of |td|).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import flax_replay as fbx

ACTIONS, FEATURES = 2, 32


# ------------------------------------------------------------------------------ the task
def observe(t: jax.Array, cue: jax.Array, length: int) -> jax.Array:
    """`[N, 3]`: cue one-hot at t = 0, a question flag at t = length - 1, zeros between."""
    first = (t == 0).astype(jnp.float32)
    return jnp.stack([first * (cue == 0), first * (cue == 1),
                      (t == length - 1).astype(jnp.float32)], axis=-1)


def env_step(t, cue, action, key, length: int):
    last = t == length - 1
    reward = jnp.where(last, jnp.where(action == cue, 1.0, -1.0), 0.0)
    new_cue = jnp.where(last, jax.random.bernoulli(key, 0.5, cue.shape).astype(jnp.int32), cue)
    return jnp.where(last, 0, t + 1), new_cue, reward, last


# ------------------------------------------------------------------------------ networks
class Recurrent(nn.Module):
    @nn.compact
    def __call__(self, carry, obs):
        x = nn.relu(nn.Dense(FEATURES)(obs))
        carry, h = nn.OptimizedLSTMCell(FEATURES)(carry, x)
        return carry, nn.Dense(ACTIONS)(h)


class FeedForward(nn.Module):
    @nn.compact
    def __call__(self, carry, obs):  # the carry passes through unused: no memory
        x = nn.relu(nn.Dense(FEATURES)(obs))
        x = nn.relu(nn.Dense(FEATURES)(x))
        return carry, nn.Dense(ACTIONS)(x)


def zero_carry(n: int):
    return (jnp.zeros((n, FEATURES)), jnp.zeros((n, FEATURES)))


def unroll(net, params, carry, obs):
    """Q-values `[B, L, A]` of sequences `obs` `[B, L, 3]` from `carry` (`[B, F]` each)."""
    def step(c, o):
        c, q = net.apply(params, c, o)
        return c, q
    carry, q = jax.lax.scan(step, carry, jnp.swapaxes(obs, 0, 1))
    return carry, jnp.swapaxes(q, 0, 1)


# ------------------------------------------------------------------------------ training
def train(net, args, seed: int) -> list[float]:
    n, length = args.envs, args.episode_length
    buffer = fbx.make_prioritised_trajectory_buffer(
        add_batch_size=n, sample_batch_size=args.batch, sample_sequence_length=args.sequence,
        period=args.period, min_length_time_axis=args.sequence,
        max_length_time_axis=args.capacity, priority_exponent=0.6,
        episode_end_key="done", sequence_mode="padded")
    example = {"obs": jnp.zeros((3,)), "action": jnp.zeros((), jnp.int32),
               "reward": jnp.zeros(()), "done": jnp.zeros((), bool),
               "h": jnp.zeros((FEATURES,)), "c": jnp.zeros((FEATURES,))}
    key = jax.random.key(seed)
    params = net.init(key, zero_carry(1), jnp.zeros((1, 3)))
    optimiser = optax.adam(args.lr)
    carry0 = dict(
        params=params, target=params, opt=optimiser.init(params), replay=buffer.init(example),
        t=jnp.zeros((n,), jnp.int32), cue=jnp.zeros((n,), jnp.int32), carry=zero_carry(n),
        key=key, step=jnp.zeros((), jnp.int32))

    def act(s, eps):
        key, k_eps, k_act, k_env = jax.random.split(s["key"], 4)
        obs = observe(s["t"], s["cue"], length)
        new_carry, q = net.apply(s["params"], s["carry"], obs)
        explore = jax.random.uniform(k_eps, (n,)) < eps
        action = jnp.where(explore, jax.random.randint(k_act, (n,), 0, ACTIONS),
                           jnp.argmax(q, -1)).astype(jnp.int32)
        t, cue, reward, done = env_step(s["t"], s["cue"], action, k_env, length)
        h, c = s["carry"]
        step = {"obs": obs, "action": action, "reward": reward, "done": done, "h": h, "c": c}
        replay = buffer.add(s["replay"], jax.tree.map(lambda x: x[:, None], step))
        # A new episode starts from the zero state.
        new_carry = jax.tree.map(lambda x: jnp.where(done[:, None], 0.0, x), new_carry)
        s = dict(s, key=key, t=t, cue=cue, carry=new_carry, replay=replay)
        return s, (jnp.sum(reward * done), jnp.sum(done))

    def learn(s):
        key, k_sample = jax.random.split(s["key"])
        batch = buffer.sample(s["replay"], k_sample)
        x, mask = batch.experience, batch.mask
        b = args.burn_in
        start = (x["h"][:, 0], x["c"][:, 0])
        # Burn-in: refresh the stored state without gradient, for both networks.
        warm, _ = unroll(net, s["params"], start, x["obs"][:, :b])
        warm = jax.lax.stop_gradient(warm)
        warm_t, _ = unroll(net, s["target"], start, x["obs"][:, :b])
        _, q_next = unroll(net, s["target"], warm_t, x["obs"][:, b:])
        r, a, d = x["reward"][:, b:], x["action"][:, b:], x["done"][:, b:]
        m = mask[:, b:]
        # Step t learns if it is real and either ends its episode or its successor is real.
        nxt = jnp.concatenate([m[:, 1:], jnp.zeros_like(m[:, :1])], axis=1)
        valid = m & (d | nxt)
        boot = jnp.concatenate([jnp.max(q_next[:, 1:], -1), jnp.zeros_like(r[:, :1])], 1)
        y = r + args.gamma * (1.0 - d) * boot
        w = buffer.importance_weights(s["replay"], batch, 0.6)

        def loss_fn(params):
            _, q = unroll(net, params, warm, x["obs"][:, b:])
            qa = jnp.take_along_axis(q, a[..., None], -1)[..., 0]
            td = jnp.where(valid, qa - jax.lax.stop_gradient(y), 0.0)
            loss = jnp.sum(w[:, None] * td ** 2) / jnp.maximum(jnp.sum(valid), 1)
            return loss, td

        (_, td), grads = jax.value_and_grad(loss_fn, has_aux=True)(s["params"])
        updates, opt = optimiser.update(grads, s["opt"], s["params"])
        params = optax.apply_updates(s["params"], updates)
        prio = fbx.sequence_priorities(td, valid) + 1e-3
        replay = buffer.set_priorities(s["replay"], batch, prio)
        step = s["step"] + 1
        target = jax.tree.map(lambda o, t: jnp.where(step % args.target_every == 0, o, t),
                              params, s["target"])
        return dict(s, key=key, params=params, opt=opt, replay=replay, target=target,
                    step=step)

    def iteration(s, i):
        eps = jnp.maximum(args.eps_end, 1.0 - i / (0.4 * args.iterations))
        s, stats = act(s, eps)
        return learn(s), stats

    @jax.jit
    def warmup(s):
        return jax.lax.scan(lambda s, _: act(s, 1.0), s, None, length=2 * args.sequence)[0]

    @jax.jit
    def chunk(s, i0):
        return jax.lax.scan(iteration, s, i0 + jnp.arange(args.log_every))

    s = warmup(carry0)
    curve = []
    for i0 in range(0, args.iterations, args.log_every):
        s, (ret, eps_done) = chunk(s, i0)
        curve.append(float(jnp.sum(ret) / jnp.maximum(jnp.sum(eps_done), 1)))
    return curve


def main(argv: Any = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--envs", type=int, default=16)
    p.add_argument("--episode-length", type=int, default=4)
    p.add_argument("--sequence", type=int, default=6)
    p.add_argument("--burn-in", type=int, default=2)
    p.add_argument("--period", type=int, default=2)
    p.add_argument("--capacity", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--gamma", type=float, default=0.9)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eps-end", type=float, default=0.05)
    p.add_argument("--target-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="checkpoints/r2d2_sequences.png")
    args = p.parse_args(argv)
    curves = {}
    for name, net in (("LSTM (R2D2 sequences)", Recurrent()), ("feed-forward", FeedForward())):
        t0 = time.perf_counter()
        curves[name] = train(net, args, args.seed)
        print(f"{name}: final return {curves[name][-1]:+.3f} (mean of the last "
              f"{args.log_every} iterations' episodes), {time.perf_counter() - t0:.0f} s",
              flush=True)
    if args.out:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name, curve in curves.items():
            xs = [(i + 1) * args.log_every * args.envs for i in range(len(curve))]
            ax.plot(xs, curve, label=name)
        ax.set_xlabel("environment steps")
        ax.set_ylabel("episode return")
        ax.set_title(f"cue recall, {args.episode_length}-step episodes")
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out, dpi=100)
        print(f"wrote {args.out}")
    return curves


if __name__ == "__main__":
    main()
