"""Blackjack with the cards drawn in the image, as in RL4VLM's gym-cards (https://arxiv.org/abs/2405.10292).

The rules are Gymnasium's ``Blackjack-v1`` with ``natural=False, sab=False``: an infinite deck, the
player and the dealer get two cards each, the dealer shows one of them, the player hits or stands, and
the dealer then draws until their sum reaches 17 (standing on a soft 17).
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import numpy as np
from gymnasium import spaces

from envs import drawing
from envs.base import LanguageEnv, observation_space
from envs.language import LanguageSpec
from envs.thoughts import CARD, NUMBER, card_fits, introduced, unclaimed_numbers

STAND, HIT = 0, 1
_ACTION_NAMES = ("stand", "hit")

# Keywords that introduce the player's sum and the dealer's card in a thought. "card(s)" ends the reach of
# a player keyword, so that "my cards are 10 and 5" does not read 10 as the sum.
_PLAYER_WORDS = r"sum|total|my|me|player(?:'s)?|i\s+have|i'm\s+(?:at|on)|i\s+am\s+(?:at|on)"
_DEALER_WORDS = r"dealer(?:'s|s)?|house"
_SUM = re.compile(r"(?:\b(soft|hard)\s+)?(" + NUMBER + r")", re.IGNORECASE)
#: Numbers of the rules that a thought may quote: the dealer stands at 17, the hand busts over 21.
_RULE_NUMBERS = (17, 21)


def card_value(rank: int) -> int:
    """Blackjack value of a rank 1..13: aces count 1 here (see :func:`hand_value`), J/Q/K count 10.

    >>> [card_value(rank) for rank in (1, 9, 10, 11, 13)]
    [1, 9, 10, 10, 10]
    """
    return min(rank, 10)


def hand_value(values: list[int] | tuple[int, ...]) -> tuple[int, bool]:
    """Best total of a hand and whether it is soft (an ace counts 11 without busting).

    Args:
        values: Card values, aces as 1.

    Returns:
        ``(total, soft)``; the total may exceed 21 (a bust).

    >>> hand_value([1, 6])
    (17, True)
    >>> hand_value([1, 6, 10])
    (17, False)
    >>> hand_value([1, 1, 9])
    (21, True)
    """
    total = sum(values)
    if 1 in values and total + 10 <= 21:
        return total + 10, True
    return total, False


def basic_strategy(total: int, soft: bool, dealer_up: int) -> int:
    """Basic strategy restricted to hit and stand (no doubling or splitting in this game).

    Hard totals: hit up to 11; 12 hits against 2, 3 and 7 to ace; 13 to 16 stand against 2 to 6 and hit
    otherwise; 17 and up stand. Soft totals: hit up to 17; soft 18 stands against 2 to 8 and hits against
    9, 10 and ace; 19 and up stand.

    Args:
        total: The player's best total.
        soft: Whether an ace counts 11 in that total.
        dealer_up: Value of the dealer's face-up card (ace = 1).

    Returns:
        ``STAND`` (0) or ``HIT`` (1).

    >>> basic_strategy(12, False, 4), basic_strategy(12, False, 3), basic_strategy(16, False, 1)
    (0, 1, 1)
    >>> basic_strategy(18, True, 8), basic_strategy(18, True, 9), basic_strategy(18, False, 9)
    (0, 1, 0)
    """
    dealer_low = 2 <= dealer_up <= 6
    if soft:
        if total <= 17:
            return HIT
        if total == 18:
            return STAND if 2 <= dealer_up <= 8 else HIT
        return STAND
    if total <= 11:
        return HIT
    if total == 12:
        return STAND if dealer_up in (4, 5, 6) else HIT
    if total <= 16:
        return STAND if dealer_low else HIT
    return STAND


def _describe_total(total: int, soft: bool) -> str:
    return f"{'soft' if soft else 'hard'} {total}"


class BlackjackEnv(LanguageEnv):
    """Hit or stand against the dealer; the hand is shown as cards in the image.

    Rules (Gymnasium ``Blackjack-v1``, ``natural=False, sab=False``): ranks are drawn uniformly from an
    infinite deck (A, 2..10, J, Q, K; J/Q/K count 10, an ace counts 11 when that does not bust the hand).
    ``"hit"`` draws a card; going over 21 loses (reward -1). ``"stand"`` ends the hand: the dealer reveals
    the face-down card and draws until the sum is at least 17, then the higher total wins (+1), equal
    totals draw (0), and a dealer bust wins for the player. ``info["success"]`` is True on a win. A step
    after the hand is over raises ``RuntimeError``: reset first.

    Observation: the image shows the dealer's face-up card and face-down card above the player's cards;
    when the hand ends, the dealer's cards are revealed and the outcome is written above the player's
    cards. The step text states the hand in words only with ``text_hint=True``.

    Truthful thoughts (``check_thoughts``): a thought must state the player's sum after "sum", "total",
    "my", "me", "player" or "I have" ("my sum is soft 17"; a "soft" or "hard" before it must be right) and
    the dealer's face-up card after "dealer" ("the dealer shows 10", "the dealer's card is a K", "dealer: A";
    an ace may also be written 1 or 11, a jack, queen or king 10 or its letter). Every other number must be
    the sum, one of the player's card values, the dealer's card, 17 or 21.

    Args:
        render_mode: ``"rgb_array"`` (default) or ``None``.
        image_size: Side of the square image in pixels.
        text_hint: Also state both hands in the step text (an ablation: the model need not read the image).

    Example:
        >>> env = BlackjackEnv()
        >>> observation, info = env.reset(seed=0)
        >>> observation["image"].shape, info["success"]
        ((128, 128, 3), False)
        >>> env.language.action_names
        ('stand', 'hit')
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["rgb_array"], "render_fps": 2}
    language: ClassVar[LanguageSpec] = LanguageSpec(
        "You are playing blackjack against the dealer. The image shows the dealer's cards at the top (one "
        "face up, one face down) and your cards at the bottom. Number cards count their number, J, Q and K "
        "count 10, and an ace counts 11 unless that takes the sum over 21, then it counts 1. Get a higher "
        'sum than the dealer without going over 21: "hit" takes another card, "stand" ends your turn and '
        "the dealer draws until reaching at least 17.",
        _ACTION_NAMES,
    )

    def __init__(self, render_mode: str | None = "rgb_array", image_size: int = 128, text_hint: bool = False) -> None:
        super().__init__(render_mode)
        if not 64 <= image_size <= 1024:
            raise ValueError(f"image_size must be 64..1024 pixels so the cards stay readable, got {image_size}.")
        self.image_size = int(image_size)
        self.text_hint = bool(text_hint)
        self.observation_space = observation_space(self.image_size, self.image_size)
        self.action_space = spaces.Discrete(len(_ACTION_NAMES))
        # Cards are (rank 1..13, suit 0..3); only the rank matters for play, the suit is for the picture.
        self.player: list[tuple[int, int]] = []
        self.dealer: list[tuple[int, int]] = []
        self.outcome: str | None = None  # "win", "lose", "draw" once the hand is over

    # -- game ---------------------------------------------------------------------------------------------
    def _draw_card(self) -> tuple[int, int]:
        # Uniform over 13 ranks is Gymnasium's deck [1..9, 10, 10, 10, 10] with the face cards told apart.
        rank = int(self.np_random.integers(1, 14))
        suit = int(self.np_random.integers(0, 4))
        return rank, suit

    @staticmethod
    def _values(hand: list[tuple[int, int]]) -> list[int]:
        return [card_value(rank) for rank, _ in hand]

    def player_total(self) -> tuple[int, bool]:
        """The player's best total and whether it is soft."""
        return hand_value(self._values(self.player))

    def dealer_total(self) -> tuple[int, bool]:
        """The dealer's best total (both cards, including the face-down one) and whether it is soft."""
        return hand_value(self._values(self.dealer))

    @property
    def dealer_up(self) -> int:
        """Value of the dealer's face-up card (ace = 1)."""
        return card_value(self.dealer[0][0])

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        # Same order as Gymnasium's Blackjack-v1: the dealer's hand first, then the player's.
        self.dealer = [self._draw_card(), self._draw_card()]
        self.player = [self._draw_card(), self._draw_card()]
        self.outcome = None
        return self._observation(), {"success": False}

    def step(self, action: Any) -> tuple[dict, float, bool, bool, dict]:
        action = self._check_action(action)
        if self.outcome is not None:
            raise RuntimeError("BlackjackEnv: the hand is over; call reset() before step().")
        reward = 0.0
        if action == HIT:
            self.player.append(self._draw_card())
            if self.player_total()[0] > 21:
                self.outcome, reward = "lose", -1.0
        else:
            while self.dealer_total()[0] < 17:
                self.dealer.append(self._draw_card())
            player, dealer = self.player_total()[0], self.dealer_total()[0]
            dealer = 0 if dealer > 21 else dealer  # a dealer bust loses to any standing hand
            reward = float(np.sign(player - dealer))
            self.outcome = {1.0: "win", 0.0: "draw", -1.0: "lose"}[reward]
        terminated = self.outcome is not None
        return self._observation(), reward, terminated, False, {"success": self.outcome == "win"}

    # -- observation ------------------------------------------------------------------------------------
    def _text(self) -> str:
        if self.outcome is not None:
            text = "The hand is over."
        else:
            text = "Your cards and the dealer's face-up card are shown in the image."
        if not self.text_hint:
            return text
        player = ", ".join(drawing.rank_label(rank) for rank, _ in self.player)
        hint = f" Your cards: {player} ({_describe_total(*self.player_total())})."
        if self.outcome is None:
            return text + hint + f" The dealer shows {drawing.rank_label(self.dealer[0][0])}."
        dealer = ", ".join(drawing.rank_label(rank) for rank, _ in self.dealer)
        return text + hint + f" The dealer's cards: {dealer} ({self.dealer_total()[0]}). You {self.outcome}."

    def _image(self) -> np.ndarray:
        size = self.image_size
        image, draw = drawing.new_canvas(size, size)
        margin = max(2, size // 32)
        label_height = size // 8
        row_height = (size - 2 * label_height - 3 * margin) // 2

        def row(top: int, label: str, hand: list[tuple[int, int]], hide_second: bool) -> None:
            drawing.draw_text_left(draw, (margin, top, size - margin, top + label_height), label)
            cards_top = top + label_height + margin // 2
            boxes = drawing.card_row_boxes(len(hand), (margin, cards_top, size - margin, cards_top + row_height))
            for index, (box, (rank, suit)) in enumerate(zip(boxes, hand, strict=True)):
                drawing.draw_card(draw, box, drawing.rank_label(rank), suit, face_down=hide_second and index == 1)

        row(margin, "Dealer", self.dealer, hide_second=self.outcome is None)
        player_label = (
            "You" if self.outcome is None else f"You: {'bust' if self.player_total()[0] > 21 else self.outcome}"
        )
        row(margin + label_height + row_height + margin, player_label, self.player, hide_second=False)
        return drawing.to_array(image)

    # -- expert ---------------------------------------------------------------------------------------------
    def expert_action(self) -> int:
        """Basic strategy (hit or stand only) for the current hand."""
        return basic_strategy(*self.player_total(), self.dealer_up)

    def expert_rationale(self) -> str:
        total, soft = self.player_total()
        up = "A" if self.dealer_up == 1 else str(self.dealer_up)
        action = _ACTION_NAMES[self.expert_action()]
        return f"My sum is {_describe_total(total, soft)} and the dealer shows {up}, so basic strategy says {action}."

    def check_thoughts(self, thoughts: str) -> bool:
        """Whether ``thoughts`` states the player's sum and the dealer's face-up card, and nothing false.

        See the class docstring for the rules.

        >>> env = BlackjackEnv()
        >>> _ = env.reset(seed=3)
        >>> env.expert_rationale()
        'My sum is hard 13 and the dealer shows 10, so basic strategy says hit.'
        >>> env.check_thoughts("Dealer's up card is a 10 while I have 13, so I hit.")
        True
        >>> env.check_thoughts("My sum is soft 13 and the dealer shows 10."), env.check_thoughts("I should hit.")
        (False, False)
        """
        total, soft = self.player_total()
        sums = introduced(thoughts, _PLAYER_WORDS, _SUM, stop=_DEALER_WORDS + r"|cards?")
        dealer = introduced(thoughts, _DEALER_WORDS, re.compile(CARD), window=6, stop=_PLAYER_WORDS)
        if not sums or not dealer:
            return False
        for match in sums:
            kind = match.group(1)
            if float(match.group(2)) != total or (kind is not None and (kind.lower() == "soft") != soft):
                return False
        if not all(card_fits(match.group(), self.dealer[0][0], ace_high=True) for match in dealer):
            return False
        allowed = {total, self.dealer_up, *self._values(self.player), *_RULE_NUMBERS}
        if 1 in (self.dealer_up, *self._values(self.player)):
            allowed.add(11)  # an ace counted high
        claimed = [match.span() for match in sums + dealer]
        return all(found.value in allowed for found in unclaimed_numbers(thoughts, claimed))
