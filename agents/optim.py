"""Optimizer helpers shared by the algorithms: parameter groups, the learning-rate schedule, one guarded
optimizer step over micro-batches (gradient accumulation, clipping, the non-finite guard), and the running
means of an update's loss parts."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from agents.errors import VlmrlError


class OutOfMemory(VlmrlError):
    """A micro-batch did not fit in GPU memory; ``smaller`` is the next micro_batch_size that divides the
    minibatch (``None`` when the micro-batch is already one sample)."""

    def __init__(self, message: str, micro_batch_size: int, smaller: int | None) -> None:
        super().__init__(message)
        self.micro_batch_size, self.smaller = micro_batch_size, smaller


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

    With ``parallel`` (a :class:`~agents.parallel.DataParallel`), ``micro_batches`` is the global minibatch:
    this rank takes its slice of it (:meth:`~agents.parallel.DataParallel.share`), cut into micro-batches of
    the same size, and back-propagates ``loss * len(micro) * world_size / total``; DDP's average over ranks
    then gives the mean over the whole minibatch, the gradient one process computes. Every rank runs at
    least one micro-batch (a rank whose slice is empty runs one sample with weight 0), since each
    minibatch's last backward is a collective (under FSDP every pass is: each rank runs as many micro-batches,
    padded with weight-0 ones); the skip decision and the logged parts are summed over ranks, so every rank
    steps, or skips, alike.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        parameters: Iterable[torch.nn.Parameter],
        max_grad_norm: float,
        max_nonfinite: int,
        parallel: Any = None,
    ) -> None:
        self.parallel = parallel
        self.optimizer = optimizer
        self.parameters = list(parameters)
        self.max_grad_norm = max_grad_norm
        self.max_nonfinite = max_nonfinite
        self.consecutive_nonfinite = 0

    def step(
        self, micro_batches: list[Any], loss_fn: Callable[[Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    ) -> dict[str, float] | None:
        """Return the size-weighted mean of each part over the minibatch, or ``None`` if the step was skipped."""
        try:
            if self.parallel is not None:
                return self._step_parallel(micro_batches, loss_fn)
            return self._step(micro_batches, loss_fn)
        except torch.cuda.OutOfMemoryError:
            self.optimizer.zero_grad(set_to_none=True)
            size = max(len(micro) for micro in micro_batches)
            total = sum(len(micro) for micro in micro_batches)
            smaller = next((n for n in range(size - 1, 0, -1) if total % n == 0), None)
            raise OutOfMemory(
                f"Out of GPU memory in a forward/backward pass of micro_batch_size={size} samples."
                + (
                    f" Use micro_batch_size={smaller}"
                    if smaller
                    else " One sample does not fit: use a smaller model, LoRA, gradient_checkpointing or bfloat16"
                ),
                size,
                smaller,
            ) from None

    def _step(self, micro_batches: list[Any], loss_fn: Callable) -> dict[str, float] | None:
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
            return self._skip()
        self.consecutive_nonfinite = 0
        self.optimizer.step()
        return parts_sum

    def _step_parallel(self, micro_batches: list[Any], loss_fn: Callable) -> dict[str, float] | None:
        parallel = self.parallel
        parallel.check_in("an optimizer step")  # before DDP's all-reduce, which would time out naming no one
        minibatch = np.concatenate([np.asarray(micro) for micro in micro_batches])
        total, size = len(minibatch), len(micro_batches[0])
        share = parallel.share(minibatch)
        mine = [(share[i : i + size], 1.0) for i in range(0, len(share), size)] or [(minibatch[:1], 0.0)]
        if parallel.fsdp:
            # Under FSDP every forward and backward gathers parameters from all ranks, so all ranks run as many
            # micro-batches: a rank with fewer runs one sample more with weight 0.
            most = max(-(-len(part) // size) for part in np.array_split(minibatch, parallel.world_size))
            mine += [(minibatch[:1], 0.0)] * (most - len(mine))
        self.optimizer.zero_grad(set_to_none=True)
        parts_sum: dict[str, float] = {}
        finite = True
        for index, (micro, used) in enumerate(mine):
            # A non-finite loss does not end the loop here as it does in one process: every rank must reach
            # the last backward (a collective); the NaN gradient it brings is discarded below on every rank.
            with parallel.no_sync(last=index == len(mine) - 1):
                loss, parts = loss_fn(micro)
                finite = finite and bool(torch.isfinite(loss))
                weight = used * len(micro) / total
                parallel.backward(loss * weight * parallel.world_size)
            for key, value in parts.items():
                parts_sum[key] = parts_sum.get(key, 0.0) + (float(value) * weight if used else 0.0)
        keys = sorted(parts_sum)
        summed = parallel.sum(torch.tensor([float(not finite), *(parts_sum[k] for k in keys)], dtype=torch.float64))
        finite = summed[0].item() == 0
        grad_norm = parallel.clip_grad_norm_(self.parameters, self.max_grad_norm) if finite else None
        if not finite or not torch.isfinite(grad_norm):
            return self._skip()
        self.consecutive_nonfinite = 0
        self.optimizer.step()
        return {key: float(value) for key, value in zip(keys, summed[1:].tolist())}

    def _skip(self) -> None:
        """Drop a step whose loss or gradient is not finite; too many in a row stop the run."""
        self.optimizer.zero_grad(set_to_none=True)
        self.consecutive_nonfinite += 1
        if self.consecutive_nonfinite >= self.max_nonfinite:
            raise RuntimeError(
                f"{self.consecutive_nonfinite} optimizer steps in a row had a non-finite loss or gradient. "
                "Lower learning_rate, use float32 (dtype) or check the rewards."
            )


class LossTotals:
    """The loss parts of an update's optimizer steps, averaged over the steps taken; skipped steps counted.

    ``add(guarded_step.step(...))`` after each minibatch; ``metrics()`` gives ``losses/<part>`` means and
    ``losses/skipped_steps``.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.skipped = 0

    def add(self, parts: dict[str, float] | None) -> None:
        """One minibatch's parts (``None``: the step was skipped as non-finite)."""
        if parts is None:
            self.skipped += 1
            return
        self.steps += 1
        for key, value in parts.items():
            self.sums[key] = self.sums.get(key, 0.0) + value

    def mean(self, key: str) -> float:
        return self.sums[key] / max(self.steps, 1)

    def means(self) -> dict[str, float]:
        """Each part's mean over the steps taken, under its own name."""
        return {key: self.mean(key) for key in self.sums}

    def metrics(self) -> dict[str, float]:
        metrics = {f"losses/{key}": value for key, value in self.means().items()}
        metrics["losses/skipped_steps"] = self.skipped
        return metrics
