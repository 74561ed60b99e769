"""Learning curves of several runs (seeds, methods) in one PNG, with a table of success rates.

    vlmrl plot runs/GridWorld-v0__ppo__1__* runs/GridWorld-v0__ppo__2__* --out curves.png

Runs whose ``config.json`` share an ``exp_name`` (or a ``baseline``) are one method: each seed is drawn
thin, and their mean thick. The table gives each run's success rate at the start and the end (mean of the
last three logged updates) and its final greedy evaluation when there is one.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agents.tracking import read_metrics


@dataclass
class PlotConfig:
    runs: tuple[str, ...]
    """Run directories (each with metrics.jsonl and config.json)."""
    out: str = "learning_curves.png"
    """Where the PNG goes."""
    title: str = ""
    """Figure title (default: the environment id)."""
    reference: tuple[str, ...] = ()
    """Horizontal reference lines as ``LABEL=SUCCESS`` (e.g. ``"SFT checkpoint (greedy)=0.41"``)."""
    metric: str = "charts/success_rate"
    """The metric to draw (e.g. ``charts/thought_accuracy``)."""


def method_of(run_dir: Path) -> str:
    config = json.loads((run_dir / "config.json").read_text())
    return config.get("baseline") or config.get("exp_name", "run")


def curve(run_dir: Path, metric: str = "charts/success_rate") -> tuple[np.ndarray, np.ndarray]:
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if metric in r]
    if not rows:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} has no {metric} rows.")
    return np.array([r["global_step"] for r in rows]), np.array([r[metric] for r in rows])


def main(config: PlotConfig) -> list[dict]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[Path]] = defaultdict(list)
    for run in config.runs:
        groups[method_of(Path(run))].append(Path(run))
    figure, axis = plt.subplots(figsize=(6.5, 4))
    table = []
    for index, (method, runs) in enumerate(sorted(groups.items())):
        colour = f"C{index}"
        grid_end = min(curve(run, config.metric)[0][-1] for run in runs)
        grid = np.linspace(0, grid_end, 50)
        stacked = []
        for run in runs:
            steps, success = curve(run, config.metric)
            axis.plot(steps, success, color=colour, alpha=0.3, linewidth=1)
            stacked.append(np.interp(grid, steps, success))
            evals = [r["eval/success_rate"] for r in read_metrics(run / "metrics.jsonl") if "eval/success_rate" in r]
            seed = json.loads((run / "config.json").read_text()).get("seed")
            table.append(
                {
                    "method": method,
                    "seed": seed,
                    "env_steps": int(steps[-1]),
                    "first": float(success[0]),
                    "last3": float(np.mean(success[-3:])),
                    "eval": evals[-1] if evals else None,
                }
            )
        axis.plot(grid, np.mean(stacked, axis=0), color=colour, linewidth=2.5, label=f"{method} ({len(runs)} seeds)")
    for number, reference in enumerate(config.reference):
        label, _, value = reference.rpartition("=")
        if not label:
            raise ValueError(f"--reference {reference!r}: write it as LABEL=VALUE.")
        axis.axhline(float(value), color=f"C{len(groups) + number}", linestyle="--", linewidth=1.5, label=label)
    env_id = json.loads((Path(config.runs[0]) / "config.json").read_text()).get("env_id", "")
    ylabel = "success rate" if config.metric == "charts/success_rate" else config.metric
    axis.set(xlabel="environment steps", ylabel=ylabel, ylim=(-0.02, 1.02), title=config.title or env_id)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(config.out, dpi=110)
    plt.close(figure)
    print("| method | seed | env steps | success (first update) | success (last 3 updates) | greedy eval |")
    print("|---|---|---|---|---|---|")
    for row in table:
        evaluation = "-" if row["eval"] is None else f"{row['eval']:.3f}"
        print(
            f"| {row['method']} | {row['seed']} | {row['env_steps']} | {row['first']:.3f} | {row['last3']:.3f} | "
            f"{evaluation} |"
        )
    print(f"wrote {config.out}")
    return table
