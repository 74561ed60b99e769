"""GPU benchmark of a real-size policy with random weights: generation, updates, memory, a short training run.

The model is built from a real architecture's config (no download): ``qwen2-vl-2b`` (Qwen2-VL-2B-Instruct,
~2.2 B parameters) or ``qwen2.5-vl-3b`` (Qwen2.5-VL-3B-Instruct, ~3.8 B), with the config values written out
below, the shipped tiny tokenizer (ids fit the real vocabulary size, so the embedding and LM head have their
real shapes) and random weights. It measures:

* ``act`` (batched generation, our logits processor included) in generated tokens/s at batch 1, 16 and 64,
  against the memory-bandwidth bound: each decoding step reads every language-model weight once, so at most
  ``batch * bandwidth / weight bytes`` tokens/s (the KV cache and activations only lower it);
* a PPO and a GRPO update (the real loss functions and guarded optimizer step) in samples/s and model FLOPs
  utilisation, ``6 * N * tokens`` FLOPs (N: all parameters; tokens: prompt + answer per sample) over the
  device's dense bf16 peak. With LoRA the backward pass skips the frozen weights' gradients (~4N), so this
  MFU is an upper estimate of the work done;
* peak GPU memory;
* end-to-end env steps/s of a short PPO run on GridWorld through ``agents.ppo.train``.

It prints a table and writes JSON (``--out``). ``--dry-run`` runs the tiny preset on CPU with small batches,
in well under a minute, so the script is tested; its numbers say nothing about a GPU (the bounds are n/a).

vLLM is not wired: ``act`` decodes through Hugging Face ``generate`` with a logits processor that applies
the answer grammar (constrained decoding) and records each token's log-prob under the sampling
distribution, which PPO's ratios need. A vLLM backend needs both (a guided-decoding grammar equal to ours,
and per-token log-probs of the processed distribution) behind the same ``act`` interface.

    python scripts/bench_gpu.py --model qwen2-vl-2b --device cuda --out bench_gpu.json
    python scripts/bench_gpu.py --dry-run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: Peak HBM bandwidth (bytes/s) and dense bf16 tensor FLOP/s, from the vendors' data sheets. The first name
#: found in ``torch.cuda.get_device_name()`` wins (so the PCIe parts come before their SXM siblings).
DEVICE_PEAKS: dict[str, tuple[float, float]] = {
    "H200": (4.8e12, 989e12),
    "H100 PCIe": (2.0e12, 756e12),
    "H100": (3.35e12, 989e12),  # SXM
    "A100-SXM4-80GB": (2.039e12, 312e12),
    "A100": (1.555e12, 312e12),  # 40 GB
}

#: Real architectures' config values (the published config.json of each model). Token ids come from the
#: tiny tokenizer; the vocabulary size is the real one.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "qwen2-vl-2b": {
        "family": "qwen2_vl",
        "text": dict(
            vocab_size=151936,
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        ),
        "vision": dict(
            depth=32,
            embed_dim=1280,
            mlp_ratio=4,
            num_heads=16,
            hidden_size=1536,
            in_channels=3,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),  # fmt: skip
    },
    "qwen2.5-vl-3b": {
        "family": "qwen2_5_vl",
        "text": dict(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            max_position_embeddings=128000,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        ),
        "vision": dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            out_hidden_size=2048,
            in_channels=3,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
        ),  # fmt: skip
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2-vl-2b", help=f"{', '.join(ARCHITECTURES)}, or a tiny preset")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, eager, flash_attention_2)")
    parser.add_argument("--lora-rank", type=int, default=64, help="0: full fine-tuning")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--batches", default="1,16,64", help="generation batch sizes")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224, help="observation images are this square size")
    parser.add_argument("--update-samples", type=int, default=64, help="samples per benchmarked update")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--train-envs", type=int, default=16, help="envs of the end-to-end PPO run (0: skip it)")
    parser.add_argument("--out", default="bench_gpu.json")
    parser.add_argument("--dry-run", action="store_true", help="tiny preset on CPU, small batches (a test)")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.model, args.device, args.dtype, args.attn = "tiny", "cpu", "float32", None
        args.batches, args.max_new_tokens, args.image_size = "1,4,8", 16, 64
        args.update_samples, args.micro_batch_size, args.train_envs, args.lora_rank = 8, 4, 2, 8
    return args


def build_policy(args: argparse.Namespace):
    """The policy: a tiny preset through ``load_policy``, or a real architecture with random weights."""
    from agents.policy import load_policy

    options = dict(
        prompt_style="cot", constrained=False, temperature=1.0, max_new_tokens=args.max_new_tokens,
        lora_rank=args.lora_rank, dtype=args.dtype, device=args.device, attn_implementation=args.attn,
        gradient_checkpointing=args.gradient_checkpointing,
    )  # fmt: skip
    if args.model not in ARCHITECTURES:
        return load_policy(args.model, **options)
    # A directory that load_policy reads like any downloaded model: config, random weights, processor.
    model, processor = _random_model(args.model, args.image_size, args.device)
    directory = Path(tempfile.mkdtemp(prefix=f"bench-{args.model}-"))
    model.to(getattr(torch, args.dtype)).save_pretrained(directory)
    processor.save_pretrained(directory)
    del model
    policy = load_policy(str(directory), **options)
    policy.config = dataclasses.replace(policy.config, model=str(directory))
    return policy


def _random_model(name: str, image_size: int, device: str):
    from transformers import AutoModelForImageTextToText, Qwen2VLImageProcessorPil

    from agents.models import _qwen2vl_processor_class, _qwen25vl_processor_class, tiny_chat_template, tiny_tokenizer

    arch = ARCHITECTURES[name]
    tokenizer = tiny_tokenizer("<|image_pad|>")
    tok = tokenizer.convert_tokens_to_ids
    text = dict(arch["text"], pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    text["eos_token_id"] = tokenizer.eos_token_id
    if arch["family"] == "qwen2_vl":
        from transformers import Qwen2VLConfig as Config

        processor_class = _qwen2vl_processor_class()
    else:
        from transformers import Qwen2_5_VLConfig as Config

        processor_class = _qwen25vl_processor_class()
    config = Config(
        text_config=text,
        vision_config=arch["vision"],
        image_token_id=tok("<|image_pad|>"),
        video_token_id=tok("<|video_pad|>"),
        vision_start_token_id=tok("<|vision_start|>"),
        vision_end_token_id=tok("<|vision_end|>"),
    )
    with torch.device(device):  # random init where the model will run (a 2 B model initialises slowly on CPU)
        model = AutoModelForImageTextToText.from_config(config)
    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=pixels, max_pixels=pixels, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    processor = processor_class(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tiny_chat_template("<|image_pad|>")
    )
    return model, processor


def device_peaks(device: torch.device) -> tuple[str, float | None, float | None]:
    if device.type != "cuda":
        return "cpu", None, None
    name = torch.cuda.get_device_name(device)
    for key, (bandwidth, flops) in DEVICE_PEAKS.items():
        if key in name:
            return name, bandwidth, flops
    return name, None, None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def observations(count: int, size: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {"image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "text": f"Step {i}."} for i in range(count)
    ]


def bench_generation(policy, spec, batches: list[int], args, weight_bytes: int, bandwidth: float | None) -> list:
    rows = []
    for batch in batches:
        obs = observations(batch, args.image_size, seed=batch)
        # Warm-up at this batch size: the first call of a shape pays one-time costs (lazy imports, kernel
        # selection), which on an H200 made batch 16 slower per step than batch 64.
        policy.act(obs, spec)
        _sync(policy.device)
        start = time.perf_counter()
        completions = policy.act(obs, spec)
        _sync(policy.device)
        seconds = time.perf_counter() - start
        tokens = sum(len(c.response_ids) for c in completions)
        bound = batch * bandwidth / weight_bytes if bandwidth else None
        rows.append(
            {
                "batch": batch,
                "tokens": tokens,
                "seconds": seconds,
                "tokens_per_s": tokens / seconds,
                "bandwidth_bound_tokens_per_s": bound,
                "fraction_of_bound": (tokens / seconds) / bound if bound else None,
            }
        )
    return rows


def bench_update(policy, spec, args, algorithm: str, parameters: int, peak_flops: float | None) -> dict:
    """One optimizer step over ``update_samples`` samples with the algorithm's own loss."""
    from agents.grpo import GRPOConfig, grpo_losses
    from agents.optim import GuardedStep, make_optimizer
    from agents.ppo import PPOConfig, ppo_losses
    from agents.run import deferred_validation

    completions = []
    while len(completions) < args.update_samples:
        completions += policy.act(observations(min(16, args.update_samples), args.image_size, seed=7), spec)
    completions = completions[: args.update_samples]
    count = len(completions)
    old = torch.tensor([c.logprob for c in completions])
    values = torch.tensor([c.value for c in completions])
    advantages = torch.randn(count)
    with deferred_validation():
        config = PPOConfig() if algorithm == "ppo" else GRPOConfig()
    if algorithm == "grpo":
        policy.value_head.requires_grad_(False)

    def loss_fn(micro):
        chosen = [completions[i] for i in micro]
        if algorithm == "ppo":
            return ppo_losses(policy, chosen, old[micro], values[micro], advantages[micro], values[micro], None, config)
        return grpo_losses(policy, chosen, advantages[micro], None, config)

    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = make_optimizer(policy, 1e-6)
    step = GuardedStep(optimizer, trainable, 1.0, 5)
    order = np.arange(count)
    micro = [order[i : i + args.micro_batch_size] for i in range(0, count, args.micro_batch_size)]
    step.step(micro[:1], loss_fn)  # warm-up (allocates the optimizer state)
    _sync(policy.device)
    start = time.perf_counter()
    step.step(micro, loss_fn)
    _sync(policy.device)
    seconds = time.perf_counter() - start
    prompt_tokens = len(policy.encode([completions[0].prompt], [completions[0].image])["input_ids"][0])
    tokens = sum(prompt_tokens + len(c.response_ids) for c in completions)
    flops = 6 * parameters * tokens
    policy.value_head.requires_grad_(True)
    return {
        "algorithm": algorithm,
        "samples": count,
        "tokens": tokens,
        "seconds": seconds,
        "samples_per_s": count / seconds,
        "model_tflops_per_s": flops / seconds / 1e12,
        "mfu": flops / seconds / peak_flops if peak_flops else None,
    }


