"""Direct preference optimisation (DPO) of the policy on preference pairs, offline or iterated online.

Read top to bottom: the config, the pairs (a pair set from ``vlmrl pairs`` -> each answer as the policy's
own ``completions_for`` writes it, so prompt, chat template, token spelling and constraints are ``act``'s),
the reference, the loss of one micro-batch, and ``train``.

* Loss: DPO (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290), IPO (Azar et al. 2023,
  https://arxiv.org/abs/2310.12036) or SLiC's hinge (``agents.losses.dpo_loss``), on the answers'
  log-probs at temperature 1 (the model's likelihood, never the sampling temperature): the whole answer's
  summed token log-probs, or (``logprob=weighted``) the lambda-weighted thoughts + action log-prob PPO
  uses (RL4VLM). ``rpo_alpha > 0`` adds the chosen answer's per-token NLL (RPO, Pang et al. 2024,
  https://arxiv.org/abs/2404.19733), which keeps the chosen answers' likelihood from falling.
* Reference: the starting weights, frozen. Under LoRA with a fresh adapter that is the policy with its
  adapter switched off (``reference_logprobs``; no second copy). Otherwise (full fine-tuning, or a start
  that already carries a trained adapter) a frozen policy loaded from ``config.policy``: a checkpoint
  directory, or a preset, whose random weights are rebuilt from ``init_seed``, so a preset's reference is
  exactly the weights training starts from. A resumed run reloads the same start, so its reference is the
  original run's. The reference log-probs of the pairs are computed once, before training.
* Offline (``rounds=0``): ``epochs`` passes over ``--pairs`` in shuffled minibatches; one update is one
  optimizer step; a ``held_out_fraction`` of the pairs is kept apart for ``dpo/heldout_accuracy``.
* Iterated online DPO (``rounds > 0``; Xiong et al. 2024, https://arxiv.org/abs/2312.11456; Pang et al.
  2024): one update is one round: play ``episodes_per_round`` episodes with the current policy
  (``group_size`` episodes per seed, so answers meet at the same states), label and pair them
  (``agents.pairs``, mode ``round_pair_mode``), then ``round_epochs`` passes of DPO over the round's pairs.
  The round's store is kept in ``<run dir>/rounds/round-NNNN``.
* Under a launcher (``agents/parallel.py``) each rank computes the gradient of its slice of every minibatch,
  as SFT does, so several processes give the parameters of one with the same ``batch_size``; each rank
  computes the reference log-probs of every pair itself. Rank 0 alone measures the held-out pairs and, in
  iterated DPO, plays each round (as one process would) while the others wait, then every rank reads the
  round's store.

    vlmrl collect gridworld --model runs/<sft run> --episodes 100 --out data/policy   # twice: same seeds
    vlmrl pairs data/policy --mode step --out data/pairs
    vlmrl train gridworld --algo dpo --pairs data/pairs --model runs/<sft run>
    vlmrl train gridworld --algo dpo --rounds 10 --episodes-per-round 32 --model runs/<sft run>
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from agents.errors import ConfigError
from agents.losses import dpo_loss, token_mean_nll
from agents.optim import GuardedStep, LossTotals, make_optimizer, set_learning_rate
from agents.policy import Completion, VLMPolicy
from agents.run import Run, RunConfig, eval_metrics
from agents.sft import Batches


@dataclass
class DPOConfig(RunConfig):
    """DPO's options on top of every run's (:class:`~agents.run.RunConfig`). Defaults suit full fine-tuning
    of the tiny preset; with LoRA on a pretrained model use a rate around 5e-6 (TRL's default 1e-6)."""

    pairs: str = ""
    """Pair set to learn from (``vlmrl pairs STORE --out PATH``). Not used with ``rounds > 0``."""
    beta: float = 0.1
    """Strength of the pull toward the reference (DPO's beta; TRL: 0.1). For IPO, the target margin is
    ``1 / (2 beta)``."""
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    """``sigmoid``: DPO; ``ipo``: IPO's squared loss; ``hinge``: SLiC's hinge loss."""
    rpo_alpha: float = 0.0
    """Weight of the chosen answers' per-token NLL added to the loss (RPO; the paper uses 1.0); 0: off."""
    logprob: Literal["answer", "weighted"] = "answer"
    """Log-prob of an answer: ``answer``, the sum of its tokens' log-probs (DPO); ``weighted``, the
    lambda-weighted thoughts + action log-prob PPO uses (``--thought-weight``)."""
    skip_unwritable: bool = False
    """Leave out (with a warning) the pairs with an answer this policy's decoding could never write, e.g. an
    invalid answer under ``--constrained``; else such a pair stops the run before training."""
    held_out_fraction: float = 0.1
    """Fraction of the pairs (random, fixed by ``seed``) kept out of training to measure
    ``dpo/heldout_accuracy``; 0: none. Iterated DPO holds out this share of each round's pairs (none from a
    round with fewer than two) and measures them after the round's training."""
    epochs: int = 3
    """Passes over the pairs (offline). On resume, a larger value extends the run."""
    batch_size: int = 16
    """Pairs per optimizer step."""
    micro_batch_size: int = 8
    """Pairs per forward/backward pass (each is two answers); gradients accumulate over a batch."""
    learning_rate: float = 1e-4
    """AdamW learning rate (full fine-tuning of the tiny preset)."""
    anneal_lr: bool = True
    """Linearly anneal the learning rate to 0 over the run."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    max_nonfinite_steps: int = 5
    """Abort after this many optimizer steps in a row with a non-finite loss or gradient."""
    eval_every: int = 0
    """Greedy evaluation on held-out seeds (and the held-out pairs) every this many updates; 0: only at the end."""
    rounds: int = 0
    """Iterated online DPO: rounds of collect -> pair -> DPO (one update each); 0 trains on ``--pairs`` offline."""
    episodes_per_round: int = 32
    """Episodes the current policy plays per round (``group_size`` per seed)."""
    group_size: int = 4
    """Episodes per seed in a round: answers at the same states are what step-level pairs compare."""
    round_pair_mode: Literal["trajectory", "step"] = "step"
    """How a round's episodes are paired (``agents.pairs``): ``step`` (IPR) or ``trajectory`` (ETO)."""
    label: Literal["return", "success"] = "return"
    """Rule that labels a round's pairs: the return (to go) or the success."""
    min_margin: float = 0.0
    """Smallest score difference that makes a round's pair (ties are always dropped)."""
    round_pairs_per_state: Literal["all", "best-worst", "by-action"] = "all"
    """Step-level rounds: pair every two different answers at a state, or only its best over its worst (one
    pair per state; with diverse answers, ``all`` grows quadratically in the group size), or the answers of
    its best action over those of its worst, each action scored over all its wordings (``by-action``)."""
    round_epochs: int = 1
    """Passes over a round's pairs."""

    def validate(self) -> None:
        model = self.policy.model
        if model.startswith((".", "/", "~")) and not Path(model).expanduser().exists():
            # Checked before RunConfig's own check to say why it matters here (a resumed run's start, too).
            raise ConfigError(
                f"The starting policy {model} does not exist, so DPO's reference (the frozen starting weights) "
                "cannot be built; restore it, or start a new run from an existing policy."
            )
        super().validate()
        if self.rounds < 0:
            raise ConfigError(f"rounds must be >= 0, got {self.rounds}.")
        if self.rounds == 0:
            if not self.pairs:
                raise ConfigError(
                    "DPO needs preference pairs: pass --pairs PATH (made by `vlmrl pairs STORE --out PATH`), or "
                    "--rounds N to collect and pair online."
                )
            if not Path(self.pairs).exists():
                raise ConfigError(
                    f"--pairs {self.pairs}: no such directory. Make it with `vlmrl pairs STORE --out {self.pairs}`."
                )
        elif self.pairs:
            raise ConfigError("--pairs and --rounds exclude each other: iterated DPO makes its own pairs each round.")
        if self.beta <= 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}.")
        if self.rpo_alpha < 0:
            raise ConfigError(f"rpo_alpha must be >= 0, got {self.rpo_alpha}.")
        if not 0 <= self.held_out_fraction < 1:
            raise ConfigError(f"held_out_fraction must be in [0, 1), got {self.held_out_fraction}.")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}.")
        if self.min_margin < 0:
            raise ConfigError(f"min_margin must be >= 0, got {self.min_margin}.")
        for name in ("epochs", "batch_size", "micro_batch_size", "max_nonfinite_steps", "episodes_per_round",
                     "group_size", "round_epochs"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(
                f"batch_size={self.batch_size} is not a multiple of micro_batch_size={self.micro_batch_size}; "
                "choose a micro_batch_size that divides it."
            )
        if self.eval_every < 0:
            raise ConfigError(f"eval_every must be >= 0, got {self.eval_every}.")


# ----------------------------------------------------------------------------------------------------------
# Pairs
# ----------------------------------------------------------------------------------------------------------


@dataclass
class PairData:
    """Pairs ready to train on: the answers as completions and the reference's log-prob of each."""

    chosen: list[Completion]
    rejected: list[Completion]
    reference_chosen: torch.Tensor
    reference_rejected: torch.Tensor

    def __len__(self) -> int:
        return len(self.chosen)

    def select(self, indices: np.ndarray | list[int]) -> PairData:
        indices = list(indices)
        return PairData(
            [self.chosen[i] for i in indices],
            [self.rejected[i] for i in indices],
            self.reference_chosen[indices],
            self.reference_rejected[indices],
        )


def check_pairs(pairs, config: DPOConfig, where: str) -> list[dict[str, Any]]:
    """The pairs as ``{"observation", "chosen", "rejected"}``, after every check that can fail before a model
    loads: pairs present, of this env, its options and its prompt template, each with an image and two
    different answers."""
    import envs

    if len(pairs) == 0:
        raise ConfigError(f"{where} holds no pairs; there is nothing to learn from.")
    spec = envs.get_language(config.env_id)
    wanted_options = json.dumps(config.env_kwargs, sort_keys=True)
    style = config.policy.prompt_style
    # Cheap columns first (images are decoded only once every other check has passed).
    columns = pairs.select_columns(
        ["env_id", "env_options", "prompt_style", "step_text", "prompt", "chosen", "rejected"]
    )
    for index, row in enumerate(columns):
        if row["env_id"] != config.env_id:
            raise ConfigError(f"{where}: pair {index} is of {row['env_id']}, not of this run's {config.env_id}.")
        if json.dumps(json.loads(row["env_options"] or "{}"), sort_keys=True) != wanted_options:
            raise ConfigError(
                f"{where}: pair {index} was collected with env options {row['env_options']}, not this run's "
                f"{wanted_options}: pair episodes of the experiment's options, or pass the same options here."
            )
        if row["prompt_style"] != style:
            raise ConfigError(
                f"{where} holds {row['prompt_style']} answers but the policy writes {style} answers: pass "
                f"--prompt-style {row['prompt_style']}, or pair episodes collected with --prompt-style {style}."
            )
        if [len(row[k]) for k in ("prompt", "chosen", "rejected")] != [1, 1, 1]:
            raise ConfigError(
                f"{where}: pair {index} is not one user prompt and one answer each; was it made by `vlmrl pairs`?"
            )
        if row["prompt"][0]["content"] != envs.build_prompt(spec, row["step_text"], style):
            raise ConfigError(
                f"{where}: pair {index}'s prompt is not the one {config.env_id}'s prompt template gives now; the pairs "
                "were made with another template: pair episodes collected with the current code."
            )
        if row["chosen"][0]["content"] == row["rejected"][0]["content"]:
            raise ConfigError(
                f"{where}: pair {index} has the same chosen and rejected answer ({row['chosen'][0]['content']!r}); "
                "a pair must compare two different answers."
            )
    result = []
    for index, (row, images) in enumerate(zip(columns, pairs.select_columns(["images"]))):
        if len(images["images"] or []) != 1:
            count = len(images["images"] or [])
            raise ConfigError(
                f"{where}: pair {index} has {'no' if count == 0 else count} images; vlmrl's policies answer one "
                "image and a text."
            )
        result.append(
            {
                "observation": {"image": np.asarray(images["images"][0].convert("RGB")), "text": row["step_text"]},
                "chosen": row["chosen"][0]["content"],
                "rejected": row["rejected"][0]["content"],
            }
        )
    return result


def load_pair_rows(config: DPOConfig) -> list[dict[str, Any]]:
    """The checked pairs of ``config.pairs``."""
    from agents.pairs import load_pairs

    try:
        pairs = load_pairs(config.pairs)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return check_pairs(pairs, config, config.pairs)


def pair_data(
    policy: VLMPolicy,
    reference: VLMPolicy,
    rows: list[dict[str, Any]],
    config: DPOConfig,
    where: str = "the pairs",
    skip_unwritable: bool | None = None,
) -> PairData:
    """Each pair's answers as the policy would have written them, and their reference log-probs.

    A pair with an answer the policy's decoding could never write (an invalid answer under constrained
    decoding, an answer longer than ``max_new_tokens`` in the tokenizer's spelling) stops the run, or is
    left out with a warning under ``skip_unwritable`` (by default ``config.skip_unwritable``).
    """
    import warnings

    import envs

    spec = envs.get_language(config.env_id)
    chosen, rejected, skipped = [], [], []
    for index, row in enumerate(rows):
        try:
            [good, bad] = policy.completions_for(
                [row["observation"]] * 2, spec, [row["chosen"], row["rejected"]], score=False
            )
        except ValueError as error:
            reason = str(error) if len(str(error)) <= 300 else str(error)[:300] + "..."
            if not (config.skip_unwritable if skip_unwritable is None else skip_unwritable):
                raise ConfigError(
                    f"{where}: pair {index} holds an answer this policy's decoding cannot write ({reason}). Pass "
                    "--skip-unwritable to leave such pairs out, or match --constrained/--max-new-tokens to the "
                    "policy that wrote them."
                ) from None
            skipped.append(index)
            continue
        chosen.append(good)
        rejected.append(bad)
    if skipped:
        if not chosen:
            raise ConfigError(f"{where}: none of the {len(rows)} pairs can be written by this policy's decoding.")
        warnings.warn(
            f"{where}: left out {len(skipped)} of {len(rows)} pairs this policy's decoding cannot write "
            f"(pairs {skipped[:10]}{'...' if len(skipped) > 10 else ''}).",
            stacklevel=2,
        )
    reference_chosen = reference_logprobs(reference, policy, chosen, config)
    reference_rejected = reference_logprobs(reference, policy, rejected, config)
    return PairData(chosen, rejected, reference_chosen, reference_rejected)


def make_reference(policy: VLMPolicy, config: DPOConfig) -> VLMPolicy:
    """The frozen starting weights: the policy itself when switching its fresh LoRA adapter off gives them,
    else a frozen copy loaded from ``config.policy`` (see the module's docstring)."""
    from agents.policy import POLICY_FILE, load_policy, resolve_policy_directory

    start = Path(resolve_policy_directory(config.policy.model))
    trained_adapter = (start / POLICY_FILE).exists() and (start / "adapter").exists()
    if policy.config.lora_rank > 0 and not trained_adapter:
        return policy
    options = dataclasses.asdict(config.policy)
    try:
        frozen = load_policy(options.pop("model"), **options)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"The reference policy (the starting weights, {config.policy.model}) cannot be built: {error}"
        ) from None
    frozen.requires_grad_(False)
    return frozen


