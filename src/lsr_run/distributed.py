"""Data-parallel training and sharded encoding on PyTorch's own engine (``torchrun``, DDP).

Launch: ``torchrun --nproc_per_node=N -m lsr_run.cli ... hydra.run.dir=D`` (give the run directory
explicitly: every rank must agree on it), or a Hydra sweep through submitit (``hydra/launcher=slurm``, one
task per GPU, any number of nodes; ``submitit_local`` runs the same on one machine): the tasks of one submitit
job form one world, set up from submitit's job environment. Single-process runs use the same code with a
world of one.

Invariant: results do not depend on the number of processes. ``train.batch_size`` is the global batch; each
rank encodes its contiguous slice, then query and document representations are gathered (autograd-aware) so
the ranking loss, its in-batch negatives and the FLOPS regularizer are computed over the global batch on every
rank. Each rank's loss is the global loss, the gather's backward sums the W identical gradients of a rank's own
representations, and DDP's average divides by W: the parameter gradient equals the single-process one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def slice(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items (n must divide evenly)."""
        per = n // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's tensor along dim 0, in rank order, keeping gradients to the local part."""
        if not self.enabled:
            return tensor
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(tensor.contiguous()), dim=0)


_CURRENT = Dist()


def _export_submitit_env() -> None:
    """Inside a submitit job with several tasks (SLURM or submitit's local executor), export the variables
    torchrun would set (MASTER_ADDR/PORT from the job's first host and id, RANK, WORLD_SIZE, LOCAL_RANK)."""
    if "WORLD_SIZE" in os.environ or not os.environ.get("SUBMITIT_EXECUTOR"):
        return
    from submitit.helpers import TorchDistributedEnvironment

    env = TorchDistributedEnvironment()
    if env.world_size > 1:
        env.export(set_cuda_visible_devices=False)  # this rank picks cuda:LOCAL_RANK itself


def init() -> Dist:
    """Join the process group when launched by torchrun or a multi-task submitit job (WORLD_SIZE > 1);
    else a world of one."""
    global _CURRENT
    _export_submitit_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        _CURRENT = Dist()
        return _CURRENT
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    _CURRENT = Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local)
    return _CURRENT


def current() -> Dist:
    return _CURRENT
