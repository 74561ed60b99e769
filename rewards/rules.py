"""Rule-based reward modules: ``env``, ``invalid``, ``format`` and potential-based ``shaping``.

Each is registered by name in :mod:`rewards` when the package is imported; see its docstring for the
module signature. ``invalid`` with weight ``-0.1`` reproduces the penalty GRPO hard-codes today
(``reward - 0.1 * invalid``), ``-1.0`` PPO's default.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

from envs.language import PROMPT_STYLES, extract_thoughts, get_language, parse_action
from rewards import RewardContext, RewardFn, options_to, register_reward

#: Keys of a step's info that potential-based shaping reads: the potential of the state the step led to,
#: and of the state it started from. Envs with a ``potential()`` method write both (see :class:`PotentialInfo`).
POTENTIAL_KEY = "potential"
PREVIOUS_POTENTIAL_KEY = "previous_potential"


def env_reward(observations: Any, completions: Sequence[Any], infos: Sequence[dict], **step: Any) -> list[float]:
    """The environment's own (rule-based) reward of the step."""
    return [float(r) for r in step["env_rewards"]]


def step_count(observations: Any, completions: Sequence[Any], infos: Sequence[dict], **step: Any) -> list[float]:
    """1.0 for every step: weighted negatively, a cost of time.

    A reward that is positive at every step (a CLIP similarity, say) pays an agent to keep an episode going,
    even away from a goal that would end it; ``step:-1`` beside ``clip:1`` makes each step cost ``1 - clip``
    instead, so reaching the goal soon is what pays.
    """
    return [1.0] * len(completions)


def invalid_answer(observations: Any, completions: Sequence[Any], infos: Sequence[dict], **step: Any) -> list[float]:
    """1.0 for an answer the parser could not turn into a legal action, else 0.0: weight it negatively.

    The env still moved (the runner's invalid-answer rule picked a default or random action); this term is
    what tells the policy that its text did not choose that action (RL4VLM gave no such signal).
    """
    return [0.0 if completion.action is not None else 1.0 for completion in completions]


@dataclass
class FormatConfig:
    """Options of the ``format`` reward."""

    style: str | None = None
    """``"cot"`` (a JSON object with a ``"thoughts"`` string and a legal ``"action"``) or ``"action"`` (a legal
    action name); default: the policy's prompt style from the context."""
    strict: bool = False
    """Also require that the answer is nothing but that (no prose before or after the JSON object)."""


class FormatReward:
    """1.0 when an answer is well-formed for the prompt style (parsed by :mod:`envs.language`), else 0.0.

    Unlike ``invalid`` it also asks for the thoughts field of a chain-of-thought answer, and with
    ``strict`` for nothing around the JSON object (DeepSeek-R1-style format rewards).
    """

    def __init__(self, env_id: str, config: FormatConfig, default_style: str) -> None:
        self.spec = get_language(env_id)
        self.style = config.style or default_style
        if self.style not in PROMPT_STYLES:
            raise ValueError(f"format: style={self.style!r}; use one of {', '.join(PROMPT_STYLES)}.")
        self.strict = config.strict

    def score(self, text: str) -> float:
        parsed = parse_action(text, self.spec, self.style)
        if not parsed.valid:
            return 0.0
        if self.style == "action":
            return 1.0 if not self.strict or text.strip() == text.strip().splitlines()[0] else 0.0
        if extract_thoughts(text) is None:
            return 0.0
        if self.strict:
            try:
                return 1.0 if isinstance(json.loads(text), dict) else 0.0
            except json.JSONDecodeError:
                return 0.0
        return 1.0

    def __call__(
        self, observations: Any, completions: Sequence[Any], infos: Sequence[dict], **step: Any
    ) -> list[float]:
        return [self.score(completion.text) for completion in completions]


@dataclass
class ShapingConfig:
    """Options of the ``shaping`` reward."""

    gamma: float | None = None
    """Discount of the shaping term; default: the algorithm's gamma from the context. It must equal the
    discount of the return being shaped, or the optimal policy may change (Ng et al. 1999, Theorem 1)."""
    zero_on_truncation: bool = False
    """Treat a truncated (time-limit) step like a terminal one, phi(s') = 0. Off by default: a cut episode's
    last state is not terminal (see :class:`PotentialShaping`)."""


