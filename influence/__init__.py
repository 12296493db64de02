"""Per-sample gradient machinery (engines, projections, checkpoints) for `dyn select --method grad`.

Not built yet: see the open issue for `dyn train` and `dyn select --method grad`.
"""
