"""What every vlmrl environment shares: a ``{"image", "text"}`` observation, and the wrapper that gives
any Gymnasium environment that renders ``rgb_array`` frames the same observation.

Environments of this package subclass :class:`LanguageEnv`; a third-party environment joins through
:func:`register_language_env`, which registers a Gymnasium id whose environment is the original one
wrapped in :class:`ImageTextObservation`.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.language import LanguageSpec, register_language

#: Longest step text an observation may carry.
MAX_TEXT_LENGTH = 1024
#: Characters a step text may use (printable ASCII, so every tokenizer can encode it).
TEXT_CHARSET = "".join(ch for ch in string.printable if ch not in "\x0b\x0c\r")


def observation_space(height: int, width: int) -> spaces.Dict:
    """The observation space shared by every vlmrl environment."""
    return spaces.Dict(
        {
            "image": spaces.Box(0, 255, (height, width, 3), np.uint8),
            "text": spaces.Text(MAX_TEXT_LENGTH, min_length=0, charset=TEXT_CHARSET),
        }
    )


def check_frame(frame: Any, env_name: str) -> np.ndarray:
    """Return ``frame`` if it is a uint8 HxWx3 array, else raise a message that names the environment."""
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        got = (
            f"{type(frame).__name__} with dtype {frame.dtype} and shape {frame.shape}"
            if isinstance(frame, np.ndarray)
            else type(frame).__name__
        )
        raise ValueError(
            f"{env_name}: render() must return a uint8 array of shape (H, W, 3), got {got}. "
            'Create the environment with render_mode="rgb_array" and convert frames to uint8 RGB.'
        )
    return frame


class LanguageEnv(gym.Env):
    """Base class of the vlmrl environments.

    Observations are ``{"image": uint8 (H, W, 3), "text": str}``; ``render()`` returns the same image.
    Subclasses set ``language`` (a :class:`LanguageSpec`) and implement ``_image()``, ``_text()``,
    ``expert_action()`` and ``expert_rationale()``.
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["rgb_array"], "render_fps": 4}
    language: ClassVar[LanguageSpec]

    def __init__(self, render_mode: str | None = "rgb_array") -> None:
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f'{type(self).__name__} supports render_mode="rgb_array" only, got {render_mode!r}.')
        self.render_mode = render_mode

    # -- to implement -----------------------------------------------------------------------------------
    def _image(self) -> np.ndarray:
        raise NotImplementedError

    def _text(self) -> str:
        raise NotImplementedError

    def expert_action(self) -> int:
        """The scripted expert's action for the current state."""
        raise NotImplementedError

    def expert_rationale(self) -> str:
        """A short, truthful reason for :meth:`expert_action`, for chain-of-thought demonstrations."""
        raise NotImplementedError

    def progress_caption(self) -> str:
        """The one of ``language.progress_captions`` that describes the current state (for ``vlmrl
        clip-adapt``). Optional: only environments whose spec lists progress captions implement it; a
        third-party environment can define the same method on its own class."""
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------------------------
    def _observation(self) -> dict[str, Any]:
        return {"image": check_frame(self._image(), type(self).__name__), "text": self._text()}

    def render(self) -> np.ndarray | None:
        if self.render_mode is None:
            return None
        return self._image()

    def _check_action(self, action: Any) -> int:
        if not self.action_space.contains(action):
            raise ValueError(
                f"{type(self).__name__}: invalid action {action!r}; expected an integer in "
                f"[0, {self.action_space.n}) naming one of {self.language.action_names}."
            )
        return int(action)


class ImageTextObservation(gym.ObservationWrapper):
    """Give any ``rgb_array`` environment the vlmrl observation: the rendered frame plus a step text.

    Args:
        env: An environment created with ``render_mode="rgb_array"``.
        describe: Optional function from the wrapped environment's observation to the step text; by
            default the step text is empty and the model sees only the image.
    """

    def __init__(self, env: gym.Env, describe: Callable[[Any], str] | None = None) -> None:
        super().__init__(env)
        name = env.spec.id if env.spec is not None else type(env.unwrapped).__name__
        self._name = name
        if env.render_mode != "rgb_array":
            raise ValueError(f'{name}: create it with render_mode="rgb_array" to use it with a VLM policy.')
        self._describe = describe
        frame = None
        # The frame size is only known once the env can render; most envs need a reset first.
        try:
            frame = env.render()
        except Exception:  # noqa: BLE001 - many envs refuse to render before reset; reset below decides
            frame = None
        if frame is None:
            env.reset(seed=0)
            frame = env.render()
        frame = check_frame(frame, name)
        self.observation_space = observation_space(frame.shape[0], frame.shape[1])

    def observation(self, observation: Any) -> dict[str, Any]:
        frame = check_frame(self.env.render(), self._name)
        text = self._describe(observation) if self._describe is not None else ""
        return {"image": frame, "text": text}


def _make_language_env(base_id: str, describe: Callable[[Any], str] | None = None, **kwargs: Any) -> gym.Env:
    kwargs.setdefault("render_mode", "rgb_array")
    return ImageTextObservation(gym.make(base_id, **kwargs), describe)


def register_language_env(
    env_id: str,
    base_id: str,
    spec: LanguageSpec,
    *,
    describe: Callable[[Any], str] | None = None,
    max_episode_steps: int | None = None,
    **base_kwargs: Any,
) -> None:
    """Register a third-party Gymnasium environment for VLM policies.

    Example (the whole of what it takes for ``FrozenLake-v1``):

    >>> from envs import LanguageSpec, register_language_env
    >>> register_language_env(
    ...     "vlmrl/FrozenLake-v1", "FrozenLake-v1",
    ...     LanguageSpec("Walk on the ice to the gift without falling into a hole.",
    ...                  ("left", "down", "right", "up")),
    ...     is_slippery=False,
    ... )
    >>> env = gym.make("vlmrl/FrozenLake-v1")
    >>> observation, info = env.reset(seed=0)
    >>> observation["image"].dtype, observation["image"].shape[2]
    (dtype('uint8'), 3)
    """
    base_env = gym.make(base_id, **{"render_mode": "rgb_array", **base_kwargs})
    try:
        if not isinstance(base_env.action_space, spaces.Discrete) or base_env.action_space.n != len(spec.action_names):
            raise ValueError(
                f"{env_id}: the language spec names {len(spec.action_names)} actions but {base_id} has "
                f"action space {base_env.action_space}; give one name per discrete action."
            )
    finally:
        base_env.close()
    gym.register(
        id=env_id,
        entry_point=_make_language_env,
        max_episode_steps=max_episode_steps,
        kwargs={"base_id": base_id, "describe": describe, **base_kwargs},
    )
    register_language(env_id, spec, overwrite=True)
