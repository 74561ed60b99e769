"""Reward modules: specs, composition, the rule modules and potential-based shaping."""

from __future__ import annotations

from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest

import envs  # noqa: F401 - registers the environments
from envs.gridworld import GridWorldEnv
from envs.language import format_answer
from rewards import RewardContext, RewardSet, infos_per_env, parse_reward_spec, register_reward, reward_names
from rewards.rules import PotentialInfo, PotentialShaping

GRID = "vlmrl/GridWorld-v0"


def answer(text: str, action: int | None) -> SimpleNamespace:
    """The two fields of a Completion that the rule modules read."""
    return SimpleNamespace(text=text, action=action)


def step_kwargs(n: int, rewards=None, terminated=None, truncated=None) -> dict:
    return {
        "env_rewards": np.zeros(n) if rewards is None else np.asarray(rewards, dtype=float),
        "terminated": np.zeros(n, dtype=bool) if terminated is None else np.asarray(terminated),
        "truncated": np.zeros(n, dtype=bool) if truncated is None else np.asarray(truncated),
    }


# -- specs -----------------------------------------------------------------------------------------------


def test_spec_parsing_and_errors():
    assert parse_reward_spec("env").weight == 1.0
    assert parse_reward_spec("shaping:0.5:gamma=0.9").options == {"gamma": "0.9"}
    with pytest.raises(ValueError, match=r"Unknown reward 'nope'.*registered rewards: .*env.*invalid"):
        parse_reward_spec("nope:1.0")
    with pytest.raises(ValueError, match=r"weight 'abc' is not a number"):
        parse_reward_spec("env:abc")
    with pytest.raises(ValueError, match=r"must be KEY=VALUE"):
        parse_reward_spec("shaping:1:gamma")
    with pytest.raises(ValueError, match=r"has no option bogus; its options are"):
        RewardSet.from_specs(["shaping:1:bogus=1"], RewardContext(gamma=0.9))
    with pytest.raises(ValueError, match=r"is not a number"):
        RewardSet.from_specs(["shaping:1:gamma=high"])
    with pytest.raises(ValueError, match=r"takes no options"):
        RewardSet.from_specs(["env:1:x=1"])
    with pytest.raises(ValueError, match=r"given twice"):
        RewardSet.from_specs(["env:1", "env:2"])
    with pytest.raises(ValueError, match=r"no discount"):
        RewardSet.from_specs(["shaping:1"])


