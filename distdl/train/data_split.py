"""How the training and validation datasets are split among the workers.

Ray Train unpickles this config in an actor of its own (the DatasetManager) that every worker
waits for before its first step, so this module imports only Ray: importing the trainer there
would also import torch, 1.6 s of imports in a plain process on a 2-core machine.
"""

from __future__ import annotations

import ray.train
from ray.data.dataset import MaterializedDataset


class WorkerShards(ray.train.DataConfig):
    """How the datasets reach the workers: each worker gets only its share of the rows.

    When workers hold their shard in memory, a dataset already in the object store whose blocks
    divide evenly among them is split by whole blocks: each worker reads its blocks directly,
    with no split-coordinator actor to start (seconds on a small machine), and the workers agree
    on the steps per epoch (worker.py). Other training data take Train's equal streaming split;
    other validation data a streaming split that drops no rows, so that the accuracy is that of
    the whole split (an equal split drops up to N-1 rows, which DDP needs only for training).
    """

    def __init__(self, *, by_blocks: bool):
        super().__init__()
        self.by_blocks = by_blocks

    def splits_by_blocks(self, ds, world_size: int) -> bool:
        return (self.by_blocks and isinstance(ds, MaterializedDataset)
                and ds.num_blocks() % world_size == 0)

    def smallest_shard(self, ds, world_size: int) -> int:
        """Rows of the smallest worker's training shard: split by blocks, shards may differ."""
        if self.splits_by_blocks(ds, world_size):
            return min(part.count() for part in ds.split(world_size))
        return ds.count() // world_size

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        for name, ds in datasets.items():  # Ray Train V2 passes one dataset per call
            if self.splits_by_blocks(ds, world_size):
                splits = [part.iterator() for part in ds.split(world_size)]
            elif name == "val":
                val = ds.copy(ds)
                val.context.execution_options = self._resolve_execution_options(name)
                splits = val.streaming_split(world_size, equal=False)
            else:
                splits = [shard[name] for shard in super().configure(
                    {name: ds}, world_size, worker_handles, worker_node_ids, **kwargs)]
            for shard, split in zip(output, splits):
                shard[name] = split
        return output
