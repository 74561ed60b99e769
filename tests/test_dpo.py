"""Preference pairs and DPO: the pair builders on hand-made episodes (ties and NaN give no label), the
loss against hand-computed numbers, the reference at the start, one step widening the margin, exact
resume, TRL's DPOTrainer on exported pairs, and bad input refused before training."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import envs
from agents.dpo import DPOConfig, dpo_losses, load_pair_rows, make_reference, minibatch_step, pair_data, train
from agents.errors import ConfigError
from agents.losses import dpo_loss
from agents.optim import GuardedStep
from agents.pairs import build_pairs, load_pairs, save_pairs
from agents.policy import PolicyConfig, load_policy
from agents.tracking import read_metrics
from agents.trajectories import StepRecord, TrajectoryWriter, collect_expert, load_trajectories

GRID = "vlmrl/GridWorld-v0"
COLOUR = "vlmrl/Colour-v0"
ACTION = PolicyConfig(model="tiny", prompt_style="action", constrained=True, lora_rank=0, temperature=1.0)


def image(state: int) -> np.ndarray:
    """A distinct 8x8 image per state number."""
    return np.full((8, 8, 3), state * 10, dtype=np.uint8)


def episode(states: list[int], answers: list[str], rewards: list[float], success: bool = False) -> list[StepRecord]:
    names = envs.get_language(GRID).action_names
    steps = []
    for index, (state, answer, reward) in enumerate(zip(states, answers, rewards)):
        last = index == len(states) - 1
        steps.append(
            StepRecord(image(state), f"state {state}", answer, names.index(answer), reward, last, False,
                       action_name=answer, success=success and last)
        )  # fmt: skip
    return steps


def write_store(path: Path, episodes: list[tuple[int, list[StepRecord], str]]) -> Path:
    with TrajectoryWriter(path) as writer:
        for seed, steps, source in episodes:
            writer.add_episode(steps, env_id=GRID, seed=seed, prompt_style="action", source=source)
    return path


def answers(pairs) -> list[tuple[str, str]]:
    return [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs]


# ----------------------------------------------------------------------------------------------------------
# Pair builders
# ----------------------------------------------------------------------------------------------------------


def test_trajectory_pairs_take_the_first_divergent_answer_or_every_aligned_one(tmp_path):
    # Seed 0: three episodes pass through states 0 and 1 answering differently, then part; only the first
    # reaches the goal.
    good = episode([0, 1, 2], ["up", "right", "down"], [0.0, 0.0, 1.0], success=True)
    bad = episode([0, 1, 3], ["down", "left", "up"], [0.0, 0.0, 0.0])
    same_return = episode([0, 1, 4], ["left", "left", "left"], [0.0, 0.0, 0.0])
    store = write_store(tmp_path / "s", [(0, good, "p"), (0, bad, "p"), (0, same_return, "p"), (-1, good, "p")])
    pairs, counts = build_pairs([store], mode="trajectory")
    # good beats bad and same_return (first divergence at step 0); bad vs same_return tie: dropped.
    assert sorted(answers(pairs)) == [("up", "down"), ("up", "left")]
    assert counts["ties"] == 1 and counts["unknown_seed"] == 1
    assert set(pairs["label"]) == {"return"} and pairs["margin"] == [1.0, 1.0]
    assert pairs["chosen_step"] == [0, 0] and pairs["mode"] == ["trajectory"] * 2
    aligned, _ = build_pairs([store], mode="trajectory", align="aligned")
    # ... and at step 1, where each pair still stood at state 1 and answered differently.
    assert sorted(answers(aligned)) == [("right", "left"), ("right", "left"), ("up", "down"), ("up", "left")]
    assert sorted(aligned["chosen_step"]) == [0, 0, 1, 1]
    by_success, _ = build_pairs([store], mode="trajectory", label="success")
    assert set(by_success["label"]) == {"success"} and by_success["margin"] == [1.0, 1.0]
    with pytest.raises(ValueError, match="No preference pair"):
        build_pairs([store], mode="trajectory", min_margin=1.5)  # no difference is that large


def test_step_pairs_rank_answers_at_the_same_state_by_mean_return_to_go(tmp_path):
    store = write_store(
        tmp_path / "s",
        [
            (0, episode([0, 1], ["up", "down"], [0.0, 1.0]), "p"),  # up at 0: return-to-go 1
            (1, episode([0, 2], ["up", "down"], [0.0, 0.0]), "p"),  # up at 0 again: 0 (mean 0.5)
            (2, episode([0, 2], ["left", "down"], [0.0, 0.2]), "p"),  # left at 0: 0.2; down at 2: 0 vs 0.2
            (3, episode([0], ["right"], [0.5]), "p"),  # right at 0: 0.5, ties with up's mean
        ],
    )
    pairs, counts = build_pairs([store], mode="step")
    assert sorted(answers(pairs)) == [("right", "left"), ("up", "left")]
    assert counts["ties"] == 1  # up (mean 0.5) vs right (0.5)
    assert sorted(pairs["margin"]) == pytest.approx([0.3, 0.3])
    assert all(p["step_text"] == "state 0" for p in pairs)  # state 2's "down" vs "down" is one answer
    with pytest.raises(ValueError, match="below_margin"):
        build_pairs([store], mode="step", min_margin=0.35)
    # One pair per state, its best answer over its worst: up and right tie at 0.5, the first given (up) wins.
    pairs, counts = build_pairs([store], mode="step", per_state="best-worst")
    assert answers(pairs) == [("up", "left")] and counts["not_extreme"] == 2  # of 3 candidates
    with pytest.raises(ValueError, match="per_state"):
        build_pairs([store], mode="step", per_state="best")


def test_by_action_pairs_score_each_action_over_all_its_wordings(tmp_path):
    """Four wordings of "up" and of "down" at state 0; one lucky "down" wording alone beats every "up"
    wording, but "up" is better on average: per answer the lucky one is chosen, per action it never is."""
    names = envs.get_language(GRID).action_names

    def answered(text: str, action: str, to_go: float) -> list[StepRecord]:
        return [StepRecord(image(0), "state 0", text, names.index(action), to_go, True, False, action_name=action)]

    given = [(f"thought {i}: up", "up", 0.5) for i in range(4)] + [("lucky: down", "down", 1.0)]
    given += [(f"thought {i}: down", "down", 0.0) for i in range(3)] + [("oops", "left", 0.25)]
    store = write_store(tmp_path / "s", [(seed, answered(*g), "p") for seed, g in enumerate(given)])
    by_answer, _ = build_pairs([store], mode="step", per_state="best-worst")
    assert answers(by_answer) == [("lucky: down", "thought 0: down")]
    pairs, counts = build_pairs([store], mode="step", per_state="by-action")
    # up (mean 0.5) over down (mean 0.25, its lucky wording included); left (0.25) is neither best nor worst
    # (ties with down: the first seen is the worst).
    assert answers(pairs) == [("thought 0: up", "lucky: down"), ("thought 1: up", "thought 0: down"),
                              ("thought 2: up", "thought 1: down"), ("thought 3: up", "thought 2: down")]  # fmt: skip
    assert pairs["chosen_score"] == [0.5] * 4 and pairs["rejected_score"] == [0.25] * 4
    assert counts["kept"] == 4 and counts["not_extreme"] == 2
    with pytest.raises(ValueError, match="below_margin"):
        build_pairs([store], mode="step", per_state="by-action", min_margin=0.3)


def test_nan_returns_never_become_labels(tmp_path):
    rows = []
    for number, (answer, value) in enumerate([("up", math.nan), ("down", 1.0), ("left", 0.0)]):
        rows.append(
            dict(episode_id=f"e{number}", env_id=GRID, env_options="{}", seed=0, step=0, step_text="s",
                 prompt_style="action", prompt="p", answer=answer, return_to_go=value, episode_return=value,
                 success=False, source="p", row=number, state="same")
        )  # fmt: skip
    from agents.pairs import PairCounts, step_pairs, trajectory_pairs

    counts = PairCounts()
    pairs = step_pairs(rows, counts=counts)
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [("down", "left")]
    assert counts["nan"] == 1
    counts = PairCounts()
    pairs = trajectory_pairs(rows, counts=counts)
    assert len(pairs) == 1 and counts["nan"] == 2


def test_expert_pairs_prefer_the_expert_where_the_answers_differ(tmp_path):
    expert = write_store(tmp_path / "expert", [(0, episode([0, 1], ["up", "right"], [0.0, 1.0]), "expert")])
    policy = write_store(
        tmp_path / "policy",
        [
            (0, episode([0, 5], ["left", "up"], [0.0, 0.0]), "run:x"),  # differs at state 0, then elsewhere
            (0, episode([0, 1], ["up", "right"], [0.0, 1.0]), "run:x"),  # the expert's answers: no pair
            (0, episode([0, 6], ["left", "up"], [0.0, 0.0]), "run:x"),  # the same pair again: kept once
        ],
    )
    pairs, counts = build_pairs([expert, policy], mode="expert")
    assert answers(pairs) == [("up", "left")]
    assert (
        pairs["label"] == ["expert"] and pairs["chosen_source"] == ["expert"] and pairs["rejected_source"] == ["run:x"]
    )
    assert counts["same_answer"] == 2 and counts["duplicate"] == 1
    with pytest.raises(ValueError, match="No expert steps"):
        build_pairs([policy], mode="expert")


def test_pairs_are_trl_vision_preference_rows_and_round_trip(tmp_path):
    store = write_store(
        tmp_path / "s",
        [(0, episode([0], ["up"], [1.0]), "p"), (0, episode([0], ["down"], [0.0]), "p")],
    )
    pairs, _ = build_pairs([store], mode="trajectory")
    save_pairs(pairs, tmp_path / "pairs", {"mode": "trajectory"})
    loaded = load_pairs(tmp_path / "pairs")
    row = loaded[0]
    assert row["prompt"] == [
        {"role": "user", "content": envs.build_prompt(envs.get_language(GRID), "state 0", "action")}
    ]
    assert row["chosen"] == [{"role": "assistant", "content": "up"}]
    assert row["rejected"] == [{"role": "assistant", "content": "down"}]
    assert np.array_equal(np.asarray(row["images"][0]), image(0))
    assert json.loads((tmp_path / "pairs" / "pairs.json").read_text())["pairs"] == 1
    with pytest.raises(ValueError, match="not empty"):
        save_pairs(pairs, tmp_path / "pairs")


# ----------------------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loss_type", "expected"),
    [
        # h = (-1 - -2) - (-3 - -2.5) = 1.5; beta = 0.5
        ("sigmoid", math.log(1 + math.exp(-0.75))),
        ("ipo", (1.5 - 1.0) ** 2),
        ("hinge", max(0.0, 1 - 0.75)),
    ],
)
def test_dpo_loss_matches_a_hand_computation(loss_type, expected):
    loss, chosen_reward, rejected_reward = dpo_loss(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.5]), 0.5, loss_type
    )
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(chosen_reward) == pytest.approx(0.5) and float(rejected_reward) == pytest.approx(-0.25)


# ----------------------------------------------------------------------------------------------------------
# DPO on the Colour task: the expert's colour over a wrong one
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def colour_pairs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("colour")
    collect_expert(COLOUR, root / "expert", episodes=12, seed=0, prompt_style="action")
    names = envs.get_language(COLOUR).action_names
    with TrajectoryWriter(root / "policy") as writer:
        for row, shift in itertools.product(load_trajectories(root / "expert"), (1, 2)):
            wrong = (row["action"] + shift) % len(names)
            step = StepRecord(np.asarray(row["image"].convert("RGB")), row["step_text"], names[wrong], wrong, 0.0,
                              True, False, action_name=names[wrong])  # fmt: skip
            writer.add_episode([step], env_id=COLOUR, seed=row["seed"], prompt_style="action", source="run:test")
    pairs, _ = build_pairs([root / "expert", root / "policy"], mode="expert")
    assert len(pairs) == 6  # Colour shows one of three colours: each with two wrong answers
    save_pairs(pairs, root / "pairs")
    return root / "pairs"


def dpo_config(tmp_path: Path, pairs: Path | str, **overrides) -> DPOConfig:
    options = dict(
        env_id=COLOUR,
        pairs=str(pairs),
        epochs=1,
        batch_size=2,
        micro_batch_size=1,
        learning_rate=1e-3,
        held_out_fraction=0.34,
        num_envs=2,
        run_dir=str(tmp_path / "run"),
        progress=False,
        checkpoint_every=2,
        policy=dataclasses.replace(ACTION),
    )
    options.update(overrides)
    return DPOConfig(**options)


def prepared(config: DPOConfig):
    policy = load_policy(
        config.policy.model, **{k: v for k, v in dataclasses.asdict(config.policy).items() if k != "model"}
    )
    reference = make_reference(policy, config)
    return policy, reference, pair_data(policy, reference, load_pair_rows(config), config)


@pytest.mark.parametrize("start", ["preset", "fresh-lora", "trained-lora"])
def test_at_the_start_the_policy_is_its_reference(tmp_path, colour_pairs, start):
    """Full fine-tuning of a preset: the reference is the preset rebuilt from the same init_seed, so the
    implicit rewards start at 0; a fresh LoRA adapter: the adapter-off base; a saved policy with a trained
    adapter (an SFT run with LoRA, say): a frozen copy of it, since its adapter-off base is not the start."""
    policy_config = dataclasses.replace(ACTION, lora_rank=0 if start == "preset" else 4)
    if start == "trained-lora":
        trained = load_policy("tiny", lora_rank=4, prompt_style="action", constrained=True)
        with torch.no_grad():
            for name, parameter in trained.model.named_parameters():
                if "lora_B" in name:
                    parameter.add_(0.05 * torch.randn_like(parameter))
        trained.save(tmp_path / "trained")
        policy_config = dataclasses.replace(policy_config, model=str(tmp_path / "trained"))
    config = dpo_config(tmp_path, colour_pairs, policy=policy_config)
    policy, reference, data = prepared(config)
    assert (reference is policy) == (start == "fresh-lora")
    with torch.no_grad():
        _, parts = dpo_losses(policy, data.select(range(6)), config)
    # Zero up to float rounding: the reference's log-probs were computed in other batch shapes.
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(float(parts[name])) < 1e-6, name
    assert float(parts["losses/preference_loss"]) == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("logprob", ["answer", "weighted"])
def test_the_loss_of_a_micro_batch_against_a_hand_computation(tmp_path, colour_pairs, logprob):
    """The policy's answer log-probs at temperature 1 (summed tokens, or lambda-weighted), the reference's,
    beta and RPO's per-token NLL of the chosen answer put together by hand."""
    config = dpo_config(
        tmp_path,
        colour_pairs,
        beta=0.5,
        rpo_alpha=0.7,
        logprob=logprob,
        policy=dataclasses.replace(ACTION, temperature=0.3),
    )
    policy, _, data = prepared(config)
    with torch.no_grad():  # move the policy away from its reference, so the rewards are not 0
        for parameter in policy.model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    micro = data.select([0, 1])
    for completion in micro.chosen + micro.rejected:  # bare action answers weigh every token 1: make it show
        completion.token_weights = torch.linspace(0.2, 1.0, len(completion.response_ids))
    with torch.no_grad():
        loss, parts = dpo_losses(policy, micro, config)
        chosen = policy.evaluate(micro.chosen, temperature=1.0)
        rejected = policy.evaluate(micro.rejected, temperature=1.0)

    def answer_logprob(evaluation, completions):
        weights = torch.zeros_like(evaluation.token_logprobs)
        for row, completion in enumerate(completions):
            weights[row, : len(completion.token_weights)] = completion.token_weights
        if logprob == "answer":
            weights = evaluation.token_mask.float()
        return (weights * evaluation.token_logprobs).sum(-1)

    chosen_logprob, rejected_logprob = answer_logprob(chosen, micro.chosen), answer_logprob(rejected, micro.rejected)
    h = (chosen_logprob - micro.reference_chosen) - (rejected_logprob - micro.reference_rejected)
    dpo = torch.log1p(torch.exp(-0.5 * h)).mean()
    nll = (-(chosen.token_logprobs * chosen.token_mask).sum(-1) / chosen.token_mask.sum(-1)).mean()
    torch.testing.assert_close(loss, dpo + 0.7 * nll, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts["rewards/margins"], (0.5 * h).mean(), atol=1e-5, rtol=1e-5)
    assert float(parts["rewards/accuracies"]) == float((h > 0).float().mean())


