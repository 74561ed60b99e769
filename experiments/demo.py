"""Every environment played by its scripted expert: success rates, step timings, and pictures.

    vlmrl demo                       # 20 episodes per env, frames under runs/demo/
    vlmrl demo --episodes 1000       # the expert table of the README

The table gives, per environment, the expert's success rate over seeded episodes (seeds 0..N-1), the
mean wall time of reset + step + render per step, and the image size. Frames of each env's first
episode are saved as a GIF, and the first frame of every env in one PNG grid.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class DemoConfig:
    episodes: int = 20
    """Expert episodes per environment (seeds 0..episodes-1)."""
    out: str = "runs/demo"
    """Where the GIFs and the PNG grid go."""
    env_ids: tuple[str, ...] = ()
    """Environments to play (default: every vlmrl environment)."""


def play_expert(env_id: str, episodes: int, keep_frames: bool = True) -> dict:
    """Play ``episodes`` seeded expert episodes; return success rate, ms per step and first-episode frames."""
    import gymnasium as gym

    env = gym.make(env_id)
    successes, returns, steps, frames = [], [], 0, []
    start = time.perf_counter()
    for seed in range(episodes):
        observation, info = env.reset(seed=seed)
        if keep_frames and seed == 0:
            frames.append(observation["image"])
        success, done, episode_return = False, False, 0.0
        while not done:
            action = env.unwrapped.expert_action()
            observation, reward, terminated, truncated, info = env.step(action)
            episode_return += float(reward)
            env.render()
            steps += 1
            success = success or bool(info.get("success", False))
            done = terminated or truncated
            if keep_frames and seed == 0:
                frames.append(observation["image"])
        successes.append(success)
        returns.append(episode_return)
    seconds = time.perf_counter() - start
    shape = env.observation_space["image"].shape
    env.close()
    return {
        "env_id": env_id,
        "success_rate": float(np.mean(successes)),
        "mean_return": float(np.mean(returns)),
        "steps_per_episode": steps / episodes,
        "ms_per_step": 1000 * seconds / max(steps, 1),
        "image": f"{shape[1]}x{shape[0]}",
        "frames": frames,
    }


def main(config: DemoConfig) -> list[dict]:
    import imageio.v2 as imageio

    import envs

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    results = [play_expert(env_id, config.episodes) for env_id in (config.env_ids or envs.VLMRL_ENV_IDS)]
    print(
        f"| env | expert success ({config.episodes} seeded episodes) | mean return | steps/episode | reset+step+render ms/step | image |"
    )
    print("|---|---|---|---|---|---|")
    for result in results:
        name = result["env_id"].split("/")[-1]
        imageio.mimsave(out / f"{name}.gif", result["frames"], duration=400, loop=0)
        print(
            f"| {result['env_id']} | {result['success_rate']:.3f} | {result['mean_return']:.3f} | "
            f"{result['steps_per_episode']:.2f} | {result['ms_per_step']:.2f} | {result['image']} |"
        )
    _save_grid([r["frames"][0] for r in results], out / "first_frames.png")
    print(f"GIFs and first_frames.png in {out}/")
    return results


def _save_grid(images: list[np.ndarray], path: Path) -> None:
    from PIL import Image

    side = max(max(image.shape[:2]) for image in images)
    grid = Image.new("RGB", (side * len(images), side), "white")
    for index, image in enumerate(images):
        grid.paste(Image.fromarray(image), (index * side, 0))
    grid.save(path)
