"""Tables and curves of iRe-VLA runs against the whole-model PPO baseline from the same stage 0.

Each run directory's ``metrics.jsonl`` holds the greedy success after stage 0 and after every stage 1 and
stage 2 (``ire/stage<n>_success_rate``, at the env steps played so far). The table gives, per run, success
after stage 0 and then stage 1 / stage 2 of every round; the figure plots success against env steps, one
thin line per seed and the mean over seeds bold, one colour per method.

    python scripts/ire_vla_results.py --method iRe-VLA runs/ire/gridworld-r4-s{1,2,3} \\
        --method "PPO, whole model" runs/ire/gridworld-ppo-r4-s{1,2,3} --out docs/ire_vla_gridworld.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from agents.tracking import read_metrics


def stage_points(run_dir: Path) -> list[tuple[int, int, float]]:
    """(stage, env steps, success) after each evaluated stage, in order."""
    points = []
    for row in read_metrics(run_dir / "metrics.jsonl"):
        for stage in (0, 1, 2):
            key = f"ire/stage{stage}_success_rate"
            if key in row:
                points.append((stage, int(row["global_step"]), float(row[key])))
    return points


def table_row(name: str, run_dir: Path) -> str:
    points = stage_points(run_dir)
    if not points or points[0][0] != 0:
        raise SystemExit(f"{run_dir}: no stage-0 evaluation in metrics.jsonl (was --stage-eval-episodes 0?)")
    rounds, current = [], []
    for stage, _, success in points[1:]:
        if stage == 1 and current:
            rounds.append(current)
            current = []
        current.append(f"{success:.2f}")
    if current:
        rounds.append(current)
    return f"| {name} | {run_dir.name} | {points[0][2]:.2f} | {', '.join(' / '.join(r) for r in rounds)} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", nargs="+", action="append", metavar=("NAME", "RUN_DIR"), required=True)
    parser.add_argument("--out", help="PNG of success vs env steps (omit for the table only)")
    parser.add_argument("--title", default="")
    args = parser.parse_args()

    print("| method | run | after stage 0 | after stage 1 / stage 2, rounds 1, 2, ... |")
    print("|---|---|---|---|")
    for name, *run_dirs in args.method:
        for run_dir in run_dirs:
            print(table_row(name, Path(run_dir)))
    if not args.out:
        return

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from seed_plots import draw_seeds, save

    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    for colour, (name, *run_dirs) in zip(("tab:blue", "tab:orange", "tab:green", "tab:red"), args.method):
        curves = [[(steps, success) for _, steps, success in stage_points(Path(d))] for d in run_dirs]
        draw_seeds(axes, curves, colour, name)
    axes.set_xlabel("env steps (stage 1)")
    axes.set_ylabel("greedy success (held-out seeds)")
    axes.set_ylim(-0.02, 1.02)
    axes.grid(alpha=0.3)
    axes.legend()
    if args.title:
        axes.set_title(args.title)
    save(figure, args.out)


if __name__ == "__main__":
    main()
