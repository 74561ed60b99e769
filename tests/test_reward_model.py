"""The learned Bradley-Terry reward model on the tiny preset: loss, training, save/load, as a reward module."""

from __future__ import annotations

import math
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch

import envs
from envs.language import parse_action
from rewards import RewardContext, RewardSet
from rewards.reward_model import (
    RewardModel,
    RewardModelConfig,
    RewardTrainConfig,
    bradley_terry_loss,
    check_pairs,
    evaluate_pairs,
    expert_pairs,
    pair_accuracy,
    split_pairs,
    train_reward_model,
    unseen_rows,
)

GRID = "vlmrl/GridWorld-v0"
GRID_OPTIONS = {"size": 4, "n_walls": 1}


@pytest.fixture(scope="module")
def pairs():
    return expert_pairs(GRID, 12, seed=0, env_kwargs=GRID_OPTIONS)


def tiny_config() -> RewardModelConfig:
    return RewardModelConfig(model="tiny", lora_rank=4, device="cpu", prompt_style="action")


def test_bradley_terry_loss_and_accuracy_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    expected = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(1.0))) / 2
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected)
    # centring: 0.1 * mean((2 + 0)^2, (0 + 1)^2) = 0.25
    assert bradley_terry_loss(chosen, rejected, 0.1).item() == pytest.approx(expected + 0.25)
    assert pair_accuracy(chosen, rejected) == 0.5


def test_expert_pairs_prefer_the_expert_action(pairs):
    spec = envs.get_language(GRID)
    assert len(pairs) == 12 and set(pairs.column_names) >= {"images", "prompt", "chosen", "rejected"}
    for row in pairs.select(range(4)):
        chosen, rejected = parse_action(row["chosen"], spec, "action"), parse_action(row["rejected"], spec, "action")
        assert chosen.valid and rejected.valid and chosen.action != rejected.action
        assert spec.action_names[chosen.action] == row["chosen_action"]
        assert len(row["images"]) == 1
    # The rejected move always lengthens the path: replay each state and compare shortest-path distances.
    from envs.gridworld import MOVES, GridWorldEnv

    env = GridWorldEnv(**GRID_OPTIONS)
    for row in pairs:
        env.reset(seed=row["seed"])
        for _ in range(row["step"]):
            env.step(env.expert_action())
        here = -env.potential()
        for name, expected in ((row["chosen_action"], here - 1), (row["rejected_action"], None)):
            d_row, d_col = MOVES[spec.action_names.index(name)]
            cell = (env.agent[0] + d_row, env.agent[1] + d_col)
            inside = 0 <= cell[0] < env.size and 0 <= cell[1] < env.size and not env.walls[cell]
            after = env._distances[cell] if inside else here
            assert after == expected if expected is not None else after >= here


def test_held_out_pairs_are_whole_episodes_and_unseen_images_are_counted(pairs):
    training, held_out = split_pairs(pairs, 0.25, seed=0)
    assert len(training) + len(held_out) == len(pairs) and len(held_out) >= 3
    assert not set(training["seed"]) & set(held_out["seed"])  # no episode on both sides
    # Held-out rows whose image a training row has are not "unseen"; the training rows themselves are all seen.
    assert unseen_rows(training, training) == []
    assert unseen_rows(held_out.select([]), held_out) == list(range(len(held_out)))
    # A set without episodes is split by rows.
    rows = datasets.Dataset.from_dict({key: pairs[key] for key in ("images", "prompt", "chosen", "rejected")})
    training, held_out = split_pairs(rows, 0.25, seed=0)
    assert (len(training), len(held_out)) == (9, 3)


def test_pairs_command_takes_env_options(tmp_path):
    from rewards.reward_model import PairsConfig, main

    main(["pairs", "--env-id", GRID, "--states", "3", "--env-kwargs", '{"size": 3, "n_walls": 0}',
          "--out", str(tmp_path / "p")])  # fmt: skip
    made = datasets.load_from_disk(str(tmp_path / "p"))
    assert len(made) == 3 and made[0]["images"][0].size == (3 * 16, 3 * 16)  # 3 cells of 16 px
    with pytest.raises(ValueError, match=r"not JSON"):
        PairsConfig(out=str(tmp_path / "q"), env_kwargs="size=3")
    # a second run into the same directory would re-point people's labels there at other pairs
    with pytest.raises(ValueError, match=r"already holds a pair set.*--overwrite"):
        main(["pairs", "--env-id", GRID, "--states", "2", "--out", str(tmp_path / "p")])
    main(["pairs", "--env-id", GRID, "--states", "2", "--env-kwargs", '{"size": 3, "n_walls": 0}',
          "--out", str(tmp_path / "p"), "--overwrite"])  # fmt: skip
    assert len(datasets.load_from_disk(str(tmp_path / "p"))) == 2


