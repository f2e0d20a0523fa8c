"""Offline DQN from a vault: record a DQN run's experience to disk, then train a new agent from
the vault alone (no environment steps), on gymnax CartPole-v1.

    python examples/offline_dqn.py                 # record, then train offline
    python examples/offline_dqn.py --skip-record   # train offline from the recorded vault

1. Record: the prioritised DQN of `dqn_per.py` (same agent, same jitted chunk) learns online;
   after every chunk its buffer state is appended to a `flax_replay.vault.Vault` (only the new
   steps; the buffer wraps several times, the vault keeps everything, priorities included).
   The vault is in Flashbax's format: `flashbax.vault.Vault` reads it too.
2. Offline: the whole vault is loaded with `vault.into_buffer` into a uniform flat buffer of
   its size, and a fresh double DQN (with a small conservative, CQL-style, penalty on the
   Q-values of actions the data did not take) trains from it, jitted and scanned, never
   touching the environment except to evaluate the greedy policy after every chunk.

Outputs in `--out-dir`: `vaults/` (the dataset), `learning_curve.png`, `summary.json`.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `dqn_per`, run from anywhere

import flax_replay
from flax_replay import checkpoint
from flax_replay.vault import Vault

import dqn_per

VAULT_NAME, VAULT_UID = "cartpole_dqn", "record"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--out-dir", type=Path, default=checkpoint.default_directory("offline_dqn"))
    a("--skip-record", action="store_true", help="reuse the vault in --out-dir")
    a("--record-steps", type=int, default=100_000, help="environment steps recorded (all envs)")
    a("--chunk-steps", type=int, default=10_000, help="env steps per recorded chunk (a write)")
    a("--num-envs", type=int, default=8)
    a("--buffer-size", type=int, default=40_000,
      help="the online agent's replay capacity (smaller than what is recorded: it wraps)")
    a("--learning-starts", type=int, default=5_000)
    a("--updates", type=int, default=30_000, help="offline gradient updates")
    a("--update-chunk", type=int, default=2_000, help="offline updates per evaluation")
    a("--batch-size", type=int, default=256)
    a("--lr", type=float, default=3e-4, help="Adam learning rate, cosine-decayed to --lr-end")
    a("--lr-end", type=float, default=1e-5)
    a("--gamma", type=float, default=0.98)
    a("--tau", type=float, default=0.005, help="Polyak rate of the target network")
    a("--cql-alpha", type=float, default=0.1,
      help="weight of the conservative penalty logsumexp(Q) - Q(data action); 0: plain DQN")
    a("--hidden", type=int, nargs="+", default=[128, 128])
    a("--eval-episodes", type=int, default=16)
    a("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.updates % args.update_chunk:
        p.error("--updates must be a multiple of --update-chunk")
    return args


# ------------------------------------------------------------------------------ 1. record
def record(args, env: dqn_per.VecEnv, vault_dir: Path) -> dict:
    """Runs dqn_per's online agent and appends its buffer to the vault after every chunk."""
    online = dqn_per.parse_args([
        "--total-steps", str(args.record_steps), "--chunk-steps", str(args.chunk_steps),
        "--num-envs", str(args.num_envs), "--buffer-size", str(args.buffer_size),
        "--learning-starts", str(args.learning_starts), "--batch-size", str(args.batch_size),
        "--seed", str(args.seed), "--hidden", *map(str, args.hidden),
    ], run_name="offline_dqn")
    k_init, k_reset, key = jax.random.split(jax.random.key(args.seed), 3)
    state = dqn_per.make_state(online, env, k_init)
    buffer = state.apply_fn.__self__.buffer  # the agent's PrioritisedBuffer definition
    train_chunk = dqn_per.make_train_chunk(online, env)
    obs, env_state = env.reset(k_reset, args.num_envs)
    carry = dqn_per.Carry(state, env_state, obs, jnp.zeros(args.num_envs), key,
                          jnp.asarray(0, jnp.int32))
    carry = jax.device_put(carry, jax.local_devices()[0])
    vault, returns = None, []
    while int(carry.env_steps) < args.record_steps:
        carry, metrics = train_chunk(carry)
        buf_state, _ = carry.state.apply(method=lambda m: m.replay.state())
        if vault is None:
            vault = Vault(VAULT_NAME, buf_state.experience, rel_dir=str(vault_dir),
                          vault_uid=VAULT_UID, metadata={"env": args.env_name,
                                                         "recorded_by": "examples/dqn_per.py"})
        vault.write(buf_state, buffer=buffer)  # the new steps only (and the priorities)
        m = jax.device_get(metrics)
        if m["episodes"].sum():
            returns.append(float(m["return_sum"].sum() / m["episodes"].sum()))
        print(f"recorded {int(carry.env_steps)} env steps: vault holds {vault.vault_index} "
              f"steps x {vault.rows} rows; training return {returns[-1] if returns else 0:.1f}",
              flush=True)
    assert vault is not None
    return {"vault_steps_per_row": vault.vault_index, "vault_rows": vault.rows,
            "dataset_mean_episode_return": float(np.mean(returns)) if returns else 0.0}


