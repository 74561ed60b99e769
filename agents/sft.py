"""Supervised fine-tuning (SFT) of the policy on stored answers: the warm start of RL4VLM and iRe-VLA.

Read top to bottom: the config, the demonstrations (trajectory store -> completions built by the policy's
own ``completions_for``, so the prompt, the chat template, the token spelling and the constraints are
exactly those ``act`` uses), the loss, and ``train``: epochs of shuffled minibatches, with greedy
evaluation on held-out seeds every ``eval_every`` updates (success, invalid answers and, for
chain-of-thought answers, the fraction of true thoughts).

The loss is the negative log-likelihood of the answer tokens only, at temperature 1: a trained answer's
log-likelihood is what ``act`` assigns at temperature 1, so the checkpoint is an ordinary policy that PPO
(or any algorithm) starts from with ``--model <SFT run dir>``.

    vlmrl collect gridworld --expert --episodes 300 --out data/gridworld-cot
    vlmrl train gridworld --algo sft --data data/gridworld-cot --prompt-style cot --eval-episodes 200
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.errors import ConfigError
from agents.losses import token_mean_nll
from agents.optim import GuardedStep, make_optimizer, set_learning_rate
from agents.policy import Completion, VLMPolicy
from agents.run import Run, RunConfig, eval_metrics


@dataclass
class SFTConfig(RunConfig):
    """SFT's options on top of every run's (:class:`~agents.run.RunConfig`). Defaults suit full fine-tuning of
    the tiny preset (AdamW 1e-3 beat 3e-4 and 3e-3 on GridWorld and Blackjack, batch 16, tens of epochs);
    with LoRA on a pretrained model use a rate around 1e-4."""

    data: str = ""
    """Trajectory store to learn from (``vlmrl collect <env> --expert --out PATH``)."""
    successes_only: bool = False
    """Learn only from the steps of successful episodes (e.g. the agent's own, in iRe-VLA's second stage)."""
    skip_bad_shards: bool = False
    """Leave out a corrupt shard of the store (with a warning naming it) instead of stopping."""
    epochs: int = 40
    """Passes over the demonstrations. On resume, a larger value extends the run (the learning rate follows
    the schedule of a run started with the new number from the resume point on)."""
    batch_size: int = 16
    """Demonstration steps per optimizer step."""
    micro_batch_size: int = 16
    """Steps per forward/backward pass; gradients accumulate over a batch."""
    learning_rate: float = 1e-3
    """AdamW learning rate (full fine-tuning of the random tiny preset: 1e-3 beat 3e-4 and 3e-3)."""
    anneal_lr: bool = True
    """Linearly anneal the learning rate to 0 over the run."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    max_nonfinite_steps: int = 5
    """Abort after this many optimizer steps in a row with a non-finite loss or gradient."""
    eval_every: int = 0
    """Greedy evaluation on held-out seeds every this many updates (``eval_episodes`` episodes); 0: only at
    the end."""

    def validate(self) -> None:
        super().validate()
        if not self.data:
            raise ConfigError("SFT needs demonstrations: pass --data PATH (a store made by `vlmrl collect`).")
        if not Path(self.data).exists():
            raise ConfigError(
                f"--data {self.data}: no such directory. Make one with `vlmrl collect <env> --expert --out {self.data}`."
            )
        for name in ("epochs", "batch_size", "micro_batch_size", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(
                f"batch_size={self.batch_size} is not a multiple of micro_batch_size={self.micro_batch_size}; "
                "choose a micro_batch_size that divides it."
            )
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}.")
        if self.eval_every < 0:
            raise ConfigError(f"eval_every must be >= 0, got {self.eval_every}.")


# ----------------------------------------------------------------------------------------------------------
# Demonstrations
# ----------------------------------------------------------------------------------------------------------


def load_demonstrations(config: SFTConfig) -> list[dict[str, Any]]:
    """The store's valid steps as ``{"observation", "answer", "episode_id"}``, after every check that can fail
    before a model loads: right env, right answer style, successes present when asked for."""
    from agents.trajectories import check_store, load_trajectories, successes

    try:
        dataset = load_trajectories(config.data, skip_bad_shards=config.skip_bad_shards)
        check_store(dataset, env_id=config.env_id, env_kwargs=config.env_kwargs)
    except ValueError as error:
        raise ConfigError(f"--data {config.data}: {error}") from None
    styles = set(dataset.unique("prompt_style"))
    if styles != {config.policy.prompt_style}:
        raise ConfigError(
            f"{config.data} holds {'/'.join(sorted(styles))} answers but the policy writes {config.policy.prompt_style} "
            f"answers: pass --prompt-style {'/'.join(sorted(styles))}, or collect with --prompt-style {config.policy.prompt_style}."
        )
    if config.successes_only:
        try:
            dataset = successes(dataset)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    dataset = dataset.select([index for index, valid in enumerate(dataset["valid"]) if valid])
    if len(dataset) == 0:
        raise ConfigError(f"{config.data} has no step with a valid answer to learn from.")
    return [
        {
            "observation": {"image": np.asarray(row["image"].convert("RGB")), "text": row["step_text"]},
            "answer": row["answer"],
            "episode_id": row["episode_id"],
        }
        for row in dataset
    ]