def test_an_empty_or_malformed_pair_set_is_one_clear_message(tmp_path):
    empty = datasets.Dataset.from_dict({"images": [], "prompt": [], "chosen": [], "rejected": []})
    with pytest.raises(ValueError, match=r"has no pairs"):
        train_reward_model(RewardTrainConfig(pairs="-", out=str(tmp_path / "rm"), model=tiny_config()), pairs=empty)
    with pytest.raises(ValueError, match=r"lacks column\(s\) rejected"):
        check_pairs(datasets.Dataset.from_dict({"images": [], "prompt": [], "chosen": []}))
    with pytest.raises(ValueError, match=r"No preference pairs at"):
        train_reward_model(RewardTrainConfig(pairs=str(tmp_path / "nothing.txt"), out=str(tmp_path / "rm")))


def test_a_few_steps_lower_the_loss_and_save_load_gives_identical_scores(pairs, tmp_path):
    config = RewardTrainConfig(
        pairs="-", out=str(tmp_path / "rm"), model=tiny_config(), max_steps=6, batch_size=12,
        learning_rate=3e-3, eval_fraction=0.0,
    )  # fmt: skip
    before = evaluate_pairs(RewardModel.create(config.model), pairs)
    metrics = train_reward_model(config, pairs=pairs, log=lambda _: None)
    assert metrics["steps"] == 6
    loaded = RewardModel.load(tmp_path / "rm", device="cpu")
    after = evaluate_pairs(loaded, pairs)
    assert after["loss"] < before["loss"], (before, after)
    # The saved model is the trained one: the last training batch (all pairs) scored again after the last
    # step can only have gone down or stayed near; and two loads score identically.
    again = RewardModel.load(tmp_path / "rm", device="cpu")
    batch = pairs[:4]
    with torch.no_grad():
        first = loaded.score(batch["images"], batch["prompt"], batch["chosen"])
        second = again.score(batch["images"], batch["prompt"], batch["chosen"])
    assert torch.equal(first, second)


def test_save_load_round_trip_is_exact(pairs, tmp_path):
    model = RewardModel.create(tiny_config())
    with torch.no_grad():  # move the adapter and head away from their initial values
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    batch = pairs[:3]
    with torch.no_grad():
        scores = model.score(batch["images"], batch["prompt"], batch["rejected"])
    model.save(tmp_path / "rm")
    loaded = RewardModel.load(tmp_path / "rm", device="cpu")
    with torch.no_grad():
        assert torch.equal(loaded.score(batch["images"], batch["prompt"], batch["rejected"]), scores)
    with pytest.raises(ValueError, match=r"is not a reward model directory"):
        RewardModel.load(tmp_path)


def test_reward_model_as_a_reward_module(pairs, tmp_path):
    model = RewardModel.create(tiny_config())
    model.save(tmp_path / "rm")
    rewards = RewardSet.from_specs([f"rm:2.0:path={tmp_path / 'rm'},batch_size=2"], RewardContext(env_id=GRID))
    row = pairs[0]
    observations = {"image": np.stack([np.asarray(row["images"][0])] * 3), "text": ("Step 0 of 16.",) * 3}
    completions = [SimpleNamespace(text=text, action=None) for text in ("up", "down", "left")]
    result = rewards(observations, completions, [{}] * 3, env_rewards=np.zeros(3), terminated=np.zeros(3, bool))
    with torch.no_grad():
        direct = model.score(list(observations["image"]), [row["prompt"]] * 3, ["up", "down", "left"])
    np.testing.assert_allclose(result.terms["rm"], direct.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.total, 2 * direct.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"rm: say which reward model"):
        RewardSet.from_specs(["rm:1"], RewardContext(env_id=GRID))