def answer_logprob(evaluation, config: DPOConfig) -> torch.Tensor:
    """Each answer's log-prob as ``config.logprob`` says (evaluations are at temperature 1)."""
    return evaluation.token_logprobs.sum(-1) if config.logprob == "answer" else evaluation.logprob


@torch.no_grad()
def reference_logprobs(
    reference: VLMPolicy, policy: VLMPolicy, completions: list[Completion], config: DPOConfig
) -> torch.Tensor:
    result = []
    for begin in range(0, len(completions), config.micro_batch_size):
        batch = completions[begin : begin + config.micro_batch_size]
        if reference is policy:
            evaluation = policy.reference_logprobs(batch, temperature=1.0)
        else:
            evaluation = reference.evaluate(batch, temperature=1.0)
        result.append(answer_logprob(evaluation, config).float().cpu())
    return torch.cat(result) if result else torch.zeros(0)


# ----------------------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------------------


def dpo_losses(policy: VLMPolicy, data: PairData, config: DPOConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The preference loss of one micro-batch of pairs (+ RPO's NLL), with TRL's metric names."""
    count = len(data)
    evaluation = policy.evaluate(data.chosen + data.rejected, temperature=1.0)  # one pass for both answers
    logprobs = answer_logprob(evaluation, config)
    chosen, rejected = logprobs[:count], logprobs[count:]
    device = logprobs.device
    per_pair, chosen_reward, rejected_reward = dpo_loss(
        chosen,
        rejected,
        data.reference_chosen.to(device),
        data.reference_rejected.to(device),
        config.beta,
        config.loss_type,
    )
    preference = per_pair.mean()
    loss = preference
    nll = token_mean_nll(evaluation.token_logprobs[:count], evaluation.token_mask[:count]).mean()
    if config.rpo_alpha > 0:
        loss = loss + config.rpo_alpha * nll
    with torch.no_grad():
        margin = chosen_reward - rejected_reward
        parts = {
            "losses/loss": loss.detach(),
            "losses/preference_loss": preference.detach(),
            "losses/chosen_nll": nll.detach(),
            "rewards/chosen": chosen_reward.mean(),
            "rewards/rejected": rejected_reward.mean(),
            "rewards/margins": margin.mean(),
            "rewards/accuracies": (margin > 0).float().mean(),
            "logps/chosen": chosen.detach().mean(),
            "logps/rejected": rejected.detach().mean(),
        }
    return loss, parts


@torch.no_grad()
def held_out_metrics(policy: VLMPolicy, data: PairData, config: DPOConfig) -> dict[str, float]:
    """Accuracy (chosen reward above rejected), mean margin and loss over pairs never trained on."""
    if len(data) == 0:
        return {}
    totals: dict[str, float] = {}
    for begin in range(0, len(data), config.micro_batch_size):
        micro = data.select(range(begin, min(begin + config.micro_batch_size, len(data))))
        _, parts = dpo_losses(policy, micro, config)
        for key in ("losses/preference_loss", "rewards/margins", "rewards/accuracies"):
            totals[key] = totals.get(key, 0.0) + float(parts[key]) * len(micro)
    return {
        "dpo/heldout_loss": totals["losses/preference_loss"] / len(data),
        "dpo/heldout_margin": totals["rewards/margins"] / len(data),
        "dpo/heldout_accuracy": totals["rewards/accuracies"] / len(data),
    }


def minibatch_step(policy: VLMPolicy, data: PairData, batch: np.ndarray, config: DPOConfig, guarded_step: GuardedStep):
    micro = config.micro_batch_size
    return guarded_step.step(
        [batch[i : i + micro] for i in range(0, len(batch), micro)],
        lambda m: dpo_losses(policy, data.select(m), config),
    )


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def train(config: DPOConfig, defaults: DPOConfig | None = None) -> Path:
    """DPO on ``config.pairs`` (or iterated online with ``config.rounds``); return the run directory."""
    if config.rounds or _resumes_iterated(config):
        return train_iterated(config, defaults)
    with Run(config, "dpo", defaults) as run:
        config = run.config
        rows = load_pair_rows(config)
        policy = run.load_policy()
        policy.value_head.requires_grad_(False)  # no critic in DPO
        reference = make_reference(policy, config)
        data = pair_data(policy, reference, rows, config, config.pairs)
        if reference is not policy:
            del reference  # its log-probs of every pair are all DPO needs from it
        # The held-out split comes from its own generator: the run's stays the minibatch order's alone.
        order = np.random.default_rng(config.seed).permutation(len(data))
        held_count = int(round(config.held_out_fraction * len(data)))
        if held_count >= len(data):
            raise ConfigError(
                f"held_out_fraction={config.held_out_fraction} leaves none of {len(data)} pairs to train on."
            )
        held_out, data = data.select(sorted(order[:held_count])), data.select(sorted(order[held_count:]))
        batches = Batches(len(data), config.batch_size, run.generator)
        num_updates = config.epochs * batches.per_epoch
        optimizer = make_optimizer(policy, config.learning_rate)
        run.restore(optimizer=optimizer, batches=batches)
        optimizer = run.prepare(policy, optimizer)
        trainable = [p for p in policy.parameters() if p.requires_grad]
        guarded_step = GuardedStep(
            optimizer, trainable, config.max_grad_norm, config.max_nonfinite_steps, parallel=run.parallel
        )
        pairs_seen = run.global_step

        for update in run.updates(num_updates, config.batch_size):
            start = time.perf_counter()
            learning_rate = set_learning_rate(optimizer, update, num_updates, config.anneal_lr)
            batch = batches.next()
            parts = minibatch_step(policy, data, batch, config, guarded_step)
            pairs_seen += len(batch)
            run.advance(len(batch))
            metrics = dict(parts or {})
            metrics.update(
                {
                    "losses/skipped_steps": float(parts is None),
                    "charts/learning_rate": learning_rate,
                    "charts/epoch": (update + 1) / batches.per_epoch,
                    "charts/pairs_per_s": len(batch) / (time.perf_counter() - start),
                }
            )
            last = update + 1 == num_updates
            if last or (config.eval_every and (update + 1) % config.eval_every == 0):
                with run.whole_policy(policy):
                    metrics.update(held_out_metrics(policy, held_out, config) if run.is_main else {})
                if not last and config.eval_episodes:
                    metrics.update(eval_metrics(run.evaluate(policy)))
            run.end_update(update, metrics, pairs_seen, policy, finished=[], optimizer=optimizer, batches=batches)
        return run.finish(policy, global_step=pairs_seen)


def _resumes_iterated(config: DPOConfig) -> bool:
    """Whether ``--resume`` names an iterated run (resuming needs no ``--rounds``: the run keeps its own)."""
    from agents.checkpoint import peek_trainer_state

    saved = peek_trainer_state(config.resume).get("config") if config.resume else None
    return bool(isinstance(saved, dict) and saved.get("rounds"))


def collect_round(run: Run, policy: VLMPolicy, config: DPOConfig, update: int) -> tuple[Path, dict[str, list]]:
    """Play one round's episodes with the current policy into ``<run dir>/rounds/round-NNNN``; return the
    store, the episodes' returns and successes, and the env steps the round took (``steps``)."""
    from agents.rollout import EnvRunner
    from agents.trajectories import EpisodeRecorder, TrajectoryWriter

    path = run.run_dir / "rounds" / f"round-{update:04d}"
    if path.exists():  # a round a killed run had begun: play it again from the checkpoint's state
        shutil.rmtree(path)
    seeds_needed = -(-config.episodes_per_round // config.group_size)
    # Seeds of their own per round, far from the evaluation's (10,000 + seed upward), as GRPO's.
    base = 1_000_000 * (config.seed + 1) + update * seeds_needed
    wanted = [base + i // config.group_size for i in range(config.episodes_per_round)]
    episode_seeds = itertools.chain(wanted, itertools.count(base + 10 * seeds_needed))
    runner = EnvRunner(
        config.env_id,
        min(config.num_envs, config.episodes_per_round),
        config.env_kwargs,
        seed=base,
        rng=np.random.default_rng(base),
        invalid_rule=config.invalid_rule,
        invalid_default_action=config.invalid_default_action,
        success_rule=config.success_rule,
        episode_seeds=episode_seeds,
    )
    writer = TrajectoryWriter(path)
    runner.recorder = EpisodeRecorder(
        writer,
        config.env_id,
        config.env_kwargs,
        config.policy.prompt_style,
        runner.num_envs,
        source=f"run:{run.run_dir}@update-{update + 1}",
        max_episodes=config.episodes_per_round,
        seeds=set(wanted),
    )
    try:
        while runner.recorder.episodes_written < config.episodes_per_round:
            runner.step(policy)
    finally:
        runner.close()
        writer.close()
    return path, {"returns": runner.recorder.returns, "successes": runner.recorder.successes, "steps": runner.steps}


def train_iterated(config: DPOConfig, defaults: DPOConfig | None = None) -> Path:
    """Iterated online DPO: per update, collect with the current policy, pair, and train on the round's pairs."""
    from agents.pairs import build_pairs

    with Run(config, "dpo", defaults) as run:
        config = run.config
        policy = run.load_policy()
        policy.value_head.requires_grad_(False)
        reference = make_reference(policy, config)
        optimizer = make_optimizer(policy, config.learning_rate)
        run.restore(optimizer=optimizer)
        optimizer = run.prepare(policy, optimizer)
        trainable = [p for p in policy.parameters() if p.requires_grad]
        guarded_step = GuardedStep(
            optimizer, trainable, config.max_grad_norm, config.max_nonfinite_steps, parallel=run.parallel
        )
        # Progress is counted in env steps, as PPO's and GRPO's: what a round of collection costs, including
        # the steps of envs still playing extra episodes while the round's last ones finish.
        env_steps = run.global_step

        for update in run.updates(config.rounds, 1):  # the progress bar counts rounds
            start = time.perf_counter()
            learning_rate = set_learning_rate(optimizer, update, config.rounds, config.anneal_lr)
            # Under a launcher rank 0 plays the round alone, as one process would, and the others read its store.
            with run.whole_policy(policy):
                store, stats = run.on_main(functools.partial(collect_round, run, policy, config, update))
            metrics: dict[str, float] = {
                "charts/episodic_return": float(np.mean(stats["returns"])),
                "charts/success_rate": float(np.mean(stats["successes"])),
                "charts/learning_rate": learning_rate,
            }
            try:
                pairs, counts = build_pairs(
                    [store],
                    config.round_pair_mode,
                    config.label,
                    config.min_margin,
                    per_state=config.round_pairs_per_state,
                )
            except ValueError:  # every answer tied (all failed, say): nothing to learn this round
                pairs, counts = None, {}
            metrics["dpo/pairs"] = float(len(pairs) if pairs is not None else 0)
            metrics.update({f"dpo/dropped_{k}": float(v) for k, v in counts.items() if k != "kept"})
            if pairs is not None:
                where = f"round {update}"
                # The policy wrote these answers itself, but an unconstrained answer cut by max_new_tokens may
                # not come back in the tokenizer's spelling: such a pair is left out, not fatal mid-run.
                rows = check_pairs(pairs, config, where)
                data = pair_data(policy, reference, rows, config, where, skip_unwritable=True)
                # Pairs of this round's own states that it never trains on: how well the round's update
                # generalises. Their own generator, so the run's stays the minibatch order's alone.
                held_count = int(round(config.held_out_fraction * len(data))) if len(data) >= 2 else 0
                held_count = min(held_count, len(data) - 1)
                split = np.random.default_rng([config.seed, update]).permutation(len(data))
                held_out = data.select(sorted(split[:held_count]))
                data = data.select(sorted(split[held_count:]))
                metrics["dpo/heldout_pairs"] = float(held_count)
                totals = LossTotals()
                for _epoch in range(config.round_epochs):
                    order = run.generator.permutation(len(data))
                    for begin in range(0, len(order), config.batch_size):
                        totals.add(
                            minibatch_step(policy, data, order[begin : begin + config.batch_size], config, guarded_step)
                        )
                metrics.update(totals.means())  # DPO's parts carry their own prefixes (losses/, rewards/, logps/)
                with run.whole_policy(policy):
                    metrics.update(held_out_metrics(policy, held_out, config) if run.is_main else {})
            env_steps += stats["steps"]
            run.advance(1)
            metrics["charts/round_seconds"] = time.perf_counter() - start
            if (
                config.eval_every
                and (update + 1) % config.eval_every == 0
                and config.eval_episodes
                and update + 1 < config.rounds
            ):
                metrics.update(eval_metrics(run.evaluate(policy)))
            finished = [{"success": s} for s in stats["successes"]]
            run.end_update(update, metrics, env_steps, policy, finished=finished, optimizer=optimizer)
        return run.finish(policy, global_step=env_steps)
