"""iRe-VLA: improve an action-head policy by alternating frozen-backbone RL with supervised learning.

Guo et al. 2025, "Improving Vision-Language-Action Model with Online Reinforcement Learning"
(https://arxiv.org/abs/2501.16664). The policy is :class:`~agents.vla.VLAPolicy` (a VLM backbone, an
action head on the last prompt token's hidden state, a value head)::

    stage 0     behaviour cloning on the expert store: the NLL of the expert action under the head's
                distribution; trains the backbone (LoRA adapters, or the full weights) and the action head
    round k = 1..K
      stage 1   PPO with the backbone frozen: only the action head and the value head (the critic) train.
                The backbone's hidden state is computed once per env step, under no_grad, while acting, and
                every PPO epoch reuses it, so an update costs the small heads only. The successful episodes
                go to the run's own store (``<run dir>/successes``).
      stage 2   supervised learning on the expert data plus the stage-1 successes of all rounds so far
                (the newest ``max_online_steps`` steps: old data does not swamp new); each batch draws
                ``online_fraction`` of its rows from the successes. Trains backbone and action head.

The baseline the paper compares with, PPO on the whole model from the same stage-0 policy, is the same loop
with ``--stage1-train-backbone --no-stage2``: stage 1 then runs the backbone forward and backward on each
minibatch's observations again, and no supervised round follows.

Read top to bottom: the config, the data (expert store -> :class:`Demo` rows), the losses (behaviour
cloning; PPO on cached features, from ``agents/losses.py``), the three stages, and ``train``. Each stage
starts a fresh AdamW (moments are not carried from one stage's objective into another's) and trains at a
constant rate. Stage 0 is checkpoint unit 0 and round ``k`` is unit ``k``, so a run killed in round ``k``
resumes at its start and continues bit for bit on the CPU (tested): a unit's state is the policy, the RNG
states, the env runner (its episodes under way) and the success store, cut back to the checkpoint.

    vlmrl collect reach --expert --continuous --episodes 200 --out data/reach-continuous
    vlmrl train reach --algo ire-vla --data data/reach-continuous
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from agents.errors import ConfigError
from agents.losses import approx_kl, clip_fraction, clipped_surrogate, value_loss
from agents.optim import GuardedStep, LossTotals
from agents.policy import split_observations
from agents.rollout import EnvRunner, episode_metrics
from agents.run import Run, RunConfig, check_rewards
from agents.storage import compute_gae
from agents.vla import HeadConfig, VLAPolicy, head_config_for

SUCCESS_STORE = "successes"


@dataclass
class IReVLAConfig(RunConfig):
    """iRe-VLA's options on top of every run's (:class:`~agents.run.RunConfig`). The backbone is ``--model``
    with its ``--lora-rank`` (0: full weights); the action head's options are below. ``--model`` may also name
    an action-head policy (an iRe-VLA run or checkpoint): training then goes on from its backbone and heads."""

    trains_action_heads: ClassVar[bool] = True

    data: str = ""
    """Expert trajectory store (``vlmrl collect <env> --expert [--continuous] --out PATH``). A continuous head
    learns from its ``continuous_action`` column, a discrete head from its ``action`` column."""
    skip_bad_shards: bool = False
    """Leave out a corrupt shard of the store (with a warning naming it) instead of stopping."""

    # --- the action head -----------------------------------------------------------------------------------
    action_head: Literal["continuous", "discrete"] = "continuous"
    """``continuous``: a tanh-squashed Gaussian over the env's ``continuous_action_space`` (Reach, Push);
    ``discrete``: a categorical over the env's action names (any env with a language spec)."""
    head_hidden_sizes: tuple[int, ...] = (256,)
    """Hidden layer sizes of the action head's MLP."""
    log_std_init: float = -0.5
    """Initial log standard deviation of the Gaussian head (pre-squash)."""
    state_dependent_std: bool = False
    """The Gaussian's log-std is an output of the head (else one learned vector)."""

    # --- the loop --------------------------------------------------------------------------------------------
    rounds: int = 2
    """K: rounds of stage 1 (RL, frozen backbone) then stage 2 (supervised) after stage 0."""
    checkpoint_every: int = 1
    """Save a checkpoint every this many units (stage 0 is unit 0, round k unit k), and always at the end."""
    stage_eval_episodes: int = 16
    """Greedy evaluation episodes (held-out seeds 10,000 + seed upward) after stage 0 and after every stage 1
    and stage 2, logged as ``ire/stage<n>_success_rate`` and ``eval/success_rate``; 0: none."""

    # --- stages 0 and 2: supervised ----------------------------------------------------------------------------
    stage0_steps: int = 200
    """Stage 0 budget: behaviour-cloning optimizer steps on the expert data."""
    stage0_learning_rate: float = 1e-3
    """Stage 0 AdamW learning rate."""
    stage0_train_backbone: bool = True
    """Stage 0 trains the backbone (LoRA adapters or full weights) besides the action head."""
    stage2_steps: int = 50
    """Stage 2 budget per round: supervised optimizer steps on expert data plus stage-1 successes."""
    stage2_learning_rate: float = 3e-4
    """Stage 2 AdamW learning rate."""
    stage2_train_backbone: bool = True
    """Stage 2 trains the backbone (LoRA adapters or full weights) besides the action head."""
    stage2: bool = True
    """Run stage 2 after every stage 1. ``--no-stage2 --stage1-train-backbone`` is the baseline iRe-VLA is
    measured against: PPO on the whole model (LoRA or full weights, and both heads) from the same stage-0
    policy, for the same env steps, with no supervised rounds."""
    online_fraction: float = 0.5
    """Stage 2: share of each batch drawn from the stage-1 successes (the rest from the expert data); while
    there are none, every row is expert data."""
    max_online_steps: int = 2000
    """Stage 2: only the newest this many success steps are drawn from (the cap on old successes)."""
    batch_size: int = 16
    """Stages 0 and 2: samples per optimizer step."""
    micro_batch_size: int = 16
    """Stages 0 and 2: samples per forward/backward pass; gradients accumulate over a batch."""

    # --- stage 1: PPO with the backbone frozen -------------------------------------------------------------------
    stage1_env_steps: int = 1024
    """Stage 1 budget per round: environment steps (all envs together), in whole updates of num_envs *
    num_steps (rounded down)."""
    stage1_learning_rate: float = 3e-4
    """Stage 1 AdamW learning rate of the action head and the value head."""
    stage1_train_backbone: bool = False
    """Stage 1 trains the backbone (LoRA adapters or full weights) too, not iRe-VLA's frozen one: every PPO
    minibatch then runs the backbone forward and backward on its observations again, as text PPO does."""
    stage1_backbone_learning_rate: float | None = None
    """Stage 1 AdamW learning rate of the backbone, with ``--stage1-train-backbone`` (default: the heads')."""
    num_steps: int = 16
    """Stage 1 rollout length per env per update (batch = num_envs * num_steps)."""
    gamma: float = 0.95
    """Stage 1 discount factor."""
    gae_lambda: float = 0.95
    """Stage 1 GAE lambda."""
    update_epochs: int = 4
    """Stage 1 passes over each batch (cheap with a frozen backbone: the heads run on stored features)."""
    minibatch_size: int = 32
    """Stage 1 samples per optimizer step."""
    clip_coef: float = 0.2
    """Stage 1 surrogate (and value) clipping coefficient."""
    vf_coef: float = 0.5
    """Stage 1 value loss coefficient."""
    ent_coef: float = 0.0
    """Stage 1 entropy bonus (of the pre-squash Gaussian, or the categorical)."""
    reward: list[str] = field(default_factory=lambda: ["env:1"])
    """Stage 1 reward modules, ``NAME[:WEIGHT[:KEY=VALUE,...]]`` (``rewards/``), e.g. ``env:1 shaping:1`` for
    Reach's potential-based shaping. An action head never answers invalidly."""

    max_grad_norm: float = 1.0
    """Gradient clipping norm (every stage)."""
    max_nonfinite_steps: int = 5
    """Abort after this many optimizer steps in a row with a non-finite loss or gradient."""

    @property
    def rollout_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def stage1_updates(self) -> int:
        return self.stage1_env_steps // self.rollout_size

    def head_config(self) -> HeadConfig:
        """The action head's config for this run's env (a ``ConfigError`` when the env cannot take it)."""
        try:
            return head_config_for(
                self.env_id,
                self.env_kwargs,
                self.action_head,
                hidden_sizes=self.head_hidden_sizes,
                log_std_init=self.log_std_init,
                state_dependent_std=self.state_dependent_std,
            )
        except ValueError as error:
            raise ConfigError(str(error)) from None

    def validate(self) -> None:
        """Fail before any model loads, saying what to change."""
        super().validate()
        if not self.data:
            raise ConfigError(
                "iRe-VLA's stage 0 needs expert data: pass --data PATH (a store made by `vlmrl collect <env> --expert "
                "--continuous --out PATH`, or without --continuous for --action-head discrete)."
            )
        if not Path(self.data).exists():
            raise ConfigError(f"--data {self.data}: no such directory. Make one with `vlmrl collect <env> --expert`.")
        budgets = {
            "stage0_steps": "behaviour-cloning steps of stage 0",
            "stage1_env_steps": "env steps of stage 1 per round",
            "rounds": "rounds of stages 1 and 2",
        }
        if self.stage2:
            budgets["stage2_steps"] = "supervised steps of stage 2 per round; --no-stage2 leaves stage 2 out"
        for name, meaning in budgets.items():
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"{name}={getattr(self, name)}: every stage needs a budget of at least 1 ({meaning}); "
                    "give a positive value."
                )
        if self.stage1_updates < 1:
            raise ConfigError(
                f"stage1_env_steps={self.stage1_env_steps} is less than one rollout (num_envs * num_steps = "
                f"{self.rollout_size}); raise stage1_env_steps or lower num_envs/num_steps."
            )
        if self.rollout_size % self.minibatch_size:
            raise ConfigError(
                f"The rollout (num_envs * num_steps = {self.rollout_size}) does not split into minibatches of "
                f"{self.minibatch_size}; choose a minibatch_size that divides it."
            )
        if self.batch_size < 1 or self.micro_batch_size < 1 or self.batch_size % self.micro_batch_size:
            raise ConfigError(
                f"batch_size={self.batch_size} must be a positive multiple of micro_batch_size={self.micro_batch_size}."
            )
        for name in (
            "stage0_learning_rate",
            "stage1_learning_rate",
            "stage2_learning_rate",
            "clip_coef",
            "max_grad_norm",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}.")
        if self.stage1_backbone_learning_rate is not None:
            if not self.stage1_train_backbone:
                raise ConfigError(
                    "stage1_backbone_learning_rate is set but stage 1 keeps the backbone frozen: add "
                    "--stage1-train-backbone, or drop --stage1-backbone-learning-rate."
                )
            if self.stage1_backbone_learning_rate <= 0:
                raise ConfigError(
                    f"stage1_backbone_learning_rate must be > 0, got {self.stage1_backbone_learning_rate}."
                )
        if not 0 <= self.online_fraction <= 1:
            raise ConfigError(f"online_fraction must be in [0, 1], got {self.online_fraction}.")
        if self.max_online_steps < 1 or self.update_epochs < 1 or self.max_nonfinite_steps < 1:
            raise ConfigError("max_online_steps, update_epochs and max_nonfinite_steps must be >= 1.")
        if self.stage_eval_episodes < 0:
            raise ConfigError(f"stage_eval_episodes must be >= 0, got {self.stage_eval_episodes}.")
        if not (0 <= self.gamma <= 1 and 0 <= self.gae_lambda <= 1):
            raise ConfigError(f"gamma and gae_lambda must be in [0, 1], got {self.gamma} and {self.gae_lambda}.")
        if self.save_trajectories != "none":
            raise ConfigError(
                f"iRe-VLA stores its stage-1 successes itself (<run dir>/{SUCCESS_STORE}); drop --save-trajectories."
            )
        check_rewards(self.reward)
        self.head_config()

    def check_world_size(self, world_size: int) -> None:
        super().check_world_size(world_size)
        if world_size > 1:
            raise ConfigError(
                "iRe-VLA runs in one process (it is not data-parallel yet); launch it without a launcher."
            )


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Demo:
    """One supervised sample: an observation and the action to imitate (a vector or an index)."""

    observation: dict[str, Any]
    action: np.ndarray | int


