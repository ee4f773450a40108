"""The driver of a search: resources, the Tuner (new or restored), and the summary files.

Tuner -> trial driver (driver.py, one TorchTrainer per trial) -> Ray Train workers. The data is
loaded once here and shared by every trial through the object store.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray import tune

from distdl import runtime
from distdl.config import Config, TrainConfig
from distdl.errors import UserError
from distdl.train import trainer
from distdl.tune import driver, report, space
from distdl.tune.progress import TrialPrinter

log = logging.getLogger(__name__)

# Tune saves the experiment's state at most every 10 s by default; a search killed in between
# would run trials again that had finished. The state is a few kB, so save it every second.
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
# TrialPrinter is the live table; Tune's newer console output prints banners even when silent.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

# A trial driver only coordinates: it reserves memory, not a CPU, so that the CPUs go to the
# workers. (Tune refuses an empty request.)
DRIVER_RESOURCES = {"CPU": 0, "memory": 256 * 2**20}


def concurrent_trials(train: TrainConfig, cap: int) -> int:
    """Trials whose worker groups the cluster can place at once, at most `cap` (0: no cap).

    One CPU stays free for Ray Data's tasks, which every trial's first epoch needs; a trial
    driver waiting for workers that cannot be placed would otherwise wait forever.
    """
    import ray

    total = ray.cluster_resources()
    fits = int((total.get("CPU", 0.0) - 1) // train.worker_cpus())
    if train.use_gpu:
        fits = min(fits, int(total.get("GPU", 0.0) // train.num_workers))
    fits = max(fits, 1)  # check_placeable has shown that one trial fits
    return min(fits, cap) if cap else fits


def run(cfg: Config, params: list[space.Param], *, storage: str, output: Path, resume: bool,
        emit: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the search of `cfg.tune`; write the summary files and return the summary."""
    started = time.time()
    storage = trainer.normalize_storage(storage)
    experiment = check_experiment(storage, cfg.name, resume)
    train = cfg.train
    runtime.check_placeable(train.num_workers, train.cpus_per_worker, train.use_gpu)
    data = trainer.prepare_data(cfg)  # once, for every trial
    trainable = tune.with_resources(
        tune.with_parameters(driver.run_trial, base=cfg, data=data, storage=storage),
        DRIVER_RESOURCES,
    )
    if resume:
        tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        tuner = _new_tuner(cfg, params, trainable, storage, emit)
    grid = tuner.fit()
    trials = [report.collect(result, metric=cfg.tune.metric, mode=cfg.tune.mode,
                             epochs=cfg.train.epochs, storage=storage) for result in grid]
    summary = report.summary(trials, metric=cfg.tune.metric, mode=cfg.tune.mode,
                             experiment=experiment, wall_s=time.time() - started)
    report.write(output, summary, trials)
    return summary


def check_experiment(storage: str, name: str, resume: bool) -> str:
    """The search's folder in `storage` (normalized); a UserError where `resume` asks for a
    search that is not there, or a new search would reuse one. Needs no running Ray."""
    experiment = f"{storage.rstrip('/')}/{name}"
    exists = tune.Tuner.can_restore(experiment)
    if resume and not exists:
        raise UserError(f"no search named '{name}' to resume at {experiment}; check --name and "
                        "--storage, or drop --resume to start one")
    if exists and not resume:
        raise UserError(f"a search named '{name}' already exists at {experiment}; add --resume "
                        "to continue it, or choose another --name")
    return experiment


def _new_tuner(cfg: Config, params: list[space.Param], trainable, storage: str,
               emit: Callable[[str], None]) -> tune.Tuner:
    settings = cfg.tune
    concurrency = concurrent_trials(cfg.train, settings.max_concurrent_trials)
    log.info("%d trials at once", concurrency)
    return tune.Tuner(
        trainable,
        param_space=space.to_tune(params),
        tune_config=tune.TuneConfig(
            metric=settings.metric,
            mode=settings.mode,
            num_samples=settings.num_samples,
            scheduler=_scheduler(cfg),
            # Tune applies max_concurrent_trials only to Searchers; this generator takes its own.
            search_alg=tune.search.BasicVariantGenerator(random_state=settings.seed,
                                                         max_concurrent=concurrency),
            trial_name_creator=_trial_id,
            trial_dirname_creator=_trial_id,
        ),
        run_config=tune.RunConfig(
            name=cfg.name,
            storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=settings.max_failures),
            callbacks=[TrialPrinter(settings.metric, emit)],
            verbose=0,
        ),
    )


def _scheduler(cfg: Config) -> tune.schedulers.TrialScheduler:
    if cfg.tune.scheduler == "fifo":
        return tune.schedulers.FIFOScheduler()
    # Rungs count epochs (not Tune's iterations), so a resumed trial keeps its place.
    return tune.schedulers.ASHAScheduler(
        time_attr="epoch",
        max_t=cfg.train.epochs,
        grace_period=cfg.tune.grace_period,
        reduction_factor=cfg.tune.reduction_factor,
    )


def _trial_id(trial) -> str:
    return trial.trial_id
