"""Schedules, batching, and optimizer state that survives a round in Context.state."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedsim.errors import ConfigError
from fedsim.training import (
    ConstantSchedule,
    CosineSchedule,
    LinearSchedule,
    batches,
    client_generator,
    load_optimizer_state,
    optimizer_state_arrays,
)


def test_schedules_by_hand():
    const = ConstantSchedule(warmup_steps=3)
    assert [const.factor(s, 10) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    lin = LinearSchedule(warmup_steps=0, final_factor=0.0)
    assert [lin.factor(s, 4) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert lin.factor(100, 4) == 0.0  # a client never goes past the end
    cos = CosineSchedule(warmup_steps=2, final_factor=0.1)
    assert cos.factor(0, 12) == pytest.approx(1 / 3)
    assert cos.factor(2, 12) == pytest.approx(1.0)
    assert cos.factor(7, 12) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cos.factor(12, 12) == pytest.approx(0.1)


def test_bad_schedule_settings():
    with pytest.raises(ConfigError, match="schedule.warmup_steps"):
        ConstantSchedule(warmup_steps=-1)
    with pytest.raises(ConfigError, match="schedule.final_factor"):
        CosineSchedule(final_factor=2)


def test_batches_cover_each_pass_without_replacement():
    data = {"x": torch.arange(10), "label": torch.arange(10)}
    stream = batches(data, 4, torch.Generator().manual_seed(0))
    first_pass = torch.cat([next(stream)["x"] for _ in range(3)])
    assert sorted(first_pass.tolist()) == list(range(10))
    again = batches(data, 4, torch.Generator().manual_seed(0))
    assert torch.equal(next(again)["x"], first_pass[:4])


def test_client_generators_differ_by_round_and_client():
    seeds = {client_generator(0, r, c).initial_seed() for r in range(3) for c in range(3)}
    assert len(seeds) == 9
    assert client_generator(5, 1, 2).initial_seed() == client_generator(5, 1, 2).initial_seed()


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.AdamW(p, lr=0.1),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    ],
)
def test_optimizer_state_round_trip(make):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 2))
    opt = make([w])
    for _ in range(2):
        opt.zero_grad()
        (w**2).sum().backward()
        opt.step()
    arrays = optimizer_state_arrays(opt)
    assert all(isinstance(v, np.ndarray) for v in arrays.values())
    w2 = torch.nn.Parameter(w.detach().clone())
    opt2 = make([w2])
    load_optimizer_state(opt2, arrays)
    for o, p in ((opt, w), (opt2, w2)):
        o.zero_grad()
        (p**2).sum().backward()
        o.step()
    assert torch.equal(w, w2)