def test_reward_model_baseline_subtracts_the_states_best_or_mean_legal_action(pairs, tmp_path):
    model = RewardModel.create(tiny_config())
    model.save(tmp_path / "rm")
    row = pairs[0]
    observations = {"image": np.stack([np.asarray(row["images"][0])] * 3), "text": ("Step 0 of 16.",) * 3}
    names = envs.get_language(GRID).action_names
    completions = [SimpleNamespace(text=text, action=None, action_names=names) for text in ("up", "left", "jump")]
    with torch.no_grad():
        every = model.score([row["images"]] * 5, [row["prompt"]] * 5, [*names, "jump"]).flatten().numpy()
    by_name = dict(zip([*names, "jump"], every))
    for baseline, level in (("max", every[:4].max()), ("mean", every[:4].mean())):
        rewards = RewardSet.from_specs(
            [f"rm:1.0:path={tmp_path / 'rm'},baseline={baseline}"], RewardContext(env_id=GRID)
        )
        result = rewards(observations, completions, [{}] * 3, env_rewards=np.zeros(3), terminated=np.zeros(3, bool))
        expected = [by_name["up"] - level, by_name["left"] - level, by_name["jump"] - level]
        np.testing.assert_allclose(result.terms["rm"], expected, rtol=1e-4, atol=1e-5)
        if baseline == "max":  # no legal action scores above the best one
            assert max(result.terms["rm"][:2]) <= 1e-6
    RewardModel(model.policy, RewardModelConfig(**{**tiny_config().__dict__, "prompt_style": "cot"})).save(
        tmp_path / "cot"
    )
    with pytest.raises(ValueError, match=r"action-style answers"):
        RewardSet.from_specs([f"rm:1.0:path={tmp_path / 'cot'},baseline=max"], RewardContext(env_id=GRID))


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2vl", "tiny-smolvlm"])
def test_scores_do_not_depend_on_padding(preset):
    """The head reads the last answer token whatever the batch pads: a batch scores as its rows one by one."""
    cot_pairs = expert_pairs(GRID, 3, env_kwargs=GRID_OPTIONS, prompt_style="cot")
    model = RewardModel.create(RewardModelConfig(model=preset, lora_rank=4, device="cpu"))
    batch = cot_pairs[:3]
    answers = ["up", batch["chosen"][1], "a much longer answer that pads the others " * 2]
    with torch.no_grad():
        together = model.score(batch["images"], batch["prompt"], answers)
        alone = torch.cat([model.score([i], [p], [a]) for i, p, a in zip(batch["images"], batch["prompt"], answers)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
    assert len(set(together.tolist())) == 3


def test_conversational_pairs_score_as_plain_text(pairs):
    """TRL's conversational format (message lists) and plain strings are the same pair to the model."""
    model = RewardModel.create(tiny_config())
    row = pairs[0]
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["prompt"]}]}]
    answer = [{"role": "assistant", "content": [{"type": "text", "text": row["chosen"]}]}]
    with torch.no_grad():
        plain = model.score([row["images"]], [row["prompt"]], [row["chosen"]])
        conversational = model.score([row["images"]], [prompt], [answer])
    torch.testing.assert_close(plain, conversational)


def test_a_reward_model_starts_from_a_saved_policy_with_a_new_head(tmp_path):
    # InstructGPT starts its reward model from the SFT model: a policy directory is a backbone, and its value
    # head (here of other sizes, as PPO's default MLP is) gives way to the reward model's own head.
    from agents.policy import load_policy

    policy = load_policy("tiny", lora_rank=0, value_hidden_sizes=(16,), device="cpu", init_seed=3)
    with torch.no_grad():  # a backbone unlike the preset's fresh one
        policy.model.get_input_embeddings().weight.add_(0.5)
    policy.save(tmp_path / "sft")
    with pytest.warns(UserWarning, match=r"value_hidden_sizes=\(\) differs .* starts fresh"):
        model = RewardModel.create(
            RewardModelConfig(model=str(tmp_path / "sft"), lora_rank=0, device="cpu", prompt_style="action")
        )
    assert torch.equal(model.policy.model.get_input_embeddings().weight, policy.model.get_input_embeddings().weight)
    fresh = RewardModel.create(tiny_config())
    assert [tuple(p.shape) for p in model.policy.value_head.parameters()] == [
        tuple(p.shape) for p in fresh.policy.value_head.parameters()
    ]
