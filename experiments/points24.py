"""``vlmrl/Points24-v0`` (RL4VLM's Points24: a formula of four cards that equals 24).

vlmrl train points24 --total-env-steps 5000
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from experiments.common import TaskEnvOptions, main


@dataclass
class Points24(TaskEnvOptions):
    env_id: ClassVar[str] = "vlmrl/Points24-v0"

    image_size: int = 128
    """Rendered image side in pixels."""
    require_solvable: bool = True
    """Deal only hands that have a solution."""

    def env_kwargs(self) -> dict[str, Any]:
        return {**super().env_kwargs(), "image_size": self.image_size, "require_solvable": self.require_solvable}


if __name__ == "__main__":
    main("points24")
