"""What happens at each generated token: temperature, optional constrained decoding, log-prob recording,
and stopping as soon as the answer is complete.

Hugging Face ``generate`` drives the loop (KV cache, left padding, and each family's position handling);
this module plugs into it through one :class:`AnswerTracker` exposed as a logits processor and a
stopping criterion. The tracker is the only place that sees the exact distribution each token was
sampled from, so it records that token's log-probability and the distribution's entropy there, and
remembers which tokens were allowed, so :meth:`agents.policy.VLMPolicy.evaluate` can rebuild the same
distribution later.

Constrained decoding (``constrained=True``) keeps thoughts free text but makes the rest of the answer
exactly one legal action, so even an untrained model always acts validly:

* ``"cot"`` answers: ``{"thoughts": "`` is forced; thoughts are free except that they can only end
  with a quote that starts ``", "action": "<legal action>"}``; no backslash, control character or EOS
  inside them; when the token budget runs low the ending is forced.
* ``"action"`` answers: the answer is a legal action name followed by EOS.

Forced text is spelled one way only: each legal ending is cut greedily into the longest tokens that spell it,
and only the next of those tokens (or, at the end, the tokenizer's own EOS) is allowed. A tokenizer can
spell ``"right"`` as ``right``, ``ri|ght`` or ``r|i|g|h|t``; allowing every spelling would split one
action's probability over many token paths, and PPO, which credits the path that was sampled, would then
have to learn the same choice once per spelling. With one spelling per action, choosing the action is
choosing its first distinct token.

Constraints work on the text of tokens, never on token ids, so they hold for any tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from transformers import LogitsProcessor, StoppingCriteria

from envs.language import (
    COT_ACTION_MARKER,
    COT_ANSWER_PREFIX,
    COT_ANSWER_SUFFIX,
    PromptStyle,
    answer_complete,
)

#: Marks a generated position whose distribution was the free-thoughts mask of its grammar.
FREE = "free"


class TokenPieces:
    """The text each token adds when it follows other text, for every id of a tokenizer.

    Decoding a token alone loses the leading space of SentencePiece tokens (``"▁hit"`` decodes to
    ``"hit"``), so each piece is decoded after an anchor character and the anchor is cut off again.
    """

    def __init__(self, tokenizer) -> None:
        anchor = tokenizer.encode("a", add_special_tokens=False)[-1:]
        anchor_text = tokenizer.decode(anchor)
        vocab_size = len(tokenizer)
        decoded = tokenizer.batch_decode([anchor + [i] for i in range(vocab_size)], skip_special_tokens=False)
        # all_special_ids misses added special tokens that have no named role (Idefics3's <row_1_col_1>, the
        # tiny presets' <end_of_utterance>, which is also an EOS): they too are never part of an answer's text.
        added_special = {i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special}
        self.vocab_size = vocab_size
        self.pieces: list[str] = [text[len(anchor_text) :] for text in decoded]
        self.eos_ids: list[int] = sorted({i for i in _as_list(tokenizer.eos_token_id)} | _extra_eos_ids(tokenizer))
        special = set(tokenizer.all_special_ids) | added_special | set(self.eos_ids)
        self.by_piece: dict[str, list[int]] = {}
        for token_id, piece in enumerate(self.pieces):
            # Special tokens and partial UTF-8 bytes never spell out a constrained string.
            if token_id in special or not piece or "\ufffd" in piece:
                continue
            self.by_piece.setdefault(piece, []).append(token_id)
        self.special = special
        # The one EOS that closes a constrained answer: the tokenizer's own, else the first of the others.
        own = _as_list(tokenizer.eos_token_id)
        self.eos_id: int | None = own[0] if own else (self.eos_ids[0] if self.eos_ids else None)

    def longest(self, remainder: str) -> tuple[int, int] | None:
        """The id of the longest token that is a prefix of ``remainder`` and its length in characters."""
        for end in range(len(remainder), 0, -1):
            ids = self.by_piece.get(remainder[:end])
            if ids:
                return ids[0], end
        return None

    def spelling(self, text: str, start: int = 0) -> list[int]:
        """Where the greedy longest-token spelling of ``text[start:]`` puts token boundaries (offsets in
        ``text``, ``start`` and the end included); stops early where no token spells the rest."""
        boundaries = [start]
        while boundaries[-1] < len(text):
            found = self.longest(text[boundaries[-1] :])
            if found is None:
                break
            boundaries.append(boundaries[-1] + found[1])
        return boundaries


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _extra_eos_ids(tokenizer) -> set[int]:
    # Chat models end a turn with their own token (Qwen's <|im_end|>, Idefics3's <end_of_utterance>).
    ids = set()
    for token in ("<|im_end|>", "<end_of_utterance>", "<|eot_id|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id >= 0:
            ids.add(token_id)
    return ids


class AnswerGrammar:
    """The legal answers for one action set and prompt style, against one tokenizer."""

    def __init__(self, pieces: TokenPieces, action_names: tuple[str, ...], style: PromptStyle) -> None:
        self.pieces = pieces
        self.style = style
        if style == "cot":
            self.endings = [COT_ACTION_MARKER + name + COT_ANSWER_SUFFIX for name in action_names]
        else:
            self.endings = list(action_names)
        self.longest_ending = max(len(ending) for ending in self.endings)
        # Token boundaries of each ending's one spelling. A CoT ending is entered either from scratch (when
        # the budget runs low) or right after the free token that wrote its opening quote.
        starts = (0, 1) if style == "cot" else (0,)
        self.boundaries = [{b for start in starts for b in pieces.spelling(ending, start)} for ending in self.endings]
        # Worst case, a tokenizer spells a forced string one character per token (plus the final EOS).
        self.min_new_tokens = self.longest_ending + 1 + (len(COT_ANSWER_PREFIX) if style == "cot" else 0)
        self._open_cache: dict[str, frozenset[int]] = {}

    @cached_property
    def free_mask(self) -> torch.Tensor:
        """Boolean ``(vocab,)`` of the tokens allowed while thoughts are free text."""
        allowed = torch.ones(self.pieces.vocab_size, dtype=torch.bool)
        for token_id, piece in enumerate(self.pieces.pieces):
            if token_id in self.pieces.special or "\\" in piece or any(ord(ch) < 32 for ch in piece):
                allowed[token_id] = False
            elif '"' in piece:
                tail = piece[piece.index('"') :]
                allowed[token_id] = any(ending.startswith(tail) for ending in self.endings)
        return allowed

    def allowed(self, text: str, tokens_left: int) -> str | list[int] | None:
        """What may come next after the answer ``text``: :data:`FREE`, a list of ids, or ``None`` (no rule
        can help any more: the answer is already outside the grammar)."""
        if self.style == "action":
            return self._continue_ending(text, allow_eos=True)
        if not text.startswith(COT_ANSWER_PREFIX):
            if COT_ANSWER_PREFIX.startswith(text):
                found = self.pieces.longest(COT_ANSWER_PREFIX[len(text) :])
                return [found[0]] if found else None
            return None
        thoughts = text[len(COT_ANSWER_PREFIX) :]
        if '"' not in thoughts:
            # Leave room to spell the longest ending one character per token.
            if tokens_left <= self.longest_ending + 1:
                return self._continue_ending("", allow_eos=False)
            return FREE
        return self._continue_ending(thoughts[thoughts.index('"') :], allow_eos=False)

    def _continue_ending(self, tail: str, allow_eos: bool) -> list[int] | None:
        matching = [i for i, ending in enumerate(self.endings) if ending.startswith(tail)]
        if not matching:
            return None
        # Endings whose one spelling passes through here; a free token that wrote more than the opening
        # quote can land between two of its tokens, and then the rest is spelled greedily from here.
        on_spelling = [i for i in matching if len(tail) in self.boundaries[i]] or matching
        allowed: set[int] = set()
        for i in on_spelling:
            ending = self.endings[i]
            if ending == tail:
                if allow_eos and self.pieces.eos_id is not None:
                    allowed.add(self.pieces.eos_id)
                continue
            found = self.pieces.longest(ending[len(tail) :])
            if found is not None:
                allowed.add(found[0])
        if not allowed:  # the answer is complete: only the end of the turn remains
            allowed.update([self.pieces.eos_id] if self.pieces.eos_id is not None else self.pieces.eos_ids)
        return sorted(allowed)

    def reachable(self, text: str, ended: bool = False) -> frozenset[int]:
        """Indices of the actions that a legal continuation of the answer ``text`` can still end with;
        ``ended=True``: the answer ends here (an EOS was generated), so only an action it already spells
        counts. Empty when ``text`` is outside the grammar.

        Until the thoughts close, every action is open (a free token may start any ending); from there on
        the set follows :meth:`allowed` token by token.
        """
        if self.style == "cot":
            if not text.startswith(COT_ANSWER_PREFIX):
                open_ = COT_ANSWER_PREFIX.startswith(text) and not ended
                return frozenset(range(len(self.endings))) if open_ else frozenset()
            thoughts = text[len(COT_ANSWER_PREFIX) :]
            if '"' not in thoughts:
                return frozenset() if ended else frozenset(range(len(self.endings)))
            tail = thoughts[thoughts.index('"') :]
        else:
            tail = text
        actions = self._open_actions(tail)
        if ended:
            return frozenset(i for i in actions if self.endings[i] == tail)
        return actions

    def _open_actions(self, tail: str) -> frozenset[int]:
        """The actions reachable from an ending's ``tail`` by the tokens :meth:`_continue_ending` allows."""
        if tail not in self._open_cache:
            allowed = self._continue_ending(tail, allow_eos=self.style == "action")
            actions = set()
            if allowed is not None:
                actions = {i for i, ending in enumerate(self.endings) if ending == tail}
                for token_id in allowed:
                    if token_id not in self.pieces.special:  # EOS ends the answer: the action is complete
                        actions |= self._open_actions(tail + self.pieces.pieces[token_id])
            self._open_cache[tail] = frozenset(actions)
        return self._open_cache[tail]

    def action_choices(self, texts: list[str], ids: list[int]) -> list[bool]:
        """For each generated token, whether it chose among actions: before it several actions were open,
        and it closed some of them.

        Args:
            texts: The decoded answer before each token and after the last one (``len(ids) + 1`` strings,
                special tokens skipped, as :class:`AnswerTracker` decodes them).
            ids: The generated token ids.

        With one spelling per action that is exactly the tokens where the legal continuations lead to
        different actions, whatever their text: with the tiny tokenizer EZPoints' digits and operators part
        on ``' "'`` versus ``' "+"}'``, before any character of the action is written.
        """
        eos_ids = set(self.pieces.eos_ids)
        choices = []
        for index, token_id in enumerate(ids):
            before = self.reachable(texts[index])
            if token_id in eos_ids:
                after = self.reachable(texts[index], ended=True)
            else:
                after = self.reachable(texts[index + 1])
            choices.append(len(before) > 1 and after < before)
        return choices


