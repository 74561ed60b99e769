"""Evaluate a policy (or a saved checkpoint) on an environment: success rate, return, invalid answers.

``vlmrl eval <run dir | checkpoint dir> --episodes 100`` is the command-line form.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tyro.conf import Positional

from agents.rollout import EpisodeStats, env_actions, make_vector_env


def evaluate_policy(
    policy,
    env_id: str,
    env_kwargs: dict[str, Any] | None = None,
    episodes: int = 100,
    num_envs: int = 8,
    seed: int = 10_000,
    greedy: bool = True,
    invalid_default_action: int = 0,
) -> dict[str, float]:
    """Play ``episodes`` episodes and report their mean success, return and length.

    Each env plays the same number of episodes (``num_envs`` is lowered until it divides ``episodes``), so
    short episodes are not over-represented; invalid answers take ``invalid_default_action``, as in training.
    """
    import envs

    spec = envs.get_language(env_id)
    num_envs = max(1, min(num_envs, episodes))
    while episodes % num_envs:  # equal quotas that add up to exactly ``episodes``
        num_envs -= 1
    quota = episodes // num_envs
    vector_env = make_vector_env(env_id, num_envs, env_kwargs)
    observations, _ = vector_env.reset(seed=seed)
    stats = EpisodeStats(num_envs)
    done_per_env = np.zeros(num_envs, dtype=int)
    results: list[dict[str, float]] = []
    answers = invalid = 0
    rng = np.random.default_rng(seed)
    try:
        while done_per_env.min() < quota:
            completions = policy.act(observations, spec, greedy=greedy)
            actions, invalid_mask = env_actions(
                completions, "default", invalid_default_action, len(spec.action_names), rng
            )
            active = done_per_env < quota
            answers += int(active.sum())
            invalid += int((invalid_mask & active).sum())
            observations, rewards, terminated, truncated, info = vector_env.step(actions)
            ended = np.flatnonzero(terminated | truncated)
            stats.update(rewards, terminated, truncated, info)
            for env_index, episode in zip(ended, stats.pop()):
                if done_per_env[env_index] < quota:
                    results.append(episode)
                    done_per_env[env_index] += 1
    finally:
        vector_env.close()
    return {
        "episodes": len(results),
        "success_rate": float(np.mean([r["success"] for r in results])),
        "mean_return": float(np.mean([r["return"] for r in results])),
        "mean_length": float(np.mean([r["length"] for r in results])),
        "invalid_action_rate": invalid / max(answers, 1),
    }


def evaluate_checkpoint(
    path: Positional[str], episodes: int = 100, greedy: bool = True, device: str = "auto"
) -> dict[str, float]:
    """Evaluate the newest intact checkpoint of a run directory (or a checkpoint directory).

    Args:
        path: Run directory (its newest intact checkpoint is used) or one checkpoint directory.
        episodes: Episodes to play.
        greedy: Argmax decoding (else sample at the policy's temperature).
        device: Where the policy runs (``auto``, ``cpu``, ``cuda``...).
    """
    from agents.checkpoint import POLICY_DIR, find_checkpoint, load_trainer_state
    from agents.policy import load_policy

    checkpoint = find_checkpoint(path)
    config = load_trainer_state(checkpoint)["config"]
    policy = load_policy(str(checkpoint / POLICY_DIR), device=device)
    result = evaluate_policy(
        policy,
        config.env_id,
        config.env_kwargs(),
        episodes,
        num_envs=config.num_envs,
        greedy=greedy,
        invalid_default_action=config.invalid_default_action,
    )
    return {"checkpoint": str(checkpoint), **result}
