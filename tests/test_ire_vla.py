"""iRe-VLA and the action-head policy: the head's distributions, which parts each stage trains, resume,
learning the Colour task, continuous expert data in the store, and bad input refused with a message."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch.distributions import AffineTransform, Categorical, Normal, TanhTransform, TransformedDistribution

import envs
from agents.errors import ConfigError
from agents.ire_vla import IReVLAConfig, bc_loss, rl_stage, store_demos, supervised_stage, train
from agents.policy import PolicyConfig, load_policy
from agents.ppo import PPOConfig
from agents.rollout import EnvRunner
from agents.tracking import read_metrics
from agents.trajectories import StepRecord, TrajectoryWriter, collect_expert, load_trajectories
from agents.vla import SQUASH_EPS, ActionHead, HeadConfig, build_vla_policy, head_config_for

REACH = {"image_size": 32, "text_hint": False}
BACKBONE = PolicyConfig(model="tiny", prompt_style="action", lora_rank=8, device="cpu")


@pytest.fixture(scope="module")
def reach_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stores") / "reach"
    collect_expert("vlmrl/Reach-v0", path, episodes=6, env_kwargs=REACH, prompt_style="action", continuous=True)
    return path


@pytest.fixture(scope="module")
def colour_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stores") / "colour"
    collect_expert("vlmrl/Colour-v0", path, episodes=48, prompt_style="action")
    return path


@pytest.fixture(scope="module")
def reach_policy():
    return build_vla_policy(BACKBONE, head_config_for("vlmrl/Reach-v0", REACH, "continuous"))


def ire_config(tmp_path: Path, data: Path, **overrides) -> IReVLAConfig:
    options = dict(
        env_id="vlmrl/Reach-v0",
        env_kwargs=dict(REACH),
        data=str(data),
        num_envs=2,
        num_steps=4,
        stage1_env_steps=8,
        minibatch_size=4,
        update_epochs=2,
        stage0_steps=2,
        stage2_steps=2,
        rounds=2,
        batch_size=4,
        micro_batch_size=2,
        stage_eval_episodes=0,
        keep_checkpoints=5,
        run_dir=str(tmp_path / "run"),
        progress=False,
        policy=dataclasses.replace(BACKBONE),
    )
    options.update(overrides)
    return IReVLAConfig(**options)


def snapshot(module: torch.nn.Module | list) -> list[torch.Tensor]:
    parameters = module if isinstance(module, list) else list(module.parameters())
    return [p.detach().clone() for p in parameters]


def changed(before: list[torch.Tensor], module: torch.nn.Module | list) -> list[bool]:
    after = module if isinstance(module, list) else list(module.parameters())
    return [not torch.equal(b, a.detach()) for b, a in zip(before, after)]


# --- the head's distributions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("state_dependent_std", [False, True])
def test_gaussian_head_matches_torch_tanh_transformed_normal(state_dependent_std):
    torch.manual_seed(0)
    low, high = (-2.0, 0.0, -1.0), (2.0, 1.0, 1.0)
    config = HeadConfig("continuous", (16,), -0.3, state_dependent_std, ("a",), low, high)
    head = ActionHead(8, config)
    with torch.no_grad():  # means and stds away from the initial near-zero ones
        head.out.weight.normal_(std=0.5)
    features = torch.randn(5, 8)
    raw, action = head.sample(features)
    logprob, entropy = head.log_prob(features, raw)

    mean, log_std = head(features)
    loc, scale = (torch.tensor(high) + torch.tensor(low)) / 2, (torch.tensor(high) - torch.tensor(low)) / 2
    # cache_size=1: the reference scores its own sample through the cached pre-squash value (atanh of a
    # saturated tanh would lose the digits this comparison needs).
    reference = TransformedDistribution(
        Normal(mean, log_std.exp()), [TanhTransform(cache_size=1), AffineTransform(loc, scale, cache_size=1)]
    )
    reference_action = reference.transforms[1](reference.transforms[0](raw))
    torch.testing.assert_close(action, reference_action)
    torch.testing.assert_close(logprob, reference.log_prob(reference_action).sum(-1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(entropy, Normal(mean, log_std.exp()).entropy().sum(-1))
    assert torch.all(action >= torch.tensor(low)) and torch.all(action <= torch.tensor(high))
    # An env action scores as its pre-squash sample does (unless tanh saturated it within SQUASH_EPS of a
    # bound, where it is moved inside); one on the bounds scores finite.
    inside = (torch.tanh(raw).abs() < 1 - SQUASH_EPS).all(-1)
    assert inside.sum() >= 3
    torch.testing.assert_close(head.action_log_prob(features, action)[0][inside], logprob[inside], atol=1e-3, rtol=1e-3)
    assert torch.isfinite(head.action_log_prob(features, torch.tensor([high] * 5))[0]).all()
    greedy, greedy_action = head.sample(features, greedy=True)
    torch.testing.assert_close(greedy, mean)


def test_discrete_head_matches_torch_categorical():
    torch.manual_seed(0)
    head = ActionHead(8, HeadConfig("discrete", (16,), action_names=("red", "green", "blue")))
    features = torch.randn(6, 8)
    index, _ = head.sample(features)
    logprob, entropy = head.log_prob(features, index)
    reference = Categorical(logits=head(features)[0])
    torch.testing.assert_close(logprob, reference.log_prob(index))
    torch.testing.assert_close(entropy, reference.entropy())


# --- what each stage trains -------------------------------------------------------------------------------------


def test_behaviour_cloning_lowers_nll(reach_policy, reach_store):
    head = reach_policy.head_config
    demos = store_demos(load_trajectories(reach_store), head, "store")
    spec = envs.get_language("vlmrl/Reach-v0")
    config = ire_config(Path("/unused"), reach_store, batch_size=8, micro_batch_size=8)
    with torch.no_grad():
        before = float(bc_loss(reach_policy, spec, demos[:8], True)[0])
    supervised_stage(
        reach_policy, spec, demos[:8], [], steps=15, learning_rate=3e-3, train_backbone=True, online_fraction=0.0,
        config=config, generator=np.random.default_rng(0),
    )  # fmt: skip
    with torch.no_grad():
        after = float(bc_loss(reach_policy, spec, demos[:8], True)[0])
    assert after < before - 1.0, (before, after)


def test_stage1_trains_only_the_heads_and_stage2_the_lora_and_action_head(reach_policy, reach_store, tmp_path):
    from rewards import RewardContext, RewardSet

    policy = reach_policy
    config = ire_config(tmp_path, reach_store)
    runner = EnvRunner("vlmrl/Reach-v0", 2, REACH, seed=0, rng=np.random.default_rng(0), continuous=True)
    rewards = RewardSet.from_specs(["env:1", "shaping:1"], RewardContext(env_id="vlmrl/Reach-v0", gamma=0.95))
    run = SimpleNamespace(generator=np.random.default_rng(0), logger=SimpleNamespace(log=lambda *args: None))
    lora = [p for n, p in policy.backbone.model.named_parameters() if "lora_" in n]
    assert lora and len(lora) == len(policy.backbone_parameters)
    everything = [p for n, p in policy.backbone.model.named_parameters()]
    backbone, head, value = snapshot(everything), snapshot(policy.head), snapshot(policy.value_head)
    rl_stage(policy, runner, rewards, config, run, 1)
    runner.close()
    assert not any(changed(backbone, everything)), "stage 1 changed the backbone"
    assert all(changed(head, policy.head)) and all(changed(value, policy.value_head))

    spec = envs.get_language("vlmrl/Reach-v0")
    demos = store_demos(load_trajectories(reach_store), policy.head_config, "store")
    lora_before, head, value = snapshot(lora), snapshot(policy.head), snapshot(policy.value_head)
    supervised_stage(
        policy, spec, demos[:4], demos[4:8], steps=2, learning_rate=1e-3, train_backbone=True, online_fraction=0.5,
        config=config, generator=np.random.default_rng(0),
    )  # fmt: skip
    assert all(changed(lora_before, lora)), "stage 2 left a LoRA weight unchanged"
    assert all(changed(head, policy.head)) and not any(changed(value, policy.value_head))


def test_the_whole_model_ppo_baseline_trains_lora_and_heads_in_stage1_and_has_no_stage2(tmp_path, reach_store):
    from agents.checkpoint import POLICY_DIR

    config = ire_config(
        tmp_path, reach_store, rounds=1, stage1_train_backbone=True, stage1_backbone_learning_rate=1e-3, stage2=False,
        stage2_steps=0,  # no stage 2, so no stage-2 budget is asked for
    )  # fmt: skip
    run_dir = train(config)
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert {r["ire/stage"] for r in rows if "ire/stage" in r} == {0.0, 1.0}
    stage0 = load_policy(str(run_dir / "checkpoints" / "update-000001" / POLICY_DIR))  # unit 0 done
    final = load_policy(str(run_dir))
    parts = {
        "lora": lambda p: [x for n, x in p.backbone.model.named_parameters() if "lora_" in n],
        "action head": lambda p: list(p.head.parameters()),
        "value head": lambda p: list(p.value_head.parameters()),
    }
    for name, part in parts.items():
        assert all(changed(snapshot(part(stage0)), part(final))), f"stage 1 left a {name} weight unchanged"
    frozen = [x for n, x in final.backbone.model.named_parameters() if "lora_" not in n]
    assert not any(
        changed(snapshot([x for n, x in stage0.backbone.model.named_parameters() if "lora_" not in n]), frozen)
    )


# --- the loop: resume, eval, no successes ---------------------------------------------------------------------


def test_resume_mid_loop_equals_uninterrupted_and_eval_loads_it(tmp_path, reach_store):
    from agents.evaluation import evaluate_checkpoint

    with pytest.warns(UserWarning, match="expert data alone"):
        straight = train(ire_config(tmp_path / "a", reach_store))
    rows = read_metrics(straight / "metrics.jsonl")
    stage2 = [r for r in rows if r.get("ire/stage") == 2.0]
    assert len(stage2) == 2 and all(r["ire/expert_only"] == 1.0 for r in stage2)  # a random head never reached

    resumed = tmp_path / "b"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "update-000003")  # killed in round 2: resume after round 1
    with pytest.warns(UserWarning, match="expert data alone"):
        train(ire_config(tmp_path / "ignored", reach_store, resume=str(resumed)))
    a, b = load_policy(str(straight)), load_policy(str(resumed))
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(x, y), name
    strip = [{k: v for k, v in r.items() if "seconds" not in k and "per_s" not in k} for r in rows]
    again = read_metrics(resumed / "metrics.jsonl")
    assert strip == [{k: v for k, v in r.items() if "seconds" not in k and "per_s" not in k} for r in again]

    result = evaluate_checkpoint(str(straight), episodes=2, device="cpu")  # what `vlmrl eval RUN` runs
    assert result["episodes"] == 2 and result["invalid_action_rate"] == 0.0

    # An action-head policy writes no text: a text algorithm refuses it, iRe-VLA goes on from it (same head).
    from_run = dataclasses.replace(BACKBONE, model=str(straight))
    with pytest.raises(ConfigError, match="action-head policy.*--algo ire-vla"):
        PPOConfig(env_id="vlmrl/Reach-v0", env_kwargs=dict(REACH), policy=from_run)
    with pytest.raises(ConfigError, match="has a continuous head of 3 actions.*--action-head continuous"):
        train(ire_config(tmp_path / "from-run", reach_store, action_head="discrete", policy=from_run))


def test_discrete_head_learns_the_colour_task(tmp_path, colour_store):
    config = ire_config(
        tmp_path, colour_store, env_id="vlmrl/Colour-v0", env_kwargs={}, action_head="discrete", num_envs=8,
        num_steps=1, stage1_env_steps=16, minibatch_size=8, stage0_steps=30, stage2_steps=10, rounds=1,
        batch_size=16, micro_batch_size=16, stage0_learning_rate=3e-3, stage_eval_episodes=24,
    )  # fmt: skip
    run_dir = train(config)
    rows = read_metrics(run_dir / "metrics.jsonl")
    final = [r for r in rows if "ire/stage2_success_rate" in r][-1]
    assert final["ire/stage2_success_rate"] >= 0.9, rows
    assert final["ire/online_steps"] > 0  # stage 1's successes were stored and learned from

    # Resumed after stage 0, round 1 stores the same successes once (the store is cut back) and ends alike.
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "update-000002")
    train(dataclasses.replace(config, run_dir=None, resume=str(resumed)))
    stored = [load_trajectories(path / "successes") for path in (run_dir, resumed)]
    assert len(stored[0]) > 0
    for column in ("seed", "step", "action", "step_text", "reward"):  # episode ids are drawn anew
        assert stored[0][column] == stored[1][column], column
    for x, y in zip(load_policy(str(run_dir)).parameters(), load_policy(str(resumed)).parameters()):
        assert torch.equal(x, y)


# --- bad input ---------------------------------------------------------------------------------------------------


def test_bad_input_says_what_to_change(tmp_path, reach_store, colour_store):
    with pytest.raises(ConfigError, match="no continuous action space.*--action-head discrete"):
        ire_config(tmp_path, colour_store, env_id="vlmrl/Colour-v0", env_kwargs={})
    with pytest.raises(ConfigError, match="stage2_steps=0: every stage needs a budget"):
        ire_config(tmp_path, reach_store, stage2_steps=0)
    with pytest.raises(ConfigError, match="stage1_env_steps=0"):
        ire_config(tmp_path, reach_store, stage1_env_steps=0)
    with pytest.raises(ConfigError, match="stage1_backbone_learning_rate is set.*--stage1-train-backbone"):
        ire_config(tmp_path, reach_store, stage1_backbone_learning_rate=1e-4)
    with pytest.raises(ConfigError, match=r"holds steps of \['vlmrl/Colour-v0'\]"):
        train(ire_config(tmp_path / "other-env", colour_store))

    discrete = tmp_path / "discrete-reach"
    collect_expert("vlmrl/Reach-v0", discrete, episodes=1, env_kwargs=REACH, prompt_style="action")
    with pytest.raises(ConfigError, match="no continuous actions.*--continuous"):
        train(ire_config(tmp_path / "discrete", discrete))
    wrong_size = tmp_path / "wrong-size"
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    with TrajectoryWriter(wrong_size) as writer:
        step = StepRecord(
            image, "", "move left", 0, 0.0, False, True, action_name="move left", continuous_action=[0.1, 0.2]
        )
        writer.add_episode(
            [step], env_id="vlmrl/Reach-v0", seed=0, prompt_style="action", source="expert", env_options=REACH
        )
    with pytest.raises(ConfigError, match=r"continuous actions of size \[2\].*3 dimensions"):
        train(ire_config(tmp_path / "size", wrong_size))
    with pytest.raises(ValueError, match="no continuous action space"):
        collect_expert("vlmrl/Colour-v0", tmp_path / "c", episodes=1, continuous=True)


def test_version_1_store_loads_and_appending_upgrades_it(tmp_path):
    import json

    import pyarrow.parquet as pq

    path = tmp_path / "old"
    collect_expert("vlmrl/Colour-v0", path, episodes=2, prompt_style="action")
    shard = next((path / "shards").glob("*.parquet"))
    pq.write_table(pq.read_table(shard).drop_columns(["continuous_action"]), shard)
    info = json.loads((path / "store.json").read_text())
    (path / "store.json").write_text(json.dumps({**info, "schema_version": 1}))
    assert load_trajectories(path)["continuous_action"] == [None, None]
    collect_expert("vlmrl/Colour-v0", path, episodes=1, prompt_style="action")
    assert json.loads((path / "store.json").read_text())["schema_version"] == 2 and len(load_trajectories(path)) == 3


def test_continuous_expert_reaches_and_is_stored(reach_store):
    steps = load_trajectories(reach_store)
    assert all(len(v) == 3 and max(abs(x) for x in v) <= 1.0 for v in steps["continuous_action"])
    assert all(steps["success"])
    env = gym.make("vlmrl/Reach-v0", **REACH)
    env.reset(seed=0)
    gap = env.unwrapped.target_pos - env.unwrapped.gripper_pos
    np.testing.assert_allclose(env.unwrapped.expert_continuous_action(), np.clip(gap / 0.04, -1, 1), rtol=1e-6)


class _Endless(gym.Env):
    """A continuous-action env that never ends an episode by itself."""

    observation_space = gym.spaces.Discrete(1)
    action_space = gym.spaces.Discrete(2)
    continuous_action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return 0, {}

    def step(self, action):
        return 0, 0.0, False, False, {}

    def step_continuous(self, action):
        return 0, 0.0, False, False, {}


def test_continuous_steps_keep_the_registered_time_limit():
    from agents.rollout import continuous_env

    gym.register("test/Endless-v0", entry_point=_Endless, max_episode_steps=3)
    try:
        env = continuous_env(gym.make("test/Endless-v0"))
        for _ in range(2):  # a reset starts the count again
            env.reset(seed=0)
            truncated = [env.step(np.zeros(2))[3] for _ in range(3)]
            assert truncated == [False, False, True]
    finally:
        gym.registry.pop("test/Endless-v0")
