"""The Ray Train callback that records each epoch in the run directory.

It runs inside Ray Train's controller (on the driver's node), so this module imports no torch:
the controller would otherwise pay for importing it at every start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray.train

from distdl.train import rundir


class EpochRecorder(ray.train.UserCallback):
    """Writes each reported epoch to metrics.jsonl, with the node of every rank."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        line = dict(metrics[0])
        line["nodes"] = [m.get("node", "") for m in metrics]
        rundir.record_epoch(self.run_dir, line)
