"""A learned reward model: a vision-language model with a scalar head, trained on preference pairs.

The model reads the image, the prompt and an answer, and the head maps the last-layer hidden state of the
last answer token (the last non-padding token of prompt + answer) to one score. It is trained with the
Bradley-Terry loss ``-log sigmoid(r_chosen - r_rejected)`` (Bradley & Terry 1952; as in InstructGPT,
Ouyang et al. 2022), optionally plus TRL's reward centring term ``c * mean((r_chosen + r_rejected)^2)``
(``center_rewards_coefficient``, Eisenstein et al. 2023), which pins scores near zero since BT only
fixes differences.

The backbone is loaded exactly like a policy (:func:`agents.policy.load_policy`: a preset, hub id or
directory of any supported family, LoRA optional) and the head is the policy's value-head MLP, so a
reward model saves and loads like a policy: a directory with ``policy.json``, the adapter or weights,
``value_head.safetensors`` (the scalar head), plus ``reward_model.json`` (its options and held-out metrics).

Pairs are a Hugging Face ``datasets`` dataset in TRL's preference format: ``images`` (a list of PIL images,
or one image), ``prompt``, ``chosen``, ``rejected``. A prompt is the user's text (the image goes before it
in the model's chat template) or a conversation (a list of messages); an answer is a string or a list of
assistant messages. :func:`expert_pairs` builds a rule-labelled set from an environment's scripted expert.

    python -m rewards.reward_model pairs --env-id vlmrl/GridWorld-v0 --states 500 --out data/grid-pairs
    python -m rewards.reward_model train --pairs data/grid-pairs --out runs/grid-rm
    (or: vlmrl reward-model pairs ... / vlmrl reward-model train ...)

As a reward module: ``rm:1.0:path=runs/grid-rm``.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

REWARD_MODEL_FILE = "reward_model.json"
PAIR_COLUMNS = ("images", "prompt", "chosen", "rejected")


# ----------------------------------------------------------------------------------------------------------
# The loss (pure functions, checked against hand-computed numbers in tests/test_reward_model.py)
# ----------------------------------------------------------------------------------------------------------


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, center_rewards_coefficient: float = 0.0
) -> torch.Tensor:
    """Mean ``-log sigmoid(r_c - r_r)`` over pairs, plus ``coefficient * mean((r_c + r_r)^2)``.

    >>> round(bradley_terry_loss(torch.tensor([1.0]), torch.tensor([1.0])).item(), 4)  # log 2
    0.6931
    """
    loss = -F.logsigmoid(chosen - rejected).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
    return loss


def pair_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Share of pairs whose chosen answer scores strictly higher (a tie counts as wrong).

    >>> pair_accuracy(torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 3.0, 1.0]))
    0.3333333333333333
    """
    return (chosen > rejected).sum().item() / max(len(chosen), 1)


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------


@dataclass
class RewardModelConfig:
    """Options of a reward model's backbone and head (saved with it)."""

    model: str = "tiny"
    """Preset name, hub id or local directory of an image-text-to-text model (as for a policy)."""
    init_seed: int = 0
    """Seed of a preset's random weights, of the LoRA adapter and of the head."""
    lora_rank: int = 8
    """LoRA rank; 0 trains the language model's full weights (small models only)."""
    lora_alpha: int = 16
    """LoRA scaling numerator (the update is scaled by alpha / rank)."""
    train_vision_tower: bool = False
    """Also adapt the vision tower (and train the projector)."""
    head_hidden_sizes: tuple[int, ...] = ()
    """Hidden layers of the scalar head; ``()`` is one linear layer, the usual reward-model head."""
    prompt_style: Literal["cot", "action"] = "cot"
    """Answer style the model scores, used to build the prompt from an env step when it serves as a reward."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights' dtype (the head stays float32)."""
    device: str = "auto"
    """``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda:1"``..."""


