"""Tests of the LVLM policy (agents/policy.py, agents/decoding.py): every family, offline, on tiny presets.

Observations are synthetic ``{"image", "text"}`` dicts and specs are built here, except where a test is
about the environments' own action sets or answers (token weights for every env's grammar, demonstrations).
Each preset is loaded once per module (``policy``); tests that change weights load their own copy
(``fresh``), which takes a fraction of a second for a tiny preset.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs
from agents.models import PRESETS
from agents.policy import Completion, PolicyConfig, VLMPolicy, load_policy
from envs.language import COT_ANSWER_PREFIX, LanguageSpec, answer_complete, format_answer, parse_action

ALL_ENV_IDS = [*envs.VLMRL_ENV_IDS, "vlmrl/Colour-v0"]
FAMILY_PRESETS = ["tiny", "tiny-llava-next", "tiny-qwen2vl", "tiny-qwen2.5vl", "tiny-idefics3", "tiny-smolvlm"]
VISION_NAME_PARTS = ("vision", "visual", "multi_modal_projector", "connector", "merger")

BLACKJACK = LanguageSpec("Win the hand of blackjack.", ("stand", "hit"))
# EZPoints-like: digits where one legal name is a prefix of another ("1" / "10"), and operators.
POINTS = LanguageSpec("Write a formula that equals 12.", (*(str(i) for i in range(1, 11)), "+", "*", "="))
MOVES = LanguageSpec("Reach the flag.", ("move left", "move right", "move up", "move down"))
# Step texts of different lengths, so prompts in one batch are padded differently.
STEP_TEXTS = ["Your sum is 7.", "", "Your sum is 15 and the dealer shows a 10; you hold an ace and a four."]

# Unconstrained answers are garbage from an untrained model: 32 tokens are plenty to show it. A constrained
# chain-of-thought answer needs room for the forced prefix and the longest legal ending.
UNCONSTRAINED_TOKENS = 32
CONSTRAINED_TOKENS = 48


def test_every_family_has_a_preset():
    assert {PRESETS[name].family for name in FAMILY_PRESETS} == {
        "llava",
        "llava_next",
        "qwen2_vl",
        "qwen2_5_vl",
        "idefics3",
        "smolvlm",
    }


def test_the_small_preset_sees_the_full_128_px_frame_and_acts(make_observations):
    # tiny resizes a 128 px frame to 64 px (16 image tokens); small keeps it (8 x 8 patches of 16 px).
    small = fresh("small", constrained=True, max_new_tokens=CONSTRAINED_TOKENS)
    tiny = fresh("tiny")
    assert small.processor.image_processor.crop_size == {"height": 128, "width": 128}
    assert small.model.config.image_seq_length == 64 == 4 * tiny.model.config.image_seq_length
    assert sum(p.numel() for p in small.model.parameters()) > 4 * sum(p.numel() for p in tiny.model.parameters())
    completions = act(small, make_observations(STEP_TEXTS[:2], size=128), BLACKJACK, seed=0)
    assert [c.action in (0, 1) for c in completions] == [True, True]  # constrained: always a legal move


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def policy():
    """``policy(preset, **options)``: a policy loaded once per module for each (preset, options)."""
    cache: dict[tuple, VLMPolicy] = {}

    def get(preset: str, **options) -> VLMPolicy:
        key = (preset, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = load_policy(preset, device="cpu", **options)
        return cache[key]

    return get


def fresh(preset: str, **options) -> VLMPolicy:
    """A policy of its own, for tests that change its weights."""
    return load_policy(preset, device="cpu", **options)


@torch.no_grad()
def perturb(policy: VLMPolicy, seed: int = 1, scale: float = 0.05) -> None:
    """Add noise to every trainable weight (LoRA A and B, value head), as a few updates would."""
    generator = torch.Generator().manual_seed(seed)
    for parameter in policy.parameters():
        if parameter.requires_grad:
            noise = torch.randn(parameter.shape, generator=generator) * scale
            parameter.add_(noise.to(parameter.device, parameter.dtype))


def act(policy: VLMPolicy, observations, spec: LanguageSpec, seed: int = 0) -> list[Completion]:
    torch.manual_seed(seed)
    return policy.act(observations, spec)


def assert_completions_equal(first: list[Completion], second: list[Completion]) -> None:
    assert [c.text for c in first] == [c.text for c in second]
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a.response_ids, b.response_ids)
        torch.testing.assert_close(a.token_logprobs, b.token_logprobs, rtol=0, atol=1e-5)
    # Same weights and inputs; only float rounding (~1e-6, the kernels' memory layout) may differ.
    torch.testing.assert_close(
        torch.tensor([c.logprob for c in first]), torch.tensor([c.logprob for c in second]), rtol=0, atol=1e-5
    )
    torch.testing.assert_close(
        torch.tensor([c.value for c in first]), torch.tensor([c.value for c in second]), rtol=0, atol=1e-6
    )


def assert_act_matches_evaluate(policy: VLMPolicy, completions: list[Completion]) -> None:
    with torch.no_grad():
        evaluation = policy.evaluate(completions)
    sampled = torch.tensor([c.logprob for c in completions])
    torch.testing.assert_close(evaluation.logprob.cpu(), sampled, rtol=0, atol=1e-4)
    for row, completion in enumerate(completions):
        length = len(completion.response_ids)
        assert int(evaluation.token_mask[row].sum()) == length
        torch.testing.assert_close(
            evaluation.token_logprobs[row, :length].cpu(), completion.token_logprobs, rtol=0, atol=1e-4
        )
    torch.testing.assert_close(evaluation.value.cpu(), torch.tensor([c.value for c in completions]), rtol=0, atol=1e-5)
    torch.testing.assert_close(
        evaluation.entropy.cpu(), torch.tensor([c.entropy for c in completions]), rtol=0, atol=1e-4
    )


def hand_made_completion(policy: VLMPolicy, answer: str, spec: LanguageSpec, image: np.ndarray) -> Completion:
    """A completion built from a written answer, as if the model had generated it."""
    ids = torch.tensor(policy.tokenizer.encode(answer, add_special_tokens=False))
    parsed = parse_action(answer, spec, policy.config.prompt_style)
    return Completion(
        prompt=policy.prompt_text(spec, "Your sum is 10."),
        image=image,
        action_names=spec.action_names,
        response_ids=ids,
        token_weights=policy.token_weights(ids, parsed.action_span),
        constraints=None,
        text=answer,
        action=parsed.action,
        reason=parsed.reason,
        logprob=0.0,
        token_logprobs=torch.zeros(len(ids)),
        entropy=0.0,
        value=0.0,
    )


# ----------------------------------------------------------------------------------------------------------
# 1. Loading and save/load round trips
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("perturbed", [False, True], ids=["initial", "perturbed"])
@pytest.mark.parametrize("preset", FAMILY_PRESETS)
def test_save_load_round_trip(preset, perturbed, tmp_path, make_observations):
    original = fresh(preset, max_new_tokens=UNCONSTRAINED_TOKENS, init_seed=3)
    assert original.family.name == PRESETS[preset].family
    if perturbed:
        perturb(original)
    observations = make_observations(STEP_TEXTS)
    before = act(original, observations, BLACKJACK, seed=7)

    original.save(tmp_path / "policy")
    restored = VLMPolicy.load(tmp_path / "policy")

    assert restored.config == original.config
    assert restored.family.name == original.family.name
    for (name, a), (_, b) in zip(original.state_dict().items(), restored.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert_completions_equal(before, act(restored, observations, BLACKJACK, seed=7))
    if perturbed:  # the round trip carried the change: a fresh policy answers differently
        untouched = act(fresh(preset, max_new_tokens=UNCONSTRAINED_TOKENS, init_seed=3), observations, BLACKJACK, 7)
        assert [c.logprob for c in untouched] != pytest.approx([c.logprob for c in before], abs=1e-3)
        assert [c.value for c in untouched] != pytest.approx([c.value for c in before], abs=1e-3)


def test_save_load_round_trip_full_fine_tuning(tmp_path, make_observations):
    original = fresh("tiny", lora_rank=0, max_new_tokens=UNCONSTRAINED_TOKENS)
    perturb(original, scale=0.01)
    observations = make_observations(STEP_TEXTS)
    before = act(original, observations, BLACKJACK)
    original.save(tmp_path / "policy")
    saved = json.loads((tmp_path / "policy" / "policy.json").read_text())
    assert saved["config"]["lora_rank"] == 0
    restored = VLMPolicy.load(tmp_path / "policy")
    assert_completions_equal(before, act(restored, observations, BLACKJACK))


def test_a_lora_policy_loaded_for_full_fine_tuning_keeps_its_adapter_merged(tmp_path, make_observations):
    # lora_rank=0 over a LoRA-trained directory (a reward model or PPO from a LoRA SFT run) must start from
    # what that run learned: the adapter folded into the weights, not dropped.
    original = fresh("tiny", max_new_tokens=UNCONSTRAINED_TOKENS, init_seed=3)
    perturb(original, scale=0.2)
    observations = make_observations(STEP_TEXTS)
    before = act(original, observations, BLACKJACK, seed=7)
    original.save(tmp_path / "policy")
    merged = VLMPolicy.load(tmp_path / "policy", lora_rank=0)
    assert not any("lora_" in name for name, _ in merged.model.named_parameters())
    after = act(merged, observations, BLACKJACK, seed=7)
    assert [c.text for c in after] == [c.text for c in before]
    assert [c.logprob for c in after] == pytest.approx([c.logprob for c in before], abs=1e-4)
    untouched = act(fresh("tiny", lora_rank=0, max_new_tokens=UNCONSTRAINED_TOKENS, init_seed=3), observations,
                    BLACKJACK, seed=7)  # fmt: skip
    assert [c.logprob for c in untouched] != pytest.approx([c.logprob for c in before], abs=1e-3)


def test_load_overrides_saved_options(tmp_path):
    fresh("tiny", temperature=0.7).save(tmp_path / "policy")
    restored = VLMPolicy.load(tmp_path / "policy", temperature=1.0, prompt_style="action")
    assert (restored.config.temperature, restored.config.prompt_style) == (1.0, "action")


def test_initialisation_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    same = [fresh("tiny", init_seed=5).state_dict() for _ in range(2)]
    assert torch.equal(torch.rand(3), expected)
    other = fresh("tiny", init_seed=6).state_dict()
    for name in same[0]:  # LoRA A and the value head included
        assert torch.equal(same[0][name], same[1][name]), name
    assert not torch.equal(same[0]["value_head.net.0.weight"], other["value_head.net.0.weight"])
    lora_a = next(name for name in same[0] if "lora_A" in name)
    assert not torch.equal(same[0][lora_a], other[lora_a])


# ----------------------------------------------------------------------------------------------------------
# 2. act and evaluate agree
# ----------------------------------------------------------------------------------------------------------

AGREEMENT_CASES = [(preset, "cot", constrained) for preset in FAMILY_PRESETS for constrained in (False, True)] + [
    ("tiny", "action", False),
    ("tiny", "action", True),
]


@pytest.mark.parametrize(("preset", "style", "constrained"), AGREEMENT_CASES)
def test_act_and_evaluate_agree(policy, preset, style, constrained, make_observations):
    tokens = CONSTRAINED_TOKENS if constrained else UNCONSTRAINED_TOKENS
    agent = policy(preset, prompt_style=style, constrained=constrained, max_new_tokens=tokens)
    # The same weights with a smaller budget: an untrained model rarely ends an answer by itself, so this
    # is how the batch gets answers of different lengths (unconstrained answers run to the budget).
    short = policy(preset, prompt_style=style, constrained=constrained, max_new_tokens=tokens - 12)
    completions = act(agent, make_observations(STEP_TEXTS), BLACKJACK) + act(
        short, make_observations(STEP_TEXTS[:2], seed=1), BLACKJACK, seed=1
    )
    assert len({len(c.prompt) for c in completions}) == len(STEP_TEXTS)
    if style == "cot":  # the batch really is ragged: answers of different lengths are padded
        assert len({len(c.response_ids) for c in completions}) > 1
    if constrained:
        assert all(c.valid for c in completions), [c.text for c in completions]
        assert all(c.constraints is not None and len(c.constraints) == len(c.response_ids) for c in completions)
    else:
        assert all(c.constraints is None for c in completions)
    assert_act_matches_evaluate(agent, completions)


def test_evaluate_is_independent_of_batch_composition(policy, make_observations):
    agent = policy("tiny", max_new_tokens=UNCONSTRAINED_TOKENS)
    completions = act(agent, make_observations(STEP_TEXTS), BLACKJACK)
    with torch.no_grad():
        together = agent.evaluate(completions).logprob
        alone = torch.cat([agent.evaluate([c]).logprob for c in completions])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-4)


def test_values_without_generating_equal_act_values(policy, make_observations):
    agent = policy("tiny", max_new_tokens=UNCONSTRAINED_TOKENS)
    observations = make_observations(STEP_TEXTS)
    completions = act(agent, observations, BLACKJACK)
    torch.testing.assert_close(
        agent.values(observations, BLACKJACK), torch.tensor([c.value for c in completions]), rtol=0, atol=1e-5
    )


# ----------------------------------------------------------------------------------------------------------
# 3. Thought/action weighting (RL4VLM's lambda) from text offsets
# ----------------------------------------------------------------------------------------------------------


def expected_weights(policy: VLMPolicy, answer: str, span: tuple[int, int], thought_weight: float) -> list[float]:
    """1 for tokens whose characters (the tokenizer's own offsets) overlap the span or the value's opening
    quote, lambda otherwise."""
    encoding = policy.tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)
    start, end = span
    start -= answer[start - 1] == '"'
    return [1.0 if s < end and e > start else thought_weight for s, e in encoding["offset_mapping"]]


@pytest.mark.parametrize(
    ("spec", "answer", "action_text"),
    [
        (BLACKJACK, '{"thoughts": "my sum is 10", "action": "hit"}', "hit"),
        (POINTS, '{"thoughts": "10 and 1 make 11", "action": "10"}', "10"),
        (POINTS, '{"thoughts": "10 and 1 make 11", "action": "1"}', "1"),
        (MOVES, '{"thoughts": "the flag is left", "action": "move left"}', "move left"),
    ],
)
@pytest.mark.parametrize("thought_weight", [0.5, 0.3])
def test_token_weights_split_thoughts_from_action(policy, spec, answer, action_text, thought_weight):
    agent = policy("tiny", thought_weight=thought_weight)
    parsed = parse_action(answer, spec)
    assert parsed.valid and spec.action_names[parsed.action] == action_text
    assert answer[slice(*parsed.action_span)] == action_text
    ids = torch.tensor(agent.tokenizer.encode(answer, add_special_tokens=False))

    weights = agent.token_weights(ids, parsed.action_span)

    assert weights.tolist() == pytest.approx(expected_weights(agent, answer, parsed.action_span, thought_weight))
    action_ids = ids[weights == 1.0].tolist()
    assert agent.tokenizer.decode(action_ids).strip(' "') == action_text
    assert (weights == thought_weight).sum() > 0


def test_weighted_sequence_logprob_is_lambda_thoughts_plus_action(policy, make_observations):
    agent = policy("tiny", thought_weight=0.5)
    image = make_observations(["x"])[0]["image"]
    answers = [
        '{"thoughts": "my sum is 10", "action": "hit"}',
        '{"thoughts": "15 is high", "action": "stand"}',
        "I would hit here.",  # no action field: every token counts in full
    ]
    completions = [hand_made_completion(agent, answer, BLACKJACK, image) for answer in answers]
    assert [c.action for c in completions] == [1, 0, None]
    assert completions[2].reason is not None
    assert torch.equal(completions[2].token_weights, torch.ones(len(completions[2].response_ids)))

    with torch.no_grad():
        evaluation = agent.evaluate(completions)

    for row, completion in enumerate(completions):
        token_logprobs = evaluation.token_logprobs[row, : len(completion.response_ids)]
        is_action = completion.token_weights == 1.0
        if completion.valid:
            expected = 0.5 * token_logprobs[~is_action].sum() + token_logprobs[is_action].sum()
        else:
            expected = token_logprobs.sum()
        # Same terms summed in another order: float32 rounding grows with the sum (~1e-7 relative).
        torch.testing.assert_close(evaluation.logprob[row], expected, rtol=1e-6, atol=1e-5)
        assert evaluation.logprob[row] < 0


@pytest.mark.parametrize("answer", ["", "no json at all", '{"thoughts": "cut off before the act'])
def test_answer_without_action_span_weights_every_token_one(policy, answer):
    agent = policy("tiny")
    parsed = parse_action(answer, BLACKJACK)
    assert parsed.action_span is None and parsed.reason
    ids = torch.tensor(agent.tokenizer.encode(answer, add_special_tokens=False), dtype=torch.long)
    assert torch.equal(agent.token_weights(ids, parsed.action_span), torch.ones(len(ids)))


WEIGHT_PRESETS = ["tiny", "tiny-qwen2vl", "tiny-idefics3"]
# One legal name is a prefix of another and the longer one is more than one token: the token after "move"
# (the closing '"}', or EOS in the action style) is where "move" and "move left" part.
PREFIX_NAMES = LanguageSpec("Go or go left.", ("move", "move left"))
WEIGHT_SPECS = {env_id: envs.get_language(env_id) for env_id in ALL_ENV_IDS} | {"prefix-names": PREFIX_NAMES}


def legal_paths(agent: VLMPolicy, spec: LanguageSpec, start_ids: list[int]) -> list[list[int]]:
    """Every token path the constrained grammar allows after ``start_ids`` (free thoughts already closed
    for "cot"), each up to where ``act`` stops: the JSON's close, or EOS."""
    grammar = agent.grammar(spec.action_names)
    style = agent.config.prompt_style
    paths = []

    def extend(ids: list[int]) -> None:
        text = agent.tokenizer.decode(ids, skip_special_tokens=True)
        if (ids and ids[-1] in agent.pieces.eos_ids) or answer_complete(text, style):
            paths.append(ids)
            return
        allowed = grammar.allowed(text, tokens_left=1000)
        assert isinstance(allowed, list), (text, allowed)
        for token_id in allowed:
            extend([*ids, token_id])

    extend(list(start_ids))
    return paths


def start_ids(agent: VLMPolicy, quote_piece: str | None) -> list[int]:
    """The answer's opening up to the token that closes the thoughts (none in the action style)."""
    if agent.config.prompt_style == "action":
        return []
    opening = agent.tokenizer.encode(COT_ANSWER_PREFIX + "I see", add_special_tokens=False)
    return opening + agent.pieces.by_piece[quote_piece][:1]


def character_spans(agent: VLMPolicy, ids: list[int]) -> list[tuple[int, int]]:
    """Each token's characters in the decoded answer (special tokens write none)."""
    spans, position = [], 0
    for token_id in ids:
        length = 0 if token_id in agent.pieces.special else len(agent.pieces.pieces[token_id])
        spans.append((position, position + length))
        position += length
    return spans


@pytest.mark.parametrize(("style", "quote_piece"), [("cot", '"'), ("cot", '",'), ("action", None)])
@pytest.mark.parametrize("env_id", list(WEIGHT_SPECS))
@pytest.mark.parametrize("preset", WEIGHT_PRESETS)
def test_every_choice_among_actions_is_an_action_token(policy, preset, env_id, style, quote_piece):
    spec = WEIGHT_SPECS[env_id]
    agent = policy(preset, prompt_style=style, constrained=True, thought_weight=0.5)
    grammar = agent.grammar(spec.action_names)
    opening = start_ids(agent, quote_piece)
    paths = legal_paths(agent, spec, opening)
    texts = [agent.tokenizer.decode(ids, skip_special_tokens=True) for ids in paths]
    actions = [parse_action(text, spec, style).action for text in texts]
    assert sorted(actions) == list(range(len(spec.action_names))), texts  # one path per action, all legal
    # Where the legal paths branch, the token taken decides between actions.
    children: dict[tuple[int, ...], set[int]] = {}
    for ids in paths:
        for index in range(len(opening), len(ids)):
            children.setdefault(tuple(ids[:index]), set()).add(ids[index])

    for ids, text in zip(paths, texts, strict=True):
        span = parse_action(text, spec, style).action_span
        weights = agent.token_weights(torch.tensor(ids), span, grammar).tolist()
        expected = []
        for index, (start, end) in enumerate(character_spans(agent, ids)):
            branches = index >= len(opening) and len(children[tuple(ids[:index])]) > 1
            expected.append(1.0 if branches or (start < end and start < span[1] and end > span[0]) else 0.5)
        assert weights == expected, [(agent.pieces.pieces[i], w) for i, w in zip(ids, weights, strict=True)]
        # Free answers: the text rule, the value's opening quote included.
        free = agent.token_weights(torch.tensor(ids), span).tolist()
        quote = span[0] - (text[span[0] - 1 : span[0]] == '"')
        overlaps = [start < end and start < span[1] and end > quote for start, end in character_spans(agent, ids)]
        assert free == [1.0 if overlap else 0.5 for overlap in overlaps]


@pytest.mark.parametrize(("action", "choice_piece"), [("1", ' "'), ("+", ' "+"}')])
def test_ezpoints_digit_or_operator_choice_is_an_action_token(policy, action, choice_piece):
    # The tiny tokenizer spells '", "action": "' + '1"}' as ... '":', ' "', '1', '"}' but '+"}' as ... '":',
    # ' "+"}': the digit/operator choice is made on ' "', which writes no character of the digit.
    spec = envs.get_language("vlmrl/EZPoints-v0")
    agent = policy("tiny", constrained=True, thought_weight=0.5)
    [path] = [
        ids
        for ids in legal_paths(agent, spec, start_ids(agent, '"'))
        if parse_action(agent.tokenizer.decode(ids), spec).action == spec.action_names.index(action)
    ]
    text = agent.tokenizer.decode(path)
    weights = agent.token_weights(
        torch.tensor(path), parse_action(text, spec).action_span, agent.grammar(spec.action_names)
    )
    pieces = [agent.pieces.pieces[token_id] for token_id in path]
    marker = pieces.index('":', 3)  # the key's colon, after the thoughts
    assert pieces[marker + 1] == choice_piece
    assert [piece for piece, weight in zip(pieces, weights, strict=True) if weight == 1.0] == [
        piece for piece in pieces[marker + 1 :] if piece != '"}'
    ]


# ----------------------------------------------------------------------------------------------------------
# 4. Constrained decoding: an untrained model always acts validly
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [POINTS, MOVES, BLACKJACK], ids=["points", "moves", "blackjack"])
@pytest.mark.parametrize("style", ["cot", "action"])
def test_constrained_decoding_always_yields_legal_actions(policy, style, spec, make_observations):
    agent = policy("tiny", prompt_style=style, constrained=True, max_new_tokens=64)
    chosen = set()
    for batch in range(3):
        observations = make_observations([f"Step {batch}, board {i}." * (i % 3) for i in range(8)], seed=batch)
        completions = act(agent, observations, spec, seed=batch)
        for completion in completions:
            assert completion.valid, (completion.text, completion.reason)
            assert completion.reason is None
            assert parse_action(completion.text, spec, style).action == completion.action
            if style == "cot":
                assert json.loads(completion.text)["action"] == spec.action_names[completion.action]
            else:
                assert completion.text == spec.action_names[completion.action]
            chosen.add(completion.action)
        if batch == 0:  # the recorded constraints are replayed: log-probs agree with act's
            assert_act_matches_evaluate(agent, completions)
    assert len(chosen) > 1  # sampled, not a fixed answer


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2vl", "tiny-idefics3"])
@pytest.mark.parametrize("spec", [POINTS, MOVES], ids=["points", "moves"])
def test_constrained_actions_have_one_spelling(policy, preset, spec, make_observations):
    # The tiny tokenizer can spell "move left" many ways ("move| left", "mo|ve| |left", ...) and ends a turn
    # with either of two EOS tokens. Sampling must still take one token path per action, so that an action's
    # probability is the probability of that path.
    agent = policy(preset, prompt_style="action", constrained=True, max_new_tokens=64)
    spellings: dict[int, set[tuple[int, ...]]] = {}
    for batch in range(4):
        observations = make_observations([f"Board {i}." for i in range(8)], seed=batch)
        for completion in act(agent, observations, spec, seed=batch):
            spellings.setdefault(completion.action, set()).add(tuple(completion.response_ids.tolist()))
    assert len(spellings) > 1
    for action, ids in spellings.items():
        assert len(ids) == 1, (spec.action_names[action], ids)
        (only,) = ids
        assert only[-1] == agent.pieces.eos_id
        assert agent.tokenizer.decode(only[:-1]) == spec.action_names[action]


