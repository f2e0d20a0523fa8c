"""The main job end to end: `examples/dqn_per.py` on flax_replay's buffer and on Flashbax's.

    python -m benchmarks.e2e --out benchmarks/results/e2e.md   # both arms, 3 rounds of 200,000
    python -m benchmarks.e2e --buffer flashbax --rounds 1
    python -m benchmarks.e2e -- --weights batch      # flags after `--` go to the example

Both arms run the example's own training: its flags (README's first command, with a shorter
`--total-steps`), its `make_state`, its jitted and donated `make_train_chunk` (act, step the
environments, add, sample with importance weights, double-DQN update, set priorities) and its
seeds. The only difference is the agent's `replay` submodule. The flax_replay arm is the
example as it is. The Flashbax arm swaps in `FlashbaxReplay`, a Linen module that keeps
`fbx.make_prioritised_flat_buffer`'s state (same capacity, min length, batch sizes, priority
exponent) in the "replay" collection, where the agent keeps ours, and gives the agent the
methods it calls: `add`, `can_sample`, `sample`, `importance_weights`, `set_priorities`.
Its importance weights are those of the example, `(P(i) / P_min) ** -beta`, from Flashbax's
sampling probabilities; with `--weights buffer` (the default) `P_min` is the smallest
probability of any item, which Flashbax (no min tree) can only get by reading every leaf.

Timed: the chunks of training only, as the example's own steps/s (its per-chunk greedy
evaluation and checkpoints are left out), after each arm is compiled once ahead of time (the
compile time is reported separately). Each round runs both arms from the same initial state
(checked: same parameters), their chunks interleaved and alternated (A B B A ...) so that a
change of the shared machine's load falls on both; the ratio is the median over rounds of
flax_replay's env steps per second over Flashbax's (> 1: flax_replay faster). Both arms'
final greedy returns are printed, so that the comparison is of two programs that learn.
A breakdown (per vectorised step, in a jitted scan on the trained state) shows where the time
goes: acting and stepping the environments, the add, and sample + weights + set_priorities;
the rest of a learning step is the learner; one more chunk of the training, timed alone,
gives the whole learning step. Writes `--out` if given (the committed results are
benchmarks/results/e2e*.md; see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "examples"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import flax_replay  # noqa: E402
from flax_replay._src.priorities import importance_weights  # noqa: E402

import dqn_per as dqn  # noqa: E402  (examples/dqn_per.py)

ARMS = ("flax_replay", "flashbax")
DEFAULT_STEPS = 200_000
BUFFER_PARTS = ("add", "sample+weights+set")  # the breakdown's parts that differ by arm
WHOLE = "whole step"


# ------------------------------------------------------------------ the Flashbax arm's buffer
class FlashbaxReplay(nn.Module):
    """Flashbax's prioritised flat buffer behind the methods the example's agent calls on its
    `flax_replay.linen.ReplayBuffer`. Its state (a Flashbax state dataclass) is the variable
    `"replay"/"state"`; nothing is in "priorities". The methods call Flashbax's functions."""

    buffer: Any      # fbx.make_prioritised_flat_buffer(...)
    experience: Any  # one stored step, no batch axes

    def setup(self) -> None:
        self.store = self.variable("replay", "state",
                                    lambda: self.buffer.init(dict(self.experience)))

    def __call__(self) -> None:
        self.store.value  # noqa: B018 (creates the empty buffer at init)

    def state(self) -> Any:
        return self.store.value

    def add(self, step: Any) -> None:
        """`step`: the tree of one vectorised step, leaves `[add_batch_size, ...]`."""
        self.store.value = self.buffer.add(self.store.value, dict(step))

    def can_sample(self) -> jax.Array:
        return self.buffer.can_sample(self.store.value)

    def sample(self, key: jax.Array) -> Any:
        return self.buffer.sample(self.store.value, key)

    def importance_weights(self, batch: Any, beta: jax.Array, normalise: str) -> jax.Array:
        """`[B]` weights from the sample's probabilities, as flax_replay computes them: over
        the largest weight in the buffer (the smallest positive probability, found here by
        reading every leaf of Flashbax's sum tree) or in the batch. Draws of probability 0
        weigh 0 (see `set_priorities`)."""
        tree = self.store.value.sum_tree_state
        drawn = batch.probabilities > 0
        if normalise == "buffer":
            first_leaf = 2 ** tree.tree_depth - 1
            leaves = tree.nodes[first_leaf:first_leaf + tree.capacity]
            p_min = jnp.min(jnp.where(leaves > 0, leaves, jnp.inf)) / tree.nodes[0]  # root: total
        else:
            p_min = jnp.ones(())  # unused by the "batch" normalisation
        p = jnp.where(drawn, batch.probabilities, p_min)  # no 0 ** -beta
        return jnp.where(drawn, importance_weights(p, p_min, beta, normalise), 0.0)

    def set_priorities(self, batch: Any, priorities: jax.Array) -> None:
        """Flashbax sets by index: nothing is added between the example's sample and its
        set_priorities, so no update is stale (flax_replay would drop stale ones).

        Draws of probability 0 keep priority 0. Flashbax 0.1.3's float32 sum tree updates its
        nodes by adding differences, so a node drifts from the sum of its children; a draw
        near the top of the last stratum can then descend into the tree's padding (leaf
        2 ** depth - 1, beyond the capacity: the data gathered there is clamped garbage, the
        probability 0). Unguarded, this run's weights become inf at about step 12,000, the
        loss and the tree NaN, and the agent never learns (Flashbax issue #52; a float64
        tree came in a later release)."""
        priorities = jnp.where(batch.probabilities > 0, priorities, 0.0)
        self.store.value = self.buffer.set_priorities(self.store.value, batch.indices,
                                                       priorities)