class RewardModel:
    """Scores ``(image, prompt, answer)`` triples. Build with :meth:`create` or :meth:`load`."""

    def __init__(self, policy: Any, config: RewardModelConfig) -> None:
        self.policy = policy
        self.config = config

    @classmethod
    def create(cls, config: RewardModelConfig) -> RewardModel:
        """A fresh reward model: the backbone as :func:`agents.policy.load_policy` loads it, a new head."""
        from agents.policy import load_policy

        policy = load_policy(
            config.model,
            init_seed=config.init_seed,
            lora_rank=config.lora_rank,
            lora_alpha=config.lora_alpha,
            train_vision_tower=config.train_vision_tower,
            value_hidden_sizes=config.head_hidden_sizes,
            prompt_style=config.prompt_style,
            dtype=config.dtype,
            device=config.device,
        )
        # A policy directory (an SFT run, as InstructGPT starts its reward model from the SFT model) brings
        # its value head along; a reward model's head is a new one, whatever the backbone held.
        from agents.models import seeded
        from agents.policy import ValueHead

        with seeded(config.init_seed):
            head = ValueHead(policy.value_head.net[0].in_features, config.head_hidden_sizes)
        policy.value_head = head.to(policy.device)
        return cls(policy, config)

    @classmethod
    def load(cls, directory: str | Path, device: str | None = None) -> RewardModel:
        """Load a reward model written by :meth:`save`."""
        from agents.policy import load_policy

        directory = Path(directory)
        saved = directory / REWARD_MODEL_FILE
        if not saved.exists():
            raise ValueError(
                f"{directory} is not a reward model directory (no {REWARD_MODEL_FILE}); train one with "
                "`vlmrl reward-model train --pairs PAIRS --out DIR`."
            )
        options = json.loads(saved.read_text())["config"]
        if device is not None:
            options["device"] = device
        config = RewardModelConfig(**{**options, "head_hidden_sizes": tuple(options["head_hidden_sizes"])})
        policy = load_policy(str(directory), device=config.device)
        return cls(policy, config)

    def save(self, directory: str | Path, metrics: dict[str, float] | None = None) -> None:
        """Write the backbone and head (as a policy is saved) and the options and metrics."""
        directory = Path(directory)
        self.policy.save(directory)
        record = {"format": 1, "config": asdict(self.config), "metrics": metrics or {}}
        (directory / REWARD_MODEL_FILE).write_text(json.dumps(record, indent=2))

    def parameters(self) -> list[torch.nn.Parameter]:
        """The trainable parameters: the adapter (or the language model) and the head."""
        return [p for p in self.policy.parameters() if p.requires_grad]

    def prompt_string(self, prompt: str | list[dict]) -> str:
        """The full prompt for the model: a user text goes after the image in the model's chat template."""
        policy = self.policy
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        else:
            messages = list(prompt)
        return policy.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, chat_template=policy.chat_template
        )

    def score(self, images: Sequence[Any], prompts: Sequence[str | list[dict]], answers: Sequence[Any]) -> torch.Tensor:
        """One score per ``(image, prompt, answer)``; differentiable (wrap in ``torch.no_grad()`` to only score)."""
        from agents.policy import text_positions

        policy = self.policy
        policy.model.train(False)
        inputs = policy.encode([self.prompt_string(p) for p in prompts], [_first_image(i) for i in images])
        prompt_ids, prompt_mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
        answer_ids = [policy.tokenizer(answer_text(a), add_special_tokens=False)["input_ids"] for a in answers]
        lengths = [len(ids) for ids in answer_ids]
        longest = max(max(lengths), 1)
        # Answers are right-padded after the left-padded prompts, so the last non-padding token of row i is at
        # prompt_length + lengths[i] - 1 (the last prompt token for an empty answer).
        answer = torch.full((len(answers), longest), policy.tokenizer.pad_token_id, dtype=torch.long)
        answer_mask = torch.zeros((len(answers), longest), dtype=torch.long)
        for row, ids in enumerate(answer_ids):
            answer[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            answer_mask[row, : len(ids)] = 1
        answer, answer_mask = answer.to(policy.device), answer_mask.to(policy.device)
        input_ids = torch.cat([prompt_ids, answer], dim=1)
        attention_mask = torch.cat([prompt_mask, answer_mask], dim=1)
        if "mm_token_type_ids" in inputs:  # Qwen2-VL marks image tokens; answer tokens are text (0)
            inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(answer)], dim=1)
        if policy.family.rope_from_attention_mask:
            inputs["position_ids"] = text_positions(attention_mask)
        policy._capture = "all"
        try:
            policy.model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1, **inputs
            )
            hidden = policy._hidden
        finally:
            policy._capture = None
            policy._hidden = None
        last = prompt_ids.shape[1] + torch.tensor(lengths, device=hidden.device) - 1
        return policy.value_head(hidden[torch.arange(len(answers), device=hidden.device), last])


