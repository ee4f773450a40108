"""What Tune runs for each trial: one Ray Train trainer, built exactly as `distdl train` builds it.

The trial driver only coordinates (it reserves no CPU); the trial's Ray Train workers hold the
resources. Each trial trains under its own run name, STORAGE/EXPERIMENT/TRIAL_ID/train, so a
trial that Tune resumes continues from its own latest checkpoint through Ray Train's restore.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

from ray import train, tune
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY
from ray.util.queue import Empty, Queue

from distdl.config import Config
from distdl.train import rundir, trainer
from distdl.train.trainer import PreparedData
from distdl.tune import space

TRAIN_RUN = "train"


def trial_storage(storage: str, experiment: str, trial_id: str) -> str:
    """Where a trial's Ray Train run keeps its checkpoints (a path or URI under the experiment)."""
    return f"{storage.rstrip('/')}/{experiment}/{trial_id}"


def run_trial(sampled: dict[str, Any], *, base: Config, data: PreparedData, storage: str) -> None:
    """Train `base` with the trial's sampled values; each epoch reaches Tune as it is reported."""
    context = tune.get_context()
    cfg = space.apply(base, sampled)
    storage = trial_storage(storage, context.get_experiment_name(), context.get_trial_id())
    fit_reporting(lambda callbacks: trial_trainer(cfg, data, storage=storage,
                                                  callbacks=callbacks))


def fit_reporting(build: Callable[[list], DataParallelTrainer]) -> None:
    """Fit the trainer that `build(callbacks)` returns, and pass each of its reports to Tune
    from this thread, the trial's, until the last one.

    Not Ray's TuneReportCallback: it hands reports to the trial actor's main thread, which
    races the trial thread's own final report when training ends right after an epoch. Seen
    here: the last epoch's report lost, and once a trial that never ended (both threads
    blocked on Tune's one-slot result queue). From one thread, reports keep their order and
    all arrive before the trial ends.
    """
    reports = Queue(actor_options={"num_cpus": 0})
    fitting = _Fit(build([_Forward(reports)]))
    fitting.start()
    # Every report is queued before fit() returns (the callback waits for the put), so once
    # the thread has ended, an empty queue means nothing is left.
    while fitting.is_alive() or not reports.empty():
        try:
            tune.report(reports.get(timeout=0.5))
        except Empty:
            pass
    if fitting.error is not None:
        raise fitting.error


class _Forward(train.UserCallback):
    """Runs in the Ray Train controller: queues each report for the trial driver."""

    def __init__(self, reports: Queue):
        self.reports = reports

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        path = checkpoint.path if checkpoint else None
        # Tune gets the latest epoch only: trials report every epoch, and the earlier ones a
        # report may carry (those of a restored checkpoint, worker.py) reached Tune before.
        latest = {k: v for k, v in metrics[0].items() if k != rundir.EARLIER_EPOCHS}
        self.reports.put({**latest, CHECKPOINT_PATH_KEY: path})


class _Fit(threading.Thread):
    """trainer.fit() beside the trial thread; a daemon, so that a trial Tune stops ends."""

    def __init__(self, trainer: DataParallelTrainer):
        super().__init__(name="distdl-fit", daemon=True)
        self.trainer, self.error = trainer, None

    def run(self) -> None:
        try:
            self.trainer.fit()
        except BaseException as error:  # raised again on the trial thread, where Tune sees it
            self.error = error


def trial_trainer(cfg: Config, data: PreparedData, *, storage: str,
                  callbacks: list) -> DataParallelTrainer:
    """A trial's trainer. It keeps the checkpoints that the search's metric ranks best,
    so that the best epoch's checkpoint is still there at the end. It reports every epoch:
    Tune's schedulers count reports as epochs (ASHA's rungs, grace_period)."""
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, report_interval_s=0.0))
    return trainer.build_trainer(cfg, data, storage=storage, callbacks=callbacks, name=TRAIN_RUN,
                                 keep_best_by=(cfg.tune.metric, cfg.tune.mode))
