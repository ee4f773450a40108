"""A worker's share of a dataset, as batches of normalized tensors.

When the shard fits the memory budget it is read from Ray Data once, converted and normalized
once, and kept as tensors (on the GPU when training there): every later epoch is pure tensor
indexing, with no per-batch conversion. Larger shards stream from Ray Data every epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch

from distdl.data.transforms import normalize, per_channel, to_float_chw

_READ_BATCH = 4096  # rows per Ray Data batch when loading a shard into memory


class Shard(Protocol):
    def batches(
        self, batch_size: int, *, shuffle: bool, seed: int, drop_last: bool
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


class InMemoryShard:
    """Normalized images (N, C, H, W) and labels (N,) held as tensors on one device."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images = images
        self.labels = labels

    @classmethod
    def from_arrays(cls, images: np.ndarray, labels: np.ndarray, mean, std,
                    device: torch.device, channels_last: bool) -> InMemoryShard:
        """uint8 images (N, H, W, C) and integer labels -> normalized tensors on `device`."""
        # One layout for the whole run: DDP's gradient buckets expect the layout of the first step.
        layout = torch.channels_last if channels_last else torch.contiguous_format
        x = normalize(to_float_chw(torch.from_numpy(images), layout), mean, std)
        y = torch.from_numpy(labels.astype(np.int64))
        return cls(x.to(device), y.to(device))

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, *, shuffle: bool, seed: int, drop_last: bool):
        n = len(self)
        if shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
            order = order.to(self.images.device)
        else:
            order = torch.arange(n, device=self.images.device)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            index = order[start:start + batch_size]
            yield self.images[index], self.labels[index]


class StreamingShard:
    """Reads its rows from Ray Data every epoch; for shards that do not fit in memory."""

    def __init__(self, iterator, mean, std, device: torch.device, channels_last: bool):
        self.iterator = iterator
        self.mean, self.std = per_channel(mean, device), per_channel(std, device)
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def batches(self, batch_size: int, *, shuffle: bool, seed: int, drop_last: bool):
        for batch in self.iterator.iter_torch_batches(
            batch_size=batch_size,
            drop_last=drop_last,
            local_shuffle_buffer_size=4 * batch_size if shuffle else None,
            local_shuffle_seed=seed if shuffle else None,
            pin_memory=self.device.type == "cuda",
        ):
            x = batch["image"].to(self.device, non_blocking=True)
            x = normalize(to_float_chw(x, self.memory_format), self.mean, self.std)
            yield x, batch["label"].to(self.device)


def load_in_memory(
    iterator, mean, std, device: torch.device, channels_last: bool
) -> InMemoryShard:
    """Read the whole shard once and keep it as normalized tensors on `device`."""
    images, labels = [], []
    for batch in iterator.iter_batches(batch_size=_READ_BATCH, batch_format="numpy"):
        images.append(batch["image"])
        labels.append(batch["label"])
    if not images:
        # A split with fewer blocks than workers leaves some ranks without rows. For validation
        # that is fine (they add nothing to the sums); for training the ranks' step counts,
        # agreed in worker.py, come out as zero and stop the run with its own error.
        return InMemoryShard(torch.empty(0), torch.empty(0, dtype=torch.int64))
    return InMemoryShard.from_arrays(np.concatenate(images), np.concatenate(labels), mean, std,
                                     device, channels_last)
