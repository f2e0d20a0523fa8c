"""Run a published program that uses Flashbax twice: as published, and with only its Flashbax
imports rewritten to flax_replay; same seed, same budget, one fresh process per run.

    python -m benchmarks.published PROGRAM CHECKOUT [--budget N] [--seed S] [--repeats R]
    python -m benchmarks.published --names CHECKOUT   # Flashbax names it uses that we lack

PROGRAM is one of `PROGRAMS` below; CHECKOUT is a checkout of its repository (nothing of it is
kept: it is copied into a temporary directory, and for the flax_replay run only its import
lines are rewritten: `import flashbax as X` -> `import flax_replay as X`, `import flashbax` ->
`import flax_replay as flashbax`, `from flashbax.M import N` -> `from flax_replay.M import N`).
It needs a Python environment of its own with both libraries and the program's dependencies
(not this repository's test environment), e.g.

    python3 -m venv ../pub && ../pub/bin/pip install -e . flashbax==0.1.3 wandb hydra-core \
        distrax rlax tensorflow-probability stoa-env neptune tensorboard_logger ...
    ../pub/bin/pip install --no-deps --target ../gymnax008 gymnax==0.0.8
    PYTHONPATH=../gymnax008 ../pub/bin/python -m benchmarks.published purejaxrl_dqn ../purejaxrl

(PureJaxRL's DQN and Stoix's gymnax adapter use gymnax 0.0.x's `step`; JaxMARL runs with
either.) Each run imports the program's module and calls the program's own entry point with
the program's own configuration; the driver changes only the budget (total environment steps,
and for Stoix the number of evaluations) and the seed, and reads the returns the program
computes. In the flax_replay run, importing `flashbax` fails (and in the Flashbax run,
importing `flax_replay`), so a missed rewrite cannot silently run the other library. Two JAX
names that the programs' other dependencies still use are bound for both runs alike:
`jax.tree_map` (removed in JAX 0.6; PureJaxRL and gymnax 0.0.8 call it) and
`jax.interpreters.xla.pytype_aval_mappings` (TensorFlow Probability 0.25, under distrax).
Runs alternate between the libraries (A B A B ...); the wall time is the whole entry point
(environment set-up, compilation, training and evaluation), measured in the child process.

Prints one JSON line per run and a Markdown summary row per library.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

LIBS = ("flashbax", "flax_replay")

# `import flashbax` / `import flashbax.x.y` / `import flashbax as fbx` (one module per line) and
# `from flashbax[.x.y] import ...`. Anything else that names flashbax is left alone (and would
# then fail loudly in the flax_replay run, see _BlockImport).
_IMPORT = re.compile(r"^(?P<indent>[ \t]*)import[ \t]+flashbax(?P<sub>(?:\.\w+)*)"
                     r"(?:[ \t]+as[ \t]+(?P<alias>\w+))?[ \t]*(?P<rest>#.*)?$", re.M)
_FROM = re.compile(r"^(?P<indent>[ \t]*)from[ \t]+flashbax(?P<sub>(?:\.\w+)*)[ \t]+import\b", re.M)


def rewrite_imports(source: str) -> tuple[str, int]:
    """`source` with its Flashbax imports pointed at flax_replay, and how many were changed."""

    def _import(m: re.Match[str]) -> str:
        indent, sub, alias = m["indent"], m["sub"], m["alias"]
        if alias:
            return f"{indent}import flax_replay{sub} as {alias}"
        if sub:  # `import flashbax.a.b` binds `flashbax`: keep that name bound to our package
            return f"{indent}import flax_replay{sub}; import flax_replay as flashbax"
        return f"{indent}import flax_replay as flashbax"

    source, n1 = _IMPORT.subn(_import, source)
    source, n2 = _FROM.subn(lambda m: f"{m['indent']}from flax_replay{m['sub']} import", source)
    return source, n1 + n2


def copy_program(checkout: str, dest: str, rewrite: bool) -> int:
    """Copy `checkout` to `dest` (no .git, no images); rewrite imports in its .py files if asked.
    Returns the number of import lines rewritten."""
    shutil.copytree(checkout, dest, ignore=shutil.ignore_patterns(
        ".git", "*.png", "*.gif", "*.jpg", "*.mp4", "*.pdf", "__pycache__"))
    changed = 0
    if rewrite:
        for root, _, files in os.walk(dest):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    with open(path, encoding="utf-8") as f:
                        text, n = rewrite_imports(f.read())
                    if n:
                        with open(path, "w", encoding="utf-8") as f:
                            f.write(text)
                        changed += n
    return changed


def flashbax_names(checkout: str) -> list[tuple[str, str, str]]:
    """Every Flashbax name that the .py files under `checkout` import or read: `(module,
    attribute path or "", file)`, e.g. `("flashbax", "make_flat_buffer", "dqn.py")`,
    `("flashbax.buffers.trajectory_buffer", "BufferState", ...)`."""
    import ast

    found = set()
    for root, _, files in os.walk(checkout):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            try:
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError):
                continue
            rel = os.path.relpath(path, checkout)
            bound: dict[str, str] = {}  # local name -> the module it is bound to
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    for a in node.names:
                        if a.name.split(".")[0] == "flashbax":
                            bound[a.asname or "flashbax"] = a.name if a.asname else "flashbax"
                            found.add((a.name, "", rel))
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                        and node.module.split(".")[0] == "flashbax":
                    for a in node.names:
                        found.add((node.module, a.name, rel))
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute) and not isinstance(node.ctx, ast.Store):
                    chain, base = [], node
                    while isinstance(base, ast.Attribute):
                        chain.append(base.attr)
                        base = base.value
                    if isinstance(base, ast.Name) and base.id in bound:
                        found.add((bound[base.id], ".".join(reversed(chain)), rel))
    return sorted(found)


def missing_in_flax_replay(names: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """The entries of `flashbax_names` that do not resolve under `flax_replay`."""
    import importlib

    missing = []
    for module, attr, rel in names:
        try:
            obj: Any = importlib.import_module("flax_replay" + module[len("flashbax"):])
        except ImportError:
            missing.append((module, attr, rel))
            continue
        for part in attr.split(".") if attr else []:
            if hasattr(obj, part):
                obj = getattr(obj, part)
                continue
            try:  # a submodule not imported by its package
                obj = importlib.import_module(f"{obj.__name__}.{part}")
            except (ImportError, AttributeError):
                missing.append((module, attr, rel))
                break
            if not hasattr(obj, "__name__"):
                break
    return missing


# ---------------------------------------------------------------- the drivers (child process)


def _final_mean(values: Any, fraction: float = 0.05) -> float:
    """Mean of the last `fraction` of a [seeds, updates] (or [updates]) curve."""
    import numpy as np

    arr = np.asarray(values, dtype=np.float64)
    arr = arr.reshape(-1, arr.shape[-1]) if arr.ndim > 1 else arr[None]
    k = max(1, int(round(arr.shape[-1] * fraction)))
    return float(arr[:, -k:].mean())


def _edit_config_at_make_train(module: Any, edit: Callable[[dict], None]) -> None:
    """Wrap `module.make_train(config, ...)` so that `edit` changes the budget in the config
    the program itself built, just before the program's own `make_train` reads it."""
    original = module.make_train

    def make_train(config: Any, *args: Any, **kwargs: Any) -> Any:
        edit(config)
        return original(config, *args, **kwargs)

    module.make_train = make_train


