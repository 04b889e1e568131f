"""trainers/common.py: the EMA every trainer uses (with its warm-up), hand-computed."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from trainers.common import ema_decay_at, ema_update


def test_ema_decay_warms_up_then_caps_at_the_configured_decay():
    assert ema_decay_at(0.999, 1) == pytest.approx(2 / 11)  # (1 + 1) / (10 + 1)
    assert ema_decay_at(0.999, 90) == pytest.approx(91 / 100)
    assert ema_decay_at(0.99, 10_000) == 0.99 and ema_decay_at(0.999, None) == 0.999
    assert ema_decay_at(0.0, 5) == 0.0  # decay 0: the raw weights


def test_ema_update_hand_computed_and_forgets_the_initialisation():
    ema, model = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
    ema.weight.data.fill_(10.0)  # the random init the EMA starts from
    model.weight.data.fill_(0.0)
    ema_update(ema, model, 0.999, step=1)
    assert ema.weight.item() == pytest.approx(10.0 * 2 / 11)
    for step in range(2, 701):
        ema_update(ema, model, 0.999, step)
    # With the warm-up the init's share after 700 steps is prod (1+t)/(10+t) ~ 1e-17; without it 0.999^700 ~ 0.5.
    assert abs(ema.weight.item()) < 1e-6
    plain = nn.Linear(1, 1, bias=False)
    plain.weight.data.fill_(10.0)
    for _ in range(700):
        ema_update(plain, model, 0.999)
    assert plain.weight.item() == pytest.approx(10.0 * 0.999**700, rel=1e-4)


def test_ema_update_follows_buffers_and_copies_integer_ones():
    ema, model = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    model.running_mean.fill_(4.0)
    model.num_batches_tracked.fill_(7)
    ema_update(ema, model, 0.5)
    assert torch.allclose(ema.running_mean, torch.full((2,), 2.0)) and int(ema.num_batches_tracked) == 7
