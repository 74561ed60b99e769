"""SFT: the loss is the answer tokens' NLL at temperature 1, it falls, it learns, it resumes exactly, its
checkpoint starts PPO, and bad data is refused before training."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs
from agents.errors import ConfigError
from agents.policy import PolicyConfig, load_policy
from agents.sft import SFTConfig, sft_loss, train
from agents.tracking import read_metrics
from agents.trajectories import collect_expert

COT = PolicyConfig(model="tiny", prompt_style="cot", constrained=True, lora_rank=0, temperature=1.0, max_new_tokens=64)


@pytest.fixture(scope="module")
def colour_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stores") / "colour"
    collect_expert("vlmrl/Colour-v0", path, episodes=48, seed=0, prompt_style="cot")
    return path


@pytest.fixture(scope="module")
def gridworld_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stores") / "gridworld"
    collect_expert("vlmrl/GridWorld-v0", path, episodes=6, seed=0, prompt_style="cot")
    return path


def sft_config(tmp_path: Path, data: Path, **overrides) -> SFTConfig:
    options = dict(
        env_id="vlmrl/Colour-v0",
        data=str(data),
        epochs=1,
        batch_size=8,
        micro_batch_size=4,
        learning_rate=1e-3,
        num_envs=4,
        run_dir=str(tmp_path / "run"),
        progress=False,
        checkpoint_every=2,
        policy=dataclasses.replace(COT),
    )
    options.update(overrides)
    return SFTConfig(**options)


def test_loss_is_the_answer_tokens_nll_at_temperature_one():
    """Against a forward pass by hand: prompt + answer through the model, log-softmax at temperature 1,
    the answer's tokens only (none of the prompt's), averaged per answer."""
    policy = load_policy("tiny", prompt_style="cot", constrained=True, temperature=0.3)  # sampling temp. is ignored
    env = gym.make("vlmrl/GridWorld-v0")
    spec = envs.get_language("vlmrl/GridWorld-v0")
    observation, _ = env.reset(seed=3)
    answer = envs.format_answer(spec.action_names[env.unwrapped.expert_action()], env.unwrapped.expert_rationale())
    [completion] = policy.completions_for([observation], spec, [answer], score=False)
    loss, _ = sft_loss(policy, [completion])

    inputs = policy.encode([completion.prompt], [completion.image])
    prompt_length = inputs["input_ids"].shape[1]
    response = completion.response_ids.unsqueeze(0)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], response], 1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    with torch.no_grad():
        logits = policy.model(**inputs).logits[0, prompt_length - 1 : -1].float()
    logits[:, policy.suppressed_ids] = float("-inf")
    masks = policy._constraint_masks([completion], (1, *logits.shape))[0]
    logprobs = torch.log_softmax(logits.masked_fill(~masks, float("-inf")), -1)
    expected = -logprobs.gather(-1, response[0].unsqueeze(-1)).mean()
    torch.testing.assert_close(loss.detach(), expected, atol=1e-4, rtol=1e-4)


def test_sft_lowers_the_loss_and_learns_the_colour(tmp_path, colour_store):
    torch.manual_seed(0)
    run_dir = train(
        sft_config(
            tmp_path, colour_store, epochs=6, batch_size=16, micro_batch_size=16, eval_episodes=24, checkpoint_every=0
        )
    )
    rows = read_metrics(run_dir / "metrics.jsonl")
    losses = [r["losses/nll"] for r in rows if "losses/nll" in r]
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses
    final = [r for r in rows if "eval/success_rate" in r][-1]
    assert final["eval/success_rate"] >= 0.9, final
    assert final["eval/thought_accuracy"] >= 0.9, final
    assert final["eval/invalid_action_rate"] == 0.0

    # A trained answer's likelihood under SFT's loss is the one act assigns it at temperature 1.
    policy = load_policy(str(run_dir), temperature=1.0)
    spec = envs.get_language("vlmrl/Colour-v0")
    env = gym.make("vlmrl/Colour-v0")
    observations = [env.reset(seed=100 + seed)[0] for seed in range(6)]
    acted = policy.act(observations, spec, greedy=True)
    rebuilt = policy.completions_for(observations, spec, [c.text for c in acted], score=False)
    same = [(c, d) for c, d in zip(acted, rebuilt) if torch.equal(c.response_ids, d.response_ids)]
    assert len(same) >= 3  # trained answers are spelled as the tokenizer spells their text
    for completion, demo in same:
        loss, _ = sft_loss(policy, [demo])
        torch.testing.assert_close(loss.detach(), -completion.token_logprobs.mean(), atol=1e-4, rtol=1e-4)


def test_resume_continues_exactly(tmp_path, gridworld_store):
    options = dict(
        env_id="vlmrl/GridWorld-v0", env_kwargs={}, epochs=2, batch_size=4, micro_batch_size=2, checkpoint_every=3
    )
    straight = train(sft_config(tmp_path / "a", gridworld_store, **options))
    checkpoints = sorted((straight / "checkpoints").glob("update-*"))
    resumed = tmp_path / "b"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / checkpoints[-1].name)
    train(sft_config(tmp_path / "ignored", gridworld_store, resume=str(resumed)))
    expected = load_policy(str(checkpoints[-1] / "policy")).state_dict()
    actual = load_policy(str(resumed / "checkpoints" / checkpoints[-1].name / "policy")).state_dict()
    for name, value in expected.items():
        assert torch.equal(value, actual[name]), name
    assert read_metrics(straight / "metrics.jsonl") != []
    assert [r["losses/nll"] for r in read_metrics(straight / "metrics.jsonl")] == [
        r["losses/nll"] for r in read_metrics(resumed / "metrics.jsonl")
    ]


def test_an_sft_run_starts_ppo(tmp_path, gridworld_store):
    from agents.ppo import PPOConfig
    from agents.ppo import train as ppo_train

    sft_dir = train(sft_config(tmp_path / "sft", gridworld_store, env_id="vlmrl/GridWorld-v0", env_kwargs={}))
    sft_policy = load_policy(str(sft_dir))  # a run directory names its newest checkpoint's policy
    ppo_dir = ppo_train(
        PPOConfig(
            env_id="vlmrl/GridWorld-v0",
            num_envs=2,
            num_steps=2,
            total_env_steps=4,
            minibatch_size=4,
            micro_batch_size=2,
            update_epochs=1,
            learning_rate=1e-6,
            run_dir=str(tmp_path / "ppo"),
            progress=False,
            policy=dataclasses.replace(COT, model=str(sft_dir)),
        )
    )
    rows = read_metrics(ppo_dir / "metrics.jsonl")
    assert "charts/thought_accuracy" in rows[-1]
    ppo_policy = load_policy(str(ppo_dir))
    name = "model.model.language_model.layers.0.mlp.up_proj.weight"
    before, after = dict(sft_policy.named_parameters())[name], dict(ppo_policy.named_parameters())[name]
    assert (before - after).abs().max() < 1e-3  # PPO started from the SFT weights, not from a fresh preset
    fresh = dict(load_policy("tiny", lora_rank=0).named_parameters())[name]
    assert (fresh - after).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(data=""), "needs demonstrations"),
        (dict(data="/nonexistent/store"), "no such directory"),
        (dict(env_id="vlmrl/Blackjack-v0"), "Blackjack"),
        (dict(policy=dataclasses.replace(COT, prompt_style="action")), "holds cot answers"),
        (dict(env_kwargs={"text_hint": True}), "collected with env options"),
        (dict(batch_size=6, micro_batch_size=4), "not a multiple of micro_batch_size"),
    ],
)
def test_bad_data_is_refused_before_training(tmp_path, colour_store, overrides, message):
    overrides = dict(overrides)
    with pytest.raises(ConfigError, match=message):
        train(sft_config(tmp_path, overrides.pop("data", colour_store), **overrides))


def test_a_corrupt_shard_is_named_and_skipped_only_when_asked(tmp_path):
    store = tmp_path / "store"
    collect_expert("vlmrl/GridWorld-v0", store, episodes=2, seed=0, prompt_style="cot", shard_size=1)
    shard = sorted((store / "shards").glob("*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[:50])
    with pytest.raises(ConfigError, match=f"{shard.name}.*skip.bad.shards"):
        train(sft_config(tmp_path / "r1", store, env_id="vlmrl/GridWorld-v0", env_kwargs={}))
    with pytest.warns(UserWarning, match=shard.name):
        train(sft_config(tmp_path / "r2", store, env_id="vlmrl/GridWorld-v0", env_kwargs={}, skip_bad_shards=True))


def test_sft_command_line(tmp_path, colour_store, cli_fails):
    from experiments.cli import main

    cli_fails(["train", "gridworld", "--algo", "sft", "--run-dir", str(tmp_path / "x")], "needs demonstrations")
    cli_fails(["train", "--env-id", "vlmrl/Colour-v0", "--algo", "sft", "--data", str(colour_store), "--prompt-style",
               "action", "--run-dir", str(tmp_path / "y")], "holds cot answers")  # fmt: skip
    assert not (tmp_path / "y").exists()  # the failed start left nothing that would block the directory
    main(["train", "--env-id", "vlmrl/Colour-v0", "--algo", "sft", "--data", str(colour_store), "--epochs", "1",
          "--eval-episodes", "4", "--run-dir", str(tmp_path / "z"), "--no-progress"])  # fmt: skip
    assert any("eval/success_rate" in r for r in read_metrics(tmp_path / "z" / "metrics.jsonl"))
