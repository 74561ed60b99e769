"""Reading the facts a thought states, for the environments' ``check_thoughts`` methods.

A thought is free text. The helpers here find the few kinds of fact that the environments' rationales
state (numbers, playing cards, grid cells, coordinate tuples, "7 cm right"-style offsets, and values
that a keyword introduces), each with its character span, so that an environment can compare each fact
with its state and then make sure that no other number was left unexplained. None of them raises on any
text: a model can write anything.

Conventions that every checker shares (the README's "The language interface" has the table per env):

* Numbers are read in digits (``3``, ``-4.0``, ``12.5``); number words ("three") are not read.
* A keyword introduces the first value after it, at most a few words on, in the same sentence and
  before the next keyword: in "the dealer shows a 7 and my sum is 15", ``dealer`` introduces 7 and
  ``sum`` introduces 15, whatever order the two facts come in.
* Single-letter card ranks are read in capitals (``A``, ``J``, ``Q``, ``K``), so that the article "a" is
  never an ace; ``ace``, ``jack``, ``queen`` and ``king`` are read in any case.
* Text may be quoted in double or single quotes (``"3 + 9"``, ``'3 + 9'``), which read alike. A single
  quote right after a letter or digit opens no quote, and one right before a letter or digit closes none;
  one that joins two words ("don't", "K's") is an apostrophe, and neither word is read alone ("K's" names
  no king). The environments' rationales quote in single quotes: in a JSON answer a double quote needs a
  backslash, which constrained decoding never writes in the thoughts.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym

#: A number written in digits, with a sign only when the minus sign is glued to it ("-4.0", not "8-3").
NUMBER = r"(?<![\w.])-?\d+(?:\.\d+)?"
_RANK_WORDS = r"(?i:ace|jack|queen|king)"
#: Word boundaries that keep an apostrophe inside a word ("K's", "don't") but let a quote mark end one
#: ("'K'", "'3 + 9'"): no letter or digit, nor one and an apostrophe, before; no letter or digit, nor an
#: apostrophe and one, after.
_WORD_START = r"(?<!\w)(?<!\w')"
_WORD_END = r"(?!\w)(?!'\w)"
#: One playing card: a value 1..11 in digits (11 for an ace counted high), a rank letter in capitals or a
#: rank word. A capital "A" right before another card is an article ("A 7"), not an ace.
CARD = (
    rf"{_WORD_START}(?:10|11|[1-9]|{_RANK_WORDS}|[JQK]|A(?!\s+(?:10|11|[1-9]|[JQKA]\b|{_RANK_WORDS})))"
    rf"{_WORD_END}"
)
#: Quoted text, in double quotes or in single quotes (see the module docstring for apostrophes); no groups,
#: so that it can sit inside a larger pattern. :func:`find_quoted` gives the text inside.
QUOTED = r'"[^"]*"|' + _WORD_START + r"'[^'\n]*'" + _WORD_END
#: A list of cards separated by commas, "and", "&" or spaces: "3, 4", "A and 6", "K, 2 and 9". A number
#: that an operator follows starts a formula, not another card: "3 and 9, and 3 + 9" lists two cards.
_NEXT_CARD = CARD + r"(?!\s*[-+*/=\u00d7\u00f7])"
CARD_LIST = CARD + r"(?:\s*(?:,|&|\band\b)\s*(?:and\s+)?" + _NEXT_CARD + r"|\s+" + _NEXT_CARD + r")*"
_CARD_VALUES = {"a": 1, "ace": 1, "j": 10, "jack": 10, "q": 10, "queen": 10, "k": 10, "king": 10}
_CARD_RANKS = {"a": 1, "ace": 1, "j": 11, "jack": 11, "q": 12, "queen": 12, "k": 13, "king": 13}

# A sentence ends at . ! ? ; or a line break; a full stop between digits is a decimal point.
_SENTENCE_END = re.compile(r"[.!?;\n](?!\d)")
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")
_NUMBER = re.compile(NUMBER)


@dataclass(frozen=True)
class Found:
    """One fact read from a text.

    Attributes:
        value: What was read (a number, a tuple, a string...).
        start: Where it starts in the text.
        end: Where it ends in the text (exclusive).
    """

    value: Any
    start: int
    end: int


@dataclass(frozen=True)
class Offset:
    """A displacement stated as one or more "amount direction" phrases: "2 cells right and 1 cell up".

    Attributes:
        parts: ``(direction word, amount)`` pairs in the order written; the direction is lowercase.
        start: Where the first phrase starts in the text.
        end: Where the last phrase ends in the text (exclusive).
        reference: The lowercase word after "of" or "from" right after the phrases ("gripper" in "7 cm
            right of the gripper"), or ``None``: what the displacement is measured from.
    """

    parts: tuple[tuple[str, float], ...]
    start: int
    end: int
    reference: str | None


def _compile(pattern: str | re.Pattern[str]) -> re.Pattern[str]:
    return pattern if isinstance(pattern, re.Pattern) else re.compile(pattern, re.IGNORECASE)


def _keyword(pattern: str | re.Pattern[str]) -> re.Pattern[str]:
    """A keyword alternation as whole words, case-insensitive."""
    if isinstance(pattern, re.Pattern):
        return pattern
    return re.compile(_WORD_START + r"(?:" + pattern + r")" + _WORD_END, re.IGNORECASE)


def count_words(text: str) -> int:
    """Words of letters in ``text``; numbers and punctuation do not count.

    >>> count_words("is a (3, 4) card's")
    3
    """
    return len(_WORD.findall(text))


def find_numbers(text: str) -> list[Found]:
    """Every number written in digits, as a float.

    >>> [found.value for found in find_numbers("Gripper at (12.3, -4.0, 0.0) cm; 8-3 is 5.")]
    [12.3, -4.0, 0.0, 8.0, 3.0, 5.0]
    """
    return [Found(float(match.group()), match.start(), match.end()) for match in _NUMBER.finditer(text)]


def unclaimed_numbers(text: str, claimed: Iterable[tuple[int, int]]) -> list[Found]:
    """The numbers of ``text`` that lie outside every ``(start, end)`` span in ``claimed``.

    >>> [found.value for found in unclaimed_numbers("sum 15, dealer 7", [(0, 6)])]
    [7.0]
    """
    spans = list(claimed)
    return [found for found in find_numbers(text) if not any(start <= found.start < end for start, end in spans)]


_QUOTED = re.compile(QUOTED)


def find_quoted(text: str) -> list[Found]:
    """Every quoted text, in double or single quotes, as the string inside the quotes; the span includes them.

    >>> [found.value for found in find_quoted("I don't know: '3 + 9' or \\"3 * 9\\", the cards' sum.")]
    ['3 + 9', '3 * 9']
    >>> [(found.value, found.start, found.end) for found in find_quoted("so far: ''")]
    [('', 8, 10)]
    """
    return [Found(match.group()[1:-1], match.start(), match.end()) for match in _QUOTED.finditer(text)]


def introduced(
    text: str,
    keywords: str | re.Pattern[str],
    value: str | re.Pattern[str],
    *,
    window: int = 4,
    stop: str | re.Pattern[str] | None = None,
) -> list[re.Match[str]]:
    """The values that ``keywords`` introduce: for each keyword, the first match of ``value`` after it.

    The value must come within ``window`` words of the keyword, in the same sentence, and before the next
    keyword or ``stop`` (a keyword of another fact): in "the dealer shows 10 and I have 15", with
    ``stop`` naming the player, the dealer's keyword cannot reach 15.

    Args:
        text: The thought.
        keywords: Regular-expression alternation of the keywords, matched as whole words in any case.
        value: Regular expression of the value (a string is compiled case-insensitively).
        window: Most words (of letters; numbers do not count) between keyword and value.
        stop: Alternation of words that end a keyword's reach, matched like ``keywords``.

    Returns:
        One match of ``value`` per keyword that introduces one, in text order.

    >>> matches = introduced("The dealer shows a 7 and my sum is 15.", "sum|my", r"\\d+", stop="dealer")
    >>> [match.group() for match in matches]
    ['15']
    >>> [m.group() for m in introduced("My cards are 3 and 4; total 7", "my|total", r"\\d+", stop="cards")]
    ['7']
    """
    keyword_pattern, value_pattern = _keyword(keywords), _compile(value)
    limits = [match.start() for match in keyword_pattern.finditer(text)]
    if stop is not None:
        limits += [match.start() for match in _keyword(stop).finditer(text)]
    limits += [match.start() for match in _SENTENCE_END.finditer(text)]
    limits.sort()
    found = []
    for keyword in keyword_pattern.finditer(text):
        end = next((limit for limit in limits if limit >= keyword.end()), len(text))
        match = value_pattern.search(text, keyword.end(), end)
        if match is not None and count_words(text[keyword.end() : match.start()]) <= window:
            found.append(match)
    return found


def keyword_before(text: str, position: int, keywords: dict[str, str], *, window: int = 4) -> str | None:
    """Which of ``keywords`` (name -> alternation) comes last before ``position``, in the same sentence and
    at most ``window`` words before it; ``None`` if none does.

    >>> keyword_before("I am at (1, 2) and the goal is at (3, 4)", 34, {"agent": "i", "goal": "goal"})
    'goal'
    >>> keyword_before("The goal. Then (3, 4)", 15, {"goal": "goal"}) is None
    True
    """
    sentence_start = max((match.end() for match in _SENTENCE_END.finditer(text, 0, position)), default=0)
    best: tuple[int, str] | None = None
    for name, pattern in keywords.items():
        for match in _keyword(pattern).finditer(text, sentence_start, position):
            if count_words(text[match.end() : position]) <= window and (best is None or match.end() > best[0]):
                best = (match.end(), name)
    return None if best is None else best[1]


def read_card(token: str) -> tuple[int, int | None]:
    """The value of a card as written and its rank when the rank is named (aces 1, J/Q/K 10).

    A card in digits names only a value: "10" may be a 10, a jack, a queen or a king.

    >>> read_card("K"), read_card("Ace"), read_card("7")
    ((10, 13), (1, 1), (7, None))
    """
    key = token.strip().lower()
    if key in _CARD_RANKS:
        return _CARD_VALUES[key], _CARD_RANKS[key]
    return int(key), None


def card_fits(token: str, rank: int, *, ace_high: bool = False) -> bool:
    """Whether ``token`` (a match of :data:`CARD`) correctly names a card of ``rank`` (1..13).

    Digits must give the card's value (aces 1, or 11 too with ``ace_high``), letters and words its rank.

    >>> card_fits("10", 12), card_fits("K", 12), card_fits("11", 1, ace_high=True), card_fits("11", 1)
    (True, False, True, False)
    """
    value, named_rank = read_card(token)
    if named_rank is not None:
        return named_rank == rank
    return value == min(rank, 10) or (ace_high and rank == 1 and value == 11)


def cards_in(card_list: str) -> list[str]:
    """The cards of a match of :data:`CARD_LIST`, as written.

    >>> cards_in("A, 6 and K")
    ['A', '6', 'K']
    >>> cards_in(re.search(CARD_LIST, "cards 3 and 9, and 3 + 9 = 12").group())
    ['3', '9']
    """
    return re.findall(CARD, card_list)


def same_cards(tokens: Sequence[str], ranks: Sequence[int]) -> bool:
    """Whether ``tokens`` name exactly the cards of ``ranks``, in any order, each card once.

    Named ranks are paired first, so that "10" cannot take the king that a "K" needs.

    >>> same_cards(["K", "10"], [13, 10]), same_cards(["10", "10"], [13, 10]), same_cards(["3"], [3, 4])
    (True, True, False)
    """
    if len(tokens) != len(ranks):
        return False
    left = list(ranks)
    for token in sorted(tokens, key=lambda token: read_card(token)[1] is None):
        fit = next((rank for rank in left if card_fits(token, rank)), None)
        if fit is None:
            return False
        left.remove(fit)
    return True


def find_tuples(text: str, length: int) -> list[Found]:
    """Parenthesised tuples of ``length`` numbers, as tuples of floats: "(2, 3)", "(12.3, -4.0, 0.0)".

    >>> [found.value for found in find_tuples("at (2, 3), not (1, 2, 3)", 2)]
    [(2.0, 3.0)]
    """
    pattern = r"\(\s*" + r"\s*,\s*".join([f"({NUMBER})"] * length) + r"\s*\)"
    return [
        Found(tuple(float(group) for group in match.groups()), match.start(), match.end())
        for match in re.finditer(pattern, text)
    ]


_ROW_COLUMN = re.compile(r"\brow\s+(\d+)\s*,?\s*(?:and\s+)?(?:col|column)\s+(\d+)", re.IGNORECASE)
_COLUMN_ROW = re.compile(r"\b(?:col|column)\s+(\d+)\s*,?\s*(?:and\s+)?row\s+(\d+)", re.IGNORECASE)


def find_cells(text: str) -> list[Found]:
    """Grid cells as ``(row, column)`` integer pairs, written "(2, 3)", "row 2, column 3" or "column 3, row 2".

    The numbers are returned as written; which cell they mean (counted from 0 or 1) is the caller's.

    >>> [found.value for found in find_cells("I am in row 2, column 3; the goal is at (4, 1).")]
    [(2, 3), (4, 1)]
    >>> [found.value for found in find_cells("Column 5 and row 1")]
    [(1, 5)]
    """
    cells = [
        Found((int(found.value[0]), int(found.value[1])), found.start, found.end)
        for found in find_tuples(text, 2)
        if all(float(v).is_integer() for v in found.value)
    ]
    cells += [Found((int(m[1]), int(m[2])), m.start(), m.end()) for m in _ROW_COLUMN.finditer(text)]
    cells += [Found((int(m[2]), int(m[1])), m.start(), m.end()) for m in _COLUMN_ROW.finditer(text)]
    return sorted(cells, key=lambda found: found.start)


_JOINER = re.compile(r"\s*(?:,\s*(?:and\s+)?|&\s*|\band\s+|\s)\s*", re.IGNORECASE)
_REFERENCE = re.compile(r"\s*(?:of|from)\s+(?:the\s+)?([A-Za-z]+)", re.IGNORECASE)


def find_offsets(text: str, directions: Iterable[str], unit: str = "") -> list[Offset]:
    """Displacements written as "amount [unit] [to the] direction" phrases, joined into one :class:`Offset`
    when only a comma, "and" or "&" separates them.

    Args:
        text: The thought.
        directions: The direction words to read ("right", "up", ...), in lowercase.
        unit: Alternation of the unit words that may follow the amount ("cells?|squares?"); optional
            in the text.

    Returns:
        The offsets in text order.

    >>> offsets = find_offsets("The ball is 7 cm right and 3 cm up of the gripper.", ("right", "up"), "cm")
    >>> offsets[0].parts, offsets[0].reference
    ((('right', 7.0), ('up', 3.0)), 'gripper')
    >>> [offset.parts for offset in find_offsets("2 cells right; 1 to the left", ("right", "left"), "cells?")]
    [(('right', 2.0),), (('left', 1.0),)]
    """
    words = "|".join(sorted((re.escape(word) for word in directions), key=len, reverse=True))
    unit_part = rf"(?:(?:{unit})\s*)?" if unit else ""
    phrase = re.compile(rf"(?<![\w.-])(\d+(?:\.\d+)?)\s*{unit_part}(?:to\s+the\s+)?({words}){_WORD_END}", re.IGNORECASE)
    offsets: list[Offset] = []
    parts: list[tuple[str, float]] = []
    start = end = 0
    for match in phrase.finditer(text):
        if parts and _JOINER.fullmatch(text, end, match.start()) is not None:
            parts.append((match.group(2).lower(), float(match.group(1))))
            end = match.end()
            continue
        if parts:
            offsets.append(_offset(text, parts, start, end))
        parts, start, end = [(match.group(2).lower(), float(match.group(1)))], match.start(), match.end()
    if parts:
        offsets.append(_offset(text, parts, start, end))
    return offsets


def _offset(text: str, parts: list[tuple[str, float]], start: int, end: int) -> Offset:
    reference = _REFERENCE.match(text, end)
    return Offset(tuple(parts), start, end, None if reference is None else reference.group(1).lower())


def thought_checker(env: gym.Env) -> Callable[[str], bool] | None:
    """The environment's truthful-thought checker, ``env.unwrapped.check_thoughts``, or ``None``.

    Environments of this package check the facts a thought states against the state that the current
    observation shows; third-party environments (and :class:`~envs.base.LanguageEnv` subclasses that do not
    define ``check_thoughts``) have no checker, and callers should then log nothing.

    >>> from envs.colour import ColourEnv
    >>> env = ColourEnv()
    >>> _ = env.reset(seed=0)
    >>> check = thought_checker(env)
    >>> check(env.expert_rationale()), check("")
    (True, False)
    """
    check = getattr(env.unwrapped, "check_thoughts", None)
    return check if callable(check) else None
