"""``vlmrl/NumberLine-v0`` (RL4VLM's NumberLine: move the current number to the target).

vlmrl train numberline --total-env-steps 5000
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from experiments.common import TaskEnvOptions, main


@dataclass
class NumberLine(TaskEnvOptions):
    env_id: ClassVar[str] = "vlmrl/NumberLine-v0"
    #: NumberLine has two actions and short episodes: at the GridWorld rate (1e-4) the tiny preset reaches
    #: 100% and then repeatedly collapses (seed 1 ends at 0.79); at 2e-5 it stays at 100% (README).
    algorithm_defaults: ClassVar[dict[str, dict[str, Any]]] = {"ppo": {"learning_rate": 2e-5}}

    image_size: int = 128
    """Rendered image side in pixels."""
    max_position: int = 5
    """Largest number on the line (positions 0..max_position)."""

    def env_kwargs(self) -> dict[str, Any]:
        return {**super().env_kwargs(), "image_size": self.image_size, "max_position": self.max_position}


if __name__ == "__main__":
    main("numberline")
