"""Experiment tracking: metrics to ``<run dir>/metrics.jsonl`` always, and to Weights & Biases with
``--track``; a learning-curve PNG; sample completions; episode GIFs.

Metric names are stable (CleanRL's where one exists), so runs of different algorithms line up:
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

#: Every metric the trainers log, and what it means. One place for the names.
METRICS = {
    "charts/episodic_return": "mean return of the episodes that ended in this update",
    "charts/success_rate": "fraction of those episodes that solved the task (info['success'], else the run's success_rule)",
    "charts/episode_length": "mean length of those episodes",
    "charts/invalid_action_rate": "fraction of answers with no legal action",
    "charts/thought_accuracy": "fraction of chain-of-thought answers whose thoughts state the observed state truly (env.check_thoughts)",
    "eval/success_rate": "greedy evaluation on held-out seeds: success rate",
    "eval/thought_accuracy": "greedy evaluation: fraction of true thoughts",
    "eval/invalid_action_rate": "greedy evaluation: fraction of invalid answers",
    "charts/learning_rate": "optimizer learning rate",
    "charts/env_steps_per_s": "environment steps per second of wall time, update included",
    "charts/tokens_per_s": "generated tokens per second of generation time",
    "losses/policy_loss": "clipped surrogate loss",
    "losses/value_loss": "(clipped) value loss",
    "losses/entropy": "mean per-token entropy of the sampling distribution",
    "losses/approx_kl": "approximate KL(old || new), http://joschu.net/blog/kl-approx.html",
    "losses/clipfrac": "fraction of samples whose ratio was clipped",
    "losses/explained_variance": "1 - Var(returns - values) / Var(returns)",
    "losses/kl_ref": "KL estimate to the reference (base) policy",
    "losses/skipped_steps": "optimizer steps skipped for a non-finite loss or gradient",
    "losses/loss": "DPO: the minimised loss (preference loss + rpo_alpha * chosen NLL)",
    "losses/preference_loss": "DPO: the sigmoid (DPO), IPO or hinge loss of the pairs",
    "losses/chosen_nll": "DPO: per-token NLL of the chosen answers (RPO's term)",
    "rewards/chosen": "DPO: implicit reward beta * (log pi - log pi_ref) of the chosen answers",
    "rewards/rejected": "DPO: implicit reward of the rejected answers",
    "rewards/margins": "DPO: chosen minus rejected implicit reward",
    "rewards/accuracies": "DPO: fraction of pairs whose chosen answer has the higher implicit reward",
    "logps/chosen": "DPO: log-prob of the chosen answers at temperature 1",
    "logps/rejected": "DPO: log-prob of the rejected answers at temperature 1",
    "dpo/heldout_accuracy": "DPO: rewards/accuracies on the held-out pairs",
    "dpo/heldout_margin": "DPO: rewards/margins on the held-out pairs",
    "dpo/heldout_loss": "DPO: preference loss on the held-out pairs",
    "dpo/pairs": "iterated DPO: pairs made from the round's episodes",
}
__doc__ = (__doc__ or "") + "\n".join(f"\n* ``{name}``: {meaning}" for name, meaning in METRICS.items())


class RunLogger:
    """Writes metrics of one run; mirrors them to W&B when ``track`` is set.

    Without a W&B API key (``WANDB_API_KEY`` or a ``wandb login``), W&B runs offline and the run can be
    uploaded later with ``wandb sync <run dir>/wandb/offline-run-*``.
    """

    def __init__(
        self,
        run_dir: Path,
        config: dict[str, Any],
        track: bool = False,
        project: str = "vlmrl",
        entity: str | None = None,
        run_name: str | None = None,
        tags: tuple[str, ...] = (),
        resume_id: str | None = None,
        keep_rows: dict[str, int] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.samples_path = self.run_dir / "samples.jsonl"
        self._rows = {self.metrics_path.name: 0, self.samples_path.name: 0}
        # A resumed run continues from its checkpoint: rows logged after it (before a crash) would appear
        # twice, so the files are cut back to the rows the checkpoint had seen. W&B already holds those
        # steps (identical, since resume is exact): they are not sent again.
        self._wandb_has_until = -1
        for name, count in (keep_rows or {}).items():
            self._wandb_has_until = max(self._wandb_has_until, _truncate_rows(self.run_dir / name, count))
            self._rows[name] = count
        (self.run_dir / "config.json").write_text(json.dumps(config, indent=2, default=str))
        self.wandb = None
        self.wandb_id: str | None = None
        if track:
            import wandb

            if "WANDB_MODE" not in os.environ and not _has_wandb_key():
                os.environ["WANDB_MODE"] = "offline"
            self.wandb = wandb.init(
                project=project,
                entity=entity,
                name=run_name,
                tags=list(tags),
                config=config,
                dir=str(self.run_dir),
                id=resume_id,
                resume="allow" if resume_id else None,
            )
            self.wandb_id = self.wandb.id

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Append one row (``global_step`` = environment steps so far)."""
        row = {"global_step": step, **{k: float(v) for k, v in metrics.items()}}
        with self.metrics_path.open("a") as file:
            file.write(json.dumps(row) + "\n")
        self._rows[self.metrics_path.name] += 1
        if self._to_wandb(step):
            self.wandb.log(metrics, step=step)

    def _to_wandb(self, step: int) -> bool:
        return self.wandb is not None and step > self._wandb_has_until

    def rows(self) -> dict[str, int]:
        """Rows written to each log file so far (a checkpoint keeps them, to cut the files back on resume)."""
        return dict(self._rows)

    def log_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        """A table of sample completions (prompt text, answer, action, reward)."""
        with self.samples_path.open("a") as file:
            for row in rows:
                file.write(json.dumps({"global_step": step, **row}, default=str) + "\n")
        self._rows[self.samples_path.name] += len(rows)
        if self._to_wandb(step) and rows:
            import wandb

            columns = list(rows[0])
            self.wandb.log(
                {"samples": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])}, step=step
            )

    def log_video(self, frames: list[np.ndarray], step: int, fps: int = 4) -> Path:
        """Save an episode as a GIF under ``<run dir>/videos`` (and to W&B)."""
        import imageio.v2 as imageio

        path = self.run_dir / "videos" / f"episode-{step:09d}.gif"
        path.parent.mkdir(exist_ok=True)
        imageio.mimsave(path, frames, duration=1000 / fps, loop=0)
        if self._to_wandb(step):
            import wandb

            self.wandb.log({"media/episode": wandb.Video(str(path), format="gif")}, step=step)
        return path

    def finish(self) -> None:
        plot_learning_curve(self.metrics_path, self.run_dir / "learning_curve.png")
        self.close()

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _truncate_rows(path: Path, count: int) -> int:
    """Keep the first ``count`` lines of a JSON-lines file (a line cut by a crash counts as dropped);
    return the largest ``global_step`` among the dropped rows (-1 if none)."""
    if not path.exists():
        return -1
    lines = path.read_text().splitlines(keepends=True)
    kept, dropped = lines[:count], lines[count:]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(line if line.endswith("\n") else line + "\n" for line in kept))
    os.replace(tmp, path)
    largest = -1
    for line in dropped:
        try:
            largest = max(largest, int(json.loads(line)["global_step"]))
        except (ValueError, KeyError, TypeError):
            continue  # the half-written last line of a killed run
    return largest


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def read_metrics(path: Path) -> list[dict[str, float]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_learning_curve(metrics_path: Path, output: Path, title: str | None = None) -> Path | None:
    """Success rate and episodic return vs environment steps (or, for a run without episodes such as SFT, the
    loss and the held-out evaluations), as a PNG. ``None`` if nothing to plot."""
    rows = [r for r in read_metrics(metrics_path) if "charts/success_rate" in r]
    if not rows:
        return _plot_supervised(metrics_path, output, title)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["global_step"] for r in rows]
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot(steps, [r["charts/success_rate"] for r in rows])
    axes[0].set(xlabel="environment steps", ylabel="success rate", ylim=(-0.02, 1.02))
    axes[1].plot(steps, [r["charts/episodic_return"] for r in rows])
    axes[1].set(xlabel="environment steps", ylabel="episodic return")
    for axis in axes:
        axis.grid(alpha=0.3)
    figure.suptitle(title or Path(metrics_path).parent.name, fontsize=9)
    figure.tight_layout()
    figure.savefig(output, dpi=100)
    plt.close(figure)
    return Path(output)


def _plot_supervised(metrics_path: Path, output: Path, title: str | None) -> Path | None:
    rows = read_metrics(metrics_path)
    losses = [r for r in rows if "losses/nll" in r]
    evals = [r for r in rows if "eval/success_rate" in r]
    if not losses:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot([r["global_step"] for r in losses], [r["losses/nll"] for r in losses])
    axes[0].set(xlabel="samples trained on", ylabel="answer NLL per token", yscale="log")
    for key, label in (("eval/success_rate", "success"), ("eval/thought_accuracy", "true thoughts")):
        points = [r for r in evals if key in r]
        axes[1].plot([r["global_step"] for r in points], [r[key] for r in points], marker="o", label=label)
    axes[1].set(xlabel="samples trained on", ylabel="greedy, held-out seeds", ylim=(-0.02, 1.02))
    axes[1].legend()
    for axis in axes:
        axis.grid(alpha=0.3)
    figure.suptitle(title or Path(metrics_path).parent.name, fontsize=9)
    figure.tight_layout()
    figure.savefig(output, dpi=100)
    plt.close(figure)
    return Path(output)
