"""The LVLM policy: observation -> prompt -> chain-of-thought + action, with the log-probs and values RL needs.

Data flow of one step (``act``)::

    {"image", "text"} + LanguageSpec --build_prompt + chat template--> prompt string
    prompt + image --processor--> model inputs --generate (AnswerTracker)--> answer tokens
    answer text --parse_action--> action | invalid(reason);  token offsets --> thought/action weights
    last prompt token's hidden state --value head--> value

Everything the update needs to recompute the same numbers is kept in each :class:`Completion`: the
prompt string and the image (re-encoded by the same processor), the generated ids, the per-token
weights and the constraints that were applied. ``evaluate`` rebuilds the sampling distribution from
them, so log-probs from ``act`` and ``evaluate`` agree (tested to 1e-4 for every supported family).

Sequence log-prob (RL4VLM, https://arxiv.org/abs/2405.10292, eq. 4): ``lambda * log p(thought tokens)
+ log p(action tokens)``. Action tokens are those whose text overlaps the action value the parser
found, plus every token that chose the action without writing any of it: under constrained decoding,
each token at which several actions were still open and which closed some of them (with the tiny
tokenizer EZPoints parts digits from operators on ``' "'`` versus ``' "+"}'``); in free text, the token
that writes the value's opening quote. All other tokens (the thoughts, the JSON punctuation, EOS) are
thought tokens. An answer with no recognisable action field (broken JSON, prose only) weights every
token 1: the whole answer is what the environment's response is about, so it is credited in full.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

from agents.decoding import (
    AnswerGrammar,
    AnswerTracker,
    TokenPieces,
    TrackerLogits,
    TrackerStop,
    constraint_mask,
    replay_answer,
)
from agents.models import PRESETS, Family, load_model, quiet_progress, resolve_dtype, seeded, tiny_chat_template
from envs.language import PROMPT_STYLES, LanguageSpec, answer_complete, build_prompt, parse_action

POLICY_FILE = "policy.json"
VALUE_HEAD_FILE = "value_head.safetensors"


@dataclass
class PolicyConfig:
    """Options of :func:`load_policy`. Defaults follow RL4VLM where it published them."""

    model: str = "tiny"
    """Preset name, hub id or local directory of an image-text-to-text model."""
    init_seed: int = 0
    """Initialisation seed of a preset's random weights (unused for pretrained ones), of the LoRA adapter and
    of the value head."""
    lora_rank: int = 8
    """LoRA rank; 0 trains the language model's full weights instead (small models only). RL4VLM: 128."""
    lora_alpha: int = 16
    """LoRA scaling numerator (the update is scaled by alpha / rank)."""
    lora_dropout: float = 0.0
    """LoRA dropout. Has no effect: every dropout is switched off at load, since dropout would make
    ``evaluate`` differ from ``act`` (ratio != 1)."""
    lora_target_modules: tuple[str, ...] | None = None
    """Module-name suffixes to adapt (e.g. ``("q_proj", "v_proj")``); default: every linear layer of the
    language model (RL4VLM: all linear layers)."""
    train_vision_tower: bool = False
    """Also adapt the vision tower's linear layers (and train the projector)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights' dtype. The value head always stays float32."""
    device: str = "auto"
    """``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``..."""
    attn_implementation: str | None = None
    """``"sdpa"``, ``"eager"``, ``"flash_attention_2"``; ``None`` lets transformers choose."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory (large models). Dropout is always off, so the
    model runs in training mode for the backward pass without changing its log-probs."""
    temperature: float = 0.2
    """Sampling temperature; log-probs are those of this distribution. RL4VLM: 0.2."""
    max_new_tokens: int = 128
    """Generation budget per answer; an answer cut by it is parsed as it stands."""
    thought_weight: float = 0.5
    """Lambda: weight of thought tokens in the sequence log-prob. RL4VLM: 0.5 (0.3-0.5 learn)."""
    prompt_style: Literal["cot", "action"] = "cot"
    """``"cot"``: JSON with thoughts and action; ``"action"``: the action name alone."""
    constrained: bool = False
    """Restrict the action part of the answer to legal action strings (thoughts stay free)."""
    value_hidden_sizes: tuple[int, ...] = (1024, 512)
    """Hidden layer sizes of the value head MLP (RL4VLM's value head is an MLP of this shape)."""

    def __post_init__(self) -> None:
        if self.prompt_style not in PROMPT_STYLES:
            raise ValueError(f"prompt_style must be one of {PROMPT_STYLES}, got {self.prompt_style!r}.")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (got {self.temperature}); use act(greedy=True) for argmax.")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0 = full fine-tuning), got {self.lora_rank}.")
        if self.max_new_tokens < 4:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} cannot hold an answer; use at least 4.")
        if not 0.0 <= self.thought_weight <= 1.0:
            raise ValueError(f"thought_weight (lambda) must be in [0, 1], got {self.thought_weight}.")
        resolve_dtype(self.dtype)
        if self.lora_target_modules is not None:
            self.lora_target_modules = tuple(self.lora_target_modules)
        self.value_hidden_sizes = tuple(self.value_hidden_sizes)


