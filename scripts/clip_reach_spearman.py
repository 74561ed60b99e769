"""How well a CLIP reward ranks Reach's frames: Spearman's rho against minus the gripper-to-ball distance.

The frames are those of Reach's scripted expert on seeds that ``vlmrl clip-adapt`` did not use (it uses
seeds ``0 .. episodes - 1``; these start at ``--first-seed``), every step of each episode plus the frame
where it succeeded, until ``--frames`` frames. Each frame's true value is ``potential()``, minus the
gripper-to-ball distance in metres, and its reward is the ``clip`` reward module's score (VLM-RM with
Reach's default prompts: the first and last of its progress captions, "the gripper is touching the red
ball" and "the gripper is very far from the red ball"). Spearman's rho is the Pearson correlation of the
two rankings (ties get their mean rank); 1 means the reward orders the frames exactly as the distance
does::

    vlmrl clip-adapt vlmrl/Reach-v0 --out runs/reach-clip --episodes 600 --steps 5000 --learning-rate 3e-4
    python scripts/clip_reach_spearman.py --model runs/reach-clip --frames 1000 --alpha 0 0.5 1
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0 .. n-1, tied values sharing their mean rank.

    >>> ranks(np.array([0.3, 0.1, 0.3, 0.2])).tolist()
    [2.5, 0.0, 2.5, 1.0]
    """
    order = np.argsort(values, kind="stable")
    result = np.empty(len(values))
    result[order] = np.arange(len(values), dtype=float)
    for value in np.unique(values):
        tied = values == value
        result[tied] = result[tied].mean()
    return result


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation.

    >>> round(spearman(np.array([1.0, 2.0, 3.0]), np.array([10.0, 20.0, 25.0])), 6)
    1.0
    """
    return float(np.corrcoef(ranks(np.asarray(x)), ranks(np.asarray(y)))[0, 1])


def reach_frames(frames: int, first_seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Expert frames of Reach from seeds ``first_seed`` on, and minus the gripper-to-ball distance of each."""
    import gymnasium as gym

    import envs  # noqa: F401 - registers the environments

    env = gym.make("vlmrl/Reach-v0")
    expert = env.unwrapped
    images, values = [], []
    seed = first_seed
    while len(images) < frames:
        observation, _ = env.reset(seed=seed)
        done = False
        while not done and len(images) < frames:
            images.append(observation["image"])
            values.append(expert.potential())
            observation, _, terminated, truncated, info = env.step(expert.expert_action())
            done = terminated or truncated
        if done and terminated and info.get("success", False) and len(images) < frames:
            images.append(observation["image"])
            values.append(expert.potential())
        seed += 1
    env.close()
    return images, np.array(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-clip", help="tiny-clip, a hub id or an adapted CLIP's directory")
    parser.add_argument("--frames", type=int, default=1000, help="held-out frames to score")
    parser.add_argument("--first-seed", type=int, default=100_000, help="first episode seed (adaptation: 0 ..)")
    parser.add_argument("--alpha", type=float, nargs="+", default=[0.5], help="VLM-RM alpha (several: each)")
    args = parser.parse_args()

    from rewards.clip import ClipReward, ClipRewardConfig

    start = time.perf_counter()
    images, values = reach_frames(args.frames, args.first_seed)
    result: dict[str, object] = {"model": args.model, "frames": len(images), "first_seed": args.first_seed}
    for alpha in args.alpha:
        reward = ClipReward(ClipRewardConfig(model=args.model, alpha=alpha, frame="current"), "vlmrl/Reach-v0")
        scores = reward.scores(images).numpy()
        result[f"spearman_rho_alpha_{alpha}"] = round(spearman(scores, values), 4)
    result["distance_m_min_max"] = [round(float(-values.max()), 3), round(float(-values.min()), 3)]
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
