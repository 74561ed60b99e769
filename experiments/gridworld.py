"""``vlmrl/GridWorld-v0``: walk to the green goal. The README's main job (PPO, tiny preset, CPU).

    vlmrl train gridworld                       # about 7 minutes on 2 CPU cores
    vlmrl train gridworld --algo ppo --help     # the env's options and the algorithm's
    vlmrl train gridworld --model Qwen/Qwen2.5-VL-3B-Instruct --lora-rank 64 \\
        --learning-rate 1e-5 --prompt-style cot --temperature 0.2 --device cuda
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from experiments.common import TaskEnvOptions, main


@dataclass
class GridWorld(TaskEnvOptions):
    env_id: ClassVar[str] = "vlmrl/GridWorld-v0"

    size: int = 4
    """Cells per side of the grid."""
    n_walls: int = 0
    """Random interior wall cells (the goal always stays reachable)."""
    random_start: bool = True
    """Start in a random free cell (else the top-left corner)."""
    random_goal: bool = True
    """Put the goal in a random free cell (else the bottom-right corner)."""
    distance_reward: float = 0.1
    """Shaping weight: reward per cell of progress toward the goal (0 = sparse only)."""

    def env_kwargs(self) -> dict[str, Any]:
        return {
            **super().env_kwargs(),
            "size": self.size,
            "n_walls": self.n_walls,
            "random_start": self.random_start,
            "random_goal": self.random_goal,
            "distance_reward": self.distance_reward,
        }


if __name__ == "__main__":
    main("gridworld")