@dataclass
class Completion:
    """One answered observation, with everything needed to recompute its log-prob and value: written by
    :meth:`VLMPolicy.act`, or given (a demonstration) and built by :meth:`VLMPolicy.completions_for`."""

    prompt: str
    """The full prompt string given to the processor (chat template applied)."""
    image: np.ndarray
    """The observation image, uint8 (H, W, 3)."""
    action_names: tuple[str, ...]
    """Legal actions at this step (the constrained grammar is rebuilt from them)."""
    response_ids: torch.Tensor
    """Generated token ids, 1-D, EOS included when the model produced it."""
    token_weights: torch.Tensor
    """Per-token weight in the sequence log-prob: ``thought_weight`` or 1 (see :meth:`VLMPolicy.token_weights`)."""
    constraints: list[str | list[int] | None] | None
    """Per generated token: which tokens were allowed (``None`` everywhere when unconstrained)."""
    text: str
    """The decoded answer."""
    action: int | None
    """Parsed action index, or ``None`` when the answer is invalid."""
    reason: str | None
    """Why the answer is invalid."""
    logprob: float
    """Weighted sequence log-prob under the sampling distribution (``completions_for``: at temperature 1)."""
    token_logprobs: torch.Tensor
    """Per-token log-probs under the sampling distribution (``completions_for``: at temperature 1)."""
    entropy: float
    """Mean per-token entropy of the sampling distribution (``completions_for``: at temperature 1)."""
    value: float
    """Value head's estimate for the prompt."""

    @property
    def valid(self) -> bool:
        return self.action is not None


@dataclass
class Evaluation:
    """Recomputed quantities for a batch of completions (differentiable)."""

    logprob: torch.Tensor  # (B,) weighted sequence log-prob
    entropy: torch.Tensor  # (B,) mean per-token entropy
    value: torch.Tensor  # (B,)
    token_logprobs: torch.Tensor  # (B, R), zero where token_mask is False
    token_mask: torch.Tensor  # (B, R)


