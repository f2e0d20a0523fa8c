"""What the two DQN examples share: flags, the vectorised environment, episode statistics,
greedy evaluation, schedules, the progress bar, the learning curve and the summary JSON.

Nothing here touches the replay buffer: the buffer code is the example itself.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import gymnax
import jax
import jax.numpy as jnp
import numpy as np
import optax

REPO_ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT_ROOT = REPO_ROOT / "checkpoints"


# ------------------------------------------------------------------------------------ flags
def make_parser(description: str, run_name: str) -> argparse.ArgumentParser:
    """Flags of both examples. The defaults solve CartPole-v1 (greedy return >= 475)."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    a = p.add_argument
    # Defaults: measured to solve CartPole-v1 (see README); why each matters is noted.
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
    a("--checkpoint-dir", type=Path, default=CHECKPOINT_ROOT / run_name,
      help="checkpoints, learning curve and summary go here")
    a("--checkpoint-every", type=int, default=4, help="chunks between checkpoints")
    a("--fresh", action="store_true", help="ignore (and replace) existing checkpoints")
    a("--no-progress", action="store_true", help="no progress bar (logs one line a chunk)")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Errors for flag combinations the step cannot honour."""
    if args.chunk_steps % args.num_envs:
        raise SystemExit(f"--chunk-steps ({args.chunk_steps}) must be a multiple of "
                         f"--num-envs ({args.num_envs})")
    if args.total_steps % args.chunk_steps:
        raise SystemExit(f"--total-steps ({args.total_steps}) must be a multiple of "
                         f"--chunk-steps ({args.chunk_steps})")


class Run(NamedTuple):
    """What both examples set up before building their agent."""

    args: argparse.Namespace
    timer: "Timer"
    run_dir: Path
    env: "Env"
    k_init: jax.Array
    rng: jax.Array
    k_eval: jax.Array


def start_run(description: str, run_name: str, argv=None) -> Run:
    """Flags, timer, run directory (cleared with --fresh), environment and the three keys."""
    args = make_parser(description, run_name).parse_args(argv)
    check_args(args)
    timer = Timer()
    run_dir = args.checkpoint_dir.resolve()
    if args.fresh:
        clear_run(run_dir)
    k_init, rng, k_eval = jax.random.split(jax.random.key(args.seed), 3)
    return Run(args, timer, run_dir, make_env(args.env), k_init, rng, k_eval)


# ------------------------------------------------------------------------------ environment
class Env(NamedTuple):
    """A gymnax environment vectorised over `[num_envs]` with auto-reset."""

    env: Any
    params: Any

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
        """`(obs, env_state, reward, terminated, truncated)`, each `[n, ...]`; `obs` is already
        the first observation of the next episode where one ended."""
        n = action.shape[0]
        obs, env_state, reward, terminated, truncated, _ = jax.vmap(
            self.env.step, (0, 0, 0, None)
        )(jax.random.split(key, n), env_state, action, self.params)
        return obs, env_state, reward, terminated, truncated


def make_env(name: str) -> Env:
    env, params = gymnax.make(name)
    return Env(env, params)


def example_step(env: Env) -> dict:
    """One stored step (no batch axes): the observation before the action, the action, and its
    reward and episode end. A flat buffer pairs it with the next step (`first`, `second`)."""
    return {
        "obs": jnp.zeros(env.obs_shape, jnp.float32),
        "action": jnp.zeros((), jnp.int32),
        "reward": jnp.zeros((), jnp.float32),
        "terminated": jnp.zeros((), bool),
        "truncated": jnp.zeros((), bool),
    }


# ---------------------------------------------------------------------------- DQN pieces
def epsilon_greedy(key: jax.Array, q: jax.Array, eps: jax.Array) -> jax.Array:
    """Actions `[n]` from Q-values `[n, A]`: random with probability `eps`, else greedy."""
    k_explore, k_action = jax.random.split(key)
    random_action = jax.random.randint(k_action, q.shape[:1], 0, q.shape[-1])
    explore = jax.random.uniform(k_explore, q.shape[:1]) < eps
    return jnp.where(explore, random_action, jnp.argmax(q, -1)).astype(jnp.int32)


def td_errors(q_first: jax.Array, q_second_online: jax.Array, q_second_target: jax.Array,
              pair: Any, gamma: float) -> tuple[jax.Array, jax.Array]:
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
    """Per-item loss `[B]` of the TD errors: squared, or Huber (delta 1)."""
    return 0.5 * jnp.square(td) if kind == "mse" else optax.huber_loss(td)


class Schedules(NamedTuple):
    """Functions of the environment step count."""

    epsilon: Callable
    beta: Callable
    lr: Callable


def schedules(args: argparse.Namespace) -> Schedules:
    """Epsilon and beta are functions of env steps; the learning rate of update count."""
    per_update = args.num_envs * args.train_every  # env steps per gradient update
    updates = max(1, (args.total_steps - args.learning_starts) // per_update)
    return Schedules(
        epsilon=optax.linear_schedule(args.eps_start, args.eps_end,
                                      int(args.eps_fraction * args.total_steps)),
        beta=optax.linear_schedule(args.beta_start, 1.0, args.total_steps),
        lr=(optax.cosine_decay_schedule(args.lr, updates, args.lr_end / args.lr)
            if args.lr_decay == "cosine" else optax.linear_schedule(args.lr, args.lr_end, updates)),
    )


def make_optimizer(args: argparse.Namespace) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(10.0),
                       optax.adam(schedules(args).lr, eps=args.adam_eps))


# ------------------------------------------------------------------------ episode statistics
class Episodes(NamedTuple):
    """Carried through the scan: the running return of each env `[n]`."""

    running: jax.Array


def track_episodes(ep: Episodes, reward: jax.Array, done: jax.Array):
    """New `Episodes` and `(sum, count)` of the returns of the episodes that ended now."""
    total = ep.running + reward
    finished = (jnp.sum(jnp.where(done, total, 0.0)), jnp.sum(done))
    return Episodes(jnp.where(done, 0.0, total)), finished


def evaluate(q_fn: Callable[[jax.Array], jax.Array], env: Env, key: jax.Array,
             episodes: int) -> jax.Array:
    """Returns `[episodes]` of the greedy policy `argmax q_fn(obs [n, ...])` (one full episode
    each, in parallel). Jit-compatible."""
    k_reset, k_steps = jax.random.split(key)
    obs, env_state = env.reset(k_reset, episodes)
    max_steps = int(env.params.max_steps_in_episode)

    def body(carry, key):
        obs, env_state, alive, ret = carry
        action = jnp.argmax(q_fn(obs), -1).astype(jnp.int32)
        obs, env_state, reward, terminated, truncated = env.step(key, env_state, action)
        ret = ret + jnp.where(alive, reward, 0.0)
        return (obs, env_state, alive & ~(terminated | truncated), ret), None

    init = (obs, env_state, jnp.ones((episodes,), bool), jnp.zeros((episodes,)))
    (_, _, _, ret), _ = jax.lax.scan(body, init, jax.random.split(k_steps, max_steps))
    return ret


# ---------------------------------------------------------------------------- bookkeeping
def _json_number(v: Any) -> Any:
    """NaN (no episode ended in a chunk, no update yet) is written as null: strict JSON."""
    if isinstance(v, (float, np.floating, jax.Array)):
        v = float(v)
        return None if np.isnan(v) else v
    return v


class History:
    """The learning curve, one row per chunk, kept as JSON lines next to the checkpoints so a
    resumed run draws the whole curve. Rows past the restored step are dropped."""

    def __init__(self, directory: Path, resume_step: int):
        self.path = Path(directory) / "history.jsonl"
        self.rows: list[dict] = []
        if resume_step and self.path.exists():
            for line in self.path.read_text().splitlines():
                row = json.loads(line)
                if row["step"] <= resume_step:
                    self.rows.append(row)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def append(self, **row: Any) -> None:
        row = {k: _json_number(v) for k, v in row.items()}
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def chunk_figures(metrics: dict) -> dict:
    """Per-chunk figures from the scan's stacked per-step outputs (host arrays)."""
    count = int(np.sum(metrics["episodes"]))
    learned = np.asarray(metrics["learned"], bool)
    return {
        "return": float(np.sum(metrics["return_sum"]) / count) if count else float("nan"),
        "episodes": count,
        "loss": float(np.mean(np.asarray(metrics["loss"])[learned])) if learned.any() else
        float("nan"),
    }


