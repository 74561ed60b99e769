"""What every training run shares, whatever the algorithm: its options, its directory, its checkpoints.

* :class:`RunConfig` holds the options every algorithm has (environment, seed, budget, run directory,
  tracking, checkpoints, evaluation, the policy); an algorithm's config subclasses it and adds its own.
* :class:`Run` owns resume-or-start, the run directory (locked while a run writes; a new run never
  writes into another run's directory), seeding, the logger and progress bar, the checkpoint schema,
  the final evaluation and the learning-curve plot. An algorithm file calls it and stays about the
  algorithm.

A checkpoint's ``trainer.pt`` holds plain data only: the config as a dict with the algorithm and
experiment names, counters, optimizer state, RNG states and the env runner's state (see
:class:`~agents.rollout.EnvRunner`). Nothing is pickled by class, so renaming a class never breaks a
checkpoint, and any registered environment, pygame-rendered or made by a lambda, can be checkpointed.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import fcntl
import importlib
import json
import os
import random
import shutil
import time
import typing
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import torch
import tyro
from tqdm import tqdm

from agents.checkpoint import POLICY_DIR, CheckpointError, find_checkpoint, load_trainer_state, save_checkpoint
from agents.errors import ConfigError, RunDirectoryError
from agents.optim import OutOfMemory
from agents.parallel import DataParallel, check_distributed_type, launched_world_size
from agents.policy import PolicyConfig
from agents.rollout import SUCCESS_RULES, EnvRunner, InvalidRule, SuccessRule
from agents.tracking import RunLogger

#: Version of the ``trainer.pt`` layout written by :meth:`Run.checkpoint`.
CHECKPOINT_FORMAT = 2
#: Options that may differ when a run is resumed: they change how a run is watched or how long it goes
#: on, never what it computes. Every other option is fixed by the run being resumed.
RESUMABLE_OPTIONS = frozenset(
    {
        "resume",
        "run_dir",
        "overwrite",
        "total_env_steps",
        "epochs",
        "progress",
        "eval_episodes",
        "track",
        "wandb_project",
        "wandb_entity",
        "wandb_tags",
        "checkpoint_every",
        "keep_checkpoints",
        "sample_every",
        "video_every",
        # Splitting a minibatch into smaller micro-batches changes memory, not the gradient (the minibatch
        # mean; only float summation order differs): what a run that ran out of memory resumes with.
        "micro_batch_size",
        "collective_timeout_s",
    }
)


@dataclass
class RunConfig:
    """Options every algorithm shares. Algorithms subclass it (``PPOConfig``, ...)."""

    # --- environment ---------------------------------------------------------------------------------------
    env_id: str = "vlmrl/GridWorld-v0"
    """Registered Gymnasium id of an environment with a language spec."""
    env_kwargs: Annotated[dict[str, Any], tyro.conf.Suppress] = field(default_factory=dict)
    """Keyword arguments of ``gymnasium.make`` (set from the experiment script's env options)."""
    env_module: str | None = None
    """Python module to import first: the one that registers a third-party env (``envs.register_language_env``)."""
    experiment: Annotated[str | None, tyro.conf.Suppress] = None
    """Name of the experiment script the env options came from (``gridworld``...), or ``None``."""
    success_rule: SuccessRule = "terminated_positive_reward"
    """How success is judged for an env whose ``info`` has no ``success``: ``terminated_positive_reward`` (the
    episode ended by termination with a positive last reward) or ``positive_return``."""
    num_envs: int = 8
    """Parallel environments; one batched ``act`` answers all of them each step."""
    invalid_rule: InvalidRule = "default"
    """What moves the env after an invalid answer: the ``default`` action or a ``random`` one."""
    invalid_default_action: int = 0
    """The action taken for an invalid answer under ``invalid_rule=default``."""

    # --- run -----------------------------------------------------------------------------------------------
    exp_name: str = ""
    """Name of the experiment; part of the run name ``{env}__{exp_name}__{seed}__{time}`` (default: the algorithm)."""
    seed: int = 1
    """Seed of the environments, the sampling and the minibatch order."""
    run_dir: str | None = None
    """Where metrics, checkpoints and plots go (default ``runs/<run name>``). Must be new or empty."""
    overwrite: bool = False
    """Delete what ``run_dir`` holds before starting (instead of refusing to mix two runs)."""
    resume: str | None = None
    """Run directory (or checkpoint directory) to continue from. Only the options that do not change what
    the run computes may be given with it (a longer budget, progress, eval_episodes, tracking, checkpoints)."""
    checkpoint_every: int = 10
    """Save a checkpoint every this many updates (and always at the end); 0 saves only at the end."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    track: bool = False
    """Log to Weights & Biases (offline when no API key is configured)."""
    wandb_project: str = "vlmrl"
    """W&B project."""
    wandb_entity: str | None = None
    """W&B entity (team or user)."""
    wandb_tags: tuple[str, ...] = ()
    """W&B tags."""
    sample_every: int = 10
    """Log a table of sample completions every this many updates; 0 never."""
    video_every: int = 0
    """Save a GIF of env 0's frames of the rollout every this many updates; 0 never."""
    eval_episodes: int = 0
    """Greedy evaluation episodes at the end of training (reported as ``eval/success_rate``)."""
    progress: bool = True
    """Show a progress bar with live success rate and steps/s."""
    collective_timeout_s: int = 1800
    """Under a launcher (``accelerate launch``/``torchrun``): how long a rank waits for the others in a collective
    before it fails (a hung rank stops the run instead of hanging it). It must exceed the longest pause of rank 0
    alone: a checkpoint save, the final evaluation."""
    save_trajectories: Literal["none", "all", "successes"] = "none"
    """Store the training envs' episodes (``all``, or only ``successes``) in ``<run dir>/trajectories``, a
    trajectory store (``agents/trajectories.py``) whose ``source`` is ``run:<run dir>@update-<n>``."""

    #: Whether the algorithm trains an action-head policy (``agents/vla.py``), so that ``--model`` may name one.
    trains_action_heads: ClassVar[bool] = False

    # --- policy ----------------------------------------------------------------------------------------------
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    """Model and policy options (``--model``, ``--temperature``, ``--constrained``, ...)."""

    def __post_init__(self) -> None:
        # A resumed run's saved config is validated when the run merges it; the command line validates
        # after parsing (see deferred_validation).
        if self.resume is None and _VALIDATE_ON_INIT.get():
            self.validate()

    def validate(self) -> None:
        """Fail before any model loads, saying what to change. Subclasses extend it."""
        import envs
        from agents.models import PRESETS, check_model_source

        if self.env_module:
            import_env_module(self.env_module)
        if self.num_envs < 1:
            raise ConfigError(f"num_envs must be >= 1, got {self.num_envs}.")
        if not self.env_id:
            raise ConfigError("No environment: name an experiment (vlmrl train gridworld) or give --env-id.")
        try:
            spec = envs.language_spec_of(self.env_id)
        except ValueError as error:
            raise ConfigError(str(error.args[0])) from None
        if self.save_trajectories not in ("none", "all", "successes"):
            raise ConfigError(f"save_trajectories must be none, all or successes, got {self.save_trajectories!r}.")
        if self.success_rule not in SUCCESS_RULES:
            raise ConfigError(f"success_rule must be one of {SUCCESS_RULES}, got {self.success_rule!r}.")
        if self.eval_episodes < 0:
            raise ConfigError(f"eval_episodes must be >= 0, got {self.eval_episodes}.")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}.")
        if not 0 <= self.invalid_default_action < len(spec.action_names):
            raise ConfigError(
                f"invalid_default_action={self.invalid_default_action} is not an action of {self.env_id} "
                f"(0..{len(spec.action_names) - 1}: {spec.action_names})."
            )
        model = self.policy.model
        if model.startswith("tiny") and model not in PRESETS and not Path(model).exists():
            raise ConfigError(f"Unknown preset {model!r}. Available presets: {', '.join(PRESETS)}.")
        if model.startswith((".", "/", "~")) and not Path(model).expanduser().exists():
            raise ConfigError(f"Model directory {model!r} does not exist.")
        check_model_source(model)
        _check_saved_policy(self.policy, self.trains_action_heads)
        if self.collective_timeout_s < 1:
            raise ConfigError(f"collective_timeout_s must be >= 1, got {self.collective_timeout_s}.")

    def check_world_size(self, world_size: int) -> None:
        """Fail when ``world_size`` processes cannot share this run's envs; subclasses add their own units."""
        if self.num_envs % world_size:
            raise ConfigError(
                f"{world_size} processes cannot share num_envs={self.num_envs} envs: each rank runs num_envs / "
                f"world size envs. Use a num_envs that is a multiple of {world_size}, or launch "
                f"{', '.join(str(n) for n in range(1, self.num_envs + 1) if self.num_envs % n == 0)} processes."
            )
        if self.save_trajectories != "none" and world_size > 1:
            raise ConfigError(
                "save_trajectories with several processes is not supported yet; drop it or run one process."
            )