def test_one_step_widens_the_margin(tmp_path, colour_pairs):
    config = dpo_config(tmp_path, colour_pairs, learning_rate=1e-3)
    policy, _, data = prepared(config)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    before = {name: p.detach().clone() for name, p in policy.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    batch = np.arange(6)
    step = GuardedStep(optimizer, trainable, 1.0, 5)
    parts = minibatch_step(policy, data, batch, config, step)
    assert abs(parts["rewards/margins"]) < 1e-6
    with torch.no_grad():
        _, after = dpo_losses(policy, data.select(batch), config)
    assert float(after["rewards/margins"]) > 0
    changed = [name for name, p in policy.named_parameters() if p.requires_grad and not torch.equal(p, before[name])]
    assert "model.lm_head.weight" in changed or any("layers.0" in name for name in changed)


def test_dpo_trains_evaluates_and_resumes_exactly(tmp_path, colour_pairs):
    options = dict(epochs=2, checkpoint_every=3, eval_episodes=4)  # 4 training pairs: 2 updates per epoch
    straight = train(dpo_config(tmp_path / "a", colour_pairs, **options))
    rows = read_metrics(straight / "metrics.jsonl")
    assert "dpo/heldout_accuracy" in rows[-2] and "eval/success_rate" in rows[-1]
    assert {"rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"} <= set(rows[0])
    checkpoints = sorted((straight / "checkpoints").glob("update-*"))
    assert [c.name for c in checkpoints] == ["update-000003", "update-000004"]
    resumed = tmp_path / "b"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / checkpoints[-1].name)
    train(dpo_config(tmp_path / "ignored", colour_pairs, resume=str(resumed)))
    expected = load_policy(str(checkpoints[-1] / "policy")).state_dict()
    actual = load_policy(str(resumed / "checkpoints" / checkpoints[-1].name / "policy")).state_dict()
    for name, value in expected.items():
        assert torch.equal(value, actual[name]), name
    losses = [r.get("losses/loss") for r in read_metrics(straight / "metrics.jsonl")]
    assert losses == [r.get("losses/loss") for r in read_metrics(resumed / "metrics.jsonl")]


