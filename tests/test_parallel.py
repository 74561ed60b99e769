"""Data-parallel training under a launcher (agents/parallel.py): two CPU processes (gloo on loopback) give
the parameters of one process with the same global batch, a killed two-process run resumes exactly, and
what cannot run is refused with a message.

The two-process runs are started with ``torchrun`` (``accelerate launch --cpu`` starts one process on a
machine without MPI). Sampling during the rollout is made per env (each env's answer drawn from a seed of
its own: :func:`per_env_sampling`), so that one process and two draw the same answers; everything after
the rollout (gathering, advantages, minibatch order, the sharded gradient, the optimizer) is the real code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from agents.errors import ConfigError
from agents.policy import PolicyConfig, load_policy
from agents.run import config_to_dict
from agents.tracking import read_metrics

ROOT = Path(__file__).resolve().parent.parent
TINY = PolicyConfig(model="tiny", prompt_style="action", constrained=True, lora_rank=8, temperature=1.0)
TIMING = {
    "charts/env_steps_per_s",
    "charts/tokens_per_s",
    "charts/samples_per_s",
    "charts/pairs_per_s",
    "charts/round_seconds",
}
COMMON = dict(env_id="vlmrl/Colour-v0", num_envs=4, learning_rate=1e-3, progress=False, sample_every=1)


def ppo_config(run_dir: Path, **overrides):
    from agents.ppo import PPOConfig

    options = dict(COMMON, num_steps=2, total_env_steps=24, minibatch_size=4, micro_batch_size=2, update_epochs=2)
    options.update(run_dir=str(run_dir) if run_dir else None, checkpoint_every=1, policy=dataclasses.replace(TINY))
    options.update(overrides)
    return PPOConfig(**options)


def grpo_config(run_dir: Path, **overrides):
    from agents.grpo import GRPOConfig

    options = dict(COMMON, group_size=2, total_env_steps=8, minibatch_size=2, micro_batch_size=1, update_epochs=2)
    options.update(run_dir=str(run_dir) if run_dir else None, checkpoint_every=1, policy=dataclasses.replace(TINY))
    options.update(overrides)
    return GRPOConfig(**options)


def sft_config(run_dir: Path | None, data: Path, **overrides):
    from agents.sft import SFTConfig

    options = dict(COMMON, data=str(data), epochs=2, batch_size=4, micro_batch_size=2, checkpoint_every=1)
    options.update(run_dir=str(run_dir) if run_dir else None, policy=dataclasses.replace(TINY), sample_every=0)
    options.update(overrides)
    return SFTConfig(**options)


def dpo_config(run_dir: Path | None, pairs: Path | None, **overrides):
    from agents.dpo import DPOConfig

    options = dict(COMMON, pairs=str(pairs) if pairs else "", epochs=2, batch_size=4, micro_batch_size=1)
    options.update(run_dir=str(run_dir) if run_dir else None, held_out_fraction=0.25, checkpoint_every=1)
    options.update(policy=dataclasses.replace(TINY), sample_every=0)
    options.update(overrides)
    return DPOConfig(**options)


def iterated_dpo_config(run_dir: Path | None, **overrides):
    options = dict(rounds=2, episodes_per_round=4, group_size=2, batch_size=2, micro_batch_size=1)
    return dpo_config(run_dir, None, **{**options, **overrides})


def expert_pairs(demos: Path, out: Path) -> Path:
    """Preference pairs from expert demonstrations: at each demonstrated state, the expert's colour over each
    wrong one."""
    import envs
    from agents.pairs import build_pairs, save_pairs
    from agents.trajectories import StepRecord, TrajectoryWriter, load_trajectories

    names = envs.get_language("vlmrl/Colour-v0").action_names
    with TrajectoryWriter(out / "wrong") as writer:
        for row in load_trajectories(demos):
            for shift in (1, 2):
                wrong = (row["action"] + shift) % len(names)
                step = StepRecord(np.asarray(row["image"].convert("RGB")), row["step_text"], names[wrong], wrong,
                                  0.0, True, False, action_name=names[wrong])  # fmt: skip
                writer.add_episode(
                    [step], env_id=row["env_id"], seed=row["seed"], prompt_style="action", source="run:test"
                )
    pairs, _ = build_pairs([demos, out / "wrong"], mode="expert")
    save_pairs(pairs, out / "pairs")
    return out / "pairs"


def per_env_sampling() -> None:
    """Make each env's answer depend only on the env (its run-wide index) and the step, not on which
    process acts for it or on the batch it is acted in: one ``act`` per env, from a seed of its own."""
    from agents.rollout import EnvRunner

    real_step = EnvRunner.step
    if getattr(real_step, "per_env", False):
        return

    def step(self, policy, greedy=False, active=None):
        self.calls = getattr(self, "calls", 0) + 1
        indices = np.arange(self.num_envs) if active is None else np.flatnonzero(active)
        real_act = policy.act

        def act(observations, spec, greedy=False):
            completions = []
            for row, index in enumerate(indices):
                torch.manual_seed(1_000 * self.calls + self.first_env + int(index))
                one = {
                    k: v[row : row + 1] if isinstance(v, np.ndarray) else type(v)([v[row]])
                    for k, v in observations.items()
                }
                completions += real_act(one, spec, greedy=greedy)
            return completions

        policy.act = act
        try:
            return real_step(self, policy, greedy, active)
        finally:
            del policy.act

    # The call count is part of what decides the answers, so a resumed run must start from the saved one,
    # as it does from the saved RNG states.
    real_state_dict, real_load_state_dict = EnvRunner.state_dict, EnvRunner.load_state_dict

    def state_dict(self):
        return {**real_state_dict(self), "calls": getattr(self, "calls", 0)}

    def load_state_dict(self, state):
        real_load_state_dict(self, state)
        self.calls = state["calls"]

    step.per_env = True
    EnvRunner.step, EnvRunner.state_dict, EnvRunner.load_state_dict = step, state_dict, load_state_dict


def inject_fault() -> None:
    """``VLMRL_TEST_FAULT=crash|hang``: rank 1 raises, or stops answering, at its 4th env step (update 2)."""
    fault = os.environ.get("VLMRL_TEST_FAULT")
    if not fault or os.environ.get("RANK") != "1":
        return
    from agents.rollout import EnvRunner

    real_step = EnvRunner.step

    def step(self, *args, **kwargs):
        self.faulty_calls = getattr(self, "faulty_calls", 0) + 1
        if self.faulty_calls == 4:
            if fault == "crash":
                raise RuntimeError("injected crash on rank 1")
            time.sleep(3600)
        return real_step(self, *args, **kwargs)

    EnvRunner.step = step


CHILD = textwrap.dedent(
    """
    import json, sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    import test_parallel
    from agents.run import config_from_dict
    test_parallel.per_env_sampling()
    test_parallel.inject_fault()
    for algorithm, path in json.loads(sys.argv[1]):
        agent = __import__("agents." + algorithm, fromlist=["train"])
        config_class = getattr(agent, algorithm.upper() + "Config")
        agent.train(config_from_dict(config_class, json.loads(open(path).read())))
    """
)


#: What ``accelerate launch --config_file configs/accelerate/fsdp.yaml`` sets for the processes it starts.
FSDP = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true"}


def launch(
    tmp_path: Path,
    jobs: list[tuple[str, object]],
    name: str,
    fault: str | None = None,
    environment: dict[str, str] | None = None,
) -> subprocess.Popen:
    """Start ``torchrun --nproc-per-node 2`` on the jobs ``[(algorithm, config)]``, in sequence."""
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(ROOT / "tests")))
    paths = []
    for index, (algorithm, config) in enumerate(jobs):
        path = tmp_path / f"{name}-{index}.json"
        path.write_text(json.dumps(config_to_dict(config)))
        paths.append((algorithm, str(path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if fault:
        env["VLMRL_TEST_FAULT"] = fault
    env.update(environment or {})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return subprocess.Popen(
        [*command, str(script), json.dumps(paths)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # kill -9 reaches the launcher and both ranks
    )


def finish(process: subprocess.Popen, timeout: float = 240) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-12000:]
    return output


def parameters(checkpoint: Path) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in load_policy(str(checkpoint / "policy")).named_parameters()}


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """One launch of two processes: a PPO run, a GRPO run, an SFT run, an offline and an iterated DPO run, and
    a PPO run with a GPU run's options."""
    from agents.trajectories import collect_expert

    tmp_path = tmp_path_factory.mktemp("two")
    collect_expert("vlmrl/Colour-v0", tmp_path / "demos", episodes=6, seed=0, prompt_style="action")
    expert_pairs(tmp_path / "demos", tmp_path)
    gpu_options = dataclasses.replace(TINY, dtype="bfloat16", gradient_checkpointing=True, attn_implementation="sdpa")
    jobs = [
        ("ppo", ppo_config(tmp_path / "ppo")),
        ("grpo", grpo_config(tmp_path / "grpo")),
        ("sft", sft_config(tmp_path / "sft", tmp_path / "demos")),
        ("dpo", dpo_config(tmp_path / "dpo", tmp_path / "pairs")),
        ("dpo", iterated_dpo_config(tmp_path / "dpo-rounds")),
        ("ppo", ppo_config(tmp_path / "bf16", total_env_steps=8, kl_coef=0.05, policy=gpu_options)),
    ]
    finish(launch(tmp_path, jobs, "both"))
    return tmp_path