def test_constrained_cot_prefix_has_one_spelling(policy, make_observations):
    agent = policy("tiny", prompt_style="cot", constrained=True, max_new_tokens=64)
    n_prefix = len(agent.pieces.spelling(COT_ANSWER_PREFIX)) - 1
    completions = act(agent, make_observations([f"Board {i}." for i in range(8)]), BLACKJACK)
    prefixes = {tuple(c.response_ids[:n_prefix].tolist()) for c in completions}
    assert len(prefixes) == 1
    assert agent.tokenizer.decode(next(iter(prefixes))) == COT_ANSWER_PREFIX


def test_spelling_is_greedy_longest_tokens(policy):
    pieces = policy("tiny").pieces
    text = "move left"
    boundaries = pieces.spelling(text)
    assert boundaries[0] == 0 and boundaries[-1] == len(text)
    for start, end in zip(boundaries, boundaries[1:]):
        assert pieces.by_piece.get(text[start:end])  # each step is one token ...
        longer = [text[start:e] for e in range(end + 1, len(text) + 1)]
        assert not any(pieces.by_piece.get(piece) for piece in longer)  # ... and the longest that fits


def test_constrained_budget_too_small_is_refused(make_observations):
    agent = fresh("tiny", constrained=True, max_new_tokens=16)
    with pytest.raises(ValueError, match="max_new_tokens"):
        agent.act(make_observations(["x"]), MOVES)


