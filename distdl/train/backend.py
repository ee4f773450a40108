"""torch.distributed on Ray Train's workers, with torch imported on the workers only.

Ray Train's TorchConfig lives in a module that imports torch, and Ray Train's controller
unpickles the trainer's settings, so with a TorchTrainer the controller imports torch for
nothing, while the workers start and import it themselves. Without it, `distdl bench train`
reached its first step at a median of 14.2 s against 15.3 s on this project's 2-core machine
(eight alternated pairs; sooner in seven, by up to 2.4 s). This backend does what
TorchConfig's does for distdl (gloo on CPU, NCCL on GPU, rendezvous at rank 0, torchrun's
environment variables, the current CUDA device), and imports torch inside the functions that
run on the workers.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import ray
import ray.train
from ray.train.backend import Backend, BackendConfig
from ray.train.v2._internal.util import TrainingFramework

log = logging.getLogger(__name__)

# A rank waits this long for the others at a collective; Ray Train's TorchConfig default.
TIMEOUT_S = 1800


@dataclass
class TorchDistributed(BackendConfig):
    """Give it to a DataParallelTrainer as `backend_config`, in place of a TorchTrainer."""

    timeout_s: int = TIMEOUT_S

    @property
    def backend_cls(self) -> type[Backend]:
        return _Backend

    @property
    def train_func_context(self) -> type:
        return _CurrentDevice

    @property
    def framework(self) -> TrainingFramework:
        return TrainingFramework.TORCH


class _Backend(Backend):
    def on_start(self, worker_group, backend_config: TorchDistributed) -> None:
        uses_gpu = worker_group.get_resources_per_worker().get("GPU", 0) > 0
        address, port = worker_group.execute_single(0, _address_and_port)
        size = len(worker_group)
        ray.get([
            worker_group.execute_single_async(rank, _join, address, port, rank, size,
                                              "nccl" if uses_gpu else "gloo",
                                              backend_config.timeout_s)
            for rank in range(size)
        ])

    def on_shutdown(self, worker_group, backend_config: TorchDistributed) -> None:
        # Bounded: a worker that hangs here must not keep the run from ending.
        try:
            ray.get(worker_group.execute_async(_leave), timeout=30)
        except ray.exceptions.GetTimeoutError:
            log.warning("torch.distributed did not shut down within 30 s on every worker")


class _CurrentDevice:
    """Around the training function, on its own thread: CUDA's current device is per thread."""

    def __enter__(self) -> None:
        import torch

        if torch.cuda.is_available():
            import ray.train.torch

            device = ray.train.torch.get_device()
            if device.type == "cuda":
                torch.cuda.set_device(device)

    def __exit__(self, *exc_info) -> None:
        pass


def _address_and_port() -> tuple[str, int]:
    from ray.train._internal.utils import get_address_and_port

    return get_address_and_port()


def _join(address: str, port: int, rank: int, size: int, backend: str, timeout_s: int) -> None:
    """On each worker: the environment torchrun would set, then the process group."""
    import torch.distributed as dist

    if backend == "nccl":
        # A collective that times out then fails the run instead of hanging it, as with
        # Ray Train's TorchConfig; a value set by the user wins.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    context = ray.train.get_context()
    os.environ.update(
        MASTER_ADDR=address, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size),
        LOCAL_RANK=str(context.get_local_rank()),
        LOCAL_WORLD_SIZE=str(context.get_local_world_size()),
        NODE_RANK=str(context.get_node_rank()),
    )
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=size,
                            timeout=timedelta(seconds=timeout_s))


def _leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
