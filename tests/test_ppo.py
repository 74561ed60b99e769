"""PPO: GAE, the update, checkpoints and resume, tracking, experiment scripts, and that it learns."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs
from agents.checkpoint import CheckpointError, find_checkpoint
from agents.policy import PolicyConfig, load_policy
from agents.ppo import PPOConfig, ppo_losses, train
from agents.rollout import EpisodeStats, env_actions
from agents.storage import compute_gae
from agents.tracking import read_metrics

TINY_POLICY = PolicyConfig(model="tiny", prompt_style="action", constrained=True, lora_rank=8, temperature=1.0)


def small_config(tmp_path: Path, **overrides) -> PPOConfig:
    options = dict(
        env_id="vlmrl/Colour-v0",
        num_envs=4,
        num_steps=4,
        total_env_steps=16,
        minibatch_size=8,
        micro_batch_size=4,
        update_epochs=2,
        learning_rate=1e-3,
        run_dir=str(tmp_path / "run"),
        progress=False,
        sample_every=0,
        checkpoint_every=0,
        policy=dataclasses.replace(TINY_POLICY),
    )
    options.update(overrides)
    return PPOConfig(**options)


def parameters_of(directory: Path) -> dict[str, torch.Tensor]:
    policy = load_policy(str(directory))
    return {name: p.detach().clone() for name, p in policy.named_parameters()}


# --- GAE -----------------------------------------------------------------------------------------------------


def test_gae_matches_hand_computation_with_termination_and_truncation():
    # One env, four steps: an episode terminates at t=1, the next is truncated at t=3.
    gamma, lam = 0.9, 0.8
    rewards = np.array([[1.0], [2.0], [0.0], [1.0]])
    values = np.array([[0.5], [1.0], [0.2], [0.4]])
    # next_values: t=0 -> V(s1); t=1 terminated (ignored); t=2 -> V(s3); t=3 truncated -> V(final obs)=3.0
    next_values = np.array([[1.0], [123.0], [0.4], [3.0]])
    terminated = np.array([[False], [True], [False], [False]])
    truncated = np.array([[False], [False], [False], [True]])
    advantages, returns = compute_gae(rewards, values, next_values, terminated, truncated, gamma, lam)

    a3 = 1.0 + gamma * 3.0 - 0.4  # bootstrapped from the final observation
    a2 = (0.0 + gamma * 0.4 - 0.2) + gamma * lam * a3
    a1 = 2.0 - 1.0  # terminated: no bootstrap, nothing flows back from the next episode
    a0 = (1.0 + gamma * 1.0 - 0.5) + gamma * lam * a1
    np.testing.assert_allclose(advantages.ravel(), [a0, a1, a2, a3])
    np.testing.assert_allclose(returns, advantages + values)


def test_gae_vector_envs_are_independent():
    rewards = np.array([[1.0, 0.0], [0.0, 1.0]])
    zeros = np.zeros((2, 2))
    flags = np.zeros((2, 2), dtype=bool)
    advantages, _ = compute_gae(rewards, zeros, zeros, flags, flags, 1.0, 1.0)
    np.testing.assert_allclose(advantages, [[1.0, 1.0], [0.0, 1.0]])


# --- invalid answers and episode statistics ------------------------------------------------------------------


def test_invalid_answers_take_the_configured_action_and_are_flagged():
    class Answer:
        def __init__(self, action):
            self.action = action

    answers = [Answer(2), Answer(None), Answer(0)]
    actions, invalid = env_actions(answers, "default", 1, 3, np.random.default_rng(0))
    assert actions.tolist() == [2, 1, 0] and invalid.tolist() == [False, True, False]
    rng = np.random.default_rng(0)
    drawn = {int(env_actions([Answer(None)], "random", 0, 3, rng)[0][0]) for _ in range(50)}
    assert drawn == {0, 1, 2}


def test_episode_stats_use_the_final_info_of_same_step_autoreset():
    stats = EpisodeStats(2)
    stats.update(np.array([1.0, 0.0]), np.array([False, False]), np.array([False, False]), {})
    info = {"final_info": {"success": np.array([False, True])}}
    stats.update(np.array([0.5, 2.0]), np.array([False, True]), np.array([False, False]), info)
    assert stats.pop() == [{"env": 1, "return": 2.0, "length": 2, "success": True}]
    assert stats.returns.tolist() == [1.5, 0.0]


# --- configuration errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(minibatch_size=6), "does not split into minibatches"),
        (dict(micro_batch_size=3), "not a multiple of micro_batch_size"),
        (dict(env_id="vlmrl/Nope-v0"), "Unknown env_id"),
        (dict(num_envs=0), "num_envs must be >= 1"),
        (dict(total_env_steps=4), "less than one batch"),
        (dict(invalid_default_action=7), "not an action of"),
        (dict(policy=PolicyConfig(model="tiny-nonexistent")), "Unknown preset"),
        (dict(kl_coef=0.1, policy=PolicyConfig(model="tiny", lora_rank=0)), "needs LoRA"),
        (dict(reward=["bonus:1"]), "--reward: Unknown reward 'bonus'"),
        (dict(reward=["env:lots"]), "weight 'lots' is not a number"),
        (dict(reward=["env:1", "env:2"]), "env is given twice"),
        (dict(reward=[]), "No reward modules"),
    ],
)
def test_bad_configs_fail_before_any_model_loads(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        small_config(tmp_path, **overrides)


# --- the update ------------------------------------------------------------------------------------------------


def test_ratio_is_one_at_the_start_of_the_first_epoch():
    policy = load_policy("tiny", prompt_style="cot", constrained=True, max_new_tokens=48, temperature=0.7)
    env = gym.make("vlmrl/Blackjack-v0")
    observations = [env.reset(seed=seed)[0] for seed in range(4)]
    completions = policy.act(observations, envs.get_language("vlmrl/Blackjack-v0"))
    config = PPOConfig(
        env_id="vlmrl/Blackjack-v0", num_envs=4, num_steps=1, total_env_steps=4, minibatch_size=4, micro_batch_size=4
    )
    old = torch.tensor([c.logprob for c in completions])
    values = torch.tensor([c.value for c in completions])
    _, parts = ppo_losses(policy, completions, old, values, torch.ones(4), values, None, config)
    assert float(parts["approx_kl"]) < 1e-6
    assert float(parts["clipfrac"]) == 0.0


def test_one_update_changes_every_trainable_parameter_and_no_frozen_one(tmp_path):
    config = small_config(tmp_path, kl_coef=0.05, ent_coef=0.01)
    run_dir = train(config)
    trained = parameters_of(run_dir / "checkpoints" / "update-000001" / "policy")
    fresh = load_policy("tiny", **{k: v for k, v in dataclasses.asdict(TINY_POLICY).items() if k != "model"})
    trainable = {name for name, p in fresh.named_parameters() if p.requires_grad}
    assert any("lora_" in name for name in trainable) and any("value_head" in name for name in trainable)
    for name, before in fresh.named_parameters():
        changed = not torch.equal(before.detach(), trained[name])
        assert changed == (name in trainable), f"{name}: changed={changed}, trainable={name in trainable}"
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert metrics[-1]["losses/kl_ref"] >= 0 and metrics[-1]["losses/skipped_steps"] == 0


def test_non_finite_losses_are_skipped_then_abort(tmp_path, monkeypatch):
    import agents.ppo as ppo

    def nan_loss(*args, **kwargs):
        loss, parts = real(*args, **kwargs)
        return loss * float("nan"), parts

    real = ppo.ppo_losses
    monkeypatch.setattr(ppo, "ppo_losses", nan_loss)
    with pytest.raises(RuntimeError, match="in a row had a non-finite loss"):
        train(small_config(tmp_path, max_nonfinite_steps=3))


# --- checkpoints ---------------------------------------------------------------------------------------------


def test_resume_continues_exactly(tmp_path):
    # GridWorld episodes span several updates, so the environments' state must travel too.
    options = dict(
        env_id="vlmrl/GridWorld-v0",
        num_envs=2,
        num_steps=4,
        total_env_steps=24,
        minibatch_size=4,
        micro_batch_size=2,
        checkpoint_every=2,
    )
    straight = train(small_config(tmp_path / "a", **options))
    resumed_dir = tmp_path / "b"
    shutil.copytree(straight, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "update-000003")
    train(small_config(tmp_path / "ignored", resume=str(resumed_dir)))
    expected = parameters_of(straight / "checkpoints" / "update-000003" / "policy")
    actual = parameters_of(resumed_dir / "checkpoints" / "update-000003" / "policy")
    for name, value in expected.items():
        assert torch.equal(value, actual[name]), name
    straight_rows = read_metrics(straight / "metrics.jsonl")
    resumed_rows = read_metrics(resumed_dir / "metrics.jsonl")
    assert straight_rows[-1]["losses/policy_loss"] == resumed_rows[-1]["losses/policy_loss"]


def test_damaged_checkpoints_fall_back_or_fail_clearly(tmp_path):
    run_dir = train(small_config(tmp_path, total_env_steps=32, checkpoint_every=1))
    newest, previous = run_dir / "checkpoints" / "update-000002", run_dir / "checkpoints" / "update-000001"
    (newest / "trainer.pt").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="update-000002/trainer.pt does not match its checksum"):
        assert find_checkpoint(run_dir) == previous
    (previous / "manifest.json").unlink()  # as if the save had been interrupted
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        find_checkpoint(run_dir)


def test_evaluating_a_checkpoint_is_one_call(tmp_path):
    from agents.evaluation import evaluate_checkpoint

    run_dir = train(small_config(tmp_path))
    result = evaluate_checkpoint(str(run_dir), episodes=6)
    assert result["episodes"] == 6 and 0.0 <= result["success_rate"] <= 1.0
    assert result["checkpoint"].endswith("update-000001")


# --- tracking ------------------------------------------------------------------------------------------------


def test_track_writes_an_offline_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = train(small_config(tmp_path, track=True, sample_every=1, video_every=1))
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    assert (run_dir / "learning_curve.png").stat().st_size > 0
    assert list((run_dir / "videos").glob("*.gif"))
    rows = read_metrics(run_dir / "metrics.jsonl")
    for name in ("charts/success_rate", "charts/invalid_action_rate", "losses/approx_kl", "charts/tokens_per_s"):
        assert name in rows[0]
    assert json.loads((run_dir / "config.json").read_text())["env_id"] == "vlmrl/Colour-v0"


# --- environments that fail ----------------------------------------------------------------------------------


class _Crashes(envs.LanguageEnv):
    language = envs.LanguageSpec("Crash.", ("a", "b"))

    def __init__(self, render_mode="rgb_array"):
        super().__init__(render_mode)
        self.observation_space = envs.base.observation_space(8, 8)
        self.action_space = gym.spaces.Discrete(2)

    def _image(self):
        return np.zeros((8, 8, 3), dtype=np.uint8)

    def _text(self):
        return ""

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self._observation(), {}

    def step(self, action):
        raise ZeroDivisionError("the simulator blew up")


def test_a_crashing_environment_names_its_index(tmp_path):
    gym.register("vlmrl-test/Crashes-v0", entry_point=_Crashes)
    envs.register_language("vlmrl-test/Crashes-v0", _Crashes.language, overwrite=True)
    with pytest.raises(RuntimeError, match=r"env 0 \(vlmrl-test/Crashes-v0\) failed in step"):
        train(small_config(tmp_path, env_id="vlmrl-test/Crashes-v0"))


# --- experiment scripts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gridworld", "blackjack", "numberline", "ezpoints", "points24", "reach", "push"])
def test_each_experiment_script_runs_a_tiny_budget(tmp_path, name):
    from experiments.cli import main

    main(
        [
            "train",
            name,
            "--total-env-steps",
            "4",
            "--num-envs",
            "2",
            "--num-steps",
            "2",
            "--minibatch-size",
            "4",
            "--micro-batch-size",
            "2",
            "--update-epochs",
            "1",
            "--run-dir",
            str(tmp_path / name),
            "--no-progress",
            "--max-new-tokens",
            "16",
        ]
    )
    rows = read_metrics(tmp_path / name / "metrics.jsonl")
    assert rows and rows[-1]["global_step"] == 4
    assert (tmp_path / name / "checkpoints" / "update-000001" / "manifest.json").exists()


# --- it learns ---------------------------------------------------------------------------------------------------


def test_ppo_learns_to_name_the_colour(tmp_path):
    """Chance is 1/3; reading the image gives 1. A few hundred steps of PPO must get well above chance."""
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    config = small_config(
        tmp_path,
        num_envs=16,
        num_steps=4,
        total_env_steps=448,
        minibatch_size=32,
        micro_batch_size=16,
        update_epochs=4,
        learning_rate=3e-4,
        policy=PolicyConfig(model="tiny", prompt_style="action", constrained=True, lora_rank=0, temperature=1.0),
    )
    run_dir = train(config)
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "charts/success_rate" in r]
    first, last = rows[0]["charts/success_rate"], np.mean([r["charts/success_rate"] for r in rows[-3:]])
    assert first < 0.6, f"the untrained policy should be near chance, got {first}"
    assert last >= 0.75, f"PPO should learn the colour task; success over the last 3 updates: {last}"


def test_rollout_bootstraps_a_truncation_from_its_final_observation():
    from types import SimpleNamespace

    from agents.storage import Rollout

    def step(value):
        return [SimpleNamespace(value=value, logprob=0.0)]

    rollout = Rollout(num_steps=3, num_envs=1)
    no = np.array([False])
    rollout.add(step(0.1), np.array([0.0]), no, np.array([True]), {0: 5.0})  # truncated; final obs worth 5
    rollout.add(step(0.2), np.array([0.0]), no, no, {})
    rollout.add(step(0.3), np.array([1.0]), np.array([True]), no, {})
    rollout.finish(np.array([9.0]), gamma=0.5, gae_lambda=1.0)
    assert rollout.next_values[:, 0].tolist() == [5.0, 0.3, 9.0]
    np.testing.assert_allclose(
        rollout.advantages[:, 0], [0.5 * 5.0 - 0.1, (0.5 * 0.3 - 0.2) + 0.5 * (1.0 - 0.3), 1.0 - 0.3], atol=1e-12
    )


def test_reward_modules_are_summed_with_their_weights_and_logged_per_term(tmp_path):
    # GridWorld without its built-in distance reward, shaped by the env's potential at PPO's gamma instead.
    config = small_config(
        tmp_path, env_id="vlmrl/GridWorld-v0", env_kwargs={"size": 3, "n_walls": 0, "distance_reward": 0.0},
        reward=["env:1", "invalid:-1", "shaping:0.5"], total_env_steps=32,
    )  # fmt: skip
    rows = read_metrics(train(config) / "metrics.jsonl")
    trained = [row for row in rows if "rewards/shaping" in row]
    assert trained and all({"rewards/env", "rewards/invalid", "rewards/total"} <= set(row) for row in trained)
    for row in trained:  # the total is the weighted sum of the terms' means
        expected = row["rewards/env"] - row["rewards/invalid"] + 0.5 * row["rewards/shaping"]
        assert row["rewards/total"] == pytest.approx(expected)
    assert any(row["rewards/shaping"] != 0 for row in trained)
