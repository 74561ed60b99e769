"""Table and plot of iterated DPO on Blackjack beside PPO, GRPO and GiGPO from the same SFT checkpoint.

Reads the greedy evaluations README's commands write (``vlmrl eval ... --episodes 1000 > EVALS/NAME.json``:
every policy on the same 1,000 hands, seeds 10,000 .. 10,999), the scripted expert's episodes of those
seeds (``vlmrl collect blackjack --expert --seed 10000 --episodes 1000 --out STORE``) and the runs'
``metrics.jsonl``; prints a Markdown table and draws greedy win rate against the env steps each method
played after the SFT checkpoint.

    python scripts/blackjack_dpo_results.py --out docs/blackjack_dpo.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SEEDS = (1, 2, 3)


def evaluation(path: Path) -> dict | None:
    """The JSON object ``vlmrl eval`` printed into ``path`` (None if the file or the object is missing)."""
    if not path.exists():
        return None
    text = path.read_text()
    try:
        return json.loads(text[text.find("{") : text.rfind("}") + 1])
    except json.JSONDecodeError:
        return None


def metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.open()] if path.exists() else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--evals", default="runs/bj-eval", help="directory of the evaluations (NAME.json)")
    parser.add_argument("--dpo", default="runs/dpo", help="directory of the DPO runs dpo{1,3}-s<seed>")
    parser.add_argument("--ppo", default="runs/results", help="directory of blackjack-sft-ppo-s<seed>")
    parser.add_argument("--grpo", default="runs/results2", help="directory of blackjack-sft-{grpo,gigpo}-s<seed>")
    parser.add_argument("--expert", default="data/blackjack-expert-10000", help="the expert's store of the same seeds")
    parser.add_argument("--out", default="", help="PNG to draw (none if empty)")
    args = parser.parse_args()
    evals, dpo = Path(args.evals), Path(args.dpo)
    sft = evaluation(evals / "sft.json")
    if sft is None:
        raise SystemExit(f"No evaluation of the SFT checkpoint in {evals / 'sft.json'}.")
    expert = None
    if Path(args.expert).exists():
        from agents.trajectories import load_trajectories

        first_steps = load_trajectories(args.expert).filter(lambda row: row["step"] == 0)
        expert = {
            "episodes": len(first_steps),
            "success_rate": sum(first_steps["success"]) / len(first_steps),
            "mean_return": sum(first_steps["episode_return"]) / len(first_steps),
        }

    print(
        "| method | seed | env steps | pairs (held out) | held-out pair accuracy | greedy win rate | mean return "
        "| thought accuracy |"
    )
    print("|---|---|---|---|---|---|---|---|")
    if expert is not None:
        print(
            f"| scripted expert (basic strategy) | | | | | {expert['success_rate']:.3f} | {expert['mean_return']:.3f} | 1 |"
        )
    print(
        f"| SFT checkpoint | | 0 | | | {sft['success_rate']:.3f} | {sft['mean_return']:.3f} "
        f"| {sft['thought_accuracy']:.3f} |"
    )
    curves: dict[tuple[str, int], list[tuple[int, float]]] = {}
    held_out = {"dpo1": [0, 0.0], "dpo3": [0, 0.0]}
    for name, label in (("dpo1", "DPO, 1 round"), ("dpo3", "DPO, 3 rounds")):
        for seed in SEEDS:
            for index, row in enumerate(metrics(dpo / f"{name}-s{seed}")):
                suffix = "" if name == "dpo1" else f"-r{index + 1}"
                result = evaluation(evals / f"{name}-s{seed}{suffix}.json")
                if result is None:
                    continue
                curves.setdefault((label, seed), [(0, sft["success_rate"])]).append(
                    (row["global_step"], result["success_rate"])
                )
                count = int(row.get("dpo/heldout_pairs", 0))
                accuracy = row.get("dpo/heldout_accuracy")
                if accuracy is not None:
                    held_out[name][0] += count
                    held_out[name][1] += accuracy * count
                where = f" (round {index + 1})" if name == "dpo3" else ""
                print(
                    f"| {label}{where} | {seed} | {row['global_step']} | {int(row['dpo/pairs'])} ({count}) | "
                    + (f"{accuracy:.2f}" if accuracy is not None else "")
                    + f" | {result['success_rate']:.3f} | {result['mean_return']:.3f} "
                    f"| {result['thought_accuracy']:.3f} |"
                )
    for label, directory, prefix in (
        ("PPO", args.ppo, "ppo"),
        ("GRPO", args.grpo, "grpo"),
        ("GiGPO", args.grpo, "gigpo"),
    ):
        for seed in SEEDS:
            run = Path(directory) / f"blackjack-sft-{prefix}-s{seed}"
            result, rows = evaluation(evals / f"{prefix}-s{seed}.json"), metrics(run)
            if result is None or not rows:
                continue
            steps = rows[-1]["global_step"]
            curves.setdefault((label, seed), [(0, sft["success_rate"])]).append((steps, result["success_rate"]))
            print(
                f"| {label} | {seed} | {steps} | | | {result['success_rate']:.3f} | {result['mean_return']:.3f} "
                f"| {result['thought_accuracy']:.3f} |"
            )
    for name, (count, correct) in held_out.items():
        if count:
            print(f"\n{name}: held-out pair accuracy over all rounds and seeds {correct / count:.3f} ({count} pairs)")
    if not args.out:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"DPO, 1 round": "tab:orange", "DPO, 3 rounds": "tab:red", "PPO": "tab:blue", "GRPO": "tab:green",
               "GiGPO": "tab:purple"}  # fmt: skip
    figure, axes = plt.subplots(figsize=(7, 4.5))
    labelled = set()
    for (label, _seed), points in sorted(curves.items()):
        xs, ys = zip(*points)
        axes.plot(xs, ys, "o-", color=colours[label], alpha=0.7, label=None if label in labelled else label)
        labelled.add(label)
    if expert is not None:
        axes.axhline(expert["success_rate"], color="grey", ls="--", lw=1, label="scripted expert, same hands")
    axes.set_xlabel("env steps played after the SFT checkpoint")
    axes.set_ylabel("greedy win rate, 1,000 held-out hands")
    axes.set_title("Blackjack from the SFT checkpoint (3 seeds per method)")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)
    print(f"\nplot: {args.out}")


if __name__ == "__main__":
    main()