def favour_tokens(agent: VLMPolicy, token_ids: list[int], bonus: float = 100.0):
    """Make ``token_ids`` the model's favourites (a hook on the output layer; remove it when done)."""

    def hook(module, args, logits):
        logits = logits.clone()
        logits[..., token_ids] += bonus
        return logits

    return agent.model.get_output_embeddings().register_forward_hook(hook)


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2vl", "tiny-idefics3"])
def test_constrained_thoughts_never_contain_special_tokens(policy, preset, make_observations):
    # Every special token (EOS, <end_of_utterance>, <row_1_col_1>, ...) is the model's favourite here: the
    # free thoughts must still be plain text, and the answer still legal.
    agent = policy(preset, constrained=True, max_new_tokens=64)
    special = sorted({i for i, token in agent.tokenizer.added_tokens_decoder.items() if token.special})
    assert set(agent.pieces.eos_ids) <= set(special)
    hook = favour_tokens(agent, special)
    try:
        completions = act(agent, make_observations(STEP_TEXTS), BLACKJACK)
        assert_act_matches_evaluate(agent, completions)
    finally:
        hook.remove()
    for completion in completions:
        assert completion.valid, completion.text
        answer_ids = completion.response_ids.tolist()
        if answer_ids[-1] in agent.pieces.eos_ids:  # an EOS may close the answer, nothing special before
            answer_ids = answer_ids[:-1]
        assert not set(special) & set(answer_ids), completion.text


