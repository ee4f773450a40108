"""Named presets: a recipe is a partial config that `--config` files and `--set` refine."""

from __future__ import annotations

from typing import Any

from distdl.errors import UserError

DEFAULT = "digits_cpu"

RECIPES: dict[str, dict[str, Any]] = {
    # The real handwritten digits (1,797 8x8 images) on CPU. A step on 8x8 images is so cheap
    # that DDP's per-step all-reduce (about 1.5 ms with gloo here) dominates small batches:
    # 256 keeps the two workers as fast as one process using both cores, and still reaches
    # about 98.5% validation accuracy.
    "digits_cpu": {
        "name": "digits",
        "data": {"source": "digits"},
        "model": {"name": "small_cnn", "width": 32, "depth": 2},
        "optim": {"optimizer": "adamw", "lr": 1e-2, "weight_decay": 5e-4},  # lr per batch of 256
        "train": {"epochs": 20, "batch_size": 256, "num_workers": 2},
    },
    # ResNet-18 on 50,000 generated 32x32 shape images, one GPU per worker. The global batch is
    # fixed, so `--set train.num_workers=N` spreads the same optimization over N GPUs.
    "shapes_resnet18_gpu": {
        "name": "shapes-resnet18",
        "data": {"source": "shapes", "num_samples": 50_000, "image_size": 32},
        "model": {"name": "resnet18", "width": 64, "dropout": 0.0},
        "optim": {"optimizer": "sgd", "lr": 0.4, "momentum": 0.9, "weight_decay": 5e-4,
                  "schedule": "onecycle", "label_smoothing": 0.1},  # lr per batch of 512
        "train": {"epochs": 20, "batch_size": 512, "num_workers": 1, "use_gpu": True,
                  "cpus_per_worker": 4, "amp": True, "channels_last": True},
    },
    # A search on CPU in a few minutes (`distdl tune`): a narrow small_cnn, one worker per trial
    # so that the trials, not DDP ranks, share the cores; ASHA stops weak trials after epoch 1 or 2.
    "digits_tune": {
        "name": "digits-tune",
        "data": {"source": "digits"},
        "model": {"name": "small_cnn", "width": 16, "depth": 2},
        "optim": {"optimizer": "adamw", "lr": 1e-2, "warmup_epochs": 0},
        "train": {"epochs": 6, "batch_size": 64, "num_workers": 1, "max_failures": 1},
        "tune": {
            "num_samples": 8,
            "scheduler": "asha",
            "metric": "val_accuracy",
            "mode": "max",
            "grace_period": 1,  # epochs before a trial may be stopped
            "reduction_factor": 2,  # about half the trials go on at each rung (epochs 1, 2, 4)
            "seed": 0,
            "space": {
                "optim.lr": {"loguniform": [1e-4, 1e-1]},  # per batch of train.batch_size
                "optim.weight_decay": {"loguniform": [1e-5, 1e-2]},
                "optim.label_smoothing": {"uniform": [0.0, 0.2]},
                "train.batch_size": {"choice": [32, 64, 128]},  # global batch
                "model.width": {"choice": [8, 16, 32]},  # channels of the first convolution
            },
        },
    },
    # Seconds on CPU: what tests and smoke checks run.
    "debug": {
        "name": "debug",
        "data": {"source": "digits"},
        "model": {"name": "small_cnn", "width": 8, "depth": 2},
        "optim": {"lr": 1e-2, "warmup_epochs": 0},
        "train": {"epochs": 2, "batch_size": 64, "num_workers": 2, "max_failures": 0},
    },
}


def get(name: str) -> dict[str, Any]:
    if name not in RECIPES:
        raise UserError(f"unknown recipe '{name}'; choose one of: {', '.join(RECIPES)}")
    return RECIPES[name]
