"""PPO for a vision-language policy acting in Gymnasium vector environments.

Read top to bottom: config, setup, then per update: rollout (one batched ``act`` per vector step), GAE,
and the clipped PPO update in micro-batches. Algorithm: Schulman et al. 2017
(https://arxiv.org/abs/1707.06347) as fine-tuned for VLM agents by RL4VLM (Zhai et al. 2024,
https://arxiv.org/abs/2405.10292): the action's log-prob is the CoT-weighted sequence log-prob of the
whole answer (see ``agents/policy.py``), the value head reads the last prompt token.

Run it through an experiment script (``python -m experiments.gridworld --help``) or ``vlmrl train``.
"""

from __future__ import annotations

import pickle
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from tqdm import tqdm

from agents.checkpoint import POLICY_DIR, find_checkpoint, load_trainer_state, save_checkpoint
from agents.models import PRESETS
from agents.policy import PolicyConfig, VLMPolicy, load_policy
from agents.rollout import EpisodeStats, InvalidRule, env_actions, make_vector_env
from agents.storage import Rollout
from agents.tracking import RunLogger


@dataclass
class PPOConfig:
    """Everything a PPO run needs. Defaults follow RL4VLM where it published them (noted per field)."""

    # --- experiment -------------------------------------------------------------------------------------
    env_id: str = "vlmrl/GridWorld-v0"
    """Registered Gymnasium id of an environment with a language spec."""
    exp_name: str = "ppo"
    """Name of the experiment; part of the run name ``{env}__{exp_name}__{seed}__{time}``."""
    seed: int = 1
    """Seed of the environments, the sampling and the minibatch order."""
    num_envs: int = 8
    """Parallel environments; one batched ``act`` answers all of them each step."""
    total_env_steps: int = 20_000
    """Environment steps to train for (all envs together)."""
    run_dir: str | None = None
    """Where metrics, checkpoints and plots go (default ``runs/<run name>``)."""
    track: bool = False
    """Log to Weights & Biases (offline when no API key is configured)."""
    wandb_project: str = "vlmrl"
    """W&B project."""
    wandb_entity: str | None = None
    """W&B entity (team or user)."""
    wandb_tags: tuple[str, ...] = ()
    """W&B tags."""
    resume: str | None = None
    """Run directory (or checkpoint directory) to continue from; other options are taken from it."""
    checkpoint_every: int = 10
    """Save a checkpoint every this many updates (and always at the end); 0 saves only at the end."""
    sample_every: int = 10
    """Log a table of sample completions every this many updates; 0 never."""
    video_every: int = 0
    """Save a GIF of env 0's frames of the rollout every this many updates; 0 never."""
    eval_episodes: int = 0
    """Greedy evaluation episodes at the end of training (reported as ``eval/success_rate``)."""
    progress: bool = True
    """Show a progress bar with live success rate and steps/s."""

    # --- PPO --------------------------------------------------------------------------------------------
    num_steps: int = 16
    """Rollout length per env per update (batch = num_envs * num_steps)."""
    learning_rate: float = 1e-5
    """AdamW learning rate. RL4VLM: 1e-5 with LoRA on 7B models; tiny models want ~3e-4."""
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

    # --- invalid answers ----------------------------------------------------------------------------------
    invalid_rule: InvalidRule = "default"
    """What moves the env after an invalid answer: ``default`` action or a ``random`` one."""
    invalid_default_action: int = 0
    """The action taken for an invalid answer under ``invalid_rule=default``."""
    invalid_penalty: float = 1.0
    """Subtracted from the reward of a step whose answer was invalid."""

    # --- policy -------------------------------------------------------------------------------------------
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    """Model and policy options (``--model``, ``--temperature``, ``--constrained``, ...)."""

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def num_updates(self) -> int:
        return self.total_env_steps // self.batch_size

    def env_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``gymnasium.make``; experiment scripts override this."""
        return {}

    def __post_init__(self) -> None:
        validate(self)


def validate(config: PPOConfig) -> None:
    """Fail before any model loads, saying what to change."""
    import envs

    if config.resume is not None:
        return  # the saved config is validated when it is loaded
    if config.num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {config.num_envs}.")
    if config.num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {config.num_steps}.")
    if config.env_id not in gym.registry:
        vlmrl_ids = ", ".join(envs.language_env_ids())
        raise ValueError(f"Unknown env_id {config.env_id!r}. Registered VLM environments: {vlmrl_ids}.")
    spec = envs.get_language(config.env_id)
    if config.total_env_steps < config.batch_size:
        raise ValueError(
            f"total_env_steps={config.total_env_steps} is less than one batch (num_envs * num_steps = "
            f"{config.batch_size}); raise total_env_steps or lower num_envs/num_steps."
        )
    if config.batch_size % config.minibatch_size:
        raise ValueError(
            f"The batch (num_envs * num_steps = {config.batch_size}) does not split into minibatches of "
            f"{config.minibatch_size}; choose a minibatch_size that divides it."
        )
    if config.minibatch_size % config.micro_batch_size:
        raise ValueError(
            f"minibatch_size={config.minibatch_size} is not a multiple of micro_batch_size="
            f"{config.micro_batch_size}; choose a micro_batch_size that divides it."
        )
    if not 0 <= config.invalid_default_action < len(spec.action_names):
        raise ValueError(
            f"invalid_default_action={config.invalid_default_action} is not an action of {config.env_id} "
            f"(0..{len(spec.action_names) - 1}: {spec.action_names})."
        )
    model = config.policy.model
    if model.startswith("tiny") and model not in PRESETS and not Path(model).exists():
        raise ValueError(f"Unknown preset {model!r}. Available presets: {', '.join(PRESETS)}.")
    if model.startswith((".", "/", "~")) and not Path(model).expanduser().exists():
        raise ValueError(f"Model directory {model!r} does not exist.")
    if config.kl_coef > 0 and config.policy.lora_rank == 0:
        raise ValueError("kl_coef > 0 needs a reference policy, which needs LoRA: set lora_rank > 0 or kl_coef 0.")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(generator: np.random.Generator) -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "generator": generator.bit_generator.state,
    }


def restore_rng_state(state: dict[str, Any], generator: np.random.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.bit_generator.state = state["generator"]


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
    log_ratio = new.logprob - old_logprobs
    ratio = log_ratio.exp()
    policy_loss = torch.max(
        -advantages * ratio, -advantages * ratio.clamp(1 - config.clip_coef, 1 + config.clip_coef)
    ).mean()
    if config.clip_vloss:
        clipped = old_values + (new.value - old_values).clamp(-config.clip_coef, config.clip_coef)
        value_loss = 0.5 * torch.max((new.value - returns) ** 2, (clipped - returns) ** 2).mean()
    else:
        value_loss = 0.5 * ((new.value - returns) ** 2).mean()
    entropy = new.entropy.mean()
    loss = policy_loss - config.ent_coef * entropy + config.vf_coef * value_loss
    kl_ref = torch.zeros((), device=device)
    if ref_token_logprobs is not None:
        # k3 estimator per token (http://joschu.net/blog/kl-approx.html): unbiased and always >= 0.
        reference = torch.zeros_like(new.token_logprobs)
        for row, tokens in enumerate(ref_token_logprobs):
            reference[row, : len(tokens)] = tokens.to(device)
        delta = (reference - new.token_logprobs).masked_fill(~new.token_mask, 0.0)
        per_token = delta.exp() - 1 - delta
        kl_ref = (per_token.sum(-1) / new.token_mask.sum(-1).clamp(min=1)).mean()
        loss = loss + config.kl_coef * kl_ref
    with torch.no_grad():
        parts = {
            "policy_loss": policy_loss.detach(),
            "value_loss": value_loss.detach(),
            "entropy": entropy.detach(),
            "approx_kl": ((ratio - 1) - log_ratio).mean(),
            "clipfrac": ((ratio - 1).abs() > config.clip_coef).float().mean(),
            "kl_ref": kl_ref.detach(),
        }
    return loss, parts


def train(config: PPOConfig) -> Path:
    """Run PPO; return the run directory (metrics.jsonl, learning_curve.png, checkpoints/)."""
    import envs

    # --- setup: resume or start -------------------------------------------------------------------------
    checkpoint = find_checkpoint(config.resume) if config.resume else None
    trainer_state = load_trainer_state(checkpoint) if checkpoint else None
    if trainer_state is not None:
        config = trainer_state["config"]  # a resumed run continues with the options it was started with
    run_name = f"{config.env_id.split('/')[-1]}__{config.exp_name}__{config.seed}__{int(time.time())}"
    # A resumed run writes where its checkpoint lives (run dir / checkpoints / update-N).
    run_dir = checkpoint.parent.parent if checkpoint else Path(config.run_dir or f"runs/{run_name}")
    seed_everything(config.seed)
    generator = np.random.default_rng(config.seed)
    spec = envs.get_language(config.env_id)

    vector_env = make_vector_env(config.env_id, config.num_envs, config.env_kwargs())
    policy_options = asdict(config.policy)
    model = policy_options.pop("model")
    if checkpoint is not None:
        policy = load_policy(str(checkpoint / POLICY_DIR), device=config.policy.device)
    else:
        policy = load_policy(model, **policy_options)
    parameters = [p for p in policy.parameters() if p.requires_grad]
    value_parameters = list(policy.value_head.parameters())
    value_ids = {id(p) for p in value_parameters}
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in parameters if id(p) not in value_ids]},
            {"params": value_parameters, "lr": config.value_learning_rate or config.learning_rate},
        ],
        lr=config.learning_rate,
        eps=1e-5,
        weight_decay=0.0,
    )
    num_updates = config.num_updates
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda update: 1.0 - update / num_updates if config.anneal_lr else 1.0
    )
    stats = EpisodeStats(config.num_envs)
    if trainer_state is not None:
        optimizer.load_state_dict(trainer_state["optimizer"])
        scheduler.load_state_dict(trainer_state["scheduler"])
        vector_env.envs = pickle.loads(trainer_state["envs"])
        next_obs = trainer_state["next_obs"]
        stats.returns, stats.lengths = trainer_state["episode_returns"], trainer_state["episode_lengths"]
        start_update, global_step = trainer_state["update"], trainer_state["global_step"]
        restore_rng_state(trainer_state["rng"], generator)
    else:
        next_obs, _ = vector_env.reset(seed=config.seed)
        start_update, global_step = 0, 0
    logger = RunLogger(
        run_dir,
        {**asdict(config), "env_kwargs": config.env_kwargs(), "run_name": run_dir.name},
        track=config.track,
        project=config.wandb_project,
        entity=config.wandb_entity,
        run_name=run_dir.name,
        tags=config.wandb_tags,
        resume_id=trainer_state.get("wandb_id") if trainer_state else None,
    )
    progress = tqdm(
        total=num_updates * config.batch_size, initial=global_step, disable=not config.progress, unit="step"
    )
    consecutive_nonfinite = 0
    recent_success: list[float] = []

    for update in range(start_update, num_updates):
        update_start = time.perf_counter()

        # --- rollout: one batched act per vector step -------------------------------------------------
        rollout = Rollout(config.num_steps, config.num_envs)
        generated_tokens, generation_seconds, invalid_count = 0, 0.0, 0
        frames = []
        for _ in range(config.num_steps):
            act_start = time.perf_counter()
            completions = policy.act(next_obs, spec)
            generation_seconds += time.perf_counter() - act_start
            generated_tokens += sum(len(c.response_ids) for c in completions)
            actions, invalid = env_actions(
                completions, config.invalid_rule, config.invalid_default_action, len(spec.action_names), generator
            )
            invalid_count += int(invalid.sum())
            if config.video_every and (update + 1) % config.video_every == 0:
                frames.append(np.asarray(next_obs["image"][0]))
            next_obs, env_rewards, terminated, truncated, info = vector_env.step(actions)
            stats.update(env_rewards, terminated, truncated, info)
            # A truncated episode is bootstrapped from the value of its final observation.
            cut = np.flatnonzero(truncated & ~terminated)
            final_values = {}
            if len(cut):
                final = policy.values([info["final_obs"][i] for i in cut], spec)
                final_values = dict(zip(cut.tolist(), final.tolist()))
            rewards = env_rewards - config.invalid_penalty * invalid
            rollout.add(completions, rewards, terminated, truncated, final_values)
            global_step += config.num_envs
            progress.update(config.num_envs)
        rollout.finish(policy.values(next_obs, spec).numpy(), config.gamma, config.gae_lambda)

        # --- update: clipped PPO over minibatches, gradients accumulated over micro-batches -----------
        completions, tensors = rollout.flat()
        reference = _reference_logprobs(policy, completions, config) if config.kl_coef > 0 else None
        totals: dict[str, float] = {}
        updates_done, skipped = 0, 0
        indices = np.arange(config.batch_size)
        policy.train(False)  # no dropout: the update must see the function that acted
        for _epoch in range(config.update_epochs):
            generator.shuffle(indices)
            for start in range(0, config.batch_size, config.minibatch_size):
                minibatch = indices[start : start + config.minibatch_size]
                advantages = tensors["advantages"][minibatch]
                if config.norm_adv and len(minibatch) > 1:
                    advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
                optimizer.zero_grad(set_to_none=True)
                finite = True
                parts_sum: dict[str, float] = {}
                for micro_start in range(0, len(minibatch), config.micro_batch_size):
                    micro = minibatch[micro_start : micro_start + config.micro_batch_size]
                    local = slice(micro_start, micro_start + len(micro))
                    loss, parts = ppo_losses(
                        policy,
                        [completions[i] for i in micro],
                        tensors["logprobs"][micro],
                        tensors["values"][micro],
                        advantages[local],
                        tensors["returns"][micro],
                        [reference[i] for i in micro] if reference is not None else None,
                        config,
                    )
                    if not torch.isfinite(loss):
                        finite = False
                        break
                    (loss * len(micro) / len(minibatch)).backward()
                    for key, value in parts.items():
                        parts_sum[key] = parts_sum.get(key, 0.0) + float(value) * len(micro) / len(minibatch)
                grad_norm = torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm) if finite else None
                if not finite or not torch.isfinite(grad_norm):
                    optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    consecutive_nonfinite += 1
                    if consecutive_nonfinite >= config.max_nonfinite_steps:
                        raise RuntimeError(
                            f"{consecutive_nonfinite} optimizer steps in a row had a non-finite loss or gradient "
                            f"(update {update}). Lower learning_rate, use float32 (dtype) or check the rewards."
                        )
                    continue
                consecutive_nonfinite = 0
                optimizer.step()
                updates_done += 1
                for key, value in parts_sum.items():
                    totals[key] = totals.get(key, 0.0) + value
            if config.target_kl is not None and updates_done and totals["approx_kl"] / updates_done > config.target_kl:
                break
        scheduler.step()

        # --- logging ----------------------------------------------------------------------------------
        finished = stats.pop()
        recent_success = ([float(e["success"]) for e in finished] or recent_success)[-50:]
        seconds = time.perf_counter() - update_start
        values, returns = rollout.values.ravel(), rollout.returns.ravel()
        variance = np.var(returns)
        metrics = {f"losses/{k}": v / max(updates_done, 1) for k, v in totals.items()}
        metrics.update(
            {
                "losses/explained_variance": float("nan") if variance == 0 else 1 - np.var(returns - values) / variance,
                "losses/skipped_steps": skipped,
                "charts/invalid_action_rate": invalid_count / config.batch_size,
                "charts/learning_rate": optimizer.param_groups[0]["lr"],
                "charts/env_steps_per_s": config.batch_size / seconds,
                "charts/tokens_per_s": generated_tokens / max(generation_seconds, 1e-9),
            }
        )
        if finished:
            metrics["charts/episodic_return"] = float(np.mean([e["return"] for e in finished]))
            metrics["charts/success_rate"] = float(np.mean([e["success"] for e in finished]))
            metrics["charts/episode_length"] = float(np.mean([e["length"] for e in finished]))
        logger.log(metrics, global_step)
        progress.set_postfix(
            success=f"{np.mean(recent_success):.2f}" if recent_success else "-",
            sps=f"{metrics['charts/env_steps_per_s']:.1f}",
            invalid=f"{metrics['charts/invalid_action_rate']:.2f}",
        )
        if config.sample_every and (update + 1) % config.sample_every == 0:
            logger.log_samples(_sample_rows(rollout), global_step)
        if frames:
            logger.log_video(frames, global_step)
        last = update + 1 == num_updates
        if last or (config.checkpoint_every and (update + 1) % config.checkpoint_every == 0):
            save_checkpoint(
                run_dir,
                update + 1,
                policy,
                {
                    "config": config,
                    "update": update + 1,
                    "global_step": global_step,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "envs": pickle.dumps(vector_env.envs),
                    "next_obs": next_obs,
                    "episode_returns": stats.returns.copy(),
                    "episode_lengths": stats.lengths.copy(),
                    "rng": rng_state(generator),
                    "wandb_id": logger.wandb_id,
                },
            )
    progress.close()
    vector_env.close()
    if config.eval_episodes:
        from agents.evaluation import evaluate_policy

        result = evaluate_policy(
            policy, config.env_id, config.env_kwargs(), config.eval_episodes, seed=10_000 + config.seed
        )
        logger.log(
            {"eval/success_rate": result["success_rate"], "eval/episodic_return": result["mean_return"]}, global_step
        )
    logger.finish()
    return run_dir


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
