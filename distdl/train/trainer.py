"""The driver of a training run: data, resources, the Ray Train trainer, and the run directory."""

from __future__ import annotations


import json
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray.train
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from distdl import runtime
from distdl.config import Config
from distdl.data.sources import ImageData, load_images, normalization_stats
from distdl.errors import UserError, failure_line
from distdl.storage import probe
from distdl.train import checkpoint, rundir
from distdl.train.backend import TorchDistributed
from distdl.train.data_split import WorkerShards
from distdl.train.model_check import ModelCheck
from distdl.train.recorder import EpochRecorder
from distdl.train.spec import WorkerSpec, train_loop_per_worker

# Ray Train's controller collects reports when it polls the workers (every 2 s by default), and
# ray.train.report waits for it: with epochs shorter than that, the poll sets the pace. The
# default digits epochs take about 0.1 s of work: polled every 0.2 s they came 0.21 s apart,
# every 0.1 s 0.11 to 0.13 s apart. A short interval costs a few small RPCs per second, and the
# controller's handling of each report then overlaps the next epoch's steps instead of idle
# cores, which slowed those steps by 4 to 12% in four of five alternated pairs of runs; the
# 20 epochs still ended 1.1 to 2.1 s sooner. A value set by the user wins.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")


class TrainingFailed(Exception):
    """Training failed inside Ray and the restarts allowed by train.max_failures ran out."""


@dataclass(frozen=True)
class PreparedData:
    """Datasets and what was learned from them once, on the driver, for every worker and trial."""

    images: ImageData
    normalization: dict[str, list[float]]
    train_rows: int


def prepare_data(cfg: Config) -> PreparedData:
    images = load_images(cfg.data)
    if len(images.classes) < 2:
        raise UserError(f"{cfg.data.source} has one class ({images.classes[0]}); a classifier "
                        "learns to tell at least two apart")
    return PreparedData(images, normalization_stats(images.train), images.train.count())


def worker_spec(cfg: Config, data: PreparedData, check: ModelCheck | None = None) -> WorkerSpec:
    """Decide, once, how workers hold their shard and how many steps an epoch has. `check`,
    started earlier, checks the model (a new one by default): a bad model fails here, in one
    line, before any worker starts."""
    channels, height, width = data.images.image_shape
    rows_per_worker = data.train_rows // cfg.train.num_workers
    shard_mb = rows_per_worker * channels * height * width * 4 / 2**20  # float32 tensors
    in_memory = shard_mb <= cfg.data.cache_max_mb
    # Shards split by whole blocks may hold fewer rows than an equal share.
    smallest = WorkerShards(by_blocks=in_memory).smallest_shard(data.images.train,
                                                                cfg.train.num_workers)
    steps = smallest // cfg.train.batch_size_per_worker()
    if steps == 0:
        raise UserError(
            f"train.batch_size {cfg.train.batch_size} is larger than the {data.train_rows} "
            f"training examples allow for {cfg.train.num_workers} workers (the smallest "
            f"worker's share is {smallest}); lower train.batch_size"
        )
    check = check or ModelCheck()
    cpu_workers = (None if cfg.train.use_gpu
                   else (cfg.train.num_workers, runtime.cluster_memory()))
    # A worker's batch is its share of the global one (2 images stand for any larger batch).
    parameters = check.run(cfg.model, num_classes=len(data.images.classes),
                           shape=data.images.image_shape,
                           batch=min(2, cfg.train.batch_size_per_worker()),
                           cpu_workers=cpu_workers)
    meta = checkpoint.make_meta(
        model=cfg.model,
        classes=data.images.classes,
        input_shape=data.images.image_shape,
        normalization=data.normalization,
        data=cfg.data,
        torch_version=check.provenance["torch"],
    )
    meta["parameters"] = parameters
    # What a resume must keep beyond the model and data (rundir.RESUME_KEEPS): the optimizer
    # state and schedule position in the checkpoint were made with them.
    meta["optim"] = asdict(cfg.optim)
    meta["train"] = {"batch_size": cfg.train.batch_size}
    return WorkerSpec(config=cfg, meta=meta, in_memory=in_memory, steps_per_epoch=steps)


def build_trainer(
    cfg: Config,
    data: PreparedData,
    *,
    storage: str,
    callbacks: list[ray.train.UserCallback] = (),
    name: str | None = None,
    keep_best_by: tuple[str, str] = ("val_accuracy", "max"),
    check: ModelCheck | None = None,
) -> DataParallelTrainer:
    """The trainer for `cfg`; `distdl train` and each Tune trial build it the same way. It is
    Ray Train's DataParallelTrainer with a backend that imports torch on the workers only
    (backend.py), as does everything the driver runs (model_check.py).

    `keep_best_by` (metric, "max" or "min") ranks the checkpoints that are kept; `check`
    checks the model (worker_spec).
    """
    scaling = ray.train.ScalingConfig(
        num_workers=cfg.train.num_workers,
        use_gpu=cfg.train.use_gpu,
        resources_per_worker={"CPU": cfg.train.cpus_per_worker},
    )
    run = ray.train.RunConfig(
        name=name or cfg.name,
        storage_path=storage,
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=cfg.train.keep_checkpoints,
            checkpoint_score_attribute=keep_best_by[0],
            checkpoint_score_order=keep_best_by[1],
        ),
        failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        # Ray Train's INFO lines (two per report, with the metrics) cost CPU every epoch; its
        # system log file keeps every level. Over 200-epoch runs (two alternated
        # pairs), the workers used 205 ms of CPU per digits epoch at WARNING against 214-221 ms
        # at INFO, and trained at 13,235 and 13,138 samples/s against 12,676 and 12,166.
        logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        callbacks=list(callbacks),
    )
    spec = worker_spec(cfg, data, check)
    return DataParallelTrainer(
        train_loop_per_worker,
        backend_config=TorchDistributed(),
        train_loop_config={"spec": spec},
        scaling_config=scaling,
        run_config=run,
        datasets={"train": data.images.train, "val": data.images.val},
        dataset_config=WorkerShards(by_blocks=spec.in_memory),
    )


