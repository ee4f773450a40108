"""DDP is real: two Ray Train workers end with identical weights, equal to one process's."""

import copy

import ray.train
import torch
from ray.train.torch import TorchTrainer, prepare_model
from torch import nn

from distdl.config import ModelConfig, OptimConfig
from distdl.models import build_model
from distdl.train import loop
from distdl.train.shard import InMemoryShard

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
    x, y = _data()
    mine = [(bx[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH], by[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH])
            for bx, by in _global_batches(x, y)]
    raw = _new_model()
    model = prepare_model(raw)
    optimizer = loop.make_optimizer(raw, OPTIM)
    scheduler = loop.make_scheduler(optimizer, OPTIM, epochs=1, steps_per_epoch=STEPS)
    loop.train_epoch(model, mine, optimizer, scheduler, nn.CrossEntropyLoss())
    torch.save(raw.state_dict(), f"{config['out']}/rank{rank}.pt")
    ray.train.report({"done": 1})


def test_two_ranks_agree_and_match_a_single_process(ray_address, tmp_path):
    TorchTrainer(
        _worker,
        train_loop_config={"out": str(tmp_path)},
        scaling_config=ray.train.ScalingConfig(num_workers=WORLD),
        run_config=ray.train.RunConfig(storage_path=str(tmp_path / "storage"), name="ddp"),
    ).fit()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    single = _new_model()
    initial = copy.deepcopy(single.state_dict())
    optimizer = loop.make_optimizer(single, OPTIM)
    scheduler = loop.make_scheduler(optimizer, OPTIM, epochs=1, steps_per_epoch=STEPS)
    loop.train_epoch(single, _global_batches(*_data()), optimizer, scheduler, nn.CrossEntropyLoss())

    for name, value in single.state_dict().items():
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name} differs between ranks"
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-4, atol=1e-5)
        assert not torch.equal(value, initial[name]), f"{name} never changed"