# ----------------------------------------------------------------------------------------------------------
# 5. Gradients reach LoRA and the value head only
# ----------------------------------------------------------------------------------------------------------


def backward_once(agent: VLMPolicy, observations, spec: LanguageSpec) -> None:
    completions = act(agent, observations, spec)
    evaluation = agent.evaluate(completions)
    loss = -evaluation.logprob.mean() + evaluation.value.pow(2).mean()
    loss.backward()


def assert_gradients_reach_trainable_only(agent: VLMPolicy) -> None:
    for name, parameter in agent.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name


@pytest.mark.parametrize("preset", FAMILY_PRESETS)
def test_gradients_reach_lora_and_value_head_only(preset, make_observations):
    agent = fresh(preset, max_new_tokens=16)
    perturb(agent)  # LoRA B starts at zero, which would leave LoRA A without gradient
    trainable = {name for name, parameter in agent.named_parameters() if parameter.requires_grad}
    lora_or_value = {name for name, _ in agent.named_parameters() if "lora_" in name or name.startswith("value_head.")}
    assert trainable == lora_or_value
    assert any(name.startswith("value_head.") for name in trainable)
    assert not any(part in name for name in trainable for part in VISION_NAME_PARTS)

    backward_once(agent, make_observations(STEP_TEXTS), BLACKJACK)

    assert_gradients_reach_trainable_only(agent)


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2vl", "tiny-idefics3"])
def test_train_vision_tower_adds_vision_lora(preset, make_observations):
    agent = fresh(preset, max_new_tokens=16, train_vision_tower=True)
    perturb(agent)
    trainable = [name for name, parameter in agent.named_parameters() if parameter.requires_grad]
    assert all("lora_" in name or name.startswith("value_head.") for name in trainable)
    assert any(part in name for name in trainable for part in VISION_NAME_PARTS)
    backward_once(agent, make_observations(STEP_TEXTS[:2]), BLACKJACK)
    assert_gradients_reach_trainable_only(agent)