def test_composition_gives_total_and_every_term():
    rewards = RewardSet.from_specs(
        ["env:1.0", "invalid:-0.1", "format:0.5"], RewardContext(env_id=GRID, prompt_style="cot")
    )
    completions = [
        answer(format_answer("up", "The goal is above."), 0),
        answer(format_answer("jump", "Hm."), None),
        answer('{"action": "left"}', 2),  # valid, but no thoughts: not well-formed CoT
    ]
    result = rewards(None, completions, [{}, {}, {}], **step_kwargs(3, rewards=[1.0, 0.0, -0.5]))
    np.testing.assert_allclose(result.terms["env"], [1.0, 0.0, -0.5])
    np.testing.assert_allclose(result.terms["invalid"], [0.0, 1.0, 0.0])
    np.testing.assert_allclose(result.terms["format"], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(result.total, [1.5, -0.1, -0.5])
    assert result.parts(1) == {"env": 0.0, "invalid": pytest.approx(-0.1), "format": 0.0}
    assert sum(result.parts(0).values()) == pytest.approx(result.total[0])
    metrics = result.metrics()
    assert metrics["rewards/invalid"] == pytest.approx(1 / 3) and metrics["rewards/total"] == pytest.approx(0.3)


def test_invalid_weight_reproduces_the_old_penalty():
    rewards = RewardSet.from_specs(["env:1", "invalid:-0.1"])
    env_rewards = np.array([1.0, 0.0])
    completions = [answer("up", 0), answer("??", None)]
    result = rewards(None, completions, [{}, {}], **step_kwargs(2, rewards=env_rewards))
    invalid = np.array([False, True])
    np.testing.assert_allclose(result.total, env_rewards - 0.1 * invalid)


def test_the_step_term_is_one_per_active_env_so_a_negative_weight_is_a_time_cost():
    rewards = RewardSet.from_specs(["env:1", "step:-0.5"])
    result = rewards(None, [answer("up", 0), None, answer("??", None)], [{}, {}, {}],
                     **step_kwargs(3, rewards=[1.0, 0.0, 0.0]))  # fmt: skip
    np.testing.assert_allclose(result.terms["step"], [1.0, 0.0, 1.0])  # the inactive env scores nothing
    np.testing.assert_allclose(result.total, [0.5, 0.0, -0.5])


def test_inactive_envs_score_zero_and_modules_see_only_active_ones():
    seen = []

    def count(observations, completions, infos, **step):
        seen.append(len(completions))
        return [2.0] * len(completions)

    register_reward("test_count", count, overwrite=True)
    assert "test_count" in reward_names()
    rewards = RewardSet.from_specs(["test_count:1.5"])
    result = rewards(
        {"image": np.zeros((3, 2, 2, 3), np.uint8), "text": ("a", "b", "c")},
        [answer("up", 0), None, answer("up", 0)],
        [{}, {}, {}],
        **step_kwargs(3),
        active=np.array([True, False, True]),
    )
    assert seen == [2]
    np.testing.assert_allclose(result.total, [3.0, 0.0, 3.0])
    # Without a mask, the envs without a completion are the inactive ones.
    result = rewards(None, [None, answer("up", 0), None], [{}, {}, {}], **step_kwargs(3))
    assert seen == [2, 1]
    np.testing.assert_allclose(result.total, [0.0, 3.0, 0.0])


def test_a_module_returning_the_wrong_count_is_named():
    register_reward("test_short", lambda observations, completions, infos, **step: [1.0], overwrite=True)
    with pytest.raises(ValueError, match=r"'test_short' returned 1 values for 2 answers"):
        RewardSet.from_specs(["test_short"])(None, [answer("", 0)] * 2, [{}, {}], **step_kwargs(2))


def test_format_strict_and_action_style():
    strict = RewardSet.from_specs(["format:1:strict=true"], RewardContext(env_id=GRID))
    cot = format_answer("up", "go")
    result = strict(None, [answer(cot, 0), answer("Sure! " + cot, 0)], [{}, {}], **step_kwargs(2))
    np.testing.assert_allclose(result.total, [1.0, 0.0])
    action = RewardSet.from_specs(["format:1:style=action"], RewardContext(env_id=GRID))
    result = action(None, [answer("up", 0), answer("upwards", None)], [{}, {}], **step_kwargs(2))
    np.testing.assert_allclose(result.total, [1.0, 0.0])


# -- shaping ---------------------------------------------------------------------------------------------


def test_shaping_hand_example_with_discount():
    # phi: s0 = -3, s1 = -2, s2 = -1 (goal reached from s2 is terminal: phi = 0). gamma = 0.9.
    shaping = PotentialShaping(gamma=0.9)
    infos = [
        {"previous_potential": -3.0, "potential": -2.0},  # 0.9 * -2 - -3 = 1.2
        {"previous_potential": -2.0, "potential": -2.0},  # bumped into a wall: 0.9 * -2 + 2 = 0.2
        {"previous_potential": -1.0, "potential": -7.0},  # terminal: 0 - -1 = 1.0, phi(s') ignored
        {"previous_potential": -1.0, "potential": -2.0},  # truncated: 0.9 * -2 + 1 = -0.8 (kept)
    ]
    got = shaping(
        None, [None] * 4, infos, terminated=np.array([0, 0, 1, 0], bool), truncated=np.array([0, 0, 0, 1], bool)
    )
    np.testing.assert_allclose(got, [1.2, 0.2, 1.0, -0.8])
    cut = PotentialShaping(gamma=0.9, zero_on_truncation=True)
    got = cut(None, [None] * 4, infos, terminated=np.array([0, 0, 1, 0], bool), truncated=np.array([0, 0, 0, 1], bool))
    assert got[3] == pytest.approx(1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shaped_return_telescopes_on_any_gridworld_path(seed):
    """Discounted sum of F along any path = gamma^T phi(s_T) - phi(s_0), with phi(s_T) = 0 if s_T is terminal."""
    gamma = 0.8
    env = GridWorldEnv(size=5, n_walls=3, max_steps=12)
    _, reset_info = env.reset(seed=seed)
    phi_0 = reset_info["potential"]
    rng = np.random.default_rng(seed)
    shaping = PotentialShaping(gamma)
    shaped, unshaped, t = 0.0, 0.0, 0
    terminated = truncated = False
    while not (terminated or truncated):
        _, reward, terminated, truncated, info = env.step(int(rng.integers(4)))
        [term] = shaping(None, [None], [info], terminated=np.array([terminated]), truncated=np.array([truncated]))
        shaped += gamma**t * (reward + term)
        unshaped += gamma**t * reward
        t += 1
    phi_T = 0.0 if terminated else info["potential"]
    assert shaped - unshaped == pytest.approx(gamma**t * phi_T - phi_0)


def test_potentials_of_gridworld_and_reach():
    env = GridWorldEnv(size=4)
    _, info = env.reset(seed=0, options={"agent": (0, 0), "goal": (0, 2), "walls": []})
    assert info["potential"] == -2.0
    _, _, _, _, info = env.step(3)  # right
    assert (info["previous_potential"], info["potential"]) == (-2.0, -1.0)
    reach = gym.make("vlmrl/Reach-v0", image_size=32).unwrapped
    _, info = reach.reset(seed=0, options={"gripper": [0.0, 0.0, 0.1], "target": [0.1, 0.0, 0.1]})
    assert info["potential"] == pytest.approx(-0.1)
    _, _, _, _, info = reach.step(reach.expert_action())
    assert info["previous_potential"] == pytest.approx(-0.1) and info["potential"] > -0.1
    reach.close()


def test_potential_info_wrapper_and_missing_potential_error():
    class Plain(gym.Env):
        observation_space = gym.spaces.Discrete(3)
        action_space = gym.spaces.Discrete(2)

        def reset(self, *, seed=None, options=None):
            self.state = 0
            return 0, {}

        def step(self, action):
            self.state += 1
            return self.state, 0.0, self.state == 2, False, {}

    with pytest.raises(ValueError, match=r"no potential\(\) method"):
        PotentialInfo(Plain())
    env = PotentialInfo(Plain(), potential=lambda e: -float(2 - e.unwrapped.state))
    assert env.reset()[1] == {"potential": -2.0}
    assert env.step(0)[4] == {"previous_potential": -2.0, "potential": -1.0}
    shaping = RewardSet.from_specs(["shaping:1:gamma=1"])
    with pytest.raises(ValueError, match=r"has no 'potential'.*PotentialInfo"):
        shaping(None, [answer("up", 0)], [{}], **step_kwargs(1))


def test_vector_env_infos_give_the_ended_episode_its_own_step_info():
    """Same-step autoreset: an env that reached the goal shows the new episode's info; the reward must
    score the transition that happened, from final_info."""
    from agents.rollout import make_vector_env

    vector_env = make_vector_env(GRID, 2, {"size": 3, "n_walls": 0})
    vector_env.reset(seed=[0, 1])
    env0 = vector_env.envs[0].unwrapped
    action0 = env0.expert_action()
    for _ in range(20):  # step env 0 along the expert's path until it reaches the goal
        distance = -env0.potential()
        _, rewards, terminated, truncated, info = vector_env.step(np.array([action0, 0]))
        infos = infos_per_env(info, 2)
        if terminated[0]:
            assert infos[0]["previous_potential"] == -1.0 and infos[0]["success"]
            result = RewardSet.from_specs(["env:1", "shaping:1:gamma=0.9"])(
                None, [answer("up", 0)] * 2, info, env_rewards=rewards, terminated=terminated, truncated=truncated
            )
            assert result.terms["shaping"][0] == pytest.approx(1.0)
            break
        assert infos[0]["potential"] == -(distance - 1)
        action0 = env0.expert_action()
    else:
        pytest.fail("the expert never reached the goal")
    vector_env.close()