def progress(args: argparse.Namespace, start: int):
    """A tqdm bar over environment steps (disabled by `--no-progress`)."""
    from tqdm.auto import tqdm

    return tqdm(total=args.total_steps, initial=start, unit="step", unit_scale=True,
                disable=args.no_progress, dynamic_ncols=True)


def committed(tree: Any) -> Any:
    """`tree` placed (committed) on the first local device. A jitted chunk's outputs are
    committed; inputs that mix committed arrays (a restored checkpoint, a jit's output) with
    uncommitted ones (fresh `jnp` arrays) are another cache key, so the second chunk would
    compile again. Committing everything up front compiles the chunk once."""
    return jax.device_put(tree, jax.local_devices()[0])


class Timer:
    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start


def run_chunks(args: argparse.Namespace, start: int, chunk: Callable[[], tuple[int, dict]],
               evaluate: Callable[[int], Any], save: Callable[[int], Any], history: "History",
               timer: Timer) -> int:
    """The outer loop: `chunk()` runs one jitted chunk and returns `(env_steps, metrics)`;
    `evaluate(env_steps)` returns greedy episode returns (the learning curve);
    `save(env_steps)` checkpoints, every `--checkpoint-every` chunks and at the end. Returns
    the env steps reached."""
    bar = progress(args, start)
    steps, done = start, 0
    while steps < args.total_steps:
        tick = Timer()
        steps, metrics = chunk()
        figures = chunk_figures(jax.device_get(metrics))
        sps = args.chunk_steps / tick()  # training only, not the evaluation below
        figures["greedy"] = float(np.mean(jax.device_get(evaluate(steps))))
        done += 1
        history.append(step=steps, wall=timer(), sps=sps, **figures)
        bar.set_postfix(ret=f"{figures['return']:.1f}", greedy=f"{figures['greedy']:.1f}",
                        loss=f"{figures['loss']:.3g}", sps=f"{sps:,.0f}")
        bar.update(args.chunk_steps)
        if args.no_progress:
            print(f"step {steps}: return {figures['return']:.1f} greedy "
                  f"{figures['greedy']:.1f} loss {figures['loss']:.3g} sps {sps:,.0f}",
                  flush=True)
        if done % args.checkpoint_every == 0 or steps >= args.total_steps:
            save(steps)
            if args.no_progress:
                print(f"checkpoint at step {steps}", flush=True)
    bar.close()
    return steps