@pytest.mark.parametrize("algorithm", ["ppo", "grpo", "sft", "dpo", "dpo-rounds"])
def test_two_processes_give_the_parameters_of_one(two_processes, tmp_path, monkeypatch, algorithm):
    from agents import dpo, grpo, ppo, sft
    from agents.rollout import EnvRunner

    for name in ("step", "state_dict", "load_state_dict"):  # per_env_sampling's patches, undone after the test
        monkeypatch.setattr(EnvRunner, name, getattr(EnvRunner, name))
    per_env_sampling()
    torch.set_num_threads(1)
    if algorithm == "ppo":
        one, last = ppo.train(ppo_config(tmp_path / "one")), "update-000003"
    elif algorithm == "grpo":
        one, last = grpo.train(grpo_config(tmp_path / "one")), "update-000002"
    elif algorithm == "sft":  # 6 demonstration steps in batches of 4: each epoch's last batch (2) gives each rank one
        one, last = sft.train(sft_config(tmp_path / "one", two_processes / "demos")), "update-000004"
    elif algorithm == "dpo":  # 4 pairs, 1 held out: each epoch is one batch of 3, split 2 + 1 over the ranks
        one, last = dpo.train(dpo_config(tmp_path / "one", two_processes / "pairs")), "update-000002"
    else:  # rank 0 plays each round alone; both ranks train on it
        one, last = dpo.train(iterated_dpo_config(tmp_path / "one")), "update-000002"
    two = two_processes / algorithm
    expected, actual = parameters(one / "checkpoints" / last), parameters(two / "checkpoints" / last)
    start = load_policy("tiny", **{k: v for k, v in dataclasses.asdict(TINY).items() if k != "model"})
    moved = [name for name, p in start.named_parameters() if not torch.equal(p.detach(), expected[name])]
    assert any("lora_" in name for name in moved), "the runs must train something for the comparison to mean anything"
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, atol=1e-5, rtol=0, msg=name)
    one_rows, two_rows = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert [r["global_step"] for r in two_rows] == [r["global_step"] for r in one_rows]
    for a, b in zip(without_timing(one_rows), without_timing(two_rows)):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], abs=1e-5, nan_ok=True), key
    state = torch.load(two / "checkpoints" / last / "trainer.pt", weights_only=False)
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    assert json.loads((two / "config.json").read_text())["world_size"] == 2
    assert json.loads((one / "config.json").read_text())["world_size"] == 1
    if algorithm in ("ppo", "grpo"):
        assert [r["runner"]["num_envs"] for r in state["ranks"]] == [2, 2]