class FlashbaxAgent(dqn.Agent):
    """The example's agent, its `replay` submodule on Flashbax (same names, same params)."""

    def setup(self) -> None:
        self.online = dqn.QNetwork(self.num_actions, self.hidden)
        self.target = dqn.QNetwork(self.num_actions, self.hidden)
        self.replay = FlashbaxReplay(buffer=self.buffer, experience=self.experience)

    def running_index(self) -> jax.Array:
        return self.replay.state().running_index


def flashbax_state(args, env: dqn.VecEnv, key: jax.Array, state: flax_replay.TrainState
                   ) -> flax_replay.TrainState:
    """The example's initial `state` (`dqn.make_state(args, env, key)`) with the agent and the
    buffer variables replaced by Flashbax's (the params and optimizer state are the same)."""
    import flashbax as fbx

    buffer = fbx.make_prioritised_flat_buffer(
        max_length=args.buffer_size, min_length=args.batch_size,
        sample_batch_size=args.batch_size, add_batch_size=args.num_envs,
        priority_exponent=args.alpha,
    )
    agent = FlashbaxAgent(env.num_actions, tuple(args.hidden), buffer, env.stored_step(),
                          args.weights)
    variables = agent.init(key, jnp.zeros((1, *env.obs_shape)))
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)),
                        dict(variables["params"])["online"], state.params["online"])
    if not all(jax.tree.leaves(same)):
        raise AssertionError("the Flashbax agent's initial parameters differ from the example's")
    return state.replace(apply_fn=agent.apply, replay=variables["replay"], priorities={})


def initial_carry(args, env: dqn.VecEnv, state) -> dqn.Carry:
    """The carry of the example's `main` at step 0 (same keys)."""
    _, rng, _ = jax.random.split(jax.random.key(args.seed), 3)
    return dqn.initial_carry(args, env, state, rng, 0)


# ----------------------------------------------------------------------------------- a run
def make_evaluate(args, env: dqn.VecEnv) -> Callable:
    """The example's greedy evaluation (the online network's returns `[eval_episodes]`),
    made once for both arms (they share the network), so compiled once."""
    net = dqn.QNetwork(env.num_actions, tuple(args.hidden))

    @jax.jit
    def evaluate(params, key):
        q = functools.partial(net.apply, {"params": params["online"]})
        return dqn.greedy_returns(q, env, key, args.eval_episodes)

    return evaluate


