"""Checks every registered vlmrl environment must pass, whoever wrote it.

Each test runs once per id in ``envs.VLMRL_ENV_IDS`` (and the debug envs) through ``gymnasium.make``, so a new environment
gets the whole contract checked by registering it.
"""

from __future__ import annotations

import itertools
import pickle
import warnings
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from envs import DEBUG_ENVS, VLMRL_ENV_IDS

N_STEPS = 50
FIRST_SEED = 7


@pytest.fixture(params=VLMRL_ENV_IDS + tuple(DEBUG_ENVS))
def env_id(request: pytest.FixtureRequest) -> str:
    return request.param


def _actions(env: gym.Env, count: int = N_STEPS, seed: int = 0) -> list[int]:
    return [int(a) for a in np.random.default_rng(seed).integers(0, env.action_space.n, size=count)]


def _rollout(env: gym.Env, actions: list[int], reset: bool = True) -> list[tuple]:
    """Step through ``actions``, resetting with the next seed (7, 8, ...) whenever an episode ends."""
    next_seed = itertools.count(FIRST_SEED)
    if reset:
        env.reset(seed=next(next_seed))
    record = []
    for action in actions:
        observation, reward, terminated, truncated, info = env.step(action)
        record.append((observation["image"], observation["text"], float(reward), terminated, truncated))
        if terminated or truncated:
            env.reset(seed=next(next_seed))
    return record


def _assert_same(first: list[tuple], second: list[tuple]) -> None:
    assert len(first) == len(second)
    for step, (a, b) in enumerate(zip(first, second, strict=True)):
        assert np.array_equal(a[0], b[0]), f"images differ at step {step}"
        assert a[1:] == b[1:], f"text, reward or end flags differ at step {step}: {a[1:]} != {b[1:]}"


def test_check_env_without_warnings(env_id: str) -> None:
    env = gym.make(env_id)
    # check_env warns about any wrapper (gym.make adds TimeLimit, OrderEnforcing, PassiveEnvChecker), so it
    # gets the bare environment; the spec is still set, so it also makes fresh copies to check rendering.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env.unwrapped)
    env.close()


def test_same_seed_same_episode(env_id: str) -> None:
    first, second = gym.make(env_id), gym.make(env_id)
    actions = _actions(first)
    _assert_same(_rollout(first, actions), _rollout(second, actions))


def test_pickled_env_continues_identically(env_id: str) -> None:
    env = gym.make(env_id)
    env.reset(seed=5)
    copy = pickle.loads(pickle.dumps(env))
    actions = _actions(env, seed=1)
    _assert_same(_rollout(env, actions, reset=False), _rollout(copy, actions, reset=False))


def test_observation_matches_space(env_id: str) -> None:
    env = gym.make(env_id)
    observation, _ = env.reset(seed=0)
    space = env.observation_space
    for _ in range(2):
        image = observation["image"]
        assert image.dtype == np.uint8
        assert image.ndim == 3 and image.shape[2] == 3
        assert image.shape == space["image"].shape
        assert isinstance(observation["text"], str)
        assert space.contains(observation)
        assert np.array_equal(env.render(), image), "render() must return the observation's image"
        observation, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            observation, _ = env.reset()


@pytest.mark.parametrize("bad_action", ["too_large", -1])
def test_out_of_range_action_raises(env_id: str, bad_action: Any) -> None:
    env = gym.make(env_id)
    env.reset(seed=0)
    action = env.action_space.n if bad_action == "too_large" else bad_action
    with pytest.raises(ValueError, match="invalid action"):
        env.unwrapped.step(action)


def test_action_names_match_action_space(env_id: str) -> None:
    env = gym.make(env_id)
    assert env.action_space.n == len(env.unwrapped.language.action_names)


def test_expert_finishes_an_episode(env_id: str) -> None:
    env = gym.make(env_id)
    _, info = env.reset(seed=0)
    assert info["success"] is False
    max_steps = env.spec.max_episode_steps
    for _ in range(max_steps):
        rationale = env.unwrapped.expert_rationale()
        assert isinstance(rationale, str) and rationale.strip()
        action = env.unwrapped.expert_action()
        assert env.action_space.contains(action)
        _, _, terminated, truncated, info = env.step(action)
        assert isinstance(info["success"], bool)
        if terminated or truncated:
            break
    assert terminated or truncated, f"the expert's episode did not end within {max_steps} steps"


def test_success_flag_in_every_step(env_id: str) -> None:
    env = gym.make(env_id)
    _, info = env.reset(seed=3)
    assert info["success"] is False
    for action in _actions(env, count=20, seed=2):
        _, reward, terminated, truncated, info = env.step(action)
        assert isinstance(info["success"], bool)
        if terminated or truncated:
            _, info = env.reset()
            assert info["success"] is False
