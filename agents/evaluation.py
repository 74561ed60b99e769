"""Evaluate a policy (or a saved checkpoint) on an environment: success rate, return, invalid answers.

``vlmrl eval <run dir | checkpoint dir> --episodes 100`` is the command-line form.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
from tyro.conf import Positional

from agents.errors import ConfigError
from agents.rollout import EnvRunner, SuccessRule


def evaluate_policy(
    policy,
    env_id: str,
    env_kwargs: dict[str, Any] | None = None,
    episodes: int = 100,
    num_envs: int = 8,
    seed: int = 10_000,
    greedy: bool = True,
    invalid_default_action: int = 0,
    success_rule: SuccessRule = "terminated_positive_reward",
) -> dict[str, float]:
    """Play ``episodes`` episodes and report their mean success, return and length, the invalid-answer rate
    and, for chain-of-thought answers in an env with ``check_thoughts``, the fraction of true thoughts.

    The episodes are exactly those of reset seeds ``seed`` .. ``seed + episodes - 1``, whatever the policy
    does and however many envs play them (env ``i`` plays its own run of ``episodes / num_envs`` seeds), so
    two policies evaluated with the same ``seed`` meet the same deals, starts and goals: their difference is
    paired. Each env plays the same number of episodes (``num_envs`` is lowered until it divides
    ``episodes``), so short episodes are not over-represented; invalid answers take
    ``invalid_default_action``, as in training.
    """
    if episodes < 1:
        raise ConfigError(f"episodes must be >= 1, got {episodes}.")
    num_envs = max(1, min(num_envs, episodes))
    while episodes % num_envs:  # equal quotas that add up to exactly ``episodes``
        num_envs -= 1
    quota = episodes // num_envs
    runner = EnvRunner(
        env_id,
        num_envs,
        env_kwargs,
        seed=seed,
        rng=np.random.default_rng(seed),
        invalid_default_action=invalid_default_action,
        success_rule=success_rule,
        continuous=bool(getattr(policy, "continuous", False)),  # an action-head policy (agents/vla.py)
        # An env that has played its quota goes on stepping (one batched act for all) into seeds past its
        # run; those episodes are not counted.
        episode_seeds=[itertools.count(seed + index * quota) for index in range(num_envs)],
    )
    done_per_env = np.zeros(num_envs, dtype=int)
    results: list[dict[str, float]] = []
    answers = invalid = thoughts_checked = thoughts_true = 0
    try:
        while done_per_env.min() < quota:
            active = done_per_env < quota
            step = runner.step(policy, greedy=greedy)
            answers += int(active.sum())
            invalid += int((step.invalid & active).sum())
            checked = active & ~np.isnan(step.thoughts_true)
            thoughts_checked += int(checked.sum())
            thoughts_true += int(step.thoughts_true[checked].sum())
            for episode in step.finished:
                if done_per_env[episode["env"]] < quota:
                    results.append(episode)
                    done_per_env[episode["env"]] += 1
    finally:
        runner.close()
    return {
        "episodes": len(results),
        "success_rate": float(np.mean([r["success"] for r in results])),
        "mean_return": float(np.mean([r["return"] for r in results])),
        "mean_length": float(np.mean([r["length"] for r in results])),
        "invalid_action_rate": invalid / max(answers, 1),
        # Only for chain-of-thought answers in an env that can check them (else not reported).
        **({"thought_accuracy": thoughts_true / thoughts_checked} if thoughts_checked else {}),
    }


def evaluate_checkpoint(
    path: Positional[str], episodes: int = 100, greedy: bool = True, device: str = "auto"
) -> dict[str, float]:
    """Evaluate the newest intact checkpoint of a run directory (or a checkpoint directory).

    Args:
        path: Run directory (its newest intact checkpoint is used) or one checkpoint directory.
        episodes: Episodes to play (>= 1).
        greedy: Argmax decoding (else sample at the policy's temperature).
        device: Where the policy runs (``auto``, ``cpu``, ``cuda``...).
    """
    from pathlib import Path

    from agents.checkpoint import POLICY_DIR, CheckpointError, find_checkpoint, load_trainer_state
    from agents.policy import load_policy
    from agents.run import import_env_module

    if episodes < 1:
        raise ConfigError(f"--episodes must be >= 1, got {episodes}.")
    if not Path(path).exists():
        raise CheckpointError(f"{path}: no such run or checkpoint directory.")
    checkpoint = find_checkpoint(path, purpose="Evaluating")
    config = load_trainer_state(checkpoint).get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{checkpoint} was written by an older vlmrl; evaluate a run trained with this one.")
    if config.get("env_module"):
        import_env_module(config["env_module"])
    policy = load_policy(str(checkpoint / POLICY_DIR), device=device)
    result = evaluate_policy(
        policy,
        config["env_id"],
        config["env_kwargs"],
        episodes,
        num_envs=config["num_envs"],
        greedy=greedy,
        invalid_default_action=config["invalid_default_action"],
        success_rule=config.get("success_rule", "terminated_positive_reward"),
    )
    return {"checkpoint": str(checkpoint), **result}
