"""Live progress on the driver: prints each epoch as the run directory records it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distdl.train import rundir


def format_epoch(metrics: dict[str, Any], epochs: int) -> str:
    return (f"epoch {metrics['epoch']:>3}/{epochs}  train_loss {metrics['train_loss']:.4f}  "
            f"val_loss {metrics['val_loss']:.4f}  val_accuracy {metrics['val_accuracy']:.4f}  "
            f"{metrics['samples_per_s']:>9,.0f} samples/s  {metrics['epoch_s']:.1f} s")


class EpochPrinter:
    """Polls metrics.jsonl in a background thread; use as a context manager around training."""

    def __init__(self, run_dir: Path, epochs: int, emit: Callable[[str], None] = print,
                 interval_s: float = 0.5):
        self.run_dir, self.epochs, self.emit, self.interval_s = run_dir, epochs, emit, interval_s
        self._printed: dict[int, float] = {}  # epoch -> started_at of the line printed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> EpochPrinter:
        self._printed = {m["epoch"]: m["started_at"] for m in rundir.read_metrics(self.run_dir)}
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._print_new()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._print_new()

    def _print_new(self) -> None:
        for metrics in rundir.read_metrics(self.run_dir):
            # An epoch run again after a restore has a new start time: print it again.
            if self._printed.get(metrics["epoch"]) != metrics["started_at"]:
                self._printed[metrics["epoch"]] = metrics["started_at"]
                self.emit(format_epoch(metrics, self.epochs))
