"""The baseline of `distdl bench train`: the plainest PyTorch loop, in one process, over the
training split held in memory as tensors."""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from torch import nn

from distdl.config import Config
from distdl.data.transforms import normalize, to_float_chw
from distdl.models import build_model
from distdl.train import trainer
from distdl.train.loop import make_optimizer


def training_tensors(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """The training split, normalized, exactly as the distdl workers hold it."""
    data = trainer.prepare_data(cfg)
    batches = list(data.images.train.iter_batches(batch_size=None, batch_format="numpy"))
    images = torch.from_numpy(np.concatenate([b["image"] for b in batches]))
    labels = torch.from_numpy(np.concatenate([b["label"] for b in batches]).astype(np.int64))
    norm = data.normalization
    return normalize(to_float_chw(images), norm["mean"], norm["std"]), labels


def samples_per_s(cfg: Config, images: torch.Tensor, labels: torch.Tensor, *,
                  threads: int) -> float:
    """Steady-state samples/s of the plainest PyTorch loop: shuffle, slice, step."""
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, num_classes=int(labels.max()) + 1,
                        in_channels=images.shape[1], image_size=images.shape[2])
    optimizer = make_optimizer(model, cfg.optim)
    loss_fn = nn.CrossEntropyLoss()
    rates = []
    batch = cfg.train.batch_size
    for _ in range(cfg.train.epochs):
        started, order = time.perf_counter(), torch.randperm(len(labels))
        steps = len(labels) // batch
        model.train()
        for i in range(steps):
            index = order[i * batch:(i + 1) * batch]
            loss = loss_fn(model(images[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        rates.append(steps * batch / (time.perf_counter() - started))
    return statistics.median(rates[1:])