def test_bf16_lora_gradient_checkpointing_and_sdpa_train_under_ddp(two_processes):
    """The GPU options, under two processes: bfloat16 weights, float32 LoRA adapters and value head (so their
    optimizer states are float32 too), gradient checkpointing, SDPA attention; with a KL penalty to the
    LoRA-off reference."""
    policy = load_policy(str(two_processes / "bf16" / "checkpoints" / "update-000001" / "policy"))
    assert policy.config.dtype == "bfloat16" and policy.config.gradient_checkpointing
    start = load_policy("tiny", **{k: v for k, v in dataclasses.asdict(TINY).items() if k != "model"})
    before = dict(start.named_parameters())
    trained = {name: p for name, p in policy.named_parameters() if p.requires_grad}
    assert {str(p.dtype) for p in trained.values()} == {"torch.float32"}
    assert any(not torch.equal(p.detach(), before[name].detach()) for name, p in trained.items() if "lora_B" in name)
    state = torch.load(two_processes / "bf16" / "checkpoints" / "update-000001" / "trainer.pt", weights_only=False)
    dtypes = {str(v.dtype) for entry in state["optimizer"]["state"].values() for v in entry.values() if v.dim()}
    assert dtypes == {"torch.float32"}
    assert read_metrics(two_processes / "bf16" / "metrics.jsonl")[-1]["losses/kl_ref"] >= 0