def answer_text(answer: Any) -> str:
    """The text of an answer given as a string or as TRL's conversational list of assistant messages."""
    if isinstance(answer, str):
        return answer
    parts = []
    for message in answer:
        content = message["content"]
        if isinstance(content, str):
            parts.append(content)
        else:
            parts.extend(part["text"] for part in content if part.get("type") == "text")
    return "".join(parts)


def _first_image(images: Any) -> Any:
    """A row's image: the ``images`` column holds a list (one image per prompt here) or one image."""
    if isinstance(images, (list, tuple)):
        if len(images) != 1:
            raise ValueError(f"A pair has {len(images)} images; the reward model reads exactly one image per prompt.")
        return images[0]
    return images


# ----------------------------------------------------------------------------------------------------------
# Pairs
# ----------------------------------------------------------------------------------------------------------


def load_pairs(path: str | Path) -> Any:
    """A preference dataset from a ``save_to_disk`` directory, a parquet file or a JSON-lines file."""
    import datasets

    path = Path(path)
    if path.is_dir():
        pairs = datasets.load_from_disk(str(path))
    elif path.suffix == ".parquet":
        pairs = datasets.load_dataset("parquet", data_files=str(path), split="train")
    elif path.suffix in (".json", ".jsonl"):
        pairs = datasets.load_dataset("json", data_files=str(path), split="train")
    else:
        raise ValueError(
            f"No preference pairs at {path}: give a directory written by Dataset.save_to_disk, a .parquet or a "
            ".jsonl file with columns images, prompt, chosen, rejected."
        )
    return check_pairs(pairs, str(path))


def check_pairs(pairs: Any, name: str = "the pair set") -> Any:
    """Fail with one message when the columns are missing or there are no pairs."""
    if isinstance(pairs, dict) or hasattr(pairs, "keys") and not hasattr(pairs, "column_names"):
        raise ValueError(f"{name} holds several splits ({', '.join(pairs.keys())}); save or pass one split.")
    missing = [c for c in PAIR_COLUMNS if c not in pairs.column_names]
    if missing:
        raise ValueError(
            f"{name} lacks column(s) {', '.join(missing)}; a preference set has {', '.join(PAIR_COLUMNS)} "
            "(TRL's format). Build one from an env's expert with `vlmrl reward-model pairs`."
        )
    if len(pairs) == 0:
        raise ValueError(f"{name} has no pairs; collect some (e.g. `vlmrl reward-model pairs`).")
    return pairs


