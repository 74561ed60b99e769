"""PPO for a vision-language policy acting in Gymnasium vector environments.

Read top to bottom: the config, the loss of one micro-batch, the update (epochs over shuffled minibatches),
and ``train``: per update, a rollout through the shared env runner (one batched ``act`` per vector step),
GAE, the update, logging. Resume, checkpoints, logging and evaluation are the shared
:class:`~agents.run.Run`'s. Algorithm: Schulman et al. 2017 (https://arxiv.org/abs/1707.06347) as
fine-tuned for VLM agents by RL4VLM (Zhai et al. 2024, https://arxiv.org/abs/2405.10292): the action's
log-prob is the CoT-weighted sequence log-prob of the whole answer (see ``agents/policy.py``), the value
head reads the last prompt token.

Run it through an experiment script (``vlmrl train gridworld --algo ppo --help``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.errors import ConfigError
from agents.losses import approx_kl, clip_fraction, clipped_surrogate, k3_kl, value_loss
from agents.optim import GuardedStep, LossTotals, make_optimizer, set_learning_rate
from agents.policy import VLMPolicy
from agents.rollout import episode_metrics
from agents.run import Run, RunConfig, check_rewards
from agents.storage import Rollout


@dataclass
class PPOConfig(RunConfig):
    """PPO's options on top of every run's (:class:`~agents.run.RunConfig`). Defaults follow RL4VLM where it
    published them (noted per field)."""

    total_env_steps: int = 20_000
    """Environment steps to train for (all envs together), in whole updates of num_envs * num_steps (rounded
    down). On resume, a larger value extends the run."""

    # --- PPO --------------------------------------------------------------------------------------------
    num_steps: int = 16
    """Rollout length per env per update (batch = num_envs * num_steps)."""
    learning_rate: float = 1e-5
    """AdamW learning rate. RL4VLM: 1e-5 with LoRA on 7B models; full fine-tuning of the tiny preset: 1e-4
    (the experiments' default; see README)."""
    value_learning_rate: float | None = None
    """Learning rate of the value head (default: learning_rate). A value head trained from scratch on top of
    a pretrained model usually wants a larger one than the LoRA weights."""
    anneal_lr: bool = True
    """Linearly anneal the learning rate to 0 over the run."""
    gamma: float = 0.9
    """Discount factor. RL4VLM: 0.9."""
    gae_lambda: float = 0.95
    """GAE lambda. RL4VLM: 0.95."""
    update_epochs: int = 4
    """Passes over the batch per update. RL4VLM: 4."""
    minibatch_size: int = 32
    """Samples per optimizer step."""
    micro_batch_size: int = 8
    """Samples per forward/backward pass; gradients accumulate over a minibatch."""
    norm_adv: bool = True
    """Normalise advantages per minibatch."""
    clip_coef: float = 0.1
    """Surrogate clipping coefficient. RL4VLM: 0.1."""
    clip_vloss: bool = True
    """Clip the value loss around the old values."""
    vf_coef: float = 0.5
    """Value loss coefficient."""
    ent_coef: float = 0.0
    """Entropy bonus coefficient (per-token entropy)."""
    kl_coef: float = 0.0
    """KL penalty to the reference (LoRA-off base) policy; needs LoRA."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    target_kl: float | None = None
    """Stop the update's epochs early when the approximate KL exceeds this."""
    max_nonfinite_steps: int = 5
    """Abort after this many optimizer steps in a row with a non-finite loss or gradient."""

    reward: list[str] = field(default_factory=lambda: ["env:1", "invalid:-1"])
    """Reward modules and their weights, ``NAME[:WEIGHT[:KEY=VALUE,...]]`` (``rewards/``): the env's reward
    (``env``), the invalid-answer indicator (``invalid``), a well-formed answer (``format``),
    potential-based shaping at this run's gamma (``shaping``), a CLIP reward (``clip``, VLM-RM), a learned
    reward model (``rm:W:path=DIR``). Their weighted sum is what the algorithm optimises; each term is
    logged as ``rewards/<name>``. Default: the env's reward, minus 1 for an invalid answer."""

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def num_updates(self) -> int:
        return self.total_env_steps // self.batch_size

    def validate(self) -> None:
        """Fail before any model loads, saying what to change."""
        if self.num_steps < 1:
            raise ConfigError(f"num_steps must be >= 1, got {self.num_steps}.")
        super().validate()
        if self.total_env_steps < self.batch_size:
            raise ConfigError(
                f"total_env_steps={self.total_env_steps} is less than one batch (num_envs * num_steps = "
                f"{self.batch_size}); raise total_env_steps or lower num_envs/num_steps."
            )
        if self.batch_size % self.minibatch_size:
            raise ConfigError(
                f"The batch (num_envs * num_steps = {self.batch_size}) does not split into minibatches of "
                f"{self.minibatch_size}; choose a minibatch_size that divides it."
            )
        if self.minibatch_size % self.micro_batch_size:
            raise ConfigError(
                f"minibatch_size={self.minibatch_size} is not a multiple of micro_batch_size="
                f"{self.micro_batch_size}; choose a micro_batch_size that divides it."
            )
        for name in ("learning_rate", "clip_coef", "max_grad_norm"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}.")
        if self.value_learning_rate is not None and self.value_learning_rate <= 0:
            raise ConfigError(f"value_learning_rate must be > 0 (or unset), got {self.value_learning_rate}.")
        if self.update_epochs < 1 or self.max_nonfinite_steps < 1:
            raise ConfigError("update_epochs and max_nonfinite_steps must be >= 1.")
        if not (0 <= self.gamma <= 1 and 0 <= self.gae_lambda <= 1):
            raise ConfigError(f"gamma and gae_lambda must be in [0, 1], got {self.gamma} and {self.gae_lambda}.")
        check_rewards(self.reward)
        if self.kl_coef > 0 and self.policy.lora_rank == 0:
            raise ConfigError("kl_coef > 0 needs a reference policy, which needs LoRA: set lora_rank > 0 or kl_coef 0.")


def ppo_losses(
    policy: VLMPolicy,
    completions: list,
    old_logprobs: torch.Tensor,
    old_values: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    ref_token_logprobs: list[torch.Tensor] | None,
    config: PPOConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The PPO loss of one micro-batch, and its parts (detached) for logging."""
    new = policy.evaluate(completions)
    device = new.logprob.device
    old_logprobs, old_values, advantages, returns = (
        t.to(device) for t in (old_logprobs, old_values, advantages, returns)
    )
    policy_loss, ratio = clipped_surrogate(new.logprob, old_logprobs, advantages, config.clip_coef, config.clip_coef)
    policy_loss = policy_loss.mean()
    critic_loss = value_loss(new.value, old_values, returns, config.clip_coef if config.clip_vloss else None).mean()
    entropy = new.entropy.mean()
    loss = policy_loss - config.ent_coef * entropy + config.vf_coef * critic_loss
    kl_ref = torch.zeros((), device=device)
    if ref_token_logprobs is not None:
        reference = torch.zeros_like(new.token_logprobs)
        for row, tokens in enumerate(ref_token_logprobs):
            reference[row, : len(tokens)] = tokens.to(device)
        kl_ref = k3_kl(new.token_logprobs, reference, new.token_mask).mean()
        loss = loss + config.kl_coef * kl_ref
    with torch.no_grad():
        parts = {
            "policy_loss": policy_loss.detach(),
            "value_loss": critic_loss.detach(),
            "entropy": entropy.detach(),
            "approx_kl": approx_kl(new.logprob - old_logprobs),
            "clipfrac": clip_fraction(ratio, config.clip_coef, config.clip_coef),
            "kl_ref": kl_ref.detach(),
        }
    return loss, parts


def ppo_update(
    policy: VLMPolicy, rollout: Rollout, config: PPOConfig, generator: np.random.Generator, guarded_step: GuardedStep
) -> dict[str, float]:
    """``update_epochs`` passes of clipped PPO over shuffled minibatches; the mean of each loss part."""
    completions, tensors = rollout.flat()
    reference = _reference_logprobs(policy, completions, config) if config.kl_coef > 0 else None
    totals = LossTotals()
    indices = np.arange(config.batch_size)
    for _epoch in range(config.update_epochs):
        generator.shuffle(indices)
        for start in range(0, config.batch_size, config.minibatch_size):
            minibatch = indices[start : start + config.minibatch_size]
            advantages = tensors["advantages"][minibatch]
            if config.norm_adv and len(minibatch) > 1:
                advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
            # Advantages of this minibatch, normalised together, at their batch positions.
            normalised = tensors["advantages"].clone()
            normalised[minibatch] = advantages

            def loss_fn(micro: np.ndarray, advantages: torch.Tensor = normalised) -> tuple[torch.Tensor, dict]:
                return ppo_losses(
                    policy,
                    [completions[i] for i in micro],
                    tensors["logprobs"][micro],
                    tensors["values"][micro],
                    advantages[micro],
                    tensors["returns"][micro],
                    [reference[i] for i in micro] if reference is not None else None,
                    config,
                )

            micro_batches = [
                minibatch[i : i + config.micro_batch_size] for i in range(0, len(minibatch), config.micro_batch_size)
            ]
            totals.add(guarded_step.step(micro_batches, loss_fn))
        if config.target_kl is not None and totals.steps and totals.mean("approx_kl") > config.target_kl:
            break
    return totals.metrics()


def train(config: PPOConfig, defaults: PPOConfig | None = None) -> Path:
    """Run PPO; return the run directory (metrics.jsonl, learning_curve.png, checkpoints/).

    ``defaults`` is what the command line gives with no flags: on resume, options equal to it count as not
    given (see :func:`agents.run.merge_resumed_config`).
    """
    with Run(config, "ppo", defaults) as run:
        config = run.config
        policy = run.load_policy()
        runner = run.make_env_runner()
        spec = runner.spec
        optimizer = make_optimizer(policy, config.learning_rate, config.value_learning_rate)
        run.restore(runner=runner, optimizer=optimizer)
        optimizer = run.prepare(policy, optimizer)
        trainable = [p for p in policy.parameters() if p.requires_grad]
        guarded_step = GuardedStep(
            optimizer, trainable, config.max_grad_norm, config.max_nonfinite_steps, parallel=run.parallel
        )
        reward_set = run.make_rewards(config.reward, config.gamma, policy)

        for update in run.updates(config.num_updates, config.batch_size):
            update_start = time.perf_counter()
            learning_rate = set_learning_rate(optimizer, update, config.num_updates, config.anneal_lr)

            # --- rollout: one batched act per vector step -------------------------------------------------
            with run.whole_policy(policy):  # act on whole parameters (FSDP gathers them once)
                rollout = Rollout(config.num_steps, runner.num_envs)  # this rank's envs
                act_seconds, tokens, invalid, frames, thoughts = 0.0, 0, 0, [], []
                reward_terms: dict[str, float] = {}  # each reward module's mean per env step
                for _ in range(config.num_steps):
                    step = runner.step(policy)
                    act_seconds, tokens, invalid = (
                        act_seconds + step.act_seconds,
                        tokens + step.generated_tokens,
                        invalid + int(step.invalid.sum()),
                    )
                    thoughts.extend(step.thoughts_true[~np.isnan(step.thoughts_true)])
                    if config.video_every and (update + 1) % config.video_every == 0:
                        frames.append(np.asarray(step.observations["image"][0]))
                    # A truncated episode is bootstrapped from the value of its final observation.
                    cut = list(step.final_observations)
                    final_values = (
                        dict(zip(cut, policy.values([step.final_observations[i] for i in cut], spec).tolist()))
                        if cut
                        else {}
                    )
                    scored = reward_set(
                        step.observations, step.completions, step.infos, env_rewards=step.rewards,
                        terminated=step.terminated, truncated=step.truncated, next_observations=step.next_observations,
                    )  # fmt: skip
                    rewards = scored.total
                    for name, value in scored.metrics().items():
                        reward_terms[name] = reward_terms.get(name, 0.0) + value / config.num_steps
                    rollout.add(step.completions, rewards, step.terminated, step.truncated, final_values)
                rollout.finish(policy.values(runner.observations, spec).numpy(), config.gamma, config.gae_lambda)
            # Every rank holds the global batch from here on (see agents/parallel.py): advantage normalisation
            # and the minibatch order are the single-process ones.
            rollout = Rollout.join(run.gather(rollout))

            # --- update ---------------------------------------------------------------------------------------
            metrics = ppo_update(policy, rollout, config, run.generator, guarded_step)

            # --- logging ------------------------------------------------------------------------------------
            shares = run.gather((runner.stats.pop(), act_seconds, tokens, invalid, thoughts, reward_terms))
            finished = [episode for share in shares for episode in share[0]]
            # Every rank has as many envs, so the mean of the ranks' per-step means is the global one.
            reward_terms = {name: float(np.mean([share[5][name] for share in shares])) for name in reward_terms}
            act_seconds = max(share[1] for share in shares)  # the ranks act at the same time
            tokens, invalid = sum(share[2] for share in shares), sum(share[3] for share in shares)
            thoughts = [value for share in shares for value in share[4]]
            values, returns = rollout.values.ravel(), rollout.returns.ravel()
            variance = np.var(returns)
            metrics.update(
                {
                    "losses/explained_variance": float("nan")
                    if variance == 0
                    else 1 - np.var(returns - values) / variance,
                    "charts/invalid_action_rate": invalid / config.batch_size,
                    "charts/learning_rate": learning_rate,
                    "charts/env_steps_per_s": config.batch_size / (time.perf_counter() - update_start),
                    "charts/tokens_per_s": tokens / max(act_seconds, 1e-9),
                    **episode_metrics(finished),
                    **reward_terms,
                }
            )
            if thoughts:
                metrics["charts/thought_accuracy"] = float(np.mean(thoughts))
            run.end_update(
                update,
                metrics,
                run.env_steps(runner),
                policy,
                finished=finished,
                samples=_sample_rows(rollout),
                frames=frames,
                runner=runner,
                optimizer=optimizer,
            )
        return run.finish(policy, runner)


@torch.no_grad()
def _reference_logprobs(policy: VLMPolicy, completions: list, config: PPOConfig) -> list[torch.Tensor]:
    result = []
    for start in range(0, len(completions), config.micro_batch_size):
        chunk = completions[start : start + config.micro_batch_size]
        evaluation = policy.reference_logprobs(chunk)
        for row, completion in enumerate(chunk):
            result.append(evaluation.token_logprobs[row, : len(completion.response_ids)].cpu())
    return result


def _sample_rows(rollout: Rollout, count: int = 8) -> list[dict[str, Any]]:
    rows = []
    for t in range(min(count, rollout.num_steps)):
        completion = rollout.completions[t][0]
        rows.append(
            {
                "step": t,
                "answer": completion.text,
                "action": completion.action_names[completion.action] if completion.valid else None,
                "invalid_reason": completion.reason,
                "reward": float(rollout.rewards[t, 0]),
            }
        )
    return rows
