"""What every experiment script shares: environment options apart from the algorithm, and the command line.

An experiment script holds one environment's options (an :class:`EnvOptions` dataclass) and, where one
suits it better, per-algorithm defaults (``algorithm_defaults``). The algorithm is chosen on the command
line (``vlmrl train gridworld --algo ppo``); its config class (``agents.ppo.PPOConfig``, ...) and the
policy's options are parsed beside the env options, with flat flags (``--size``, ``--learning-rate``,
``--model``...). Nothing subclasses anything else across these three concerns.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import tyro

from agents.errors import ConfigError
from agents.policy import PolicyConfig
from agents.run import config_from_dict, deferred_validation
from agents.tracking import read_metrics

#: ``--algo`` name -> (module, config class). The module's ``train(config, defaults)`` runs it.
ALGORITHMS: dict[str, tuple[str, str]] = {
    "ppo": ("agents.ppo", "PPOConfig"),
    "sft": ("agents.sft", "SFTConfig"),
    "grpo": ("agents.grpo", "GRPOConfig"),
    "dpo": ("agents.dpo", "DPOConfig"),
    "ire-vla": ("agents.ire_vla", "IReVLAConfig"),
}

#: Defaults of each algorithm for the experiments: sized for the randomly initialised ``tiny`` preset on a
#: 2-core CPU. With a pretrained model, pass e.g. ``--model Qwen/Qwen2.5-VL-3B-Instruct --lora-rank 64
#: --learning-rate 1e-5 --prompt-style cot --temperature 0.2 --device cuda``.
CPU_DEFAULTS: dict[str, dict[str, Any]] = {
    "ppo": {
        "num_envs": 16,
        "total_env_steps": 20_480,
        # Full fine-tuning of the random tiny preset: on GridWorld 1e-4 passes 90% success by ~12k env steps
        # (README), 2e-5 learns much more slowly and 1e-3 collapses the policy onto one action. RL4VLM uses
        # 1e-5 with LoRA on 7B models.
        "learning_rate": 1e-4,
        "minibatch_size": 64,
        "micro_batch_size": 16,
        "policy": PolicyConfig(model="tiny", prompt_style="action", constrained=True, lora_rank=0, temperature=1.0),
    },
    "grpo": {
        # 8 groups of 4: on GridWorld 2 groups of 8 (verl-agent's group size) with mean-only advantages and
        # one epoch did not learn in 20,480 steps (README): updates were ~10x smaller than PPO's (approx KL
        # 0.003 vs 0.01, clip fraction 0.02 vs 0.3) and each round covered only 2 tasks. Std-normalised
        # advantages and 4 epochs give PPO-sized updates; 8 tasks per round give a less noisy gradient.
        "num_envs": 32,
        "group_size": 4,
        "advantage_norm": "std",
        "update_epochs": 4,
        "total_env_steps": 20_480,
        "learning_rate": 1e-4,  # as PPO's full fine-tuning of the tiny preset
        "minibatch_size": 64,
        "micro_batch_size": 16,
        "policy": PolicyConfig(model="tiny", prompt_style="action", constrained=True, lora_rank=0, temperature=1.0),
    },
    "sft": {
        "num_envs": 16,
        "eval_episodes": 200,
        # Chain-of-thought answers under constrained decoding, as the RL stage that follows will act.
        "policy": PolicyConfig(model="tiny", prompt_style="cot", constrained=True, lora_rank=0, temperature=1.0),
    },
    "ire-vla": {
        "num_envs": 8,
        # The backbone with LoRA (as iRe-VLA); the action head reads its hidden state, no text is written.
        "policy": PolicyConfig(model="tiny", prompt_style="action", lora_rank=8),
    },
    "dpo": {
        "num_envs": 16,
        "eval_episodes": 200,
        # As SFT, whose runs DPO usually starts from (--model runs/<sft run>): the reference is that start.
        "policy": PolicyConfig(model="tiny", prompt_style="cot", constrained=True, lora_rank=0, temperature=1.0),
    },
}


@dataclass
class EnvOptions:
    """An environment and its options. Subclasses set ``env_id`` and add the env's own options."""

    env_id: ClassVar[str | None] = None
    #: Per-algorithm defaults that suit this env better than :data:`CPU_DEFAULTS` (e.g. a learning rate).
    algorithm_defaults: ClassVar[dict[str, dict[str, Any]]] = {}

    def env_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``gymnasium.make``."""
        return {}


@dataclass
class TaskEnvOptions(EnvOptions):
    """Options every vlmrl task environment takes."""

    text_hint: bool = False
    """Also state the environment's state in the step text (an ablation: vision no longer needed)."""

    def env_kwargs(self) -> dict[str, Any]:
        return {"text_hint": self.text_hint}


@dataclass
class RegisteredEnv(EnvOptions):
    """Any registered environment, named with ``--env-id`` (a third-party env registers itself in the
    module given with ``--env-module``); no options of its own."""


