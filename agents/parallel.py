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

Under FSDP (``configs/accelerate/fsdp.yaml``) the same rules hold, and besides:

* vlmrl shards the policy itself with torch's FSDP2 ``fully_shard`` (:meth:`DataParallel.shard`): one unit
  per layer the model names in ``_no_split_modules``, one for the float32 value head, the policy as the
  root. accelerate's own FSDP plugin is not used: accelerate applies it on GPUs only (on CPU it silently
  runs DDP), and this way CPU and GPU run one code path. FSDP2's reduce-scatter averages over ranks as DDP's
  all-reduce does, so the gradient scaling above is unchanged.
* Acting needs whole parameters, and ranks generate different numbers of tokens: the rollout, evaluation and
  anything else rank 0 does alone run inside :meth:`DataParallel.whole_parameters` (``Run.whole_policy``),
  which gathers every unit once and keeps it whole, so no forward inside communicates.
* Every other pass goes through the sharded policy and gathers each layer as it runs, so every rank runs as
  many passes: a minibatch slice with fewer micro-batches is padded with weight-0 ones.
* Checkpoints hold the whole policy and the whole optimizer state (gathered on rank 0), laid out as one
  process writes them: one process loads them (``vlmrl eval``, ``--model``), and a resumed run re-shards.

Tested on CPU with two processes (gloo): FSDP gives DDP's parameters within 1e-5 for PPO, GRPO, SFT and
DPO, and a resumed FSDP run goes on as a resumed DDP run does.

A rank that crashes makes the launcher (torchrun's elastic agent, used by ``accelerate launch`` too) stop
the others and name it. A rank that hangs is named by the others: before each of our collectives the ranks
meet in a monitored barrier (:meth:`DataParallel.check_in`), which fails after ``RunConfig.collective_timeout_s``
naming the ranks that did not arrive (a plain collective would only time out, naming no one); the process
group's own timeout is the same, for the collectives inside DDP's backward.

Supported: DDP (``configs/accelerate/ddp.yaml``) and FSDP2 (``configs/accelerate/fsdp.yaml``), on GPUs or
on CPUs with gloo. Refused at start with a message (:func:`check_distributed_type`): FSDP version 1, FSDP with
``fsdp_cpu_ram_efficient_loading`` or ``fsdp_offload_params``, and DeepSpeed, whose engine owns backward and
the optimizer step, which our guarded step does.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
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
                "The accelerate config asks for DeepSpeed, which is not installed, and which vlmrl does not support "
                "(its engine owns backward and the optimizer step, which vlmrl's guarded step does). Launch with "
                "configs/accelerate/fsdp.yaml to shard, or configs/accelerate/ddp.yaml."
            )
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "?")
        raise ConfigError(
            f"DeepSpeed (ZeRO-{stage}) is not supported: its engine owns backward, gradient accumulation, clipping "
            "and the optimizer step (engine.backward, engine.step), which vlmrl's guarded step does itself "
            "(micro-batch accumulation, clipping, a non-finite step skipped alike on every rank)"
            + (
                ", and ZeRO-3 partitions every parameter, which act() and the float32 value head need whole"
                if stage == "3"
                else ""
            )
            + ". To shard parameters, gradients and optimizer states (as ZeRO-3 does), launch with "
            "configs/accelerate/fsdp.yaml; else configs/accelerate/ddp.yaml."
        )
    if using_fsdp():
        version = os.environ.get("FSDP_VERSION", "1")
        if version != "2":
            raise ConfigError(
                f"The accelerate config asks for FSDP version {version}; vlmrl shards with FSDP2 only (torch's "
                "fully_shard): set fsdp_version: 2, as configs/accelerate/fsdp.yaml does."
            )
        if os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() == "true":
            raise ConfigError(
                "fsdp_cpu_ram_efficient_loading: true makes transformers load the weights on rank 0 only (the other "
                "ranks get empty ones), but every rank loads its own policy and then shards it: set it to false, "
                "as configs/accelerate/fsdp.yaml does."
            )
        if os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true":
            raise ConfigError(
                "fsdp_offload_params: true is not supported (untested with gathering whole parameters for "
                "generation): set it to false, as configs/accelerate/fsdp.yaml does."
            )


