import pytest
import torch
from torch import nn

from distdl.config import ModelConfig, OptimConfig
from distdl.models import build_model
from distdl.train import loop
from distdl.train.shard import InMemoryShard, load_in_memory


def _blobs(n=256, seed=0):
    """Two well-separated classes of 1x8x8 images."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.5 + (y.float() * 2 - 1).view(-1, 1, 1, 1)
    return x, y


def test_training_reduces_loss_and_learns():
    torch.manual_seed(0)
    x, y = _blobs()
    shard = InMemoryShard(x, y)
    model = build_model(ModelConfig(width=8), num_classes=2, in_channels=1, image_size=8)
    optim_cfg = OptimConfig(lr=1e-2, warmup_epochs=0)
    optimizer = loop.make_optimizer(model, optim_cfg)
    scheduler = loop.make_scheduler(optimizer, optim_cfg, epochs=3, steps_per_epoch=8)
    losses = []
    for epoch in range(3):
        sums = loop.train_epoch(model, shard.batches(32, shuffle=True, seed=epoch, drop_last=True),
                                optimizer, scheduler, nn.CrossEntropyLoss())
        losses.append(sums.loss / sums.count)
        assert sums.count == 256
    val = loop.evaluate(model, shard.batches(100, shuffle=False, seed=0, drop_last=False))
    assert losses[-1] < losses[0] / 3
    assert val.count == 256 and val.correct / val.count > 0.95


def _learning_rates(cfg: OptimConfig, epochs: int, steps_per_epoch: int) -> list[float]:
    """The learning rate of every step of a run."""
    optimizer = loop.make_optimizer(nn.Linear(2, 2), cfg)
    scheduler = loop.make_scheduler(optimizer, cfg, epochs=epochs, steps_per_epoch=steps_per_epoch)
    lrs = []
    for _ in range(epochs * steps_per_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_cosine_schedule_warms_up_then_decays_to_zero():
    lrs = _learning_rates(OptimConfig(lr=1.0, warmup_epochs=1), epochs=4, steps_per_epoch=10)
    assert lrs[0] < lrs[5] < lrs[9]          # warm-up rises
    assert max(lrs) == lrs[10] == 1.0        # peak right after warm-up
    assert lrs[-1] < 0.01                    # decays to about zero


def test_a_warm_up_longer_than_half_the_run_still_leaves_it_time_to_decay():
    lrs = _learning_rates(OptimConfig(lr=1.0, warmup_epochs=1), epochs=1, steps_per_epoch=10)
    assert max(lrs) == lrs[5] == 1.0 and lrs[0] < lrs[4]
    assert lrs[-1] < 0.1


def test_onecycle_starts_low_peaks_and_ends_near_zero():
    lrs = _learning_rates(OptimConfig(lr=1.0, schedule="onecycle"), epochs=10, steps_per_epoch=10)
    assert lrs[0] < 0.05
    assert max(lrs) == lrs[30] == 1.0
    assert lrs[-1] < 1e-3


def test_weight_decay_spares_biases_and_norms():
    model = build_model(ModelConfig(), num_classes=3, in_channels=1, image_size=8)
    optimizer = loop.make_optimizer(model, OptimConfig(weight_decay=0.1))
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])


def test_in_memory_shard_batches_cover_each_example_once_per_epoch():
    shard = InMemoryShard(torch.arange(10).float().view(10, 1, 1, 1), torch.arange(10))
    seen = torch.cat([y for _, y in shard.batches(3, shuffle=True, seed=1, drop_last=False)])
    assert sorted(seen.tolist()) == list(range(10))
    kept = [y for _, y in shard.batches(3, shuffle=True, seed=1, drop_last=True)]
    assert len(kept) == 3 and all(len(y) == 3 for y in kept)
    again = torch.cat([y for _, y in shard.batches(3, shuffle=True, seed=1, drop_last=False)])
    assert torch.equal(seen, again)  # the shuffle is seeded


class _NoRows:
    """What a Ray Data split hands a worker that got no blocks: an iterator with no batches."""

    def iter_batches(self, **kwargs):
        return iter(())


def test_an_empty_shard_validates_nothing_instead_of_failing():
    shard = load_in_memory(_NoRows(), [0.5], [0.5], torch.device("cpu"), channels_last=False)
    assert len(shard) == 0
    model = build_model(ModelConfig(width=8), num_classes=2, in_channels=1, image_size=8)
    sums = loop.evaluate(model, shard.batches(4, shuffle=False, seed=0, drop_last=False))
    assert (sums.loss, sums.correct, sums.count) == (0.0, 0, 0)


def test_a_resumed_schedule_follows_the_longer_run():
    cfg = OptimConfig(lr=1.0, warmup_epochs=0)
    first = loop.make_optimizer(nn.Linear(2, 2), cfg)
    short = loop.make_scheduler(first, cfg, epochs=2, steps_per_epoch=10)
    for _ in range(20):
        first.step()
        short.step()
    assert first.param_groups[0]["lr"] < 1e-6  # the 2-epoch run ended at zero
    second = loop.make_optimizer(nn.Linear(2, 2), cfg)
    second.load_state_dict(first.state_dict())
    longer = loop.make_scheduler(second, cfg, epochs=4, steps_per_epoch=10)
    loop.resume_schedule(longer, short.state_dict())
    assert second.param_groups[0]["lr"] == pytest.approx(0.5)  # halfway through 4 epochs
