"""What the driver hands every worker of a run: what it decided once, and the training function.

Ray Train's controller unpickles the spec too (it keeps the training function's config), so this
module imports no torch: the controller, and the driver, would otherwise import it for nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distdl.config import Config


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, decided once on the driver."""

    config: Config
    meta: dict[str, Any]
    """Checkpoint metadata fixed for the run (classes, input shape, normalization, ...)."""
    in_memory: bool
    """Keep the shard in memory as tensors (it fits the budget) instead of streaming it."""
    steps_per_epoch: int
    """Optimizer steps per epoch on every rank; equal on all ranks, or DDP would hang."""


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's training function: worker.py's, which the workers import (and torch with
    it), and the driver does not."""
    from distdl.train import worker

    worker.train_loop_per_worker(loop_config)
