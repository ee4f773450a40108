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
    """Writes each reported epoch to metrics.jsonl, with the node of every rank. A report may
    carry several epochs (worker.py); they share its ranks' nodes."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self._last_epoch: int | None = None  # the last epoch this recorder wrote

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        nodes = [m.get("node", "") for m in metrics]
        latest = dict(metrics[0])
        for line in [*latest.pop(rundir.EARLIER_EPOCHS, []), latest]:
            self._record({**line, "nodes": nodes})

    def _record(self, line: dict[str, Any]) -> None:
        if self._last_epoch is not None and line["epoch"] == self._last_epoch + 1:
            # The usual case, appended: rewriting the file each epoch made a long run's
            # recording grow with its length (a quarter of the controller's CPU by epoch 125).
            rundir.append_epoch(self.run_dir, line)
        else:
            # The run's first report, or an epoch trained again after a restore.
            rundir.record_epoch(self.run_dir, line)
        self._last_epoch = line["epoch"]
