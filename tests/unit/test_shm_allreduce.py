"""The shared-memory gradient average, with two threads standing in for two DDP ranks."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from distdl.train import shm_allreduce
from distdl.train.shm_allreduce import SharedGradients

pytestmark = pytest.mark.skipif(not shm_allreduce.supported(),
                                reason="needs x86 and /dev/shm (elsewhere DDP keeps gloo)")
NUMEL = 1000


@pytest.fixture
def buffer_path():
    path = shm_allreduce.create(NUMEL, world=2)
    yield path
    os.unlink(path)


def test_every_rank_gets_the_same_mean_call_after_call(buffer_path):
    ranks = [SharedGradients(buffer_path, NUMEL, world=2, rank=r, timeout_s=30) for r in range(2)]
    sizes = [NUMEL, 10, 999, NUMEL, 1]  # buckets of different sizes, pages used in turn
    inputs = [[torch.randn(n, generator=torch.Generator().manual_seed(10 * r + i))
               for i, n in enumerate(sizes)] for r in range(2)]
    outputs: list[list[torch.Tensor]] = [[], []]

    def run(rank):
        for grads in inputs[rank]:
            outputs[rank].append(ranks[rank].average(grads.clone()))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    for i in range(len(sizes)):
        assert torch.equal(outputs[0][i], outputs[1][i])  # the same bits on every rank
        torch.testing.assert_close(outputs[0][i], (inputs[0][i] + inputs[1][i]) / 2)


def test_a_rank_that_never_arrives_is_an_error_not_a_hang(buffer_path):
    alone = SharedGradients(buffer_path, NUMEL, world=2, rank=0, timeout_s=0.2)
    with pytest.raises(RuntimeError, match="did not reach the gradient all-reduce"):
        alone.average(torch.ones(NUMEL))


def test_no_buffer_where_shared_memory_is_short():
    free = os.statvfs(shm_allreduce.SHM_DIR)
    too_many = free.f_bavail * free.f_frsize // 4  # floats: 4x the free space, and more
    assert shm_allreduce.create(too_many, world=2) is None