class ValueHead(nn.Module):
    """MLP from the last prompt token's last-layer hidden state to a scalar value (RL4VLM)."""

    def __init__(self, input_size: int, hidden_sizes: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        size = input_size
        for hidden in hidden_sizes:
            layers += [nn.Linear(size, hidden), nn.ReLU()]
            size = hidden
        layers.append(nn.Linear(size, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden.float()).squeeze(-1)


def to_pil(image: Any) -> Image.Image:
    """Any reasonable image (uint8 or [0, 1] float array, grey, RGBA, PIL) as an RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating) and array.size and array.max() <= 1.0:
            array = array * 255.0
        array = np.clip(array, 0, 255).astype(np.uint8)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # CHW -> HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3):
        raise ValueError(f"Expected an image of shape (H, W), (H, W, C) or (C, H, W), got {array.shape}.")
    return Image.fromarray(array).convert("RGB")


def split_observations(observations: Any) -> tuple[list[np.ndarray], list[str]]:
    """Images and step texts from a list of observations or a vector env's batched observation."""
    if isinstance(observations, dict):
        images = list(observations["image"])
        texts = list(observations.get("text", [""] * len(images)))
    else:
        images = [obs["image"] for obs in observations]
        texts = [obs.get("text", "") for obs in observations]
    return images, [str(text) for text in texts]


class VLMPolicy(nn.Module):
    """A vision-language model acting as a policy. Build it with :func:`load_policy`."""

    def __init__(self, model, processor, family: Family, config: PolicyConfig) -> None:
        super().__init__()
        self.config = config
        self.family = family
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = model
        hidden_size = model.config.get_text_config().hidden_size
        with seeded(config.init_seed):
            self.value_head = ValueHead(hidden_size, config.value_hidden_sizes)
        self._hidden: torch.Tensor | None = None
        self._capture: str | None = None
        # The value head reads the language model's last hidden state; a hook avoids asking generate() for
        # every layer's hidden states (and avoids registering the decoder twice as a submodule).
        model.get_decoder().register_forward_hook(self._keep_hidden)
        self._pieces: TokenPieces | None = None
        self._grammars: dict[tuple[tuple[str, ...], str], AnswerGrammar] = {}
        self.chat_template = processor.chat_template or tiny_chat_template(family.image_placeholder)
        # An image/video placeholder sampled into an answer makes the next forward fail ("Image features and
        # image tokens do not match"): an untrained model samples one every ~1000 tokens. Never sample them.
        self.suppressed_ids = sorted(
            {
                token_id
                for key in ("image_token_id", "image_token_index", "video_token_id")
                if isinstance(token_id := getattr(model.config, key, None), int) and token_id >= 0
            }
        )

    # -- plumbing -----------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.value_head.net[0].weight.device

    def _keep_hidden(self, module: nn.Module, args: Any, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        if self._capture == "prefill":  # generate: the first call sees the whole prompt
            self._hidden = hidden[:, -1]
            self._capture = None
        elif self._capture == "all":
            self._hidden = hidden
            self._capture = None

    @property
    def pieces(self) -> TokenPieces:
        if self._pieces is None:
            self._pieces = TokenPieces(self.tokenizer)
        return self._pieces

    def grammar(self, action_names: tuple[str, ...]) -> AnswerGrammar:
        key = (action_names, self.config.prompt_style)
        if key not in self._grammars:
            self._grammars[key] = AnswerGrammar(self.pieces, action_names, self.config.prompt_style)
        return self._grammars[key]

    def prompt_text(self, spec: LanguageSpec, step_text: str) -> str:
        """The full prompt string for one observation (chat template applied)."""
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "text", "text": build_prompt(spec, step_text, self.config.prompt_style)},
                ],
            }
        ]
        return self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, chat_template=self.chat_template
        )

    def encode(self, prompts: list[str], images: list[Any]) -> dict[str, torch.Tensor]:
        """Processor inputs (left padded) for a batch of prompt strings and images."""
        pil_images: list[Any] = [to_pil(image) for image in images]
        if self.family.nested_images:
            pil_images = [[image] for image in pil_images]
        inputs = self.processor(text=prompts, images=pil_images, padding=True, return_tensors="pt")
        dtype = next(self.model.parameters()).dtype
        return {
            key: value.to(self.device, dtype=dtype if value.is_floating_point() else None)
            for key, value in inputs.items()
        }

    # -- acting -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def act(self, observations: Any, spec: LanguageSpec | list[LanguageSpec], greedy: bool = False) -> list[Completion]:
        """Answer a batch of observations in one batched ``generate``.

        Args:
            observations: A list of ``{"image", "text"}`` dicts, or a vector env's batched observation.
            spec: The language spec of the environment (or one per observation).
            greedy: Take the most likely token instead of sampling (log-probs stay those of the
                temperature-scaled distribution).
        """
        images, texts = split_observations(observations)
        specs = spec if isinstance(spec, list) else [spec] * len(images)
        if len(specs) != len(images):
            raise ValueError(f"Got {len(images)} observations but {len(specs)} language specs.")
        prompts = [self.prompt_text(s, t) for s, t in zip(specs, texts)]
        inputs = self.encode(prompts, images)
        prompt_length = inputs["input_ids"].shape[1]
        self.model.eval()
        grammars = [self.grammar(s.action_names) for s in specs] if self.config.constrained else None
        if grammars is not None:
            needed = max(grammar.min_new_tokens for grammar in grammars)
            if self.config.max_new_tokens < needed:
                raise ValueError(
                    f"max_new_tokens={self.config.max_new_tokens} may be too few to spell a legal answer under "
                    f"constrained decoding; these actions need at least {needed}."
                )
        tracker = AnswerTracker(
            self.tokenizer,
            prompt_length,
            self.config.prompt_style,
            self.config.temperature,
            grammars,
            self.config.max_new_tokens,
            self.pieces.eos_ids,
            len(prompts),
            suppressed_ids=self.suppressed_ids,
        )
        self._capture = "prefill"
        try:
            output = self.model.generate(
                **inputs,
                generation_config=self._generation_config(greedy),
                logits_processor=LogitsProcessorList([TrackerLogits(tracker)]),
                stopping_criteria=StoppingCriteriaList([TrackerStop(tracker)]),
                # Each rank acts for its own envs, so ranks generate different numbers of tokens. transformers
                # turns synced_gpus on for an FSDP-managed model (every rank steps until all are done, one
                # all-reduce per token); ours acts with whole parameters and must not wait for the others.
                synced_gpus=False,
            )
        finally:
            self._capture = None
        values = self.value_head(self._hidden).tolist()
        sequences = output.sequences if hasattr(output, "sequences") else output
        records = tracker.finish(sequences)
        completions = []
        for row, record in enumerate(records):
            response = sequences[row, prompt_length : prompt_length + record.length].cpu()
            text = self.tokenizer.decode(response, skip_special_tokens=True)
            parsed = parse_action(text, specs[row], self.config.prompt_style)
            weights = self.token_weights(response, parsed.action_span, grammars[row] if grammars else None)
            token_logprobs = torch.tensor(record.token_logprobs)
            completions.append(
                Completion(
                    prompt=prompts[row],
                    image=np.asarray(images[row]),
                    action_names=specs[row].action_names,
                    response_ids=response,
                    token_weights=weights,
                    constraints=record.constraints if grammars is not None else None,
                    text=text,
                    action=parsed.action,
                    reason=parsed.reason,
                    logprob=float((weights * token_logprobs).sum()),
                    token_logprobs=token_logprobs,
                    entropy=float(np.mean(record.entropies)) if record.entropies else 0.0,
                    value=values[row],
                )
            )
        return completions

    @torch.no_grad()
    def completions_for(
        self,
        observations: Any,
        spec: LanguageSpec | list[LanguageSpec],
        answers: list[str],
        score: bool = True,
    ) -> list[Completion]:
        """Completions for given answers (demonstrations, preference pairs), as if ``act`` had written them.

        The prompt is ``act``'s; the answer's tokens are those ``act`` would generate for this text: under
        constrained decoding the forced parts in the grammar's one spelling, the free thoughts in the
        tokenizer's own, and the constraints ``act`` would record, so ``evaluate`` applies the same masks;
        free answers in the tokenizer's spelling. The answer ends where ``act``'s would: a complete JSON
        answer without EOS (``act`` stops when the object closes), anything else (a bare action name, prose)
        with the tokenizer's EOS. Weights follow :meth:`token_weights`.

        Args:
            observations: As for :meth:`act`.
            spec: The language spec (or one per observation).
            answers: One answer text per observation, e.g. ``envs.format_answer(name, thoughts=...)``.
            score: Fill ``logprob``, ``token_logprobs``, ``entropy`` and ``value`` from one ``evaluate`` pass
                at temperature 1 (the model's own likelihood, as SFT and DPO want; no gradients). ``False``
                leaves them at zero.

        Raises:
            ValueError: ``act`` could never write an answer: under constrained decoding, an illegal action,
                a malformed answer, forbidden characters in the thoughts, too long for ``max_new_tokens``;
                free or constrained, text after the point where ``act`` stops.
        """
        images, texts = split_observations(observations)
        specs = spec if isinstance(spec, list) else [spec] * len(images)
        if not len(images) == len(specs) == len(answers):
            raise ValueError(f"Got {len(images)} observations, {len(specs)} language specs and {len(answers)} answers.")
        completions = []
        for image, step_text, row_spec, answer in zip(images, texts, specs, answers):
            parsed = parse_action(answer, row_spec, self.config.prompt_style)
            grammar = None
            if self.config.constrained:
                if not parsed.valid:
                    raise ValueError(
                        f"Constrained decoding only writes legal actions; answer {answer!r}: {parsed.reason}."
                    )
                grammar = self.grammar(row_spec.action_names)
                ids, constraints = replay_answer(answer, grammar, self.tokenizer, self.config.max_new_tokens)
            else:
                ids, constraints = self._free_answer_ids(answer), None
            response = torch.tensor(ids, dtype=torch.long)
            completions.append(
                Completion(
                    prompt=self.prompt_text(row_spec, step_text),
                    image=np.asarray(image),
                    action_names=row_spec.action_names,
                    response_ids=response,
                    token_weights=self.token_weights(response, parsed.action_span, grammar),
                    constraints=constraints,
                    text=answer,
                    action=parsed.action,
                    reason=parsed.reason,
                    logprob=0.0,
                    token_logprobs=torch.zeros(len(ids)),
                    entropy=0.0,
                    value=0.0,
                )
            )
        if score and completions:
            evaluation = self.evaluate(completions, temperature=1.0)
            for row, completion in enumerate(completions):
                completion.logprob = float(evaluation.logprob[row])
                completion.token_logprobs = evaluation.token_logprobs[row, : len(completion.response_ids)].cpu()
                completion.entropy = float(evaluation.entropy[row])
                completion.value = float(evaluation.value[row])
        return completions

    def _free_answer_ids(self, answer: str) -> list[int]:
        """The tokenizer's spelling of an unconstrained answer, ending where ``act`` would end it."""
        ids = self.tokenizer.encode(answer, add_special_tokens=False)
        style = self.config.prompt_style
        for length in range(1, len(ids)):
            written = self.tokenizer.decode(ids[:length], skip_special_tokens=True)
            if ids[length - 1] in self.pieces.eos_ids or answer_complete(written, style):
                raise ValueError(f"act stops generating after {written!r}; the answer {answer!r} goes on.")
        if set(ids) & set(self.suppressed_ids):
            raise ValueError(f"The answer {answer!r} holds an image placeholder token, which act never samples.")
        decoded = self.tokenizer.decode(ids, skip_special_tokens=True)
        if decoded != answer:
            raise ValueError(f"The tokenizer does not reproduce the answer {answer!r}: it decodes as {decoded!r}.")
        if not answer_complete(answer, style):
            if self.pieces.eos_id is None:
                raise ValueError(f"The answer {answer!r} is incomplete and the tokenizer has no EOS to end it.")
            ids.append(self.pieces.eos_id)
        if len(ids) > self.config.max_new_tokens:
            raise ValueError(
                f"The answer {answer[:60]!r}... takes {len(ids)} tokens, more than max_new_tokens="
                f"{self.config.max_new_tokens}."
            )
        return ids

    @torch.no_grad()
    def values(self, observations: Any, spec: LanguageSpec | list[LanguageSpec]) -> torch.Tensor:
        """Value estimates without generating (one forward pass over the prompts), e.g. to bootstrap
        from the final observation of a truncated episode. Equal to the ``value`` ``act`` reports."""
        images, texts = split_observations(observations)
        specs = spec if isinstance(spec, list) else [spec] * len(images)
        inputs = self.encode([self.prompt_text(s, t) for s, t in zip(specs, texts)], images)
        if self.family.rope_from_attention_mask:
            inputs["position_ids"] = text_positions(inputs["attention_mask"])
        self.model.eval()
        self._capture = "prefill"
        try:
            self.model(**inputs, use_cache=False, logits_to_keep=1)
        finally:
            self._capture = None
        return self.value_head(self._hidden).cpu()

    def _generation_config(self, greedy: bool) -> GenerationConfig:
        # Every warper is switched off explicitly: a checkpoint's own generation_config (Qwen ships
        # top_k=1, top_p=0.001) would otherwise change the distribution we sample from behind our back.
        return GenerationConfig(
            do_sample=not greedy,
            temperature=1.0,  # applied by the AnswerTracker
            top_k=None if greedy else 0,  # greedy ignores it (and transformers warns if it is set)
            top_p=1.0,
            min_p=None,
            typical_p=1.0,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            max_new_tokens=self.config.max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.pieces.eos_ids,
            bos_token_id=self.tokenizer.bos_token_id,
            return_dict_in_generate=True,
        )

    def token_weights(
        self,
        response_ids: torch.Tensor,
        action_span: tuple[int, int] | None,
        grammar: AnswerGrammar | None = None,
    ) -> torch.Tensor:
        """Per-token weights: 1 for action tokens, ``thought_weight`` (lambda) for the rest.

        Action tokens are the tokens whose text overlaps the action value (``action_span``, character
        offsets in the decoded answer), and besides:

        * constrained answers (``grammar`` given): every token that chose among actions, i.e. where
          several actions were still open and the token closed some of them
          (:meth:`AnswerGrammar.action_choices`), whatever its text;
        * free answers: the token that writes the value's opening quote, where the model chooses
          between, say, ``' "'`` (then a digit) and a merged ``' "+"}'``.

        An answer without an action field weights every token 1.
        """
        count = len(response_ids)
        if action_span is None:
            return torch.ones(count)
        ids = response_ids.tolist()
        texts = decoded_prefixes(self.tokenizer, ids)
        start, end = action_span
        if grammar is None and texts[-1][start - 1 : start] == '"':
            start -= 1  # a JSON string's opening quote (bare action answers have none)
        weights = torch.full((count,), float(self.config.thought_weight))
        previous = 0
        for index, token_end in enumerate(text_end_offsets(texts[1:])):
            if previous < end and token_end > start:
                weights[index] = 1.0
            previous = token_end
        if grammar is not None:
            weights[torch.tensor(grammar.action_choices(texts, ids), dtype=torch.bool)] = 1.0
        return weights

    # -- evaluating ---------------------------------------------------------------------------------------
    def evaluate(self, completions: list[Completion], temperature: float | None = None) -> Evaluation:
        """Recompute log-probs, entropy and values of stored completions, with gradients.

        Call it on one micro-batch at a time and backpropagate before the next (see ``agents/ppo.py``).
        ``temperature``: of the distribution the log-probs are taken under; ``None`` is the sampling
        temperature (``config.temperature``), as PPO's ratios need; SFT and DPO likelihoods use 1.0.

        In a data-parallel run (``Run.prepare``) a pass with gradients goes through the DDP wrapper, whose
        ``forward`` (this policy's :meth:`forward`) hooks the gradient all-reduce into backward. Under FSDP
        the policy is its own wrapper (sharded in place) and every pass goes through it: its hooks gather
        each layer's parameters for the pass.
        """
        wrapper = self.__dict__.get("_data_parallel")
        if wrapper is not None and (torch.is_grad_enabled() or wrapper is self):
            return wrapper(completions, temperature)
        return self.forward(completions, temperature)

    def forward(self, completions: list[Completion], temperature: float | None = None) -> Evaluation:
        """:meth:`evaluate` itself: the entry point a DDP wrapper calls."""
        if temperature is not None and temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        # transformers recomputes activations (gradient checkpointing) only in training mode; dropout was
        # switched off at load time, so training mode computes the same function that acted.
        self.model.train(self.config.gradient_checkpointing and torch.is_grad_enabled())
        inputs = self.encode([c.prompt for c in completions], [c.image for c in completions])
        prompt_ids = inputs.pop("input_ids")
        prompt_mask = inputs.pop("attention_mask")
        prompt_length = prompt_ids.shape[1]
        lengths = [len(c.response_ids) for c in completions]
        longest = max(lengths)
        pad = self.tokenizer.pad_token_id
        response = torch.full((len(completions), longest), pad, dtype=torch.long)
        token_mask = torch.zeros((len(completions), longest), dtype=torch.bool)
        weights = torch.zeros((len(completions), longest))
        for row, completion in enumerate(completions):
            response[row, : lengths[row]] = completion.response_ids
            token_mask[row, : lengths[row]] = True
            weights[row, : lengths[row]] = completion.token_weights
        response, token_mask, weights = (t.to(self.device) for t in (response, token_mask, weights))
        input_ids = torch.cat([prompt_ids, response], dim=1)
        attention_mask = torch.cat([prompt_mask, token_mask.long()], dim=1)
        if "mm_token_type_ids" in inputs:  # Qwen2-VL marks image tokens; answer tokens are text (0)
            inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(response)], dim=1)
        if self.family.rope_from_attention_mask:
            inputs["position_ids"] = text_positions(attention_mask)
        self._capture = "all"
        try:
            output = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                use_cache=False,
                logits_to_keep=longest + 1,
                **inputs,
            )
        finally:
            self._capture = None
        value = self.value_head(self._hidden[:, prompt_length - 1])
        logits = output.logits[:, :-1].float() / (self.config.temperature if temperature is None else temperature)
        if self.suppressed_ids:  # as in act (AnswerTracker)
            logits[..., self.suppressed_ids] = float("-inf")
        if any(c.constraints is not None for c in completions):
            logits = logits.masked_fill(~self._constraint_masks(completions, logits.shape), float("-inf"))
        logprobs = torch.log_softmax(logits, dim=-1)
        token_logprobs = logprobs.gather(-1, response.unsqueeze(-1)).squeeze(-1).masked_fill(~token_mask, 0.0)
        entropy_per_token = -(logprobs.exp() * logprobs.nan_to_num(neginf=0.0)).sum(-1)
        counts = token_mask.sum(-1).clamp(min=1)
        return Evaluation(
            logprob=(weights * token_logprobs).sum(-1),
            entropy=(entropy_per_token * token_mask).sum(-1) / counts,
            value=value,
            token_logprobs=token_logprobs,
            token_mask=token_mask,
        )

    def _constraint_masks(self, completions: list[Completion], shape: torch.Size) -> torch.Tensor:
        masks = torch.ones(shape, dtype=torch.bool, device=self.device)
        for row, completion in enumerate(completions):
            if completion.constraints is None:
                continue
            grammar = self.grammar(completion.action_names)
            for position, constraint in enumerate(completion.constraints):
                if constraint is not None:
                    masks[row, position] = constraint_mask(constraint, grammar, shape[-1], self.device)
        return masks

    @torch.no_grad()
    def reference_logprobs(self, completions: list[Completion], temperature: float | None = None) -> Evaluation:
        """Log-probs under the base model (LoRA switched off): the reference of a KL penalty (or of DPO, at
        ``temperature=1.0``; see :meth:`evaluate`)."""
        if not hasattr(self.model, "disable_adapter"):
            raise ValueError("A reference policy needs LoRA (lora_rank > 0); full fine-tuning keeps no base copy.")
        with self.model.disable_adapter():
            return self.evaluate(completions, temperature)

    # -- saving -------------------------------------------------------------------------------------------
    def save(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write the adapter (or full weights), the value head and the options to ``directory``.

        ``state_dict``: the policy's whole state dict, when this process holds only a shard of it (FSDP;
        ``DataParallel.policy_state``); by default the policy's own.
        """
        from safetensors.torch import save_file

        def part(prefix: str) -> dict[str, torch.Tensor] | None:
            if state_dict is None:
                return None
            return {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = asdict(self.config)
        base_state = part("model.")
        if self.config.lora_rank > 0:
            # PEFT keeps the adapter's weights only out of the state dict it is given.
            given = {} if base_state is None else {"state_dict": base_state}
            self.model.save_pretrained(directory / "adapter", **given)
            base_model = self.model.get_base_model()
            # PEFT wrapped the base model's linear layers in place (q_proj.weight is now
            # q_proj.base_layer.weight, beside lora_A/lora_B): save the base weights under their own names,
            # or loading the copy would re-initialise every adapted layer at random.
            base_state = {
                key.replace(".base_layer.", "."): value
                for key, value in (part("model.base_model.model.") or base_model.state_dict()).items()
                if "lora_" not in key
            }
        else:
            base_model = self.model
        if self.config.lora_rank == 0 or self.config.model in PRESETS:
            # Presets and fully fine-tuned weights cannot be fetched by name: keep a copy beside the adapter.
            with quiet_progress():
                base_model.save_pretrained(directory / "base", state_dict=base_state)
            self.processor.save_pretrained(directory / "base")
            if self.processor.chat_template is None:
                (directory / "base" / "chat_template.jinja").write_text(self.chat_template)
        head = part("value_head.") or self.value_head.state_dict()
        state = {k: v.detach().cpu().contiguous() for k, v in head.items()}
        save_file(state, str(directory / VALUE_HEAD_FILE))
        (directory / POLICY_FILE).write_text(json.dumps({"format": 1, "config": config}, indent=2))

    @classmethod
    def load(cls, directory: str | Path, **overrides: Any) -> VLMPolicy:
        """Load a policy written by :meth:`save`; ``overrides`` change options (device, temperature...)."""
        return load_policy(str(directory), **overrides)


def text_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """The positions ``generate`` gives a left-padded batch: padding does not advance them."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def decoded_prefixes(tokenizer, ids: list[int]) -> list[str]:
    """``tokenizer.decode(ids[:i])`` for ``i`` in ``0..len(ids)``, special tokens skipped (as ``act`` decodes)."""
    return [tokenizer.decode(ids[:index], skip_special_tokens=True) for index in range(len(ids) + 1)]


