"""The errors dyn reports to users, each with the exit code the command line returns.

A `DynError` carries one line that names the file, row or column and the problem; the CLI prints
it and exits with `exit_code`. Anything else that escapes a command is an internal error (exit 1).
"""


class DynError(Exception):
    """A problem the user can fix; the message is the whole explanation."""

    exit_code = 1


class UsageError(DynError):
    """Bad flags or arguments: wrong values, paths that cannot be used (exit 2)."""

    exit_code = 2


class DataError(DynError):
    """The input data cannot be used as it is: malformed rows, missing columns, bad vectors (exit 3)."""

    exit_code = 3


EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_DATA = 3