def demonstration_completions(policy: VLMPolicy, demonstrations: list[dict[str, Any]], env_id: str) -> list[Completion]:
    """Each demonstration as the policy would have written it (``completions_for``), or one clear error."""
    import envs

    spec = envs.get_language(env_id)
    completions = []
    for index, demo in enumerate(demonstrations):
        try:
            [completion] = policy.completions_for([demo["observation"]], spec, [demo["answer"]], score=False)
        except ValueError as error:
            raise ConfigError(
                f"Step {index} (episode {demo['episode_id']}) cannot be written by this policy's decoding: {error}"
            ) from None
        completions.append(completion)
    return completions


class Batches:
    """Shuffled minibatches over ``size`` items, one epoch after another, resumable mid-epoch."""

    def __init__(self, size: int, batch_size: int, generator: np.random.Generator) -> None:
        self.size, self.batch_size, self.generator = size, batch_size, generator
        self.per_epoch = -(-size // batch_size)
        self.order = np.arange(size)
        self.position = self.per_epoch  # draws a fresh order on first use

    def next(self) -> np.ndarray:
        if self.position >= self.per_epoch:
            self.order = self.generator.permutation(self.size)
            self.position = 0
        start = self.position * self.batch_size
        self.position += 1
        return self.order[start : start + self.batch_size]

    def state_dict(self) -> dict[str, Any]:
        return {"order": self.order.copy(), "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order, self.position = state["order"].copy(), state["position"]


# ----------------------------------------------------------------------------------------------------------
# Loss and training
# ----------------------------------------------------------------------------------------------------------


def sft_loss(policy: VLMPolicy, completions: list[Completion]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean over samples of the mean negative log-likelihood of each answer's tokens, at temperature 1
    (never the sampling temperature: this is the model's likelihood, not a sampling ratio)."""
    evaluation = policy.evaluate(completions, temperature=1.0)
    loss = token_mean_nll(evaluation.token_logprobs, evaluation.token_mask).mean()
    with torch.no_grad():
        tokens = evaluation.token_mask.sum()
        parts = {"nll": loss.detach(), "token_nll": -(evaluation.token_logprobs.sum() / tokens)}
    return loss, parts


def train(config: SFTConfig, defaults: SFTConfig | None = None) -> Path:
    """Fine-tune on ``config.data``; return the run directory (its checkpoints are policy directories)."""
    with Run(config, "sft", defaults) as run:
        config = run.config
        demonstrations = load_demonstrations(config)
        policy = run.load_policy()
        completions = demonstration_completions(policy, demonstrations, config.env_id)
        batches = Batches(len(completions), config.batch_size, run.generator)
        num_updates = config.epochs * batches.per_epoch
        optimizer = make_optimizer(policy, config.learning_rate)
        run.restore(optimizer=optimizer, batches=batches)
        # The loss has no value term: the value head gets no gradient (AdamW skips it; it stays in the
        # optimizer's groups, so checkpoints keep their layout), and DDP must not wait for one.
        policy.value_head.requires_grad_(False)
        optimizer = run.prepare(policy, optimizer)
        trainable = [p for p in policy.parameters() if p.requires_grad]
        guarded_step = GuardedStep(
            optimizer, trainable, config.max_grad_norm, config.max_nonfinite_steps, parallel=run.parallel
        )
        samples_seen = run.global_step  # demonstration steps trained on so far (0 for a new run)

        for update in run.updates(num_updates, config.batch_size):
            start = time.perf_counter()
            learning_rate = set_learning_rate(optimizer, update, num_updates, config.anneal_lr)
            batch = batches.next()
            micro_batches = [
                batch[i : i + config.micro_batch_size] for i in range(0, len(batch), config.micro_batch_size)
            ]
            parts = guarded_step.step(micro_batches, lambda micro: sft_loss(policy, [completions[i] for i in micro]))
            samples_seen += len(batch)
            run.advance(len(batch))
            metrics = {f"losses/{k}": v for k, v in (parts or {}).items()}
            metrics.update(
                {
                    "losses/skipped_steps": float(parts is None),
                    "charts/learning_rate": learning_rate,
                    "charts/epoch": (update + 1) / batches.per_epoch,
                    "charts/samples_per_s": len(batch) / (time.perf_counter() - start),
                }
            )
            if config.eval_every and (update + 1) % config.eval_every == 0 and config.eval_episodes:
                metrics.update(eval_metrics(run.evaluate(policy)))
            run.end_update(update, metrics, samples_seen, policy, finished=[], optimizer=optimizer, batches=batches)
        return run.finish(policy, global_step=samples_seen)