def store_demos(dataset, head: HeadConfig, where: str) -> list[Demo]:
    """The rows of a trajectory store as demos for ``head``: their ``continuous_action`` (continuous head) or
    their valid ``action`` (discrete head); a ``ConfigError`` that says what to change when none fit."""
    if head.action_type == "continuous":
        vectors = dataset["continuous_action"]
        rows = [index for index, vector in enumerate(vectors) if vector is not None]
        if not rows:
            raise ConfigError(
                f"{where} holds no continuous actions (it was collected with discrete ones): collect with "
                "`vlmrl collect <env> --expert --continuous`, or train a categorical head with --action-head discrete."
            )
        sizes = sorted({len(vectors[index]) for index in rows})
        if sizes != [head.action_dim]:
            raise ConfigError(
                f"{where} holds continuous actions of size {sizes}, but the env's continuous action space has "
                f"{head.action_dim} dimensions: collect the data from this env with `--expert --continuous`."
            )
    else:
        rows = [index for index, valid in enumerate(dataset["valid"]) if valid]
        if not rows:
            raise ConfigError(f"{where} has no step with a valid discrete action to learn from.")
    selected = dataset.select(rows)
    demos = []
    for row in selected:
        observation = {"image": np.asarray(row["image"].convert("RGB")), "text": row["step_text"]}
        if head.action_type == "continuous":
            demos.append(Demo(observation, np.asarray(row["continuous_action"], dtype=np.float32)))
        else:
            demos.append(Demo(observation, int(row["action"])))
    return demos


