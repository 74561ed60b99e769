"""Table and plot of iterated DPO beside PPO, GRPO and GiGPO, all started from the same SFT checkpoint.

``RUNS`` holds the runs as ``{dpo1,dpo3,ppo,grpo,gigpo}-s<seed>`` (directories or links; a method without
runs is left out) and their greedy evaluations as ``<run>.json`` (``vlmrl eval RUN --episodes N >
RUNS/<run>.json``; the 3-round DPO runs' rounds as ``dpo3-s<seed>-r<round>.json``), the SFT checkpoint's as
``sft.json``: every policy evaluated on the same seeds. With ``--expert STORE`` (``vlmrl collect ENV
--expert --seed 10000 --episodes N --out STORE``: the same seeds) the scripted expert is shown too. Prints a
Markdown table and draws greedy success against the env steps each run played after the SFT checkpoint.

    python scripts/from_sft_results.py runs/bj-eval --expert data/blackjack-expert-10000 --out docs/blackjack_dpo.png
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
        result = json.loads(text[text.find("{") : text.rfind("}") + 1])
    except json.JSONDecodeError:
        return None
    return result if "success_rate" in result else None


def expert_summary(store: str) -> dict:
    """Episodes, success rate and mean return of a scripted expert's trajectory store (its first steps)."""
    from agents.trajectories import load_trajectories

    first_steps = load_trajectories(store).filter(lambda row: row["step"] == 0)
    return {
        "episodes": len(first_steps),
        "success_rate": sum(first_steps["success"]) / len(first_steps),
        "mean_return": sum(first_steps["episode_return"]) / len(first_steps),
    }


def metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.open()] if path.exists() else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", help="directory of the runs and their evaluations")
    parser.add_argument("--expert", default="", help="the scripted expert's store of the same seeds")
    parser.add_argument("--title", default="", help="the plot's title")
    parser.add_argument("--out", default="", help="PNG to draw (none if empty)")
    args = parser.parse_args()
    evals = dpo = Path(args.runs)
    sft = evaluation(evals / "sft.json")
    if sft is None:
        raise SystemExit(f"No evaluation of the SFT checkpoint in {evals / 'sft.json'}.")
    expert = expert_summary(args.expert) if args.expert else None

    print(
        "| method | seed | env steps | pairs (held out) | held-out pair accuracy | greedy success | mean return "
        "| thought accuracy |"
    )
    print("|---|---|---|---|---|---|---|---|")
    if expert is not None:
        print(f"| scripted expert | | | | | {expert['success_rate']:.3f} | {expert['mean_return']:.3f} | 1 |")
    print(
        f"| SFT checkpoint | | 0 | | | {sft['success_rate']:.3f} | {sft['mean_return']:.3f} "
        f"| {sft['thought_accuracy']:.3f} |"
    )
    curves: dict[tuple[str, int], list[tuple[int, float]]] = {}
    held_out = {"dpo1": [0, 0.0], "dpo3": [0, 0.0]}
    for name, label in (("dpo1", "DPO, 1 round"), ("dpo3", "DPO, 3 rounds")):
        for seed in SEEDS:
            for index, row in enumerate(metrics(dpo / f"{name}-s{seed}")):
                count = int(row.get("dpo/heldout_pairs", 0))
                accuracy = row.get("dpo/heldout_accuracy")
                if accuracy is not None:
                    held_out[name][0] += count
                    held_out[name][1] += accuracy * count
                suffix = "" if name == "dpo1" else f"-r{index + 1}"
                result = evaluation(evals / f"{name}-s{seed}{suffix}.json")
                if result is None:
                    continue
                curves.setdefault((label, seed), [(0, sft["success_rate"])]).append(
                    (row["global_step"], result["success_rate"])
                )
                where = f" (round {index + 1})" if name == "dpo3" else ""
                print(
                    f"| {label}{where} | {seed} | {row['global_step']} | {int(row['dpo/pairs'])} ({count}) | "
                    + (f"{accuracy:.2f}" if accuracy is not None else "")
                    + f" | {result['success_rate']:.3f} | {result['mean_return']:.3f} "
                    f"| {result['thought_accuracy']:.3f} |"
                )
    for label, prefix in (("PPO", "ppo"), ("GRPO", "grpo"), ("GiGPO", "gigpo")):
        for seed in SEEDS:
            result, rows = evaluation(evals / f"{prefix}-s{seed}.json"), metrics(dpo / f"{prefix}-s{seed}")
            if result is None or not rows:
                continue
            steps = rows[-1]["global_step"]
            curves.setdefault((label, seed), [(0, sft["success_rate"])]).append((steps, result["success_rate"]))
            print(
                f"| {label} | {seed} | {steps} | | | {result['success_rate']:.3f} | {result['mean_return']:.3f} "
                f"| {result.get('thought_accuracy', float('nan')):.3f} |"
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
        axes.axhline(expert["success_rate"], color="grey", ls="--", lw=1, label="scripted expert, same episodes")
    axes.set_xlabel("env steps played after the SFT checkpoint")
    axes.set_ylabel(f"greedy success, {sft['episodes']} held-out episodes")
    axes.set_title(args.title or "From the SFT checkpoint (3 seeds per method)")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)
    print(f"\nplot: {args.out}")


if __name__ == "__main__":
    main()
