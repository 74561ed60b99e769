"""Benchmark acting: the action-head policy (one forward pass) against the text policy (generation).

The same backbone (``--preset``, same init seed, LoRA rank 8) answers the same batch of Reach
observations (``--image-size`` px, the experiment's 128 by default):

* ``text, action answers``: ``VLMPolicy.act`` under constrained decoding, answers that are a bare action
  name (PPO's CPU default: the shortest answers the text policy writes);
* ``text, CoT answers``: the same with chain-of-thought JSON answers (``--max-new-tokens`` caps them; an
  untrained model writes until the cap or until its JSON closes);
* ``action head, continuous`` and ``action head, discrete``: ``VLAPolicy.act``, one forward pass of the
  prompt with ``logits_to_keep=1``, then the heads.

Each number is the median of ``--repeats`` timed calls after one warm-up call, in observations per second
(environment steps the policy can answer per second, the env's own time not included)::

    OMP_NUM_THREADS=1 python scripts/bench_vla.py --batch-size 8 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import gymnasium as gym
import torch

import envs
from agents.policy import PolicyConfig, load_policy
from agents.vla import build_vla_policy, head_config_for

ENV_ID = "vlmrl/Reach-v0"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", help="model preset or path")
    parser.add_argument("--batch-size", type=int, default=8, help="observations per act call")
    parser.add_argument("--image-size", type=int, default=128, help="Reach's rendered image side (px)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="generation budget of the CoT answers")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per policy (median reported)")
    parser.add_argument("--device", default="cpu", help='"cpu", "cuda"...')
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    return parser.parse_args()


def timed(act, observations, repeats: int) -> float:
    """Median seconds of one ``act(observations)`` call, after a warm-up call."""
    act(observations)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        act(observations)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    env = gym.make(ENV_ID, image_size=args.image_size)
    observations = [env.reset(seed=seed)[0] for seed in range(args.batch_size)]
    env.close()
    spec = envs.get_language(ENV_ID)
    backbone = dict(model=args.preset, lora_rank=8, device=args.device)
    policies = {
        "text, action answers": load_policy(
            args.preset, prompt_style="action", constrained=True, temperature=1.0, lora_rank=8, device=args.device
        ),
        "text, CoT answers": load_policy(
            args.preset,
            prompt_style="cot",
            constrained=True,
            temperature=1.0,
            lora_rank=8,
            device=args.device,
            max_new_tokens=args.max_new_tokens,
        ),  # fmt: skip
        "action head, continuous": build_vla_policy(
            PolicyConfig(**backbone), head_config_for(ENV_ID, {"image_size": args.image_size}, "continuous")
        ),
        "action head, discrete": build_vla_policy(
            PolicyConfig(**backbone), head_config_for(ENV_ID, {"image_size": args.image_size}, "discrete")
        ),
    }
    results = {}
    for name, policy in policies.items():
        seconds = timed(lambda batch, p=policy: p.act(batch, spec), observations, args.repeats)
        results[name] = {"seconds_per_call": seconds, "observations_per_s": args.batch_size / seconds}
    base = results["text, action answers"]["observations_per_s"]
    print(
        f"{args.preset}, batch {args.batch_size}, Reach {args.image_size} px, {args.device}, torch threads {torch.get_num_threads()}"
    )
    print("| policy | ms per act call | observations/s | vs text, action answers |")
    print("|---|---|---|---|")
    for name, result in results.items():
        print(
            f"| {name} | {1000 * result['seconds_per_call']:.1f} | {result['observations_per_s']:.1f} | "
            f"{result['observations_per_s'] / base:.1f}x |"
        )
    if args.out:
        with open(args.out, "w") as file:
            json.dump({"args": vars(args), "results": results}, file, indent=2)


if __name__ == "__main__":
    main()
