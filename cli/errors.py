"""Turn what escapes a command into one line on stderr and dyn's exit codes (0/1/2/3)."""

from __future__ import annotations

import os
import sys

import typer
from typer.core import TyperGroup


class DynGroup(TyperGroup):
    """The top-level group: prints `dyn: error: ...` for DynErrors and `dyn: internal error: ...`
    for anything unexpected (the traceback with DYN_DEBUG=1), exiting with the error's code."""

    def invoke(self, ctx):
        from dyn.core.errors import EXIT_INTERNAL, DynError

        try:
            return super().invoke(ctx)
        except DynError as exc:
            print(f"dyn: error: {exc}", file=sys.stderr, flush=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            raise typer.Abort() from None
        except Exception as exc:
            if _is_cli_control(exc) or os.environ.get("DYN_DEBUG"):
                raise
            print(
                f"dyn: internal error: {type(exc).__name__}: {exc} (set DYN_DEBUG=1 for the traceback)",
                file=sys.stderr, flush=True,
            )
            raise typer.Exit(EXIT_INTERNAL) from None


def _is_cli_control(exc: Exception) -> bool:
    """Exits, aborts and usage errors of Typer/Click, which their own main loop reports."""
    return type(exc).__module__.split(".")[0] in ("typer", "click")