def test_full_fine_tuning_trains_language_model_and_has_no_reference(make_observations):
    agent = fresh("tiny", lora_rank=0, max_new_tokens=16)
    trainable = {name for name, parameter in agent.named_parameters() if parameter.requires_grad}
    assert not any("lora_" in name for name, _ in agent.named_parameters())
    assert any("q_proj" in name for name in trainable) and any("lm_head" in name for name in trainable)
    assert not any(part in name for name in trainable for part in VISION_NAME_PARTS)
    backward_once(agent, make_observations(STEP_TEXTS[:2]), BLACKJACK)
    assert_gradients_reach_trainable_only(agent)
    with pytest.raises(ValueError, match="lora_rank"):
        agent.reference_logprobs(act(agent, make_observations(["x"]), BLACKJACK))


def test_one_optimizer_step_changes_every_trainable_parameter(make_observations):
    agent = fresh("tiny", max_new_tokens=16)
    perturb(agent)
    trainable = {name: p.detach().clone() for name, p in agent.named_parameters() if p.requires_grad}
    frozen = {name: p.detach().clone() for name, p in agent.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=1e-3)
    backward_once(agent, make_observations(STEP_TEXTS[:2]), BLACKJACK)
    optimizer.step()
    parameters = dict(agent.named_parameters())
    for name, before in trainable.items():
        assert not torch.equal(parameters[name], before), f"{name} did not change"
    for name, before in frozen.items():
        assert torch.equal(parameters[name], before), f"frozen {name} changed"


