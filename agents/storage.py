"""Rollout storage and advantage estimation, shared by the on-policy algorithms.

A :class:`Rollout` holds ``num_steps x num_envs`` transitions. Each transition keeps the policy's whole
:class:`~agents.policy.Completion` (its own prompt and image, so the update never re-uses another
step's prompt), the reward, the episode-end flags, and, for truncated episodes, the value of the final
observation to bootstrap from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from agents.policy import Completion


def compute_gae(
    rewards: np.ndarray,
    values: np.ndarray,
    next_values: np.ndarray,
    terminated: np.ndarray,
    truncated: np.ndarray,
    gamma: float,
    gae_lambda: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Generalised advantage estimation (Schulman et al. 2016, https://arxiv.org/abs/1506.02438).

    All arrays are ``(T, N)``. ``next_values[t]`` is the value of the observation reached by step ``t``:
    the next step's value inside an episode, the final observation's value on truncation, anything on
    termination (it is multiplied by 0). Bootstraps on truncation, not on termination, and never lets an
    advantage flow across an episode boundary.

    Returns ``(advantages, returns)`` with ``returns = advantages + values``.

    >>> a, r = compute_gae(np.array([[1.0], [1.0]]), np.zeros((2, 1)), np.array([[0.0], [5.0]]),
    ...                    np.array([[False], [False]]), np.array([[False], [True]]), 0.5, 1.0)
    >>> a.ravel().tolist()  # step 1 bootstraps 0.5 * 5; step 0 adds 0.5 * step 1's advantage
    [2.75, 3.5]
    """
    steps = rewards.shape[0]
    advantages = np.zeros_like(rewards, dtype=np.float64)
    following = np.zeros(rewards.shape[1:], dtype=np.float64)
    for t in reversed(range(steps)):
        delta = rewards[t] + gamma * next_values[t] * (1.0 - terminated[t]) - values[t]
        episode_goes_on = 1.0 - np.logical_or(terminated[t], truncated[t])
        following = delta + gamma * gae_lambda * episode_goes_on * following
        advantages[t] = following
    return advantages, advantages + values


@dataclass
class Rollout:
    """``num_steps x num_envs`` transitions; fill with :meth:`add`, then call :meth:`finish`."""

    num_steps: int
    num_envs: int
    completions: list[list[Completion]] = field(default_factory=list)
    rewards: np.ndarray = field(init=False)
    terminated: np.ndarray = field(init=False)
    truncated: np.ndarray = field(init=False)
    values: np.ndarray = field(init=False)
    logprobs: np.ndarray = field(init=False)
    next_values: np.ndarray = field(init=False)
    step: int = 0

    def __post_init__(self) -> None:
        shape = (self.num_steps, self.num_envs)
        self.rewards = np.zeros(shape)
        self.terminated = np.zeros(shape, dtype=bool)
        self.truncated = np.zeros(shape, dtype=bool)
        self.values = np.zeros(shape)
        self.logprobs = np.zeros(shape)
        self.next_values = np.zeros(shape)

    def add(
        self,
        completions: list[Completion],
        rewards: np.ndarray,
        terminated: np.ndarray,
        truncated: np.ndarray,
        final_values: dict[int, float],
    ) -> None:
        """Store one vector step. ``final_values`` maps env index -> value of its truncated final obs."""
        t = self.step
        self.completions.append(completions)
        self.rewards[t] = rewards
        self.terminated[t] = terminated
        self.truncated[t] = truncated
        self.values[t] = [c.value for c in completions]
        self.logprobs[t] = [c.logprob for c in completions]
        if t > 0:
            # Inside an episode the next observation's value is this step's value; a truncated episode
            # keeps the value of its final observation, stored when it ended.
            self.next_values[t - 1] = np.where(self.truncated[t - 1], self.next_values[t - 1], self.values[t])
        for env_index, value in final_values.items():
            self.next_values[t, env_index] = value
        self.step += 1

    def finish(self, bootstrap_values: np.ndarray, gamma: float, gae_lambda: float) -> None:
        """Close the rollout with the values of the observations after its last step, compute GAE."""
        if self.step != self.num_steps:
            raise RuntimeError(f"Rollout has {self.step} of {self.num_steps} steps.")
        last = self.num_steps - 1
        ended = self.truncated[last]  # keep the final-observation value of a truncation at the last step
        self.next_values[last] = np.where(ended, self.next_values[last], bootstrap_values)
        self.advantages, self.returns = compute_gae(
            self.rewards, self.values, self.next_values, self.terminated, self.truncated, gamma, gae_lambda
        )

    @staticmethod
    def join(parts: list[Rollout]) -> Rollout:
        """One rollout from finished rollouts of consecutive blocks of envs (the ranks of a data-parallel run),
        laid out as one process running all the envs would have (env index = block offset + local index)."""
        if len(parts) == 1:
            return parts[0]
        joined = Rollout(parts[0].num_steps, sum(part.num_envs for part in parts))
        joined.completions = [[c for part in parts for c in part.completions[t]] for t in range(joined.num_steps)]
        for name in (
            "rewards",
            "terminated",
            "truncated",
            "values",
            "logprobs",
            "next_values",
            "advantages",
            "returns",
        ):
            setattr(joined, name, np.concatenate([getattr(part, name) for part in parts], axis=1))
        joined.step = parts[0].step
        return joined

    def flat(self) -> tuple[list[Completion], dict[str, torch.Tensor]]:
        """All transitions, step-major, with their tensors (for minibatching)."""
        completions = [c for step in self.completions for c in step]
        tensors = {
            "logprobs": torch.as_tensor(self.logprobs.reshape(-1), dtype=torch.float32),
            "values": torch.as_tensor(self.values.reshape(-1), dtype=torch.float32),
            "advantages": torch.as_tensor(self.advantages.reshape(-1), dtype=torch.float32),
            "returns": torch.as_tensor(self.returns.reshape(-1), dtype=torch.float32),
        }
        return completions, tensors
