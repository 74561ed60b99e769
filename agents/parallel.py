"""Data-parallel training through Hugging Face ``accelerate``: what :class:`~agents.run.Run` and
:class:`~agents.optim.GuardedStep` need to run one algorithm on several processes.

Launched by ``accelerate launch`` or ``torchrun`` (``WORLD_SIZE > 1``), every process runs the same
``vlmrl train ...``. The rules, all kept inside the run machinery so an algorithm file stays about its
algorithm:

* Each rank owns a contiguous block of ``num_envs / world_size`` envs (the global env count stays
  ``num_envs``): rank ``r`` runs envs ``r * n .. r * n + n - 1``, seeded as those envs are in a
  single-process run, and a GRPO group never straddles two ranks.
* Rollouts are gathered: after each rollout every rank holds the whole global batch (completions are
  small: a prompt string, an image, token ids), in the single-process order. Advantages, their
  normalisation and every statistic are therefore computed over the global batch, identically on every
  rank, and the minibatch order is drawn from one generator that every rank seeds alike.
* The update is sharded: each global minibatch is split into ``world_size`` near-equal slices
  (``np.array_split``); rank ``r`` computes the gradient of slice ``r`` only, scaled so that after DDP's
  average across ranks it is the mean over the whole minibatch, exactly the single-process gradient:
  rank ``r`` back-propagates ``sum(loss_i over its samples) * world_size / len(minibatch)``, and DDP
  divides the sum over ranks by ``world_size``. Only float summation order differs from one process.
* Generation (``act``) runs on the unwrapped policy; only the differentiable ``evaluate`` goes through
  the DDP wrapper, whose ``forward`` hooks the gradient all-reduce into backward.
* Rank 0 alone logs, writes samples, videos and checkpoints, and evaluates; a checkpoint holds every
  rank's env-runner and RNG state (``trainer.pt``'s ``ranks`` list), so a resumed run goes on exactly.

A rank that crashes makes the launcher (torchrun's elastic agent, used by ``accelerate launch`` too) stop
the others and name it. A rank that hangs is named by the others: before each of our collectives the ranks
meet in a monitored barrier (:meth:`DataParallel.check_in`), which fails after ``RunConfig.collective_timeout_s``
naming the ranks that did not arrive (a plain collective would only time out, naming no one); the process
group's own timeout is the same, for the collectives inside DDP's backward.

Supported: DDP (``configs/accelerate/ddp.yaml``, multi-GPU or multi-CPU with gloo). FSDP and DeepSpeed
are refused with a message (see :func:`check_distributed_type`): generation needs every rank to hold
whole parameters, and DeepSpeed's engine owns backward and the optimizer step, which our guarded step does.
"""

from __future__ import annotations

import importlib.util
import os
from contextlib import nullcontext
from datetime import timedelta
from typing import Any

import numpy as np
import torch

from agents.errors import ConfigError


def launched_world_size() -> int:
    """The number of processes a launcher (``torchrun``, ``accelerate launch``) started; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_distributed_type() -> None:
    """Refuse, before any process group starts, the accelerate configs this code cannot run."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(
                "The accelerate config asks for DeepSpeed, which is not installed: `pip install deepspeed`, "
                "or launch with configs/accelerate/ddp.yaml."
            )
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "?")
        if stage == "3":
            raise ConfigError(
                "DeepSpeed ZeRO-3 shards every parameter, but act() generates on the unwrapped policy and the "
                "fp32 value head reads the last hidden state outside the engine: both need whole parameters. "
                "Use configs/accelerate/ddp.yaml (with LoRA, or --dtype bfloat16, a 7B policy fits one 80 GB GPU)."
            )
        raise ConfigError(
            f"DeepSpeed (ZeRO-{stage}) is not wired into vlmrl yet: its engine owns backward and the optimizer "
            "step, which vlmrl's guarded step (accumulation, clipping, non-finite guard) does itself. Launch "
            "with configs/accelerate/ddp.yaml."
        )
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise ConfigError(
            "FSDP shards parameters across ranks, but act() generates on the unwrapped policy and needs whole "
            "parameters on every rank; FSDP is not supported yet. Launch with configs/accelerate/ddp.yaml."
        )


class DataParallel:
    """One rank of a data-parallel run: the accelerator, the wrapped policy, and the collectives we use.

    Built by :class:`~agents.run.Run` only when a launcher started several processes; a single process
    has none, and every code path is then exactly the single-process one.
    """

    def __init__(self, *, cpu: bool, timeout_s: int) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

        check_distributed_type()
        self.accelerator = Accelerator(
            cpu=cpu,
            kwargs_handlers=[
                # SFT's loss does not use the value head, GRPO's reference pass uses no trainable weight:
                # DDP must not wait for gradients that never come.
                DistributedDataParallelKwargs(find_unused_parameters=True),
                # The process group's timeout bounds how long ranks wait for one another in a collective.
                InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s)),
            ],
        )
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        self.model: torch.nn.Module | None = None
        # accelerate has no way to say which rank is missing: torch's monitored barrier does, on gloo only,
        # so it gets a gloo group of its own (the main group is NCCL on GPUs).
        self.timeout = timedelta(seconds=timeout_s)
        self._monitor = torch.distributed.new_group(backend="gloo", timeout=self.timeout)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def prepare(self, policy: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Wrap the policy for DDP and the optimizer; return the prepared optimizer.

        The policy object itself stays unwrapped (``act`` generates with it, checkpoints save it); its
        ``evaluate`` routes through the wrapper when gradients are on (see ``VLMPolicy.evaluate``).
        """
        self.model, optimizer = self.accelerator.prepare(policy, optimizer)
        policy.__dict__["_data_parallel"] = self.model  # not a submodule: no cycle in modules()/state_dict()
        return optimizer

    def no_sync(self, last: bool):
        """Skip the gradient all-reduce for every micro-batch of a minibatch but its last."""
        return nullcontext() if last or self.model is None else self.accelerator.no_sync(self.model)

    def check_in(self, what: str) -> None:
        """Meet the other ranks, or fail after the timeout naming the ranks that did not come."""
        try:
            torch.distributed.monitored_barrier(group=self._monitor, timeout=self.timeout, wait_all_ranks=True)
        except RuntimeError as error:
            raise RuntimeError(
                f"Rank {self.rank} waited {self.timeout.total_seconds():.0f} s (collective_timeout_s) for the other "
                f"ranks before {what}: {error}. A rank that hangs or died stops the run; the last checkpoint is "
                "intact. If a rank was only slow (rank 0 alone saves checkpoints and evaluates), raise "
                "--collective-timeout-s."
            ) from error

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order (pickled: for small host-side data)."""
        from accelerate.utils import gather_object

        self.check_in("gathering data")
        return gather_object([obj])

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks of a float64 CPU tensor."""
        return self.accelerator.reduce(values.to(self.device), reduction="sum").cpu()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj])[0]

    def wait(self) -> None:
        self.check_in("waiting for rank 0")
        self.accelerator.wait_for_everyone()

    def share(self, minibatch: np.ndarray) -> np.ndarray:
        """This rank's slice of a global minibatch (slices differ in size by at most one)."""
        return np.array_split(minibatch, self.world_size)[self.rank]
