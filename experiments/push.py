"""PPO on ``vlmrl/Push-v0`` (MuJoCo: push the block into the goal region with discrete moves).

python -m experiments.push --total-env-steps 5000
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from experiments.common import ExperimentConfig, run


@dataclass
class PushPPO(ExperimentConfig):
    env_id: str = "vlmrl/Push-v0"
    """Registered Gymnasium id."""
    image_size: int = 128
    """Rendered image side in pixels."""

    def env_kwargs(self) -> dict[str, Any]:
        return {**super().env_kwargs(), "image_size": self.image_size}


if __name__ == "__main__":
    run(PushPPO)
