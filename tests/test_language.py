"""The language interface: the parser table, prompts, specs, and third-party registration."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

import envs
from envs.language import (
    LanguageSpec,
    answer_complete,
    build_prompt,
    format_answer,
    parse_action,
)

CARDS = LanguageSpec("Make 24.", tuple(str(n) for n in range(1, 11)) + ("+", "-", "*", "/", "(", ")", "="))
MOVES = LanguageSpec("Reach the goal.", ("move left", "move right", "move up"))
BLACKJACK = LanguageSpec("Win the hand.", ("stand", "hit"))


def act(text, spec=BLACKJACK, style="cot"):
    return parse_action(text, spec, style)


# (answer, spec, style, expected action index or None, a fragment of the reason when invalid)
PARSER_TABLE = [
    ('{"thoughts": "12 vs 10", "action": "hit"}', BLACKJACK, "cot", 1, None),
    ('  {"thoughts": "x",   "action":   " HIT "}  ', BLACKJACK, "cot", 1, None),
    ('Sure! Here you go: {"thoughts": "t", "action": "stand"} Good luck.', BLACKJACK, "cot", 0, None),
    ('{"thoughts": "t", "action": "10"}', CARDS, "cot", 9, None),
    ('{"thoughts": "t", "action": "1"}', CARDS, "cot", 0, None),
    ('{"thoughts": "t", "action": 10}', CARDS, "cot", 9, None),
    ('{"thoughts": "t", "action": "Move   LEFT"}', MOVES, "cot", 0, None),
    ('{"thoughts": "I could \\"action\\": \\"hit\\"", "action": "stand"}', BLACKJACK, "cot", 0, None),
    ('{"thoughts": "日本語で考える 🤔", "action": "hit"}', BLACKJACK, "cot", 1, None),
    ('{"thoughts": "' + "long " * 2000 + '", "action": "hit"}', BLACKJACK, "cot", 1, None),
    ("", BLACKJACK, "cot", None, "empty answer"),
    (None, BLACKJACK, "cot", None, "empty answer"),
    ("   \n ", BLACKJACK, "cot", None, "empty answer"),
    ("I think I should hit.", BLACKJACK, "cot", None, "no JSON object"),
    ('{"thoughts": "t", "action": "hit"', BLACKJACK, "cot", None, "no complete JSON object"),
    ('{"thoughts": "t", action: hit}', BLACKJACK, "cot", None, "no complete JSON object"),
    ('{"thoughts": "t"}', BLACKJACK, "cot", None, "no complete JSON object"),
    ('{"action": "hit"} {"action": "stand"}', BLACKJACK, "cot", None, "2 actions in one answer"),
    ('{"action": "hit"} {"action": "hit"}', BLACKJACK, "cot", None, "2 actions in one answer"),
    ('{"thoughts": "t", "action": "fold"}', BLACKJACK, "cot", None, 'action "fold" is not one of'),
    ('{"thoughts": "t", "action": "hit me"}', BLACKJACK, "cot", None, "is not one of"),
    ('{"thoughts": "t", "action": "11"}', CARDS, "cot", None, 'action "11" is not one of'),
    ('{"thoughts": "t", "action": "1 0"}', CARDS, "cot", None, "is not one of"),
    ('{"thoughts": "t", "action": ["hit"]}', BLACKJACK, "cot", None, "must be a string"),
    ('{"thoughts": "t", "action": true}', BLACKJACK, "cot", None, "must be a string"),
    ('{"thoughts": "t", "action": "' + "x" * 5000 + '"}', BLACKJACK, "cot", None, "..."),
    ("hit", BLACKJACK, "action", 1, None),
    ("  Stand \n", BLACKJACK, "action", 0, None),
    ('{"action": "hit"}', BLACKJACK, "action", 1, None),
    ("10", CARDS, "action", 9, None),
    ("hit stand", BLACKJACK, "action", None, "is not one of"),
    ("hit", BLACKJACK, "cot", None, "no JSON object"),
]


@pytest.mark.parametrize(("text", "spec", "style", "expected", "reason"), PARSER_TABLE)
def test_parser_table(text, spec, style, expected, reason):
    parsed = parse_action(text, spec, style)
    assert parsed.action == expected
    if expected is None:
        assert parsed.reason and reason in parsed.reason
        assert len(parsed.reason) < 200  # long answers are shortened in the reason
    else:
        assert parsed.reason is None


def test_action_span_points_at_the_action_text():
    text = 'Here: {"thoughts": "the action is hit?", "action": "hit"} ok'
    parsed = act(text)
    start, end = parsed.action_span
    assert text[start:end] == "hit" and start > text.index('"action"')
    bare = "  stand\n"
    start, end = act(bare, style="action").action_span
    assert bare[start:end] == "stand"


def test_parser_never_raises_on_odd_input():
    rng = np.random.default_rng(0)
    alphabet = list('{}[]":, actionhitstand\\\n\t日🤔0123456789')
    for _ in range(300):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(0, 60))))
        for style in ("cot", "action"):
            parsed = parse_action(text, BLACKJACK, style)
            assert parsed.valid == (parsed.reason is None)


def test_format_answer_round_trips_through_the_parser():
    for index, name in enumerate(CARDS.action_names):
        for style in ("cot", "action"):
            assert parse_action(format_answer(name, "because", style), CARDS, style).action == index


def test_prompt_names_every_action_and_the_format():
    prompt = build_prompt(MOVES, "Step 2 of 50.", "cot")
    assert all(f'"{name}"' in prompt for name in MOVES.action_names)
    assert '"thoughts"' in prompt and "Step 2 of 50." in prompt
    assert '"thoughts"' not in build_prompt(MOVES, "", "action")
    with pytest.raises(ValueError, match="Unknown prompt style"):
        build_prompt(MOVES, "", "poetry")


def test_answer_complete_marks_where_generation_can_stop():
    assert not answer_complete('{"thoughts": "a", "action": "hi', "cot")
    assert answer_complete('{"thoughts": "a", "action": "hit"}', "cot")
    assert not answer_complete('{"thoughts": "a"}', "cot")
    assert answer_complete("hit\n", "action") and not answer_complete("\n", "action")


@pytest.mark.parametrize(
    ("names", "message"),
    [
        ((), "action_names is empty"),
        (("Hit", "hit "), "same after normalisation"),
        (("a", " "), "blank"),
        (('say "x"',), "quote"),
    ],
)
def test_bad_specs_are_rejected(names, message):
    with pytest.raises(ValueError, match=message):
        LanguageSpec("Do it.", names)


def test_every_vlmrl_env_has_a_spec_matching_its_action_space():
    for env_id in envs.VLMRL_ENV_IDS:
        env = gym.make(env_id)
        assert env.action_space.n == len(envs.get_language(env_id).action_names)
        env.close()
    with pytest.raises(KeyError, match="No language spec"):
        envs.get_language("vlmrl/Unknown-v0")


# --- third-party environments --------------------------------------------------------------------------------


def test_frozenlake_joins_in_a_few_lines():
    envs.register_language_env(
        "vlmrl-test/FrozenLake-v1",
        "FrozenLake-v1",
        LanguageSpec("Walk on the ice to the gift without falling into a hole.", ("left", "down", "right", "up")),
        describe=lambda state: f"You are on tile {state}.",
        is_slippery=False,
    )
    env = gym.make("vlmrl-test/FrozenLake-v1")
    observation, _ = env.reset(seed=0)
    assert observation["image"].dtype == np.uint8 and observation["image"].ndim == 3
    assert env.observation_space.contains(observation)
    assert observation["text"] == "You are on tile 0."
    spec = envs.get_language("vlmrl-test/FrozenLake-v1")
    observation, *_ = env.step(spec.action_index("right"))
    assert observation["text"] == "You are on tile 1."


def test_frozenlake_action_count_mismatch_is_rejected():
    with pytest.raises(ValueError, match="names 2 actions"):
        envs.register_language_env("vlmrl-test/Bad-v1", "FrozenLake-v1", LanguageSpec("x", ("a", "b")))


class _FloatFrames(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}
    observation_space = gym.spaces.Discrete(1)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, render_mode="rgb_array"):
        self.render_mode = render_mode

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return 0, {}

    def step(self, action):
        return 0, 0.0, True, False, {}

    def render(self):
        return np.zeros((8, 8, 3), dtype=np.float32)


def test_a_renderer_that_is_not_uint8_rgb_fails_naming_the_env():
    gym.register("vlmrl-test/FloatFrames-v0", entry_point=_FloatFrames)
    envs.register_language_env(
        "vlmrl-test/FloatFramesText-v0", "vlmrl-test/FloatFrames-v0", LanguageSpec("x", ("a", "b"))
    )
    with pytest.raises(ValueError, match=r"vlmrl-test/FloatFrames-v0: render\(\) must return a uint8 array"):
        gym.make("vlmrl-test/FloatFramesText-v0")
