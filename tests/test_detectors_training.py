"""The built-in detectors on real training (CPU, scikit-learn's digits), through the public API:
``gfservice.monitor(model, optimizer, run=..., service=None)`` and ``monitor.findings``."""

from __future__ import annotations

import math

import pytest
import torch
from models import linear_names, mlp, train

import gfservice

DEPTH = 20


def _monitor(model, opt, run, **kw):
    return gfservice.monitor(model, opt, run=run, service=None, **kw)


def _by_detector(findings, name):
    return [f for f in findings if f.detector == name]


def test_deep_sigmoid_mlp_vanishes_in_its_early_layers(one_thread):
    """20 sigmoid layers with U(+-1/sqrt(fan_in)) weights: every layer shrinks the gradient about 7x on the way
    back, so the first layers get ~1e-18 of the last one's gradient."""
    model = mlp(DEPTH, width=32, activation="sigmoid", init="uniform")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = _monitor(model, opt, "sigmoid-20")
    train(model, opt, 40, monitor=mon)
    mon.close()

    vanishing = _by_detector(mon.findings, "vanishing")
    assert vanishing, f"no vanishing finding; findings: {[str(f) for f in mon.findings]}"
    f = vanishing[0]
    names = linear_names(model)
    assert f.severity == gfservice.Severity.warning
    assert f.first_step is not None and f.first_step < 20  # the default window is 10 collected steps
    assert names[0] in f.layers and names[1] in f.layers  # the input layer's weight and bias
    assert not set(names[-6:]) & set(f.layers), f"the last layers are healthy, yet named: {f.layers}"
    assert f.layers == names[: len(f.layers)], "the named layers are a contiguous block from the input"
    assert f.layers[0] in f.message and f.layers[-1] in f.message  # "layers 0.weight to 24.bias (26 layers)"
    assert f.active  # still vanishing at the end
    assert not _by_detector(mon.findings, "nonfinite")


@pytest.mark.parametrize("seed", [0, 5])
def test_deep_relu_mlp_with_he_init_is_healthy(one_thread, seed):
    """The same depth with ReLU and He initialisation trains; no detector may raise anything in 300 steps
    (deep statistics every 5 steps, so that the floor on mean |g| is checked as well). Seed 5 has a healthy
    6.9x single-step jump of the gradient norm at step 107, which exploding's former scale floor of 0.25
    reported."""
    model = mlp(DEPTH, width=32, activation="relu", init="he", seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = _monitor(model, opt, f"relu-he-{seed}", deep_every=5)
    losses = train(model, opt, 300, monitor=mon, batch_size=32, seed=seed)
    mon.close()
    assert [str(f) for f in mon.findings] == []
    assert mon.latest().step == 299 and mon.errors == 0
    assert sum(losses[-30:]) / 30 < 0.8 * sum(losses[:30]) / 30  # it does learn


def test_nan_in_one_batch_is_reported_at_that_step(one_thread):
    k = 25
    model = mlp(DEPTH, width=32, activation="relu", init="he")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = _monitor(model, opt, "nan-batch")

    def poison(step, x, y):
        if step == k:
            x = x.clone()
            x[3, 7] = float("nan")
            return x, y
        return None

    train(model, opt, k + 5, monitor=mon, on_step=poison)
    mon.close()
    nonfinite = _by_detector(mon.findings, "nonfinite")
    assert nonfinite, "no nonfinite finding"
    assert min(f.first_step for f in nonfinite) == k
    grad = next(f for f in nonfinite if f.key == "grad")
    assert grad.first_step == grad.step == k and grad.severity == gfservice.Severity.critical
    assert set(linear_names(model)) == set(grad.layers)  # a NaN input reaches every layer's gradient
    assert f"step {k}" in grad.message
    assert all(f.first_step >= k for f in mon.findings)


def test_learning_rate_jump_is_flagged_as_exploding_before_any_nan(one_thread):
    k = 30
    model = mlp(DEPTH, width=32, activation="relu", init="he")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = _monitor(model, opt, "lr-jump")

    def jump(step, x, y):
        if step == k:
            for group in opt.param_groups:
                group["lr"] = 10.0

    losses = train(model, opt, k + 8, monitor=mon, on_step=jump)
    mon.close()
    exploding = _by_detector(mon.findings, "exploding")
    assert exploding, f"no exploding finding; findings: {[str(f) for f in mon.findings]}"
    first = min(f.first_step for f in exploding)
    assert all(f.first_step >= k for f in exploding), "exploding fired before the jump"
    assert first <= k + 3
    nonfinite_steps = [f.first_step for f in _by_detector(mon.findings, "nonfinite")]
    if nonfinite_steps:
        assert first < min(nonfinite_steps), "exploding must warn before the NaN"
    assert any(not math.isfinite(v) or v > 100 for v in losses[k:]), "the jump should have wrecked training"
    spike = next(f for f in exploding if f.first_step == first)
    assert spike.key == "spike" and spike.value > spike.threshold
