"""Truthful-thought checkers: ``check_thoughts`` of every environment and ``envs.thought_checker``.

Each table holds thoughts about one real seeded state: the expert's own rationale, paraphrases that
state the same facts (other words, order and case), and thoughts with a wrong or missing fact. The state
builders assert the facts the table assumes, so a change in seeding shows up as a clear failure.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Callable
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

import envs
from envs import LanguageEnv, LanguageSpec, thought_checker
from envs.base import observation_space
from envs.blackjack import BlackjackEnv
from envs.colour import ColourEnv
from envs.gridworld import GridWorldEnv
from envs.manipulation import PushEnv, ReachEnv
from envs.numberline import NumberLineEnv
from envs.points import EZPointsEnv, Points24Env, PointsEnv

#: Stands for the environment's own ``expert_rationale()`` in a table.
RATIONALE = "<expert rationale>"
#: Thoughts that state nothing: every checker must reject them in every state.
EMPTY_THOUGHTS = ("", "   ", "lorem ipsum dolor sit amet 42", '{"thoughts": "", "action": "up"}')


# ----------------------------------------------------------------------------------------------------------
# States
# ----------------------------------------------------------------------------------------------------------


def _play(env: PointsEnv, tokens: list[str]) -> None:
    for token in tokens:
        env.step(env.language.action_names.index(token))
    assert env.formula == tokens, f"illegal token in {tokens}"


@functools.cache
def blackjack_soft_16() -> BlackjackEnv:
    env = BlackjackEnv()
    env.reset(seed=0)
    assert [rank for rank, _ in env.player] == [5, 1] and env.dealer[0][0] == 12  # 5 + A against a queen
    return env


@functools.cache
def blackjack_dealer_ace() -> BlackjackEnv:
    env = BlackjackEnv()
    env.reset(seed=23)
    assert [rank for rank, _ in env.player] == [4, 8] and env.dealer[0][0] == 1  # hard 12 against an ace
    return env


@functools.cache
def numberline_3_to_5() -> NumberLineEnv:
    env = NumberLineEnv()
    env.reset(seed=0)
    assert (env.position, env.target, env.steps, env.max_steps) == (3, 5, 0, 10)
    return env


@functools.cache
def numberline_on_target() -> NumberLineEnv:
    env = NumberLineEnv()
    env.reset(seed=0)
    env.step(1)
    env.step(1)
    assert env.position == env.target == 5
    return env


@functools.cache
def ezpoints_empty() -> EZPointsEnv:
    env = EZPointsEnv()
    env.reset(seed=0)
    assert [rank for rank, _ in env.cards] == [9, 3] and env.formula == []
    return env


@functools.cache
def ezpoints_3_plus() -> EZPointsEnv:
    env = EZPointsEnv()
    env.reset(seed=0)
    _play(env, ["3", "+"])
    return env


@functools.cache
def ezpoints_complete() -> EZPointsEnv:
    env = EZPointsEnv()
    env.reset(seed=0)
    _play(env, ["3", "+", "9"])
    return env


@functools.cache
def points24_dead_end() -> Points24Env:
    env = Points24Env()
    env.reset(seed=1)
    assert [rank for rank, _ in env.cards] == [11, 2, 4, 3]  # J, 2, 4, 3
    _play(env, ["(", "10", "-", "4", ")"])
    return env


@functools.cache
def gridworld_open() -> GridWorldEnv:
    env = GridWorldEnv()
    env.reset(seed=2)
    # 0-based (row, column); the thoughts count from 1: agent (5, 2), goal (3, 5), walls (2, 3), (4, 2), (5, 1).
    assert (env.agent, env.goal) == ((4, 1), (2, 4))
    assert np.argwhere(env.walls).tolist() == [[1, 2], [3, 1], [4, 0]]
    return env


@functools.cache
def gridworld_detour() -> GridWorldEnv:
    env = GridWorldEnv()
    env.reset(seed=0, options={"agent": (2, 0), "goal": (2, 2), "walls": [(2, 1)]})
    return env


@functools.cache
def reach_seed_2() -> ReachEnv:
    env = ReachEnv(image_size=16)
    env.reset(seed=2)
    gap_cm = 100 * (env.target_pos - env.gripper_pos)
    assert np.allclose(gap_cm, [8.2, -10.9, 0.6], atol=0.05), gap_cm
    assert np.allclose(100 * env.gripper_pos, [-16.3, 4.0, 15.0], atol=0.05), env.gripper_pos
    return env


@functools.cache
def push_seed_0() -> PushEnv:
    env = PushEnv(image_size=16)
    env.reset(seed=0)
    gap_cm = 100 * (env.goal_pos - env.box_pos)[:2]
    assert np.allclose(gap_cm, [-11.9, -5.1], atol=0.05), gap_cm
    return env


@functools.cache
def colour_blue() -> ColourEnv:
    env = ColourEnv()
    env.reset(seed=0)
    assert env.language.action_names[env.colour] == "blue"
    return env


# ----------------------------------------------------------------------------------------------------------
# Tables: (thought, whether it is true)
# ----------------------------------------------------------------------------------------------------------

TABLES: dict[Callable[[], Any], list[tuple[str, bool]]] = {
    # My sum is soft 16 (5 and A) and the dealer shows a Q (10).
    blackjack_soft_16: [
        (RATIONALE, True),
        ("The dealer's face-up card is a Q and I have soft 16, so I hit.", True),
        ("dealer: 10. me: 16 (an ace and a 5).", True),
        ("MY TOTAL IS SOFT 16, DEALER SHOWS 10 -> HIT", True),
        ("My sum is 15 and the dealer shows 10.", False),
        ("My sum is soft 16 and the dealer shows 9.", False),
        ("My sum is soft 16 and the dealer shows a K.", False),
        ("My sum is hard 16 and the dealer shows 10.", False),
        ("My sum is 10 and the dealer shows 16.", False),
        ("My sum is soft 16, so basic strategy says hit.", False),
        ("The dealer shows 10, so basic strategy says hit.", False),
        ("My sum is soft 16 and the dealer shows 10; he busts on 19.", False),
    ],
    # Hard 12 (4 and 8) against an ace.
    blackjack_dealer_ace: [
        (RATIONALE, True),
        ("The dealer shows an Ace and my total is 12.", True),
        ("Dealer has 11 showing; I have 12 from a 4 and an 8.", True),
        ("My sum is 12 against the dealer's 1.", True),
        ("My sum is 12 and the dealer shows a 10.", False),
        ("My sum is 13 and the dealer shows A.", False),
        ("My sum is soft 12 and the dealer shows A.", False),
    ],
    # Current 3, target 5, no step taken yet.
    numberline_3_to_5: [
        (RATIONALE, True),
        ("Target: 5. Current: 3. I need to go up by 2.", True),
        ("The target 5 is above the current number 3, so +.", True),
        ("THE CURRENT POSITION IS 3; THE TARGET IS 5; 10 STEPS LEFT.", True),
        ("I am at 3 and the goal is 5.", True),
        ("The current number 4 is below the target 5, so I choose +.", False),
        ("The current number 3 is below the target 6, so I choose +.", False),
        ("The current number 3 is above the target 5, so I choose -.", False),
        ("Current 5, target 3.", False),
        ("The current number 3, so I choose +.", False),
        ("The target is 5, so I choose +.", False),
        ("The current number 3 is below the target 5; 7 steps left.", False),
        ("I choose +.", False),
    ],
    # Current 5 on the target 5.
    numberline_on_target: [
        (RATIONALE, True),
        ("I'm at 5, which is the target.", True),
        ("The current number 5 equals the target 5.", True),
        ("The current number 4 already equals the target.", False),
        ("The current number 5 is below the target 6.", False),
    ],
    # Cards 9 and 3, nothing written yet.
    ezpoints_empty: [
        (RATIONALE, True),
        ("I have 3 and 9 and nothing is written yet; 3 + 9 = 12.", True),
        ("the card values are 3, 9. '9 + 3' makes 12.", True),
        ('the card values are 3, 9. "9 + 3" makes 12.', True),
        ("The cards 9, 3 make 12, so the next token is 3.", True),
        ("The cards' values are 9 and 3; '3 + 9' makes 12, and nothing's written yet.", True),
        ("The cards 9, 4 make 12, so the next token is 3.", False),
        ("The cards 9 make 12, so the next token is 9.", False),
        ("The cards 9, 3 make 12 as '3 * 9'.", False),
        ('The cards 9, 3 make 12 as "3 * 9".', False),
        ("The cards 9, 3 make 12 as '3 + 8 + 1'.", False),
        ("The cards 9, 3; the formula so far is '3'.", False),
        ("The cards 9, 3 don't make 12 as '3 * 9'.", False),
        ("The next token is 3.", False),
    ],
    # Cards 9 and 3, "3 +" written.
    ezpoints_3_plus: [
        (RATIONALE, True),
        ("Cards: 3 and 9. Written so far: '3 +'. 3 + 9 = 12, so 9 is next.", True),
        ('Cards: 3 and 9. Written so far: "3 +". 3 + 9 = 12, so 9 is next.', True),
        ("The formula so far is 3 + and my cards are 9, 3.", True),
        ("So far: 3+. Card values 9 and 3.", True),
        ("I'd say the cards' values are 9 and 3, and the formula so far is '3+'; that's it.", True),
        ("The cards 9, 4 make 12 as '3 + 9'; the formula so far is '3 +'.", False),
        ("The cards 9, 3 make 12 as '3 + 9'; the formula so far is '3 *'.", False),
        ('The cards 9, 3 make 12 as "3 + 9"; the formula so far is "3 *".', False),
        ("The cards 9, 3 make 12 as '3 + 9'; the formula is empty.", False),
        ("The cards 9, 3 make 12 as '3 + 9'; the formula so far is ''.", False),
        ("The cards 9, 3 make 12 as '3 + 9', so the next token is 9.", False),
        ("The formula so far is '3 +', so the next token is 9.", False),
        ("The cards 9, 3; the formula so far is '3 +'; 7 more to go.", False),
        ("The cards 9, 3; the formula so far is '3 +'; it's 7 more to go.", False),
    ],
    # Cards 9 and 3, "3 + 9" written.
    ezpoints_complete: [
        (RATIONALE, True),
        ("The formula so far is 3 + 9, which uses both cards and makes 12.", True),
        ("The formula '3 + 9' uses every card and equals 12, so I submit it.", True),
        ('The formula "3 + 9" uses every card and equals 12, so I submit it.', True),
        ("The formula '3 + 9 +' uses every card.", False),
        ("The formula '3 * 9' uses every card and equals 12.", False),
        ('The formula "3 * 9" uses every card and equals 12.', False),
    ],
    # Cards J, 2, 4, 3 and "( 10 - 4 )" written: no way to finish.
    points24_dead_end: [
        (RATIONALE, True),
        ("So far: (10-4). Cards J, 2, 4 and 3; 6 times 5 is too much.", False),
        ("So far: (10-4). Cards J, 2, 4 and 3; I cannot reach 24 any more.", True),
        ('My cards are 3, 4, 2 and 10 and I have written "(10 - 4)".', True),
        ("My cards are 3, 4, 2 and J, and I've written '(10 - 4)'; the J's 10 is used.", True),
        ("The cards K, 2, 4, 3 and the formula so far is '( 10 - 4 )'.", False),
        ("The cards 10, 2, 4, 3 and the formula so far is '( 10 - 4'.", False),
        ("The cards 10, 2, 4, 3 and the formula so far is '( 10 + 4 )'.", False),
        ("The cards 10, 2, 4, 3 and the formula so far is '( 10 - 4 )', so '(10 - 4) * 4' works.", False),
        ('The cards 10, 2, 4, 3 and the formula so far is "( 10 - 4 )", so "(10 - 4) * 4" works.', False),
    ],
    # Agent at (5, 2), goal at (3, 5), counted from 1; the shortest path takes 5 moves and starts right.
    gridworld_open: [
        (RATIONALE, True),
        ("Goal: 2 up, 3 to the right. Path: 5 moves.", True),
        ("I am at (5, 2); the goal is at row 3, column 5.", True),
        ("I am 3 cells left and 2 cells down of the goal, so I start with right.", True),
        ("(2, 3) is a wall; the goal is 3 squares right and 2 squares above.", True),
        ("The goal is 3 cells right and 1 cell up.", False),
        ("The goal is 3 cells right; the path takes 5 moves.", False),
        ("The goal is 3 cells left and 2 cells up.", False),
        ("I am at (4, 1) and the goal is at (2, 4).", False),
        ("I am at (5, 2) and the goal is at (3, 4).", False),
        ("The goal is 3 cells right and 2 cells up; the shortest path takes 4 moves.", False),
        ("The goal is 3 cells right and 2 cells up; the shortest path starts down.", False),
        ("The goal is 3 cells right and 2 cells up; there is a wall at (1, 1).", False),
        ("The goal is at (3, 5).", False),
        ("Go right.", False),
    ],
    # Agent (3, 1), goal (3, 3), a wall between: 2 cells right, but the path takes 4 moves, up or down first.
    gridworld_detour: [
        (RATIONALE, True),
        ("The goal is 2 cells right, behind a wall; the path takes 4 moves and starts down.", True),
        ("The goal is 2 cells right, so the path takes 2 moves.", False),
        ("The goal is 2 cells right; the first move is right.", False),
    ],
    # The ball is 8.2 cm right, 10.9 cm backward and 0.6 cm up of the gripper.
    reach_seed_2: [
        (RATIONALE, True),
        ("I need to move 11 cm backward and 8 cm right; the height is about the same.", True),
        ("The gripper is 8 cm left and 11 cm forward of the ball.", True),
        ("Gripper at (-16.3, 4.0, 15.0) cm: the ball is 8.5 cm to the right and 10.5 cm back.", True),
        ("THE BALL IS 8 CM RIGHT AND 11 CM BACKWARD OF THE GRIPPER; THE LARGEST GAP IS BACKWARD.", True),
        ("The ball is 8 cm left and 11 cm backward of the gripper.", False),
        ("The ball is 12 cm right and 11 cm backward of the gripper.", False),
        ("The ball is 8 cm right of the gripper.", False),
        ("The ball is 8 cm right and 11 cm backward of the gripper; the largest gap is right.", False),
        ("Gripper at (0.0, 4.0, 15.0) cm; the ball is 8 cm right and 11 cm backward.", False),
        ("The ball is 8 cm right and 11 cm backward, 30 cm away.", False),
        ("Move backward.", False),
    ],
    # The disk is 11.9 cm left and 5.1 cm backward of the box.
    push_seed_0: [
        (RATIONALE, True),
        ("The disk is 12 cm left and 5 cm backward of the box, so I will push the box left.", True),
        ("The box must go 12 cm left and 5 cm back.", True),
        ("The box is 12 cm right and 5 cm forward of the disk.", True),
        ("I must get behind the box to push it left.", True),
        ("I must get behind the box to push it right.", False),
        ("I lift the gripper to push it up.", False),
        ("The disk is 12 cm right and 5 cm backward of the box.", False),
        ("The disk is 12 cm left of the box.", False),
        ("I move backward.", False),
    ],
    colour_blue: [
        (RATIONALE, True),
        ("It is all BLUE.", True),
        ("The whole image is red.", False),
        ("Blue or green.", False),
    ],
}

CASES = [
    pytest.param(make_state, thought, expected, id=f"{make_state.__name__}-{index}")
    for make_state, table in TABLES.items()
    for index, (thought, expected) in enumerate(table)
]
CASES += [
    pytest.param(make_state, thought, False, id=f"{make_state.__name__}-nothing-{index}")
    for make_state in TABLES
    for index, thought in enumerate(EMPTY_THOUGHTS)
]


@pytest.mark.parametrize(("make_state", "thought", "expected"), CASES)
def test_check_thoughts(make_state: Callable[[], Any], thought: str, expected: bool) -> None:
    env = make_state()
    if thought == RATIONALE:
        thought = env.expert_rationale()
    assert env.check_thoughts(thought) is expected, thought


# ----------------------------------------------------------------------------------------------------------
# The expert's rationale is always true
# ----------------------------------------------------------------------------------------------------------

EXPERT_EPISODES = [
    ("vlmrl/Blackjack-v0", {}, 50),
    ("vlmrl/NumberLine-v0", {}, 50),
    ("vlmrl/NumberLine-v0", {"max_position": 30}, 50),
    ("vlmrl/EZPoints-v0", {}, 50),
    ("vlmrl/Points24-v0", {}, 50),
    ("vlmrl/GridWorld-v0", {}, 50),
    ("vlmrl/GridWorld-v0", {"size": 7, "n_walls": 12}, 50),
    ("vlmrl/Reach-v0", {"image_size": 16}, 20),
    ("vlmrl/Push-v0", {"image_size": 16}, 10),
    ("vlmrl/Colour-v0", {}, 50),
]


def _needs_no_escape(rationale: str) -> bool:
    """Whether ``rationale`` can stand in a JSON answer's thoughts as it is: a double quote, a backslash or a
    control character would need a backslash escape there, which constrained decoding never writes in the
    thoughts, so ``VLMPolicy.completions_for`` (SFT on expert answers) would reject the answer."""
    return '"' not in rationale and "\\" not in rationale and all(ord(character) >= 32 for character in rationale)


@pytest.mark.parametrize(("env_id", "kwargs", "episodes"), EXPERT_EPISODES, ids=lambda value: str(value))
def test_expert_rationale_passes_over_expert_episodes(env_id: str, kwargs: dict, episodes: int) -> None:
    env = gym.make(env_id, **kwargs)
    check = thought_checker(env)
    assert check is not None
    for seed in range(episodes):
        env.reset(seed=seed)
        terminated = truncated = False
        while not (terminated or truncated):
            rationale = env.unwrapped.expert_rationale()
            assert check(rationale), (seed, rationale)
            *_, terminated, truncated, _ = env.step(env.unwrapped.expert_action())
    env.close()


@pytest.mark.parametrize(
    "make_env",
    [
        lambda: EZPointsEnv(require_solvable=False),
        lambda: Points24Env(require_solvable=False),
        lambda: GridWorldEnv(size=6, n_walls=10),
        lambda: NumberLineEnv(max_position=8),
        BlackjackEnv,
    ],
    ids=["ezpoints-unsolvable", "points24-unsolvable", "gridworld-walls", "numberline-8", "blackjack"],
)
def test_expert_rationale_passes_after_random_moves(make_env: Callable[[], Any]) -> None:
    """States the expert never reaches (dead formulas, unsolvable deals, the goal itself) included."""
    env, rng = make_env(), np.random.default_rng(0)
    for seed in range(30):
        env.reset(seed=seed)
        for _ in range(30):
            assert env.check_thoughts(env.expert_rationale()), (seed, env.expert_rationale())
            assert _needs_no_escape(env.expert_rationale()), (seed, env.expert_rationale())
            *_, terminated, truncated, _ = env.step(int(rng.integers(env.action_space.n)))
            if terminated or truncated:
                assert env.check_thoughts(env.expert_rationale()), (seed, env.expert_rationale())
                assert _needs_no_escape(env.expert_rationale()), (seed, env.expert_rationale())
                break


@pytest.mark.parametrize("env_id", envs.VLMRL_ENV_IDS + tuple(envs.DEBUG_ENVS))
def test_expert_rationale_needs_no_json_escape(env_id: str) -> None:
    env = gym.make(env_id)
    for seed in range(30):
        env.reset(seed=seed)
        terminated = truncated = False
        while not (terminated or truncated):
            rationale = env.unwrapped.expert_rationale()
            assert _needs_no_escape(rationale), (seed, rationale)
            *_, terminated, truncated, _ = env.step(env.unwrapped.expert_action())
    env.close()


def test_a_rationale_about_another_state_fails() -> None:
    env = GridWorldEnv()
    env.reset(seed=2)
    other = env.expert_rationale()
    env.reset(seed=3)
    assert not env.check_thoughts(other)


@pytest.mark.parametrize("make_state", list(TABLES), ids=lambda make_state: make_state.__name__)
def test_any_text_gives_a_bool_and_never_raises(make_state: Callable[[], Any]) -> None:
    env = make_state()
    rng = np.random.default_rng(0)
    alphabet = list(string.printable) + [" 3", " cm", " cells", " right", " of the ", " dealer", " sum", '"', "(", ","]
    for _ in range(200):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(0, 80))))
        assert env.check_thoughts(text) in (True, False)


# ----------------------------------------------------------------------------------------------------------
# thought_checker
# ----------------------------------------------------------------------------------------------------------


def test_thought_checker_is_the_unwrapped_method() -> None:
    env = gym.make("vlmrl/GridWorld-v0")
    env.reset(seed=0)
    check = thought_checker(env)
    assert check is not None and check == env.unwrapped.check_thoughts
    assert check(env.unwrapped.expert_rationale())
    assert envs.thought_checker is thought_checker


def test_thought_checker_is_none_for_a_third_party_env() -> None:
    envs.register_language_env(
        "vlmrl-test/FrozenLake-v1",
        "FrozenLake-v1",
        LanguageSpec("Walk on the ice to the gift without falling into a hole.", ("left", "down", "right", "up")),
        is_slippery=False,
    )
    env = gym.make("vlmrl-test/FrozenLake-v1")
    env.reset(seed=0)
    assert thought_checker(env) is None
    env.close()


class _NoCheckerEnv(LanguageEnv):
    """The smallest LanguageEnv: it has an expert but no ``check_thoughts``."""

    language: ClassVar[LanguageSpec] = LanguageSpec("Say yes.", ("yes", "no"))

    def __init__(self) -> None:
        super().__init__()
        self.observation_space = observation_space(8, 8)
        self.action_space = spaces.Discrete(2)

    def _image(self) -> np.ndarray:
        return np.zeros((8, 8, 3), dtype=np.uint8)

    def _text(self) -> str:
        return ""

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        return self._observation(), {}

    def step(self, action: Any):
        return self._observation(), float(action == 0), True, False, {}

    def expert_action(self) -> int:
        return 0

    def expert_rationale(self) -> str:
        return "Yes is always right."


def test_thought_checker_is_none_for_a_language_env_without_one() -> None:
    env = _NoCheckerEnv()
    env.reset(seed=0)
    assert not hasattr(LanguageEnv, "check_thoughts")
    assert thought_checker(env) is None