# ---------------------------------------------------------------------------- 2. offline
def train_offline(args, env: dqn_per.VecEnv, vault_dir: Path) -> dict:
    vault = Vault(VAULT_NAME, rel_dir=str(vault_dir), vault_uid=VAULT_UID)
    n, rows = vault.vault_index, vault.rows
    buffer = flax_replay.make_flat_buffer(max_length=n * rows, min_length=args.batch_size,
                                          sample_batch_size=args.batch_size,
                                          add_batch_size=rows)
    data = vault.into_buffer(buffer)  # read-only from here on: never donated
    q_net = dqn_per.QNetwork(env.num_actions, tuple(args.hidden))
    online = q_net.init(jax.random.key(args.seed + 1), jnp.zeros((1, *env.obs_shape)))
    params = {"online": online, "target": jax.tree.map(jnp.copy, online)}
    # Decayed: with no new data coming, a late high learning rate only chases noise.
    tx = optax.adam(optax.cosine_decay_schedule(args.lr, args.updates, args.lr_end / args.lr))
    opt_state = tx.init(params["online"])

    def update(data, carry, key):
        params, opt_state = carry
        pair = buffer.sample(data, key).experience

        def loss_fn(p):
            q_first = q_net.apply(p, pair.first["obs"])
            td, has_target = dqn_per.td_errors(
                q_first, q_net.apply(p, pair.second["obs"]),
                q_net.apply(params["target"], pair.second["obs"]), pair, args.gamma)
            q_taken = jnp.take_along_axis(q_first, pair.first["action"][:, None], -1)[:, 0]
            conservative = jax.nn.logsumexp(q_first, -1) - q_taken
            return jnp.mean(has_target * (0.5 * td ** 2 + args.cql_alpha * conservative))

        loss, grads = jax.value_and_grad(loss_fn)(params["online"])
        updates, opt_state = tx.update(grads, opt_state)
        new_online = optax.apply_updates(params["online"], updates)
        target = optax.incremental_update(new_online, params["target"], args.tau)
        return ({"online": new_online, "target": target}, opt_state), loss

    @functools.partial(jax.jit, donate_argnums=(0,))  # the networks and optimizer state
    def train_chunk(carry, data, key):
        keys = jax.random.split(key, args.update_chunk)
        return jax.lax.scan(functools.partial(update, data), carry, keys)

    @jax.jit
    def evaluate(online, key):
        return dqn_per.greedy_returns(functools.partial(q_net.apply, online), env, key,
                                      args.eval_episodes)

    key = jax.random.key(args.seed + 2)
    carry, curve = (params, opt_state), []
    for i in range(args.updates // args.update_chunk):
        key, k_train, k_eval = jax.random.split(key, 3)
        carry, losses = train_chunk(carry, data, k_train)
        greedy = float(np.mean(jax.device_get(evaluate(carry[0]["online"], k_eval))))
        curve.append({"updates": (i + 1) * args.update_chunk, "greedy": greedy,
                      "loss": float(np.mean(jax.device_get(losses)))})
        print(f"offline updates {curve[-1]['updates']}: greedy return {greedy:.1f} "
              f"loss {curve[-1]['loss']:.3g}", flush=True)
    return {"curve": curve, "final_greedy_return": curve[-1]["greedy"],
            "offline_buffer_current_index": int(data.current_index),
            "offline_buffer_is_full": bool(data.is_full)}


def plot(path: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = summary["offline"]["curve"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([c["updates"] for c in curve], [c["greedy"] for c in curve], color="C0",
            marker="o", ms=3, label="offline agent: greedy return")
    ds = summary["record"].get("dataset_mean_episode_return")
    if ds is not None:
        ax.axhline(ds, color="C1", ls="-.", label=f"dataset: mean episode return {ds:.0f}")
    ax.axhline(475, color="grey", ls="--", lw=0.8, label="solved (475)")
    ax.set(xlabel="offline gradient updates (no environment steps)", ylabel="episode return",
           title="Offline DQN on CartPole-v1 from a vault", ylim=(0, 520))
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    args.env_name = "CartPole-v1"
    t0 = time.perf_counter()
    out = args.out_dir.resolve()
    vault_dir = out / "vaults"
    env = dqn_per.VecEnv.make(args.env_name)
    summary: dict = {"env": args.env_name}
    if args.skip_record:
        old = out / "summary.json"
        summary["record"] = json.loads(old.read_text())["record"] if old.exists() else {}
    else:
        shutil.rmtree(vault_dir / VAULT_NAME / VAULT_UID, ignore_errors=True)
        summary["record"] = record(args, env, vault_dir)
    summary["record_wall_s"] = round(time.perf_counter() - t0, 1)
    summary["offline"] = train_offline(args, env, vault_dir)
    summary["wall_time_s"] = round(time.perf_counter() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    plot(out / "learning_curve.png", summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"offline greedy return {summary['offline']['final_greedy_return']:.1f}; curve: "
          f"{out / 'learning_curve.png'}; vault: {vault_dir / VAULT_NAME / VAULT_UID}")
    return summary


if __name__ == "__main__":
    main()
