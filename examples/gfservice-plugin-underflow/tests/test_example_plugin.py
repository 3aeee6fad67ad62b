"""Tests of the ``underflow`` plugin, as its author writes them: the contract (``check_detector``), the firing step
on synthetic steps (``replay``), its configuration, and a real training run through ``gfservice.monitor``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gfservice_underflow import Underflow
from pydantic import ValidationError

import gfservice
from gfservice.api import StepStats
from gfservice.registry import available
from gfservice.stats import GradStats
from gfservice.testing import check_detector, make_step, replay


def steps_with_shrinking_gradients(n: int = 40, deep_every: int = 4, seed: int = 0) -> list[StepStats]:
    """Three layers; the first one's gradients shrink 1.5x per step; deep statistics every ``deep_every`` steps."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        grads = {
            "embed.weight": rng.normal(0, 1.5 ** -i * 1e-3, 2000),
            "block.weight": rng.normal(0, 1e-3, 2000),
            "head.weight": rng.normal(0, 1e-2, 500),
        }
        out.append(StepStats(run="t", step=i, grads=GradStats.from_arrays(grads, deep=i % deep_every == 0)))
    return out


def test_contract():
    check_detector(Underflow, steps_with_shrinking_gradients())


def test_fires_on_the_first_deep_step_past_the_limit_and_only_there():
    steps = steps_with_shrinking_gradients()
    fired = [(f.step, f.layers) for f in replay(Underflow(), [s for s in steps if s.grads.deep])]
    # std 1e-3 * 1.5**-i: 1% of the values are below 2**-24 once the std is under ~5e-6, i.e. from step 14 on
    assert fired[0] == (16, ["embed.weight"])
    assert all(layers == ["embed.weight"] for _, layers in fired)
    assert [s for s, _ in fired] == list(range(16, 40, 4))


def test_steps_without_deep_statistics_are_not_judged():
    assert Underflow().update(make_step(sum_sq=[1e-30, 1.0])) is None


def test_configuration():
    cfg = Underflow().config
    assert (cfg.enabled, cfg.format, cfg.max_fraction) == (False, "fp16", 0.01)  # opt-in
    with pytest.raises(ValidationError, match="format"):
        Underflow(format="fp4")
    with pytest.raises(ValidationError, match="max_fraction"):
        Underflow(max_fraction=0)
    steps = [s for s in steps_with_shrinking_gradients() if s.grads.deep]
    assert replay(Underflow(max_fraction=0.5), steps)[0].step == 24  # a laxer limit fires later
    assert replay(Underflow(format="fp8_e5m2"), steps)[0].step == 0  # fp8 e5m2 loses values below 2**-16


def test_bf16_reaches_far_lower():
    steps = [s for s in steps_with_shrinking_gradients() if s.grads.deep]
    assert replay(Underflow(format="bf16"), steps) == []  # bf16 reaches down to ~1e-40


def test_registered_through_its_entry_point():
    assert available().get("underflow") is Underflow, "pip install -e . (this folder) registers the entry point"


def test_real_training_with_tiny_gradients():
    """A loss scaled by 1e-9 gives gradients of ~1e-10: under fp16's smallest subnormal."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = gfservice.monitor(model, opt, run="tiny", service=None, deep_every=5,
                            detectors={"underflow": {"enabled": True}})
    for _ in range(12):
        loss = model(torch.randn(32, 8)).pow(2).mean() * 1e-9
        loss.backward()
        opt.step()
        mon.step(loss=loss)
        opt.zero_grad()
    mon.close()
    found = [f for f in mon.findings if f.detector == "underflow"]
    assert len(found) == 1, "raised once at the first deep step, then kept (steps in between are not judged)"
    assert found[0].first_step == 0 and found[0].active
    assert set(found[0].layers) == {"0.weight", "0.bias", "2.weight", "2.bias"}