def test_trl_dpo_trainer_trains_on_exported_pairs(tmp_path, colour_pairs):
    """The saved pair set is TRL's conversational vision preference format as it is. TRL builds a missing
    reference from ``model.config``'s hub id, which a preset has not, so the frozen start is passed in;
    ``max_length=None`` keeps TRL from cutting image tokens off the prompt."""
    import datasets
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    policy = load_policy("tiny", lora_rank=0, prompt_style="action")
    reference = load_policy("tiny", lora_rank=0, prompt_style="action")  # the same init_seed: the start
    args = TRLConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=2,
        max_steps=2,
        max_length=None,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
    )
    trainer = DPOTrainer(
        model=policy.model,
        ref_model=reference.model,
        args=args,
        train_dataset=datasets.load_from_disk(str(colour_pairs)),
        processing_class=policy.processor,
    )
    before = {name: p.detach().clone() for name, p in policy.model.named_parameters() if p.requires_grad}
    trainer.train()
    logs = [row for row in trainer.state.log_history if "rewards/margins" in row]
    assert len(logs) == 2 and logs[0]["rewards/margins"] == 0.0  # the first step starts at the reference
    assert logs[-1]["rewards/margins"] > 0
    assert all(not torch.equal(p, before[name]) for name, p in policy.model.named_parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------------------
# Bad input, refused before training
# ----------------------------------------------------------------------------------------------------------


def edited_pairs(source: Path, target: Path, edit) -> Path:
    import datasets

    datasets.load_from_disk(str(source)).map(edit).save_to_disk(str(target))
    return target


@pytest.mark.parametrize(
    ("edit", "overrides", "message"),
    [
        (None, dict(pairs=""), "needs preference pairs"),
        (None, dict(pairs="/nonexistent/pairs"), "no such directory"),
        (None, dict(rounds=2), "exclude each other"),
        (None, dict(env_id=GRID), "is of vlmrl/Colour-v0, not"),
        (None, dict(env_kwargs={"text_hint": True}), "collected with env options"),
        (None, dict(policy=dataclasses.replace(ACTION, prompt_style="cot")), "holds action answers"),
        (None, dict(beta=0.0), "beta must be > 0"),
        (None, dict(held_out_fraction=1.0), "held_out_fraction"),
        (lambda row: {"rejected": row["chosen"]}, {}, "same chosen and rejected answer"),
        (lambda row: {"images": []}, {}, "has no images"),
        (lambda row: {"images": row["images"] * 2}, {}, "has 2 images"),
        (
            lambda row: {"prompt": [{"role": "user", "content": "Old template: " + row["prompt"][0]["content"]}]},
            {},
            "another template",
        ),  # fmt: skip
    ],
)
def test_bad_pairs_and_options_are_refused_before_training(tmp_path, colour_pairs, edit, overrides, message):
    overrides = dict(overrides)
    pairs = overrides.pop("pairs", colour_pairs if edit is None else edited_pairs(colour_pairs, tmp_path / "p", edit))
    with pytest.raises(ConfigError, match=message):
        train(dpo_config(tmp_path, pairs, **overrides))
    assert not (tmp_path / "run").exists()


def test_an_empty_pair_set_is_refused(tmp_path, colour_pairs):
    import datasets

    datasets.load_from_disk(str(colour_pairs)).select([]).save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="holds no pairs"):
        train(dpo_config(tmp_path, tmp_path / "empty"))


