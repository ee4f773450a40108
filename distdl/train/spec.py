"""What the driver decides once for every worker of a run.

Ray Train's controller unpickles it too (it keeps the training function's config), so this
module imports no torch: the controller would otherwise import it for nothing at every start.
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