class Arm:
    """One arm: its compiled chunk (compiled once, reused every round) and a `run()` that
    trains from the initial state and returns its figures."""

    def __init__(self, name: str, args, env: dqn.VecEnv, state: flax_replay.TrainState,
                 evaluate: Callable) -> None:
        self.name, self.args, self.env = name, args, env
        _, _, self.k_eval = jax.random.split(jax.random.key(args.seed), 3)
        # One initial carry, copied for every run: a new `make_state` would bring new
        # optimizer closures (static pytree metadata), which the compiled chunk refuses.
        self.initial = carry = initial_carry(args, env, state)
        tick = time.perf_counter()
        self.chunk = dqn.make_train_chunk(args, env).lower(carry).compile()
        self.compile_s = time.perf_counter() - tick
        self.evaluate = evaluate

    def fresh(self, carry: dqn.Carry | None = None) -> dqn.Carry:
        """A copy of the initial carry, or of `carry` (the chunk donates, hence consumes, its
        input)."""
        return jax.tree.map(lambda x: x.copy(), self.initial if carry is None else carry)

    def start(self) -> None:
        """A new run from the initial state."""
        self.carry = self.fresh()
        jax.block_until_ready(self.carry)
        self.seconds, self.steps = 0.0, 0

    def chunk_step(self) -> None:
        """One chunk of training, timed as the example times it (until its metrics are on
        the host)."""
        tick = time.perf_counter()
        self.carry, metrics = self.chunk(self.carry)
        metrics, steps = jax.device_get((metrics, self.carry.env_steps))
        self.seconds += time.perf_counter() - tick
        self.steps = int(steps)

    def finish(self) -> dict:
        """The run's figures, with the greedy return of its final parameters."""
        returns = jax.device_get(self.evaluate(self.carry.state.params, self.k_eval))
        self.last = self.carry
        return {"env_steps": self.steps, "updates": int(self.carry.state.step),
                "seconds": self.seconds, "sps": self.steps / self.seconds,
                "greedy_return": float(returns.mean())}


def run_round(arms: list[Arm], total_steps: int) -> list[dict]:
    """One run of each arm, their chunks interleaved (A B, B A, A B, ...): a change of the
    machine's load within the round falls on both arms alike."""
    for arm in arms:
        arm.start()
    c = 0
    while any(arm.steps < total_steps for arm in arms):
        for arm in (arms if c % 2 == 0 else arms[::-1]):
            if arm.steps < total_steps:
                arm.chunk_step()
        c += 1
    return [arm.finish() for arm in arms]


# ------------------------------------------------------------------------------ breakdown
def _scan(fn: Callable, n: int) -> Callable:
    """A jitted scan of `n` iterations of `fn` (carry -> carry)."""
    return jax.jit(lambda c: jax.lax.scan(lambda c, _: (fn(c), None), c, None, length=n)[0])


def parts(arm: Arm, n: int) -> dict[str, tuple[Callable, Any]]:
    """The parts of a learning step on the trained state, each as `(scanned fn, carry)`:
    acting + environment step, the add, sample + importance weights + set_priorities."""
    args, env, carry = arm.args, arm.env, arm.last
    state = carry.state
    beta = jnp.float32(0.7)

    def act_env(c):
        env_state, obs, key = c
        key, k_act, k_env = jax.random.split(key, 3)
        q = state.apply_fn({"params": state.params}, obs)
        action = dqn.epsilon_greedy(k_act, q, jnp.float32(0.1))
        obs, env_state, *_ = env.step(k_env, env_state, action)
        return env_state, obs, key

    step = {"obs": carry.obs, "action": jnp.zeros(args.num_envs, jnp.int32),
            "reward": jnp.ones(args.num_envs), "terminated": jnp.zeros(args.num_envs, bool),
            "truncated": jnp.zeros(args.num_envs, bool)}

    def add(s):
        return s.apply(step, method="add")[1]

    def sample_set(c):
        s, key = c
        key, k = jax.random.split(key)
        (batch, weights), s = s.apply(k, beta, method="sample")
        # Priorities that depend on the sampled data, so that the gather is not skipped.
        priorities = jnp.abs(batch.experience.first["obs"][:, 0]) * weights + 1e-3
        return s.apply(batch, priorities, method="set_priorities")[1], key

    key = jax.random.key(1)
    return {"act+env": (_scan(act_env, n), (carry.env_state, carry.obs, key)),
            "add": (_scan(add, n), state),
            "sample+weights+set": (_scan(sample_set, n), (state, key))}


