"""Does a GridWorld reward model prefer shortest-path moves in every layout, not only on expert pairs?

For each (agent, goal) layout of a wall-free GridWorld (``--size`` 4: 16 x 15 = 240 layouts), the model
scores the four moves at step 0. A move is good when it shortens the path to the goal. Printed: the share
of layouts whose best-scored move is good, the share where every good move scores above every other move,
the mean score of good and of other moves, and the range of the best score over layouts (a Bradley-Terry
model fixes only differences at one state, not the level from state to state)::

    vlmrl reward-model pairs --env-id vlmrl/GridWorld-v0 --env-kwargs '{"size": 4, "n_walls": 0}' \\
        --states 4000 --out data/grid4-pairs-4000
    vlmrl reward-model train --pairs data/grid4-pairs-4000 --out runs/grid4-rm ...
    python scripts/rm_gridworld_layouts.py runs/grid4-rm
"""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np
import torch
from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="reward model directory (action-style answers)")
    parser.add_argument("--size", type=int, default=4, help="cells per side (no walls)")
    args = parser.parse_args()

    import envs
    from envs.gridworld import MOVES, GridWorldEnv
    from envs.language import build_prompt
    from rewards.reward_model import RewardModel

    model = RewardModel.load(args.model, device="cpu")
    spec = envs.get_language("vlmrl/GridWorld-v0")
    env = GridWorldEnv(size=args.size, n_walls=0)
    cells = list(itertools.product(range(args.size), range(args.size)))
    best_is_good, good_above_all, layouts = 0, 0, 0
    good_scores: list[float] = []
    other_scores: list[float] = []
    best_scores: list[float] = []
    for agent, goal in itertools.product(cells, cells):
        if agent == goal:
            continue
        observation, _ = env.reset(seed=0, options={"agent": agent, "goal": goal})
        image = Image.fromarray(observation["image"])
        prompt = build_prompt(spec, observation["text"], model.config.prompt_style)
        with torch.no_grad():
            scores = model.score([[image]] * 4, [prompt] * 4, list(spec.action_names)).flatten().numpy()
        here = env._distances[agent]
        good = np.array(
            [
                0 <= agent[0] + d_row < args.size
                and 0 <= agent[1] + d_col < args.size
                and env._distances[agent[0] + d_row, agent[1] + d_col] < here
                for d_row, d_col in MOVES
            ]
        )
        layouts += 1
        best_is_good += bool(good[int(scores.argmax())])
        good_above_all += bool(scores[good].min() > scores[~good].max())
        best_scores.append(float(scores.max()))
        good_scores += scores[good].tolist()
        other_scores += scores[~good].tolist()
    print(
        json.dumps(
            {
                "layouts": layouts,
                "best_move_is_shortest_path": round(best_is_good / layouts, 3),
                "every_shortest_path_move_above_every_other": round(good_above_all / layouts, 3),
                "mean_score_shortest_path_moves": round(float(np.mean(good_scores)), 2),
                "mean_score_other_moves": round(float(np.mean(other_scores)), 2),
                "best_score_min_max": [round(min(best_scores), 2), round(max(best_scores), 2)],
            }
        )
    )


if __name__ == "__main__":
    main()