def expert_pairs(
    env_id: str,
    states: int,
    *,
    seed: int = 0,
    prompt_style: Literal["cot", "action"] = "action",
    env_kwargs: dict[str, Any] | None = None,
) -> Any:
    """Rule-labelled preference pairs from an env's scripted expert, in TRL's format.

    The expert plays episodes from seeds ``seed, seed + 1, ...``; at each state it visits, ``chosen`` is
    the answer with the expert's action and ``rejected`` the answer with another action drawn at random
    from those that are worse. An env with a ``potential()`` (GridWorld, Reach) tells which are: an action
    is worse when the state it leads to has a lower potential than the expert's next state (tried on a copy
    of the env), and a state where no action is worse gives no pair. That matters: in GridWorld two moves
    are often equally short, and a random "rejected" one would be as good as the expert's half the time,
    which caps the accuracy any reward model can reach (the copies make MuJoCo envs slow here: seconds per
    state). Without a potential, any other action is rejected.
    With ``prompt_style="cot"`` both answers carry the expert's rationale as thoughts, so the pair differs
    only in the action: the preference is about the choice, not the wording. Extra columns: ``env_id``,
    ``seed``, ``step``, ``chosen_action``, ``rejected_action``.
    """
    import datasets
    import gymnasium as gym
    from PIL import Image

    import envs
    from envs.language import build_prompt, format_answer

    if states < 1:
        raise ValueError(f"states={states}: ask for at least one pair.")
    spec = envs.language_spec_of(env_id)
    if len(spec.action_names) < 2:
        raise ValueError(f"{env_id} has one action; a preference pair needs another action to reject.")
    env = gym.make(env_id, **(env_kwargs or {}))
    if not hasattr(env.unwrapped, "expert_action"):
        raise ValueError(f"{env_id} has no scripted expert (expert_action()); label pairs another way.")
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {
        key: [] for key in (*PAIR_COLUMNS, "env_id", "seed", "step", "chosen_action", "rejected_action")
    }
    episode = 0
    while len(rows["prompt"]) < states:
        if episode >= 100 + 10 * states:
            raise ValueError(
                f"{env_id}: {episode} expert episodes gave only {len(rows['prompt'])} states with a worse action."
            )
        observation, _ = env.reset(seed=seed + episode)
        done, step = False, 0
        while not done and len(rows["prompt"]) < states:
            expert = int(env.unwrapped.expert_action())
            worse = _worse_actions(env.unwrapped, expert, len(spec.action_names))
            if not worse:
                observation, _, terminated, truncated, _ = env.step(expert)
                done, step = terminated or truncated, step + 1
                continue
            other = int(rng.choice(worse))
            thoughts = env.unwrapped.expert_rationale() if prompt_style == "cot" else None
            rows["images"].append([Image.fromarray(observation["image"])])
            rows["prompt"].append(build_prompt(spec, observation["text"], prompt_style))
            rows["chosen"].append(format_answer(spec.action_names[expert], thoughts, prompt_style))
            rows["rejected"].append(format_answer(spec.action_names[other], thoughts, prompt_style))
            for key, value in (("env_id", env_id), ("seed", seed + episode), ("step", step)):
                rows[key].append(value)
            rows["chosen_action"].append(spec.action_names[expert])
            rows["rejected_action"].append(spec.action_names[other])
            observation, _, terminated, truncated, _ = env.step(expert)
            done, step = terminated or truncated, step + 1
        episode += 1
    env.close()
    features = datasets.Features(
        {
            "images": datasets.Sequence(datasets.Image()),
            **{key: datasets.Value("string") for key in ("prompt", "chosen", "rejected", "env_id")},
            "seed": datasets.Value("int64"),
            "step": datasets.Value("int64"),
            "chosen_action": datasets.Value("string"),
            "rejected_action": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_dict(rows, features=features)


def _worse_actions(env: Any, expert: int, num_actions: int) -> list[int]:
    """Actions that lead to a lower potential than the expert's (every other action if the env has none)."""
    import copy

    others = [action for action in range(num_actions) if action != expert]
    if not hasattr(env, "potential"):
        return others

    def potential_after(action: int) -> float:
        twin = copy.deepcopy(env)
        twin.step(action)
        return twin.potential()

    best = potential_after(expert)
    return [action for action in others if potential_after(action) < best - 1e-9]


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


@dataclass
class RewardTrainConfig:
    """``python -m rewards.reward_model train``: fit a reward model to preference pairs."""

    pairs: str
    """Preference pairs: a ``save_to_disk`` directory, a .parquet or a .jsonl file (images, prompt, chosen, rejected)."""
    out: str
    """Directory to save the reward model to (created; an existing reward model there is replaced)."""
    labels: str | None = None
    """Human labels of these pairs (the JSON-lines file of ``vlmrl label``): train on the pairs labelled A or B,
    oriented as the labeller chose, instead of the pairs' own chosen/rejected."""
    model: RewardModelConfig = field(default_factory=RewardModelConfig)
    """Backbone and head."""
    epochs: int = 1
    """Passes over the training pairs."""
    max_steps: int | None = None
    """Train for exactly this many optimizer steps, for as many epochs as that takes (it overrides ``epochs``,
    as in transformers' ``TrainingArguments``)."""
    batch_size: int = 8
    """Pairs per optimizer step (each pair is two forward rows)."""
    learning_rate: float = 1e-4
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm."""
    center_rewards_coefficient: float = 0.0
    """Weight of ``mean((r_c + r_r)^2)`` (TRL's ``center_rewards_coefficient``; Eisenstein et al. 2023 use 0.01)."""
    eval_fraction: float = 0.1
    """Share of pairs held out for accuracy (at least one pair when the set has two or more); pairs from an
    expert's episodes are held out by whole episodes (:func:`split_pairs`)."""
    seed: int = 0
    """Seed of the split and of the shuffling."""
    log_every: int = 100
    """Print the mean training loss and accuracy of the last this many steps (0: never)."""

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs={self.epochs}, batch_size={self.batch_size}: both must be at least 1.")
        if self.log_every < 0:
            raise ValueError(f"log_every={self.log_every}: use a number of steps, or 0 to print nothing.")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps={self.max_steps}: use at least 1, or leave it unset.")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction={self.eval_fraction}: use a share in [0, 1).")
        if self.learning_rate <= 0 or self.center_rewards_coefficient < 0:
            raise ValueError("learning_rate must be > 0 and center_rewards_coefficient >= 0.")


def evaluate_pairs(model: RewardModel, pairs: Any, batch_size: int = 16) -> dict[str, float]:
    """Bradley-Terry loss and accuracy of ``model`` on ``pairs``."""
    chosen, rejected = [], []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            batch = pairs[start : start + batch_size]
            c, r = score_pairs(model, batch)
            chosen.append(c)
            rejected.append(r)
    chosen_scores, rejected_scores = torch.cat(chosen), torch.cat(rejected)
    return {
        "loss": float(bradley_terry_loss(chosen_scores, rejected_scores)),
        "accuracy": pair_accuracy(chosen_scores, rejected_scores),
        "margin": float((chosen_scores - rejected_scores).mean()),
    }


def score_pairs(model: RewardModel, batch: dict[str, list]) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected scores of a batch (a dict of columns), in one forward pass of 2 x pairs rows."""
    count = len(batch["prompt"])
    scores = model.score(batch["images"] * 2, batch["prompt"] * 2, list(batch["chosen"]) + list(batch["rejected"]))
    return scores[:count], scores[count:]


def split_pairs(pairs: Any, eval_fraction: float, seed: int = 0) -> tuple[Any, Any]:
    """``(training, held_out)``: a share ``eval_fraction`` of the pairs held out for accuracy.

    Pairs made from an expert's episodes (a ``seed`` column: the episode's reset seed) are held out by whole
    episodes, so that no held-out state comes from an episode that also gave training pairs (the states of
    one episode are a few moves apart and look alike). Other sets are split by rows. At least one pair is
    held out when the set has two or more and ``eval_fraction > 0``.
    """
    if len(pairs) < 2 or not eval_fraction:
        return pairs, pairs.select([])
    wanted = max(1, round(eval_fraction * len(pairs)))
    rng = np.random.default_rng(seed)
    if "seed" not in pairs.column_names:
        order = rng.permutation(len(pairs))
        return pairs.select(sorted(order[wanted:])), pairs.select(sorted(order[:wanted]))
    episodes: dict[Any, list[int]] = {}
    env_ids = pairs["env_id"] if "env_id" in pairs.column_names else [None] * len(pairs)
    for row, episode in enumerate(zip(env_ids, pairs["seed"])):
        episodes.setdefault(episode, []).append(row)
    groups = list(episodes.values())
    held_out: list[int] = []
    for position in rng.permutation(len(groups)):
        if len(held_out) >= wanted:
            break
        held_out.extend(groups[position])
    if len(held_out) == len(pairs):  # one episode only: keep something to train on
        held_out = held_out[:wanted]
    kept = set(held_out)
    return pairs.select([r for r in range(len(pairs)) if r not in kept]), pairs.select(sorted(held_out))


def unseen_rows(training: Any, held_out: Any) -> list[int]:
    """Rows of ``held_out`` whose image (pixel for pixel) no training pair has: the pairs a model cannot
    get right by remembering a training image (a small env has few distinct images, e.g. GridWorld 4x4
    without walls: 16 x 15 agent and goal cells)."""
    seen = {_image_key(images) for images in training["images"]}
    return [row for row, images in enumerate(held_out["images"]) if _image_key(images) not in seen]


def _image_key(images: Any) -> bytes:
    image = _first_image(images)
    return np.asarray(image).tobytes()


def train_reward_model(config: RewardTrainConfig, pairs: Any = None, log: Any = print) -> dict[str, float]:
    """Train as ``config`` says (on ``pairs`` when given, else ``config.pairs``), save, and return the metrics:
    first and last training batch loss, held-out loss and accuracy (when pairs are held out)."""
    pairs = check_pairs(pairs, "the pair set") if pairs is not None else load_pairs(config.pairs)
    if config.labels is not None:
        from rewards.labelling import LabelStore, labelled_pairs

        if not Path(config.labels).exists():
            raise ValueError(f"No labels file at {config.labels}; label the pairs with `vlmrl label {config.pairs}`.")
        pairs = check_pairs(
            labelled_pairs(pairs, LabelStore(config.labels).read()), f"the pairs labelled in {config.labels}"
        )
    training, evaluation = split_pairs(pairs, config.eval_fraction, config.seed)
    held_out = len(evaluation)
    model = RewardModel.create(config.model)
    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    metrics: dict[str, float] = {"train_pairs": len(training), "held_out_pairs": held_out}
    unseen = unseen_rows(training, evaluation) if held_out else []
    metrics["held_out_unseen_image_pairs"] = len(unseen)
    if held_out:
        metrics.update({f"initial_held_out_{k}": v for k, v in evaluate_pairs(model, evaluation).items()})
    steps, start = 0, time.perf_counter()
    recent: list[tuple[float, float]] = []
    for epoch in itertools.count() if config.max_steps is not None else range(config.epochs):
        order = training.shuffle(seed=config.seed + epoch)
        for first in range(0, len(order), config.batch_size):
            chosen, rejected = score_pairs(model, order[first : first + config.batch_size])
            loss = bradley_terry_loss(chosen, rejected, config.center_rewards_coefficient)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(
                    f"The reward-model loss became {loss.item()} at step {steps}; lower the learning rate."
                )
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            metrics.setdefault("first_loss", loss.item())
            metrics["last_loss"] = loss.item()
            metrics["last_accuracy"] = pair_accuracy(chosen.detach(), rejected.detach())
            recent.append((loss.item(), metrics["last_accuracy"]))
            steps += 1
            if config.log_every and steps % config.log_every == 0:
                mean_loss, mean_accuracy = np.mean(recent[-config.log_every :], axis=0)
                log(
                    f"step {steps}: training loss {mean_loss:.3f}, accuracy {mean_accuracy:.3f} "
                    f"(last {config.log_every} steps), {time.perf_counter() - start:.0f} s"
                )
            if config.max_steps is not None and steps >= config.max_steps:
                break
        if config.max_steps is not None and steps >= config.max_steps:
            break
    metrics["steps"] = steps
    metrics["train_seconds"] = time.perf_counter() - start
    if held_out:
        metrics.update({f"held_out_{k}": v for k, v in evaluate_pairs(model, evaluation).items()})
        log(f"reward model: held-out accuracy {metrics['held_out_accuracy']:.3f} on {held_out} pairs")
        if unseen:
            unseen_metrics = evaluate_pairs(model, evaluation.select(unseen))
            metrics["held_out_unseen_image_accuracy"] = unseen_metrics["accuracy"]
            log(
                f"reward model: held-out accuracy {unseen_metrics['accuracy']:.3f} on the {len(unseen)} pairs "
                "whose image no training pair has"
            )
    model.save(config.out, metrics)
    return metrics


# ----------------------------------------------------------------------------------------------------------
# As a reward module
# ----------------------------------------------------------------------------------------------------------


@dataclass
class RewardModelRewardConfig:
    """Options of the ``rm`` reward (``rm:WEIGHT:path=DIR``)."""

    path: str = ""
    """Directory of a trained reward model (written by ``python -m rewards.reward_model train``)."""
    batch_size: int = 16
    """Answers scored per forward pass."""
    baseline: Literal["none", "mean", "max"] = "none"
    """Subtract the mean or the largest score of the step's legal actions at the same state (the model then
    scores each of them too: one forward row per legal action). Bradley-Terry pairs compare answers at one
    state, so they fix ``r(s, a) - r(s, a')`` but not the level of ``r(s, .)`` from state to state; summed
    over an episode, that free level can pay a policy for visiting the states the model happens to score
    high (PPO on GridWorld with ``none`` circled instead of reaching the goal: README). ``max`` makes the
    best-scored action's reward 0 and every other one's negative. Action-style models only."""


class RewardModelReward:
    """Score each step's answer with a reward model: the image, the env's prompt in the model's answer
    style, and the answer's text (minus the state's ``baseline`` over legal actions, if asked)."""

    def __init__(self, model: RewardModel, env_id: str, batch_size: int = 16, baseline: str = "none") -> None:
        import envs

        if baseline not in ("none", "mean", "max"):
            raise ValueError(f"rm: baseline={baseline!r}; use none, mean or max.")
        if baseline != "none" and model.config.prompt_style != "action":
            raise ValueError(
                f"rm: baseline={baseline} scores every legal action as an answer, which needs a model of "
                f"action-style answers; this one scores {model.config.prompt_style!r} answers. Use baseline=none."
            )
        self.model = model
        self.spec = envs.get_language(env_id)
        self.batch_size = batch_size
        self.baseline = baseline

    def __call__(
        self, observations: Any, completions: Sequence[Any], infos: Sequence[dict], **step: Any
    ) -> list[float]:
        from agents.policy import split_observations
        from envs.language import build_prompt

        images, texts = split_observations(observations)
        prompts = [build_prompt(self.spec, text, self.model.config.prompt_style) for text in texts]
        answers = [completion.text for completion in completions]
        if self.baseline == "none":
            return self._scores(images, prompts, answers)
        # One row per (env, legal action), plus the answer itself when it is none of them (an invalid text).
        legal = [list(getattr(c, "action_names", None) or self.spec.action_names) for c in completions]
        rows = [(env, name) for env in range(len(completions)) for name in legal[env]]
        rows += [(env, answers[env]) for env in range(len(completions)) if answers[env] not in legal[env]]
        scored = self._scores([images[e] for e, _ in rows], [prompts[e] for e, _ in rows], [a for _, a in rows])
        per_env: list[dict[str, float]] = [{} for _ in completions]
        for (env, answer), score in zip(rows, scored):
            per_env[env][answer] = score
        reduce = np.mean if self.baseline == "mean" else np.max
        return [
            per_env[env][answers[env]] - float(reduce([per_env[env][name] for name in legal[env]]))
            for env in range(len(completions))
        ]

    def _scores(self, images: list, prompts: list[str], answers: list[str]) -> list[float]:
        scores: list[float] = []
        with torch.no_grad():
            for start in range(0, len(answers), self.batch_size):
                end = start + self.batch_size
                scores.extend(
                    self.model.score(images[start:end], prompts[start:end], answers[start:end]).flatten().tolist()
                )
        return scores


def build_reward_model_reward(context: Any, options: dict[str, str]) -> RewardModelReward:
    from rewards import options_to

    config = options_to(RewardModelRewardConfig, options, "rm")
    if not config.path:
        raise ValueError(
            "rm: say which reward model: rm:WEIGHT:path=DIR (a directory written by `vlmrl reward-model train`)."
        )
    if context.env_id is None:
        raise ValueError("rm: the reward set needs the env id (RewardContext(env_id=...)) to build prompts.")
    model = RewardModel.load(config.path, device=context.device)
    return RewardModelReward(model, context.env_id, config.batch_size, config.baseline)


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


@dataclass
class PairsConfig:
    """``python -m rewards.reward_model pairs``: rule-labelled pairs from an env's scripted expert."""

    out: str
    """Directory to write the dataset to (``Dataset.save_to_disk``)."""
    env_id: str = "vlmrl/GridWorld-v0"
    """Environment with a scripted expert."""
    states: int = 500
    """Pairs to make (one per visited state)."""
    seed: int = 0
    """Reset seed of the first episode (and of the rejected actions)."""
    prompt_style: Literal["cot", "action"] = "action"
    """Answer format of chosen and rejected."""
    env_kwargs: str = "{}"
    """Keyword arguments of ``gymnasium.make`` as JSON, e.g. ``'{"size": 4, "n_walls": 0}'`` (the GridWorld of
    ``experiments/gridworld.py``)."""
    overwrite: bool = False
    """Replace a pair set already at ``out`` (people's labels there, ``labels.jsonl``, would then label other
    pairs); without it an existing set is refused."""
    env_module: str | None = None
    """Module to import first, for a third-party env that it registers (as ``vlmrl train --env-module``)."""

    def __post_init__(self) -> None:
        try:
            options = json.loads(self.env_kwargs)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"--env-kwargs {self.env_kwargs!r} is not JSON ({error}); e.g. '{{\"size\": 4}}'."
            ) from None
        if not isinstance(options, dict):
            raise ValueError(f"--env-kwargs {self.env_kwargs!r}: give a JSON object of keyword arguments.")


def main(argv: list[str] | None = None) -> None:
    import tyro

    command = tyro.extras.subcommand_cli_from_dict({"train": RewardTrainConfig, "pairs": PairsConfig}, args=argv)
    if isinstance(command, PairsConfig):
        # Checked here rather than in the config, so that the command line reports them in one line.
        if not command.overwrite and (Path(command.out) / "dataset_info.json").exists():
            raise ValueError(
                f"{command.out} already holds a pair set; choose another --out, or pass --overwrite to replace it."
            )
        if command.env_module:
            from agents.run import import_env_module

            import_env_module(command.env_module)
        pairs = expert_pairs(
            command.env_id,
            command.states,
            seed=command.seed,
            prompt_style=command.prompt_style,
            env_kwargs=json.loads(command.env_kwargs),
        )
        pairs.save_to_disk(command.out)
        print(json.dumps({"pairs": len(pairs), "out": command.out}))
    else:
        print(json.dumps(train_reward_model(command), indent=2))


if __name__ == "__main__":
    main()