# --- FSDP: the same runs, sharded -----------------------------------------------------------------------------

LAST = {"ppo": "update-000003", "grpo": "update-000002", "sft": "update-000004", "dpo": "update-000002"}
LAST["dpo-rounds"] = "update-000002"


def fsdp_jobs(two_processes: Path, out: Path, algorithms: list[str]) -> list[tuple[str, object]]:
    configs = {
        "ppo": lambda: ("ppo", ppo_config(out / "ppo")),
        "grpo": lambda: ("grpo", grpo_config(out / "grpo")),
        "sft": lambda: ("sft", sft_config(out / "sft", two_processes / "demos")),
        "dpo": lambda: ("dpo", dpo_config(out / "dpo", two_processes / "pairs")),
        "dpo-rounds": lambda: ("dpo", iterated_dpo_config(out / "dpo-rounds")),
    }
    return [configs[name]() for name in algorithms]


def assert_same_run(actual: Path, expected: Path, last: str, atol: float = 1e-5) -> None:
    """Two runs' checkpoint ``last`` (parameters and the optimizer's state) and metrics agree within ``atol``."""
    expected_parameters, actual_parameters = (parameters(run / "checkpoints" / last) for run in (expected, actual))
    for name, value in expected_parameters.items():
        torch.testing.assert_close(actual_parameters[name], value, atol=atol, rtol=0, msg=name)
    states = [torch.load(run / "checkpoints" / last / "trainer.pt", weights_only=False) for run in (expected, actual)]
    [expected_optimizer, actual_optimizer] = [state["optimizer"] for state in states]
    assert actual_optimizer["param_groups"] == expected_optimizer["param_groups"]
    assert actual_optimizer["state"].keys() == expected_optimizer["state"].keys()
    for index, entry in expected_optimizer["state"].items():
        for key, value in entry.items():
            torch.testing.assert_close(actual_optimizer["state"][index][key], value, atol=atol, rtol=0)
    for a, b in zip(*(without_timing(read_metrics(run / "metrics.jsonl")) for run in (expected, actual)), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], abs=atol, nan_ok=True), key


@pytest.fixture(scope="module")
def fsdp_processes(two_processes):
    """The PPO and offline DPO runs of ``two_processes`` again, sharded with FSDP2 (what fsdp.yaml sets)."""
    out = two_processes / "fsdp"
    finish(launch(two_processes, fsdp_jobs(two_processes, out, ["ppo", "dpo"]), "fsdp", environment=FSDP))
    return out


@pytest.mark.parametrize("algorithm", ["ppo", "dpo"])
def test_fsdp_gives_the_parameters_of_ddp_and_a_checkpoint_one_process_loads(two_processes, fsdp_processes, algorithm):
    """Sharded, the runs compute what DDP computes (which is what one process computes): acting on gathered
    whole parameters, micro-batches padded to the same count on every rank, the gradient reduce-scattered.
    Their checkpoints hold the whole policy and optimizer state, so one process evaluates them."""
    from agents.evaluation import evaluate_checkpoint

    assert_same_run(fsdp_processes / algorithm, two_processes / algorithm, LAST[algorithm])
    result = evaluate_checkpoint(str(fsdp_processes / algorithm), episodes=2, device="cpu")
    assert 0 <= result["success_rate"] <= 1


