"""The start-up floor of Ray Train here: its plainest run, in a process of its own.

    python -m distdl.bench.train_floor WORKERS CPUS_PER_WORKER DIRECTORY

Started as `distdl train` starts (a local Ray on loopback with the same CPUs, the same
torch.distributed backend), with no data, no model and no checkpoint: rank 0's training function
only writes the time it was entered to DIRECTORY/entered, and Ray Train keeps its run there.
`distdl bench train` times this process from its launch, so the figure counts the same kind of
imports and start-up as distdl's "command start -> first step", and the difference is what
distdl adds.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def _enter(config: dict) -> None:
    import ray.train

    if ray.train.get_context().get_world_rank() == 0:
        Path(config["directory"], "entered").write_text(f"{time.time()}\n")


def main() -> None:
    workers, cpus, directory = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
    import ray.train
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from distdl import runtime
    from distdl.train.backend import TorchDistributed

    runtime.connect(None, num_cpus=runtime.local_cpus(workers * cpus))
    scaling = ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": cpus})
    DataParallelTrainer(_enter, backend_config=TorchDistributed(),
                        train_loop_config={"directory": directory}, scaling_config=scaling,
                        run_config=ray.train.RunConfig(storage_path=directory)).fit()


if __name__ == "__main__":
    main()
