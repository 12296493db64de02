"""Selectors that choose training rows: hmin (diversity); grad and slm-hard are to come."""
