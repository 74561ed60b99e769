"""Gymnasium environments with image observations and a language interface.

``import envs`` registers every environment below with :func:`gymnasium.register` and attaches its
:class:`~envs.language.LanguageSpec`. Make one with ``gymnasium.make("vlmrl/GridWorld-v0")``; its
observations are ``{"image": uint8 (H, W, 3), "text": str}`` and ``env.unwrapped.expert_action()`` gives
the scripted expert's action. :func:`thought_checker` gives an environment's truthful-thought checker (its
``check_thoughts`` method), or ``None`` for an environment without one.
"""

from __future__ import annotations

import importlib

import gymnasium as gym

from envs.base import ImageTextObservation, LanguageEnv, check_frame, register_language_env
from envs.language import (
    LanguageSpec,
    ParsedAction,
    build_prompt,
    format_answer,
    get_language,
    language_env_ids,
    parse_action,
    register_language,
)
from envs.thoughts import thought_checker

#: id -> (entry point, episode step limit). The limits are where the TimeLimit truncates an episode.
VLMRL_ENVS: dict[str, tuple[str, int]] = {
    "vlmrl/Blackjack-v0": ("envs.blackjack:BlackjackEnv", 20),
    "vlmrl/NumberLine-v0": ("envs.numberline:NumberLineEnv", 1_000),  # the env truncates at 2x the line
    "vlmrl/EZPoints-v0": ("envs.points:EZPointsEnv", 20),
    "vlmrl/Points24-v0": ("envs.points:Points24Env", 40),
    "vlmrl/GridWorld-v0": ("envs.gridworld:GridWorldEnv", 1_000),  # the env truncates at its own limit
    "vlmrl/Reach-v0": ("envs.manipulation:ReachEnv", 50),
    "vlmrl/Push-v0": ("envs.manipulation:PushEnv", 100),
}
VLMRL_ENV_IDS: tuple[str, ...] = tuple(VLMRL_ENVS)
#: Sanity-check environments (not part of the benchmark suite): learnable in seconds.
DEBUG_ENVS: dict[str, tuple[str, int]] = {"vlmrl/Colour-v0": ("envs.colour:ColourEnv", 1)}


def _register_all() -> None:
    for env_id, (entry_point, max_episode_steps) in {**VLMRL_ENVS, **DEBUG_ENVS}.items():
        module_name, class_name = entry_point.split(":")
        env_class = getattr(importlib.import_module(module_name), class_name)
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=entry_point, max_episode_steps=max_episode_steps)
        register_language(env_id, env_class.language)


_register_all()


def check_registered(env_id: str) -> None:
    """One ``ValueError`` listing the known ids when ``env_id`` is not registered with gymnasium (for checks
    of what a user typed, before anything is built)."""
    if env_id not in gym.registry:
        raise ValueError(
            f"Unknown env_id {env_id!r}. Registered VLM environments: {', '.join(language_env_ids())}. "
            "A third-party env is registered by its own module: pass it with --env-module."
        )


def language_spec_of(env_id: str) -> LanguageSpec:
    """The language spec of a registered env id, or one ``ValueError`` saying what is known."""
    check_registered(env_id)
    try:
        return get_language(env_id)
    except KeyError as error:
        raise ValueError(str(error.args[0])) from None


__all__ = [
    "VLMRL_ENV_IDS",
    "ImageTextObservation",
    "LanguageEnv",
    "LanguageSpec",
    "ParsedAction",
    "build_prompt",
    "check_frame",
    "check_registered",
    "format_answer",
    "get_language",
    "language_env_ids",
    "language_spec_of",
    "parse_action",
    "register_language",
    "register_language_env",
    "thought_checker",
]