def bench_training(policy, args) -> dict | None:
    """Env steps/s of a short PPO run (one update) on GridWorld with this policy."""
    if not args.train_envs:
        return None
    from unittest import mock

    from agents.ppo import PPOConfig, train
    from agents.run import Run
    from agents.tracking import read_metrics

    with tempfile.TemporaryDirectory() as directory:
        config = PPOConfig(
            env_id="vlmrl/GridWorld-v0", num_envs=args.train_envs, num_steps=2, total_env_steps=2 * args.train_envs,
            minibatch_size=2 * args.train_envs, micro_batch_size=args.micro_batch_size, update_epochs=1,
            run_dir=str(Path(directory) / "run"), progress=False, sample_every=0, checkpoint_every=0,
            policy=dataclasses.replace(policy.config),
        )  # fmt: skip
        # The policy in memory stands in for the one the run would load (a random model has no hub id).
        with mock.patch.object(Run, "load_policy", lambda self: policy):
            run_dir = train(config)
        row = read_metrics(run_dir / "metrics.jsonl")[-1]
    return {"env_steps": row["global_step"], "env_steps_per_s": row["charts/env_steps_per_s"]}


def table(rows: list[tuple[str, str]]) -> str:
    """A Markdown table (README takes it as printed)."""
    width = max(len(name) for name, _ in rows)
    lines = [f"| {'measure'.ljust(width)} | result |", f"|{'-' * (width + 2)}|--------|"]
    return "\n".join(lines + [f"| {name.ljust(width)} | {value} |" for name, value in rows])


