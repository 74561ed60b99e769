"""The ``vlmrl`` command.

vlmrl train gridworld [--algo ppo] [options]     train on an experiment's env (options: vlmrl train gridworld --help)
vlmrl train gridworld --resume RUN_DIR           continue a run (its algorithm is read from it)
vlmrl train --env-id ID [--env-module MOD] ...   train on any registered env (MOD registers a third-party one)
vlmrl eval RUN_DIR [--episodes N]                evaluate the newest intact checkpoint of a run
vlmrl demo [--episodes N]                        every environment played by its scripted expert
vlmrl baseline [--experiment gridworld]          SB3 PPO with a CNN on the same environment
vlmrl plot RUN_DIR... [--out PNG]                learning curves of several runs, with a table
vlmrl collect gridworld --expert --episodes N --out DIR   expert episodes into a trajectory store
vlmrl collect gridworld --model RUN [--branch K] --out DIR  a policy's episodes (K branches per step)
vlmrl pairs STORE [STORE...] --mode trajectory|step|expert --out DIR   preference pairs (TRL's DPO format)
vlmrl reward-model {pairs,train} ...             preference pairs from an expert; train a reward model (rewards/)
vlmrl clip-adapt ENV_ID --out DIR                fine-tune a CLIP on an env's expert frames and captions
vlmrl label PAIRS [--port N]                     label preference pairs by hand on a local web page

A problem with the input (a bad option, a run directory in use, a missing checkpoint) ends the command
with one line, "vlmrl: error: ...", that says what to change, and exit status 2.
"""

from __future__ import annotations

import json
import re
import sys

from experiments.common import ALGORITHMS, EXPERIMENTS, experiment_config  # noqa: F401 - re-exported


def _pop_option(argv: list[str], name: str, default: str) -> str:
    """Remove ``--name VALUE`` (or ``--name=VALUE``) from ``argv`` and return VALUE."""
    for index, arg in enumerate(argv):
        if arg == name and index + 1 < len(argv):
            value = argv[index + 1]
            del argv[index : index + 2]
            return value
        if arg.startswith(name + "="):
            del argv[index]
            return arg.split("=", 1)[1]
    return default


def _saved_algorithm(resume: str) -> str:
    """The algorithm of the run (or checkpoint) ``--resume`` names, so resuming needs no ``--algo``; empty
    when it cannot be read (the run's own checks then say what is wrong with it)."""
    from agents.checkpoint import peek_trainer_state

    algorithm = peek_trainer_state(resume).get("algorithm")
    return algorithm if isinstance(algorithm, str) and algorithm in ALGORITHMS else ""


def train(argv: list[str]) -> None:
    from agents.errors import ConfigError
    from experiments.common import run

    algorithm = _pop_option(argv, "--algo", "")
    if not algorithm:
        resume = _pop_option(list(argv), "--resume", "")
        algorithm = (_saved_algorithm(resume) if resume else "") or "ppo"
    if argv and not argv[0].startswith("-"):
        experiment = argv.pop(0)
        if experiment not in EXPERIMENTS:
            raise ConfigError(
                f"unknown experiment {experiment!r}; choose one of {', '.join(EXPERIMENTS)}, or "
                "train a registered env with `vlmrl train --env-id ID`."
            )
    else:
        experiment = None
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}.")
    run(experiment, argv, algorithm)


def main(argv: list[str] | None = None) -> None:
    from agents.errors import VlmrlError

    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv else "--help"
    try:
        dispatch(command, argv)
    except (VlmrlError, ValueError) as error:
        # Problems with what was asked for (our own checks raise these): one line, no traceback, exit 2.
        # Bugs (any other exception) still trace.
        message = error.args[0] if error.args else str(error)
        print(f"vlmrl: error: {as_flags(message)}", file=sys.stderr)
        raise SystemExit(2) from None


# A config check names the field it refuses as ``name=value`` (it serves Python callers too); on the command
# line the user typed ``--name value``, so that is what the message should say.
_FIELD_EQUALS = re.compile(r"(?<![\w.\-])([a-z][a-z0-9]*(?:_[a-z0-9]+)+)=(?=\S)")


def as_flags(message: str) -> str:
    """``"batch_size=16 is not a multiple of micro_batch_size=3"`` -> ``"--batch-size 16 ... --micro-batch-size 3"``."""
    return _FIELD_EQUALS.sub(lambda match: "--" + match.group(1).replace("_", "-") + " ", message)


def dispatch(command: str, argv: list[str]) -> None:
    from agents.errors import VlmrlError

    if command == "train":
        train(argv)
    elif command == "eval":
        import tyro

        from agents.evaluation import evaluate_checkpoint

        result = tyro.cli(evaluate_checkpoint, args=argv)
        print(json.dumps(result, indent=2))
    elif command == "demo":
        import tyro

        from experiments.demo import DemoConfig
        from experiments.demo import main as demo

        demo(tyro.cli(DemoConfig, args=argv))
    elif command == "baseline":
        import tyro

        from experiments.baseline_sb3 import BaselineConfig
        from experiments.baseline_sb3 import main as baseline

        baseline(tyro.cli(BaselineConfig, args=argv))
    elif command == "plot":
        import tyro

        from experiments.plot_curves import PlotConfig
        from experiments.plot_curves import main as plot

        plot(tyro.cli(PlotConfig, args=["--runs", *argv] if argv and not argv[0].startswith("-") else argv))
    elif command == "collect":
        import tyro

        from experiments.collect import CollectConfig
        from experiments.collect import main as collect

        collect(tyro.cli(CollectConfig, args=argv))
    elif command == "pairs":
        import tyro

        from experiments.pairs import PairsConfig
        from experiments.pairs import main as pairs

        pairs(tyro.cli(PairsConfig, args=argv))
    elif command == "reward-model":
        from rewards.reward_model import main as reward_model

        reward_model(argv)
    elif command == "clip-adapt":
        from rewards.clip import main as clip_adapt

        clip_adapt(argv)
    elif command == "label":
        from rewards.labelling import main as label

        label(argv)
    elif command in ("-h", "--help", "help"):
        print(__doc__)
    else:
        raise VlmrlError(
            f"unknown command {command!r}; the commands are train, eval, demo, baseline, plot, collect, pairs, "
            "reward-model, clip-adapt, label (vlmrl --help)."
        )


if __name__ == "__main__":
    main()