class _KeepBlocked:
    """Patch `jax.block_until_ready` to keep the last value it returns: the programs block on
    their jitted train output and then drop it."""

    def __enter__(self) -> "_KeepBlocked":
        import jax

        self.real, self.value = jax.block_until_ready, None

        def block(x: Any) -> Any:
            self.value = self.real(x)
            return self.value

        jax.block_until_ready = block
        return self

    def __exit__(self, *exc: Any) -> None:
        import jax

        jax.block_until_ready = self.real


def _run_purejaxrl_dqn(copy: str, seed: int, budget: int | None) -> dict:
    """PureJaxRL's purejaxrl/dqn.py: `main()` with its own config; flat buffer, jitted and
    `.replace`d, inside a vmap over seeds."""
    if seed != 0:  # main() makes its key from its own config's SEED before make_train
        raise ValueError("purejaxrl_dqn runs with its published seed 0 only")
    sys.path.insert(0, os.path.join(copy, "purejaxrl"))
    import dqn  # type: ignore[import-not-found]

    out: dict = {}

    def edit(config: dict) -> None:
        if budget is not None:
            config["TOTAL_TIMESTEPS"] = budget
            config["NUM_UPDATES"] = config["TOTAL_TIMESTEPS"] // config["NUM_ENVS"]
        out["config"] = {k: config[k] for k in ("TOTAL_TIMESTEPS", "NUM_ENVS", "BUFFER_SIZE",
                                                 "BUFFER_BATCH_SIZE", "SEED")}

    _edit_config_at_make_train(dqn, edit)
    with _KeepBlocked() as kept:
        t0 = time.perf_counter()
        dqn.main()
        wall = time.perf_counter() - t0
    metrics = kept.value["metrics"]
    return {"wall_s": wall, "return": _final_mean(metrics["returns"]),
            "updates": int(metrics["updates"][..., -1].max()), "config": out["config"]}