def breakdown(arms: dict[str, Arm], n: int = 500, reps: int = 5) -> dict[str, dict[str, float]]:
    """Microseconds per vectorised step of each part (`parts`) of each arm, and of the whole
    learning step (`WHOLE`: one more chunk of the run's compiled training from its final
    state): best of `reps`, the arms alternated within each rep."""
    fns = {name: parts(arm, n) for name, arm in arms.items()}
    for per_arm in fns.values():
        for fn, carry in per_arm.values():
            jax.block_until_ready(fn(carry))  # compile
    best = {name: dict.fromkeys([*per_arm, WHOLE], float("inf")) for name, per_arm in fns.items()}
    for r in range(reps):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            for part, (fn, carry) in fns[name].items():
                tick = time.perf_counter()
                jax.block_until_ready(fn(carry))
                best[name][part] = min(best[name][part], 1e6 * (time.perf_counter() - tick) / n)
            arm = arms[name]
            carry = jax.block_until_ready(arm.fresh(arm.last))  # the chunk donates its input
            tick = time.perf_counter()
            jax.block_until_ready(arm.chunk(carry))
            per_step = (time.perf_counter() - tick) / (arm.args.chunk_steps // arm.args.num_envs)
            best[name][WHOLE] = min(best[name][WHOLE], 1e6 * per_step)
    return best


# ------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--buffer", choices=(*ARMS, "both"), default="both")
    p.add_argument("--total-steps", type=int, default=DEFAULT_STEPS,
                   help="env steps per run (the example's --total-steps; its schedules span it)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-breakdown", action="store_true")
    p.add_argument("--breakdown-steps", type=int, default=500,
                   help="iterations of each part's scan in the breakdown")
    p.add_argument("--out", type=Path, default=None,
                   help="markdown results (default: none; the full run writes "
                        "benchmarks/results/e2e.md)")
    p.add_argument("--cores", type=int, default=0,
                   help="pin the process to this many cores (0: all); on one core XLA:CPU "
                        "splits no operation across threads")
    p.add_argument("example", nargs="*", help="after `--`: more flags for the example")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    opts = parse_args(argv)
    if opts.cores:  # before the first computation creates the CPU client and its threads
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: opts.cores])
    args = dqn.parse_args(["--total-steps", str(opts.total_steps), "--no-progress",
                           *opts.example])
    env = dqn.VecEnv.make(args.env)
    names = ARMS if opts.buffer == "both" else (opts.buffer,)
    evaluate = make_evaluate(args, env)
    k_init = jax.random.split(jax.random.key(args.seed), 3)[0]  # as the example's `main`
    state = dqn.make_state(args, env, k_init)
    states = {"flax_replay": state, "flashbax": flashbax_state(args, env, k_init, state)
              if "flashbax" in names else None}
    arms = {name: Arm(name, args, env, states[name], evaluate) for name in names}
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(opts.rounds):
        order = list(names if r % 2 == 0 else names[::-1])
        for name, out in zip(order, run_round([arms[n] for n in order], args.total_steps)):
            runs[name].append(out)
            print(f"round {r + 1} {name}: {out['sps']:,.0f} env steps/s ({out['seconds']:.1f} s,"
                  f" {out['env_steps']} env steps, {out['updates']} updates), greedy return "
                  f"{out['greedy_return']:.1f}", flush=True)
    result: dict = {"args": args, "opts": opts, "runs": runs, "load": os.getloadavg(),
                    "compile_s": {n: a.compile_s for n, a in arms.items()}}
    if len(names) == 2:
        ratios = [a["sps"] / b["sps"] for a, b in zip(runs[ARMS[0]], runs[ARMS[1]])]
        result["ratios"], result["ratio"] = ratios, statistics.median(ratios)
        print(f"flax_replay / Flashbax env steps per second: median {result['ratio']:.3f} "
              f"(rounds: {', '.join(f'{x:.3f}' for x in ratios)}); load {result['load']}")
    if not opts.no_breakdown:
        result["breakdown"] = breakdown(arms, opts.breakdown_steps)
        for n, times in result["breakdown"].items():
            print(f"{n}: " + ", ".join(f"{k} {v:.1f} us" for k, v in times.items()))
    if opts.out is not None:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(report(result))
        print(f"wrote {opts.out}")
    return result


