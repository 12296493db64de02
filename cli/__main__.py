"""`python -m dyn.cli ...`, which is what `accelerate launch -m dyn.cli ...` runs on every rank."""

from dyn.cli.app import main

main()
