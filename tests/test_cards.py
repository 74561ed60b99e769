"""Rules, experts and the solver of the card-style environments: Blackjack, NumberLine, EZPoints, Points24."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from envs.blackjack import HIT, STAND, BlackjackEnv, basic_strategy, hand_value
from envs.numberline import MINUS, PLUS, NumberLineEnv
from envs.points import (
    EMPTY,
    EZPointsEnv,
    Points24Env,
    PointsEnv,
    _completion,
    complete_formula,
    evaluate,
    solve,
)


def _without_images(env):
    """Skip drawing in statistical tests: they check rules and experts, and drawing is most of a step."""
    blank = np.zeros((8, 8, 3), np.uint8)
    env._image = lambda: blank.copy()
    return env


# ----------------------------------------------------------------------------------------------------------
# Blackjack
# ----------------------------------------------------------------------------------------------------------


def _blackjack(player: list[int], dealer: list[int], deck: list[int] = ()) -> BlackjackEnv:
    """A hand with the given ranks; later draws come from ``deck`` (running out fails the test)."""
    env = BlackjackEnv(text_hint=True)
    env.reset(seed=0)
    env.player = [(rank, 0) for rank in player]
    env.dealer = [(rank, 1) for rank in dealer]
    cards = [(rank, 2) for rank in deck]
    env._draw_card = lambda: cards.pop(0)
    return env


def test_blackjack_hit_without_bust_continues() -> None:
    env = _blackjack([10, 2], [10, 7], deck=[5])
    _, reward, terminated, truncated, info = env.step(HIT)
    assert (reward, terminated, truncated, info["success"]) == (0.0, False, False, False)
    assert env.player_total() == (17, False)


def test_blackjack_bust_loses() -> None:
    env = _blackjack([10, 6], [10, 7], deck=[13])
    observation, reward, terminated, _, info = env.step(HIT)
    assert (reward, terminated, info["success"]) == (-1.0, True, False)
    assert "You lose" in observation["text"]
    with pytest.raises(RuntimeError, match="reset"):
        env.step(HIT)


@pytest.mark.parametrize(
    ("player", "dealer", "deck", "reward", "dealer_cards"),
    [
        ([10, 9], [10, 6], [5], -1.0, 3),  # dealer draws to 21
        ([10, 9], [10, 6], [12], 1.0, 3),  # dealer busts
        ([10, 9], [10, 7], [], 1.0, 2),  # dealer stands on 17
        ([10, 7], [1, 6], [], 0.0, 2),  # dealer stands on soft 17: a draw
        ([10, 7], [2, 3], [1, 1], 0.0, 4),  # 5 + A(11) = soft 16, + A = soft 17: stands, draw
        ([1, 10], [10, 10], [], 1.0, 2),  # 21 with an ace counted 11 (no natural bonus)
    ],
)
def test_blackjack_stand_plays_the_dealer(player, dealer, deck, reward, dealer_cards) -> None:
    env = _blackjack(player, dealer, deck)
    observation, got_reward, terminated, _, info = env.step(STAND)
    assert (got_reward, terminated, info["success"]) == (reward, True, reward > 0)
    assert len(env.dealer) == dealer_cards
    assert "dealer's cards" in observation["text"]


def test_blackjack_image_reveals_dealer_at_the_end() -> None:
    env = _blackjack([10, 9], [10, 7])
    before = env._image()
    after = env.step(STAND)[0]["image"]
    assert not np.array_equal(before, after)


def test_blackjack_default_text_hides_the_hand() -> None:
    env = BlackjackEnv()
    observation, _ = env.reset(seed=0)
    assert not any(character.isdigit() for character in observation["text"])


@pytest.mark.parametrize(
    ("hand", "total"),
    [([1, 6], (17, True)), ([1, 6, 10], (17, False)), ([1, 1], (12, True)), ([10, 10, 5], (25, False))],
)
def test_hand_value(hand, total) -> None:
    assert hand_value(hand) == total


@pytest.mark.parametrize(
    ("total", "soft", "dealer_up", "action"),
    [
        (11, False, 10, HIT),
        (12, False, 2, HIT),
        (12, False, 4, STAND),
        (12, False, 7, HIT),
        (13, False, 6, STAND),
        (16, False, 7, HIT),
        (16, False, 1, HIT),
        (17, False, 1, STAND),
        (17, True, 5, HIT),
        (18, True, 8, STAND),
        (18, True, 9, HIT),
        (18, True, 1, HIT),
        (19, True, 10, STAND),
    ],
)
def test_basic_strategy(total, soft, dealer_up, action) -> None:
    assert basic_strategy(total, soft, dealer_up) == action


def test_blackjack_expert_win_rate() -> None:
    # Basic strategy (hit/stand) wins about 43% of hands under these rules (200k simulated hands: 43.0%
    # win, 9.4% draw); 2000 seeded hands put it within about +-2.5 points of that.
    env = _without_images(BlackjackEnv())
    wins = 0
    for seed in range(2000):
        env.reset(seed=seed)
        while True:
            _, _, terminated, _, info = env.step(env.expert_action())
            if terminated:
                break
        wins += info["success"]
    assert 0.38 <= wins / 2000 <= 0.48


# ----------------------------------------------------------------------------------------------------------
# NumberLine
# ----------------------------------------------------------------------------------------------------------


def _numberline(target: int, position: int, max_position: int = 5) -> NumberLineEnv:
    env = NumberLineEnv(max_position=max_position)
    env.reset(seed=0)
    env.target, env.position = target, position
    return env


@pytest.mark.parametrize(
    ("target", "position", "action", "reward", "new_position"),
    [
        (3, 1, PLUS, 0.0, 2),  # closer
        (3, 1, MINUS, -1.0, 0),  # away
        (3, 0, MINUS, -1.0, 0),  # bumps the lower end
        (2, 5, PLUS, -1.0, 5),  # bumps the upper end
        (3, 2, PLUS, 1.0, 3),  # reaches the target
    ],
)
def test_numberline_rewards(target, position, action, reward, new_position) -> None:
    env = _numberline(target, position)
    _, got_reward, terminated, truncated, info = env.step(action)
    assert (got_reward, env.position, truncated) == (reward, new_position, False)
    assert terminated is info["success"] is (new_position == target)


def test_numberline_truncates_after_twice_the_line() -> None:
    env = _numberline(target=5, position=0, max_position=4)
    for step in range(1, 9):
        _, reward, terminated, truncated, info = env.step(MINUS)
        assert reward == -1.0 and not terminated and not info["success"]
        assert truncated is (step == 8)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(PLUS)


def test_numberline_start_and_target_are_distinct_and_cover_the_line() -> None:
    env = _without_images(NumberLineEnv(max_position=3))
    pairs = set()
    for seed in range(300):
        env.reset(seed=seed)
        assert env.target != env.position
        pairs.add((env.target, env.position))
    assert len(pairs) == 4 * 3


def test_numberline_text_hint() -> None:
    plain, _ = NumberLineEnv().reset(seed=0)
    hinted_env = NumberLineEnv(text_hint=True)
    hinted, _ = hinted_env.reset(seed=0)
    assert "Target" not in plain["text"]
    assert f"Target: {hinted_env.target}. Current: {hinted_env.position}." in hinted["text"]


def test_numberline_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="max_position"):
        NumberLineEnv(max_position=0)
    with pytest.raises(ValueError, match="image_size"):
        NumberLineEnv(image_size=16)


def test_numberline_expert_always_succeeds() -> None:
    env = _without_images(NumberLineEnv(max_position=7))
    for seed in range(200):
        env.reset(seed=seed)
        distance = abs(env.target - env.position)
        for _ in range(distance):
            _, reward, terminated, truncated, info = env.step(env.expert_action())
        assert terminated and info["success"] and reward == 1.0


# ----------------------------------------------------------------------------------------------------------
# EZPoints and Points24
# ----------------------------------------------------------------------------------------------------------


def _points(env_class: type[PointsEnv], ranks: list[int], **kwargs) -> PointsEnv:
    env = env_class(**kwargs)
    env.reset(seed=0)
    env.cards = [(rank, index % 4) for index, rank in enumerate(ranks)]
    env.used = [False] * len(ranks)
    return env


def _play(env: PointsEnv, tokens: str) -> list[tuple[float, bool]]:
    """Step the space-separated ``tokens``; returns (reward, terminated) per step."""
    results = []
    for token in tokens.split():
        _, reward, terminated, truncated, _ = env.step(env.language.action_names.index(token))
        assert not truncated
        results.append((reward, terminated))
    return results


def test_points_action_names() -> None:
    assert EZPointsEnv.language.action_names == (*map(str, range(1, 11)), "+", "*", "=")
    assert Points24Env.language.action_names == (*map(str, range(1, 11)), "+", "-", "*", "/", "(", ")", "=")


def test_ezpoints_legality_and_success() -> None:
    env = _points(EZPointsEnv, [3, 4])
    # "+" first, then "4" right after "3", then "*" twice, then reusing the 3: each illegal, each -1.
    results = _play(env, "+ 3 4 * * 3 4")
    assert results == [
        (-1.0, False),
        (0.0, False),
        (-1.0, False),
        (0.0, False),
        (-1.0, False),
        (-1.0, False),
        (0.0, False),
    ]
    assert env.formula == ["3", "*", "4"]
    observation, reward, terminated, _, info = env.step(env.language.action_names.index("="))
    assert (reward, terminated, info["success"]) == (10.0, True, True)
    assert observation["text"].startswith('Formula so far: "3 * 4".')


def test_ezpoints_illegal_action_leaves_the_formula_and_says_so() -> None:
    env = _points(EZPointsEnv, [3, 4])
    _play(env, "3")
    image = env._image()
    observation, *_ = env.step(env.language.action_names.index("4"))
    assert env.formula == ["3"]
    assert np.array_equal(observation["image"], image)
    assert '"4" was not legal' in observation["text"]


def test_points_ten_is_not_one() -> None:
    env = _points(EZPointsEnv, [12, 2])  # Q counts 10
    assert _play(env, "1") == [(-1.0, False)]  # no ace
    assert _play(env, "10 + 2 =") == [(0.0, False), (0.0, False), (0.0, False), (10.0, True)]
    env = _points(EZPointsEnv, [1, 10])
    assert _play(env, "1 + 10 =")[-1] == (-1.0, True)  # 11, not 12


@pytest.mark.parametrize(
    "tokens",
    ["3 + 4 =", "3 * =", "=", "3 ="],  # wrong value, incomplete, empty, a card unused
)
def test_ezpoints_wrong_submission_ends_with_minus_one(tokens: str) -> None:
    env = _points(EZPointsEnv, [3, 4])
    results = _play(env, tokens)
    assert results[-1] == (-1.0, True)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(0)


def test_points24_parenthesis_rules() -> None:
    env = _points(Points24Env, [8, 3, 8, 3])
    assert _play(env, ")") == [(-1.0, False)]  # nothing to close
    assert _play(env, "( (") == [(0.0, False), (0.0, False)]
    assert _play(env, "+ )") == [(-1.0, False), (-1.0, False)]  # operator or ")" right after "("
    assert _play(env, "3 ( )") == [(0.0, False), (-1.0, False), (0.0, False)]  # "(" only where a number goes
    assert _play(env, ") ) 3") == [(0.0, False), (-1.0, False), (-1.0, False)]  # one "(" left; no number after ")"
    assert env.formula == ["(", "(", "3", ")", ")"]


def test_points24_exact_division_solves() -> None:
    env = _points(Points24Env, [8, 3, 8, 3])
    results = _play(env, "8 / ( 3 - 8 / 3 ) =")
    assert results[-1] == (10.0, True) and all(reward == 0.0 for reward, _ in results[:-1])


@pytest.mark.parametrize(
    "tokens",
    [
        "3 / ( 2 - 2 ) * 3 =",  # division by zero
        "( 3 + 3 ) * 2 + 2 =",  # 14
        "( 3 + 3 ) * ( 2 + 2 =",  # unbalanced
        "( 3 + 3 ) * 2 * 2 ",  # 24, ends without "=": not yet solved
    ],
)
def test_points24_wrong_formulas(tokens: str) -> None:
    env = _points(Points24Env, [3, 3, 2, 2])
    results = _play(env, tokens)
    assert all(reward == 0.0 for reward, _ in results[:-1])
    if tokens.endswith("="):
        assert results[-1] == (-1.0, True)
    else:
        assert env.is_solved() and results[-1] == (0.0, False)


def test_points_text_shows_the_formula_and_hides_the_cards() -> None:
    env = EZPointsEnv()
    observation, _ = env.reset(seed=0)
    assert observation["text"] == "Formula so far: (empty)."
    hinted = EZPointsEnv(text_hint=True)
    observation, _ = hinted.reset(seed=0)
    assert f"Card values: {', '.join(map(str, hinted.values))}" in observation["text"]


@pytest.mark.parametrize("env_class", [EZPointsEnv, Points24Env])
def test_points_deal_is_seeded_and_solvable(env_class) -> None:
    first, second = env_class(), env_class()
    for seed in range(20):
        first.reset(seed=seed)
        second.reset(seed=seed)
        assert first.cards == second.cards
        assert len(set(first.cards)) == len(first.cards)  # one deck, no repeats
        assert solve(first.values, first.target, first.operators, first.parentheses) is not None


@pytest.mark.parametrize("env_class", [EZPointsEnv, Points24Env])
def test_points_expert_always_succeeds(env_class) -> None:
    env = _without_images(env_class())
    for seed in range(200):
        env.reset(seed=seed)
        for _ in range(env.num_cards * 4 + 2):
            _, reward, terminated, _, info = env.step(env.expert_action())
            if terminated:
                break
        assert info["success"] and reward == 10.0, (seed, env.values, env.formula)


def test_points_expert_gives_up_on_a_dead_formula() -> None:
    env = _points(EZPointsEnv, [3, 4])
    _play(env, "3 +")
    assert env.language.action_names[env.expert_action()] == "="
    assert "No way to finish" in env.expert_rationale()
    env = Points24Env(require_solvable=False)
    env.reset(seed=0)
    env.cards = [(1, 0), (1, 1), (1, 2), (1, 3)]
    assert env.language.action_names[env.expert_action()] == "="
    assert "cannot make 24" in env.expert_rationale()


def test_points_expert_rationale_names_the_next_token() -> None:
    env = _points(Points24Env, [8, 3, 8, 3])
    _play(env, "8 /")
    assert env.language.action_names[env.expert_action()] == "("
    assert env.expert_rationale().endswith("'8 /', so the next token is (.")


# ----------------------------------------------------------------------------------------------------------
# Solver
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cards", "expected"),
    [
        ([3, 3, 8, 8], "8 / ( 3 - 8 / 3 )"),
        ([1, 5, 5, 5], "5 * ( 5 - 1 / 5 )"),
        ([4, 4, 10, 10], "( 10 * 10 - 4 ) / 4"),
        ([1, 2, 3, 4], None),  # any solution; checked below
    ],
)
def test_solver_known_hands(cards, expected) -> None:
    solution = solve(cards)
    assert solution is not None
    assert evaluate(solution) == 24
    assert sorted(int(token) for token in solution if token.isdigit()) == sorted(cards)
    if expected is not None:
        assert evaluate(expected.split()) == 24
        assert " ".join(solution) == expected


@pytest.mark.parametrize("cards", [[1, 1, 1, 1], [1, 1, 1, 2], [10, 10, 10, 10], [1, 7, 7, 7]])
def test_solver_unsolvable_hands(cards) -> None:
    assert solve(cards) is None


def test_solver_respects_operators_and_parentheses() -> None:
    assert solve([3, 4], target=12, operators=("+", "*"), parentheses=False) == ["3", "*", "4"]
    assert solve([3, 4], target=1, operators=("+", "*"), parentheses=False) is None
    assert solve([3, 4], target=-1, operators=("-",), parentheses=False) == ["3", "-", "4"]
    flat = solve([1, 2, 3, 4], parentheses=False)
    assert flat is not None and "(" not in flat and evaluate(flat) == 24
    with pytest.raises(ValueError, match="Unknown operators"):
        solve([3, 4], operators=("^",))


def test_complete_formula_follows_any_legal_prefix() -> None:
    assert complete_formula([3, 3, 8, 8], ["8", "/"]) == ["8", "/", "(", "3", "-", "8", "/", "3", ")"]
    assert complete_formula([3, 3, 8, 8], ["3", "+"]) is None
    solution = complete_formula([1, 2, 3, 4], ["(", "("])  # not how solve() writes it
    assert solution[:2] == ["(", "("] and evaluate(solution) == 24
    assert complete_formula([3, 4], ["3", "*", "4"], target=12, operators=("+", "*"), parentheses=False) == [
        "3",
        "*",
        "4",
    ]
    with pytest.raises(ValueError, match="not a legal prefix"):
        complete_formula([3, 4], ["5"])
    with pytest.raises(ValueError, match="not a legal prefix"):
        complete_formula([3, 4], ["3", "4"])


def _exhaustive_solvable(cards: list[int]) -> bool:
    """The token-by-token search from the empty formula: independent of the tree search in solve()."""
    return _completion(EMPTY, tuple(sorted(cards)), 0, 24, ("+", "-", "*", "/"), True) is not None


def test_solver_agrees_with_the_exhaustive_search_on_a_sample() -> None:
    hands = random.Random(0).sample(list(itertools.combinations_with_replacement(range(1, 11), 4)), 4)
    for hand in hands:
        assert (solve(list(hand)) is not None) == _exhaustive_solvable(list(hand)), hand


@pytest.mark.slow
def test_solver_every_hand() -> None:
    # 566 of the 715 hands of values 1..10 make 24; both searches must agree on each (several minutes).
    solvable = 0
    for hand in itertools.combinations_with_replacement(range(1, 11), 4):
        solution = solve(list(hand))
        assert (solution is not None) == _exhaustive_solvable(list(hand)), hand
        if solution is not None:
            solvable += 1
            assert evaluate(solution) == 24
            assert sorted(int(token) for token in solution if token.isdigit()) == list(hand)
    assert solvable == 566


def test_points_image_shows_cards_and_formula() -> None:
    first = _points(Points24Env, [10, 4, 3, 1])
    second = _points(Points24Env, [1, 4, 3, 10])
    assert not np.array_equal(first._image(), second._image())
    before = first._image()
    _play(first, "10")
    assert not np.array_equal(first._image(), before)