def main(argv: list[str] | None = None) -> dict:
    import envs

    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
    policy = build_policy(args)
    device = policy.device
    spec = envs.get_language("vlmrl/GridWorld-v0")
    parameters = sum(p.numel() for p in policy.model.parameters())
    # A decoding step reads the language model's weights (not the vision tower's, which ran once per image).
    weight_bytes = sum(
        p.numel() * p.element_size()
        for name, p in policy.model.named_parameters()
        if not any(part in name for part in ("visual", "vision", "multi_modal_projector"))
    )
    name, bandwidth, peak_flops = device_peaks(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batches = [int(b) for b in args.batches.split(",")]
    generation = bench_generation(policy, spec, batches, args, weight_bytes, bandwidth)
    updates = [bench_update(policy, spec, args, algorithm, parameters, peak_flops) for algorithm in ("ppo", "grpo")]
    peak_memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    training = bench_training(policy, args)
    result = {
        "model": args.model,
        "parameters": parameters,
        "dtype": args.dtype,
        "lora_rank": args.lora_rank,
        "device": name,
        "peak_bandwidth_bytes_per_s": bandwidth,
        "peak_bf16_flops": peak_flops,
        "generation": generation,
        "updates": updates,
        "peak_memory_bytes": peak_memory,
        "training": training,
        "dry_run": args.dry_run,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))

    def fmt(value: float | None, spec: str = ".1f", unit: str = "") -> str:
        return "n/a" if value is None else format(value, spec) + unit

    rows = [("model", f"{args.model} ({parameters / 1e6:.1f} M parameters, {args.dtype}, LoRA {args.lora_rank})")]
    rows.append(("device", name + (" (CPU dry run: bounds n/a)" if bandwidth is None else "")))
    for g in generation:
        bound = g["bandwidth_bound_tokens_per_s"]
        against = f"{100 * g['fraction_of_bound']:.1f}% of the {bound:.0f} bound" if bound else "bandwidth bound n/a"
        rows.append((f"generation batch {g['batch']}", f"{g['tokens_per_s']:.1f} tokens/s ({against})"))
    for u in updates:
        rows.append(
            (
                f"{u['algorithm']} update",
                f"{u['samples_per_s']:.1f} samples/s, {u['model_tflops_per_s']:.3f} TFLOP/s, MFU {fmt(u['mfu'] and 100 * u['mfu'], unit='%')}",
            )
        )
    rows.append(("peak memory", "n/a" if peak_memory is None else f"{peak_memory / 2**30:.1f} GiB"))
    if training:
        rows.append(("PPO training", f"{training['env_steps_per_s']:.1f} env steps/s ({training['env_steps']} steps)"))
    print(table(rows))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
