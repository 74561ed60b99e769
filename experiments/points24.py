"""PPO on ``vlmrl/Points24-v0`` (RL4VLM's Points24: a formula of four cards that equals 24).

python -m experiments.points24 --total-env-steps 5000
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from experiments.common import ExperimentConfig, run


@dataclass
class Points24PPO(ExperimentConfig):
    env_id: str = "vlmrl/Points24-v0"
    """Registered Gymnasium id."""
    image_size: int = 128
    """Rendered image side in pixels."""
    require_solvable: bool = True
    """Deal only hands that have a solution."""

    def env_kwargs(self) -> dict[str, Any]:
        return {**super().env_kwargs(), "image_size": self.image_size, "require_solvable": self.require_solvable}


if __name__ == "__main__":
    run(Points24PPO)