def test_pairs_and_dpo_command_lines(tmp_path, colour_pairs, cli_fails):
    from experiments.cli import main

    store = write_store(
        tmp_path / "s", [(0, episode([0], ["up"], [1.0]), "p"), (0, episode([0], ["down"], [1.0]), "p")]
    )
    cli_fails(["pairs", str(store), "--out", str(tmp_path / "x")], "No preference pair found .*ties")
    cli_fails(["pairs", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")], "No trajectory store")
    cli_fails(["pairs", str(store), "--mode", "expert", "--out", str(tmp_path / "x")], "No expert steps")
    cli_fails(["collect", "gridworld", "--expert", "--branch", "2", "--out", str(tmp_path / "c")], "--branch replays")
    cli_fails(["train", "gridworld", "--algo", "dpo", "--run-dir", str(tmp_path / "r")], "needs preference pairs")
    cli_fails(["train", "gridworld", "--algo", "dpo", "--pairs", str(colour_pairs), "--run-dir", str(tmp_path / "r")],
              "is of vlmrl/Colour-v0")  # fmt: skip
    assert not (tmp_path / "r").exists()
    main(["train", "--env-id", COLOUR, "--algo", "dpo", "--pairs", str(colour_pairs), "--prompt-style", "action",
          "--epochs", "1", "--batch-size", "2", "--micro-batch-size", "2", "--eval-episodes", "2", "--num-envs", "2",
          "--run-dir", str(tmp_path / "z"), "--no-progress"])  # fmt: skip
    assert any("eval/success_rate" in r for r in read_metrics(tmp_path / "z" / "metrics.jsonl"))
    updates = len(read_metrics(tmp_path / "z" / "metrics.jsonl"))
    # Resuming reads the algorithm from the run; naming another one is refused.
    cli_fails(["train", "--env-id", COLOUR, "--algo", "ppo", "--resume", str(tmp_path / "z")], "is a dpo run")
    main(["train", "--env-id", COLOUR, "--resume", str(tmp_path / "z"), "--epochs", "2"])
    assert len(read_metrics(tmp_path / "z" / "metrics.jsonl")) > updates


def test_a_run_whose_starting_policy_is_gone_cannot_build_its_reference(tmp_path, colour_pairs):
    start = tmp_path / "start"
    load_policy("tiny", lora_rank=0, prompt_style="action").save(start)
    run_dir = train(dpo_config(tmp_path, colour_pairs, policy=dataclasses.replace(ACTION, model=str(start))))
    shutil.rmtree(start)
    with pytest.raises(ConfigError, match="reference .*cannot be built"):
        train(dpo_config(tmp_path / "x", colour_pairs, resume=str(run_dir)))


def test_iterated_dpo_plays_pairs_and_trains_once_per_round_and_resumes_exactly(tmp_path):
    options = dict(rounds=3, episodes_per_round=8, group_size=4, num_envs=4, batch_size=4,
                   micro_batch_size=4, checkpoint_every=1, keep_checkpoints=3, held_out_fraction=0.5)  # fmt: skip
    straight = train(dpo_config(tmp_path / "a", "", **options))
    rows = read_metrics(straight / "metrics.jsonl")
    assert len(rows) == 3 and all("dpo/pairs" in r and "charts/success_rate" in r for r in rows)
    assert any(r["dpo/pairs"] > 0 and "rewards/margins" in r for r in rows)  # sampled colours differ in reward
    # Half of each round's pairs are held out of its training and measured after it.
    assert any(r.get("dpo/heldout_pairs", 0) > 0 for r in rows)
    for r in rows:
        assert r.get("dpo/heldout_pairs", 0) == (round(r["dpo/pairs"] / 2) if r["dpo/pairs"] >= 2 else 0)
        assert ("dpo/heldout_accuracy" in r) == (r.get("dpo/heldout_pairs", 0) > 0)
    assert sorted(p.name for p in (straight / "rounds").iterdir()) == ["round-0000", "round-0001", "round-0002"]
    assert len(load_trajectories(straight / "rounds" / "round-0001")) == 8
    checkpoints = sorted((straight / "checkpoints").glob("update-*"))
    resumed = tmp_path / "b"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / checkpoints[-1].name)
    train(dpo_config(tmp_path / "ignored", "", resume=str(resumed)))  # the run keeps its own rounds
    expected = load_policy(str(checkpoints[-1] / "policy")).state_dict()
    actual = load_policy(str(resumed / "checkpoints" / checkpoints[-1].name / "policy")).state_dict()
    for name, value in expected.items():
        assert torch.equal(value, actual[name]), name
    untimed = [[{k: v for k, v in r.items() if k != "charts/round_seconds"} for r in rs]
               for rs in (rows, read_metrics(resumed / "metrics.jsonl"))]  # fmt: skip
    assert untimed[0] == untimed[1]


def test_answers_the_policy_cannot_write_stop_the_run_or_are_skipped_when_asked(tmp_path, colour_pairs):
    """An invalid answer (a policy's, stored as it wrote it) can never come out of constrained decoding."""
    pairs = edited_pairs(
        colour_pairs, tmp_path / "p", lambda row: {"rejected": [{"role": "assistant", "content": "purple"}]}
    )
    with pytest.raises(ConfigError, match="cannot write .*--skip-unwritable"):
        train(dpo_config(tmp_path / "a", pairs))
    with pytest.raises(ConfigError, match="none of the 6 pairs"):
        train(dpo_config(tmp_path / "b", pairs, skip_unwritable=True))
    mixed = tmp_path / "mixed"
    import datasets

    datasets.concatenate_datasets([load_pairs(pairs), load_pairs(colour_pairs)]).save_to_disk(str(mixed))
    with pytest.warns(UserWarning, match="left out 6 of 12 pairs"):
        train(dpo_config(tmp_path / "c", mixed, skip_unwritable=True))


def test_branches_replay_the_main_episode_then_answer_anew(tmp_path):
    from agents.trajectories import collect_branches, episodes

    torch.manual_seed(0)
    policy = load_policy("tiny", prompt_style="action", constrained=True, temperature=1.0)
    summary = collect_branches(policy, GRID, tmp_path / "b", episodes=1, branch=2, branch_steps=2, seed=3)
    stored = episodes(load_trajectories(tmp_path / "b"))
    main, branches = stored[0], stored[1:]
    assert summary["episodes"] == len(stored) == 1 + 2 * min(2, len(main))
    assert all(set(e["seed"]) == {3} for e in stored)
    for number, branch in enumerate(branches):
        step = number // 2  # two branches from step 0, then two from step 1
        assert branch["answer"][:step] == main["answer"][:step]
        assert np.array_equal(np.asarray(branch[step]["image"]), np.asarray(main[step]["image"]))
    pairs, counts = build_pairs([tmp_path / "b"], mode="step")
    assert len(pairs) > 0 and set(pairs["mode"]) == {"step"}, counts
    with pytest.raises(ValueError, match="must both be >= 1"):
        collect_branches(policy, GRID, tmp_path / "c", episodes=1, branch=0)


def test_dpo_learns_the_colour_task_from_expert_pairs(tmp_path, colour_pairs):
    torch.manual_seed(0)
    run_dir = train(
        dpo_config(tmp_path, colour_pairs, epochs=3, held_out_fraction=0.0, checkpoint_every=0, eval_episodes=12)
    )
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert rows[-2]["rewards/accuracies"] == 1.0 and rows[-2]["rewards/margins"] > rows[0]["rewards/margins"]
    assert rows[-1]["eval/success_rate"] >= 0.9, rows[-1]
