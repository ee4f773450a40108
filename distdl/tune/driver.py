"""What Tune runs for each trial: one TorchTrainer, built exactly as `distdl train` builds it.

The trial driver only coordinates (it reserves no CPU); the trial's Ray Train workers hold the
resources. Each trial trains under its own run name, STORAGE/EXPERIMENT/TRIAL_ID/train, so a
trial that Tune resumes continues from its own latest checkpoint through Ray Train's restore.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ray import tune
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback

from distdl.config import Config
from distdl.train import trainer
from distdl.train.trainer import PreparedData
from distdl.tune import space

TRAIN_RUN = "train"


def trial_storage(storage: str, experiment: str, trial_id: str) -> str:
    """Where a trial's Ray Train run keeps its checkpoints (a path or URI under the experiment)."""
    return f"{storage.rstrip('/')}/{experiment}/{trial_id}"


def run_trial(sampled: dict[str, Any], *, base: Config, data: PreparedData, storage: str) -> None:
    """Train `base` with the trial's sampled values; each epoch reaches Tune via the callback."""
    context = tune.get_context()
    cfg = space.apply(base, sampled)
    storage = trial_storage(storage, context.get_experiment_name(), context.get_trial_id())
    result = trial_trainer(cfg, data, storage=storage, callbacks=[TuneReportCallback()]).fit()
    _report_last_epoch(result)


def _report_last_epoch(result) -> None:
    """Tune can lose the report of a trial's last epoch when training ends right after it (seen:
    a trial recorded with 3 of its 4 epochs, no error). The trial driver reports that epoch
    once more itself; the search's records keep one row per epoch."""
    if result.metrics:
        path = result.checkpoint.path if result.checkpoint else None
        tune.report({**result.metrics, CHECKPOINT_PATH_KEY: path})


def trial_trainer(cfg: Config, data: PreparedData, *, storage: str,
                  callbacks: list) -> TorchTrainer:
    """A trial's TorchTrainer. It keeps the checkpoints that the search's metric ranks best,
    so that the best epoch's checkpoint is still there at the end. It reports every epoch:
    Tune's schedulers count reports as epochs (ASHA's rungs, grace_period)."""
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, report_interval_s=0.0))
    return trainer.build_trainer(cfg, data, storage=storage, callbacks=callbacks, name=TRAIN_RUN,
                                 keep_best_by=(cfg.tune.metric, cfg.tune.mode))
