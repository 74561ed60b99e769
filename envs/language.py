"""The language interface: what an LVLM policy is told about an environment and how its answer becomes an action.

Every environment the framework can train on has one :class:`LanguageSpec`: the task instruction, the
legal action names (index ``i`` of ``action_names`` is the integer action ``i``), and nothing else. The
per-step context (the text part of each observation) comes from the environment itself, in
``observation["text"]``. This module is the single place that holds:

* the prompt templates (:func:`build_prompt`), in two styles: ``"cot"`` asks for
  ``{"thoughts": "...", "action": "..."}`` (RL4VLM, https://arxiv.org/abs/2405.10292) and ``"action"``
  asks for the action name alone;
* the answer parser (:func:`parse_action`), which returns either the action or an explicit invalid result
  with the reason, and the character span of the action inside the answer (the policy uses the span to
  weight thought and action tokens differently, from text offsets rather than token ids);
* the registry that maps an environment id to its spec (:func:`register_language`, :func:`get_language`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Literal

PromptStyle = Literal["cot", "action"]
PROMPT_STYLES: tuple[str, ...] = ("cot", "action")

#: The JSON key that holds the action in a chain-of-thought answer.
ACTION_KEY = "action"
#: The JSON key that holds the reasoning in a chain-of-thought answer.
THOUGHTS_KEY = "thoughts"
#: What a chain-of-thought answer starts with. Constrained decoding forces exactly this prefix.
COT_ANSWER_PREFIX = '{"' + THOUGHTS_KEY + '": "'
#: What separates the thoughts from the action in a chain-of-thought answer.
COT_ACTION_MARKER = '", "' + ACTION_KEY + '": "'
#: What closes a chain-of-thought answer.
COT_ANSWER_SUFFIX = '"}'


@dataclass(frozen=True)
class LanguageSpec:
    """How an environment is described to a language model.

    Args:
        instruction: The task, in a few sentences, as the model should read it before every step.
        action_names: Legal action names; position ``i`` is the environment's integer action ``i``.
            Names are matched case-insensitively with whitespace collapsed, so they must stay distinct
            under that normalisation.
        progress_captions: Optional captions of how far the task has got, from the goal reached (first)
            to the farthest from it (last), worded so that many states share each one (distance bands,
            not measurements); the environment's ``progress_caption()`` returns the one that fits its
            state. ``vlmrl clip-adapt`` teaches a CLIP these captions, and the ``clip`` reward takes the
            first as its goal prompt and the last as its baseline prompt.

    Example:
        >>> spec = LanguageSpec("Reach the flag.", ("left", "right"))
        >>> spec.action_index("  Right ")
        1
    """

    instruction: str
    action_names: tuple[str, ...]
    progress_captions: tuple[str, ...] = ()
    _lookup: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.instruction.strip():
            raise ValueError("LanguageSpec.instruction is empty: describe the task in a sentence or two.")
        names = tuple(self.action_names)
        if not names:
            raise ValueError("LanguageSpec.action_names is empty: list the legal action names.")
        object.__setattr__(self, "action_names", names)
        lookup: dict[str, int] = {}
        for index, name in enumerate(names):
            key = normalize_action_text(name)
            if not key:
                raise ValueError(f"Action name at position {index} is blank: every action needs a name.")
            if '"' in name or "\\" in name:
                raise ValueError(f"Action name {name!r} contains a quote or backslash; choose a plain name.")
            if key in lookup:
                raise ValueError(
                    f"Action names {names[lookup[key]]!r} and {name!r} are the same after normalisation "
                    "(case and whitespace); make them distinct."
                )
            lookup[key] = index
        object.__setattr__(self, "_lookup", lookup)
        captions = tuple(self.progress_captions)
        object.__setattr__(self, "progress_captions", captions)
        if captions and (
            len(captions) < 2 or len(set(captions)) != len(captions) or not all(c.strip() for c in captions)
        ):
            raise ValueError(
                f"LanguageSpec.progress_captions={captions!r}: give at least two distinct, non-blank captions, "
                "from the goal reached to the farthest from it (or none)."
            )

    def action_index(self, text: str) -> int | None:
        """The action index for ``text``, or ``None`` if it names no legal action."""
        return self._lookup.get(normalize_action_text(text))


def normalize_action_text(text: str) -> str:
    """Case-fold and collapse whitespace, so ``" Move  LEFT"`` and ``"move left"`` compare equal.

    >>> normalize_action_text("  Move \\t LEFT ")
    'move left'
    """
    return " ".join(text.split()).casefold()


# ----------------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------------


def build_prompt(spec: LanguageSpec, step_text: str, style: PromptStyle = "cot") -> str:
    """The text part of the prompt for one step; the image goes beside it.

    The policy wraps this text in the model's chat template together with the image.

    >>> spec = LanguageSpec("Win the hand.", ("stand", "hit"))
    >>> print(build_prompt(spec, "Your sum is 15.", style="action"))
    Win the hand.
    Your sum is 15.
    Legal actions: "stand", "hit".
    Reply with the name of one legal action and nothing else.
    """
    if style not in PROMPT_STYLES:
        raise ValueError(f"Unknown prompt style {style!r}; use one of {PROMPT_STYLES}.")
    actions = ", ".join(f'"{name}"' for name in spec.action_names)
    lines = [spec.instruction.strip()]
    if step_text.strip():
        lines.append(step_text.strip())
    lines.append(f"Legal actions: {actions}.")
    if style == "cot":
        lines.append(
            "First think about the image step by step, then choose one legal action. Reply with one JSON "
            f'object and nothing else: {{"{THOUGHTS_KEY}": "<your reasoning>", "{ACTION_KEY}": "<one legal action>"}}'
        )
    else:
        lines.append("Reply with the name of one legal action and nothing else.")
    return "\n".join(lines)


def format_answer(action_name: str, thoughts: str | None = None, style: PromptStyle = "cot") -> str:
    """The answer an ideal model gives: used for SFT demonstrations and for tests of the parser.

    >>> format_answer("hit", "My sum is 12, the dealer shows 10.")
    '{"thoughts": "My sum is 12, the dealer shows 10.", "action": "hit"}'
    >>> format_answer("hit", style="action")
    'hit'
    """
    if style == "action":
        return action_name
    return json.dumps({THOUGHTS_KEY: thoughts or "", ACTION_KEY: action_name}, ensure_ascii=False)


# ----------------------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedAction:
    """What the parser made of one answer.

    Attributes:
        action: The action index, or ``None`` when the answer is invalid.
        reason: Why the answer is invalid (``None`` when it is valid).
        action_span: ``(start, end)`` character offsets of the action text inside the answer, when the
            answer contains a recognisable action field (even one naming an illegal action), else ``None``.
    """

    action: int | None
    reason: str | None = None
    action_span: tuple[int, int] | None = None

    @property
    def valid(self) -> bool:
        return self.action is not None


_ACTION_FIELD = re.compile(r'"' + ACTION_KEY + r'"\s*:\s*("(?:[^"\\]|\\.)*"|[^,}\s]+)')
_MAX_SHOWN = 40


def _shorten(text: str) -> str:
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def _json_objects(text: str) -> list[tuple[int, int, object]]:
    """Every top-level JSON object in ``text`` as ``(start, end, value)``, scanning left to right."""
    decoder = json.JSONDecoder()
    found = []
    position = text.find("{")
    while position != -1:
        try:
            value, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            position = text.find("{", position + 1)
            continue
        found.append((position, end, value))
        position = text.find("{", end)
    return found


def _action_value_span(text: str, start: int, end: int, value: object) -> tuple[int, int] | None:
    """Offsets of the action value inside the object ``text[start:end]``; the last matching field wins,
    as it does in ``json.loads``."""
    span = None
    for match in _ACTION_FIELD.finditer(text, start, end):
        raw = match.group(1)
        try:
            decoded = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if decoded == value:
            left, right = match.span(1)
            span = (left + 1, right - 1) if raw.startswith('"') else (left, right)
    return span


def parse_action(text: str | None, spec: LanguageSpec, style: PromptStyle = "cot") -> ParsedAction:
    """Turn a model's answer into an action, or an invalid result that says why. Never raises.

    Rules (each one is a row in ``tests/test_language.py``):

    * The answer must contain exactly one JSON object with an ``"action"`` field; prose around it is
      ignored. Two such objects are invalid even if they agree: the model did not commit to one action.
    * The action value is matched against the legal names after case-folding and collapsing whitespace.
      Nothing else is forgiven: ``"10"`` is never read as ``"1"``, and no action is guessed.
    * In the ``"action"`` style, an answer without any ``{`` is read as a bare action name.

    >>> spec = LanguageSpec("Win.", ("stand", "hit"))
    >>> parse_action('Sure! {"thoughts": "12 is low", "action": "Hit"}', spec)
    ParsedAction(action=1, reason=None, action_span=(43, 46))
    >>> parse_action('{"action": "fold"}', spec).reason
    'action "fold" is not one of: "stand", "hit"'
    """
    if style not in PROMPT_STYLES:
        raise ValueError(f"Unknown prompt style {style!r}; use one of {PROMPT_STYLES}.")
    if text is None or not text.strip():
        return ParsedAction(None, "empty answer")
    legal = ", ".join(f'"{name}"' for name in spec.action_names)

    if style == "action" and "{" not in text:
        stripped = text.strip()
        start = text.index(stripped[0])
        span = (start, start + len(stripped))
        index = spec.action_index(stripped)
        if index is None:
            return ParsedAction(None, f'action "{_shorten(stripped)}" is not one of: {legal}', span)
        return ParsedAction(index, None, span)

    objects = [(s, e, v) for s, e, v in _json_objects(text) if isinstance(v, dict) and ACTION_KEY in v]
    if not objects:
        if "{" not in text:
            return ParsedAction(None, "no JSON object in the answer")
        return ParsedAction(None, f'no complete JSON object with an "{ACTION_KEY}" field in the answer')
    if len(objects) > 1:
        return ParsedAction(None, f"{len(objects)} actions in one answer; expected exactly one")
    start, end, obj = objects[0]
    value = obj[ACTION_KEY]
    span = _action_value_span(text, start, end, value)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return ParsedAction(None, f'"{ACTION_KEY}" must be a string, got {type(value).__name__}', span)
    value_text = str(value)
    index = spec.action_index(value_text)
    if index is None:
        return ParsedAction(None, f'action "{_shorten(value_text)}" is not one of: {legal}', span)
    return ParsedAction(index, None, span)


def extract_thoughts(text: str | None) -> str | None:
    """The thoughts of a chain-of-thought answer, or ``None`` when it holds no JSON object with a
    ``"thoughts"`` string.

    >>> extract_thoughts('{"thoughts": "I see 3.", "action": "hit"}'), extract_thoughts("hit")
    ('I see 3.', None)
    """
    for _, _, value in _json_objects(text or ""):
        if isinstance(value, dict) and isinstance(value.get(THOUGHTS_KEY), str):
            return value[THOUGHTS_KEY]
    return None


def answer_complete(text: str, style: PromptStyle = "cot") -> bool:
    """Whether generation can stop: the answer holds a whole JSON object with an action field, or (action
    style) a bare answer has been followed by a line break. Used to stop generating early.

    >>> answer_complete('{"thoughts": "x", "action": "hit"', "cot"), answer_complete('{"action": "hit"}', "cot")
    (False, True)
    >>> answer_complete("hit", "action"), answer_complete("hit\\n", "action")
    (False, True)
    """
    if "{" in text and "}" in text and any(ACTION_KEY in v for _, _, v in _json_objects(text) if isinstance(v, dict)):
        return True
    return style == "action" and "{" not in text and "\n" in text.lstrip()


# ----------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------

_SPECS: dict[str, LanguageSpec] = {}


def register_language(env_id: str, spec: LanguageSpec, *, overwrite: bool = False) -> None:
    """Attach a language spec to a registered (or soon to be registered) Gymnasium id."""
    if env_id in _SPECS and not overwrite and _SPECS[env_id] != spec:
        raise ValueError(f"{env_id} already has a language spec; pass overwrite=True to replace it.")
    _SPECS[env_id] = spec


def get_language(env_id: str) -> LanguageSpec:
    """The language spec of a registered environment id (``"vlmrl/GridWorld-v0"``)."""
    try:
        return _SPECS[env_id]
    except KeyError:
        known = ", ".join(sorted(_SPECS)) or "none"
        raise KeyError(
            f"No language spec for {env_id!r}. Known: {known}. Third-party envs join with "
            "envs.register_language_env(...)."
        ) from None


def language_env_ids() -> list[str]:
    """Every environment id that has a language spec."""
    return sorted(_SPECS)