def text_end_offsets(prefixes: list[str]) -> list[int]:
    """Character offset where each token's text ends, from the decoded answer after each token.

    Decoding prefixes handles every tokenizer (byte-level BPE, SentencePiece) and special tokens; a token
    that completes a multi-byte character owns that character.
    """
    ends = []
    longest = 0
    for text in prefixes:
        longest = max(longest, len(text.rstrip("\ufffd")))
        ends.append(longest)
    return ends


def _linear_module_names(model, include_vision: bool) -> list[str]:
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name.endswith("lm_head"):
            continue
        in_vision = any(part in name for part in ("vision", "visual", "multi_modal_projector", "connector", "merger"))
        if in_vision and not include_vision:
            continue
        names.append(name)
    return names


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available here; use device='cpu' or 'auto'.")
    return device


def resolve_policy_directory(name_or_path: str) -> str:
    """A run directory (``runs/<run>``, e.g. of SFT) or one of its checkpoints names the policy of its newest
    intact checkpoint; any other name is returned as it is."""
    path = Path(name_or_path).expanduser()
    if (path / "checkpoints").is_dir() or (path / "manifest.json").exists():
        from agents.checkpoint import POLICY_DIR, find_checkpoint

        return str(find_checkpoint(path, purpose="Loading the policy") / POLICY_DIR)
    return name_or_path