def _hydra_config(config_dir: str, name: str, overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(config_name=name, overrides=overrides)


def _run_stoix(system: str, copy: str, seed: int, budget: int | None) -> dict:
    """Stoix's stoix/systems/q_learning/<system>.py: `run_experiment(cfg)` with the system's
    default Hydra config (CartPole-v1 from gymnax); buffers pmapped over devices and vmapped
    over `update_batch_size`. The budget sets `arch.total_timesteps` and 5 evaluations."""
    import importlib

    from omegaconf import OmegaConf

    sys.path.insert(0, copy)
    os.chdir(copy)  # the default configs search `stoix/configs` relative to the working dir
    overrides = [f"arch.seed={seed}", "logger.loggers.console.enabled=False"]
    if budget is not None:
        overrides += [f"arch.total_timesteps={budget}", "arch.num_evaluation=5"]
    cfg = _hydra_config(os.path.join(copy, "stoix/configs/default/anakin"),
                        f"default_{system}", overrides)
    OmegaConf.set_struct(cfg, False)
    module = importlib.import_module(f"stoix.systems.q_learning.{system}")
    t0 = time.perf_counter()
    ret = module.run_experiment(cfg)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "return": float(ret),
            "config": {"total_timesteps": cfg.arch.total_timesteps,
                       "total_num_envs": cfg.arch.total_num_envs,
                       "total_buffer_size": cfg.system.total_buffer_size,
                       "total_batch_size": cfg.system.total_batch_size, "seed": seed}}


def _run_jaxmarl_iql_rnn(copy: str, seed: int, budget: int | None) -> dict:
    """JaxMARL's baselines/QLearning/iql_rnn.py: `single_run(config)` with its Hydra config and
    `alg=ql_rnn_mpe` (MPE simple spread, 3 agents); trajectory buffer of multi-agent
    dict-of-agents timesteps, inside a vmap over seeds."""
    import jax

    sys.path.insert(0, copy)
    sys.path.insert(0, os.path.join(copy, "baselines/QLearning"))
    os.chdir(copy)
    import iql_rnn  # type: ignore[import-not-found]

    overrides = ["+alg=ql_rnn_mpe", f"SEED={seed}", "SAVE_PATH=null"]
    if budget is not None:
        overrides.append(f"alg.TOTAL_TIMESTEPS={budget}")
    cfg = _hydra_config(os.path.join(copy, "baselines/QLearning/config"), "config", overrides)
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(cfg)
    out: dict = {}

    def edit(config: dict) -> None:
        out["config"] = {k: config[k] for k in ("TOTAL_TIMESTEPS", "NUM_ENVS", "NUM_STEPS",
                                                 "BUFFER_SIZE", "BUFFER_BATCH_SIZE", "SEED")}

    _edit_config_at_make_train(iql_rnn, edit)
    with _KeepBlocked() as kept:
        t0 = time.perf_counter()
        iql_rnn.single_run(config)
        wall = time.perf_counter() - t0
    # The program logs its metrics only through wandb callbacks (its scan returns None); its
    # last greedy test (TEST_NUM_ENVS episodes) stays in the runner state: runner_state[2],
    # {"returned_episode_returns_<agent>": [seeds], ...}.
    test_state = kept.value["runner_state"][2]
    per_agent = [float(jax.numpy.mean(v)) for k, v in test_state.items()
                 if k.startswith("returned_episode_returns")]
    return {"wall_s": wall, "config": out["config"], "return": sum(per_agent) / len(per_agent),
            "return_per_agent": per_agent}


@dataclasses.dataclass(frozen=True)
class Program:
    repo: str
    buffer: str
    run: Callable[[str, int, int | None], dict]
    default_budget: int | None  # None: the program's own


PROGRAMS: dict[str, Program] = {
    "purejaxrl_dqn": Program("luchris429/purejaxrl", "flat (add_sequences=False), .replace(jit)",
                             _run_purejaxrl_dqn, None),
    "stoix_ff_dqn": Program("EdanToledo/Stoix", "item (pmap x vmap)",
                            lambda c, s, b: _run_stoix("ff_dqn", c, s, b), 50_000),
    "stoix_ff_rainbow": Program("EdanToledo/Stoix",
                                "prioritised trajectory, max_size, n-step (pmap x vmap)",
                                lambda c, s, b: _run_stoix("ff_rainbow", c, s, b), 50_000),
    "jaxmarl_iql_rnn": Program("FLAIROx/JaxMARL", "trajectory, multi-agent dicts",
                               _run_jaxmarl_iql_rnn, 200_000),
}


