"""A one-step sanity check: name the colour that fills the image.

Like Stable-Baselines3's ``IdentityEnv``, it exists to show in seconds that a training pipeline learns at
all: a policy that reads the image scores 1 every episode, one that does not scores 1/3.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import numpy as np
from gymnasium import spaces

from envs.base import LanguageEnv, observation_space
from envs.language import LanguageSpec

COLOURS: dict[str, tuple[int, int, int]] = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (30, 80, 220)}


_COLOUR_WORDS = re.compile(r"\b(" + "|".join(COLOURS) + r")\b", re.IGNORECASE)


class ColourEnv(LanguageEnv):
    """The image is one flat colour; say which. Reward 1 if right, 0 if wrong; one step per episode.

    ``check_thoughts`` passes a thought that names the image's colour and no other of the three colours
    ("The image is all RED" passes; "red or blue" and "" fail).

    >>> env = ColourEnv()
    >>> observation, info = env.reset(seed=0)
    >>> env.step(env.expert_action())[1:3]
    (1.0, True)
    """

    language: ClassVar[LanguageSpec] = LanguageSpec(
        "The image is filled with a single colour. Name the colour.", tuple(COLOURS)
    )

    def __init__(self, render_mode: str | None = "rgb_array", image_size: int = 32) -> None:
        super().__init__(render_mode)
        if not 8 <= image_size <= 512:
            raise ValueError(f"image_size must be 8..512 pixels, got {image_size}.")
        self.image_size = int(image_size)
        self.observation_space = observation_space(self.image_size, self.image_size)
        self.action_space = spaces.Discrete(len(COLOURS))
        self.colour = 0

    def _image(self) -> np.ndarray:
        rgb = list(COLOURS.values())[self.colour]
        return np.full((self.image_size, self.image_size, 3), rgb, dtype=np.uint8)

    def _text(self) -> str:
        return ""

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self.colour = int(self.np_random.integers(len(COLOURS)))
        return self._observation(), {"success": False}

    def step(self, action: Any):
        correct = self._check_action(action) == self.colour
        return self._observation(), float(correct), True, False, {"success": bool(correct)}

    def expert_action(self) -> int:
        return self.colour

    def expert_rationale(self) -> str:
        return f"The whole image is {self.language.action_names[self.colour]}."

    def check_thoughts(self, thoughts: str) -> bool:
        """Whether ``thoughts`` names the colour of the image, and no other colour.

        >>> env = ColourEnv()
        >>> _ = env.reset(seed=0)
        >>> env.language.action_names[env.colour]
        'blue'
        >>> env.check_thoughts("It is all BLUE."), env.check_thoughts("Blue, or maybe green."), env.check_thoughts("")
        (True, False, False)
        """
        named = {match.lower() for match in _COLOUR_WORDS.findall(thoughts)}
        return named == {self.language.action_names[self.colour]}
