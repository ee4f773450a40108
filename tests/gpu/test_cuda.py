"""What a training worker and a Serve replica do on a GPU, without Ray: mixed precision (bf16, or
fp16 with a grad scaler), channels_last, torch.compile and the Predictor.

Every test here skips on a machine without CUDA. Run them where there is one:
    python -m pytest tests/gpu
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from distdl import runtime
from distdl.config import DataConfig, ModelConfig, OptimConfig
from distdl.inference.predictor import Predictor
from distdl.models import build_model
from distdl.train import checkpoint, loop
from distdl.train.shard import InMemoryShard

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)"),
]

MEAN, STD = [0.5] * 3, [0.25] * 3
MODEL = ModelConfig(name="resnet18", width=16, dropout=0.0)
OPTIM = OptimConfig(optimizer="sgd", lr=0.05, momentum=0.9, warmup_epochs=0, schedule="constant")


def _two_classes(n: int = 1024, side: int = 32, seed: int = 0):
    """Dark and bright noisy images: easy to learn, so a broken step shows as no learning."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    base = np.where(labels == 1, 170.0, 85.0)[:, None, None, None]
    images = np.clip(base + rng.normal(0, 30, (n, side, side, 3)), 0, 255).astype(np.uint8)
    return images, labels


def _train(dtype: torch.dtype | None, *, channels_last: bool = True, compiled: bool = False,
           epochs: int = 3):
    """Train a small ResNet-18 on the GPU as a worker does: (model, epoch losses, val, shard)."""
    device = torch.device("cuda")
    images, labels = _two_classes()
    shard = InMemoryShard.from_arrays(images, labels, MEAN, STD, device, channels_last)
    torch.manual_seed(0)
    model = build_model(MODEL, num_classes=2, in_channels=3, image_size=32).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = loop.make_optimizer(model, OPTIM)
    scheduler = loop.make_scheduler(optimizer, OPTIM, epochs=epochs, steps_per_epoch=16)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    step_model = torch.compile(model) if compiled else model
    losses = []
    for epoch in range(epochs):
        batches = shard.batches(64, shuffle=True, seed=epoch, drop_last=True)
        sums = loop.train_epoch(step_model, batches, optimizer, scheduler, nn.CrossEntropyLoss(),
                                autocast_dtype=dtype, scaler=scaler)
        losses.append(sums.loss / sums.count)
    val = loop.evaluate(step_model, shard.batches(256, shuffle=False, seed=0, drop_last=False),
                        autocast_dtype=dtype)
    return model, losses, val, shard


@pytest.fixture(scope="module")
def mixed_precision_run():
    return _train(runtime.autocast_dtype(torch.device("cuda")))


def test_mixed_precision_channels_last_training_learns(mixed_precision_run):
    model, losses, val, shard = mixed_precision_run
    assert runtime.autocast_dtype(torch.device("cuda")) in (torch.bfloat16, torch.float16)
    assert shard.images.is_cuda and shard.images.is_contiguous(memory_format=torch.channels_last)
    assert losses[-1] < losses[0] / 2
    assert val.correct / val.count > 0.95
    # Autocast computes in low precision but keeps the weights (and the optimizer) in float32.
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())


def test_fp16_with_grad_scaler_learns():
    _, losses, val, _ = _train(torch.float16)
    assert losses[-1] < losses[0] / 2
    assert val.correct / val.count > 0.95


def test_compiled_step_follows_the_eager_step():
    _, eager, _, _ = _train(None, channels_last=False, epochs=2)
    _, compiled, _, _ = _train(None, channels_last=False, compiled=True, epochs=2)
    # Same start, same batches: fused kernels round differently, so close but not bit-equal.
    assert compiled == pytest.approx(eager, rel=0.05)
    assert compiled[-1] < compiled[0]


def test_gpu_predictor_agrees_with_cpu_predictor(mixed_precision_run, tmp_path):
    model, *_ = mixed_precision_run
    meta = checkpoint.make_meta(model=MODEL, classes=["dark", "bright"], input_shape=(3, 32, 32),
                                normalization={"mean": MEAN, "std": STD}, data=DataConfig())
    checkpoint.save(tmp_path, model, meta)
    images, labels = _two_classes(256, seed=1)
    gpu = Predictor.from_checkpoint(tmp_path, torch.device("cuda"))
    cpu = Predictor.from_checkpoint(tmp_path, torch.device("cpu"))
    gpu_probs, cpu_probs = gpu.predict(images), cpu.predict(images)
    conv = next(p for p in gpu.model.parameters() if p.ndim == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert gpu_probs.dtype == np.float32 and gpu_probs.shape == (256, 2)
    assert np.abs(gpu_probs - cpu_probs).max() < 0.05  # bf16/fp16 against float32
    assert (gpu_probs.argmax(1) == labels).mean() > 0.95
    # Without autocast the GPU computes in float32 (TF32 in convolutions): closer to the CPU.
    full = Predictor.from_checkpoint(tmp_path, torch.device("cuda"), mixed_precision=False)
    full_error = np.abs(full.predict(images) - cpu_probs).max()
    assert full_error < min(0.01, np.abs(gpu_probs - cpu_probs).max())
    # Other sizes are resized on the host exactly as on CPU.
    assert gpu.predict(images[:4, :20, :20]).argmax(1).tolist() == \
        cpu.predict(images[:4, :20, :20]).argmax(1).tolist()
