"""The ``vlmrl`` command.

vlmrl train gridworld [options]     train with PPO (options: vlmrl train gridworld --help)
vlmrl eval RUN_DIR [--episodes N]   evaluate the newest intact checkpoint of a run
vlmrl demo [--episodes N]           every environment played by its scripted expert
vlmrl baseline [--experiment gridworld]   SB3 PPO with a CNN on the same environment
vlmrl plot RUN_DIR... [--out PNG]   learning curves of several runs, with a table
vlmrl collect gridworld --expert --episodes N --out DIR   expert episodes into a trajectory store
"""

from __future__ import annotations

import importlib
import json
import sys

#: ``vlmrl train <name>`` -> experiment module and its config class.
EXPERIMENTS = {
    "gridworld": ("experiments.gridworld", "GridWorldPPO"),
    "blackjack": ("experiments.blackjack", "BlackjackPPO"),
    "numberline": ("experiments.numberline", "NumberLinePPO"),
    "ezpoints": ("experiments.ezpoints", "EZPointsPPO"),
    "points24": ("experiments.points24", "Points24PPO"),
    "reach": ("experiments.reach", "ReachPPO"),
    "push": ("experiments.push", "PushPPO"),
}


def experiment_config(name: str):
    """The default config of experiment ``name`` (its env id and env options)."""
    module_name, class_name = EXPERIMENTS[name]
    return getattr(importlib.import_module(module_name), class_name)()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv else "--help"
    if command == "train":
        if not argv or argv[0] not in EXPERIMENTS:
            sys.exit(f"usage: vlmrl train {{{','.join(EXPERIMENTS)}}} [options]")
        module_name, class_name = EXPERIMENTS[argv.pop(0)]
        from experiments.common import run

        run(getattr(importlib.import_module(module_name), class_name), argv)
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
    else:
        print(__doc__)
        sys.exit(0 if command in ("-h", "--help", "help") else f"unknown command {command!r}")


if __name__ == "__main__":
    main()
