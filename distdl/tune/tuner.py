"""The driver of a search: resources, the Tuner (new or restored), its saved config, and the
summary files.

Tuner -> trial driver (driver.py, one Ray Train trainer per trial) -> Ray Train workers. The data is
loaded once here and shared by every trial through the object store.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.fs
import yaml
from ray import tune

from distdl import provenance, runtime
from distdl.config import Config, TrainConfig, parse_yaml
from distdl.errors import UserError
from distdl.train import rundir, trainer
from distdl.tune import driver, report, space
from distdl.tune.progress import TrialPrinter

log = logging.getLogger(__name__)

# Tune saves the experiment's state at most every 10 s by default; a search killed in between
# would run trials again that had finished. The state is a few kB, so save it every second.
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
# TrialPrinter is the live table; Tune's newer console output prints banners even when silent.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
# Ctrl-C: Tune's handler would end the search as if it had finished (fit() returns, unrun trials
# and all) and log a Python Tuner.restore() hint. Without it, KeyboardInterrupt leaves fit() and
# the command ends as others do on Ctrl-C, printing `distdl tune ... --resume`; the state that a
# resume reads is saved every second (above), as after a kill -9.
os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")

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
    """Run (or resume) the search of `cfg.tune` in `storage` (trainer.normalize_storage's);
    write the summary files and return the summary."""
    started = time.time()
    experiment = check_experiment(storage, cfg.name, resume)
    train = cfg.train
    runtime.check_placeable(train.num_workers, train.cpus_per_worker, train.use_gpu)
    data = trainer.prepare_data(cfg)  # once, for every trial
    if not resume:
        save_config(experiment, cfg)
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


def config_path(experiment: str) -> str:
    """The search's resolved config, in its experiment folder: --resume continues with it."""
    return f"{experiment.rstrip('/')}/{rundir.CONFIG_FILE}"


def save_config(experiment: str, cfg: Config) -> None:
    """Write the search's resolved config into its experiment folder (a path or URI), before
    any trial runs: a search killed at any point resumes with it."""
    fs, path = _filesystem(config_path(experiment))
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(rundir.config_text(cfg.to_dict(), provenance.collect()).encode())


def saved_config(experiment: str) -> Config | None:
    """The config a search was started with; None for a search that saved none (one started
    by an older distdl)."""
    fs, path = _filesystem(config_path(experiment))
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    where = config_path(experiment)
    try:
        with fs.open_input_stream(path) as f:
            raw = parse_yaml(f.read().decode())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"cannot read the search's settings in {where}: "
                        f"{str(exc).splitlines()[0]}") from None
    try:
        return Config.from_dict(raw)
    except UserError as exc:
        raise UserError(f"the search's settings in {where} are not valid: {exc}") from None


def resumed_config(experiment: str, given: Config | None) -> Config | None:
    """The config to resume a search with: its saved one (None where it saved none). `given`,
    the config of --recipe, --config and --set when the user passed any, must match it."""
    saved = saved_config(experiment)
    if saved is not None and given is not None and given.to_dict() != saved.to_dict():
        changed = _changed_fields(saved.to_dict(), given.to_dict())
        shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if changed[3:] else "")
        raise UserError(f"a search resumes with its own settings, saved in "
                        f"{config_path(experiment)}; these --recipe, --config or --set change "
                        f"its {shown}: drop them, or choose another --name to start a new search")
    return saved


def _changed_fields(saved: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """The dotted fields whose values differ (tune.space counts as one field)."""
    changed = []
    for key, value in saved.items():
        if isinstance(value, dict) and key != "space":
            changed += [f"{key}.{field}" for field in _changed_fields(value, given[key])]
        elif given[key] != value:
            changed.append(key)
    return changed


def _filesystem(location: str) -> tuple[pyarrow.fs.FileSystem, str]:
    if "://" in location:
        return pyarrow.fs.FileSystem.from_uri(location)
    return pyarrow.fs.LocalFileSystem(), location


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
