"""The shared run machinery: third-party envs train and resume, run directories never mix, a killed run
resumes with clean logs, options on resume, errors as one line, gradient checkpointing, the LR metric."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs
from agents.errors import ConfigError, RunDirectoryError
from agents.policy import PolicyConfig, load_policy
from agents.ppo import PPOConfig, train
from agents.rollout import EpisodeStats
from agents.run import RunDirectory, config_from_dict, config_to_dict
from agents.tracking import read_metrics
from experiments.cli import main as cli

ROOT = Path(__file__).resolve().parent.parent
TINY = PolicyConfig(model="tiny", prompt_style="action", constrained=True, lora_rank=8, temperature=1.0)
#: Fields that measure wall time: they differ between any two runs.
TIMING = {"charts/env_steps_per_s", "charts/tokens_per_s"}


def config(tmp_path: Path, **overrides) -> PPOConfig:
    options = dict(
        env_id="vlmrl/Colour-v0",
        num_envs=2,
        num_steps=4,
        total_env_steps=24,
        minibatch_size=4,
        micro_batch_size=2,
        update_epochs=1,
        learning_rate=1e-3,
        run_dir=str(tmp_path / "run"),
        progress=False,
        sample_every=1,
        checkpoint_every=1,
        policy=dataclasses.replace(TINY),
    )
    options.update(overrides)
    return PPOConfig(**options)


def parameters(checkpoint: Path) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in load_policy(str(checkpoint / "policy")).named_parameters()}


def assert_same_parameters(a: Path, b: Path) -> None:
    expected, actual = parameters(a), parameters(b)
    for name, value in expected.items():
        assert torch.equal(value, actual[name]), name


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def resume_from(run_dir: Path, copy_to: Path, drop_after: int) -> Path:
    """A copy of ``run_dir`` that looks as if the run had been killed after checkpoint ``drop_after``."""
    shutil.copytree(run_dir, copy_to)
    for path in (copy_to / "checkpoints").glob("update-*"):
        if int(path.name.split("-")[1]) > drop_after:
            shutil.rmtree(path)
    return copy_to


# --- third-party environments ----------------------------------------------------------------------------------


def register_toy_text() -> None:
    if "vlmrl-test/CliffWalking-v1" in gym.registry:
        return
    # As README's "Adding your own environment" shows, with a lambda for the step text: neither the lambda
    # nor pygame's surfaces can be pickled, so checkpoints must not pickle envs.
    envs.register_language_env(
        "vlmrl-test/FrozenLake-v1",
        "FrozenLake-v1",
        envs.LanguageSpec("Walk on the ice to the gift without falling into a hole.", ("left", "down", "right", "up")),
        describe=lambda state: f"You are on tile {state}.",
        is_slippery=False,
    )
    envs.register_language_env(
        "vlmrl-test/CliffWalking-v1",
        "CliffWalking-v1",
        envs.LanguageSpec("Walk to the goal without stepping off the cliff.", ("up", "right", "down", "left")),
        max_episode_steps=6,
    )


@pytest.mark.parametrize("env_id", ["vlmrl-test/FrozenLake-v1", "vlmrl-test/CliffWalking-v1"])
def test_pygame_rendered_third_party_env_trains_checkpoints_and_resumes_exactly(tmp_path, env_id):
    register_toy_text()
    straight = train(config(tmp_path / "a", env_id=env_id, checkpoint_every=2))
    resumed = resume_from(straight, tmp_path / "b", drop_after=2)
    train(config(tmp_path / "ignored", resume=str(resumed)))
    assert_same_parameters(straight / "checkpoints/update-000003", resumed / "checkpoints/update-000003")
    assert without_timing(read_metrics(straight / "metrics.jsonl")) == without_timing(
        read_metrics(resumed / "metrics.jsonl")
    )


def test_success_without_info_success_follows_the_rule():
    info_without_success = {"final_info": {"prob": np.ones(3), "_prob": np.ones(3, bool)}}
    rewards, terminated = np.array([1.0, 1.0, -1.0]), np.array([True, False, True])
    truncated = ~terminated
    stats = EpisodeStats(3)  # default: terminated with a positive last reward
    assert [e["success"] for e in stats.update(rewards, terminated, truncated, info_without_success)] == [
        True,
        False,
        False,
    ]
    stats = EpisodeStats(3, "positive_return")
    assert [e["success"] for e in stats.update(rewards, terminated, truncated, info_without_success)] == [
        True,
        True,
        False,
    ]
    reported = {"final_info": {"success": np.array([False, True, True]), "_success": np.array([True, True, False])}}
    stats = EpisodeStats(3)
    # env 0 and 1 report success (it wins over the rule); env 2 does not, so the rule judges it
    assert [e["success"] for e in stats.update(rewards, terminated, truncated, reported)] == [False, True, False]


def test_frozen_lake_success_is_counted(tmp_path):
    register_toy_text()
    run_dir = train(
        config(
            tmp_path,
            env_id="vlmrl-test/FrozenLake-v1",
            total_env_steps=8,
            num_envs=1,
            num_steps=8,
            minibatch_size=8,
            micro_batch_size=4,
            eval_episodes=0,
        )
    )
    assert read_metrics(run_dir / "metrics.jsonl")  # trains; success is judged by the documented rule
    from agents.evaluation import evaluate_policy

    class Expert:  # walks the fixed 4x4 map's safe path: down, down, right, down, right, right
        def __init__(self):
            self.t = 0

        def act(self, observations, spec, greedy=False):
            path = [1, 1, 2, 1, 2, 2]
            action = path[self.t % 6]
            self.t += 1
            return [dataclasses.replace(_completion(), action=action) for _ in range(len(observations["image"]))]

    result = evaluate_policy(Expert(), "vlmrl-test/FrozenLake-v1", episodes=1, num_envs=1)
    assert result["success_rate"] == 1.0


def _completion():
    from agents.policy import Completion

    return Completion(
        "",
        np.zeros((1, 1, 3), np.uint8),
        ("a",),
        torch.zeros(1),
        torch.ones(1),
        None,
        "",
        0,
        None,
        0.0,
        torch.zeros(1),
        0.0,
        0.0,
    )


# --- run directories -----------------------------------------------------------------------------------------


def test_a_second_run_into_a_directory_in_use_refuses(tmp_path):
    holder = RunDirectory(tmp_path / "run", new=True, overwrite=False)  # as a concurrent run holds it
    try:
        with pytest.raises(RunDirectoryError, match="in use by vlmrl process"):
            train(config(tmp_path))
    finally:
        holder.release()


def test_a_second_process_cannot_write_into_a_running_run(tmp_path):
    script = f"import time; from agents.run import RunDirectory; held = RunDirectory({str(tmp_path / 'run')!r}, new=True, overwrite=False); print('held', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirectoryError, match=f"in use by vlmrl process {holder.pid}"):
            train(config(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    train(config(tmp_path, total_env_steps=8, overwrite=True))  # the lock died with its process


def test_a_new_run_refuses_a_directory_that_holds_a_run_unless_overwrite(tmp_path):
    first = train(config(tmp_path, total_env_steps=8))
    with pytest.raises(RunDirectoryError, match="already holds a run.*--resume.*--overwrite"):
        train(config(tmp_path, total_env_steps=8))
    assert len(read_metrics(first / "metrics.jsonl")) == 1  # untouched
    train(config(tmp_path, total_env_steps=16, overwrite=True))
    assert [r["global_step"] for r in read_metrics(first / "metrics.jsonl")] == [8, 16]


def test_resuming_from_an_older_checkpoint_keeps_the_new_checkpoints(tmp_path):
    run_dir = train(config(tmp_path, total_env_steps=24, keep_checkpoints=2))
    (run_dir / "checkpoints/update-000003/trainer.pt").write_bytes(b"damaged")
    with pytest.warns(UserWarning, match="Skipped damaged"):
        train(config(tmp_path, resume=str(run_dir)))
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("update-*"))
    assert kept == ["update-000002", "update-000003"]  # the rewritten 3, not the damaged one
    assert len(read_metrics(run_dir / "metrics.jsonl")) == 3


# --- kill -9 and resume ----------------------------------------------------------------------------------------


def test_kill_9_at_a_random_point_then_resume_gives_the_uninterrupted_logs(tmp_path):
    options = dict(total_env_steps=48, num_envs=2, num_steps=4, checkpoint_every=2)
    straight = train(config(tmp_path / "straight", **options))
    run_dir = tmp_path / "killed" / "run"
    killed = config(tmp_path / "killed", **options)
    (tmp_path / "config.json").write_text(json.dumps(config_to_dict(killed)))
    script = textwrap.dedent(
        f"""
        import json, torch
        torch.set_num_threads({torch.get_num_threads()})  # as this process: thread count changes float rounding
        from agents.ppo import PPOConfig, train
        from agents.run import config_from_dict
        train(config_from_dict(PPOConfig, json.loads(open({str(tmp_path / "config.json")!r}).read())))
        """
    )
    process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run_dir / "checkpoints" / "update-000002").exists() and process.poll() is None:
        assert time.time() < deadline, "the run never wrote its first checkpoint"
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 1.5))
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert len(read_metrics(straight / "metrics.jsonl")) == 6
    train(config(tmp_path / "ignored", resume=str(run_dir)))
    rows = read_metrics(run_dir / "metrics.jsonl")
    steps = [r["global_step"] for r in rows]
    assert steps == sorted(set(steps)), f"duplicate or missing rows: {steps}"
    assert without_timing(rows) == without_timing(read_metrics(straight / "metrics.jsonl"))
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (straight / "samples.jsonl").read_text().splitlines()]
    assert samples == expected


# --- options on resume --------------------------------------------------------------------------------------------

CLI_SMALL = ["--num-envs", "2", "--num-steps", "2", "--minibatch-size", "4", "--micro-batch-size", "2",
             "--update-epochs", "1", "--max-new-tokens", "8", "--checkpoint-every", "1"]  # fmt: skip


def test_resume_extends_a_finished_run_and_refuses_options_that_cannot_change(tmp_path, capsys, cli_fails):
    run_dir = tmp_path / "run"
    cli(["train", "gridworld", *CLI_SMALL, "--total-env-steps", "8", "--run-dir", str(run_dir), "--no-progress"])
    resume = ["train", "gridworld", "--resume", str(run_dir)]
    cli_fails(
        [*resume, "--learning-rate", "0.5"], r"cannot change when a run is resumed: learning_rate .*--learning-rate"
    )
    cli_fails([*resume, "--size", "5"], r"size \(run: 4, given: 5\)")
    cli_fails([*resume, "--total-env-steps", "4"], "can be extended, not shortened")
    cli_fails([*resume, "--run-dir", str(tmp_path / "elsewhere")], "writes into its own directory")
    cli(["train", "gridworld", "--resume", str(run_dir), "--total-env-steps", "16", "--no-progress"])
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["global_step"] for r in rows] == [4, 8, 12, 16]
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["total_env_steps"] == 16 and saved["progress"] is False
    # Updates 0-1 ran on the schedule of 2 updates; from the resume point on, the schedule of a run started
    # with the new total: rate(update) = base * (1 - update / 4).
    assert [r["charts/learning_rate"] for r in rows] == pytest.approx([1e-4 * f for f in (1.0, 0.5, 0.5, 0.25)])
    assert "\r" not in capsys.readouterr().err  # --no-progress is honoured on resume: no progress bar


def test_learning_rate_metric_is_the_rate_the_optimizer_used(tmp_path, monkeypatch):
    import agents.optim

    used = []
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    run_dir = train(config(tmp_path, total_env_steps=24, minibatch_size=8, micro_batch_size=4))
    logged = [r["charts/learning_rate"] for r in read_metrics(run_dir / "metrics.jsonl")]
    assert logged == used  # one optimizer step per update here
    assert logged[0] == 1e-3 and logged[1] < logged[0]
    assert agents.optim.set_learning_rate  # the schedule lives in one place


# --- errors are one line --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "gridworld", "--resume", "/nonexistent/run"], "no such run or checkpoint directory"),
        (["train", "gridworld", "--learning-rate", "-1"], "learning_rate must be > 0"),
        (
            ["train", "gridworld", "--env-id", "vlmrl/Blackjack-v0", "--total-env-steps", "4096"],
            "does not take the env options",
        ),
        (["train", "gridworld", "--model", "some-org/some-model"], "not in the local Hugging Face cache"),
        (["train", "--env-id", "vlmrl-test/Nope-v0"], "Unknown env_id"),
        (["train", "--env-id", "x/Y-v0", "--env-module", "no_such_module_here"], "Cannot import env_module"),
        (["train", "gridworld", "--algo", "sac"], "unknown algorithm 'sac'"),
        # a config check's "group_size=1" reads as the flag the user typed
        (
            ["train", "gridworld", "--algo", "grpo", "--group-size", "1"],
            r"^vlmrl: error: --group-size 1: a group needs",
        ),
        (["eval", "/nonexistent/run"], "no such run"),
        (["reward-model", "pairs", "--env-id", "vlmrl-test/Nope-v0", "--out", "RUN"], "Unknown env_id"),
        (["clip-adapt", "vlmrl-test/Nope-v0", "--out", "RUN"], "Unknown env_id"),
    ],
)
def test_errors_after_start_up_are_one_line(tmp_path, monkeypatch, cli_fails, argv, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    argv = [a if a != "RUN" else str(tmp_path) for a in argv] + ["--run-dir", str(tmp_path / "run")] * (
        argv[0] == "train" and "--resume" not in argv
    )
    start = time.perf_counter()
    cli_fails(argv, message)
    assert time.perf_counter() - start < 20  # no network retries
    if argv[0] == "train" and "--resume" not in argv:
        assert not (tmp_path / "run").exists()  # a run that fails at start leaves no directory behind


def test_eval_rejects_zero_episodes_and_says_evaluating(tmp_path, cli_fails):
    run_dir = train(config(tmp_path, total_env_steps=16))
    cli_fails(["eval", str(run_dir), "--episodes", "0"], "episodes must be >= 1")
    (run_dir / "checkpoints/update-000002/trainer.pt").write_bytes(b"damaged")
    with pytest.warns(UserWarning, match="Evaluating from .*update-000001"):
        cli(["eval", str(run_dir), "--episodes", "2"])


def test_a_third_party_env_trains_from_the_command_line(tmp_path, monkeypatch):
    (tmp_path / "my_frozen_lake.py").write_text(
        textwrap.dedent(
            """
            import envs
            envs.register_language_env(
                "mine/FrozenLake-v1", "FrozenLake-v1",
                envs.LanguageSpec("Walk to the gift.", ("left", "down", "right", "up")), is_slippery=False,
            )
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    run_dir = tmp_path / "run"
    cli(["train", "--env-id", "mine/FrozenLake-v1", "--env-module", "my_frozen_lake", *CLI_SMALL,
         "--total-env-steps", "8", "--run-dir", str(run_dir), "--no-progress"])  # fmt: skip
    assert json.loads((run_dir / "config.json").read_text())["env_module"] == "my_frozen_lake"
    cli(["train", "--resume", str(run_dir), "--total-env-steps", "12", "--no-progress"])
    assert [r["global_step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [4, 8, 12]
    cli(["eval", str(run_dir), "--episodes", "2"])
    # Its episodes go into a trajectory store by its registered id, as an experiment's do by name.
    from agents.trajectories import load_trajectories

    cli(["collect", "mine/FrozenLake-v1", "--env-module", "my_frozen_lake", "--model", str(run_dir), "--episodes",
         "2", "--num-envs", "2", "--out", str(tmp_path / "store")])  # fmt: skip
    steps = load_trajectories(tmp_path / "store")
    assert set(steps["env_id"]) == {"mine/FrozenLake-v1"} and len(set(steps["episode_id"])) == 2


@pytest.mark.parametrize("command", ["reward-model pairs --env-id", "clip-adapt"])
def test_pairs_and_clip_adapt_find_a_third_party_env_by_its_module(tmp_path, monkeypatch, cli_fails, command):
    module = f"lake_for_{command.split()[0].replace('-', '_')}"  # imported by this test alone
    (tmp_path / f"{module}.py").write_text(
        textwrap.dedent(
            f"""
            import envs
            envs.register_language_env(
                "mine/{module}-v1", "FrozenLake-v1", envs.LanguageSpec("Walk.", ("left", "down", "right", "up")),
            )
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = [*command.split(), f"mine/{module}-v1", "--out", str(tmp_path / "out")]
    cli_fails(argv, "Unknown env_id .*--env-module")
    # Found once its module is imported; FrozenLake has no scripted expert, which is what they then say.
    cli_fails([*argv, "--env-module", module], "no scripted expert|no expert_rationale")


# --- gradient checkpointing ---------------------------------------------------------------------------------------


def test_gradient_checkpointing_recomputes_and_keeps_log_probs():
    spec = envs.get_language("vlmrl/GridWorld-v0")
    env = gym.make("vlmrl/GridWorld-v0")
    observations = [env.reset(seed=seed)[0] for seed in range(3)]
    results = {}
    for checkpointing in (False, True):
        policy = load_policy(
            "tiny", prompt_style="action", constrained=True, lora_rank=8, gradient_checkpointing=checkpointing
        )
        torch.manual_seed(0)  # both policies sample the same answers, whatever ran before in this process
        completions = policy.act(observations, spec)
        calls: list[int] = []
        layer = policy.model.get_decoder().layers[0].self_attn  # inside the checkpointed forward
        handle = layer.register_forward_hook(lambda *args, calls=calls: calls.append(1))
        evaluation = policy.evaluate(completions)
        forward_calls = len(calls)
        evaluation.logprob.sum().backward()
        handle.remove()
        results[checkpointing] = (
            forward_calls,
            len(calls),
            evaluation.logprob.detach(),
            [c.logprob for c in completions],
        )
    assert results[False][:2] == (1, 1)  # no recomputation
    assert results[True][:2] == (1, 2)  # the backward pass ran the layer again
    torch.testing.assert_close(results[True][2], results[False][2])
    assert results[True][3] == pytest.approx(results[False][3], abs=1e-5)


def test_config_round_trips_as_plain_data(tmp_path):
    original = config(tmp_path, wandb_tags=("a", "b"))
    data = json.loads(json.dumps(config_to_dict(original)))  # as config.json holds it
    rebuilt = config_from_dict(PPOConfig, data)
    assert rebuilt == original
    with pytest.warns(UserWarning, match="no longer has: \\['an_old_option'\\]"):
        config_from_dict(PPOConfig, {**data, "an_old_option": 1})


def test_bad_options_name_what_to_change(tmp_path):
    with pytest.raises(ConfigError, match="success_rule must be one of"):
        config(tmp_path, success_rule="whatever")
    with pytest.raises(ConfigError, match="learning_rate must be > 0"):
        config(tmp_path, learning_rate=0.0)


def test_a_resumed_tracked_run_keeps_its_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = train(config(tmp_path, total_env_steps=16, track=True))
    shutil.rmtree(run_dir / "checkpoints" / "update-000002")  # as if killed after checkpoint 1
    train(config(tmp_path / "ignored", resume=str(run_dir)))
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and len({path.name.rsplit("-", 1)[-1] for path in offline}) == 1  # one run id
    assert [r["global_step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [8, 16]


def test_an_intact_checkpoint_is_hashed_once_per_process_and_again_once_changed(tmp_path, monkeypatch):
    import os

    from agents import checkpoint

    class Saves:
        def save(self, directory):
            directory.mkdir(parents=True)
            (directory / "weights.bin").write_bytes(b"w" * 64)

    path = checkpoint.save_checkpoint(tmp_path, 1, Saves(), {"update": 1})
    hashed = []
    real = checkpoint._sha256
    monkeypatch.setattr(checkpoint, "_sha256", lambda p: hashed.append(p.name) or real(p))
    assert checkpoint.verify_checkpoint(path) is None
    first = len(hashed)
    assert first >= 2
    assert checkpoint.verify_checkpoint(path) is None and len(hashed) == first  # start-up's second look
    weights = path / "policy" / "weights.bin"
    weights.write_bytes(b"x" * 64)  # same size, new content
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000))
    assert "does not match its checksum" in checkpoint.verify_checkpoint(path)


def test_evaluation_plays_exactly_the_seeds_from_its_seed_up_whatever_the_env_count():
    """Every policy meets the same deals: episode k is seed + k, not a continuation of an env's RNG."""
    from agents.evaluation import evaluate_policy

    env_id = "vlmrl/Blackjack-v0"
    stand = envs.get_language(env_id).action_index("stand")

    class Stand:  # stands at once, so an episode's return is a function of its deal alone
        def act(self, observations, spec, greedy=False):
            return [dataclasses.replace(_completion(), action=stand) for _ in range(len(observations["image"]))]

    expected = []
    env = gym.make(env_id)
    for seed in range(500, 512):
        env.reset(seed=seed)
        expected.append(env.step(stand)[1])
    env.close()
    for num_envs in (1, 3, 4):
        result = evaluate_policy(Stand(), env_id, episodes=12, num_envs=num_envs, seed=500)
        assert result["mean_return"] == pytest.approx(np.mean(expected)), num_envs