def train(cfg: Config, *, storage: str, run_dir: Path,
          check: ModelCheck | None = None) -> dict[str, Any]:
    """Run (or resume) training for `cfg` in `storage` (as normalize_storage returns it); write
    the run directory and return result.json. `check`: a ModelCheck the caller started before
    Ray, for the model (a new one by default); train closes it.

    The caller answers a finished run itself (rundir.finished): `distdl train` does so before
    starting Ray.
    """
    started = time.time()
    check = check or ModelCheck()
    try:
        runtime.check_placeable(cfg.train.num_workers, cfg.train.cpus_per_worker,
                                cfg.train.use_gpu)
        data = prepare_data(cfg)
        trainer = build_trainer(cfg, data, storage=storage, callbacks=[EpochRecorder(run_dir)],
                                check=check)
    finally:
        check.close()
    rundir.write_config(run_dir, cfg.to_dict(), check.provenance)  # once the checks pass
    rundir.clear_result(run_dir)
    result = fit(trainer)
    history = rundir.read_metrics(run_dir)
    summary = summarize(result, history, storage, started, skipped=data.images.skipped)
    rundir.write_result(run_dir, summary)
    if history:
        from distdl.plots import training_curves

        training_curves(history, run_dir / rundir.CURVES_FILE)
    return summary


def fit(trainer: DataParallelTrainer) -> ray.train.Result:
    """`trainer.fit()`, its failure a TrainingFailed and Ctrl-C a KeyboardInterrupt.

    On Ctrl-C, the SIGINT handler that fit installs aborts the run, which ends the controller
    actor it waits on, and then calls sys.exit(0): the command would end in silence with 0.
    That handler is also the only source of a SystemExit here. It stays installed after fit
    returns, so the previous one is put back.
    """
    previous = signal.getsignal(signal.SIGINT)
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise TrainingFailed(failure_line(exc)) from None
    except SystemExit:
        raise KeyboardInterrupt from None
    finally:
        signal.signal(signal.SIGINT, previous)


def summarize(result: ray.train.Result, history: list[dict[str, Any]], storage: str,
              started: float, *, skipped: int) -> dict[str, Any]:
    best = max(result.best_checkpoints, key=lambda pair: pair[1]["val_accuracy"], default=None)
    return {
        "best_checkpoint": checkpoint_uri(storage, best[0].path) if best else None,
        "best_val_accuracy": best[1]["val_accuracy"] if best else None,
        "latest_checkpoint": checkpoint_uri(storage, result.checkpoint.path) if result.checkpoint else None,
        "epochs_completed": history[-1]["epoch"] if history else 0,
        "wall_s": round(time.time() - started, 2),
        "worker_nodes": history[-1].get("nodes", []) if history else [],
        "skipped_images": skipped,
        "storage": storage,
    }


def stored_meta(storage: str, name: str) -> dict[str, Any] | None:
    """The metadata of run `name`'s newest checkpoint in `storage` (normalized), which Ray
    Train resumes from; None where the run has no checkpoint there."""
    if "://" in storage:
        fs, root = pyarrow.fs.FileSystem.from_uri(storage)
    else:
        fs, root = pyarrow.fs.LocalFileSystem(), storage
    # Unreadable storage or metadata: training reports that itself, in its own words.
    try:
        found = fs.get_file_info(pyarrow.fs.FileSelector(f"{root}/{name}", allow_not_found=True))
    except OSError:
        return None  # no checkpoint is known to be there
    # Ray Train names checkpoints by their time: checkpoint_2026-11-29_10-30-13.674992.
    newest = max((info.path for info in found if info.type == pyarrow.fs.FileType.Directory
                  and info.base_name.startswith("checkpoint_")), default=None)
    if newest is None:
        return None
    try:
        with fs.open_input_stream(f"{newest}/{checkpoint.META_FILE}") as meta:
            return json.loads(meta.read())
    except (OSError, ValueError):
        return {}


def normalize_storage(storage: str) -> str:
    """An absolute local path, or a URI that pyarrow can open (s3://, gs://, ...)."""
    if "://" not in storage:
        path = Path(storage).expanduser().resolve()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot use storage {storage} as a folder: "
                            f"{exc.strerror or exc}") from None
        return str(path)
    probe(storage)
    return storage


def checkpoint_uri(storage: str, path: str) -> str:
    """The URI of a checkpoint path that pyarrow gave relative to the storage's filesystem."""
    if "://" in storage:
        return f"{storage.split('://', 1)[0]}://{path}"  # s3: bucket/key; file: /abs/path
    return path