# ----------------------------------------------------------------------------------------------------------
# 6. Reference log-probs are the base model's
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", FAMILY_PRESETS)
@pytest.mark.parametrize("constrained", [False, True], ids=["free", "constrained"])
def test_reference_logprobs_equal_fresh_base_model(preset, constrained, make_observations):
    tokens = CONSTRAINED_TOKENS if constrained else UNCONSTRAINED_TOKENS
    options = dict(max_new_tokens=tokens, constrained=constrained, init_seed=2)
    trained = fresh(preset, **options)
    completions = act(trained, make_observations(STEP_TEXTS), BLACKJACK)
    perturb(trained)

    with torch.no_grad():
        adapted = trained.evaluate(completions)
    reference = trained.reference_logprobs(completions)
    with torch.no_grad():
        base = fresh(preset, **options).evaluate(completions)

    torch.testing.assert_close(reference.logprob, base.logprob, rtol=0, atol=1e-5)
    torch.testing.assert_close(reference.token_logprobs, base.token_logprobs, rtol=0, atol=1e-5)
    assert (adapted.logprob - reference.logprob).abs().max() > 1e-3
    assert not reference.logprob.requires_grad
    # Switching the adapter off for the reference leaves it on afterwards.
    with torch.no_grad():
        torch.testing.assert_close(trained.evaluate(completions).logprob, adapted.logprob, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# 7. Bad input
# ----------------------------------------------------------------------------------------------------------


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="tiny-qwen2vl") as error:
        load_policy("tiny-unknown")
    assert all(name in str(error.value) for name in PRESETS)


@pytest.mark.parametrize("name", ["./does-not-exist", "/no/such/model/dir"])
def test_missing_path_is_refused(name):
    with pytest.raises(ValueError, match="does-not-exist|no/such"):
        load_policy(name)


def test_uncached_hub_id_fails_with_presets_offline():
    with pytest.raises(ValueError, match="preset"):
        load_policy("nobody/no-such-vlm")


def test_unknown_option_names_available_options():
    with pytest.raises(ValueError, match="bogus") as error:
        load_policy("tiny", bogus=1)
    assert "thought_weight" in str(error.value) and "lora_rank" in str(error.value)


def test_unsupported_family_names_supported_families(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        tmp_path / "llama"
    )
    with pytest.raises(ValueError, match="'llama' is not supported") as error:
        load_policy(str(tmp_path / "llama"))
    assert all(family in str(error.value) for family in ("llava", "qwen2_vl", "idefics3", "smolvlm"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"prompt_style": "json"}, "prompt_style"),
        ({"thought_weight": 1.5}, "thought_weight"),
        ({"lora_rank": -1}, "lora_rank"),
        ({"max_new_tokens": 2}, "max_new_tokens"),
        ({"dtype": "float64"}, "dtype"),
        ({"lora_target_modules": ("no_such_proj",)}, "lora_target_modules"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        load_policy("tiny", **options)


def test_policy_config_validates_on_its_own():
    with pytest.raises(ValueError, match="temperature"):
        PolicyConfig(temperature=0)


def odd_images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        rng.integers(0, 256, (64, 64), dtype=np.uint8),  # grayscale, 2-D
        rng.integers(0, 256, (48, 80, 4), dtype=np.uint8),  # RGBA
        rng.random((64, 64, 3)),  # float in [0, 1]
        rng.integers(0, 256, (300, 200, 3), dtype=np.uint8),  # larger, not square
    ]


@pytest.mark.parametrize("preset", FAMILY_PRESETS)
def test_images_of_any_size_and_mode_are_accepted(policy, preset):
    agent = policy(preset, prompt_style="action", constrained=True, max_new_tokens=16)
    observations = [
        {"image": image, "text": text} for image, text in zip(odd_images(), ["a", "", "bb", "c"], strict=True)
    ]
    completions = act(agent, observations, BLACKJACK)
    assert all(c.valid for c in completions)
    assert_act_matches_evaluate(agent, completions)


def test_observation_and_spec_count_must_match(policy, make_observations):
    with pytest.raises(ValueError, match="2 observations but 3 language specs"):
        policy("tiny").act(make_observations(["a", "b"]), [BLACKJACK] * 3)


# ----------------------------------------------------------------------------------------------------------
# 8. Garbage answers are invalid with a reason, never a crash and never a silent random action
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["cot", "action"])
def test_unconstrained_garbage_is_invalid_with_reason(policy, style, make_observations):
    agent = policy("tiny", prompt_style=style, max_new_tokens=UNCONSTRAINED_TOKENS)
    invalid = 0
    for batch in range(3):
        completions = act(agent, make_observations([f"step {i}" for i in range(8)], seed=batch), POINTS, batch)
        for completion in completions:
            parsed = parse_action(completion.text, POINTS, style)
            assert (completion.action, completion.reason) == (parsed.action, parsed.reason)
            if completion.valid:
                assert completion.reason is None
            else:
                assert completion.action is None
                assert isinstance(completion.reason, str) and completion.reason
                invalid += 1
        # The update still runs on garbage.
        with torch.no_grad():
            assert torch.isfinite(agent.evaluate(completions).logprob).all()
    assert invalid > 0  # an untrained, unconstrained model does talk nonsense


def test_image_placeholder_is_never_sampled(policy, make_observations):
    # Sampling the image token into an answer would make evaluate fail ("Image features and image tokens
    # do not match"); an untrained model samples it about once per thousand tokens unless it is masked.
    agent = policy("tiny", max_new_tokens=UNCONSTRAINED_TOKENS)
    image_token = agent.model.config.image_token_id
    hook = favour_tokens(agent, [image_token])
    try:
        completions = act(agent, make_observations(STEP_TEXTS), BLACKJACK)
        assert all(image_token not in c.response_ids.tolist() for c in completions)
        assert_act_matches_evaluate(agent, completions)
    finally:
        hook.remove()


def test_format_answer_round_trips_through_weights(policy):
    agent = policy("tiny")
    answer = format_answer("stand", "the dealer shows 6")
    parsed = parse_action(answer, BLACKJACK)
    ids = torch.tensor(agent.tokenizer.encode(answer, add_special_tokens=False))
    weights = agent.token_weights(ids, parsed.action_span)
    assert agent.tokenizer.decode(ids[weights == 1.0].tolist()).strip(' "') == "stand"