def _check_saved_policy(policy: PolicyConfig, trains_action_heads: bool = False) -> None:
    """A saved policy (an SFT run, say) answers in the style it was trained in: refuse another one. An
    action-head policy (``agents/vla.py``) writes no text: only an algorithm that trains one may start from it."""
    from agents.policy import POLICY_FILE, resolve_policy_directory

    path = Path(resolve_policy_directory(policy.model)) / POLICY_FILE
    if (path.parent / "vla.json").exists():
        if not trains_action_heads:
            raise ConfigError(
                f"The policy at {policy.model} is an action-head policy (iRe-VLA): it writes no text answers, so "
                "this algorithm cannot train it. Continue it with --algo ire-vla, or start from a text policy."
            )
        return
    if not path.exists():
        return
    saved = json.loads(path.read_text())["config"]
    if saved["prompt_style"] != policy.prompt_style:
        raise ConfigError(
            f"The policy at {policy.model} was trained to write {saved['prompt_style']} answers; pass "
            f"--prompt-style {saved['prompt_style']} to train it further."
        )


_VALIDATE_ON_INIT: contextvars.ContextVar[bool] = contextvars.ContextVar("validate_on_init", default=True)


@contextlib.contextmanager
def deferred_validation() -> Iterator[None]:
    """Build configs without validating them (the caller calls ``validate()`` once they are complete)."""
    token = _VALIDATE_ON_INIT.set(False)
    try:
        yield
    finally:
        _VALIDATE_ON_INIT.reset(token)