@pytest.mark.slow
def test_fsdp_runs_every_algorithm_and_resumes_as_ddp_does(two_processes, tmp_path):
    """GRPO, SFT and iterated DPO sharded agree with DDP; an FSDP run resumed from a checkpoint (its optimizer
    state re-sharded) goes on as a DDP run resumed from the same checkpoint does. (The two are compared with
    each other, not with the run that was never stopped: the test's per-env sampling seeds restart with the
    resumed process.)"""
    import shutil

    out = tmp_path / "fsdp"
    finish(launch(tmp_path, fsdp_jobs(two_processes, out, ["grpo", "sft", "dpo-rounds"]), "fsdp", environment=FSDP))
    for algorithm in ("grpo", "sft", "dpo-rounds"):
        assert_same_run(out / algorithm, two_processes / algorithm, LAST[algorithm])
    resumed = {}
    for name, environment in (("ddp", {}), ("fsdp", FSDP)):
        resumed[name] = shutil.copytree(two_processes / "ppo", tmp_path / f"resumed-{name}")
        shutil.rmtree(resumed[name] / "checkpoints" / "update-000003")
        job = [("ppo", ppo_config(None, resume=str(resumed[name])))]
        finish(launch(tmp_path, job, f"resume-{name}", environment=environment))
    assert_same_run(resumed["fsdp"], resumed["ddp"], "update-000003")


def test_a_killed_two_process_run_resumes_exactly(two_processes, tmp_path):
    run_dir = tmp_path / "killed"
    process = launch(tmp_path, [("ppo", ppo_config(run_dir))], "killed")
    deadline = time.time() + 180
    while not (run_dir / "checkpoints" / "update-000001").exists() and process.poll() is None:
        assert time.time() < deadline, "the run never wrote its first checkpoint"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    # Else the resumed run would have nothing left to do, and the comparison below would prove nothing.
    assert not (run_dir / "checkpoints" / "update-000003").exists(), "the kill came after the run had ended"
    process.communicate()
    finish(launch(tmp_path, [("ppo", ppo_config(None, resume=str(run_dir)))], "resumed"))
    straight = two_processes / "ppo"
    expected, actual = (
        parameters(straight / "checkpoints/update-000003"),
        parameters(run_dir / "checkpoints/update-000003"),
    )
    for name, value in expected.items():
        assert torch.equal(actual[name], value), name
    assert without_timing(read_metrics(run_dir / "metrics.jsonl")) == without_timing(
        read_metrics(straight / "metrics.jsonl")
    )


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["crash", "hang"])
def test_a_rank_that_crashes_or_hangs_stops_the_run_and_leaves_the_checkpoint(tmp_path, fault):
    """A crash: the launcher stops the other rank and names the one that failed. A hang: the other rank's
    next collective fails after collective_timeout_s. Either way the run ends and checkpoint 1 is intact."""
    from agents.checkpoint import verify_checkpoint

    run_dir = tmp_path / "run"
    start = time.time()
    process = launch(tmp_path, [("ppo", ppo_config(run_dir, collective_timeout_s=20))], fault, fault=fault)
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0
    if fault == "crash":
        assert "injected crash on rank 1" in output and "rank      : 1" in output, output[-3000:]
    else:
        assert "Rank 0 waited 20 s" in output and "Ranks 1 failed to pass monitoredBarrier" in output, output[-3000:]
    assert verify_checkpoint(run_dir / "checkpoints" / "update-000001") is None
    assert not (run_dir / "checkpoints" / "update-000002").exists()
    print(f"{fault}: the run ended after {time.time() - start:.0f} s")


def test_a_two_process_run_resumes_with_two_processes_only(two_processes, tmp_path):
    import shutil

    copy = shutil.copytree(two_processes / "ppo", tmp_path / "ppo")
    with pytest.raises(ConfigError, match=r"written by 2 process\(es\); resume it with as many .* not 1"):
        from agents.ppo import train

        train(ppo_config(None, resume=str(copy), total_env_steps=32))


# --- what cannot run -----------------------------------------------------------------------------------------


