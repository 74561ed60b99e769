"""GRPO and GiGPO for multi-turn VLM agents: critic-free RL on groups of envs that replay the same task.

Read top to bottom: the config, one round of group rollouts (every env of a group resets with the same
seed, and plays one whole episode), the advantages, the loss of one micro-batch, and ``train``.

* GRPO (DeepSeekMath, https://arxiv.org/abs/2402.03300): each trajectory's return relative to the other
  trajectories of its group, ``(R - mean) / std`` or, with ``advantage_norm=mean``, ``R - mean``
  (Dr. GRPO, https://arxiv.org/abs/2503.20783; verl-agent's ``mean_norm``).
* GiGPO (verl-agent, https://arxiv.org/abs/2505.10978): steps of a group that saw the same observation
  (pixel-identical image, same text) form an anchor group; each step's discounted return-to-go is
  normalised within it, and ``A = A_episode + step_advantage_weight * A_step`` (weight 0 is plain GRPO).
* Loss: the clipped surrogate with separate low/high clips (DAPO's clip-higher,
  https://arxiv.org/abs/2503.14476) on the lambda-weighted answer log-prob (RL4VLM, as in PPO), or per
  token (``loss_aggregation``); optional KL to a reference policy; optional dropping of groups whose
  returns are all equal (DAPO's dynamic sampling). No value head is trained.

Every step of a trajectory is a training sample with its own prompt, as in PPO.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from agents.errors import ConfigError
from agents.losses import (
    anchor_advantages,
    approx_kl,
    clip_fraction,
    clipped_surrogate,
    discounted_returns_to_go,
    group_advantages,
    k3_kl,
)
from agents.optim import GuardedStep, LossTotals, make_optimizer, set_learning_rate
from agents.policy import Completion, VLMPolicy
from agents.rollout import episode_metrics
from agents.run import Run, RunConfig, check_rewards, deferred_validation


@dataclass
class GRPOConfig(RunConfig):
    """GRPO/GiGPO options on top of every run's (:class:`~agents.run.RunConfig`). Defaults cite their source."""

    total_env_steps: int = 20_000
    """Environment steps to train for (all envs together; a round ends when every env's episode has)."""
    group_size: int = 8
    """Envs per group: they reset with the same seed each round. verl-agent: 8. ``num_envs`` must be a
    multiple of it."""
    max_episode_steps: int = 100
    """Step limit of a round: an episode still running then is cut (its return is what it has)."""
    learning_rate: float = 1e-6
    """AdamW learning rate. verl-agent: 1e-6 for Qwen2.5-VL-3B; the tiny preset wants ~1e-4."""
    anneal_lr: bool = True
    """Linearly anneal the learning rate to 0 over the run."""
    gamma: float = 0.95
    """Discount of the step-level returns-to-go (GiGPO). verl-agent: 0.95."""
    advantage_norm: Literal["std", "mean"] = "mean"
    """``std``: (R - mean) / std (GRPO); ``mean``: R - mean (Dr. GRPO, verl-agent GiGPO's ``mean_norm``)."""
    step_advantage_weight: float = 1.0
    """GiGPO's omega: weight of the step-level (anchor-state) advantage; 0 is plain GRPO. verl-agent: 1."""
    clip_low: float = 0.2
    """Lower clip of the ratio (1 - clip_low). verl-agent: 0.2."""
    clip_high: float = 0.28
    """Upper clip of the ratio (1 + clip_high). DAPO's clip-higher: 0.28."""
    loss_aggregation: Literal["sequence", "token-mean", "token-sum"] = "sequence"
    """``sequence``: one ratio per answer, on its lambda-weighted log-prob (RL4VLM, as PPO here);
    ``token-mean``: a ratio per token, averaged over the tokens of the micro-batch (DAPO);
    ``token-sum``: per-token ratios summed per answer and divided by ``policy.max_new_tokens``, a constant
    (Dr. GRPO)."""
    kl_coef: float = 0.0
    """KL penalty (k3) to the reference policy: the LoRA-off base, or a frozen copy of the starting weights
    under full fine-tuning. TRL: 0; verl-agent: 0.01."""
    drop_equal_groups: bool = False
    """Leave out groups whose returns are all equal (they carry no GRPO signal; DAPO's dynamic sampling)."""
    update_epochs: int = 1
    """Passes over the round's samples."""
    minibatch_size: int = 64
    """Samples per optimizer step (the last minibatch of a round may be smaller)."""
    micro_batch_size: int = 16
    """Samples per forward/backward pass."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    max_nonfinite_steps: int = 5
    """Abort after this many optimizer steps in a row with a non-finite loss or gradient."""
    reward: list[str] = field(default_factory=lambda: ["env:1", "invalid:-0.1"])
    """Reward modules and their weights, ``NAME[:WEIGHT[:KEY=VALUE,...]]`` (``rewards/``): the env's reward
    (``env``), the invalid-answer indicator (``invalid``), a well-formed answer (``format``),
    potential-based shaping at this run's gamma (``shaping``), a CLIP reward (``clip``, VLM-RM), a learned
    reward model (``rm:W:path=DIR``). Their weighted sum is what the algorithm optimises; each term is
    logged as ``rewards/<name>``. Default: the env's reward, minus 0.1 for an invalid answer (verl-agent: 0.1)."""

    @property
    def num_groups(self) -> int:
        return self.num_envs // self.group_size

    def check_world_size(self, world_size: int) -> None:
        super().check_world_size(world_size)
        if self.num_groups % world_size:
            raise ConfigError(
                f"{world_size} processes cannot share {self.num_groups} GRPO groups (num_envs={self.num_envs} / "
                f"group_size={self.group_size}): a group plays on one rank. Use a num_envs that is a multiple of "
                f"group_size * {world_size} = {self.group_size * world_size}."
            )

    def validate(self) -> None:
        if self.group_size < 2:
            raise ConfigError(f"group_size={self.group_size}: a group needs at least 2 envs to compare returns.")
        if self.num_envs % self.group_size:
            raise ConfigError(
                f"num_envs={self.num_envs} does not split into groups of {self.group_size}; use a num_envs that is "
                f"a multiple of group_size (e.g. {self.group_size * max(1, self.num_envs // self.group_size)})."
            )
        super().validate()
        for name in ("learning_rate", "max_grad_norm"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}.")
        if not 0 < self.clip_low < 1 or self.clip_high <= 0:
            raise ConfigError(f"Need 0 < clip_low < 1 and clip_high > 0, got {self.clip_low} and {self.clip_high}.")
        for name in ("max_episode_steps", "update_epochs", "minibatch_size", "micro_batch_size", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.minibatch_size % self.micro_batch_size:
            raise ConfigError(
                f"minibatch_size={self.minibatch_size} is not a multiple of micro_batch_size={self.micro_batch_size}."
            )
        if not 0 <= self.gamma <= 1:
            raise ConfigError(f"gamma must be in [0, 1], got {self.gamma}.")
        check_rewards(self.reward)
        if self.total_env_steps < self.num_envs:
            raise ConfigError(f"total_env_steps={self.total_env_steps} is less than one step of every env.")


# ----------------------------------------------------------------------------------------------------------
# One round of group rollouts
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Round:
    """The trajectories of one round: per env, its steps' completions, rewards and observation keys."""

    completions: list[list[Completion]]
    rewards: list[list[float]]
    states: list[list[str]]
    groups: np.ndarray
    finished: list[dict[str, float]]
    act_seconds: float
    tokens: int
    invalid: int
    thoughts: list[float]
    reward_terms: dict[str, float] = dataclasses.field(default_factory=dict)
    """Each reward module's (unweighted) sum over the round's steps."""

    @staticmethod
    def join(parts: list[Round]) -> Round:
        """One round from the rounds of consecutive blocks of groups (the ranks of a data-parallel run), laid
        out as one process playing every group would have."""
        if len(parts) == 1:
            return parts[0]
        offsets = np.cumsum([0] + [int(part.groups.max()) + 1 for part in parts[:-1]])
        return Round(
            completions=[c for part in parts for c in part.completions],
            rewards=[r for part in parts for r in part.rewards],
            states=[k for part in parts for k in part.states],
            groups=np.concatenate([part.groups + offset for part, offset in zip(parts, offsets)]),
            finished=[e for part in parts for e in part.finished],
            act_seconds=max(part.act_seconds for part in parts),  # the ranks act at the same time
            tokens=sum(part.tokens for part in parts),
            invalid=sum(part.invalid for part in parts),
            thoughts=[t for part in parts for t in part.thoughts],
            reward_terms={
                name: sum(part.reward_terms.get(name, 0.0) for part in parts) for name in parts[0].reward_terms
            },
        )


def check_step_limit(config: GRPOConfig, seeds: list[int]) -> None:
    """Before the model loads: if the env has a scripted expert and it needs more than ``max_episode_steps``
    on every task of the first round, no trajectory can succeed within the limit, so stop and say so.
    (Envs without an expert are checked after each round instead: see ``play_round``.)"""
    import gymnasium as gym

    env = gym.make(config.env_id, **config.env_kwargs)
    try:
        if not callable(getattr(env.unwrapped, "expert_action", None)):
            return
        for seed in seeds:
            env.reset(seed=seed)
            for _ in range(config.max_episode_steps):
                try:
                    action = int(env.unwrapped.expert_action())
                except NotImplementedError:  # LanguageEnv's placeholder: this env has no expert
                    return
                _, _, terminated, truncated, info = env.step(action)
                if terminated or truncated:
                    break
            if terminated and info.get("success", True):
                return  # one task the expert solves within the limit is enough
        raise ConfigError(
            f"max_episode_steps={config.max_episode_steps}: {config.env_id}'s scripted expert does not finish any "
            f"of the first round's {len(seeds)} tasks within it, so no trajectory can succeed; raise "
            "max_episode_steps (or leave it at least at the env's own step limit)."
        )
    finally:
        env.close()


def observation_key(observation: dict) -> str:
    """A hash of the image's pixels and the text: equal keys are GiGPO's identical states."""
    digest = hashlib.sha1(np.ascontiguousarray(observation["image"]).tobytes())
    digest.update(str(observation["text"]).encode())
    return digest.hexdigest()


def play_round(runner, policy: VLMPolicy, config: GRPOConfig, seeds: list[int], reward_set) -> Round:
    """Reset each group with its seed and play until every env's episode has ended (or the step limit);
    ``reward_set`` (``rewards.RewardSet``) scores every step."""
    groups = np.repeat(np.arange(config.num_groups), config.group_size)
    runner.reset([seeds[group] for group in groups])
    runner.stats.pop()  # the round's own episodes are in its steps
    first = {i: observation_key(_observation(runner.observations, i)) for i in range(config.num_envs)}
    for group in range(config.num_groups):
        members = np.flatnonzero(groups == group)
        if len({first[i] for i in members}) > 1:
            raise ConfigError(
                f"{runner.env_id}: envs reset with the same seed ({seeds[group]}) show different first observations; "
                "GRPO compares trajectories of the same task, so the env's reset must be deterministic for a seed."
            )
    result = Round([[] for _ in groups], [[] for _ in groups], [[] for _ in groups], groups, [], 0.0, 0, 0, [])
    active = np.ones(config.num_envs, dtype=bool)
    keys = first  # the first step's states were hashed for the check above
    for _ in range(config.max_episode_steps):
        step = runner.step(policy, active=active)
        result.act_seconds += step.act_seconds
        result.tokens += step.generated_tokens
        result.invalid += int(step.invalid.sum())
        result.thoughts.extend(step.thoughts_true[~np.isnan(step.thoughts_true)])
        scored = reward_set(
            step.observations, step.completions, step.infos, env_rewards=step.rewards, terminated=step.terminated,
            truncated=step.truncated, next_observations=step.next_observations, active=active,
        )  # fmt: skip
        for name, value in [*scored.terms.items(), ("total", scored.total)]:
            result.reward_terms[name] = result.reward_terms.get(name, 0.0) + float(value[active].sum())
        for index in np.flatnonzero(active):
            result.completions[index].append(step.completions[index])
            result.rewards[index].append(float(scored.total[index]))
            result.states[index].append(keys[index])
        result.finished.extend(step.finished)
        active &= ~(step.terminated | step.truncated)
        if not active.any():
            break
        keys = {i: observation_key(_observation(runner.observations, i)) for i in np.flatnonzero(active)}
    if active.all():
        warnings.warn(
            f"max_episode_steps={config.max_episode_steps} cut every episode of this round before it ended; their "
            "returns are partial and GRPO compares only those. Raise max_episode_steps if the env needs more steps.",
            stacklevel=2,
        )
    return result


def _observation(batch: dict, index: int) -> dict:
    return {key: value[index] for key, value in batch.items()}


def round_advantages(trajectories: Round, config: GRPOConfig) -> tuple[list[np.ndarray], dict[str, float]]:
    """Per env, the advantage of each of its steps: ``A_episode + omega * A_step``; and group statistics."""
    scale = config.advantage_norm == "std"
    returns = np.array([sum(rewards) for rewards in trajectories.rewards])
    episode = group_advantages(returns, trajectories.groups, scale=scale)
    lengths = [len(rewards) for rewards in trajectories.rewards]
    step_returns = np.concatenate([discounted_returns_to_go(np.array(r), config.gamma) for r in trajectories.rewards])
    step_groups = np.repeat(trajectories.groups, lengths)
    states = [key for keys in trajectories.states for key in keys]
    step = anchor_advantages(step_returns, step_groups, states, scale=scale)
    combined = np.repeat(episode, lengths) + config.step_advantage_weight * step
    per_env = np.split(combined, np.cumsum(lengths)[:-1])
    group_std = [returns[trajectories.groups == g].std() for g in range(config.num_groups)]
    anchors = {}
    for group, state in zip(step_groups.tolist(), states):
        anchors[(group, state)] = anchors.get((group, state), 0) + 1
    stats = {
        "grpo/group_return_mean": float(returns.mean()),
        "grpo/group_return_std": float(np.mean(group_std)),
        "grpo/zero_variance_groups": float(np.mean([s == 0 for s in group_std])),
        "grpo/anchor_group_size": float(np.mean(list(anchors.values()))),
        "grpo/shared_state_fraction": float(np.mean([anchors[key] > 1 for key in zip(step_groups.tolist(), states)])),
    }
    return per_env, stats


# ----------------------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------------------


def grpo_losses(
    policy: VLMPolicy,
    completions: list[Completion],
    advantages: torch.Tensor,
    reference: VLMPolicy | None,
    config: GRPOConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate of one micro-batch (aggregated as ``loss_aggregation`` says), plus the KL."""
    new = policy.evaluate(completions)
    device = new.logprob.device
    advantages = advantages.to(device)
    if config.loss_aggregation == "sequence":
        old = torch.tensor([c.logprob for c in completions], device=device)
        per_sample, ratio = clipped_surrogate(new.logprob, old, advantages, config.clip_low, config.clip_high)
        policy_loss = per_sample.mean()
        log_ratio = new.logprob - old
    else:
        old = torch.zeros_like(new.token_logprobs)
        weights = torch.zeros_like(new.token_logprobs)
        for row, completion in enumerate(completions):
            old[row, : len(completion.token_logprobs)] = completion.token_logprobs.to(device)
            weights[row, : len(completion.token_weights)] = completion.token_weights.to(device)
        per_token, ratio = clipped_surrogate(
            new.token_logprobs, old, advantages[:, None].expand_as(old), config.clip_low, config.clip_high
        )
        per_token = per_token * weights * new.token_mask  # lambda-weighted thought tokens, as in the sequence form
        if config.loss_aggregation == "token-mean":
            policy_loss = per_token.sum() / new.token_mask.sum().clamp(min=1)
        else:
            policy_loss = (per_token.sum(-1) / policy.config.max_new_tokens).mean()
        ratio, log_ratio = ratio[new.token_mask], (new.token_logprobs - old)[new.token_mask]
    loss = policy_loss
    kl = torch.zeros((), device=device)
    if reference is not None:
        with torch.no_grad():
            ref = reference.reference_logprobs(completions) if reference is policy else reference.evaluate(completions)
        kl = k3_kl(new.token_logprobs, ref.token_logprobs.to(device), new.token_mask).mean()
        loss = loss + config.kl_coef * kl
    with torch.no_grad():
        parts = {
            "policy_loss": policy_loss.detach(),
            "approx_kl": approx_kl(log_ratio),
            "clipfrac": clip_fraction(ratio, config.clip_low, config.clip_high),
            "kl_ref": kl.detach(),
            "entropy": new.entropy.mean().detach(),
        }
    return loss, parts


def make_reference(policy: VLMPolicy, config: GRPOConfig) -> VLMPolicy | None:
    """The policy itself (its LoRA-off base gives reference log-probs) or, under full fine-tuning, a frozen
    policy loaded from the run's starting point (``config.policy``: also right when the run is resumed);
    ``None`` without a KL penalty."""
    if config.kl_coef <= 0:
        return None
    if policy.config.lora_rank > 0:
        return policy
    from agents.policy import load_policy

    options = dataclasses.asdict(config.policy)
    options["device"] = str(policy.device)  # a data-parallel rank's own device
    frozen = load_policy(options.pop("model"), **options)
    frozen.requires_grad_(False)
    return frozen


def grpo_update(
    policy: VLMPolicy,
    samples: list[tuple[Completion, float]],
    reference: VLMPolicy | None,
    config: GRPOConfig,
    generator: np.random.Generator,
    guarded_step: GuardedStep,
) -> dict[str, float]:
    """``update_epochs`` passes over the round's ``(completion, advantage)`` samples in shuffled minibatches."""
    totals = LossTotals()

    def loss_fn(micro: np.ndarray) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        advantages = torch.tensor([samples[i][1] for i in micro], dtype=torch.float32)
        return grpo_losses(policy, [samples[i][0] for i in micro], advantages, reference, config)

    for _epoch in range(config.update_epochs):
        order = generator.permutation(len(samples))
        for begin in range(0, len(order), config.minibatch_size):
            minibatch = order[begin : begin + config.minibatch_size]
            micro = config.micro_batch_size
            totals.add(guarded_step.step([minibatch[i : i + micro] for i in range(0, len(minibatch), micro)], loss_fn))
    return totals.metrics()


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def train(config: GRPOConfig, defaults: GRPOConfig | None = None) -> Path:
    """Run GRPO (or GiGPO with ``step_advantage_weight > 0``); return the run directory."""
    with Run(config, "grpo", defaults) as run:
        config = run.config
        check_step_limit(config, round_seeds(config, 0))
        policy = run.load_policy()
        runner = run.make_env_runner()
        policy.value_head.requires_grad_(False)  # no critic in GRPO
        optimizer = make_optimizer(policy, config.learning_rate)
        reference = make_reference(policy, config)
        run.restore(runner=runner, optimizer=optimizer)
        optimizer = run.prepare(policy, optimizer)
        trainable = [p for p in policy.parameters() if p.requires_grad]  # after prepare: FSDP swaps the parameters
        guarded_step = GuardedStep(
            optimizer, trainable, config.max_grad_norm, config.max_nonfinite_steps, parallel=run.parallel
        )
        # This rank's groups: a contiguous block (Run gave it the matching envs).
        with deferred_validation():
            local = dataclasses.replace(config, num_envs=runner.num_envs)
        first_group = runner.first_env // config.group_size
        reward_set = run.make_rewards(config.reward, config.gamma, policy)
        # One round per update; rounds of one-step episodes would be the most, so this bounds the loop.
        max_rounds = max(1, config.total_env_steps // config.num_envs)

        for update in run.updates(max_rounds, config.num_envs):
            start = time.perf_counter()
            # The rate decays with the env steps used (rounds differ in length), linearly to 0 at the budget.
            learning_rate = set_learning_rate(
                optimizer, run.env_steps(runner), config.total_env_steps, config.anneal_lr
            )
            seeds = round_seeds(config, update)[first_group : first_group + local.num_groups]
            with run.whole_policy(policy):  # act on whole parameters (FSDP gathers them once)
                played = play_round(runner, policy, local, seeds, reward_set)
            trajectories = Round.join(run.gather(played))
            advantages, stats = round_advantages(trajectories, config)

            samples = [
                (completion, float(advantage))
                for env in range(config.num_envs)
                if not (config.drop_equal_groups and _equal_group(trajectories, env))
                for completion, advantage in zip(trajectories.completions[env], advantages[env])
            ]
            metrics = grpo_update(policy, samples, reference, config, run.generator, guarded_step)
            steps = sum(len(c) for c in trajectories.completions)
            metrics.update(stats)
            metrics.update(
                {
                    "grpo/samples": len(samples),
                    "charts/invalid_action_rate": trajectories.invalid / max(steps, 1),
                    "charts/learning_rate": learning_rate,
                    "charts/env_steps_per_s": steps / (time.perf_counter() - start),
                    "charts/tokens_per_s": trajectories.tokens / max(trajectories.act_seconds, 1e-9),
                    **episode_metrics(trajectories.finished),
                    **{f"rewards/{name}": total / max(steps, 1) for name, total in trajectories.reward_terms.items()},
                }
            )
            if trajectories.thoughts:
                metrics["charts/thought_accuracy"] = float(np.mean(trajectories.thoughts))
            env_steps = run.env_steps(runner)
            last = env_steps >= config.total_env_steps
            run.end_update(
                update, metrics, env_steps, policy, finished=trajectories.finished, last=last,
                runner=runner, optimizer=optimizer,
            )  # fmt: skip
            if last:
                break
        return run.finish(policy, runner)


def round_seeds(config: GRPOConfig, update: int) -> list[int]:
    """The tasks of a round, one seed per group: seeds of their own, far from the evaluation's (10,000 +)."""
    base = 1_000_000 * (config.seed + 1) + update * config.num_groups
    return [base + group for group in range(config.num_groups)]


def _equal_group(trajectories: Round, env: int) -> bool:
    group = trajectories.groups[env]
    returns = [sum(r) for r, g in zip(trajectories.rewards, trajectories.groups) if g == group]
    return max(returns) == min(returns)