# ----------------------------------------------------------------------------------------------------------
# 9. Completions for given answers: demonstrations (SFT) and preference pairs (DPO)
# ----------------------------------------------------------------------------------------------------------

DEMO_ENVS = ["vlmrl/GridWorld-v0", "vlmrl/Blackjack-v0", "vlmrl/EZPoints-v0"]
DEMO_PRESETS = ["tiny", "tiny-qwen2vl"]
DEMO_TOKENS = 96  # room for the longest expert rationale used here


def env_steps(env_id: str, seeds: list[int]) -> tuple[list[dict], list[str], list[str]]:
    """Observations after a reset with each seed, with the expert's action name and rationale there."""
    env = gym.make(env_id)
    names = envs.get_language(env_id).action_names
    observations, actions, rationales = [], [], []
    for seed in seeds:
        observation, _ = env.reset(seed=seed)
        observations.append(observation)
        actions.append(names[env.unwrapped.expert_action()])
        rationales.append(env.unwrapped.expert_rationale())
    env.close()
    return observations, actions, rationales


@contextmanager
def steered(agent: VLMPolicy, targets: list[list[int]], margin: float = 1.0):
    """Make ``targets[row][i]`` the favourite i-th answer token of row ``row`` (its logit set ``margin``
    above the best one), both in ``generate`` (one position per forward) and in ``evaluate`` (all at once).

    Greedy ``act`` then writes exactly the targets, while the log-probs stay those of a real, spread
    distribution, which ``evaluate`` under the same hook must reproduce.
    """
    step = 0

    def favour(logits: torch.Tensor, row: int, position: int, token_id: int) -> None:
        logits[row, position, token_id] = logits[row, position].max() + margin

    def hook(module, args, logits):
        nonlocal step
        logits = logits.clone()
        if logits.shape[1] == 1:  # generate: this forward predicts answer token `step`
            for row, target in enumerate(targets):
                if step < len(target):
                    favour(logits, row, 0, target[step])
            step += 1
        else:  # evaluate: position j predicts answer token j
            for row, target in enumerate(targets):
                for position in range(min(len(target), logits.shape[1])):
                    favour(logits, row, position, target[position])
        return logits

    handle = agent.model.get_output_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def plain_quotes(thoughts: str) -> str:
    """Constrained thoughts hold no quote (JSON would escape it with a backslash)."""
    return thoughts.replace('"', "'")


