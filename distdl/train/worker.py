"""What each Ray Train worker runs: set up one DDP rank, restore, train, evaluate, report."""

from __future__ import annotations

import itertools
import logging
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from distdl import runtime
from distdl.config import TrainConfig
from distdl.models import build_model
from distdl.train import checkpoint, loop, rundir, shm_allreduce
from distdl.train.shard import InMemoryShard, Shard, StreamingShard, load_in_memory
from distdl.train.spec import WorkerSpec

log = logging.getLogger(__name__)


@dataclass
class _Setup:
    model: nn.Module
    """What runs the steps: DDP-wrapped, perhaps compiled."""
    raw: nn.Module
    """The plain module whose state_dict goes into checkpoints."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    autocast_dtype: torch.dtype | None
    """Mixed precision on GPU (bf16 or fp16); None trains in float32."""
    scaler: torch.amp.GradScaler | None
    start_epoch: int
    restored_epochs: list[dict[str, Any]]
    """The metrics of the epochs reported with the checkpoint the run restored from, if any."""


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    spec: WorkerSpec = loop_config["spec"]
    cfg = spec.config
    torch.set_num_threads(runtime.torch_threads(cfg.train.cpus_per_worker))
    device = ray.train.torch.get_device()
    channels_last = cfg.train.channels_last
    # Asking for both shards before reading either lets Ray start their split coordinators at once.
    iterators = {name: ray.train.get_dataset_shard(name) for name in ("train", "val")}
    train_data = _shard(iterators["train"], spec, device, channels_last)
    val_data = _shard(iterators["val"], spec, device, channels_last)
    steps = _steps_per_epoch(train_data, spec, device)
    setup = _setup(spec, device, channels_last, steps)
    fit(setup, spec, train_data, val_data, steps)


def _shard(iterator, spec: WorkerSpec, device: torch.device, channels_last: bool) -> Shard:
    norm = spec.meta["normalization"]
    if spec.in_memory:
        return load_in_memory(iterator, norm["mean"], norm["std"], device, channels_last)
    return StreamingShard(iterator, norm["mean"], norm["std"], device, channels_last)


def _steps_per_epoch(shard: Shard, spec: WorkerSpec, device: torch.device) -> int:
    """Steps every rank takes per epoch: DDP hangs if one rank steps when another does not.

    Shards split by whole blocks may differ by a few rows, so in-memory shards agree on the
    smallest count; streamed shards come from Train's equal split.
    """
    if not isinstance(shard, InMemoryShard):
        return spec.steps_per_epoch
    steps = torch.tensor([len(shard) // spec.config.train.batch_size_per_worker()], device=device)
    if dist.is_initialized():
        dist.all_reduce(steps, op=dist.ReduceOp.MIN)
    if int(steps) == 0:
        raise ValueError("a worker's shard holds less than one batch; lower train.batch_size "
                         "or train.num_workers")
    return int(steps)


def _setup(spec: WorkerSpec, device: torch.device, channels_last: bool, steps: int) -> _Setup:
    cfg = spec.config
    torch.manual_seed(cfg.train.seed)
    channels, size, _ = spec.meta["input_shape"]
    raw = build_model(cfg.model, num_classes=len(spec.meta["classes"]),
                      in_channels=channels, image_size=size)
    if channels_last:
        raw = raw.to(memory_format=torch.channels_last)
    optimizer = loop.make_optimizer(raw, cfg.optim)
    scheduler = loop.make_scheduler(optimizer, cfg.optim, epochs=cfg.train.epochs,
                                    steps_per_epoch=steps)
    dtype = runtime.autocast_dtype(device) if cfg.train.amp else None
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    start_epoch, restored_epochs = _restore(raw, optimizer, scheduler, scaler)
    # Restore before wrapping: DDP broadcasts rank 0's weights to the other ranks at wrap time.
    # Buffers (batch-norm statistics) are not broadcast before every forward pass: that is one
    # more collective per step. `fit` averages them across ranks once per epoch instead.
    model = ray.train.torch.prepare_model(
        raw, parallel_strategy_kwargs={"forward_sync_buffers": False})
    if _one_cpu_node(device) and cfg.train.shm_allreduce and shm_allreduce.attach(model):
        log.info("gradients are averaged through shared memory, not gloo")
    if cfg.train.compile:
        model = torch.compile(model)
    return _Setup(model, raw, optimizer, scheduler, dtype, scaler, start_epoch, restored_epochs)


def _one_cpu_node(device: torch.device) -> bool:
    """Several CPU ranks, all on one node: the same answer on every rank."""
    context = ray.train.get_context()
    world = context.get_world_size()
    return device.type == "cpu" and world > 1 and context.get_local_world_size() == world


def _restore(raw, optimizer, scheduler, scaler) -> tuple[int, list[dict[str, Any]]]:
    """Load the latest checkpoint of this run, if any; returns the first epoch to train and the
    metrics of the epochs reported with that checkpoint."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 1, []
    with ckpt.as_directory() as directory:
        try:
            raw.load_state_dict(checkpoint.load_state_dict(directory))
        except RuntimeError:
            raise ValueError("the run's latest checkpoint holds a different model than the config "
                             "asks for; start a new run with another --name") from None
        state = checkpoint.load_train_state(directory)
        meta = checkpoint.load_meta(directory)
    optimizer.load_state_dict(state["optimizer"])
    loop.resume_schedule(scheduler, state["scheduler"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    log.info("restored from the checkpoint of epoch %d", state["epoch"])
    if "metrics" not in meta:
        return state["epoch"] + 1, []
    return state["epoch"] + 1, [*meta.get(rundir.EARLIER_EPOCHS, []), meta["metrics"]]


def fit(setup: _Setup, spec: WorkerSpec, train_data: Shard, val_data: Shard, steps: int) -> None:
    cfg = spec.config
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    dtype = setup.autocast_dtype
    rank = ray.train.get_context().get_world_rank()
    if setup.start_epoch > cfg.train.epochs and setup.restored_epochs:
        # Every epoch was trained, but the run was stopped, perhaps before its last report
        # reached the driver (the run directory, a Tune search): report those epochs again.
        node = _node()
        _report(setup, spec, [{**m, "node": node} for m in setup.restored_epochs], rank)
        return
    # The epochs of the checkpoint restored from go out again with the first report: if the
    # driver stopped after Ray Train took that checkpoint but before it recorded its epochs,
    # the run directory lacks them. Recording them twice leaves one line each (recorder.py).
    unreported: list[dict[str, Any]] = list(setup.restored_epochs)
    best_accuracy, reported_at = None, time.time()
    for epoch in range(setup.start_epoch, cfg.train.epochs + 1):
        started = time.time()
        # One seed per epoch and rank, for the shuffle and for dropout: ranks draw different
        # dropout masks, and a resumed epoch draws what it would have drawn without the stop.
        seed = cfg.train.seed * 100_003 + epoch * 101 + rank
        torch.manual_seed(seed)
        batches = train_data.batches(cfg.train.batch_size_per_worker(), shuffle=True,
                                     seed=seed, drop_last=True)
        batches = itertools.islice(batches, steps)
        train = loop.train_epoch(setup.model, batches, setup.optimizer, setup.scheduler,
                                 loss_fn, autocast_dtype=dtype, scaler=setup.scaler)
        train_s = time.time() - started
        _average_buffers(setup.raw)
        val = loop.evaluate(setup.model, val_data.batches(1024, shuffle=False, seed=0,
                                                          drop_last=False), autocast_dtype=dtype)
        metrics, since_report_s = _epoch_metrics(epoch, started, train_s, train, val, setup.raw,
                                                 since_report_s=time.time() - reported_at)
        metrics["lr"] = setup.scheduler.get_last_lr()[0]
        metrics["node"] = _node()
        unreported.append(metrics)
        if report_due(metrics, since_report_s, best_accuracy, cfg.train):
            _report(setup, spec, unreported, rank)
            unreported, reported_at = [], time.time()
            best_accuracy = max(best_accuracy or 0.0, metrics["val_accuracy"])


def report_due(metrics: dict[str, Any], since_report_s: float, best_accuracy: float | None,
               cfg: TrainConfig) -> bool:
    """Whether to report the epochs trained so far now, or hold them for a later report.

    Each report costs Ray Train's controller a checkpoint to register and perhaps an old one to
    delete, on the cores that train. With digits' 0.1 s epochs on 2 cores, reports at most once
    a second trained at a median of 14,014 samples/s against 13,474 with one per epoch, in 112
    against 120 ms per epoch (four alternated pairs of runs). The last epoch is always
    reported, and so is a new best validation accuracy: checkpoints are ranked by it, and the
    best one is never left out. Every rank must come to the same answer (a report is a
    collective), so the inputs are the ones summed across ranks.
    """
    new_best = best_accuracy is None or metrics["val_accuracy"] > best_accuracy
    return (new_best or metrics["epoch"] == cfg.epochs
            or since_report_s >= cfg.report_interval_s)


def _node() -> str:
    return ray.get_runtime_context().get_node_id()


def _average_buffers(model: nn.Module) -> None:
    """Average the floating-point buffers (batch-norm running statistics) across ranks, so
    that every rank validates, and rank 0 checkpoints, statistics of all the epoch's data."""
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    if not buffers or not dist.is_initialized():
        return
    flat = torch.cat([b.detach().flatten() for b in buffers])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for b, average in zip(buffers, flat.split([b.numel() for b in buffers])):
        b.copy_(average.view_as(b))


def _epoch_metrics(epoch, started, train_s, train: loop.Sums, val: loop.Sums, model, *,
                   since_report_s: float) -> tuple[dict[str, Any], float]:
    """Sum this rank's figures with the other ranks' and turn them into epoch metrics; also
    return the ranks' mean of `since_report_s`, the same number on every rank."""
    device = next(model.parameters()).device  # NCCL reduces tensors on the GPU only
    since = torch.tensor([since_report_s], dtype=torch.float64)
    both = torch.cat([train.as_tensor(), val.as_tensor(), since]).to(device)
    world = 1
    if dist.is_initialized():
        dist.all_reduce(both)
        world = dist.get_world_size()
    t_loss, _, t_count, v_loss, v_correct, v_count, since_sum = both.tolist()
    metrics = {
        "epoch": epoch,
        "train_loss": t_loss / max(t_count, 1),
        "val_loss": v_loss / max(v_count, 1),
        "val_accuracy": v_correct / max(v_count, 1),
        "samples_per_s": t_count / max(train_s, 1e-9),
        "epoch_s": time.time() - started,
        "started_at": started,
    }
    return metrics, since_sum / world


def _report(setup: _Setup, spec: WorkerSpec, epochs: list[dict[str, Any]], rank: int) -> None:
    """Report `epochs` (those trained since the last report) from every rank, with a checkpoint
    of the latest written by rank 0. Ray Train ranks checkpoints by the latest epoch's metrics;
    the earlier epochs ride along for the run directory."""
    *earlier, latest = epochs
    metrics = {**latest, rundir.EARLIER_EPOCHS: earlier} if earlier else latest
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        state = {
            "epoch": latest["epoch"],
            "optimizer": setup.optimizer.state_dict(),
            "scheduler": setup.scheduler.state_dict(),
        }
        if setup.scaler is not None:
            state["scaler"] = setup.scaler.state_dict()
        # The earlier epochs go into the checkpoint too: a rerun re-reports them all if this
        # report never reached the driver.
        meta = {**spec.meta, "epoch": latest["epoch"], "metrics": latest,
                rundir.EARLIER_EPOCHS: earlier}
        checkpoint.save(directory, setup.raw, meta, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
