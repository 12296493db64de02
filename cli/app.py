"""The `dyn` console script: a Typer app whose commands live in one module each.

Heavy libraries (torch, transformers, faiss, datasets) are imported inside commands, so
`dyn --help` answers at once.
"""

from __future__ import annotations

import os
from typing import Optional

# Library progress bars would interleave with dyn's own progress on stderr.
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import typer  # noqa: E402

from dyn.cli.errors import DynGroup  # noqa: E402
from dyn.cli.inspect import EXAMPLES as INSPECT_EXAMPLES  # noqa: E402
from dyn.cli.inspect import inspect_command  # noqa: E402
from dyn.cli.select import EXAMPLES as SELECT_EXAMPLES  # noqa: E402
from dyn.cli.select import select_command  # noqa: E402
from dyn.cli.score import EXAMPLES as SCORE_EXAMPLES  # noqa: E402
from dyn.cli.score import score_command  # noqa: E402
from dyn.cli.distill import distill_app  # noqa: E402
from dyn.cli.teachers import teachers_app  # noqa: E402
from dyn.cli.train import EXAMPLES as TRAIN_EXAMPLES, train_command  # noqa: E402

app = typer.Typer(
    cls=DynGroup,
    name="dyn",
    help="Prepare fine-tuning sets and distil language models.",
    epilog="Examples:\n\n  dyn select --method hmin data.jsonl -k 1000 -o picked.jsonl\n\n  dyn inspect picked.jsonl",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("select", epilog=SELECT_EXAMPLES, no_args_is_help=True)(select_command)
app.command("score", epilog=SCORE_EXAMPLES, no_args_is_help=True)(score_command)
app.command("inspect", epilog=INSPECT_EXAMPLES, no_args_is_help=True)(inspect_command)
app.command("train", epilog=TRAIN_EXAMPLES, no_args_is_help=True)(train_command)
app.add_typer(distill_app, name="distill")
app.add_typer(teachers_app, name="teachers")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"dyn {version('dyn')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Prepare fine-tuning sets and distil language models."""


def main() -> None:
    app()
