"""A reward model's held-out pair accuracy by the step of the episode the pair comes from.

`reward-model train` holds out whole expert episodes (`split_pairs`); this re-makes the same split and
scores each held-out pair, then groups by the pair's `step` column. On Blackjack step k is a hand of k + 2
cards (the expert hits at every step but the last), so it shows whether the model reads long hands.

    python scripts/rm_heldout_by_step.py --model runs/rm-sft/sft-1e-4 --pairs data/blackjack-pairs-4000-s20000
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch

from rewards.reward_model import RewardModel, load_pairs, score_pairs, split_pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="reward model directory (reward-model train --out)")
    parser.add_argument("--pairs", required=True, help="the pairs it was trained on")
    parser.add_argument("--eval-fraction", type=float, default=0.1, help="as given to train")
    parser.add_argument("--seed", type=int, default=0, help="as given to train")
    args = parser.parse_args()

    pairs = load_pairs(args.pairs)
    if "step" not in pairs.column_names:
        raise SystemExit(f"{args.pairs} has no step column: make the pairs with `reward-model pairs`.")
    _, held_out = split_pairs(pairs, args.eval_fraction, seed=args.seed)
    model = RewardModel.load(args.model, device="cpu")
    right: dict[int, list[bool]] = defaultdict(list)
    with torch.no_grad():
        for start in range(0, len(held_out), 16):
            batch = held_out[start : start + 16]
            chosen, rejected = score_pairs(model, batch)
            for step, correct in zip(batch["step"], (chosen > rejected).tolist()):
                right[step].append(correct)
    table = {
        str(step): {"pairs": len(marks), "accuracy": round(sum(marks) / len(marks), 3)}
        for step, marks in sorted(right.items())
    }
    every = [mark for marks in right.values() for mark in marks]
    print(json.dumps({"held_out_pairs": len(every), "accuracy": sum(every) / len(every), "by_step": table}, indent=2))


if __name__ == "__main__":
    main()
