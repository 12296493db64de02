"""`invoke(*args)`: run a `dyn` command in-process, as the tests' one way to call the CLI.

Arguments may be paths or numbers (turned into strings). A usage or data error comes back as the
result's exit code and stderr; any other exception is raised, so a test sees the real traceback
of an internal error instead of an exit code 1.
"""

from __future__ import annotations

from typer.testing import CliRunner

from dyn.cli.app import app


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result