def finish(args: argparse.Namespace, run_dir: Path, history: "History", returns: Any,
           title: str, **figures: Any) -> dict:
    """Writes the learning curve and the summary JSON next to the checkpoints, prints where."""
    returns = np.asarray(returns)
    final = float(returns.mean())
    figures = {
        "env": args.env,
        "final_greedy_return": final,
        "final_greedy_return_min": float(returns.min()),
        "eval_episodes": int(returns.size),
        **figures,
        "solved": final >= 475.0,
    }
    png, summary = Path(run_dir) / "learning_curve.png", Path(run_dir) / "summary.json"
    plot_curve(png, history.rows, final, title, figures.get("resumed_from_step", 0))
    write_summary(summary, **figures)
    print(f"greedy return {final:.1f} (min {figures['final_greedy_return_min']:.0f}) over "
          f"{returns.size} episodes after {figures.get('env_steps')} env steps, "
          f"{figures.get('wall_time_s')} s")
    print(f"learning curve: {png}\nsummary: {summary}\ncheckpoints: {run_dir}", flush=True)
    return figures


OUTPUTS = ("history.jsonl", "learning_curve.png", "summary.json")


def clear_run(directory: Path) -> None:
    """`--fresh`: removes this example's checkpoint steps and outputs from `directory`, and
    nothing else (it may be a directory the user also keeps other things in)."""
    import shutil

    directory = Path(directory)
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        tmp = ".orbax-checkpoint-tmp" in entry.name
        if entry.name in OUTPUTS or entry.name.isdigit() or tmp:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def plot_curve(path: Path, rows: list[dict], final_return: float, title: str,
               resumed_from: int) -> None:
    """Greedy and training (epsilon-greedy) returns per chunk against env steps; the final
    evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))

    def curve(key):
        return [np.nan if r.get(key) is None else r[key] for r in rows]

    ax.plot(steps, curve("greedy"), color="C0", label="greedy return (after each chunk)")
    ax.plot(steps, curve("return"), color="C1", alpha=0.6, lw=1,
            label="training return (epsilon-greedy)")
    if rows:
        ax.scatter([steps[-1]], [final_return], color="C3", zorder=3,
                   label=f"final evaluation: {final_return:.1f}")
    if resumed_from:
        ax.axvline(resumed_from, color="grey", ls=":", label=f"resumed at {resumed_from}")
    ax.axhline(475, color="grey", ls="--", lw=0.8, label="solved (475)")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("episode return")
    ax.set_title(title)
    ax.set_ylim(0, 520)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_summary(path: Path, **figures: Any) -> None:
    figures = {k: _json_number(v) for k, v in figures.items()}
    Path(path).write_text(json.dumps(figures, indent=2) + "\n")
