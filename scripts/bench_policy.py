"""Benchmark the policy: one batched ``act`` versus one ``act`` per observation, and ``evaluate``.

RL4VLM (https://arxiv.org/abs/2405.10292) generates one observation at a time; ``VLMPolicy.act`` answers a
whole batch in one ``generate`` call. This script measures what that buys, on the same observations:

* ``act``: generated answer tokens per second and observations per second, for one batched call of
  ``--batch-size`` observations and for ``--batch-size`` calls of one observation each (the speed-up is
  the ratio of observations per second);
* ``evaluate``: samples per second, forward only and forward + backward (what a PPO update does).

Observations come from ``vlmrl/GridWorld-v0`` and ``vlmrl/Blackjack-v0`` (half each, each with its own
language spec) when the environments import, else they are random 128x128 images. Every number is the
median of ``--repeats`` timed runs after one warm-up run::

    python scripts/bench_policy.py --preset tiny --batch-size 8 --max-new-tokens 64 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from agents.models import PRESETS
from agents.policy import Completion, VLMPolicy, load_policy
from envs.language import LanguageSpec


@dataclass
class Timing:
    """Median seconds of one run, and what one run produced."""

    seconds: float
    observations: int
    tokens: int
    valid: int

    @property
    def observations_per_s(self) -> float:
        return self.observations / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", help=f"model preset or path ({', '.join(PRESETS)})")
    parser.add_argument("--batch-size", type=int, default=8, help="observations per batched act")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="generation budget per answer")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--device", default="auto", help='"auto", "cpu", "cuda", "cuda:1"...')
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--prompt-style", default="cot", choices=["cot", "action"])
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads; default 1 on CPU (a tiny model's small matmuls gain nothing from more, "
        "and on a busy machine their OpenMP threads wait on one another: 10-50x slower), torch's own on CUDA",
    )
    parser.add_argument("--synthetic", action="store_true", help="random images even if the envs import")
    return parser.parse_args()


def observations_and_specs(batch_size: int, synthetic: bool) -> tuple[list[dict], list[LanguageSpec], str]:
    """``batch_size`` observations with one language spec each, and where they came from."""
    if not synthetic:
        try:
            import gymnasium as gym

            import envs

            observations, specs = [], []
            env_ids = ["vlmrl/GridWorld-v0", "vlmrl/Blackjack-v0"]
            for index in range(batch_size):
                env_id = env_ids[index % len(env_ids)]
                env = gym.make(env_id)
                observation, _ = env.reset(seed=index)
                env.close()
                observations.append(observation)
                specs.append(envs.get_language(env_id))
            return observations, specs, " + ".join(env_ids)
        except Exception as error:  # the envs are optional here: fall back to random images
            print(f"(envs unavailable: {type(error).__name__}: {error}; using random images)")
    rng = np.random.default_rng(0)
    spec = LanguageSpec("Win the hand of blackjack.", ("stand", "hit"))
    observations = [
        {"image": rng.integers(0, 256, (128, 128, 3), dtype=np.uint8), "text": f"Your sum is {10 + i}."}
        for i in range(batch_size)
    ]
    return observations, [spec] * batch_size, "random 128x128 images"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Callable[[int], tuple[int, int, int]], repeats: int, device: torch.device) -> Timing:
    """Median over ``repeats`` runs (after one warm-up) of ``run(seed) -> (observations, tokens, valid)``."""
    run(-1)
    results = []
    for repeat in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        counts = run(repeat)
        synchronize(device)
        results.append((time.perf_counter() - start, counts))
    seconds = statistics.median(seconds for seconds, _ in results)
    observations, tokens, valid = (statistics.median(counts[i] for _, counts in results) for i in range(3))
    return Timing(seconds, int(observations), int(tokens), int(valid))


def act_counts(completions: list[Completion]) -> tuple[int, int, int]:
    return len(completions), sum(len(c.response_ids) for c in completions), sum(c.valid for c in completions)


def bench_act(policy: VLMPolicy, observations, specs, repeats: int) -> tuple[Timing, Timing]:
    def batched(seed: int) -> tuple[int, int, int]:
        torch.manual_seed(seed)
        return act_counts(policy.act(observations, specs))

    def one_at_a_time(seed: int) -> tuple[int, int, int]:
        torch.manual_seed(seed)
        completions = []
        for observation, spec in zip(observations, specs, strict=True):
            completions += policy.act([observation], spec)
        return act_counts(completions)

    return timed(batched, repeats, policy.device), timed(one_at_a_time, repeats, policy.device)


def bench_evaluate(policy: VLMPolicy, completions: list[Completion], repeats: int) -> tuple[Timing, Timing]:
    tokens = sum(len(c.response_ids) for c in completions)
    counts = (len(completions), tokens, sum(c.valid for c in completions))

    def forward(seed: int) -> tuple[int, int, int]:
        with torch.no_grad():
            policy.evaluate(completions)
        return counts

    def forward_backward(seed: int) -> tuple[int, int, int]:
        evaluation = policy.evaluate(completions)
        loss = -evaluation.logprob.mean() + evaluation.value.pow(2).mean()
        loss.backward()
        policy.zero_grad(set_to_none=True)
        return counts

    return timed(forward, repeats, policy.device), timed(forward_backward, repeats, policy.device)


def main() -> None:
    args = parse_args()
    on_cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    if args.threads is not None or on_cpu:
        torch.set_num_threads(args.threads or 1)
    observations, specs, source = observations_and_specs(args.batch_size, args.synthetic)
    rows = []
    speedups = []
    for constrained in (True, False):
        policy = load_policy(
            args.preset,
            device=args.device,
            dtype=args.dtype,
            max_new_tokens=args.max_new_tokens,
            prompt_style=args.prompt_style,
            constrained=constrained,
        )
        mode = "constrained" if constrained else "unconstrained"
        batched, sequential = bench_act(policy, observations, specs, args.repeats)
        speedup = batched.observations_per_s / sequential.observations_per_s
        speedups.append(speedup)
        for pattern, timing, ratio in (
            (f"batched x{args.batch_size}", batched, f"**{speedup:.1f}x**"),
            ("one at a time (RL4VLM)", sequential, "1.0x"),
        ):
            rows.append(
                f"| act, {mode} | {pattern} | {timing.observations_per_s:.1f} | {timing.tokens_per_s:.0f} | "
                f"{timing.tokens / timing.observations:.1f} | {timing.valid}/{timing.observations} | "
                f"{timing.seconds * 1000:.0f} | {ratio} |"
            )
        torch.manual_seed(0)
        completions = policy.act(observations, specs)
        forward, forward_backward = bench_evaluate(policy, completions, args.repeats)
        for pattern, timing in (("forward", forward), ("forward + backward", forward_backward)):
            rows.append(
                f"| evaluate, {mode} | {pattern} | {timing.observations_per_s:.1f} | {timing.tokens_per_s:.0f} | "
                f"{timing.tokens / timing.observations:.1f} | | {timing.seconds * 1000:.0f} | |"
            )

    device = policy.device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"\npreset={args.preset} family={policy.family.name} device={device} ({device_name}) dtype={args.dtype} "
        f"threads={torch.get_num_threads()} batch={args.batch_size} max_new_tokens={args.max_new_tokens} "
        f"style={args.prompt_style} repeats={args.repeats} (median) observations: {source}\n"
    )
    print("| what | pattern | samples/s | answer tokens/s | tokens/answer | valid | ms/run | speed-up |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    print(f"\nbatched act speed-up over one-at-a-time: {', '.join(f'{s:.1f}x' for s in speedups)} (target >= 4x)")


if __name__ == "__main__":
    main()
