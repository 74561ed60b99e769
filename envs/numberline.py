"""NumberLine from RL4VLM's gym-cards (https://arxiv.org/abs/2405.10292): step a marker to a target.

Unlike the original, the start and the target come from the seeded ``np_random`` (RL4VLM's used the
global ``random`` module and so ignored the seed), and the image also draws the line itself.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import numpy as np
from gymnasium import spaces

from envs import drawing
from envs.base import LanguageEnv, observation_space
from envs.language import LanguageSpec
from envs.thoughts import NUMBER, introduced, unclaimed_numbers

MINUS, PLUS = 0, 1
_ACTION_NAMES = ("-", "+")
_TARGET_RED = (210, 40, 40)
_CURRENT_BLUE = (30, 80, 200)

# Keywords that introduce the current number and the target in a thought.
_CURRENT_WORDS = r"current|position|marker|blue|i'm\s+at|i\s+am\s+at|now\s+at"
_TARGET_WORDS = r"target|goal|red"
# Words that compare the first-named number with the second: "3 is below the target 5".
_LESS = re.compile(r"\b(?:below|less|smaller|lower|under)\b", re.IGNORECASE)
_GREATER = re.compile(r"\b(?:above|greater|larger|bigger|higher|more\s+than)\b", re.IGNORECASE)


class NumberLineEnv(LanguageEnv):
    """Move the current position along the integer line ``0..max_position`` until it equals the target.

    Rules (RL4VLM): the target and the start are drawn uniformly and are distinct. ``"-"`` moves one step
    down and ``"+"`` one step up, clipped to the line. Reaching the target gives +1 and ends the episode
    (``info["success"]`` is True); a move that does not bring the position closer, bumping an end of the
    line included, gives -1; any other move gives 0. The environment truncates after
    ``2 * max_position`` steps; a step after the episode ended raises ``RuntimeError``.

    Observation: the image writes "Target: t" and "Current: c" in large type above a drawn number line
    that marks the target (red triangle) and the current position (blue disc). The step text says how
    many steps are left; with ``text_hint=True`` it also states both numbers.

    Truthful thoughts (``check_thoughts``): a thought must state the current number after "current",
    "position" or "I am at", and, unless it already equals the target, the target after "target" or
    "goal". A comparison word between the two ("below", "less", "above", "greater"...) must compare the
    first-named number with the second truly. Every other number must be one of the two, their distance,
    the steps taken or left, the step limit, 0, 1 or ``max_position``.

    Args:
        render_mode: ``"rgb_array"`` (default) or ``None``.
        max_position: The largest position (at least 1).
        image_size: Side of the square image in pixels.
        text_hint: Also state the target and the current position in the step text.

    Example:
        >>> env = NumberLineEnv()
        >>> observation, info = env.reset(seed=0)
        >>> env.target != env.position, 0 <= env.position <= 5
        (True, True)
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["rgb_array"], "render_fps": 4}
    language: ClassVar[LanguageSpec] = LanguageSpec(
        'The image shows a target number and your current number on a number line. Choose "-" to move '
        'the current number down by one or "+" to move it up by one, until it equals the target.',
        _ACTION_NAMES,
    )

    def __init__(
        self,
        render_mode: str | None = "rgb_array",
        max_position: int = 5,
        image_size: int = 128,
        text_hint: bool = False,
    ) -> None:
        super().__init__(render_mode)
        if int(max_position) != max_position or max_position < 1:
            raise ValueError(f"max_position must be a whole number of at least 1, got {max_position}.")
        if not 64 <= image_size <= 1024:
            raise ValueError(f"image_size must be 64..1024 pixels so the numbers stay readable, got {image_size}.")
        self.max_position = int(max_position)
        self.max_steps = 2 * self.max_position
        self.image_size = int(image_size)
        self.text_hint = bool(text_hint)
        self.observation_space = observation_space(self.image_size, self.image_size)
        self.action_space = spaces.Discrete(len(_ACTION_NAMES))
        self.target = 0
        self.position = 0
        self.steps = 0
        self.done = False

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        self.target = int(self.np_random.integers(0, self.max_position + 1))
        # Uniform over the other max_position positions: skip over the target.
        start = int(self.np_random.integers(0, self.max_position))
        self.position = start + 1 if start >= self.target else start
        self.steps = 0
        self.done = False
        return self._observation(), {"success": False}

    def step(self, action: Any) -> tuple[dict, float, bool, bool, dict]:
        action = self._check_action(action)
        if self.done:
            raise RuntimeError("NumberLineEnv: the episode is over; call reset() before step().")
        self.steps += 1
        distance_before = abs(self.target - self.position)
        move = 1 if action == PLUS else -1
        self.position = min(max(self.position + move, 0), self.max_position)
        distance = abs(self.target - self.position)
        terminated = distance == 0
        if terminated:
            reward = 1.0
        elif distance >= distance_before:  # moved away, or bumped an end of the line
            reward = -1.0
        else:
            reward = 0.0
        truncated = not terminated and self.steps >= self.max_steps
        self.done = terminated or truncated
        return self._observation(), reward, terminated, truncated, {"success": terminated}

    # -- observation ------------------------------------------------------------------------------------
    def _text(self) -> str:
        steps_left = self.max_steps - self.steps
        text = f"Steps left: {steps_left}."
        if self.text_hint:
            text += f" Target: {self.target}. Current: {self.position}."
        return text

    def _image(self) -> np.ndarray:
        size = self.image_size
        image, draw = drawing.new_canvas(size, size, drawing.WHITE)
        margin = size // 16
        line_height = size // 4
        drawing.draw_text_left(
            draw, (margin, margin, size - margin, margin + line_height), f"Target: {self.target}", _TARGET_RED
        )
        drawing.draw_text_left(
            draw,
            (margin, margin + line_height + margin // 2, size - margin, margin + 2 * line_height),
            f"Current: {self.position}",
            _CURRENT_BLUE,
        )
        self._draw_line(draw, top=margin + 2 * line_height + margin, bottom=size - margin // 2, margin=margin)
        return drawing.to_array(image)

    def _draw_line(self, draw: Any, top: int, bottom: int, margin: int) -> None:
        size = self.image_size
        marker = max(3, (bottom - top) // 5)
        left, right = margin + marker, size - margin - marker
        y = top + (bottom - top) // 2

        def x_of(position: int) -> float:
            return left + (right - left) * position / self.max_position

        draw.line((left, y, right, y), fill=drawing.BLACK, width=max(1, size // 128))
        spacing = (right - left) / self.max_position
        # Tick numbers only while they stay legible; the two big lines above carry the numbers anyway.
        label_size = drawing.fit_font_size(str(self.max_position), int(spacing * 0.9), marker * 2, largest=size // 10)
        show_labels = spacing >= 8 and label_size >= 8
        for position in range(self.max_position + 1):
            x = x_of(position)
            draw.line((x, y - marker // 2, x, y + marker // 2), fill=drawing.BLACK, width=max(1, size // 128))
            if show_labels:
                draw.text(
                    (x, y + marker), str(position), fill=drawing.BLACK, font=drawing.load_font(label_size), anchor="mt"
                )
        tx = x_of(self.target)
        draw.polygon(
            [(tx, y - 0.3 * marker), (tx - marker, y - 2.3 * marker), (tx + marker, y - 2.3 * marker)], fill=_TARGET_RED
        )
        cx = x_of(self.position)
        draw.ellipse((cx - 0.8 * marker, y - 0.8 * marker, cx + 0.8 * marker, y + 0.8 * marker), fill=_CURRENT_BLUE)

    # -- expert ---------------------------------------------------------------------------------------------
    def expert_action(self) -> int:
        """Step towards the target."""
        return PLUS if self.position < self.target else MINUS

    def expert_rationale(self) -> str:
        if self.position == self.target:
            return f"The current number {self.position} already equals the target."
        relation = "below" if self.position < self.target else "above"
        action = _ACTION_NAMES[self.expert_action()]
        return f"The current number {self.position} is {relation} the target {self.target}, so I choose {action}."

    def check_thoughts(self, thoughts: str) -> bool:
        """Whether ``thoughts`` states the current number and the target truly, and nothing false.

        See the class docstring for the rules.

        >>> env = NumberLineEnv()
        >>> _ = env.reset(seed=0)
        >>> env.expert_rationale()
        'The current number 3 is below the target 5, so I choose +.'
        >>> env.check_thoughts("TARGET 5, and my position is 3: one more step up.")
        True
        >>> env.check_thoughts("The target 5 is below the current number 3."), env.check_thoughts("Go up.")
        (False, False)
        """
        current = introduced(thoughts, _CURRENT_WORDS, NUMBER, stop=_TARGET_WORDS)
        target = introduced(thoughts, _TARGET_WORDS, NUMBER, stop=_CURRENT_WORDS)
        if not current or (not target and self.position != self.target):
            return False
        if any(float(m.group()) != self.position for m in current) or any(
            float(m.group()) != self.target for m in target
        ):
            return False
        if target:
            # The comparison words between the first mention of each compare the first with the second.
            first, second = sorted((current[0], target[0]), key=lambda match: match.start())
            between = thoughts[first.end() : second.start()]
            first_value, second_value = float(first.group()), float(second.group())
            if (_LESS.search(between) and not first_value < second_value) or (
                _GREATER.search(between) and not first_value > second_value
            ):
                return False
        allowed = {
            self.position,
            self.target,
            abs(self.target - self.position),
            self.steps,
            self.max_steps - self.steps,
            self.max_steps,
            0,
            1,
            self.max_position,
        }
        claimed = [match.span() for match in current + target]
        return all(found.value in allowed for found in unclaimed_numbers(thoughts, claimed))
