"""`--num-processes N`: rerun the same command line as N workers under torch.distributed.run.

A command that sees `--num-processes N > 1` and is not yet a worker (WORLD_SIZE unset) calls
`relaunch`, which starts N copies of `dyn <same arguments>` joined over gloo (CPU) or NCCL (GPU)
and returns their exit code.
"""

from __future__ import annotations


def world_size_from_env() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def relaunch(num_processes: int) -> int:
    """Run this same command line as `num_processes` workers; their exit code."""
    import subprocess
    import sys

    from dyn.core.distributed import relaunch_command, strip_flag

    argv = strip_flag(sys.argv[1:], "--num-processes")
    return subprocess.run(relaunch_command(argv, num_processes), check=False).returncode
