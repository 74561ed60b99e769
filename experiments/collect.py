"""Collect episodes into a trajectory store (``agents/trajectories.py``).

    vlmrl collect gridworld --expert --episodes 300 --out data/gridworld-expert
    vlmrl collect blackjack --expert --episodes 1000 --out data/blackjack-expert --prompt-style action
    vlmrl collect blackjack --model runs/<run> --episodes 200 --out data/blackjack-policy
    vlmrl collect gridworld --model runs/<run> --episodes 20 --branch 2 --out data/gridworld-branches
    vlmrl collect reach --expert --continuous --episodes 200 --out data/reach-continuous

    vlmrl collect my_pkg/Maze-v0 --env-module my_pkg.envs --expert --episodes 100 --out data/maze

The environment and its options are those of the named experiment (``vlmrl train <experiment>``), so the
store matches what that experiment trains on; a registered env id instead plays that env with its
registered options (``--env-module`` imports the module that registers a third-party env). Running the
command again with the same ``--out`` appends.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Literal

import tyro

from agents.trajectories import DEFAULT_SHARD_SIZE


@dataclass
class CollectConfig:
    experiment: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="EXPERIMENT_OR_ENV_ID")]
    """Experiment whose environment and environment options to play (gridworld, blackjack, ...), or the
    Gymnasium id of a registered env with a language spec (played with its registered options)."""
    out: str
    """Store directory: created if missing, appended to if it is a store already."""
    expert: bool = False
    """Answer with the environment's scripted expert."""
    model: str | None = None
    """Answer with a policy instead: a run directory (its newest intact checkpoint), a checkpoint's policy
    directory, or a preset. Its answer style is its own (``--prompt-style`` is not used)."""
    greedy: bool = False
    """With ``--model``: argmax decoding (else sampled at the policy's temperature)."""
    num_envs: int = 8
    """With ``--model``: envs answered together by one batched ``act``."""
    device: str = "auto"
    """With ``--model``: where the policy runs."""
    branch: int = 0
    """With ``--model``: from each step of every episode, this many more episodes that repeat its steps up to
    there and answer that step anew (Monte Carlo rollouts for ``vlmrl pairs --mode step``); about
    ``branch * length**2 / 2`` env steps per episode. 0: plain episodes."""
    branch_steps: int | None = None
    """With ``--branch``: branch from the first this many steps of each episode only (default: all)."""
    episodes: int = 100
    """Episodes to play, with seeds seed .. seed + episodes - 1."""
    seed: int = 0
    """Reset seed of the first episode."""
    prompt_style: Literal["cot", "action"] | None = None
    """Answer format: a JSON object with thoughts and action, or the action name. ``--expert``: ``cot`` unless
    given (the thoughts are the expert's rationale). ``--model``: the saved policy's own (giving another is an
    error); a preset answers in the style given here (default ``cot``)."""
    shard_size: int = DEFAULT_SHARD_SIZE
    """Steps per shard (whole episodes per shard); a killed collection loses at most the shard in progress."""
    env_module: str | None = None
    """Python module to import first: the one that registers a third-party env (``envs.register_language_env``)."""
    continuous: bool = False
    """With ``--expert``: play the env's continuous expert through ``step_continuous`` (Reach, Push) and store
    each step's continuous action in the ``continuous_action`` column, for an action-head policy
    (``--algo ire-vla``)."""


def environment(config: CollectConfig) -> tuple[str, dict]:
    """The env id and options to play: an experiment's, or a registered env's own."""
    import gymnasium as gym

    import envs  # noqa: F401 - registers vlmrl's own envs
    from agents.run import import_env_module
    from experiments.cli import EXPERIMENTS, experiment_config

    if config.env_module:
        import_env_module(config.env_module)
    if config.experiment in EXPERIMENTS:
        experiment = experiment_config(config.experiment)
        return experiment.env_id, experiment.env_kwargs()
    try:
        gym.spec(config.experiment)
    except gym.error.Error:
        hint = "" if config.env_module else " (a third-party env: pass --env-module, the module that registers it)"
        raise ValueError(
            f"{config.experiment!r} is neither an experiment ({', '.join(EXPERIMENTS)}) nor a registered "
            f"Gymnasium id{hint}."
        ) from None
    return config.experiment, {}


def main(config: CollectConfig) -> dict:
    """Collect as ``config`` says, print the summary as JSON and return it."""
    from agents.trajectories import collect_branches, collect_expert, collect_policy

    env_id, env_kwargs = environment(config)
    if config.expert == (config.model is not None):
        raise ValueError(
            "Say who answers: pass --expert to play the environment's scripted expert, or --model RUN_OR_DIR to "
            "play a policy (one of the two)."
        )
    if config.continuous and not config.expert:
        raise ValueError("--continuous plays the scripted expert's continuous actions: pass --expert with it.")
    if config.branch and config.model is None:
        raise ValueError("--branch replays a policy's episodes: pass --model RUN_OR_DIR with it.")
    if config.branch < 0:
        raise ValueError(f"--branch {config.branch}: use 0 (no branches) or more.")
    if config.branch:
        summary = collect_branches(
            config.model,
            env_id,
            config.out,
            episodes=config.episodes,
            branch=config.branch,
            branch_steps=config.branch_steps,
            env_kwargs=env_kwargs,
            seed=config.seed,
            device=config.device,
            shard_size=config.shard_size,
            prompt_style=config.prompt_style,
        )
    elif config.model is not None:
        summary = collect_policy(
            config.model,
            env_id,
            config.out,
            episodes=config.episodes,
            env_kwargs=env_kwargs,
            seed=config.seed,
            greedy=config.greedy,
            num_envs=config.num_envs,
            device=config.device,
            shard_size=config.shard_size,
            prompt_style=config.prompt_style,
        )
    else:
        summary = collect_expert(
            env_id,
            config.out,
            episodes=config.episodes,
            env_kwargs=env_kwargs,
            seed=config.seed,
            prompt_style=config.prompt_style or "cot",
            shard_size=config.shard_size,
            continuous=config.continuous,
        )
    print(json.dumps(summary, indent=2))
    return summary
