"""How every command starts (`command_arguments`), and `--num-processes N`: rerun the same command
line as N workers under torch.distributed.run.

A command that sees `--num-processes N > 1` and is not yet a worker (WORLD_SIZE unset) calls
`relaunch`, which starts N copies of `dyn <same arguments>` joined over gloo (CPU) or NCCL (GPU)
and returns their exit code.
"""

from __future__ import annotations


def command_arguments(ctx) -> tuple[dict, bool, bool]:
    """What every command does first: its flags after `--config` (flags given win), choices as
    their plain values; with `--num-processes N > 1` outside a worker, the command reruns itself as
    N workers and exits with their code; progress is configured for this rank.

    Returns (arguments without num_processes, config, json_output and quiet; json_output; quiet).
    """
    from enum import Enum

    import typer

    from dyn.cli.config import merge_config
    from dyn.core import progress
    from dyn.core.distributed import world

    args = merge_config(ctx, dict(ctx.params), ctx.params.get("config"))
    num_processes = args.pop("num_processes")
    if num_processes > 1 and world_size_from_env() == 1:
        raise typer.Exit(relaunch(num_processes))
    json_output, quiet = args.pop("json_output"), args.pop("quiet")
    args.pop("config", None)
    progress.configure(quiet=quiet, rank=world().rank)
    return {name: value.value if isinstance(value, Enum) else value for name, value in args.items()}, json_output, quiet


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
