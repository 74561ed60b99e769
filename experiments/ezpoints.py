"""PPO on ``vlmrl/EZPoints-v0`` (RL4VLM's EZPoints: a formula of two cards that equals 12).

python -m experiments.ezpoints --total-env-steps 5000
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from experiments.common import ExperimentConfig, run


@dataclass
class EZPointsPPO(ExperimentConfig):
    env_id: str = "vlmrl/EZPoints-v0"
    """Registered Gymnasium id."""
    image_size: int = 128
    """Rendered image side in pixels."""
    require_solvable: bool = True
    """Deal only hands that have a solution."""

    def env_kwargs(self) -> dict[str, Any]:
        return {**super().env_kwargs(), "image_size": self.image_size, "require_solvable": self.require_solvable}


if __name__ == "__main__":
    run(EZPointsPPO)
