"""Which process this is in a multi-process run, and the few collectives dyn needs.

Under `accelerate launch` (multi-GPU), torchrun or dyn's own `--num-processes N` the launcher sets
RANK/WORLD_SIZE; dyn then joins the process group through Accelerate (gloo on CPU, NCCL on GPU).
A plain run is world size 1 and imports nothing from torch.distributed.

Note: `accelerate launch --cpu --num_processes N` starts a single process unless MPI is set up
(Accelerate's multi-CPU mode runs through mpirun); on a CPU-only machine use `--num-processes N`
or `accelerate launch --multi_gpu --num_processes N`, which start N workers joined over gloo.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_world: World | None = None


def world() -> World:
    """This process's place in the run; joins the process group on first use when launched."""
    global _world
    if _world is None:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size > 1:
            import torch
            from accelerate import PartialState

            # cpu=True makes Accelerate join over gloo on machines without CUDA.
            state = PartialState(cpu=not torch.cuda.is_available())
            _world = World(state.process_index, state.num_processes, state.local_process_index)
        else:
            _world = World(0, 1, 0)
    return _world


def all_gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (just `[obj]` in a single process)."""
    w = world()
    if w.size == 1:
        return [obj]
    import torch.distributed as dist

    gathered: list = [None] * w.size
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    if world().size > 1:
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if world().size == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def relaunch_command(argv: list[str], num_processes: int) -> list[str]:
    """The command that runs `dyn <argv>` as `num_processes` workers (torch.distributed.run)."""
    import sys

    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={num_processes}", "-m", "dyn.cli", *argv,
    ]


def strip_flag(argv: list[str], flag: str) -> list[str]:
    """`argv` without `flag VALUE` / `flag=VALUE`."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == flag:
            skip = True
            continue
        if item.startswith(flag + "="):
            continue
        out.append(item)
    return out