def check_rewards(specs: list[str]) -> None:
    """An algorithm's ``reward`` option, checked before anything loads (see ``rewards.check_reward_specs``)."""
    from rewards import check_reward_specs

    try:
        check_reward_specs(specs)
    except ValueError as error:
        raise ConfigError(f"--reward: {error}") from None


def import_env_module(name: str) -> None:
    """Import the module that registers a third-party environment, with a clear error if it is missing."""
    try:
        importlib.import_module(name)
    except ImportError as error:
        raise ConfigError(
            f"Cannot import env_module {name!r} ({error}). Give an importable module (on PYTHONPATH, or "
            "installed) that registers the environment."
        ) from error


# ----------------------------------------------------------------------------------------------------------
# Configs as plain data
# ----------------------------------------------------------------------------------------------------------


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config as plain data (nested dataclasses become dicts)."""
    return dataclasses.asdict(config)


def config_from_dict(config_class: type, data: dict[str, Any]) -> Any:
    """Rebuild a config from :func:`config_to_dict`'s output without validating it.

    Options the class no longer has are dropped with a warning (a checkpoint outlives a renamed option);
    options it gained take their defaults.
    """
    hints = typing.get_type_hints(config_class)
    names = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(data) - names)
    if unknown:
        warnings.warn(f"Ignoring saved option(s) that {config_class.__name__} no longer has: {unknown}.", stacklevel=2)
    values = {}
    for name in names & set(data):
        value, hint = data[name], hints.get(name)
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = config_from_dict(hint, value)
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            value = tuple(value)
        values[name] = value
    config = config_class.__new__(config_class)
    for f in dataclasses.fields(config_class):  # defaults for options added since
        if f.name not in values:
            values[f.name] = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    config.__dict__.update(values)
    if isinstance(config, PolicyConfig):
        config.__post_init__()  # normalises tuples and checks the policy options
    return config


def merge_resumed_config(saved: Any, given: Any, defaults: Any) -> Any:
    """The config of a resumed run: ``saved``, with the resumable options the user gave.

    An option counts as given when it differs from ``defaults`` (what the command line yields with no
    flags). A given option that is not resumable and differs from the saved run's is refused by name:
    a resumed run must compute what the original would have.
    """
    merged = dataclasses.replace(saved)
    conflicts = []
    for f in dataclasses.fields(saved):
        name = f.name
        saved_value, given_value, default_value = (getattr(c, name) for c in (saved, given, defaults))
        if name == "policy":
            for pf in dataclasses.fields(saved_value):
                s, g, d = (getattr(c, pf.name) for c in (saved_value, given_value, default_value))
                if g not in (d, s):
                    conflicts.append(f"{pf.name} (run: {s!r}, given: {g!r})")
            continue
        if name == "env_kwargs":  # the experiment's env options, by their own names
            for key in sorted(set(saved_value) | set(given_value)):
                s, g, d = (c.get(key) for c in (saved_value, given_value, default_value))
                if g not in (d, s):
                    conflicts.append(f"{key} (run: {s!r}, given: {g!r})")
            continue
        if given_value in (default_value, saved_value):
            continue
        if name in RESUMABLE_OPTIONS:
            setattr(merged, name, given_value)
        else:
            conflicts.append(f"{name} (run: {saved_value!r}, given: {given_value!r})")
    if conflicts:
        names = ", ".join("--" + c.split(" ")[0].replace("_", "-") for c in conflicts)
        resumable = sorted(
            "--" + f.name.replace("_", "-")
            for f in dataclasses.fields(saved)
            if f.name in RESUMABLE_OPTIONS and f.name not in ("resume", "run_dir", "overwrite")
        )
        raise ConfigError(
            f"These options cannot change when a run is resumed: {'; '.join(conflicts)}. Drop {names} to "
            f"resume, or start a new run with them. Options that may change on resume: {', '.join(resumable)}."
        )
    merged.resume = given.resume
    return merged


# ----------------------------------------------------------------------------------------------------------
# Seeding
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------


def eval_metrics(result: dict[str, float]) -> dict[str, float]:
    """An :func:`~agents.evaluation.evaluate_policy` result as ``eval/...`` metrics."""
    names = {
        "success_rate": "eval/success_rate",
        "mean_return": "eval/episodic_return",
        "invalid_action_rate": "eval/invalid_action_rate",
        "thought_accuracy": "eval/thought_accuracy",
    }
    return {metric: result[key] for key, metric in names.items() if key in result}


class RunDirectory:
    """A run directory held by one process: an exclusive lock, released when the process ends (even by
    ``kill -9``), so two runs can never write into one directory at the same time."""

    LOCK = ".lock"

    def __init__(self, path: Path, *, new: bool, overwrite: bool) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = (self.path / self.LOCK).open("a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            owner = self._lock.read().strip() or "another process"
            self._lock.close()
            raise RunDirectoryError(
                f"{self.path} is in use by {owner}: two runs cannot write into one directory. Wait for it to "
                "finish, or choose another --run-dir."
            ) from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"vlmrl process {os.getpid()}")
        self._lock.flush()
        if new:
            existing = sorted(p.name for p in self.path.iterdir() if p.name != self.LOCK)
            if existing and not overwrite:
                self.release()
                raise RunDirectoryError(
                    f"{self.path} already holds a run ({', '.join(existing[:4])}{', ...' if len(existing) > 4 else ''}). "
                    f"Resume it with --resume {self.path}, choose another --run-dir, or pass --overwrite to delete it."
                )
            for name in existing:
                target = self.path / name
                shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()

    def release(self) -> None:
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()


class Run:
    """One training run: resume-or-start, the locked run directory, seeding, logging, checkpoints.

    An algorithm's ``train`` reads::

        with Run(config, "ppo") as run:             # starts, or resumes config.resume
            config = run.config                     # the resumed run's options, when resuming
            policy = run.load_policy()
            runner = run.make_env_runner()
            optimizer = make_optimizer(policy, config.learning_rate)
            run.restore(runner=runner, optimizer=optimizer)
            for update in run.updates(num_updates, steps_per_update):
                ...                                 # rollout through runner.step(policy), the update
                run.end_update(update, metrics, runner.steps, policy, finished=..., runner=runner, optimizer=optimizer)
            return run.finish(policy, runner)

    Args:
        config: The algorithm's config (a :class:`RunConfig`).
        algorithm: Its name (``"ppo"``), saved in checkpoints: a run resumes with the same algorithm only.
        defaults: What the command line yields with no flags, to tell given options from defaults on
            resume. Without it, a resumed run takes every option from its checkpoint.
    """

    def __init__(self, config: RunConfig, algorithm: str, defaults: RunConfig | None = None) -> None:
        self.algorithm = algorithm
        self.checkpoint_path: Path | None = None
        self.state: dict[str, Any] | None = None
        self.directory: RunDirectory | None = None
        self.logger: RunLogger | _NullLogger = _NullLogger()
        self.progress: tqdm | None = None
        # Under a launcher, every process runs this; without one, nothing below changes (``parallel`` is None).
        self.parallel: DataParallel | None = None
        # Also with one process: a one-GPU DeepSpeed launch would otherwise train without its config, silently.
        check_distributed_type()
        if launched_world_size() > 1:
            self.parallel = DataParallel(
                cpu=config.policy.device == "cpu" or not torch.cuda.is_available(),
                timeout_s=config.collective_timeout_s,
            )
        self.rank = self.parallel.rank if self.parallel else 0
        self.world_size = self.parallel.world_size if self.parallel else 1
        self.is_main = self.rank == 0
        if config.resume is not None:
            config = self._resume(config, defaults)
        self.config = config
        config.check_world_size(self.world_size)
        if self.state is not None and self.state.get("world_size", 1) != self.world_size:
            raise ConfigError(
                f"{self.checkpoint_path} was written by {self.state.get('world_size', 1)} process(es); resume it "
                f"with as many (each holds its own envs' state), not {self.world_size}."
            )
        if not config.exp_name:
            config.exp_name = algorithm
        name = f"{config.env_id.split('/')[-1]}__{config.exp_name}__{config.seed}__{int(time.time())}"
        if self.checkpoint_path is not None:  # a resumed run writes where its checkpoint lives
            path = self.checkpoint_path.parent.parent
        else:
            path = Path(config.run_dir or f"runs/{name}")
        if self.parallel is not None:
            path = Path(self.parallel.broadcast(str(path)))  # the ranks' clocks may name the run differently
            self.parallel.wait()  # every rank has read its checkpoint before rank 0 prunes newer ones
        if self.is_main:  # rank 0 alone holds the directory and writes into it
            self.directory = RunDirectory(path, new=self.state is None, overwrite=config.overwrite)
            path = self.directory.path
        self.run_dir = path
        if self.is_main and self.state is not None:
            self._drop_newer_checkpoints()
        # Rank r seeds its sampling with seed + r (rank 0 is a single-process run's seed). The generator that
        # draws the minibatch order is seeded alike on every rank, so they agree on every global minibatch;
        # under a launcher the envs draw from a generator of their own rank (invalid_rule=random).
        seed_everything(config.seed + self.rank)
        self.generator = np.random.default_rng(config.seed)
        self.runner_rng = self.generator if self.parallel is None else np.random.default_rng([config.seed, self.rank])
        self.update = self.state["update"] if self.state else 0
        resumed_rows = self.state["log_rows"] if self.state else None
        if not self.is_main:
            self.recent_success = []
            self.global_step = self.state["global_step"] if self.state else 0
            return
        self.logger = RunLogger(
            self.run_dir,
            {
                **config_to_dict(config),
                "algorithm": algorithm,
                "run_name": self.run_dir.name,
                "world_size": self.world_size,  # processes that ran it: a resumed run needs as many
            },
            track=config.track,
            project=config.wandb_project,
            entity=config.wandb_entity,
            run_name=self.run_dir.name,
            tags=config.wandb_tags,
            resume_id=self.state.get("wandb_id") if self.state else None,
            keep_rows=resumed_rows,
        )
        self.recent_success: list[float] = []
        self.global_step = self.state["global_step"] if self.state else 0

    # -- start or resume --------------------------------------------------------------------------------------
    def _resume(self, config: RunConfig, defaults: RunConfig | None) -> RunConfig:
        resume = Path(config.resume)
        if not resume.exists():
            raise CheckpointError(f"--resume {resume}: no such run or checkpoint directory.")
        self.checkpoint_path = find_checkpoint(resume)
        state = load_trainer_state(self.checkpoint_path)
        if not isinstance(state.get("config"), dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"{self.checkpoint_path} was written by an older vlmrl (checkpoint format "
                f"{state.get('format', 1)}, this one reads {CHECKPOINT_FORMAT}); start a new run."
            )
        if state["algorithm"] != self.algorithm:
            raise ConfigError(
                f"{resume} is a {state['algorithm']} run; resume it with --algo {state['algorithm']}, not {self.algorithm}."
            )
        saved = config_from_dict(type(config), state["config"])
        if config.experiment and saved.experiment and config.experiment != saved.experiment:
            raise ConfigError(
                f"{resume} is a run of experiment {saved.experiment!r}; resume it with `vlmrl train {saved.experiment} "
                f"--resume {resume}`."
            )
        if defaults is None:  # from Python without defaults: nothing counts as given, the run goes on as saved
            defaults = config
        given_run_dir = config.run_dir is not None and config.run_dir != defaults.run_dir
        if given_run_dir and Path(config.run_dir).resolve() != self.checkpoint_path.parent.parent.resolve():
            raise ConfigError(
                f"--run-dir {config.run_dir} with --resume {resume}: a resumed run writes into its own directory "
                f"({self.checkpoint_path.parent.parent}); drop --run-dir."
            )
        merged = merge_resumed_config(saved, config, defaults)
        merged.run_dir = str(self.checkpoint_path.parent.parent)
        merged.validate()
        for budget in ("total_env_steps", "epochs"):
            if getattr(merged, budget, None) is not None and getattr(merged, budget) < getattr(saved, budget):
                raise ConfigError(
                    f"--{budget.replace('_', '-')} {getattr(merged, budget)} is less than the run's "
                    f"{getattr(saved, budget)}: a resumed run can be extended, not shortened."
                )
        self.state = state
        return merged

    def _drop_newer_checkpoints(self) -> None:
        # Checkpoints newer than the one resumed from are damaged (that is why an older one was chosen);
        # left in place, pruning by update number would keep them and delete the new run's own.
        for path in sorted((self.run_dir / "checkpoints").glob("update-*")):
            if path.name > self.checkpoint_path.name:
                warnings.warn(
                    f"Removing {path}: it is newer than {self.checkpoint_path.name}, the checkpoint resumed from.",
                    stacklevel=3,
                )
                shutil.rmtree(path, ignore_errors=True)

    def load_policy(self):
        """The policy of the checkpoint being resumed, or a new one from ``config.policy``."""
        from agents.policy import load_policy

        device = self.config.policy.device if self.parallel is None else str(self.parallel.device)
        if self.checkpoint_path is not None:
            return load_policy(str(self.checkpoint_path / POLICY_DIR), device=device)
        options = config_to_dict(self.config.policy)
        options["device"] = device
        return load_policy(options.pop("model"), **options)

    def make_rewards(self, specs: list[str], gamma: float, policy):
        """The reward modules of ``specs`` (``rewards.RewardSet``), for this run's env, discount and policy."""
        from rewards import RewardContext, RewardSet

        context = RewardContext(
            env_id=self.config.env_id,
            gamma=gamma,
            device=str(policy.device),
            prompt_style=policy.config.prompt_style,
        )
        return RewardSet.from_specs(specs, context)

    def prepare(self, policy, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Under a launcher: wrap the policy (DDP) and the optimizer with accelerate; return the optimizer to
        step. One process: the optimizer as it is."""
        return optimizer if self.parallel is None else self.parallel.prepare(policy, optimizer)

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank in rank order (``[obj]`` in one process)."""
        return [obj] if self.parallel is None else self.parallel.gather(obj)

    def whole_policy(self, policy) -> contextlib.AbstractContextManager[None]:
        """A block in which every rank holds the policy's whole parameters: acting (``act``, ``values``) goes
        inside one. Only FSDP shards them (:meth:`~agents.parallel.DataParallel.whole_parameters`); every
        rank must enter it. Otherwise it does nothing."""
        return contextlib.nullcontext() if self.parallel is None else self.parallel.whole_parameters(policy)

    def on_main(self, work: Callable[[], Any]) -> Any:
        """``work()`` run by rank 0 alone, its result handed to every rank (in one process: ``work()``).

        For a step one process does for all, such as playing a round whose store every rank then reads. The
        other ranks wait for it, so it must be shorter than ``collective_timeout_s``.
        """
        if self.parallel is None:
            return work()
        result = work() if self.is_main else None
        self.parallel.wait()
        return self.parallel.broadcast(result)

    def env_steps(self, runner: EnvRunner) -> int:
        """Environment steps taken by every rank's envs together."""
        if self.parallel is None:
            return runner.steps
        return int(self.parallel.sum(torch.tensor([float(runner.steps)], dtype=torch.float64)).item())

    def make_env_runner(self, continuous: bool = False) -> EnvRunner:
        """The training envs, seeded with ``config.seed``, reporting each step to the progress bar
        (``continuous``: stepped with vectors, for an action-head policy)."""
        config = self.config
        local_envs = config.num_envs // self.world_size
        first_env = self.rank * local_envs  # rank r runs envs r*n.., seeded as in one process
        try:
            runner = EnvRunner(
                config.env_id,
                local_envs,
                config.env_kwargs,
                seed=config.seed + first_env,
                rng=self.runner_rng,
                invalid_rule=config.invalid_rule,
                invalid_default_action=config.invalid_default_action,
                success_rule=config.success_rule,
                on_step=lambda steps: self.advance(steps * self.world_size),
                first_env=first_env,
                continuous=continuous,
            )
        except TypeError as error:
            raise ConfigError(
                f"{config.env_id} does not take the env options {config.env_kwargs} ({error}). They come from the "
                f"experiment script{f' {config.experiment!r}' if config.experiment else ''}; to train another "
                "environment, use its own experiment name or `vlmrl train --env-id ID` with no experiment."
            ) from error
        if config.save_trajectories != "none":
            from agents.trajectories import EpisodeRecorder, TrajectoryWriter

            runner.recorder = EpisodeRecorder(
                TrajectoryWriter(self.run_dir / "trajectories"),
                config.env_id,
                config.env_kwargs,
                config.policy.prompt_style,
                config.num_envs,
                source=lambda: f"run:{self.run_dir}@update-{self.update + 1}",
                only_successes=config.save_trajectories == "successes",
            )
        return runner

    def restore(self, **stateful: Any) -> None:
        """Load the resumed checkpoint's state into each named object (``runner=``, ``optimizer=``...; the
        names :meth:`end_update` saved them under), then the RNG states. A new run: nothing to do."""
        if self.state is None:
            return
        mine = self.state["ranks"][self.rank] if "ranks" in self.state else self.state
        for name, obj in stateful.items():
            obj.load_state_dict(mine[name] if isinstance(obj, EnvRunner) else self.state[name])
        restore_rng_state(mine["rng"], self.runner_rng)
        self.generator.bit_generator.state = self.state["rng"]["generator"]

    # -- the loop -------------------------------------------------------------------------------------------
    def updates(self, num_updates: int, steps_per_update: int, total_steps: int | None = None) -> Iterator[int]:
        """The update indices still to run, with a progress bar in environment steps (``total_steps`` of
        them, by default ``num_updates * steps_per_update``: a loop whose units differ in size says so)."""
        self.num_updates = num_updates
        done = self.state["global_step"] if self.state else 0
        self.progress = tqdm(
            total=num_updates * steps_per_update if total_steps is None else total_steps,
            initial=done,
            disable=not (self.config.progress and self.is_main),
            unit="step",
        )
        for update in range(self.update, num_updates):
            self.update = update
            yield update

    def advance(self, steps: int) -> None:
        """Move the progress bar (the env runner calls it each step; other loops per batch)."""
        if self.progress is not None:
            self.progress.update(steps)

    def end_update(
        self,
        update: int,
        metrics: dict[str, float],
        global_step: int,
        policy,
        *,
        finished: list[dict[str, float]],
        samples: list[dict[str, Any]] | None = None,
        frames: list[np.ndarray] | None = None,
        last: bool | None = None,
        **stateful: Any,
    ) -> None:
        """Log one update (metrics, samples, video), show it, and checkpoint when due or at the end.

        ``stateful`` names the objects whose ``state_dict()`` goes into the checkpoint (``optimizer=``,
        ``runner=``...); :meth:`restore` loads them back under the same names.
        """
        config = self.config
        self.global_step = global_step
        self.recent_success = ([float(e["success"]) for e in finished] or self.recent_success)[-50:]
        self.logger.log(metrics, global_step)
        if self.progress is not None:
            self.progress.set_postfix(
                success=f"{np.mean(self.recent_success):.2f}" if self.recent_success else "-",
                sps=f"{metrics.get('charts/env_steps_per_s', 0.0):.1f}",
                invalid=f"{metrics.get('charts/invalid_action_rate', 0.0):.2f}",
            )
        if samples and config.sample_every and (update + 1) % config.sample_every == 0:
            self.logger.log_samples(samples, global_step)
        if frames:
            self.logger.log_video(frames, global_step)
        if last is None:  # an algorithm whose budget is not a number of updates says when it is done
            last = update + 1 == self.num_updates
        if last or (config.checkpoint_every and (update + 1) % config.checkpoint_every == 0):
            self.checkpoint(update + 1, policy, **stateful)

    def checkpoint(self, update: int, policy, **stateful: Any) -> Path:
        """Save checkpoint ``update`` (the number of updates done) with the whole trainer state.

        Under a launcher, each rank's env runner and RNG states are gathered into ``ranks`` (rank order);
        the rest (optimizer, the shared generator, counters) is the same on every rank and saved once.
        """
        if self.parallel is not None:
            parallel = self.parallel
            per_rank = {name: obj.state_dict() for name, obj in stateful.items() if isinstance(obj, EnvRunner)}
            ranks = parallel.gather({"rng": rng_state(self.runner_rng), **per_rank})
            # Under FSDP each rank holds a shard of the policy and of the optimizer's state: gathered on rank 0.
            states = {
                name: parallel.optimizer_state(policy, obj)
                if isinstance(obj, torch.optim.Optimizer)
                else obj.state_dict()
                for name, obj in stateful.items()
                if name not in per_rank
            }
            policy_state = parallel.policy_state(policy)
            if self.is_main:
                state = self._trainer_state(update, states)
                state.update(world_size=self.world_size, ranks=ranks)
                save_checkpoint(
                    self.run_dir, update, policy, state, keep=self.config.keep_checkpoints, policy_state=policy_state
                )
            parallel.wait()
            return self.run_dir / "checkpoints" / f"update-{update:06d}"
        state = self._trainer_state(update, {name: obj.state_dict() for name, obj in stateful.items()})
        return save_checkpoint(self.run_dir, update, policy, state, keep=self.config.keep_checkpoints)

    def _trainer_state(self, update: int, states: dict[str, Any]) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "algorithm": self.algorithm,
            "experiment": self.config.experiment,
            "config": config_to_dict(self.config),
            "update": update,
            "global_step": self.global_step,
            "rng": rng_state(self.generator),
            "wandb_id": self.logger.wandb_id,
            "log_rows": self.logger.rows(),
            **states,
        }

    def evaluate(self, policy, episodes: int | None = None) -> dict[str, float]:
        """Greedy evaluation on ``episodes`` (default ``eval_episodes``) held-out seeds (10,000 + seed upward:
        never a training seed of the runner, nor of ``vlmrl collect``'s default 0 upward)."""
        from agents.evaluation import evaluate_policy

        config = self.config
        with self.whole_policy(policy):  # every rank calls it; under FSDP they gather the parameters together
            if not self.is_main:  # rank 0 evaluates and logs; the others go on to the next collective
                return {}
            return evaluate_policy(
                policy,
                config.env_id,
                config.env_kwargs,
                config.eval_episodes if episodes is None else episodes,
                num_envs=config.num_envs,
                seed=10_000 + config.seed,
                invalid_default_action=config.invalid_default_action,
                success_rule=config.success_rule,
            )

    def finish(self, policy, runner: EnvRunner | None = None, global_step: int | None = None) -> Path:
        """Close the envs, run the final greedy evaluation, draw the learning curve, release the directory."""
        if self.progress is not None:
            self.progress.close()
        if runner is not None:
            global_step = self.env_steps(runner)
            runner.close()
        if self.config.eval_episodes:
            self.logger.log(eval_metrics(self.evaluate(policy)), global_step or 0)  # rank 0's logger alone writes
        self.logger.finish()
        if self.parallel is not None:
            self.parallel.wait()  # no rank leaves (and tears the process group down) before rank 0 is done
        self.release()
        return self.run_dir

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: object, error: BaseException | None, *exc: object) -> None:
        # A new run that fails before its first checkpoint (bad data, options the env does not take...)
        # leaves nothing behind: its directory would otherwise block the same --run-dir next time.
        failed_at_start = (
            exc_type is not None
            and self.is_main
            and self.state is None
            and not any((self.run_dir / "checkpoints").glob("update-*"))
        )
        self.close()
        if failed_at_start:
            for entry in self.run_dir.iterdir():
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()
        if isinstance(error, OutOfMemory):
            # Said once, without a traceback: what to resume with. The checkpoints are untouched.
            checkpoints = sorted((self.run_dir / "checkpoints").glob("update-*"))
            where = (
                f"The last checkpoint ({checkpoints[-1].name}) is intact: resume with `--resume {self.run_dir} "
                f"--micro-batch-size {error.smaller}`."
                if checkpoints and error.smaller
                else f"No checkpoint was written yet: start again with --micro-batch-size {error.smaller}."
                if error.smaller
                else ""
            )
            raise OutOfMemory(f"{error.args[0]}. {where}".strip(), error.micro_batch_size, error.smaller) from None

    def close(self) -> None:
        """Release the run directory (after a failure too: ``with Run(...) as run`` does it)."""
        if self.progress is not None:
            self.progress.close()
        self.logger.close()
        self.release()

    def release(self) -> None:
        if self.directory is not None:
            self.directory.release()


class _NullLogger:
    """The logger of ranks other than 0: rank 0 alone writes logs, samples and videos."""

    wandb_id = None

    def log(self, *args: Any, **kwargs: Any) -> None:
        pass

    log_samples = log_video = finish = close = log

    def rows(self) -> dict[str, int]:
        return {}