def using_fsdp() -> bool:
    """Whether the launcher's accelerate config asks for FSDP (``distributed_type: FSDP``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


class DataParallel:
    """One rank of a data-parallel run: the accelerator, the wrapped policy, and the collectives we use.

    Built by :class:`~agents.run.Run` only when a launcher started several processes; a single process
    has none, and every code path is then exactly the single-process one.
    """

    def __init__(self, *, cpu: bool, timeout_s: int) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

        # The accelerate config was checked by Run (check_distributed_type), with one process or several.
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
        # accelerate applies its FSDP plugin on GPUs only (on CPU it falls back to DDP), so vlmrl shards the
        # policy itself with torch's FSDP2, the same way on both: see shard().
        self.fsdp = using_fsdp()
        self.reshard_after_forward = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() != "false"
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
        """Wrap the policy for DDP (or shard it, under FSDP) and the optimizer; return the optimizer to step.

        DDP: the policy object itself stays unwrapped (``act`` generates with it, checkpoints save it); its
        ``evaluate`` routes through the wrapper when gradients are on (see ``VLMPolicy.evaluate``).
        FSDP: see :meth:`shard`.
        """
        if self.fsdp:
            self.shard(policy, optimizer)
            self.model = policy
        else:
            self.model, optimizer = self.accelerator.prepare(policy, optimizer)
        policy.__dict__["_data_parallel"] = self.model  # not a submodule: no cycle in modules()/state_dict()
        return optimizer

    def shard(self, policy: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Shard the policy in place with FSDP2 (``fully_shard``) and point the optimizer at the shards.

        Units: each module whose class the model names in ``_no_split_modules`` (decoder and vision layers),
        the value head (float32 beside weights that may be bfloat16: FSDP2 all-gathers one dtype per unit),
        and the policy, the root, for the rest. The optimizer keeps its groups, now over the sharded
        parameters; a state restored from a checkpoint (whole tensors) is sharded too.
        """
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import distribute_tensor

        names = {id(p): name for name, p in policy.named_parameters()}
        groups = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
        saved = {names[id(p)]: state for p, state in optimizer.state.items()}
        optimizer.state.clear()
        units = set(getattr(policy.model, "_no_split_modules", None) or ())
        for module in list(policy.model.modules()):
            if type(module).__name__ in units:
                fully_shard(module, reshard_after_forward=self.reshard_after_forward)
        fully_shard(policy.value_head, reshard_after_forward=self.reshard_after_forward)
        fully_shard(policy, reshard_after_forward=self.reshard_after_forward)
        # FSDP2 makes the first module to run forward the root. The first to run may be a decoder layer, inside
        # generate (act comes before any update): make the policy the root now. (A private call; torch has no
        # public one.)
        policy._get_fsdp_state()._lazy_init()
        parameters = dict(policy.named_parameters())
        for group, group_names in zip(optimizer.param_groups, groups):
            group["params"] = [parameters[name] for name in group_names]
        for name, state in saved.items():  # each rank keeps its own shard of each whole state tensor (no traffic)
            parameter = parameters[name]
            optimizer.state[parameter] = {
                key: distribute_tensor(value, parameter.device_mesh, parameter.placements, src_data_rank=None)
                if value.shape == parameter.shape
                else value
                for key, value in state.items()
            }

    @contextmanager
    def whole_parameters(self, policy: torch.nn.Module) -> Iterator[None]:
        """Under FSDP, every rank holds whole parameters inside the block (one all-gather on entry), and no
        forward pass inside it communicates: ranks may act, evaluate and save on their own (rank 0 alone, or
        different numbers of times). Every rank must enter it. Without FSDP, nothing happens."""
        if not self.fsdp:
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        self.check_in("gathering whole parameters")
        units = [m for m in policy.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        try:
            yield
        finally:
            for unit in units:
                unit.reshard()
                unit.set_reshard_after_forward(self.reshard_after_forward, recurse=False)

    def no_sync(self, last: bool):
        """Skip the gradient all-reduce (reduce-scatter, under FSDP) for every micro-batch of a minibatch but its
        last."""
        if last or self.model is None:
            return nullcontext()
        if self.fsdp:
            return _without_gradient_sync(self.model)
        return self.accelerator.no_sync(self.model)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip_grad_norm_(self, parameters: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm over every rank's gradients; return the norm before clipping."""
        if not self.fsdp:
            return self.accelerator.clip_grad_norm_(parameters, max_norm)
        # Sharded gradients: torch sums the shards' squared norms over the ranks (a replicated DTensor).
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def policy_state(self, policy: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """Under FSDP, the policy's whole state dict, on rank 0 only (other ranks: ``{}``); every rank must call
        it. Without FSDP, ``None``: the policy saves its own."""
        if not self.fsdp:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        self.check_in("gathering the policy's state")
        return get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def optimizer_state(self, policy: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's state dict as one process's would be (whole tensors, parameters by index): under
        FSDP gathered on rank 0 (other ranks: ``{}``), every rank must call it."""
        if not self.fsdp:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        self.check_in("gathering the optimizer's state")
        state = get_optimizer_state_dict(
            policy, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        return indexed_optimizer_state(state) if state else {}

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


@contextmanager
def _without_gradient_sync(model: torch.nn.Module) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def indexed_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state dict keyed by parameter name (torch's distributed ``get_optimizer_state_dict``) keyed
    by index instead, parameters numbered in group order as one process's ``optimizer.state_dict()`` numbers
    them.

    >>> indexed_optimizer_state({"state": {"b": {"step": 3}}, "param_groups": [{"lr": 1, "params": ["a", "b"]}]})
    {'state': {1: {'step': 3}}, 'param_groups': [{'lr': 1, 'params': [0, 1]}]}
    """
    index = {name: i for i, name in enumerate(name for group in state["param_groups"] for name in group["params"])}
    return {
        "state": {index[name]: value for name, value in state["state"].items()},
        "param_groups": [
            {**group, "params": [index[name] for name in group["params"]]} for group in state["param_groups"]
        ],
    }
