"""`distdl bench step`: what runs inside one training worker and one Serve replica, against bare
PyTorch loops doing the same work, on this machine's device (its GPU where it has one).

No Ray: this isolates the cost of distdl's own code (the training loop over an in-memory shard,
the Predictor with its preprocessing) from Ray's. Both sides use the same model, data, precision,
memory format and compile setting, and they take turns, so a drifting machine slows both alike.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from distdl import provenance, runtime
from distdl.config import DataConfig, ModelConfig, OptimConfig
from distdl.errors import UserError
from distdl.inference.predictor import Predictor
from distdl.models import TORCHVISION, build_checked, build_model
from distdl.train import checkpoint, loop
from distdl.train.shard import InMemoryShard

_CLASSES = 10
_MEAN, _STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
_PREDICT_BATCHES = (1, 32)  # one request alone, and a full Serve batch


@dataclass(frozen=True)
class StepSettings:
    model: str = "resnet18"
    width: int = 64
    """Channels of the first convolution; 64 as in the shapes_resnet18_gpu recipe."""
    image_size: int = 32
    batch_size: int = 512
    steps: int = 40
    """Training steps per timed epoch."""
    amp: bool = True
    """GPU only, as in training: bf16 where supported, else fp16 with a grad scaler."""
    channels_last: bool = True
    """GPU only: on CPU both sides run NCHW, as the Predictor does there (CPU training workers
    use channels_last, which this benchmark does not time)."""
    compile: bool = False
    rounds: int = 3
    """Timed turns of each side; the median is reported."""


@dataclass(frozen=True)
class _Device:
    device: torch.device
    dtype: torch.dtype | None
    memory_format: torch.memory_format

    @classmethod
    def choose(cls, s: StepSettings) -> _Device:
        device = torch.device("cuda" if runtime.cuda_available() else "cpu")
        gpu = device.type == "cuda"
        return cls(device, runtime.autocast_dtype(device) if s.amp else None,
                   torch.channels_last if s.channels_last and gpu else torch.contiguous_format)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32,
                              enabled=self.dtype is not None)


def check(s: StepSettings) -> None:
    """A model that cannot train on the images, or images that would not fit in memory: one
    line, before any is made."""
    build_checked(_model_config(s), num_classes=_CLASSES, shape=(3, s.image_size, s.image_size),
                  batch=min(2, s.batch_size), fix="use another --image-size or --batch-size, "
                  "or another --model")
    if s.batch_size * s.steps < max(_PREDICT_BATCHES):
        raise UserError(f"the Predictor is timed on batches of up to {max(_PREDICT_BATCHES)} of "
                        f"the training images: --batch-size x --steps must be at least that")
    # The uint8 images, and a float32 copy of them on each side.
    needed = s.batch_size * s.steps * 3 * s.image_size**2 * (1 + 4 + 4)
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if needed > free // 2:
        raise UserError(f"the benchmark's {s.batch_size * s.steps} images of {s.image_size}x"
                        f"{s.image_size} need {needed / 2**30:.1f} GiB, and {free / 2**30:.1f} "
                        "GiB of memory is free; lower --steps, --batch-size or --image-size")


def run(s: StepSettings) -> dict[str, Any]:
    dev = _Device.choose(s)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (s.batch_size * s.steps, s.image_size, s.image_size, 3),
                          dtype=np.uint8)
    labels = rng.integers(0, _CLASSES, len(images))
    train = _compare(_distdl_train(s, dev, images, labels), _bare_train(s, dev, images, labels),
                     s.rounds, dev)
    report: dict[str, Any] = {"device": str(dev.device), "autocast": str(dev.dtype),
                              "memory_format": str(dev.memory_format), "settings": asdict(s),
                              "train": train}
    with tempfile.TemporaryDirectory() as directory:
        _save_checkpoint(s, directory)
        for batch in _PREDICT_BATCHES:
            requests = [images[i:i + batch] for i in range(0, min(64 * batch, len(images)), batch)]
            report[f"predict_batch_{batch}"] = _compare(
                _distdl_predict(directory, dev, requests), _bare_predict(directory, dev, requests),
                s.rounds, dev)
    report["provenance"] = provenance.collect()
    return report


def _compare(distdl_side: Callable[[int], int], bare_side: Callable[[int], int], rounds: int,
             dev: _Device) -> dict[str, float]:
    """Samples/s of each side (median of `rounds` alternating turns, after one warm-up each)."""
    rates: dict[str, list[float]] = {"distdl": [], "bare": []}
    for turn in range(rounds + 1):
        for name, side in (("distdl", distdl_side), ("bare", bare_side)):
            dev.sync()
            started = time.perf_counter()
            samples = side(turn)
            dev.sync()
            if turn > 0:  # the first turn compiles, warms caches and allocators
                rates[name].append(samples / (time.perf_counter() - started))
    distdl_rate, bare_rate = (statistics.median(rates[k]) for k in ("distdl", "bare"))
    return {"distdl_samples_per_s": round(distdl_rate, 1),
            "bare_samples_per_s": round(bare_rate, 1),
            "ratio_vs_bare": round(distdl_rate / bare_rate, 3)}


def _model_config(s: StepSettings) -> ModelConfig:
    return ModelConfig(name=s.model, width=s.width, dropout=0.0)


def _model(s: StepSettings, dev: _Device) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(_model_config(s), num_classes=_CLASSES, in_channels=3,
                        image_size=s.image_size)
    return model.to(dev.device, memory_format=dev.memory_format)


def _distdl_train(s: StepSettings, dev: _Device, images, labels) -> Callable[[int], int]:
    """An epoch as a training worker runs it: loop.train_epoch over an InMemoryShard."""
    shard = InMemoryShard.from_arrays(images, labels, _MEAN, _STD, dev.device,
                                      dev.memory_format == torch.channels_last)
    model = _model(s, dev)
    optim_cfg = OptimConfig(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=0.0,
                            warmup_epochs=0, schedule="constant")
    optimizer = loop.make_optimizer(model, optim_cfg)
    scheduler = loop.make_scheduler(optimizer, optim_cfg, epochs=1, steps_per_epoch=s.steps)
    scaler = torch.amp.GradScaler("cuda") if dev.dtype == torch.float16 else None
    step_model = torch.compile(model) if s.compile else model
    loss_fn = nn.CrossEntropyLoss()

    def epoch(turn: int) -> int:
        batches = shard.batches(s.batch_size, shuffle=True, seed=turn, drop_last=True)
        return loop.train_epoch(step_model, batches, optimizer, scheduler, loss_fn,
                                autocast_dtype=dev.dtype, scaler=scaler).count

    return epoch


def _bare_train(s: StepSettings, dev: _Device, images, labels) -> Callable[[int], int]:
    """The same epoch as the plainest hand-written loop over tensors already on the device."""
    x = _bare_preprocess(torch.from_numpy(images).to(dev.device), dev)
    y = torch.from_numpy(labels).to(dev.device)
    model = _model(s, dev)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    scaler = torch.amp.GradScaler("cuda", enabled=dev.dtype == torch.float16)
    step_model = torch.compile(model) if s.compile else model

    def epoch(turn: int) -> int:
        model.train()
        order = torch.randperm(len(y), device=dev.device)
        for i in range(s.steps):
            index = order[i * s.batch_size:(i + 1) * s.batch_size]
            with dev.autocast():
                loss = nn.functional.cross_entropy(step_model(x[index]), y[index])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        return s.steps * s.batch_size

    return epoch


def _bare_preprocess(images: torch.Tensor, dev: _Device) -> torch.Tensor:
    mean = torch.tensor(_MEAN, device=dev.device).view(1, -1, 1, 1)
    std = torch.tensor(_STD, device=dev.device).view(1, -1, 1, 1)
    x = (images.permute(0, 3, 1, 2).float() / 255 - mean) / std
    return x.contiguous(memory_format=dev.memory_format)


def _save_checkpoint(s: StepSettings, directory: str) -> None:
    model = build_model(_model_config(s), num_classes=_CLASSES, in_channels=3,
                        image_size=s.image_size)
    meta = checkpoint.make_meta(model=_model_config(s),
                                input_shape=(3, s.image_size, s.image_size),
                                classes=[str(c) for c in range(_CLASSES)],
                                normalization={"mean": _MEAN, "std": _STD}, data=DataConfig())
    checkpoint.save(directory, model, meta)


def _distdl_predict(directory: str, dev: _Device, requests) -> Callable[[int], int]:
    predictor = Predictor.from_checkpoint(directory, dev.device,
                                          channels_last=dev.memory_format == torch.channels_last,
                                          mixed_precision=dev.dtype is not None)

    def serve(turn: int) -> int:
        for images in requests:
            predictor.predict(images)
        return sum(len(images) for images in requests)

    return serve


def _bare_predict(directory: str, dev: _Device, requests) -> Callable[[int], int]:
    """Host uint8 images in, host probabilities out, as a server needs them, written plainly:
    the model as trained, without the Predictor's batch-norm folding."""
    model, _ = checkpoint.load_model(directory)
    model = model.to(dev.device, memory_format=dev.memory_format).eval()

    @torch.inference_mode()
    def serve(turn: int) -> int:
        for images in requests:
            x = _bare_preprocess(torch.from_numpy(images).to(dev.device), dev)
            with dev.autocast():
                logits = model(x)
            torch.softmax(logits.float(), dim=1).cpu().numpy()
        return sum(len(images) for images in requests)

    return serve


def format_report(report: dict[str, Any]) -> str:
    s = report["settings"]
    width = "" if s["model"].startswith(TORCHVISION) else f" (width {s['width']})"  # theirs fixed
    lines = [f"{s['model']}{width} at {s['image_size']}x{s['image_size']} "
             f"on {report['device']} "
             f"(autocast {report['autocast']}, {report['memory_format']}, "
             f"compile {s['compile']}), median of {s['rounds']} turns"]
    rows = [("train", f"training, batch {s['batch_size']}"),
            *((f"predict_batch_{b}", f"Predictor, batch {b}") for b in _PREDICT_BATCHES)]
    for key, label in rows:
        r = report[key]
        lines.append(f"  {label:<22} distdl {r['distdl_samples_per_s']:>10,.0f}/s   bare "
                     f"{r['bare_samples_per_s']:>10,.0f}/s   ratio {r['ratio_vs_bare']:.3f}")
    return "\n".join(lines)