#: ``vlmrl train <name>`` -> experiment module and its env-options class.
EXPERIMENTS: dict[str, tuple[str, str]] = {
    "gridworld": ("experiments.gridworld", "GridWorld"),
    "blackjack": ("experiments.blackjack", "Blackjack"),
    "numberline": ("experiments.numberline", "NumberLine"),
    "ezpoints": ("experiments.ezpoints", "EZPoints"),
    "points24": ("experiments.points24", "Points24"),
    "reach": ("experiments.reach", "Reach"),
    "push": ("experiments.push", "Push"),
}


def env_options_class(experiment: str | None) -> type[EnvOptions]:
    if experiment is None:
        return RegisteredEnv
    if experiment not in EXPERIMENTS:
        raise ConfigError(f"Unknown experiment {experiment!r}; choose one of {', '.join(EXPERIMENTS)}.")
    module_name, class_name = EXPERIMENTS[experiment]
    return getattr(importlib.import_module(module_name), class_name)


def experiment_config(name: str) -> EnvOptions:
    """The default env options of experiment ``name`` (``.env_id`` and ``.env_kwargs()``)."""
    return env_options_class(name)()


def algorithm_config_class(algorithm: str) -> type:
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"Unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)} with --algo.")
    module_name, class_name = ALGORITHMS[algorithm]
    return getattr(importlib.import_module(module_name), class_name)


def default_config(experiment: str | None, algorithm: str, env_id: str | None = None) -> Any:
    """The config ``vlmrl train <experiment> --algo <algorithm>`` gives with no other flags."""
    options_class = env_options_class(experiment)
    config_class = algorithm_config_class(algorithm)
    values = {
        **CPU_DEFAULTS.get(algorithm, {}),
        **options_class.algorithm_defaults.get(algorithm, {}),
        "env_id": options_class.env_id or env_id or "",
        "env_kwargs": options_class().env_kwargs(),
        "experiment": experiment,
    }
    if "policy" in values:
        values["policy"] = dataclasses.replace(values["policy"])
    # Not validated here: a third-party env is registered only once --env-module has been imported.
    return config_from_dict(config_class, values)


def parse(experiment: str | None, algorithm: str, args: list[str] | None = None) -> tuple[Any, Any]:
    """Parse the command line of ``vlmrl train``: ``(config, defaults)``, both the algorithm's config class.

    The env options and the algorithm's options (the policy's among them) are parsed together with flat
    flags; ``--help`` lists both groups.
    """
    options_class = env_options_class(experiment)
    config_class = algorithm_config_class(algorithm)
    defaults = default_config(experiment, algorithm)
    arguments = dataclasses.make_dataclass(
        f"{options_class.__name__}{config_class.__name__}", [("env", options_class), ("algo", config_class)]
    )
    with deferred_validation():  # validated below, once the env options are in: errors as one line
        parsed = tyro.cli(
            arguments,
            args=args,
            default=arguments(env=options_class(), algo=config_from_dict(config_class, dataclasses.asdict(defaults))),
            config=(tyro.conf.OmitArgPrefixes,),
            description=f"Train {algorithm} on {experiment or 'a registered environment (--env-id)'}.",
        )
    config = parsed.algo
    config.env_kwargs = parsed.env.env_kwargs()
    config.experiment = experiment
    if experiment is None and config.resume is None and not config.env_id:
        raise ConfigError("Name an experiment (vlmrl train gridworld) or an environment with --env-id.")
    if config.resume is None:
        config.validate()
    if experiment is None:
        defaults.env_id, defaults.env_module = config.env_id, config.env_module
    return config, defaults


def summarize(run_dir: Path) -> dict[str, float]:
    """First and last success rates of a run (from its metrics.jsonl), for the console."""
    metrics = read_metrics(Path(run_dir) / "metrics.jsonl")
    rows = [r for r in metrics if "charts/success_rate" in r]
    summary: dict[str, Any] = {"run_dir": str(run_dir)}
    if rows:
        summary.update(
            # The last row logged, not the last with a success rate: an update in which no episode ended
            # logs none, and GRPO's rounds end on whole episodes (so a run may pass its budget a little).
            env_steps=max(r.get("global_step", 0) for r in metrics),
            first_success_rate=rows[0]["charts/success_rate"],
            last_success_rate=rows[-1]["charts/success_rate"],
        )
    evals = [r for r in metrics if "eval/success_rate" in r]
    if evals:
        summary["eval_success_rate"] = evals[-1]["eval/success_rate"]
    return summary


def run(experiment: str | None, args: list[str] | None = None, algorithm: str = "ppo") -> Path:
    """Parse, train with the chosen algorithm, print where the results are."""
    config, defaults = parse(experiment, algorithm, args)
    module = importlib.import_module(ALGORITHMS[algorithm][0])
    run_dir = module.train(config, defaults)
    if os.environ.get("RANK", "0") == "0":  # under a launcher, rank 0 alone reports (it alone wrote the files)
        print(json.dumps(summarize(run_dir), indent=2))
        if (Path(run_dir) / "learning_curve.png").exists():
            print(f"learning curve: {Path(run_dir) / 'learning_curve.png'}")
    return run_dir


def main(experiment: str) -> None:
    """``python -m experiments.<name> [--algo ppo] [options]``: the same as ``vlmrl train <name>``."""
    import sys

    from experiments.cli import main as cli_main

    cli_main(["train", experiment, *sys.argv[1:]])