def load_expert_demos(config: IReVLAConfig, head: HeadConfig) -> list[Demo]:
    """The expert store's steps as demos, after every check that can fail before a model loads: the store's
    env, its env options, and actions of the head's kind and size."""
    from agents.trajectories import check_store, load_trajectories

    try:
        dataset = load_trajectories(config.data, skip_bad_shards=config.skip_bad_shards)
        check_store(dataset, env_id=config.env_id, env_kwargs=config.env_kwargs)
    except ValueError as error:
        raise ConfigError(f"--data {config.data}: {error}") from None
    return store_demos(dataset, head, config.data)


def load_online_demos(run_dir: Path, head: HeadConfig, cap: int) -> list[Demo]:
    """The newest ``cap`` steps of the stage-1 successes stored so far (none yet: an empty list)."""
    from agents.trajectories import load_trajectories

    path = run_dir / SUCCESS_STORE
    try:
        dataset = load_trajectories(path)
    except ValueError:  # no shard yet: no success so far
        return []
    dataset = dataset.select(range(max(0, len(dataset) - cap), len(dataset)))
    return store_demos(dataset, head, str(path))


# ----------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------


def action_tensor(demos: list[Demo], policy: VLAPolicy) -> torch.Tensor:
    if policy.continuous:
        return torch.as_tensor(np.stack([d.action for d in demos]), dtype=torch.float32, device=policy.device)
    return torch.as_tensor([d.action for d in demos], dtype=torch.long, device=policy.device)


