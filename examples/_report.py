"""Incidental plumbing of the DQN examples: what a run reports, not how it trains.

A `Report` shows progress (a tqdm bar, or one line a chunk with `--no-progress`), keeps the
learning curve as `history.jsonl` next to the checkpoints (so a resumed run draws the whole
curve) and at the end writes `learning_curve.png` and `summary.json` there. `clear` is
`--fresh`. Nothing here touches the agent, the buffer or the checkpoints.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np

OUTPUTS = ("history.jsonl", "learning_curve.png", "summary.json")


def clear(directory: Path) -> None:
    """Removes a run's checkpoint steps and outputs from `directory`, and nothing else (it may
    be a directory the user also keeps other things in)."""
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        if entry.name in OUTPUTS or entry.name.isdigit() or ".orbax-checkpoint-tmp" in entry.name:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def _number(v):
    """Strict JSON: NaN (no episode ended in a chunk, no update yet) is written as null."""
    v = float(v)
    return None if math.isnan(v) else v


class Report:
    def __init__(self, directory: Path, total_steps: int, resumed_from: int, bar: bool):
        from tqdm.auto import tqdm

        self.directory, self.resumed_from, self.bar_on = directory, resumed_from, bar
        self.history = directory / "history.jsonl"
        self.rows = []  # the rows up to the restored step; those after it are dropped
        if resumed_from and self.history.exists():
            rows = map(json.loads, self.history.read_text().splitlines())
            self.rows = [r for r in rows if r["step"] <= resumed_from]
        directory.mkdir(parents=True, exist_ok=True)
        self.history.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        self.bar = tqdm(total=total_steps, initial=resumed_from, unit="step", unit_scale=True,
                        disable=not bar, dynamic_ncols=True)

    def chunk(self, step: int, wall: float, sps: float, metrics: dict, greedy) -> None:
        """One row of the curve from a chunk's per-step metrics (host arrays): the mean return
        of the episodes that ended, the mean loss of the updates, the mean greedy return."""
        episodes = int(np.sum(metrics["episodes"]))
        learned = np.asarray(metrics["learned"], bool)
        row = {"step": step, "wall": wall, "sps": sps,
               "return": np.sum(metrics["return_sum"]) / episodes if episodes else np.nan,
               "episodes": episodes,
               "loss": np.mean(metrics["loss"][learned]) if learned.any() else np.nan,
               "greedy": np.mean(greedy)}
        row = {k: v if isinstance(v, int) else _number(v) for k, v in row.items()}
        self.rows.append(row)
        with self.history.open("a") as f:
            f.write(json.dumps(row) + "\n")
        fmt = {k: "nan" if row[k] is None else f"{row[k]:{spec}}"
               for k, spec in (("return", ".1f"), ("greedy", ".1f"), ("loss", ".3g"))}
        self.bar.set_postfix(ret=fmt["return"], greedy=fmt["greedy"], loss=fmt["loss"],
                             sps=f"{sps:,.0f}")
        self.bar.update(step - self.bar.n)
        self.log(f"step {step}: return {fmt['return']} greedy {fmt['greedy']} loss "
                 f"{fmt['loss']} sps {sps:,.0f}")

    def log(self, line: str) -> None:
        if not self.bar_on:
            print(line, flush=True)

    def finish(self, returns, title: str, **figures) -> dict:
        """The final greedy `returns` [episodes]: prints them, draws the curve, writes the
        summary (with `figures`) and returns it."""
        self.bar.close()
        returns = np.asarray(returns)
        final = float(returns.mean())
        summary = {"env": figures.pop("env"), "final_greedy_return": final,
                   "final_greedy_return_min": float(returns.min()),
                   "eval_episodes": int(returns.size), **figures, "solved": final >= 475.0}
        png, js = self.directory / "learning_curve.png", self.directory / "summary.json"
        self._plot(png, final, title)
        js.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"greedy return {final:.1f} (min {returns.min():.0f}) over {returns.size} "
              f"episodes after {summary.get('env_steps')} env steps, "
              f"{summary.get('wall_time_s')} s")
        print(f"learning curve: {png}\nsummary: {js}\ncheckpoints: {self.directory}",
              flush=True)
        return summary

    def _plot(self, path: Path, final: float, title: str) -> None:
        """Greedy and training (epsilon-greedy) returns per chunk, and the final evaluation."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r["step"] for r in self.rows]
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, style in (("greedy", dict(color="C0", label="greedy return (after each chunk)")),
                           ("return", dict(color="C1", alpha=0.6, lw=1,
                                           label="training return (epsilon-greedy)"))):
            ax.plot(steps, [np.nan if r[key] is None else r[key] for r in self.rows], **style)
        if self.rows:
            ax.scatter([steps[-1]], [final], color="C3", zorder=3,
                       label=f"final evaluation: {final:.1f}")
        if self.resumed_from:
            ax.axvline(self.resumed_from, color="grey", ls=":",
                       label=f"resumed at {self.resumed_from}")
        ax.axhline(475, color="grey", ls="--", lw=0.8, label="solved (475)")
        ax.set(xlabel="environment steps", ylabel="episode return", title=title, ylim=(0, 520))
        ax.legend(loc="best", fontsize="small")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