def test_a_world_size_that_does_not_divide_the_envs_or_groups_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"3 processes cannot share num_envs=4 envs"):
        ppo_config(tmp_path).check_world_size(3)
    with pytest.raises(ConfigError, match=r"2 processes cannot share 1 GRPO groups .*multiple of group_size \* 2 = 8"):
        grpo_config(tmp_path, group_size=4).check_world_size(2)
    ppo_config(tmp_path).check_world_size(2)


@pytest.mark.parametrize(
    ("environment", "message"),
    [
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "FSDP version 1; vlmrl shards with FSDP2 only"),
        ({**FSDP, "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}, "fsdp_cpu_ram_efficient_loading: true"),
        ({**FSDP, "FSDP_OFFLOAD_PARAMS": "true"}, "fsdp_offload_params: true is not supported"),
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "DeepSpeed"),
    ],
)
def test_fsdp_settings_and_deepspeed_configs_that_cannot_run_are_refused_with_what_to_do(
    monkeypatch, environment, message
):
    from agents.parallel import check_distributed_type

    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=message) as refused:
        check_distributed_type()
    assert "configs/accelerate/" in str(refused.value)


def test_a_one_process_deepspeed_launch_is_refused_too_not_run_without_its_config(tmp_path, monkeypatch):
    """``accelerate launch --num_processes 1`` with a DeepSpeed config starts one process (WORLD_SIZE=1)."""
    from agents.ppo import train

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match=r"DeepSpeed \(ZeRO-2\) is not supported|DeepSpeed, which is not installed"):
        train(ppo_config(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_shipped_accelerate_configs_are_valid(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "configs" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.name == {"ddp": "MULTI_GPU", "fsdp": "FSDP"}.get(name, "DEEPSPEED")
    if name.startswith("deepspeed"):
        assert config.deepspeed_config["zero_stage"] == int(name[-1])
    if name == "fsdp":  # the settings check_distributed_type accepts
        fsdp = config.fsdp_config
        assert fsdp["fsdp_version"] == 2 and not fsdp["fsdp_cpu_ram_efficient_loading"]
        assert not fsdp["fsdp_offload_params"]


# --- GPU readiness, checked on CPU --------------------------------------------------------------------------------


def test_out_of_memory_stops_with_the_next_micro_batch_size_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    from agents.checkpoint import verify_checkpoint
    from agents.optim import OutOfMemory
    from agents.policy import VLMPolicy
    from agents.ppo import train

    real_forward, calls = VLMPolicy.forward, []

    def forward(self, completions, temperature=None):
        if torch.is_grad_enabled():
            calls.append(len(completions))
            if len(calls) > 8:  # update 1: 2 epochs x 2 minibatches x 2 micro-batches fit; update 2 does not
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_forward(self, completions, temperature)

    monkeypatch.setattr(VLMPolicy, "forward", forward)
    run_dir = tmp_path / "run"
    with pytest.raises(OutOfMemory) as stopped:
        train(ppo_config(run_dir))
    message = str(stopped.value)
    assert "micro_batch_size=2" in message and f"--resume {run_dir} --micro-batch-size 1" in message, message
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("update-*"))
    assert checkpoints == ["update-000001"] and verify_checkpoint(run_dir / "checkpoints" / "update-000001") is None
    monkeypatch.setattr(VLMPolicy, "forward", real_forward)
    train(ppo_config(None, resume=str(run_dir), micro_batch_size=1), defaults=ppo_config(None))
    assert [r["global_step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [8, 16, 24]


def test_bench_gpu_dry_run_prints_a_table_and_writes_json(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "scripts" / "bench_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--dry-run", "--out", str(tmp_path / "bench.json")])
    assert json.loads((tmp_path / "bench.json").read_text()) == json.loads(json.dumps(result))
    assert [g["batch"] for g in result["generation"]] == [1, 4, 8] and all(
        g["tokens_per_s"] > 0 for g in result["generation"]
    )
    assert [u["algorithm"] for u in result["updates"]] == ["ppo", "grpo"] and result["updates"][0]["mfu"] is None
    assert result["training"]["env_steps"] == 4
    assert "| generation batch 8" in capsys.readouterr().out
