"""Greedy success and thought accuracy of RL runs that start from one SFT checkpoint, against env steps.

Every evaluation is a ``vlmrl eval`` JSON beside its run: ``RUN.json`` for the run's last checkpoint and
``RUN-<anything>.json`` for earlier ones (``vlmrl eval RUN/checkpoints/update-000004 --episodes 200 >
RUN-u4.json``). The checkpoint an evaluation names gives its update, and the run's ``config.json`` the env
steps per update (``num_envs * num_steps``). The SFT checkpoint's evaluation is the point at 0 env steps of
every run; ``--expert STORE`` (``vlmrl collect ENV --expert --seed 10000 --episodes N --out STORE``: the same
seeds) adds the scripted expert's success as a line. Prints a Markdown table, draws two panels.

    python scripts/sft_rl_curves.py runs/ez-dpo/sft.json --expert data/ezpoints-expert-10000 \\
        --method "PPO, T 0.5" runs/ez-ppo/t05-lr5e-5-s{1,2,3} --out docs/ezpoints_sft_ppo.png
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

# scripts/ is on the path when this runs as `python scripts/sft_rl_curves.py`
from from_sft_results import evaluation as read_evaluation
from from_sft_results import expert_summary


def evaluation(path: Path) -> dict:
    """``vlmrl eval``'s JSON in ``path``; stops with a message when there is none."""
    result = read_evaluation(path)
    if result is None:
        raise SystemExit(f"{path}: no `vlmrl eval` result (a JSON object with success_rate) in it")
    return result


def run_points(run: Path, sft: dict) -> list[tuple[int, dict]]:
    """(env steps, evaluation) of a run, the SFT checkpoint's first."""
    config = json.loads((run / "config.json").read_text())
    per_update = config["num_envs"] * config["num_steps"]
    points = [(0, sft)]
    for path in sorted(run.parent.glob(f"{run.name}.json")) + sorted(run.parent.glob(f"{run.name}-*.json")):
        result = evaluation(path)
        match = re.search(r"update-(\d+)", str(result.get("checkpoint", "")))
        if match is None:
            raise SystemExit(f"{path}: the evaluation does not name an update-NNNNNN checkpoint")
        points.append((int(match.group(1)) * per_update, result))
    if len(points) == 1:
        raise SystemExit(f"No evaluation beside {run} ({run}.json or {run}-*.json).")
    return sorted(points, key=lambda point: point[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sft", help="the SFT checkpoint's `vlmrl eval` JSON")
    parser.add_argument("--method", nargs="+", action="append", metavar=("NAME", "RUN"), required=True)
    parser.add_argument("--expert", default="", help="the scripted expert's store of the same seeds")
    parser.add_argument("--title", default="")
    parser.add_argument("--out", default="", help="PNG to draw (none if empty)")
    args = parser.parse_args()
    sft = evaluation(Path(args.sft))
    expert = expert_summary(args.expert)["success_rate"] if args.expert else None

    print("| method | run | env steps | greedy success | mean return | thought accuracy |")
    print("|---|---|---|---|---|---|")
    if expert is not None:
        print(f"| scripted expert | | | {expert:.3f} | | 1 |")
    thoughts = sft.get("thought_accuracy")
    print(f"| SFT checkpoint | | 0 | {sft['success_rate']:.3f} | {sft['mean_return']:.3f} | {thoughts:.3f} |")
    curves = {}
    for name, *runs in args.method:
        curves[name] = []
        for run in map(Path, runs):
            points = run_points(run, sft)
            curves[name].append(points)
            for steps, result in points[1:]:
                print(
                    f"| {name} | {run.name} | {steps} | {result['success_rate']:.3f} | {result['mean_return']:.3f} "
                    f"| {result.get('thought_accuracy', float('nan')):.3f} |"
                )
    if not args.out:
        return

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from seed_plots import draw_seeds, save

    figure, panels = plt.subplots(1, 2, figsize=(10, 3.8))
    for panel, key, label in (
        (panels[0], "success_rate", "greedy success"),
        (panels[1], "thought_accuracy", "thought accuracy (greedy)"),
    ):
        for colour, (name, runs) in zip(("tab:blue", "tab:orange", "tab:green", "tab:red"), curves.items()):
            draw_seeds(panel, [[(steps, result[key]) for steps, result in points] for points in runs], colour, name)
        panel.axhline(sft[key], color="grey", ls=":", label="SFT checkpoint")
        if key == "success_rate" and expert is not None:
            panel.axhline(expert, color="black", ls="--", lw=1, label="scripted expert")
        panel.set_xlabel("env steps after the SFT checkpoint")
        panel.set_ylabel(label)
        panel.grid(alpha=0.3)
    panels[0].legend(fontsize=8)
    if args.title:
        figure.suptitle(args.title)
    save(figure, args.out)


if __name__ == "__main__":
    main()