@dataclass
class RowRecord:
    """What the tracker learned about one row of the batch."""

    token_logprobs: list[float]
    entropies: list[float]
    constraints: list[str | list[int] | None]
    length: int | None = None  # number of generated tokens that belong to the answer


class AnswerTracker:
    """Shared state of one batched ``generate`` call; see the module docstring.

    Args:
        tokenizer: The policy's tokenizer (to decode the growing answers).
        prompt_length: Length of the padded prompt; generated tokens start there.
        style: Prompt style of every row.
        temperature: Sampling temperature (applied here, so ``generate`` runs at temperature 1).
        grammars: One :class:`AnswerGrammar` per row for constrained decoding, or ``None``.
        max_new_tokens: The generation budget (the constrained ending is forced before it runs out).
        suppressed_ids: Tokens never sampled, constrained or not: the image/video placeholders, which the
            model's forward requires to match the images it is given (``evaluate`` masks them too).
    """

    def __init__(
        self,
        tokenizer,
        prompt_length: int,
        style: PromptStyle,
        temperature: float,
        grammars: list[AnswerGrammar] | None,
        max_new_tokens: int,
        eos_ids: list[int],
        batch_size: int,
        suppressed_ids: list[int] | tuple[int, ...] = (),
    ) -> None:
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.style = style
        self.temperature = temperature
        self.grammars = grammars
        self.max_new_tokens = max_new_tokens
        self.eos_ids = set(eos_ids)
        self.suppressed_ids = list(suppressed_ids)
        self.rows = [RowRecord([], [], []) for _ in range(batch_size)]
        self.texts = [""] * batch_size
        self._previous_logprobs: torch.Tensor | None = None

    # -- logits processor ---------------------------------------------------------------------------------
    def process(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_length
        self._record_chosen(input_ids)
        scores = scores.float() / self.temperature
        if self.suppressed_ids:
            scores[:, self.suppressed_ids] = float("-inf")
        if self.grammars is not None:
            scores = self._constrain(scores, step)
        logprobs = torch.log_softmax(scores, dim=-1)
        entropy = -(logprobs.exp() * logprobs.nan_to_num(neginf=0.0)).sum(-1)
        for row, record in enumerate(self.rows):
            if record.length is None:
                record.entropies.append(float(entropy[row]))
        self._previous_logprobs = logprobs
        return scores

    def _constrain(self, scores: torch.Tensor, step: int) -> torch.Tensor:
        tokens_left = self.max_new_tokens - step
        mask = torch.zeros_like(scores, dtype=torch.bool)
        for row, record in enumerate(self.rows):
            if record.length is not None:
                record_constraint = None
            else:
                record_constraint = self.grammars[row].allowed(self.texts[row], tokens_left)
                record.constraints.append(record_constraint)
            mask[row] = constraint_mask(record_constraint, self.grammars[row], scores.shape[-1], scores.device)
        return scores.masked_fill(~mask, float("-inf"))

    def _record_chosen(self, input_ids: torch.LongTensor) -> None:
        """Store the log-prob of the token sampled from the previous step's distribution."""
        if self._previous_logprobs is None:
            return
        chosen = input_ids[:, -1:]
        values = self._previous_logprobs.gather(-1, chosen.to(self._previous_logprobs.device)).squeeze(-1)
        for row, record in enumerate(self.rows):
            if record.length is None or len(record.token_logprobs) < record.length:
                record.token_logprobs.append(float(values[row]))
        self._previous_logprobs = None

    # -- stopping criterion ---------------------------------------------------------------------------------
    def stop(self, input_ids: torch.LongTensor) -> torch.BoolTensor:
        generated = input_ids[:, self.prompt_length :]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for row, record in enumerate(self.rows):
            if record.length is not None:
                done[row] = True
                continue
            ids = generated[row].tolist()
            self.texts[row] = self.tokenizer.decode(ids, skip_special_tokens=True)
            if ids[-1] in self.eos_ids or answer_complete(self.texts[row], self.style):
                record.length = len(ids)
                done[row] = True
        return done

    def finish(self, sequences: torch.LongTensor) -> list[RowRecord]:
        """Close the books after ``generate`` returns ``sequences`` (prompt included)."""
        self._record_chosen(sequences)
        generated = sequences.shape[1] - self.prompt_length
        for record in self.rows:
            if record.length is None:  # ran out of tokens: the whole budget is the answer
                record.length = generated
            del record.token_logprobs[record.length :]
            del record.entropies[record.length :]
            del record.constraints[record.length :]
        return self.rows


def replay_answer(
    answer: str, grammar: AnswerGrammar, tokenizer, max_new_tokens: int
) -> tuple[list[int], list[str | list[int] | None]]:
    """The token ids and per-token constraints that constrained ``act`` records when it writes ``answer``.

    The :class:`AnswerTracker`'s rules are replayed token by token: forced text takes the grammar's one
    spelling (at a choice, the allowed token that spells the most of the answer), free thoughts the
    tokenizer's own spelling of the rest of the answer, and the answer closes where ``act`` stops: at the
    JSON object's close (``"cot"``), or with the EOS after a bare action (``"action"``). The constraint of
    token ``i`` is ``grammar.allowed(answer so far, max_new_tokens - i)``, as in ``act``.

    Raises:
        ValueError: ``act`` cannot write ``answer`` under this grammar; the message says which part.
    """
    pieces = grammar.pieces

    def refuse(why: str) -> ValueError:
        shown = answer if len(answer) <= 80 else answer[:77] + "..."
        return ValueError(f"Constrained decoding cannot write the answer {shown!r}: {why}.")

    if grammar.style == "cot" and not answer.startswith(COT_ANSWER_PREFIX):
        raise refuse(f"a chain-of-thought answer starts with {COT_ANSWER_PREFIX!r}")
    ids: list[int] = []
    constraints: list[str | list[int] | None] = []
    text = ""
    free_ids: list[int] | None = None  # the tokenizer's spelling of the answer's rest, from the thoughts on
    while not answer_complete(text, grammar.style) and text != answer:
        if len(ids) == max_new_tokens:
            raise refuse(f"it needs more than max_new_tokens={max_new_tokens} tokens")
        allowed = grammar.allowed(text, max_new_tokens - len(ids))
        if allowed == FREE:
            if free_ids is None:
                free_ids = tokenizer.encode(answer[len(text) :], add_special_tokens=False)
            if not free_ids:
                raise refuse("it ends inside the thoughts")
            token_id = free_ids.pop(0)
            if not grammar.free_mask[token_id]:
                raise refuse(
                    f"the thoughts contain {pieces.pieces[token_id]!r}; free thoughts never hold a backslash, a "
                    "control character, a special token, or a quote that does not start the action"
                )
        else:
            rest = answer[len(text) :] if answer.startswith(text) else None
            fits = [t for t in allowed or [] if t not in pieces.special and rest and rest.startswith(pieces.pieces[t])]
            if not fits:
                thoughts = text[len(COT_ANSWER_PREFIX) :]
                if grammar.style == "cot" and text.startswith(COT_ANSWER_PREFIX) and '"' not in thoughts:
                    raise refuse(
                        f"its thoughts need more tokens than max_new_tokens={max_new_tokens} leaves (the action "
                        f"is forced from token {len(ids)} on)"
                    )
                expected = [pieces.pieces[t] for t in allowed or [] if t not in pieces.special]
                if not expected:
                    raise refuse(f"the answer is complete after {text!r}, where act stops")
                raise refuse(f"after {text[-30:]!r} only {expected} may follow, not {(rest or '')[:30]!r}")
            token_id = max(fits, key=lambda t: len(pieces.pieces[t]))
        ids.append(token_id)
        constraints.append(allowed)
        text = tokenizer.decode(ids, skip_special_tokens=True)
    if text != answer:
        raise refuse(f"the answer is complete after {text!r}, where act stops")
    if not answer_complete(text, grammar.style):
        if grammar.style == "cot":
            raise refuse("its JSON object does not close")
        allowed = grammar.allowed(text, max_new_tokens - len(ids))
        eos = [t for t in allowed or [] if t in pieces.eos_ids]
        if not eos:
            raise refuse(f"{text!r} is not a whole legal action")
        if len(ids) == max_new_tokens:
            raise refuse(f"it needs more than max_new_tokens={max_new_tokens} tokens with its EOS")
        ids.append(pieces.eos_id if pieces.eos_id in eos else eos[0])
        constraints.append(allowed)
    return ids, constraints


def constraint_mask(
    constraint: str | list[int] | None, grammar: AnswerGrammar | None, vocab_size: int, device: torch.device
) -> torch.Tensor:
    """Boolean ``(vocab,)`` of the tokens a recorded constraint allowed."""
    if constraint is None:
        return torch.ones(vocab_size, dtype=torch.bool, device=device)
    if constraint == FREE:
        mask = grammar.free_mask.to(device)
        if mask.shape[0] < vocab_size:  # models often pad the vocabulary; padding rows are never legal
            mask = torch.cat([mask, mask.new_zeros(vocab_size - mask.shape[0])])
        return mask
    mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    mask[torch.as_tensor(constraint, dtype=torch.long, device=device)] = True
    return mask


class TrackerLogits(LogitsProcessor):
    """The tracker as a ``generate`` logits processor."""

    def __init__(self, tracker: AnswerTracker) -> None:
        self.tracker = tracker

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self.tracker.process(input_ids, scores)


class TrackerStop(StoppingCriteria):
    """The tracker as a ``generate`` stopping criterion (per row)."""

    def __init__(self, tracker: AnswerTracker) -> None:
        self.tracker = tracker

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return self.tracker.stop(input_ids)
