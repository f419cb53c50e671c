"""Data parallelism: one process per device, each on its shard of every global batch.

``accelerate launch main.py ...`` (or ``torchrun``) starts the processes and
:meth:`DataParallel.from_environment` joins them through accelerate's ``PartialState``
(NCCL on GPUs, gloo on the CPU). The trainer then

- splits every global batch (``trainer_settings.dl_settings.batch_size``, a multiple of the
  number of processes) into equal contiguous shards, one per rank;
- averages the trainable modules' gradients over the ranks, weighted by shard size, before
  clipping and the optimizer steps: every rank takes the step one process would take on the
  whole batch, for losses that are means over samples;
- agrees across ranks on skipping a non-finite update;
- logs, evaluates and writes checkpoints on rank 0 only (the other ranks wait for it at their
  next collective call, and at the end in :meth:`DataParallel.finish`).

The frozen backbone needs no synchronisation; the trainable modules start equal on every rank
(broadcast from rank 0). Every rank seeds the same RNG and, with equal shards, draws the same
amount from it, so the RNGs stay in step: a discriminator re-initialisation
(``disc_reinit_prob``) happens on all ranks at once and gives the same weights. (The Gumbel
noise of sample i is therefore the same on every rank, for different samples.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

# Ranks other than 0 wait at their next collective while rank 0 evaluates; a long evaluation must not time out.
COLLECTIVE_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class DataParallel:
    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None  # this rank's device (cuda:LOCAL_RANK on GPUs); None: the config's

    @classmethod
    def from_environment(cls) -> "DataParallel":
        """The launcher's process group (WORLD_SIZE, RANK, ... in the environment), or one process."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available(), timeout=COLLECTIVE_TIMEOUT)
        return cls(state.process_index, state.num_processes, torch.device(state.device))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, indices: list[int]) -> list[int]:
        """This rank's contiguous part of a global batch (shard sizes differ by at most one)."""
        n = len(indices)
        return indices[n * self.rank // self.world_size: n * (self.rank + 1) // self.world_size]

    def _tensor(self, values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float64, device=self.device)

    def average_gradients(self, params: Iterable[nn.Parameter], local_samples: int) -> None:
        """grad <- sum over ranks of (shard size x shard-mean gradient) / global batch: the whole batch's gradient."""
        if not self.enabled:
            return
        grads = [p.grad for p in params if p.grad is not None]
        total = self._tensor([local_samples])
        dist.all_reduce(total)
        flat = torch.cat([g.reshape(-1).float() for g in grads]) * (local_samples / total.item())  # (P,)
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on some rank."""
        if not self.enabled:
            return flag
        value = self._tensor([float(flag)])
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def mean(self, values: dict[str, float], local_samples: int) -> dict[str, float]:
        """Sample-weighted means over ranks of logged values (every rank passes the same keys)."""
        if not self.enabled:
            return values
        keys = sorted(values)
        sums = self._tensor([values[k] * local_samples for k in keys] + [local_samples])
        dist.all_reduce(sums)
        return {k: (sums[i] / sums[-1]).item() for i, k in enumerate(keys)}

    def finish(self) -> None:
        """Every rank waits for rank 0's last evaluation and checkpoint, then the process group closes.

        A rank that left while the others still held its connections could abort on exit ("terminate called
        without an active exception" in gloo), failing a run that had succeeded."""
        if not self.enabled or not dist.is_initialized():
            return
        dist.barrier()
        dist.destroy_process_group()

    def broadcast_parameters(self, modules: Iterable[nn.Module | None]) -> None:
        """Rank 0's parameters and buffers on every rank."""
        if not self.enabled:
            return
        for module in modules:
            if module is None:
                continue
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)
