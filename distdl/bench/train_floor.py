"""The start-up floor of Ray Train here: the plainest TorchTrainer, in a process of its own.

    python -m distdl.bench.train_floor WORKERS CPUS_PER_WORKER DIRECTORY

Started as `distdl train` starts (a local Ray on loopback with the same CPUs), with no data, no
model and no checkpoint: rank 0's training function only writes the time it was entered to
DIRECTORY/entered, and Ray Train keeps its run there. `distdl bench train` times this process
from its launch, so the figure counts the same kind of imports and start-up as distdl's
"command start -> first step", and the difference is what distdl adds.
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
    from ray.train.torch import TorchTrainer

    from distdl import runtime

    runtime.connect(None, num_cpus=runtime.local_cpus(workers * cpus))
    TorchTrainer(_enter, train_loop_config={"directory": directory},
                 scaling_config=ray.train.ScalingConfig(num_workers=workers,
                                                        resources_per_worker={"CPU": cpus}),
                 run_config=ray.train.RunConfig(storage_path=directory)).fit()


if __name__ == "__main__":
    main()
