"""Teacher caches, distillation losses, schedules, trainer and GRACE teacher ranking.

Not built yet: see the open issues for `dyn distill` and `dyn teachers rank`.
"""
