"""dyn's command line: one thin Typer module per command group over the library."""