def bc_loss(
    policy: VLAPolicy, spec, demos: list[Demo], train_backbone: bool
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Behaviour cloning: the mean negative log-likelihood of the demos' actions under the head's
    distribution (the squashed Gaussian's density, Jacobian included, or the categorical's log-prob). A
    frozen backbone's features are taken under no_grad."""
    with torch.set_grad_enabled(train_backbone and torch.is_grad_enabled()):
        features = policy.features([d.observation for d in demos], spec)
    logprob, entropy = policy.head.action_log_prob(features, action_tensor(demos, policy))
    loss = -logprob.mean()
    return loss, {"bc_nll": loss.detach(), "entropy": entropy.mean().detach()}


@dataclass
class HeadRollout:
    """A stage-1 batch, flattened over steps and envs: the backbone features the heads read and what PPO
    needs besides."""

    features: torch.Tensor  # (N, hidden)
    raw: torch.Tensor  # (N, dim) pre-squash samples, or (N,) indices
    logprobs: torch.Tensor  # (N,)
    values: torch.Tensor  # (N,)
    advantages: torch.Tensor  # (N,)
    returns: torch.Tensor  # (N,)
    observations: list[dict] | None = None
    """The observations, kept only when stage 1 trains the backbone (its features are then recomputed)."""


def ppo_head_losses(
    policy: VLAPolicy,
    batch: HeadRollout,
    rows: np.ndarray,
    advantages: torch.Tensor,
    config: IReVLAConfig,
    spec,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, clipped value loss and entropy bonus. On stored features only the heads run;
    when the batch kept its observations (a backbone that trains), the backbone reads them again, with
    gradients."""
    device = policy.device
    if batch.observations is not None:
        features = policy.features([batch.observations[i] for i in rows], spec)
    else:
        features = batch.features[rows].to(device)
    logprob, entropy = policy.head.log_prob(features, batch.raw[rows].to(device))
    value = policy.value_head(features)
    old_logprob = batch.logprobs[rows].to(device)
    policy_loss, ratio = clipped_surrogate(
        logprob, old_logprob, advantages.to(device), config.clip_coef, config.clip_coef
    )
    critic_loss = value_loss(value, batch.values[rows].to(device), batch.returns[rows].to(device), config.clip_coef)
    loss = policy_loss.mean() - config.ent_coef * entropy.mean() + config.vf_coef * critic_loss.mean()
    with torch.no_grad():
        parts = {
            "policy_loss": policy_loss.mean(),
            "value_loss": critic_loss.mean(),
            "entropy": entropy.mean(),
            "approx_kl": approx_kl(logprob - old_logprob),
            "clipfrac": clip_fraction(ratio, config.clip_coef, config.clip_coef),
        }
    return loss, parts


# ----------------------------------------------------------------------------------------------------------
# The stages
# ----------------------------------------------------------------------------------------------------------


def set_trainable(policy: VLAPolicy, backbone: bool, action_head: bool, value_head: bool) -> list[torch.nn.Parameter]:
    """Switch gradients on for the named parts only; return the trainable parameters (for a stage's optimizer)."""
    for parameter in policy.backbone_parameters:
        parameter.requires_grad_(backbone)
    policy.head.requires_grad_(action_head)
    policy.value_head.requires_grad_(value_head)
    return [p for p in policy.parameters() if p.requires_grad]


def make_adamw(parameters: list[torch.nn.Parameter] | list[dict], learning_rate: float) -> torch.optim.AdamW:
    """AdamW over ``parameters`` (or parameter groups, whose own ``lr`` wins over ``learning_rate``)."""
    return torch.optim.AdamW(parameters, lr=learning_rate, eps=1e-5, weight_decay=0.0)


def supervised_stage(
    policy: VLAPolicy,
    spec,
    expert: list[Demo],
    online: list[Demo],
    *,
    steps: int,
    learning_rate: float,
    train_backbone: bool,
    online_fraction: float,
    config: IReVLAConfig,
    generator: np.random.Generator,
) -> dict[str, float]:
    """Stages 0 and 2: ``steps`` optimizer steps of behaviour cloning on batches of ``config.batch_size``,
    ``round(online_fraction * batch_size)`` rows of each drawn from ``online`` (when it is not empty) and the
    rest from ``expert`` (shuffled epochs). Returns the mean of each loss part over the stage."""
    from agents.sft import Batches

    trainable = set_trainable(policy, backbone=train_backbone, action_head=True, value_head=False)
    optimizer = make_adamw(trainable, learning_rate)
    guarded = GuardedStep(optimizer, trainable, config.max_grad_norm, config.max_nonfinite_steps)
    online_rows = round(online_fraction * config.batch_size) if online else 0
    expert_rows = config.batch_size - online_rows
    expert_batches = Batches(len(expert), expert_rows, generator) if expert_rows else None
    totals: dict[str, float] = {}
    done = 0
    for _ in range(steps):
        batch = [expert[i] for i in expert_batches.next()] if expert_batches is not None else []
        if online_rows:
            batch += [online[i] for i in generator.choice(len(online), online_rows, replace=len(online) < online_rows)]
        micro_batches = [
            list(range(i, min(i + config.micro_batch_size, len(batch))))
            for i in range(0, len(batch), config.micro_batch_size)
        ]
        parts = guarded.step(
            micro_batches, lambda micro, rows=batch: bc_loss(policy, spec, [rows[i] for i in micro], train_backbone)
        )
        if parts is not None:
            done += 1
            for key, value in parts.items():
                totals[key] = totals.get(key, 0.0) + value
    metrics = {f"losses/{key}": value / max(done, 1) for key, value in totals.items()}
    metrics["ire/online_rows_per_batch"] = float(online_rows)
    return metrics


def collect_head_rollout(
    policy: VLAPolicy, runner: EnvRunner, reward_set, config: IReVLAConfig
) -> tuple[HeadRollout, list[dict[str, float]], dict[str, float]]:
    """``num_steps`` vector steps of the head policy, the batch PPO needs (GAE bootstraps on truncation, not
    on termination), the episodes that ended and the reward terms' means."""
    spec = runner.spec
    steps, envs = config.num_steps, runner.num_envs
    features, raws, observations = [], [], []
    logprobs, values = np.zeros((steps, envs)), np.zeros((steps, envs))
    rewards, next_values = np.zeros((steps, envs)), np.zeros((steps, envs))
    terminated, truncated = np.zeros((steps, envs), dtype=bool), np.zeros((steps, envs), dtype=bool)
    finals: list[dict[int, float]] = []
    finished: list[dict[str, float]] = []
    terms: dict[str, float] = {}
    for t in range(steps):
        step = runner.step(policy)
        features.append(torch.stack([c.features for c in step.completions]))
        raws.append(torch.stack([c.raw for c in step.completions]))
        if config.stage1_train_backbone:
            images, texts = split_observations(step.observations)
            observations.extend({"image": image, "text": text} for image, text in zip(images, texts, strict=True))
        logprobs[t] = [c.logprob for c in step.completions]
        values[t] = [c.value for c in step.completions]
        scored = reward_set(
            step.observations, step.completions, step.infos, env_rewards=step.rewards,
            terminated=step.terminated, truncated=step.truncated, next_observations=step.next_observations,
        )  # fmt: skip
        rewards[t], terminated[t], truncated[t] = scored.total, step.terminated, step.truncated
        for name, value in scored.metrics().items():
            terms[name] = terms.get(name, 0.0) + value / steps
        cut = list(step.final_observations)
        finals.append(
            dict(zip(cut, policy.values([step.final_observations[i] for i in cut], spec).tolist())) if cut else {}
        )
        finished.extend(step.finished)
    last = policy.values(runner.observations, spec).numpy()
    next_values[:-1], next_values[-1] = values[1:], last
    for t, cut in enumerate(finals):  # a truncated episode bootstraps from its own final observation
        for index, value in cut.items():
            next_values[t, index] = value
    advantages, returns = compute_gae(
        rewards, values, next_values, terminated, truncated, config.gamma, config.gae_lambda
    )

    def flat(array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(array.reshape(-1), dtype=torch.float32)

    batch = HeadRollout(
        features=torch.cat(features),
        raw=torch.cat(raws),
        logprobs=flat(logprobs),
        values=flat(values),
        advantages=flat(advantages),
        returns=flat(returns),
        observations=observations if config.stage1_train_backbone else None,
    )
    return batch, finished, terms


def ppo_head_update(
    policy: VLAPolicy,
    batch: HeadRollout,
    config: IReVLAConfig,
    generator: np.random.Generator,
    guarded: GuardedStep,
    spec,
) -> dict[str, float]:
    """``update_epochs`` passes of clipped PPO over shuffled minibatches (of stored features, or of the
    observations when the backbone trains)."""
    totals = LossTotals()
    indices = np.arange(len(batch.logprobs))
    for _epoch in range(config.update_epochs):
        generator.shuffle(indices)
        for start in range(0, len(indices), config.minibatch_size):
            rows = indices[start : start + config.minibatch_size].copy()
            advantages = batch.advantages[rows]
            if len(rows) > 1:
                advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
            totals.add(
                guarded.step([rows], lambda micro, a=advantages: ppo_head_losses(policy, batch, micro, a, config, spec))
            )
    metrics = totals.metrics()
    returns, values = batch.returns.numpy(), batch.values.numpy()
    variance = np.var(returns)
    metrics["losses/explained_variance"] = (
        float("nan") if variance == 0 else float(1 - np.var(returns - values) / variance)
    )
    return metrics


def rl_stage(
    policy: VLAPolicy, runner: EnvRunner, reward_set, config: IReVLAConfig, run: Run, round_index: int
) -> list[dict[str, float]]:
    """Stage 1: ``stage1_updates`` PPO updates of the action head and the value head, the backbone frozen
    (its features are taken under no_grad by ``act``, and its parameters are excluded from the optimizer);
    with ``stage1_train_backbone``, of the backbone too. Logs each update; returns the episodes that ended."""
    trainable = set_trainable(policy, backbone=config.stage1_train_backbone, action_head=True, value_head=True)
    backbone_ids = {id(p) for p in policy.backbone_parameters}
    groups = [{"params": [p for p in trainable if id(p) not in backbone_ids], "lr": config.stage1_learning_rate}]
    if config.stage1_train_backbone:
        backbone_rate = config.stage1_backbone_learning_rate or config.stage1_learning_rate
        groups.append({"params": [p for p in trainable if id(p) in backbone_ids], "lr": backbone_rate})
    optimizer = make_adamw(groups, config.stage1_learning_rate)
    guarded = GuardedStep(optimizer, trainable, config.max_grad_norm, config.max_nonfinite_steps)
    finished_all = []
    for _ in range(config.stage1_updates):
        start = time.perf_counter()
        batch, finished, terms = collect_head_rollout(policy, runner, reward_set, config)
        metrics = ppo_head_update(policy, batch, config, run.generator, guarded, runner.spec)
        metrics.update(
            {
                "ire/round": float(round_index),
                "ire/stage": 1.0,
                "charts/env_steps_per_s": config.rollout_size / (time.perf_counter() - start),
                **episode_metrics(finished),
                **terms,
            }
        )
        run.logger.log(metrics, runner.steps)
        finished_all.extend(finished)
    return finished_all


def stage2_round(
    policy: VLAPolicy,
    spec,
    expert: list[Demo],
    head: HeadConfig,
    config: IReVLAConfig,
    run: Run,
    runner: EnvRunner,
    round_index: int,
) -> dict[str, float]:
    """Stage 2 of a round: supervised learning on the expert data plus every stage-1 success stored so far
    (expert data alone, with a warning, while there is none); returns the round's stage-2 metrics."""
    online = load_online_demos(run.run_dir, head, config.max_online_steps)
    if not online:
        warnings.warn(
            f"Round {round_index}, stage 2: no successful episode in stage 1 so far, so there is nothing of the "
            "policy's own to learn from; stage 2 trains on the expert data alone.",
            stacklevel=3,
        )
    metrics = supervised_stage(
        policy, spec, expert, online, steps=config.stage2_steps, learning_rate=config.stage2_learning_rate,
        train_backbone=config.stage2_train_backbone, online_fraction=config.online_fraction, config=config,
        generator=run.generator,
    )  # fmt: skip
    metrics.update(
        {
            "ire/round": float(round_index),
            "ire/stage": 2.0,
            "ire/online_steps": float(len(online)),
            "ire/stored_success_episodes": float(runner.recorder.episodes_written),
            "ire/expert_only": float(not online),
            **stage_evaluation(run, policy, config, 2),
        }
    )
    return metrics


def stage_evaluation(run: Run, policy: VLAPolicy, config: IReVLAConfig, stage: int) -> dict[str, float]:
    """Greedy success on ``stage_eval_episodes`` held-out seeds after a stage (:meth:`Run.evaluate`'s)."""
    from agents.run import eval_metrics

    if not config.stage_eval_episodes:
        return {}
    result = run.evaluate(policy, config.stage_eval_episodes)
    return {f"ire/stage{stage}_success_rate": result["success_rate"], **eval_metrics(result)}


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def train(config: IReVLAConfig, defaults: IReVLAConfig | None = None) -> Path:
    """Run iRe-VLA; return the run directory (its checkpoints' policies load with ``load_policy``)."""
    from agents.checkpoint import POLICY_DIR
    from agents.policy import load_policy, resolve_policy_directory
    from agents.trajectories import EpisodeRecorder, TrajectoryWriter
    from agents.vla import VLA_FILE, build_vla_policy

    with Run(config, "ire-vla", defaults) as run:
        config = run.config
        head = config.head_config()
        expert = load_expert_demos(config, head)
        if run.checkpoint_path is not None:
            policy = load_policy(str(run.checkpoint_path / POLICY_DIR), device=config.policy.device)
        elif (Path(resolve_policy_directory(config.policy.model)) / VLA_FILE).exists():  # an earlier run's policy
            policy = load_policy(config.policy.model, device=config.policy.device)
            if policy.head_config.action_type != head.action_type or policy.head.config.action_dim != head.action_dim:
                raise ConfigError(
                    f"--model {config.policy.model} has a {policy.head_config.action_type} head of "
                    f"{policy.head_config.action_dim} actions; this run asks for a {head.action_type} head of "
                    f"{head.action_dim}: pass --action-head {policy.head_config.action_type} or another --model."
                )
        else:
            policy = build_vla_policy(config.policy, head)
        runner = run.make_env_runner(continuous=policy.continuous)
        runner.recorder = EpisodeRecorder(
            TrajectoryWriter(run.run_dir / SUCCESS_STORE),
            config.env_id,
            config.env_kwargs,
            policy.config.prompt_style,
            runner.num_envs,
            source=lambda: f"run:{run.run_dir}@round-{run.update}",
            only_successes=True,
        )
        run.restore(runner=runner)  # the store is cut back to the checkpoint, the open episodes come back
        spec = runner.spec
        reward_set = run.make_rewards(config.reward, config.gamma, policy)

        stage1_steps = config.stage1_updates * config.rollout_size
        # Unit 0 (behaviour cloning) plays no env step: the bar counts the rounds' stage-1 steps only.
        for unit in run.updates(1 + config.rounds, stage1_steps, total_steps=config.rounds * stage1_steps):
            start = time.perf_counter()
            if unit == 0:
                metrics = supervised_stage(
                    policy, spec, expert, [], steps=config.stage0_steps, learning_rate=config.stage0_learning_rate,
                    train_backbone=config.stage0_train_backbone, online_fraction=0.0, config=config,
                    generator=run.generator,
                )  # fmt: skip
                metrics.update({"ire/round": 0.0, "ire/stage": 0.0, **stage_evaluation(run, policy, config, 0)})
                finished: list[dict[str, float]] = []
            else:
                finished = rl_stage(policy, runner, reward_set, config, run, unit)
                evaluation = stage_evaluation(run, policy, config, 1)
                runner.recorder.writer.flush()
                if config.stage2:
                    if evaluation:
                        run.logger.log({"ire/round": float(unit), "ire/stage": 1.0, **evaluation}, runner.steps)
                    metrics = stage2_round(policy, spec, expert, head, config, run, runner, unit)
                else:  # the whole-model PPO baseline: rounds of stage 1 only
                    metrics = {"ire/round": float(unit), "ire/stage": 1.0, **evaluation}
            metrics["ire/unit_seconds"] = time.perf_counter() - start
            run.end_update(unit, metrics, runner.steps, policy, finished=finished, runner=runner)
        return run.finish(policy, runner)