def load_policy(name_or_path: str = "tiny", **options: Any) -> VLMPolicy:
    """Build a policy from a preset, hub id, model directory, a directory written by ``save``, or a run
    directory (its newest intact checkpoint's policy: how PPO starts from an SFT run). A directory saved by
    an action-head policy (it holds ``vla.json``, ``agents/vla.py``) loads as that policy.

    >>> policy = load_policy("tiny", prompt_style="action", constrained=True)
    >>> import envs, gymnasium as gym
    >>> env = gym.make("vlmrl/GridWorld-v0")
    >>> observation, _ = env.reset(seed=0)
    >>> [completion] = policy.act([observation], envs.get_language("vlmrl/GridWorld-v0"))
    >>> completion.valid, completion.text in envs.get_language("vlmrl/GridWorld-v0").action_names
    (True, True)
    """
    directory = resolve_policy_directory(name_or_path)
    if (Path(directory) / "vla.json").exists():
        from agents.vla import load_vla_policy

        return load_vla_policy(directory, **options)
    return load_text_policy(directory, **options)


def load_text_policy(name_or_path: str = "tiny", **options: Any) -> VLMPolicy:
    """:func:`load_policy` for a text policy (:class:`VLMPolicy`), whatever the directory holds besides: also
    the backbone of an action-head policy."""
    from peft import LoraConfig, PeftModel, get_peft_model

    known = {f.name for f in fields(PolicyConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"Unknown policy option(s) {unknown}. Available: {', '.join(sorted(known))}.")
    name_or_path = resolve_policy_directory(name_or_path)
    saved_file = Path(name_or_path) / POLICY_FILE
    saved = json.loads(saved_file.read_text())["config"] if saved_file.exists() else None
    if saved is not None:
        config = PolicyConfig(**{**saved, **options})
        directory = Path(name_or_path)
        base = str(directory / "base") if (directory / "base").exists() else config.model
    else:
        config = PolicyConfig(**{**options, "model": name_or_path})
        base = name_or_path
    device = _resolve_device(config.device)
    model, processor, family = load_model(
        base, seed=config.init_seed, dtype=config.dtype, attn_implementation=config.attn_implementation
    )
    if config.lora_rank > 0:
        if saved is not None and (Path(name_or_path) / "adapter").exists():
            model = PeftModel.from_pretrained(model, str(Path(name_or_path) / "adapter"), is_trainable=True)
        else:
            targets = _linear_module_names(model, config.train_vision_tower)
            if config.lora_target_modules is not None:
                targets = [n for n in targets if n.split(".")[-1] in config.lora_target_modules]
                if not targets:
                    raise ValueError(
                        f"lora_target_modules={config.lora_target_modules} matches no linear layer of {base}."
                    )
            lora = LoraConfig(
                r=config.lora_rank,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                target_modules=targets,
                bias="none",
            )
            # LoRA A is random: seed it, so init_seed fixes the whole policy and the caller's RNG is untouched.
            with seeded(config.init_seed):
                model = get_peft_model(model, lora)
    else:
        if saved is not None and (Path(name_or_path) / "adapter").exists():
            # Full fine-tuning from a LoRA-trained policy: fold its adapter into the weights, or it is lost.
            model = PeftModel.from_pretrained(model, str(Path(name_or_path) / "adapter")).merge_and_unload()
        for name, parameter in model.named_parameters():
            in_vision = any(p in name for p in ("vision", "visual", "multi_modal_projector", "connector", "merger"))
            parameter.requires_grad_(config.train_vision_tower or not in_vision)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    policy = VLMPolicy(model, processor, family, config)
    if saved is not None and (Path(name_or_path) / VALUE_HEAD_FILE).exists():
        saved_sizes = tuple(saved.get("value_hidden_sizes", config.value_hidden_sizes))
        if saved_sizes == tuple(config.value_hidden_sizes):
            from safetensors.torch import load_file

            policy.value_head.load_state_dict(load_file(str(Path(name_or_path) / VALUE_HEAD_FILE)))
        else:  # another head was asked for: the saved one cannot hold it, so it starts fresh
            warnings.warn(
                f"value_hidden_sizes={tuple(config.value_hidden_sizes)} differs from the saved head's "
                f"{saved_sizes} in {name_or_path}: the value head starts fresh.",
                stacklevel=2,
            )
    disable_dropout(policy.model)  # act and evaluate must see the same function, in either mode
    policy.model.eval()
    return policy.to(device)


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0: dropout modules, and the float rates attention layers read.

    An RL update must recompute the log-probs of the function that acted; with dropout off the model can
    also run in training mode, which gradient checkpointing needs.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout", "attn_dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


__all__ = ["Completion", "Evaluation", "PolicyConfig", "VLMPolicy", "load_policy", "to_pil"]
