"""Baseline: Stable-Baselines3 PPO with a CNN on the same environment, image only.

The point of comparison for the VLM agents: a small convolutional policy trained from scratch on the
same images, the same environment options and the same number of environment steps. It logs the same
metric names to ``<run dir>/metrics.jsonl`` and draws the same ``learning_curve.png``.

    python -m experiments.baseline_sb3 --experiment gridworld --total-env-steps 40000 --seed 1
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np


@dataclass
class BaselineConfig:
    experiment: str = "gridworld"
    """Experiment whose environment and options to use (``vlmrl train`` names)."""
    total_env_steps: int = 40_000
    """Environment steps to train for."""
    seed: int = 1
    """Seed of the environments and the network."""
    num_envs: int = 16
    """Parallel environments."""
    n_steps: int = 64
    """SB3 rollout length per env."""
    learning_rate: float = 2.5e-4
    """Adam learning rate (SB3's Atari default)."""
    eval_episodes: int = 200
    """Deterministic evaluation episodes at the end."""
    run_dir: str | None = None
    """Where metrics and the learning curve go (default ``runs/<env>__sb3-ppo-cnn__<seed>__<time>``)."""


class ImageObservation(gym.ObservationWrapper):
    """Keep only the image of a vlmrl observation (SB3's CNN policies take a Box image)."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.observation_space = env.observation_space["image"]

    def observation(self, observation):
        return observation["image"]


def main(config: BaselineConfig) -> Path:
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    import envs  # noqa: F401 - registers the environments
    from agents.tracking import RunLogger
    from experiments.common import EXPERIMENTS, experiment_config

    if config.experiment not in EXPERIMENTS:
        raise ValueError(f"Unknown experiment {config.experiment!r}; choose one of {', '.join(EXPERIMENTS)}.")
    experiment = experiment_config(config.experiment)
    env_id, env_kwargs = experiment.env_id, experiment.env_kwargs()
    name = f"{env_id.split('/')[-1]}__sb3-ppo-cnn__{config.seed}__{int(time.time())}"
    run_dir = Path(config.run_dir or f"runs/{name}")
    logger = RunLogger(run_dir, {"baseline": "sb3-ppo-cnn", **vars(config), "env_id": env_id, "env_kwargs": env_kwargs})

    def make() -> gym.Env:
        return ImageObservation(gym.make(env_id, **env_kwargs))

    vector_env = make_vec_env(
        make, n_envs=config.num_envs, seed=config.seed, monitor_kwargs={"info_keywords": ("success",)}
    )

    class LogRollouts(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.start = time.perf_counter()

        def _on_step(self) -> bool:
            return True

        def _on_rollout_end(self) -> None:
            episodes = list(self.model.ep_info_buffer)  # the most recent 4 * num_envs episodes
            if episodes:
                logger.log(
                    {
                        "charts/success_rate": float(np.mean([e["success"] for e in episodes])),
                        "charts/episodic_return": float(np.mean([e["r"] for e in episodes])),
                        "charts/episode_length": float(np.mean([e["l"] for e in episodes])),
                        "charts/env_steps_per_s": self.num_timesteps / (time.perf_counter() - self.start),
                    },
                    self.num_timesteps,
                )

    model = PPO(
        "CnnPolicy",
        vector_env,
        n_steps=config.n_steps,
        batch_size=256,
        learning_rate=config.learning_rate,
        seed=config.seed,
        verbose=0,
        policy_kwargs={"normalize_images": True},
        stats_window_size=4 * config.num_envs,
    )
    rollout = config.num_envs * config.n_steps
    if config.total_env_steps % rollout:
        # SB3 stops only at the end of a rollout, so it trains up to the next whole one.
        trained = -(-config.total_env_steps // rollout) * rollout
        warnings.warn(
            f"SB3 trains in whole rollouts of num_envs * n_steps = {rollout} steps: {config.total_env_steps} asked, "
            f"{trained} will be trained. Pick a multiple of {rollout} for an exact budget.",
            stacklevel=2,
        )
    model.learn(total_timesteps=config.total_env_steps, callback=LogRollouts())
    successes = []
    eval_env = ImageObservation(gym.make(env_id, **env_kwargs))
    for seed in range(config.eval_episodes):
        observation, _ = eval_env.reset(seed=10_000 + seed)
        done, success = False, False
        while not done:
            action, _ = model.predict(observation, deterministic=True)
            observation, _, terminated, truncated, info = eval_env.step(int(action))
            success = success or bool(info.get("success"))
            done = terminated or truncated
        successes.append(success)
    logger.log({"eval/success_rate": float(np.mean(successes))}, model.num_timesteps)
    logger.finish()
    summary = {
        "run_dir": str(run_dir),
        "env_steps": int(model.num_timesteps),
        "eval_success_rate": float(np.mean(successes)),
    }
    print(json.dumps(summary, indent=2))
    return run_dir
