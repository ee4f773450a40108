"""`distdl tune`: search spaces (space.py), the per-trial driver (driver.py), the Tuner (tuner.py),
live progress (progress.py) and the summary files (report.py)."""
