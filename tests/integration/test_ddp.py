"""DDP is real: two Ray Train workers, with distdl's torch.distributed backend, end with
identical weights, equal to one process's. Batch-norm statistics, which distdl does not sync
every step, are averaged across ranks."""

import copy
import signal

import pytest
import ray.train
import torch
from ray.train.torch import prepare_model
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer
from torch import nn

from distdl.config import ModelConfig, OptimConfig
from distdl.models import build_model
from distdl.train import loop, shm_allreduce
from distdl.train.backend import TorchDistributed
from distdl.train.worker import _average_buffers

STEPS, LOCAL_BATCH, WORLD = 4, 16, 2
OPTIM = OptimConfig(optimizer="sgd", lr=0.05, warmup_epochs=0, schedule="constant",
                    weight_decay=0.0)
MODEL = ModelConfig(width=8, batch_norm=False, dropout=0.0)  # no batch norm: exact comparison


def _data():
    g = torch.Generator().manual_seed(1)
    n = STEPS * LOCAL_BATCH * WORLD
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _new_model():
    torch.manual_seed(0)
    return build_model(MODEL, num_classes=10, in_channels=1, image_size=8)


def _global_batches(x, y):
    """Global batch s is rank 0's local batch s followed by rank 1's."""
    size = LOCAL_BATCH * WORLD
    return [(x[s * size:(s + 1) * size], y[s * size:(s + 1) * size]) for s in range(STEPS)]


def _worker(config):
    rank = ray.train.get_context().get_world_rank()
    torch.save(_train_rank(rank, shared_memory=False), f"{config['out']}/gloo{rank}.pt")
    torch.save(_train_rank(rank, shared_memory=True), f"{config['out']}/shm{rank}.pt")
    torch.save(_train_rank(rank, shared_memory=True, channels_last=True),
               f"{config['out']}/shm_channels_last{rank}.pt")
    torch.save(_batch_norm_statistics(rank), f"{config['out']}/bn{rank}.pt")
    ray.train.report({"done": 1})


def _train_rank(rank, *, shared_memory, channels_last=False):
    """This rank's half of every global batch, its gradients averaged by gloo or shared memory;
    `channels_last` trains in that memory format, as CPU workers do by default."""
    x, y = _data()
    mine = [(bx[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH], by[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH])
            for bx, by in _global_batches(x, y)]
    raw = _new_model()
    if channels_last:
        raw = raw.to(memory_format=torch.channels_last)
    model = prepare_model(raw)
    attached = shm_allreduce.attach(model) if shared_memory else False
    optimizer = loop.make_optimizer(raw, OPTIM)
    scheduler = loop.make_scheduler(optimizer, OPTIM, epochs=1, steps_per_epoch=STEPS)
    loop.train_epoch(model, mine, optimizer, scheduler, nn.CrossEntropyLoss())
    return {"state": raw.state_dict(), "shared_memory": attached}


def _batch_norm_statistics(rank):
    """A batch-norm model's buffers after steps on this rank's own data, then averaged."""
    torch.manual_seed(0)
    raw = build_model(ModelConfig(width=8), num_classes=10, in_channels=1, image_size=8)
    model = prepare_model(raw, parallel_strategy_kwargs={"forward_sync_buffers": False})
    optimizer = loop.make_optimizer(raw, OPTIM)
    scheduler = loop.make_scheduler(optimizer, OPTIM, epochs=1, steps_per_epoch=2)
    x, y = _data()
    batches = [(x[:LOCAL_BATCH] + 3.0 * rank, y[:LOCAL_BATCH])] * 2  # the ranks' data differ
    loop.train_epoch(model, batches, optimizer, scheduler, nn.CrossEntropyLoss())
    local = {k: v.clone() for k, v in raw.named_buffers() if v.is_floating_point()}
    _average_buffers(raw)
    return {"local": local, "averaged": dict(raw.named_buffers())}


@pytest.fixture(scope="module")
def ddp_run(ray_address, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    ctrl_c = signal.getsignal(signal.SIGINT)
    DataParallelTrainer(
        _worker,
        backend_config=TorchDistributed(),
        train_loop_config={"out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=WORLD),
        run_config=ray.train.RunConfig(storage_path=str(out / "storage"), name="ddp"),
    ).fit()
    # fit() leaves its Ctrl-C handler installed, and the handler holds Ray Train's controller,
    # which would then live on in the session's Ray through every later test.
    signal.signal(signal.SIGINT, ctrl_c)
    return out


@pytest.mark.parametrize("averaging", ["gloo", "shm", "shm_channels_last"])
def test_two_ranks_agree_and_match_a_single_process(ddp_run, averaging):
    saved = [torch.load(ddp_run / f"{averaging}{r}.pt", weights_only=True) for r in range(WORLD)]
    if averaging.startswith("shm") and shm_allreduce.supported():
        assert all(s["shared_memory"] for s in saved)
    ranks = [s["state"] for s in saved]
    if averaging.endswith("channels_last"):
        assert ranks[0]["features.2.weight"].is_contiguous(memory_format=torch.channels_last)

    single = _new_model()
    initial = copy.deepcopy(single.state_dict())
    optimizer = loop.make_optimizer(single, OPTIM)
    scheduler = loop.make_scheduler(optimizer, OPTIM, epochs=1, steps_per_epoch=STEPS)
    loop.train_epoch(single, _global_batches(*_data()), optimizer, scheduler, nn.CrossEntropyLoss())

    for name, value in single.state_dict().items():
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name} differs between ranks"
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-4, atol=1e-5)
        assert not torch.equal(value, initial[name]), f"{name} never changed"


def test_batch_norm_statistics_are_averaged_across_ranks(ddp_run):
    bn = [torch.load(ddp_run / f"bn{r}.pt", weights_only=True) for r in range(WORLD)]
    mean = bn[0]["local"]["features.1.running_mean"]
    assert not torch.allclose(mean, bn[1]["local"]["features.1.running_mean"])  # differed per rank
    for name, value in bn[0]["local"].items():
        expected = (value + bn[1]["local"][name]) / 2
        torch.testing.assert_close(bn[0]["averaged"][name], expected)
        assert torch.equal(bn[0]["averaged"][name], bn[1]["averaged"][name])
