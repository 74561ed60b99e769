"""Optimizer helpers shared by the algorithms: parameter groups, the learning-rate schedule, and one
guarded optimizer step over micro-batches (gradient accumulation, clipping, the non-finite guard)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


def make_optimizer(policy, learning_rate: float, value_learning_rate: float | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; the value head in its own group with its own rate.

    The value head is trained from scratch on top of a (pretrained) model, so it often wants a larger rate
    than the LoRA weights; the two groups keep that one option away.
    """
    value_parameters = [p for p in policy.value_head.parameters() if p.requires_grad]
    value_ids = {id(p) for p in value_parameters}
    groups = [{"params": [p for p in policy.parameters() if p.requires_grad and id(p) not in value_ids]}]
    if value_parameters:
        groups.append({"params": value_parameters, "lr": value_learning_rate or learning_rate})
    optimizer = torch.optim.AdamW(groups, lr=learning_rate, eps=1e-5, weight_decay=0.0)
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    return optimizer


def set_learning_rate(optimizer: torch.optim.Optimizer, update: int, num_updates: int, anneal: bool) -> float:
    """Set each group's rate for ``update`` (0-based) and return the first group's.

    The schedule is linear from the base rate at update 0 to 0 at ``num_updates``, as a function of the
    update alone, so a resumed run, and a finished run extended with a larger ``total_env_steps``, follow
    the schedule of a run started with the new total (the rate jumps up once at the resume point).
    """
    fraction = 1.0 - update / num_updates if anneal else 1.0
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * fraction
    return optimizer.param_groups[0]["lr"]


class GuardedStep:
    """One optimizer step over a minibatch split into micro-batches, skipping non-finite steps.

    ``step(micro_batches, loss_fn)`` calls ``loss_fn(micro_batch) -> (loss, parts)`` per micro-batch,
    backpropagates ``loss * len(micro) / total`` (so the gradient is the minibatch mean), clips the global
    norm and steps. A non-finite loss or gradient skips the step; ``max_nonfinite`` in a row raise.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        parameters: Iterable[torch.nn.Parameter],
        max_grad_norm: float,
        max_nonfinite: int,
    ) -> None:
        self.optimizer = optimizer
        self.parameters = list(parameters)
        self.max_grad_norm = max_grad_norm
        self.max_nonfinite = max_nonfinite
        self.consecutive_nonfinite = 0

    def step(
        self, micro_batches: list[Any], loss_fn: Callable[[Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    ) -> dict[str, float] | None:
        """Return the size-weighted mean of each part over the minibatch, or ``None`` if the step was skipped."""
        total = sum(len(micro) for micro in micro_batches)
        self.optimizer.zero_grad(set_to_none=True)
        parts_sum: dict[str, float] = {}
        finite = True
        for micro in micro_batches:
            loss, parts = loss_fn(micro)
            if not torch.isfinite(loss):
                finite = False
                break
            (loss * len(micro) / total).backward()
            for key, value in parts.items():
                parts_sum[key] = parts_sum.get(key, 0.0) + float(value) * len(micro) / total
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm) if finite else None
        if not finite or not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            self.consecutive_nonfinite += 1
            if self.consecutive_nonfinite >= self.max_nonfinite:
                raise RuntimeError(
                    f"{self.consecutive_nonfinite} optimizer steps in a row had a non-finite loss or gradient. "
                    "Lower learning_rate, use float32 (dtype) or check the rewards."
                )
            return None
        self.consecutive_nonfinite = 0
        self.optimizer.step()
        return parts_sum
