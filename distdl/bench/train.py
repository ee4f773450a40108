"""`distdl bench train`: the distdl training loop against a bare PyTorch loop, in one run.

Both train the same model with the same optimizer on the same in-memory training split, with the
same global batch and the same total CPU threads. Steady state is the median of the per-epoch
rates, leaving out the first epoch of each (start-up, caches): the median, so that one epoch
slowed by something else on the machine does not pull the figure down. Those rates time the
training steps only; the epoch period (the mean time from the start of one epoch to the start of
the next, over the same epochs) adds what distdl does around them: validation, and the
checkpoints and reports to Ray Train, which short epochs share.
"""

from __future__ import annotations

import dataclasses
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from distdl import provenance, runtime
from distdl.config import Config, TrainConfig
from distdl.errors import UserError
from distdl.train import rundir, trainer
from distdl.train.model_check import ModelCheck


def run(cfg: Config, *, command_started: float,
        check: ModelCheck | None = None) -> dict[str, Any]:
    """`check`: started at the command's start, as `distdl train` starts it (trainer.train)."""
    import ray

    if cfg.train.use_gpu:
        raise UserError("distdl bench train compares CPU workers with a bare CPU loop; for GPU "
                        "training use distdl bench step, or --set train.use_gpu=false")
    if cfg.train.epochs < 3:  # steady state leaves out the first epoch and needs two after it
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=3))
    threads = worker_threads(cfg.train)
    runtime.connect(None, num_cpus=runtime.local_cpus(cfg.train.worker_cpus()))
    with tempfile.TemporaryDirectory() as storage:
        result = trainer.train(cfg, storage=storage, run_dir=Path(storage) / cfg.name,
                               check=check)
        history = rundir.read_metrics(Path(storage) / cfg.name)
    ended = time.time()
    # torch, only now: imported earlier, it would have slowed distdl's start-up (model_check.py)
    from distdl.bench import bare_loop

    images, labels = bare_loop.training_tensors(cfg)
    ray.shutdown()  # the baseline gets the machine to itself
    bare = bare_loop.samples_per_s(cfg, images, labels, threads=threads)
    floor = ray_train_floor(cfg.train.num_workers, cfg.train.cpus_per_worker)
    distdl_rate = statistics.median(m["samples_per_s"] for m in history[1:])
    starts = [m["started_at"] for m in history]
    period = (starts[-1] - starts[1]) / (len(starts) - 2)
    return {
        "distdl_samples_per_s": round(distdl_rate, 1),
        "bare_samples_per_s": round(bare, 1),
        "ratio_vs_bare": round(distdl_rate / bare, 3),
        "epoch_period_s": round(period, 3),
        "seconds_to_first_step": round(history[0]["started_at"] - command_started, 2),
        "seconds_to_end": round(ended - command_started, 2),
        "ray_train_floor_s": floor,
        "best_val_accuracy": result["best_val_accuracy"],
        "epochs": cfg.train.epochs,
        "workers": cfg.train.num_workers,
        "threads": threads,
        "model": cfg.model.name,
        "data": cfg.data.source,
        "provenance": provenance.collect(),
    }


def worker_threads(train: TrainConfig) -> int:
    """The torch threads of all the workers together (worker.py gives each
    runtime.torch_threads): the bare loop gets as many."""
    return train.num_workers * runtime.torch_threads(train.cpus_per_worker)


def ray_train_floor(workers: int, cpus_per_worker: float) -> float:
    """Seconds from launching the plainest Ray Train run (train_floor.py) to its training
    function: the part of distdl's start-up that Ray Train itself takes on this machine."""
    with tempfile.TemporaryDirectory() as directory:
        launched = time.time()
        done = subprocess.run([sys.executable, "-m", "distdl.bench.train_floor", str(workers),
                               str(cpus_per_worker), directory],
                              capture_output=True, text=True, timeout=300)
        entered = Path(directory, "entered")
        if done.returncode != 0 or not entered.exists():
            raise RuntimeError(f"the Ray Train floor run failed: {done.stderr[-2000:]}")
        return round(float(entered.read_text()) - launched, 2)


def format_report(report: dict[str, Any]) -> str:
    return "\n".join([
        f"{report['model']} on {report['data']}, {report['epochs']} epochs, "
        f"{report['workers']} workers / {report['threads']} threads in total",
        f"  distdl (Ray Train, DDP)   {report['distdl_samples_per_s']:>10,.0f} samples/s",
        f"  bare PyTorch loop         {report['bare_samples_per_s']:>10,.0f} samples/s",
        f"  ratio vs bare             {report['ratio_vs_bare']:>10.3f}",
        f"  distdl epoch, start to start {report['epoch_period_s'] * 1000:.0f} ms"
        " on average (steps, validation, checkpoints, reports)",
        f"  command start -> first step  {report['seconds_to_first_step']:.1f} s"
        f"   (the plainest Ray Train run: {report['ray_train_floor_s']:.1f} s)",
        f"  command start -> end         {report['seconds_to_end']:.1f} s",
    ])