@pytest.mark.parametrize("constrained", [False, True], ids=["free", "constrained"])
@pytest.mark.parametrize("style", ["cot", "action"])
@pytest.mark.parametrize("env_id", DEMO_ENVS)
@pytest.mark.parametrize("preset", DEMO_PRESETS)
def test_completions_for_rebuild_what_act_wrote(policy, preset, env_id, style, constrained):
    agent = policy(preset, prompt_style=style, constrained=constrained, temperature=1.0, max_new_tokens=DEMO_TOKENS)
    spec = envs.get_language(env_id)
    observations, expert_actions, rationales = env_steps(env_id, [0, 1, 2])
    # The expert's action and two others (EZPoints: a digit and an operator, whichever the expert chose).
    actions = [expert_actions[0], spec.action_names[0], spec.action_names[-1]]
    if style == "action" and constrained:
        # Every token is forced or an action choice: whatever act samples, it spells as completions_for does.
        torch.manual_seed(0)
        acted = agent.act(observations, spec)
        hook_targets = None
    else:
        answers = [format_answer(a, plain_quotes(r), style) for a, r in zip(actions, rationales, strict=True)]
        hook_targets = [
            c.response_ids.tolist() for c in agent.completions_for(observations, spec, answers, score=False)
        ]
        with steered(agent, hook_targets):
            acted = agent.act(observations, spec, greedy=True)
        assert [c.text for c in acted] == answers  # act stopped where completions_for ends the answer

    rebuilt = agent.completions_for(observations, spec, [c.text for c in acted])

    for a, b in zip(acted, rebuilt, strict=True):
        assert (b.prompt, b.text, b.action, b.reason, b.action_names) == (
            a.prompt,
            a.text,
            a.action,
            a.reason,
            a.action_names,
        )
        assert torch.equal(b.response_ids, a.response_ids), (a.text, a.response_ids, b.response_ids)
        assert b.constraints == a.constraints
        assert torch.equal(b.token_weights, a.token_weights)
        assert np.array_equal(b.image, a.image)
    if hook_targets is None:
        assert_act_matches_evaluate(agent, rebuilt)  # rebuilt carries its own log-probs, at temperature 1
    with steered(agent, hook_targets or []), torch.no_grad():
        evaluation = agent.evaluate(rebuilt, temperature=1.0)
    torch.testing.assert_close(evaluation.logprob, torch.tensor([c.logprob for c in acted]), rtol=0, atol=1e-4)
    for row, completion in enumerate(acted):
        token_logprobs = evaluation.token_logprobs[row, : len(completion.response_ids)]
        torch.testing.assert_close(token_logprobs, completion.token_logprobs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("constrained", [False, True], ids=["free", "constrained"])
@pytest.mark.parametrize("env_id", ["vlmrl/GridWorld-v0", "vlmrl/Blackjack-v0"])
@pytest.mark.parametrize("preset", DEMO_PRESETS)
def test_expert_demonstration_likelihood_is_greedy_acts(policy, preset, env_id, constrained):
    sampling = policy(preset, constrained=constrained, max_new_tokens=DEMO_TOKENS)  # temperature 0.2, as PPO samples
    spec = envs.get_language(env_id)
    observations, actions, rationales = env_steps(env_id, [3, 4])
    answers = [format_answer(name, thoughts=thoughts) for name, thoughts in zip(actions, rationales, strict=True)]

    demos = sampling.completions_for(observations, spec, answers)

    for demo, answer, name in zip(demos, answers, actions, strict=True):
        assert demo.text == answer and spec.action_names[demo.action] == name
        assert demo.response_ids[-1].item() not in sampling.pieces.eos_ids  # act stops at the closing "}
        assert (demo.constraints is not None) == constrained
        assert np.isfinite(demo.logprob) and demo.logprob < 0
        weighted = float((demo.token_weights * demo.token_logprobs).sum())
        assert demo.logprob == pytest.approx(weighted, rel=1e-6, abs=1e-5)  # float32 sums in another order
    # Likelihoods are the model's own (temperature 1), whatever temperature the policy samples at.
    unit = policy(preset, constrained=constrained, max_new_tokens=DEMO_TOKENS, temperature=1.0)
    same = unit.completions_for(observations, spec, answers)
    torch.testing.assert_close(torch.tensor([d.logprob for d in same]), torch.tensor([d.logprob for d in demos]))
    with torch.no_grad():
        at_sampling_temperature = sampling.evaluate(demos).logprob
    assert (at_sampling_temperature - torch.tensor([d.logprob for d in demos])).abs().min() > 1.0
    # The unweighted sum of the demo's token log-probs is the log-likelihood greedy act gives to writing it.
    with steered(unit, [d.response_ids.tolist() for d in demos]):
        acted = unit.act(observations, spec, greedy=True)
        with torch.no_grad():
            evaluation = unit.evaluate(demos, temperature=1.0)
    assert [c.text for c in acted] == answers
    torch.testing.assert_close(
        evaluation.token_logprobs.sum(-1), torch.stack([c.token_logprobs.sum() for c in acted]), rtol=0, atol=1e-4
    )


LONG_THOUGHTS = "the dealer shows a ten and I hold a hard sixteen " * 4
ILLEGAL_ANSWERS = [
    ("cot", format_answer("fold", "no"), "not one of"),
    ("cot", '{"thoughts": "x", "action": "hit"', "legal actions"),
    ("cot", '{"action": "hit", "thoughts": "x"}', 'starts with \'{"thoughts": "\''),
    ("cot", format_answer("hit", 'the card says "10"'), "backslash"),
    ("cot", format_answer("hit", "two\nlines"), "backslash"),
    ("cot", format_answer("hit", "x") + " and more", "where act stops"),
    ("cot", '{"thoughts": "x",  "action": "hit"}', "may follow"),
    ("cot", format_answer("hit", LONG_THOUGHTS), "max_new_tokens"),
    ("action", "Hit", "may follow"),
    ("action", "hi", "not one of"),
    ("action", "hit\n", "where act stops"),
]


@pytest.mark.parametrize("preset", DEMO_PRESETS)
@pytest.mark.parametrize(("style", "answer", "message"), ILLEGAL_ANSWERS)
def test_completions_for_refuses_what_constrained_act_cannot_write(policy, preset, style, answer, message):
    agent = policy(preset, prompt_style=style, constrained=True, max_new_tokens=CONSTRAINED_TOKENS)
    observations = [{"image": np.zeros((32, 32, 3), dtype=np.uint8), "text": ""}]
    with pytest.raises(ValueError, match=re.escape(message)):
        agent.completions_for(observations, BLACKJACK, [answer])


def test_expert_thoughts_with_quotes_are_refused_under_constraints_only(policy):
    # Thoughts with double quotes: JSON escapes them, and constrained thoughts hold no backslash (which is why
    # every expert rationale quotes with single quotes).
    observations, actions, _ = env_steps("vlmrl/EZPoints-v0", [0])
    spec = envs.get_language("vlmrl/EZPoints-v0")
    answer = format_answer(actions[0], 'The formula so far is "3 +".')
    assert '\\"' in answer
    free = policy("tiny", max_new_tokens=DEMO_TOKENS).completions_for(observations, spec, [answer])
    assert free[0].valid and np.isfinite(free[0].logprob)
    with pytest.raises(ValueError, match="backslash"):
        policy("tiny", constrained=True, max_new_tokens=DEMO_TOKENS).completions_for(observations, spec, [answer])


@pytest.mark.parametrize(
    ("style", "answer", "message"),
    [
        ("cot", format_answer("hit", "x") + " and more", "act stops generating after"),
        ("cot", format_answer("hit", LONG_THOUGHTS * 3), "max_new_tokens"),
        ("action", "hit\nstand", "act stops generating after"),
    ],
)
def test_completions_for_refuses_free_answers_act_would_cut(policy, style, answer, message):
    agent = policy("tiny", prompt_style=style, max_new_tokens=UNCONSTRAINED_TOKENS)
    observations = [{"image": np.zeros((32, 32, 3), dtype=np.uint8), "text": ""}]
    with pytest.raises(ValueError, match=message):
        agent.completions_for(observations, BLACKJACK, [answer])


@pytest.mark.parametrize("constrained", [False, True], ids=["free", "constrained"])
def test_bare_action_demonstration_ends_with_eos_like_act(policy, constrained):
    agent = policy("tiny", prompt_style="action", constrained=constrained, max_new_tokens=16)
    observations = [{"image": np.zeros((32, 32, 3), dtype=np.uint8), "text": ""}]
    [demo] = agent.completions_for(observations, BLACKJACK, ["stand"], score=False)
    assert demo.response_ids[-1].item() == agent.pieces.eos_id
    assert agent.tokenizer.decode(demo.response_ids[:-1]) == "stand"
    assert (demo.logprob, demo.value) == (0.0, 0.0) and not demo.token_logprobs.any()


def test_evaluate_refuses_a_non_positive_temperature(policy, make_observations):
    agent = policy("tiny", max_new_tokens=UNCONSTRAINED_TOKENS)
    completions = act(agent, make_observations(["x"]), BLACKJACK)
    with pytest.raises(ValueError, match="temperature"):
        agent.evaluate(completions, temperature=0.0)


def test_evaluate_at_temperature_one_is_the_models_own_likelihood(policy, make_observations):
    sampling = policy("tiny", max_new_tokens=UNCONSTRAINED_TOKENS)
    unit = policy("tiny", max_new_tokens=UNCONSTRAINED_TOKENS, temperature=1.0)
    completions = act(sampling, make_observations(STEP_TEXTS), BLACKJACK)
    with torch.no_grad():
        at_one = sampling.evaluate(completions, temperature=1.0)
        expected = unit.evaluate(completions)
        at_sampling_temperature = sampling.evaluate(completions)
    torch.testing.assert_close(at_one.logprob, expected.logprob, rtol=0, atol=1e-5)
    torch.testing.assert_close(at_one.entropy, expected.entropy, rtol=0, atol=1e-5)
    assert (at_one.logprob - at_sampling_temperature.logprob).abs().min() > 1.0
