"""Tests of the ``plateau`` plugin, as its author writes them: the contract (``check_detector``), the firing step on
synthetic steps (``replay``), its configuration, and a real training run through ``gfservice.monitor``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gfservice_plateau import Plateau
from pydantic import ValidationError

import gfservice
from gfservice.api import StepStats
from gfservice.registry import available
from gfservice.testing import check_detector, make_step, replay


def falling_then_flat(n: int = 600, flat_from: int = 200, seed: int = 0) -> list[StepStats]:
    """A noisy loss that falls exponentially until ``flat_from``, then stays where it got to."""
    rng = np.random.default_rng(seed)
    t = np.minimum(np.arange(n), flat_from)
    loss = 2.0 * np.exp(-t / 60) * np.exp(rng.normal(0, 0.1, n))
    return [make_step(step=i, sum_sq=[1.0], loss=float(v)) for i, v in enumerate(loss)]


def test_contract():
    check_detector(Plateau, falling_then_flat())


def test_fires_once_the_plateau_outlasts_the_patience_and_keeps_its_key():
    found = replay(Plateau(patience=100), falling_then_flat())
    steps = [f.step for f in found]
    # 100 steps after the smoothed loss last improved by 1%: the average trails the loss, and the noise (10% a
    # step) lets it set a few more records on the plateau
    assert 300 < steps[0] < 500, steps[0]
    assert steps == list(range(steps[0], 600))  # reported at every step while it lasts: one finding
    assert {f.key for f in found} == {"plateau"} and {f.severity.value for f in found} == {"info"}


def test_a_falling_loss_never_fires():
    assert replay(Plateau(patience=50), falling_then_flat(flat_from=600)) == []


def test_it_clears_when_the_loss_improves_again():
    steps = falling_then_flat(600)
    steps += [make_step(step=600 + i, sum_sq=[1.0], loss=float(0.05 * 0.95**i)) for i in range(50)]
    det = Plateau(patience=50)
    assert det.update(steps[0]) == []
    found = [(s.step, det.update(s)) for s in steps[1:]]
    assert found[598][1], "the plateau is active before the loss falls again"
    assert found[-1][1] == [], "a step that improves on the best clears the finding"


def test_steps_without_a_finite_loss_are_not_judged():
    det = Plateau()
    assert det.update(make_step(sum_sq=[1.0])) is None
    assert det.update(make_step(sum_sq=[1.0], loss=math.nan)) is None


def test_configuration():
    cfg = Plateau().config
    assert (cfg.enabled, cfg.patience, cfg.min_improvement, cfg.smoothing, cfg.severity) == (
        False, 500, 0.01, 50, "info")  # opt-in
    with pytest.raises(ValidationError, match="patience"):
        Plateau(patience=0)
    with pytest.raises(ValidationError, match="severity"):
        Plateau(severity="critical")
    found = replay(Plateau(patience=100, severity="warning"), falling_then_flat())
    assert found[0].severity.value == "warning"
    assert replay(Plateau(patience=100, min_improvement=0.5), falling_then_flat())[0].step < found[0].step


def test_registered_through_its_entry_point():
    assert available().get("plateau") is Plateau, "pip install -e . (this folder) registers the entry point"


def test_real_training_with_a_learning_rate_of_zero():
    """An optimizer whose learning rate is 0 (a schedule decayed to nothing): the loss stays where it starts."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x, y = torch.randn(256, 8), torch.randn(256, 1)
    mon = gfservice.monitor(model, opt, run="flat", service=None,
                            detectors={"plateau": {"enabled": True, "patience": 30, "smoothing": 5}})
    for i in range(60):
        idx = torch.arange(32) + 32 * (i % 8)
        loss = (model(x[idx]) - y[idx]).pow(2).mean()
        loss.backward()
        opt.step()
        mon.step(loss=loss)
        opt.zero_grad()
    mon.close()
    found = [f for f in mon.findings if f.detector == "plateau"]
    assert len(found) == 1 and found[0].active
    assert 30 <= found[0].first_step <= 45
