"""``vlmrl/Reach-v0`` (MuJoCo: move the gripper to the target with discrete moves).

vlmrl train reach --total-env-steps 5000
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from experiments.common import TaskEnvOptions, main


@dataclass
class Reach(TaskEnvOptions):
    env_id: ClassVar[str] = "vlmrl/Reach-v0"

    image_size: int = 128
    """Rendered image side in pixels."""

    def env_kwargs(self) -> dict[str, Any]:
        return {**super().env_kwargs(), "image_size": self.image_size}


if __name__ == "__main__":
    main("reach")
