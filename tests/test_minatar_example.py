"""examples/minatar_dqn.py runs as a script with a tiny budget: the bytes line says one frame per
step is about 4x less than stacks, the sampled stacks have 4 frames, every chunk learned with a
finite loss, and the curve's PNG is written. Learning itself is not tested (see README for the
measured default run)."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--total-steps", "1024", "--chunk-steps", "512", "--num-envs", "8",
        "--learning-starts", "128", "--buffer-size", "2048", "--batch-size", "16",
        "--eval-episodes", "2"]


def test_minatar_dqn_example(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device is enough
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    png = tmp_path / "curve.png"
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "minatar_dqn.py"), *TINY,
                          "--out", str(png)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout

    stored, stacked, ratio = map(float, re.search(
        r"buffer state: ([\d.]+) MB with one frame per step; storing 4-frame stacks: "
        r"([\d.]+) MB \(([\d.]+)x more\)", out).groups())
    # 2048 steps of 10x10x4 uint8 screens: 0.8 MB stored once, 3.3 MB as stacks.
    assert 0.8 <= stored < 1.0 and 3.3 <= stacked < 3.5 and 3.5 < ratio < 4.0, out

    chunks = re.findall(r"step +(\d+) .* episodes +(\d+) +mean return +([\d.]+) +loss (\S+)",
                        out)
    assert [int(c[0]) for c in chunks] == [512, 1024], out
    assert all(math.isfinite(float(c[3])) and float(c[3]) >= 0 for c in chunks), out
    assert "sampled stacks: first (16, 10, 10, 4, 4) second (16, 10, 10, 4, 4) uint8" in out

    random_return = float(re.search(r"random policy: mean return ([\d.]+) over 2", out)[1])
    greedy_return = float(re.search(r"greedy policy: mean return ([\d.]+) over 2", out)[1])
    assert 0 <= random_return < 50 and 0 <= greedy_return < 1000, out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_agent_stacks_are_the_buffers_stacks():
    """The stacks the example's agent acts on (its `push`) are those the buffer rebuilds for
    `first` and `second` at sample time, episode ends included: frames from before an
    episode's first step are zeros in both."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import flax_replay as fbx

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from minatar_dqn import push
    finally:
        sys.path.remove(str(ROOT / "examples"))

    rows, steps, k = 2, 24, 4
    # Episode ends (after the step) at different places in the two rows, some 1-step episodes.
    done = np.zeros((steps, rows), bool)
    done[[2, 3, 9, 15], 0] = True
    done[[0, 5, 6, 7, 18], 1] = True
    # Frame of step t in row r: 1 + t + 30 r (never 0, so zeros are only padding).
    frames = (1 + np.arange(steps)[:, None] + 30 * np.arange(rows)[None]).astype(np.uint8)
    frames = frames.reshape(steps, rows, 1, 1, 1)
    buffer = fbx.make_prioritised_n_step_buffer(
        2 * 32, 1, 64, add_batch_size=rows, n_step=3, frame_stack={"obs": k},
        episode_end_key="done")
    state = buffer.init({"obs": jnp.zeros((1, 1, 1), jnp.uint8), "done": jnp.bool_(False),
                         "reward": jnp.float32(0)})
    seen = {}  # frame value -> the agent's stack [1, 1, 1, K] when that frame is the newest
    stack = push(jnp.zeros((rows, 1, 1, 1, k), jnp.uint8), jnp.asarray(frames[0]),
                 jnp.ones(rows, bool))
    add = jax.jit(buffer.add)
    for t in range(steps):
        for r in range(rows):
            seen[int(frames[t, r, 0, 0, 0])] = np.asarray(stack[r])
        state = add(state, {"obs": stack[..., -1], "done": jnp.asarray(done[t]),
                            "reward": jnp.zeros(rows)})
        if t + 1 < steps:
            stack = push(stack, jnp.asarray(frames[t + 1]), jnp.asarray(done[t]))
    sample = jax.jit(jax.vmap(buffer.sample, (None, 0)))  # 8 x 64 transitions
    tr = sample(state, jax.random.split(jax.random.key(0), 8)).experience
    firsts = np.asarray(tr.first["obs"]).reshape(-1, 1, 1, 1, k)
    seconds = np.asarray(tr.second["obs"]).reshape(-1, 1, 1, 1, k)
    checked = set()
    for first, second in zip(firsts, seconds):
        newest = int(first[0, 0, 0, -1])
        np.testing.assert_array_equal(first, seen[newest])
        np.testing.assert_array_equal(second, seen[newest + 3])  # second: 3 steps later
        checked.add(newest)
    # Among the sampled: stacks cut by an episode start, and full 4-frame stacks.
    assert any((seen[v] == 0).any() for v in checked) and any((seen[v] > 0).all()
                                                              for v in checked)