def report(result: dict) -> str:
    """The markdown of `main`'s result."""
    args, opts, runs = result["args"], result["opts"], result["runs"]
    lines = [
        "# End to end: examples/dqn_per.py on flax_replay's buffer and on Flashbax's", "",
        f"`python -m benchmarks.e2e --total-steps {opts.total_steps} --rounds {opts.rounds}"
        + (f" --cores {opts.cores}" if opts.cores else "")
        + (" -- " + " ".join(opts.example) if opts.example else "") + "`", "",
        f"CartPole-v1, {args.num_envs} envs, buffer {args.buffer_size:,}, batch "
        f"{args.batch_size}, learning from step {args.learning_starts:,}, "
        f"--weights {args.weights}, seed {args.seed}; {len(os.sched_getaffinity(0))} of "
        f"{os.cpu_count()} CPU cores (shared), "
        f"load average {' '.join(f'{x:.2f}' for x in result['load'])} at the end, "
        f"jax {jax.__version__}.", "",
        "| round | arm | env steps/s | training s | env steps | updates | greedy return |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, outs in runs.items():
        for r, o in enumerate(outs):
            lines.append(f"| {r + 1} | {name} | {o['sps']:,.0f} | {o['seconds']:.1f} | "
                         f"{o['env_steps']:,} | {o['updates']:,} | {o['greedy_return']:.1f} |")
    lines.append("")
    lines.append("Compile (once per arm, not timed above): " + ", ".join(
        f"{n} {s:.1f} s" for n, s in result["compile_s"].items()) + ".")
    if "ratio" in result:
        lines += ["", f"**flax_replay / Flashbax, env steps per second: {result['ratio']:.3f}**"
                  f" (median of the per-round ratios "
                  f"{', '.join(f'{x:.3f}' for x in result['ratios'])}; > 1: flax_replay "
                  "faster)."]
    if "breakdown" in result:
        cols = [c for c in next(iter(result["breakdown"].values())) if c != WHOLE]
        lines += ["", "Where the time goes: microseconds per vectorised step "
                  f"({args.num_envs} env steps), best of 5 with the arms alternated, on the "
                  "trained state. Each part alone in a jitted scan; the whole learning step "
                  "is one more chunk of the run's compiled training; the rest (whole minus "
                  "parts) is the learner (three Q-network passes and a gradient step on the "
                  "batch, Adam, Polyak), the `cond` and the loop. Last column: the run's "
                  "average (median round), under the load of the moment.", "",
                  "| arm | " + " | ".join(cols) + " | rest | whole step | run average |",
                  "| --- |" + " --- |" * (len(cols) + 3)]
        for n, times in result["breakdown"].items():
            run_avg = 1e6 * args.num_envs / statistics.median(o["sps"] for o in runs[n])
            rest = times[WHOLE] - sum(times[c] for c in cols)
            lines.append(f"| {n} | " + " | ".join(f"{times[c]:.1f}" for c in cols)
                         + f" | {rest:.1f} | {times[WHOLE]:.1f} | {run_avg:.1f} |")
        if len(result["breakdown"]) == 2:
            ours, theirs = (result["breakdown"][n] for n in ARMS)
            saved = sum(theirs[c] - ours[c] for c in BUFFER_PARTS)
            lines += ["", f"The buffer's parts ({', '.join(BUFFER_PARTS)}) take {saved:.1f} us "
                      "per step less on flax_replay; the whole learning steps differ by "
                      f"{theirs[WHOLE] - ours[WHOLE]:.1f} us, a ratio of "
                      f"{theirs[WHOLE] / ours[WHOLE]:.3f}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
