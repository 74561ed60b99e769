"""Card arithmetic games from RL4VLM's gym-cards (https://arxiv.org/abs/2405.10292): EZPoints and Points24.

The agent sees playing cards and builds a formula one token per step ("3", "*", "4", then "="); the
formula must use every card exactly once and equal the target. One parse machine (:func:`advance`)
holds the grammar and the exact arithmetic (:class:`fractions.Fraction`, so ``8 / (3 - 8 / 3)`` is
exactly 24); the environments use it for legality and scoring, and :func:`solve` and
:func:`complete_formula` use it to search for solutions, which is what the scripted expert follows.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from fractions import Fraction
from typing import Any, ClassVar, NamedTuple

import numpy as np
from gymnasium import spaces

from envs import drawing
from envs.base import LanguageEnv, observation_space
from envs.language import LanguageSpec
from envs.thoughts import CARD_LIST, QUOTED, cards_in, find_quoted, introduced, same_cards, unclaimed_numbers

NUMBER_TOKENS: tuple[str, ...] = tuple(str(value) for value in range(1, 11))
OPEN, CLOSE, EQUALS = "(", ")", "="
ALL_OPERATORS: tuple[str, ...] = ("+", "-", "*", "/")

# ----------------------------------------------------------------------------------------------------------
# Formula grammar and arithmetic
# ----------------------------------------------------------------------------------------------------------


class Partial(NamedTuple):
    """Parse state of a formula prefix, with its exact value so far.

    At each parenthesis level the formula read so far is ``total + pending`` followed, when an operand is
    expected, by ``op`` and that operand: ``3 + 4 *`` is ``total=3, pending=4, op="*"``, and ``5 -`` is
    ``total=5, pending=-1, op="*"``. ``enclosing`` holds the levels outside the open parentheses, each
    waiting for its group's value as its next operand. A value is ``None`` once a division by zero made
    it undefined. Hashable, so the solver can memoise on it.
    """

    enclosing: tuple[tuple[Fraction | None, Fraction | None, str], ...]
    total: Fraction | None
    pending: Fraction | None
    op: str
    expects_operand: bool


EMPTY = Partial(enclosing=(), total=Fraction(0), pending=Fraction(1), op="*", expects_operand=True)


def _apply(left: Fraction | None, op: str, right: Fraction | None) -> Fraction | None:
    """``left op right`` for a binary operator; ``None`` (undefined) for a division by zero or an undefined side."""
    if left is None or right is None or (op == "/" and right == 0):
        return None
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    return left * right if op == "*" else left / right


def _add(left: Fraction | None, right: Fraction | None) -> Fraction | None:
    return _apply(left, "+", right)


def advance(state: Partial, token: str) -> Partial | None:
    """The parse state after appending ``token``, or ``None`` if the grammar does not allow it there.

    Numbers and ``"("`` may come only where an operand is expected (at the start, after an operator or
    after ``"("``); operators only after an operand (a number or ``")"``); ``")"`` only after an operand
    while a parenthesis is open. Which cards are still unused is not the grammar's business: see
    :func:`remaining_values`.

    >>> state = EMPTY
    >>> for token in ["3", "+", "4", "*"]:
    ...     state = advance(state, token)
    >>> advance(state, "*") is None, advance(state, "5") is not None
    (True, True)
    """
    if token.isdigit():
        if not state.expects_operand:
            return None
        value = _apply(state.pending, state.op, Fraction(int(token)))
        return state._replace(pending=value, op="", expects_operand=False)
    if token == OPEN:
        if not state.expects_operand:
            return None
        level = (state.total, state.pending, state.op)
        return Partial(state.enclosing + (level,), Fraction(0), Fraction(1), "*", True)
    if state.expects_operand:
        return None  # operators and ")" need an operand before them
    if token in ("+", "-"):
        sign = Fraction(1 if token == "+" else -1)
        return Partial(state.enclosing, _add(state.total, state.pending), sign, "*", True)
    if token in ("*", "/"):
        return state._replace(op=token, expects_operand=True)
    if token == CLOSE and state.enclosing:
        total, pending, op = state.enclosing[-1]
        group = _add(state.total, state.pending)
        return Partial(state.enclosing[:-1], total, _apply(pending, op, group), "", False)
    return None


def parse(tokens: Iterable[str]) -> Partial | None:
    """The parse state after ``tokens``, or ``None`` if they break the grammar somewhere."""
    state: Partial | None = EMPTY
    for token in tokens:
        state = advance(state, token)
        if state is None:
            return None
    return state


def value_of(state: Partial | None) -> Fraction | None:
    """The value of a complete formula, or ``None`` if it is incomplete, unbalanced or divides by zero."""
    if state is None or state.expects_operand or state.enclosing:
        return None
    return _add(state.total, state.pending)


def evaluate(tokens: Iterable[str]) -> Fraction | None:
    """Exact value of a formula given as tokens, or ``None`` if it is not a complete, valid formula.

    >>> evaluate("8 / ( 3 - 8 / 3 )".split())
    Fraction(24, 1)
    >>> evaluate(["2", "+", "3", "*", "4"]), evaluate(["1", "/", "(", "2", "-", "2", ")"]), evaluate(["3", "+"])
    (Fraction(14, 1), None, None)
    """
    return value_of(parse(tokens))


def remaining_values(cards: Sequence[int], tokens: Iterable[str]) -> tuple[int, ...] | None:
    """Card values not yet used by the number tokens, sorted; ``None`` if a number has no card left.

    >>> remaining_values([8, 3, 8, 3], ["8", "/", "("])
    (3, 3, 8)
    >>> remaining_values([8, 3], ["3", "+", "3"]) is None
    True
    """
    left = sorted(cards)
    for token in tokens:
        if token.isdigit():
            if int(token) not in left:
                return None
            left.remove(int(token))
    return tuple(left)


# ----------------------------------------------------------------------------------------------------------
# Solver
# ----------------------------------------------------------------------------------------------------------


def _has_undefined(state: Partial) -> bool:
    if state.total is None or state.pending is None:
        return True
    return any(total is None or pending is None for total, pending, _ in state.enclosing)


# About 15,000 states cover any one four-card search (~5 MB); the cap bounds memory over a long run.
@functools.lru_cache(maxsize=1 << 16)
def _completion(
    state: Partial,
    remaining: tuple[int, ...],
    fresh_opens: int,
    target: Fraction,
    operators: tuple[str, ...],
    parentheses: bool,
) -> tuple[str, ...] | None:
    """The first completion (in token order) of a formula in ``state`` that uses exactly ``remaining``.

    ``fresh_opens`` counts the parentheses this search opened since its last number. The search opens
    another only while ``fresh_opens + 1 <= len(remaining) - 1``: a group that holds one number, or that
    repeats the span of the group around or inside it, can be dropped without changing the value, and
    ``k`` strictly nested groups starting at the same number need ``k + 1`` numbers. So the bound loses
    no solution and keeps the search finite.
    """
    if _has_undefined(state):
        return None  # a division by zero never goes away
    if not remaining and not state.expects_operand and not state.enclosing:
        return () if value_of(state) == target else None
    candidates: list[str] = []
    if state.expects_operand:
        candidates += [str(value) for value in sorted(set(remaining))]
        if parentheses and fresh_opens + 1 <= len(remaining) - 1:
            candidates.append(OPEN)
    else:
        if remaining:
            candidates += operators
        if state.enclosing:
            candidates.append(CLOSE)
    for token in candidates:
        next_state = advance(state, token)
        if next_state is None:
            continue
        if token.isdigit():
            left = list(remaining)
            left.remove(int(token))
            rest = _completion(next_state, tuple(left), 0, target, operators, parentheses)
        else:
            opens = fresh_opens + 1 if token == OPEN else fresh_opens
            rest = _completion(next_state, remaining, opens, target, operators, parentheses)
        if rest is not None:
            return (token, *rest)
    return None


# A tree search over the values reachable from each subset of the cards, the classic 24-game solver: fast
# (milliseconds for four cards) but it only knows its own rendering of each solution, with the fewest
# parentheses. The token-by-token search above knows every rendering and answers any prefix, but takes
# up to a few seconds for four cards from a short prefix.
_Expression = tuple[tuple[str, ...], str]  # (tokens, top-level operator; "" for a single number)
_NEEDS_PARENTHESES = {  # (parent operator, side) -> child operators that must be wrapped to keep the value
    ("+", "left"): (),
    ("+", "right"): (),
    ("-", "left"): (),
    ("-", "right"): ("+", "-"),
    ("*", "left"): ("+", "-"),
    ("*", "right"): ("+", "-"),
    ("/", "left"): ("+", "-"),
    ("/", "right"): ("+", "-", "*", "/"),
}


def _wrap(expression: _Expression, parent: str, side: str) -> tuple[str, ...]:
    tokens, op = expression
    return (OPEN, *tokens, CLOSE) if op in _NEEDS_PARENTHESES[parent, side] else tokens


@functools.lru_cache(maxsize=1 << 14)
def _reachable(values: tuple[int, ...], operators: tuple[str, ...]) -> dict[Fraction, _Expression]:
    """Every value an expression over all of ``values`` (sorted) can take, each with its shortest expression
    (fewest parentheses; ties go to the first found: splits in bit-mask order, then operands in insertion
    order, then ``operators`` order). Shortest reads best: ``10 + 10 + 5 - 1``, not ``5 - (1 - (10 + 10))``."""
    if len(values) == 1:
        return {Fraction(values[0]): ((str(values[0]),), "")}
    found: dict[Fraction, _Expression] = {}
    count = len(values)
    for mask in range(1, (1 << count) - 1):
        left = tuple(values[i] for i in range(count) if mask >> i & 1)
        right = tuple(values[i] for i in range(count) if not mask >> i & 1)
        for left_value, left_expression in _reachable(left, operators).items():
            for right_value, right_expression in _reachable(right, operators).items():
                for op in operators:
                    value = _apply(left_value, op, right_value)
                    if value is None:
                        continue
                    wrap_left = left_expression[1] in _NEEDS_PARENTHESES[op, "left"]
                    wrap_right = right_expression[1] in _NEEDS_PARENTHESES[op, "right"]
                    length = len(left_expression[0]) + len(right_expression[0]) + 1 + 2 * (wrap_left + wrap_right)
                    if value in found and len(found[value][0]) <= length:
                        continue
                    tokens = _wrap(left_expression, op, "left") + (op,) + _wrap(right_expression, op, "right")
                    found[value] = (tokens, op)
    return found


def _right_operands(
    left: Fraction, op: str, target: Fraction, right_values: dict[Fraction, _Expression]
) -> list[Fraction]:
    """The right operands among ``right_values`` with ``left op right == target``, found by inverting ``op``
    instead of trying every pair (the top level is where the value sets are largest)."""
    if (op == "*" and left == 0) or (op == "/" and target == 0):
        candidates = list(right_values)  # no unique inverse: try them all (rare)
    elif op == "+":
        candidates = [target - left]
    elif op == "-":
        candidates = [left - target]
    elif op == "*":
        candidates = [target / left]
    else:
        candidates = [left / target]
    return [right for right in candidates if right in right_values and _apply(left, op, right) == target]


def _shortest_solution(values: tuple[int, ...], target: Fraction, operators: tuple[str, ...]) -> tuple[str, ...] | None:
    """The shortest expression over all of ``values`` that equals ``target`` (ties: the first found)."""
    if len(values) == 1:
        return (str(values[0]),) if values[0] == target else None
    best: tuple[str, ...] | None = None
    count = len(values)
    for mask in range(1, (1 << count) - 1):
        left = tuple(values[i] for i in range(count) if mask >> i & 1)
        right = tuple(values[i] for i in range(count) if not mask >> i & 1)
        right_values = _reachable(right, operators)
        for left_value, left_expression in _reachable(left, operators).items():
            for op in operators:
                for right_value in _right_operands(left_value, op, target, right_values):
                    tokens = _wrap(left_expression, op, "left") + (op,) + _wrap(right_values[right_value], op, "right")
                    if best is None or len(tokens) < len(best):
                        best = tokens
    return best


@functools.lru_cache(maxsize=1 << 14)
def _solve_cached(
    cards: tuple[int, ...], target: Fraction, operators: tuple[str, ...], parentheses: bool
) -> tuple[str, ...] | None:
    if not parentheses:
        # Without parentheses the formula is flat; the token search is exact and fast enough for that.
        return _completion(EMPTY, cards, 0, target, operators, False)
    return _shortest_solution(cards, target, operators)


@functools.lru_cache(maxsize=4096)
def _complete_formula_cached(
    cards: tuple[int, ...], prefix: tuple[str, ...], target: Fraction, operators: tuple[str, ...], parentheses: bool
) -> tuple[str, ...] | None:
    state = parse(prefix)
    remaining = remaining_values(cards, prefix)
    if state is None or remaining is None:
        raise ValueError(
            f"The formula {' '.join(prefix)!r} is not a legal prefix for cards {list(cards)}: fix the tokens "
            "or the cards."
        )
    solution = _solve_cached(cards, target, operators, parentheses)
    if solution is None or solution[: len(prefix)] == prefix:
        return solution  # no solution at all, or the usual one still fits: the expert's every step
    rest = _completion(state, remaining, 0, target, operators, parentheses)
    return None if rest is None else prefix + rest


def complete_formula(
    cards: Sequence[int],
    prefix: Sequence[str] = (),
    *,
    target: int = 24,
    operators: Sequence[str] = ALL_OPERATORS,
    parentheses: bool = True,
) -> list[str] | None:
    """A solution that starts with ``prefix``, or ``None`` if no way of finishing ``prefix`` reaches ``target``.

    Solutions use each card exactly once, the given binary operators (no unary minus) and, if allowed,
    parentheses, with exact arithmetic. The answer is deterministic: :func:`solve`'s solution when it
    starts with ``prefix`` (so an expert that follows it never searches again), otherwise the first
    completion in token order (numbers ascending, then the operators as given, then ``"("`` and
    ``")"``) from an exhaustive search, which can take seconds for four cards and a short prefix.
    Results are cached per (cards, prefix).

    Args:
        cards: Card values.
        prefix: Tokens already written (numbers, operators, parentheses).
        target: The value to reach.
        operators: Binary operators allowed, a subset of ``("+", "-", "*", "/")``.
        parentheses: Whether ``"("`` and ``")"`` may be used.

    Returns:
        The whole formula (``prefix`` plus its completion) as tokens, or ``None``.

    Raises:
        ValueError: ``prefix`` breaks the grammar or uses a number no card provides.

    >>> complete_formula([3, 3, 8, 8], ["8", "/"])
    ['8', '/', '(', '3', '-', '8', '/', '3', ')']
    >>> complete_formula([3, 3, 8, 8], ["3", "+"]) is None
    True
    >>> " ".join(complete_formula([2, 3, 4, 1], ["("]))
    '( 1 + 2 + 3 ) * 4'
    """
    unknown = set(operators) - set(ALL_OPERATORS)
    if unknown:
        raise ValueError(f"Unknown operators {sorted(unknown)}; use a subset of {ALL_OPERATORS}.")
    solution = _complete_formula_cached(
        tuple(sorted(cards)), tuple(prefix), Fraction(target), tuple(operators), bool(parentheses)
    )
    return None if solution is None else list(solution)


def solve(
    cards: Sequence[int], target: int = 24, operators: Sequence[str] = ALL_OPERATORS, parentheses: bool = True
) -> list[str] | None:
    """A formula that uses every card exactly once and equals ``target``, as tokens, or ``None``.

    Exact (:class:`fractions.Fraction`) and deterministic; with parentheses, the solution comes from a
    search over the values each subset of the cards can reach and is written with the fewest
    parentheses.

    >>> " ".join(solve([3, 3, 8, 8]))
    '8 / ( 3 - 8 / 3 )'
    >>> solve([2, 10], target=12, operators=("+", "*"), parentheses=False)
    ['2', '+', '10']
    >>> solve([1, 1, 1, 1]) is None
    True
    """
    return complete_formula(cards, (), target=target, operators=operators, parentheses=parentheses)


# ----------------------------------------------------------------------------------------------------------
# Environments
# ----------------------------------------------------------------------------------------------------------


def _format(tokens: Sequence[str]) -> str:
    return " ".join(tokens)


_FORMULA_TOKEN = re.compile(r"\s*(\d+|[-+*/()]|\u00d7|\u00f7)")


def formula_tokens(text: str) -> list[str] | None:
    """The tokens of a formula written with or without spaces, or ``None`` if ``text`` holds anything but
    numbers, ``+ - * /`` (or ``\u00d7``, ``\u00f7``), parentheses and spaces.

    >>> formula_tokens("8/(3 - 8/3)")
    ['8', '/', '(', '3', '-', '8', '/', '3', ')']
    >>> formula_tokens(" "), formula_tokens("3 + x")
    ([], None)
    """
    tokens, position = [], 0
    while position < len(text.rstrip()):
        match = _FORMULA_TOKEN.match(text, position)
        if match is None:
            return None
        tokens.append({"\u00d7": "*", "\u00f7": "/"}.get(match.group(1), match.group(1)))
        position = match.end()
    return tokens


# Keywords that introduce the card values and the formula written so far in a thought.
_CARD_WORDS = r"cards?|values?|dealt|i\s+have"
_FORMULA_WORDS = r"so\s+far|formula|written|wrote|finish"
# The formula so far as a thought writes it: quoted (single or double quotes, the quotes included), a word
# for "empty", or (right after the keyword, see _LEAD_WORDS) an unquoted run of formula characters.
_FORMULA_CLAIM = re.compile(rf"({QUOTED})|\b(empty|nothing|blank)\b|([\d(][\d\s+\-*/()\u00d7\u00f7]*)", re.IGNORECASE)
# Only these words may stand between a keyword and an unquoted formula: in "the formula uses every card
# and equals 12", 12 is not the formula.
_LEAD_WORDS = {"is", "so", "far", "now", "reads", "currently", "the", "just"}


class PointsEnv(LanguageEnv):
    """Shared rules of the card arithmetic games; :class:`EZPointsEnv` and :class:`Points24Env` set the numbers.

    Cards are dealt from one 52-card deck without replacement; aces count 1 and J, Q, K count 10. The
    action names are ``"1"`` .. ``"10"``, the game's operators, ``"("`` and ``")"`` if it has
    parentheses, and ``"="``; each step appends one token to the formula:

    * a number is legal if an unused card has that value and an operand is expected (at the start, after
      an operator or ``"("``), so ``"1"`` then ``"0"`` is not ``10``;
    * an operator is legal right after a number or ``")"``;
    * ``"("`` is legal where a number is, ``")"`` right after a number or ``")"`` while one is open;
    * an illegal token gives reward -1 and leaves the formula unchanged; the episode goes on;
    * ``"="`` is always legal and ends the episode: +10 and ``info["success"]`` if the formula is complete,
      uses every card and equals the target exactly, otherwise -1 (an incomplete formula, an unused card,
      a division by zero or a wrong value). RL4VLM's ``"="`` also ends the episode either way. A step
      after ``"="`` raises ``RuntimeError``: reset first.

    The registered ids cap episodes with a ``TimeLimit`` (20 steps for EZPoints, 40 for Points24).

    Observation: the image shows the cards (used ones greyed out) and the formula; the step text shows the
    formula too, as the issue asks, and says when the last action was illegal. With ``text_hint=True`` it
    also lists the card values.

    Truthful thoughts (``check_thoughts``): a thought must list the card values after "cards" or "values"
    ("the cards 3, 4"; in any order, A/J/Q/K by their letters or values), unless the formula it states
    already uses every card, and, once something is written, the formula so far after "so far",
    "formula", "written" or "finish", quoted ("the formula so far is '3 *'", in single or double quotes) or
    right after the keyword; an empty formula, if stated, as "empty", "nothing" or an empty quote. Any
    other quoted formula may use only the cards, each once, and if it uses them all it must equal the
    target. Every other number must be a card value, the target or the number of cards. The rationales
    quote in single quotes, which a JSON answer holds as they are (a double quote would need a backslash).

    Args:
        render_mode: ``"rgb_array"`` (default) or ``None``.
        image_size: Side of the square image in pixels.
        text_hint: Also list the card values in the step text.
        require_solvable: Deal again until the cards have a solution (:func:`solve`). RL4VLM's EZPoints
            only deals solvable pairs; its Points24 deals four random cards, many without a solution.
    """

    num_cards: ClassVar[int]
    target: ClassVar[int]
    operators: ClassVar[tuple[str, ...]]
    parentheses: ClassVar[bool]
    language: ClassVar[LanguageSpec]
    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["rgb_array"], "render_fps": 2}

    # Redealing stops here so that a subclass with an impossible target fails loudly instead of spinning.
    _MAX_DEALS = 10_000

    @classmethod
    def action_names_for(cls, operators: tuple[str, ...], parentheses: bool) -> tuple[str, ...]:
        """``"1"`` .. ``"10"``, then ``operators``, then ``"("`` and ``")"`` if allowed, then ``"="``."""
        return NUMBER_TOKENS + operators + ((OPEN, CLOSE) if parentheses else ()) + (EQUALS,)

    def __init__(
        self,
        render_mode: str | None = "rgb_array",
        image_size: int = 128,
        text_hint: bool = False,
        require_solvable: bool = True,
    ) -> None:
        super().__init__(render_mode)
        if not 64 <= image_size <= 1024:
            raise ValueError(f"image_size must be 64..1024 pixels so the cards stay readable, got {image_size}.")
        self.image_size = int(image_size)
        self.text_hint = bool(text_hint)
        self.require_solvable = bool(require_solvable)
        self.observation_space = observation_space(self.image_size, self.image_size)
        self.action_space = spaces.Discrete(len(self.language.action_names))
        self.cards: list[tuple[int, int]] = []  # (rank 1..13, suit 0..3)
        self.formula: list[str] = []
        self.used: list[bool] = []
        self._state: Partial = EMPTY
        self.last_illegal: str | None = None
        self.done = False

    @property
    def values(self) -> list[int]:
        """The cards' values: aces 1, J/Q/K 10."""
        return [min(rank, 10) for rank, _ in self.cards]

    # -- game ---------------------------------------------------------------------------------------------
    def _deal(self) -> list[tuple[int, int]]:
        indices = self.np_random.choice(52, size=self.num_cards, replace=False)
        return [(int(index) % 13 + 1, int(index) // 13) for index in indices]

    def _solution(self, prefix: Sequence[str] = ()) -> list[str] | None:
        return complete_formula(
            self.values, prefix, target=self.target, operators=self.operators, parentheses=self.parentheses
        )

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        for _ in range(self._MAX_DEALS):
            self.cards = self._deal()
            if not self.require_solvable or self._solution() is not None:
                break
        else:
            raise RuntimeError(
                f"{type(self).__name__}: no solvable deal in {self._MAX_DEALS} tries; check target and operators."
            )
        self.formula = []
        self.used = [False] * self.num_cards
        self._state = EMPTY
        self.last_illegal = None
        self.done = False
        return self._observation(), {"success": False}

    def is_legal(self, token: str) -> bool:
        """Whether appending ``token`` to the current formula is legal (``"="`` always is)."""
        if token == EQUALS:
            return True
        if advance(self._state, token) is None:
            return False
        return not token.isdigit() or self._unused_card(int(token)) is not None

    def _unused_card(self, value: int) -> int | None:
        for index, card_value in enumerate(self.values):
            if card_value == value and not self.used[index]:
                return index
        return None

    def is_solved(self) -> bool:
        """Whether the formula uses every card and equals the target."""
        return all(self.used) and value_of(self._state) == self.target

    def step(self, action: Any) -> tuple[dict, float, bool, bool, dict]:
        action = self._check_action(action)
        if self.done:
            raise RuntimeError(f"{type(self).__name__}: the formula was submitted; call reset() before step().")
        token = self.language.action_names[action]
        self.last_illegal = None
        success = False
        if token == EQUALS:
            success = self.is_solved()
            reward = 10.0 if success else -1.0
            self.done = True
        elif self.is_legal(token):
            reward = 0.0
            self._state = advance(self._state, token)
            self.formula.append(token)
            if token.isdigit():
                self.used[self._unused_card(int(token))] = True
        else:
            reward = -1.0
            self.last_illegal = token
        return self._observation(), reward, self.done, False, {"success": success}

    # -- observation ------------------------------------------------------------------------------------
    def _text(self) -> str:
        formula = f'"{_format(self.formula)}"' if self.formula else "(empty)"
        text = f"Formula so far: {formula}."
        if self.last_illegal is not None:
            text += f' The last action "{self.last_illegal}" was not legal there, so the formula did not change.'
        if self.done:
            text += " The formula was submitted."
        if self.text_hint:
            unused = [str(value) for value, used in zip(self.values, self.used, strict=True) if not used]
            text += f" Card values: {', '.join(map(str, self.values))}; unused: {', '.join(unused) or 'none'}."
        return text

    def _image(self) -> np.ndarray:
        size = self.image_size
        image, draw = drawing.new_canvas(size, size)
        margin = max(2, size // 32)
        cards_bottom = int(size * 0.6)
        boxes = drawing.card_row_boxes(self.num_cards, (margin, margin, size - margin, cards_bottom))
        for box, (rank, suit), used in zip(boxes, self.cards, self.used, strict=True):
            drawing.draw_card(draw, box, drawing.rank_label(rank), suit, dimmed=used)
        label_bottom = cards_bottom + size // 8
        drawing.draw_text_left(draw, (margin, cards_bottom + margin, size - margin, label_bottom), "Formula:")
        # Spaced tokens read best; when that forces a small font, the compact form ("(10-4)*(3+1)") is
        # still unambiguous because a number never directly follows a number.
        banner = (margin, label_bottom + margin, size - margin, size - margin)
        text = _format(self.formula)
        if drawing.fit_font_size(text, banner[2] - banner[0], banner[3] - banner[1]) < size // 8:
            text = "".join(self.formula)
        drawing.draw_banner(draw, banner, text, background=drawing.WHITE, fill=drawing.BLACK, largest=size // 5)
        return drawing.to_array(image)

    # -- expert ---------------------------------------------------------------------------------------------
    def expert_action(self) -> int:
        """The next token of the first solution that extends the formula; ``"="`` when it is complete or when
        no solution extends it."""
        solution = self._solution(self.formula)
        if solution is None or len(solution) == len(self.formula):
            return self.language.action_names.index(EQUALS)
        return self.language.action_names.index(solution[len(self.formula)])

    def expert_rationale(self) -> str:
        cards = ", ".join(map(str, self.values))
        solution = self._solution(self.formula)
        written = f"'{_format(self.formula)}'"  # single quotes: see the class docstring
        if solution is None:
            if not self.formula:
                return f"The cards {cards} cannot make {self.target}, so I end the episode with =."
            return (
                f"No way to finish {written} with the cards {cards} makes {self.target}, so I end the episode with =."
            )
        if len(solution) == len(self.formula):
            return f"The formula {written} uses every card and equals {self.target}, so I submit it with =."
        next_token = solution[len(self.formula)]
        so_far = f"the formula so far is {written}" if self.formula else "the formula is empty"
        return (
            f"The cards {cards} make {self.target} as '{_format(solution)}'; {so_far}, so the next token is "
            f"{next_token}."
        )

    def check_thoughts(self, thoughts: str) -> bool:
        """Whether ``thoughts`` states the card values and the formula so far truly, and nothing false.

        See the class docstring for the rules.

        >>> env = EZPointsEnv()
        >>> _ = env.reset(seed=0)
        >>> for token in ("3", "+"):
        ...     _ = env.step(env.language.action_names.index(token))
        >>> env.expert_rationale()
        "The cards 9, 3 make 12 as '3 + 9'; the formula so far is '3 +', so the next token is 9."
        >>> env.check_thoughts("Written so far: 3+. My cards are 3 and 9, and 3 + 9 = 12: next is 9.")
        True
        >>> env.check_thoughts("The cards 9, 3; the formula so far is '3 *'."), env.check_thoughts("Next is 9.")
        (False, False)
        >>> env.check_thoughts('The cards 9, 3; the formula so far is "3 +".')
        True
        """
        ranks = [rank for rank, _ in self.cards]
        card_claims = introduced(thoughts, _CARD_WORDS, CARD_LIST, window=3, stop=_FORMULA_WORDS)
        formula_claims = [
            match
            for match in introduced(thoughts, _FORMULA_WORDS, _FORMULA_CLAIM, stop=_CARD_WORDS)
            if match.group(3) is None or self._right_after_keyword(thoughts, match.start())
        ]
        for match in card_claims:
            if not same_cards(cards_in(match.group()), ranks):
                return False
        for match in formula_claims:
            quoted, empty, unquoted = match.groups()
            written = [] if empty is not None else formula_tokens(quoted[1:-1] if quoted is not None else unquoted)
            if written != self.formula:
                return False
        if not card_claims and not (formula_claims and all(self.used)):
            return False  # a formula that uses every card names the cards; otherwise they must be listed
        if self.formula and not formula_claims:
            return False
        claimed = [match.span() for match in card_claims + formula_claims]
        for quote in find_quoted(thoughts):
            tokens = formula_tokens(quote.value)
            if tokens is None or any(start <= quote.start < end for start, end in claimed):
                continue
            if not self._possible_formula(tokens):
                return False
            claimed.append((quote.start, quote.end))
        allowed = {*self.values, self.target, self.num_cards}
        return all(found.value in allowed for found in unclaimed_numbers(thoughts, claimed))

    @staticmethod
    def _right_after_keyword(thoughts: str, position: int) -> bool:
        """Whether only words like "is" stand between ``position`` and the formula keyword before it."""
        keyword_end = max((match.end() for match in re.finditer(_FORMULA_WORDS, thoughts[:position], re.I)), default=0)
        return {word.lower() for word in re.findall(r"[A-Za-z]+", thoughts[keyword_end:position])} <= _LEAD_WORDS

    def _possible_formula(self, tokens: list[str]) -> bool:
        """Whether a formula a thought quotes uses only the cards, each once, and, if it uses all of them,
        equals the target."""
        numbers = sorted(int(token) for token in tokens if token.isdigit())
        left = list(self.values)
        for number in numbers:
            if number not in left:
                return False
            left.remove(number)
        return bool(left) or value_of(parse(tokens)) == self.target


class EZPointsEnv(PointsEnv):
    """Two cards; make 12 with ``+`` and ``*``. Rules, observation and arguments: see :class:`PointsEnv`.

    Example:
        >>> env = EZPointsEnv()
        >>> observation, info = env.reset(seed=0)
        >>> env.language.action_names[:2], env.language.action_names[10:]
        (('1', '2'), ('+', '*', '='))
        >>> observation["text"]
        'Formula so far: (empty).'
    """

    num_cards = 2
    target = 12
    operators = ("+", "*")
    parentheses = False
    language = LanguageSpec(
        "The image shows two playing cards. Aces count 1 and J, Q and K count 10. Write a formula that uses "
        "both cards' values once each and equals 12, one number or operator per step, then choose = to "
        "submit it. A number can only follow an operator, and an operator can only follow a number.",
        PointsEnv.action_names_for(("+", "*"), parentheses=False),
    )


class Points24Env(PointsEnv):
    """Four cards; make 24 with ``+ - * /`` and parentheses (exact arithmetic: ``8 / (3 - 8 / 3)`` is 24).

    Rules, observation and arguments: see :class:`PointsEnv`.

    Example:
        >>> env = Points24Env()
        >>> env.language.action_names[10:]
        ('+', '-', '*', '/', '(', ')', '=')
    """

    num_cards = 4
    target = 24
    operators = ALL_OPERATORS
    parentheses = True
    language = LanguageSpec(
        "The image shows four playing cards. Aces count 1 and J, Q and K count 10. Write a formula that "
        "uses every card's value once and equals 24, one number, operator or parenthesis per step, then "
        "choose = to submit it. Division is exact.",
        PointsEnv.action_names_for(ALL_OPERATORS, parentheses=True),
    )