class PotentialShaping:
    """Potential-based shaping ``F = gamma * phi(s') - phi(s)`` (Ng, Harada & Russell 1999,
    https://people.eecs.berkeley.edu/~russell/papers/icml99-shaping.pdf).

    The potential comes from the env: each step's info carries ``previous_potential`` (phi(s)) and
    ``potential`` (phi(s')), written by an env with a ``potential()`` method (GridWorld: minus the
    shortest-path distance; Reach: minus the gripper-to-ball distance) or by the :class:`PotentialInfo`
    wrapper. Reading both from the step's own info keeps the module stateless: resets, group rollouts
    and resumed runs need no bookkeeping.

    Episode ends. A terminal state has phi = 0 (Ng et al.), so an episode's shaped return telescopes to
    ``return - phi(s_0)``, which no policy can change. A truncated step is not terminal: phi(s') is kept
    (``gamma * phi(s')`` is paid), which is what an algorithm that bootstraps at the cut (PPO adds
    ``gamma * V(s')``) needs for the shaped value ``V - phi`` to be consistent. For Monte-Carlo returns
    (GRPO) a cut episode's shaped return is ``return + gamma^T phi(s_T) - phi(s_0)``: the cut state's
    potential counts, rewarding being close to the goal when time ran out. ``zero_on_truncation`` drops it.

    >>> shaping = PotentialShaping(gamma=0.5)
    >>> infos = [{"previous_potential": -3.0, "potential": -2.0}, {"previous_potential": -1.0, "potential": 0.0}]
    >>> shaping(None, [None, None], infos, terminated=np.array([False, True]), truncated=np.array([False, False]))
    [2.0, 1.0]
    """

    def __init__(self, gamma: float, zero_on_truncation: bool = False) -> None:
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"shaping: gamma={gamma}; use the algorithm's discount, in [0, 1].")
        self.gamma = gamma
        self.zero_on_truncation = zero_on_truncation

    def __call__(
        self, observations: Any, completions: Sequence[Any], infos: Sequence[dict], **step: Any
    ) -> list[float]:
        ended = np.asarray(step["terminated"], dtype=bool)
        if self.zero_on_truncation:
            ended = ended | np.asarray(step["truncated"], dtype=bool)
        shaped = []
        for index, info in enumerate(infos):
            if POTENTIAL_KEY not in info or PREVIOUS_POTENTIAL_KEY not in info:
                raise ValueError(
                    f"shaping: env {index}'s step info has no {POTENTIAL_KEY!r} and {PREVIOUS_POTENTIAL_KEY!r}; give "
                    "the env a potential() method and wrap it in rewards.rules.PotentialInfo (GridWorld and Reach "
                    "write them already), or remove the shaping reward."
                )
            after = 0.0 if ended[index] else float(info[POTENTIAL_KEY])
            shaped.append(self.gamma * after - float(info[PREVIOUS_POTENTIAL_KEY]))
        return shaped


class PotentialInfo(gym.Wrapper):
    """Write ``potential`` and ``previous_potential`` into a step's info from the env's ``potential()``.

    For a third-party env: ``PotentialInfo(env)`` when ``env.unwrapped`` has ``potential()``, or
    ``PotentialInfo(env, potential=lambda env: ...)``. The reset info gets ``potential`` too.
    """

    def __init__(self, env: gym.Env, potential: Any = None) -> None:
        super().__init__(env)
        if potential is None:
            if not hasattr(env.unwrapped, "potential"):
                raise ValueError(f"{env.unwrapped!r} has no potential() method; pass potential=a function of the env.")
            potential = lambda wrapped: wrapped.unwrapped.potential()  # noqa: E731
        self._potential = potential

    def reset(self, **kwargs: Any):
        observation, info = self.env.reset(**kwargs)
        return observation, {**info, POTENTIAL_KEY: float(self._potential(self.env))}

    def step(self, action: Any):
        before = float(self._potential(self.env))
        observation, reward, terminated, truncated, info = self.env.step(action)
        info = {**info, PREVIOUS_POTENTIAL_KEY: before, POTENTIAL_KEY: float(self._potential(self.env))}
        return observation, reward, terminated, truncated, info


def _format_factory(context: RewardContext, options: dict[str, str]) -> RewardFn:
    if context.env_id is None:
        raise ValueError("format: the reward set needs the env id (RewardContext(env_id=...)) to parse answers.")
    return FormatReward(context.env_id, options_to(FormatConfig, options, "format"), context.prompt_style)


def _shaping_factory(context: RewardContext, options: dict[str, str]) -> RewardFn:
    config = options_to(ShapingConfig, options, "shaping")
    gamma = config.gamma if config.gamma is not None else context.gamma
    if gamma is None:
        raise ValueError(
            "shaping: no discount; write shaping:WEIGHT:gamma=0.9 or build the set with RewardContext(gamma=...)."
        )
    return PotentialShaping(gamma, config.zero_on_truncation)


register_reward("env", env_reward, overwrite=True)
register_reward("invalid", invalid_answer, overwrite=True)
register_reward("step", step_count, overwrite=True)
register_reward("format", factory=_format_factory, overwrite=True)
register_reward("shaping", factory=_shaping_factory, overwrite=True)
