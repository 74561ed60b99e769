"""GRPO/GiGPO: group rounds, the update, resume, bad configs, and that it learns the colour task."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs
from agents.errors import ConfigError
from agents.grpo import GRPOConfig, train
from agents.policy import PolicyConfig, load_policy
from agents.tracking import read_metrics

TINY = PolicyConfig(model="tiny", prompt_style="action", constrained=True, lora_rank=0, temperature=1.0)


def grpo_config(tmp_path: Path, **overrides) -> GRPOConfig:
    options = dict(
        env_id="vlmrl/GridWorld-v0",
        env_kwargs={"size": 3},
        num_envs=4,
        group_size=2,
        total_env_steps=24,
        max_episode_steps=6,
        minibatch_size=8,
        micro_batch_size=4,
        learning_rate=1e-3,
        run_dir=str(tmp_path / "run"),
        progress=False,
        checkpoint_every=1,
        policy=dataclasses.replace(TINY),
    )
    options.update(overrides)
    return GRPOConfig(**options)


def parameters(path: Path) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in load_policy(str(path)).named_parameters()}


def test_one_update_changes_every_language_parameter_and_never_the_value_head(tmp_path):
    run_dir = train(grpo_config(tmp_path, total_env_steps=8, max_episode_steps=1, step_advantage_weight=0.0,
                                advantage_norm="std", env_id="vlmrl/Colour-v0", env_kwargs={}, num_envs=8))  # fmt: skip
    trained = parameters(run_dir)
    fresh = load_policy("tiny", **{k: v for k, v in dataclasses.asdict(TINY).items() if k != "model"})
    for name, before in fresh.named_parameters():
        changed = not torch.equal(before.detach(), trained[name])
        if "value_head" in name:
            assert not changed, name  # no critic is trained
        elif before.requires_grad:
            assert changed, name


def test_rounds_compare_trajectories_of_one_task_and_log_group_statistics(tmp_path):
    run_dir = train(grpo_config(tmp_path))
    rows = read_metrics(run_dir / "metrics.jsonl")
    for name in ("grpo/group_return_mean", "grpo/zero_variance_groups", "grpo/anchor_group_size", "losses/clipfrac"):
        assert name in rows[0]
    assert rows[0]["grpo/shared_state_fraction"] > 0  # at least the first step: a group starts in one state
    assert rows[-1]["global_step"] >= 24


def test_resume_continues_exactly(tmp_path):
    straight = train(grpo_config(tmp_path / "a", kl_coef=0.05))
    checkpoints = sorted((straight / "checkpoints").glob("update-*"))
    resumed = tmp_path / "b"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / checkpoints[-1].name)
    train(grpo_config(tmp_path / "ignored", resume=str(resumed)))
    expected, actual = (
        parameters(checkpoints[-1] / "policy"),
        parameters(resumed / "checkpoints" / checkpoints[-1].name / "policy"),
    )
    for name, value in expected.items():
        assert torch.equal(value, actual[name]), name
    assert read_metrics(straight / "metrics.jsonl") == read_metrics(resumed / "metrics.jsonl") or [
        {k: v for k, v in r.items() if "per_s" not in k} for r in read_metrics(straight / "metrics.jsonl")
    ] == [{k: v for k, v in r.items() if "per_s" not in k} for r in read_metrics(resumed / "metrics.jsonl")]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(num_envs=5), "does not split into groups of 2"),
        (dict(group_size=1, num_envs=4), "at least 2 envs"),
        (dict(clip_low=1.5), "clip_low"),
        (dict(learning_rate=-1.0), "learning_rate must be > 0"),
    ],
)
def test_bad_configs_fail_before_any_model_loads(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        grpo_config(tmp_path, **overrides)


class _Unseeded(envs.LanguageEnv):
    """Ignores the reset seed: two envs of one group see different tasks."""

    language = envs.LanguageSpec("Pick.", ("a", "b"))
    counter = 0

    def __init__(self, render_mode="rgb_array"):
        super().__init__(render_mode)
        self.observation_space = envs.base.observation_space(8, 8)
        self.action_space = gym.spaces.Discrete(2)

    def _image(self):
        return np.full((8, 8, 3), self.value, dtype=np.uint8)

    def _text(self):
        return ""

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        type(self).counter += 1
        self.value = type(self).counter % 256
        return self._observation(), {}

    def step(self, action):
        return self._observation(), 0.0, True, False, {}


def test_a_reset_that_ignores_the_seed_is_named(tmp_path):
    gym.register("vlmrl-test/Unseeded-v0", entry_point=_Unseeded)
    envs.register_language("vlmrl-test/Unseeded-v0", _Unseeded.language, overwrite=True)
    with pytest.raises(ConfigError, match="vlmrl-test/Unseeded-v0: envs reset with the same seed"):
        train(grpo_config(tmp_path, env_id="vlmrl-test/Unseeded-v0", env_kwargs={}))


@pytest.mark.parametrize("aggregation", ["token-mean", "token-sum"])
def test_token_level_aggregations_train(tmp_path, aggregation):
    run_dir = train(grpo_config(tmp_path, loss_aggregation=aggregation, total_env_steps=8))
    assert np.isfinite(read_metrics(run_dir / "metrics.jsonl")[-1]["losses/policy_loss"])


def test_grpo_learns_to_name_the_colour(tmp_path):
    """Chance is 1/3; groups of 8 on one colour each round must push the policy well above it."""
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    run_dir = train(
        grpo_config(
            tmp_path,
            env_id="vlmrl/Colour-v0",
            env_kwargs={},
            num_envs=16,
            group_size=8,
            total_env_steps=448,
            max_episode_steps=1,
            minibatch_size=16,
            micro_batch_size=16,
            update_epochs=2,
            learning_rate=3e-4,
            checkpoint_every=0,
        )
    )
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "charts/success_rate" in r]
    first, last = rows[0]["charts/success_rate"], np.mean([r["charts/success_rate"] for r in rows[-3:]])
    assert first < 0.6, f"the untrained policy should be near chance, got {first}"
    assert last >= 0.75, f"GRPO should learn the colour task; success over the last 3 updates: {last}"


def test_a_step_limit_too_short_for_any_success_stops_before_the_model_loads(tmp_path, monkeypatch):
    from agents.run import Run

    monkeypatch.setattr(Run, "load_policy", lambda self: pytest.fail("the model loaded"))
    # The fixed 4x4 layout needs 6 moves from corner to corner; a limit of 3 leaves no success possible.
    config = grpo_config(tmp_path, env_kwargs={"size": 4, "random_start": False, "random_goal": False},
                         max_episode_steps=3)  # fmt: skip
    with pytest.raises(ConfigError, match="max_episode_steps=3: vlmrl/GridWorld-v0's scripted expert"):
        train(config)
    assert not (tmp_path / "run").exists()


def test_round_advantages_by_hand_with_a_cut_trajectory():
    from agents.grpo import Round, round_advantages

    # One group of two from the same start s0. Env 0 reaches the goal in two steps (rewards 0, 1);
    # env 1 is cut by the step limit after three steps without reaching it (rewards 0, 0, 0) and passes
    # through s1 as env 0 did.
    rewards = [[0.0, 1.0], [0.0, 0.0, 0.0]]
    states = [["s0", "s1"], ["s0", "s2", "s1"]]
    trajectories = Round([[None] * 2, [None] * 3], rewards, states, np.array([0, 0]), [], 0.0, 0, 0, [])
    config = GRPOConfig.__new__(GRPOConfig)  # only the advantage fields are read
    config.num_envs, config.group_size, config.gamma, config.step_advantage_weight = 2, 2, 0.5, 1.0
    config.advantage_norm = "mean"
    per_env, stats = round_advantages(trajectories, config)
    # Episode level: returns 1 and 0, mean 0.5 -> +0.5 and -0.5 on every step of each trajectory.
    # Step level (gamma 0.5): env 0's returns-to-go [0.5, 1.0], env 1's [0, 0, 0]; s0 {0.5, 0} -> +-0.25,
    # s1 {1.0, 0} -> +-0.5, s2 alone -> 0.
    np.testing.assert_allclose(per_env[0], [0.5 + 0.25, 0.5 + 0.5])
    np.testing.assert_allclose(per_env[1], [-0.5 - 0.25, -0.5 + 0.0, -0.5 - 0.5])
    assert stats["grpo/group_return_mean"] == 0.5 and stats["grpo/zero_variance_groups"] == 0.0
    assert stats["grpo/shared_state_fraction"] == pytest.approx(4 / 5)
    config.advantage_norm, config.step_advantage_weight = "std", 0.0  # GRPO: (R - mean) / std, std = 0.5
    per_env, _ = round_advantages(trajectories, config)
    np.testing.assert_allclose(np.concatenate(per_env), [1.0, 1.0, -1.0, -1.0, -1.0], atol=1e-5)


def test_group_rounds_score_steps_with_the_reward_modules(tmp_path):
    # Masked stepping (envs of a group that finished wait for the round's end) must pass each env's own
    # info on: shaping reads the potentials from it.
    config = grpo_config(
        tmp_path, env_kwargs={"size": 3, "n_walls": 0, "distance_reward": 0.0}, reward=["env:1", "shaping:1"]
    )
    rows = read_metrics(train(config) / "metrics.jsonl")
    trained = [row for row in rows if "rewards/shaping" in row]
    assert trained and any(row["rewards/shaping"] != 0 for row in trained)
    for row in trained:
        assert row["rewards/total"] == pytest.approx(row["rewards/env"] + row["rewards/shaping"])