class _BlockImport:
    """Meta-path finder that makes importing one library fail in the other library's run."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname == self.name or fullname.startswith(self.name + "."):
            raise ImportError(f"{fullname} imported in a run that must not use {self.name}")
        return None


def _child(program: str, lib: str, copy: str, seed: int, budget: int | None) -> None:
    sys.meta_path.insert(0, _BlockImport(LIBS[1 - LIBS.index(lib)]))
    import jax

    # JAX names that the programs' other dependencies still use (not the buffer library's):
    # bound for both libraries' runs alike.
    if not hasattr(jax, "tree_map"):  # removed in JAX 0.6; PureJaxRL and gymnax 0.0.8 call it
        jax.tree_map = jax.tree.map  # type: ignore[attr-defined]
    import jax.interpreters.xla as xla
    from jax._src import core as jax_core

    if not hasattr(xla, "pytype_aval_mappings"):  # TFP 0.25 (distrax, Stoix) reads it
        xla.pytype_aval_mappings = jax_core.pytype_aval_mappings  # type: ignore[attr-defined]
    res = PROGRAMS[program].run(copy, seed, budget)
    res.update(program=program, lib=lib, seed=seed, ok=True,
               loaded=sorted(m for m in sys.modules if m.split(".")[0] in LIBS
                             and "." not in m))
    print("RESULT " + json.dumps(res))


# ---------------------------------------------------------------- the parent


def _run_once(program: str, lib: str, copy: str, seed: int, budget: int | None,
              timeout: float) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.published", "--child", lib, program, copy,
           "--seed", str(seed)] + ([] if budget is None else ["--budget", str(budget)])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
        + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
        WANDB_MODE="disabled", WANDB_SILENT="true",
        # Stoix pins protobuf 3.20 for tensorboard_logger's old generated code; with a newer
        # protobuf, this is protobuf's own documented fallback.
        PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION="python")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"program": program, "lib": lib, "ok": False, "error": f"timeout {timeout}s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[len("RESULT "):])
            res["process_s"] = time.perf_counter() - t0
            return res
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
    return {"program": program, "lib": lib, "ok": False, "error": "\n".join(tail)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("program", nargs="?", choices=sorted(PROGRAMS))
    parser.add_argument("checkout", nargs="?")
    parser.add_argument("--budget", type=int, default=None,
                        help="total environment steps (default: per program, see PROGRAMS)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="runs per library, alternated")
    parser.add_argument("--libs", default=",".join(LIBS))
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--names", metavar="CHECKOUT",
                        help="only list the Flashbax names CHECKOUT uses that flax_replay lacks")
    parser.add_argument("--child", choices=LIBS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.names:
        names = flashbax_names(args.names)
        missing = missing_in_flax_replay(names)
        for module, attr, rel in missing:
            print(f"missing: {module}{'.' + attr if attr else ''}  ({rel})")
        print(f"{len(names)} Flashbax references in {args.names}, {len(missing)} missing")
        return
    if args.child:
        _child(args.program, args.child, args.checkout, args.seed, args.budget)
        return
    if not args.program or not args.checkout:
        parser.error("PROGRAM and CHECKOUT are required")
    prog = PROGRAMS[args.program]
    budget = args.budget if args.budget is not None else prog.default_budget
    libs = [lib for lib in args.libs.split(",") if lib]
    tmp = tempfile.mkdtemp(prefix="published-")
    try:
        copies, rewritten = {}, 0
        for lib in libs:
            copies[lib] = os.path.join(tmp, lib, os.path.basename(os.path.abspath(args.checkout)))
            n = copy_program(args.checkout, copies[lib], rewrite=lib == "flax_replay")
            rewritten = max(rewritten, n)
        print(f"# {args.program}: {rewritten} import lines rewritten for flax_replay; "
              f"budget {budget or 'as published'}, seed {args.seed}; load {os.getloadavg()}",
              flush=True)
        results: dict[str, list[dict]] = {lib: [] for lib in libs}
        for r in range(args.repeats):
            order = libs if r % 2 == 0 else libs[::-1]
            for lib in order:
                res = _run_once(args.program, lib, copies[lib], args.seed, budget,
                                args.timeout)
                results[lib].append(res)
                print(json.dumps(res), flush=True)
        print("\n| program | library | runs | return | wall s (median) |\n| --- | --- | --- "
              "| --- | --- |")
        for lib in libs:
            ok = [x for x in results[lib] if x.get("ok")]
            rets = ", ".join(f"{x['return']:.2f}" for x in ok) or "-"
            wall = f"{statistics.median(x['wall_s'] for x in ok):.1f}" if ok else "-"
            status = "ok" if len(ok) == len(results[lib]) else "FAILED"
            print(f"| {args.program} | {lib} | {status} | {rets} | {wall} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
