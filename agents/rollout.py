"""Running a text-generating policy in Gymnasium vector environments: the pieces no library provides.

* :func:`make_vector_env` builds the vector env (same-step autoreset, so every step is a real transition
  and the final observation of a truncated episode is at hand for bootstrapping; errors name the env);
* :func:`env_actions` turns parsed answers into environment actions under an explicit invalid-answer rule;
* :class:`EpisodeStats` keeps per-env returns, lengths and successes of finished episodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import gymnasium as gym
import numpy as np

from agents.policy import Completion

InvalidRule = Literal["default", "random"]


class NamedErrors(gym.Wrapper):
    """Re-raise an environment's exception with the index of the env in the vector env."""

    def __init__(self, env: gym.Env, index: int) -> None:
        super().__init__(env)
        self.index = index

    def _name(self) -> str:
        spec_id = self.env.spec.id if self.env.spec is not None else type(self.env.unwrapped).__name__
        return f"env {self.index} ({spec_id})"

    def step(self, action: Any):
        try:
            return self.env.step(action)
        except Exception as error:
            raise RuntimeError(f"{self._name()} failed in step({action!r}): {error!r}") from error

    def reset(self, **kwargs: Any):
        try:
            return self.env.reset(**kwargs)
        except Exception as error:
            raise RuntimeError(f"{self._name()} failed in reset(): {error!r}") from error


def make_vector_env(env_id: str, num_envs: int, env_kwargs: dict[str, Any] | None = None) -> gym.vector.SyncVectorEnv:
    """``num_envs`` copies of ``env_id`` in one synchronous vector env with same-step autoreset."""
    import envs  # noqa: F401 - registers the vlmrl environments

    def thunk(index: int):
        return lambda: NamedErrors(gym.make(env_id, **(env_kwargs or {})), index)

    return gym.vector.SyncVectorEnv(
        [thunk(i) for i in range(num_envs)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
    )


def env_actions(
    completions: Sequence[Completion],
    rule: InvalidRule,
    default_action: int,
    num_actions: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Environment actions for a batch of answers, and which answers were invalid.

    An invalid answer still has to move the environment. ``"default"`` takes ``default_action``;
    ``"random"`` takes a uniformly random action. Either way the update credits the log-prob of the text
    the model actually wrote (never of the substitute action), and the caller adds the invalid-answer
    penalty to the reward: RL4VLM silently substituted a random action without penalty, which credits
    tokens for a choice they never made.
    """
    actions = np.zeros(len(completions), dtype=np.int64)
    invalid = np.zeros(len(completions), dtype=bool)
    for index, completion in enumerate(completions):
        if completion.action is not None:
            actions[index] = completion.action
        else:
            invalid[index] = True
            actions[index] = default_action if rule == "default" else rng.integers(num_actions)
    return actions, invalid


@dataclass
class EpisodeStats:
    """Returns, lengths and successes of the episodes that finished, per vector env."""

    num_envs: int
    returns: np.ndarray = field(init=False)
    lengths: np.ndarray = field(init=False)
    finished: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.returns = np.zeros(self.num_envs)
        self.lengths = np.zeros(self.num_envs, dtype=np.int64)

    def update(self, rewards: np.ndarray, terminated: np.ndarray, truncated: np.ndarray, info: dict) -> None:
        self.returns += rewards
        self.lengths += 1
        ended = np.logical_or(terminated, truncated)
        final_info = info.get("final_info", {})
        for index in np.flatnonzero(ended):
            success = bool(final_info.get("success", np.zeros(self.num_envs, dtype=bool))[index])
            self.finished.append(
                {"return": float(self.returns[index]), "length": int(self.lengths[index]), "success": success}
            )
            self.returns[index] = 0.0
            self.lengths[index] = 0

    def pop(self) -> list[dict[str, float]]:
        """The episodes finished since the last call."""
        finished, self.finished = self.finished, []
        return finished
