"""The gradient detectors ``exploding``, ``vanishing``, ``nonfinite`` and ``no_gradient``: synthetic steps for each
rule (``gfservice.testing``), the plugin contract, and small real trainings on CPU through the public API
(``gfservice.monitor(model, optimizer, run=..., service=None)``)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from models import digits
from torch import nn
from torch.nn import functional as F

import gfservice
from gfservice.api import Finding, StepStats
from gfservice.testing import check_detector, make_step, replay
from gfservice_detectors.exploding import Exploding
from gfservice_detectors.no_gradient import NoGradient
from gfservice_detectors.nonfinite import NonFinite
from gfservice_detectors.vanishing import Vanishing


def noisy(n: int, layers: int = 6, scale: float = 1e-2, start: int = 0, seed: int = 0) -> list[StepStats]:
    """Healthy steps: every layer's sum of squares wobbles ~10% around ``scale``."""
    rng = np.random.default_rng(seed)
    return [make_step(step=start + i, sum_sq=scale * np.exp(rng.normal(0.0, 0.1, layers))) for i in range(n)]


def by(findings: list[Finding], detector: str, key: str | None = None) -> list[Finding]:
    return [f for f in findings if f.detector == detector and (key is None or f.key == key)]


# ---- exploding: synthetic ----------------------------------------------------------------------------------
def test_exploding_severity_grows_with_the_jump():
    steps = noisy(30)
    steps.append(make_step(step=30, sum_sq=np.full(6, 1e-2 * 50.0**2)))  # 50x
    steps += noisy(5, start=31, seed=1)
    steps.append(make_step(step=36, sum_sq=np.full(6, 1e-2 * 5e3**2)))  # 5000x
    found = replay(Exploding(), steps)
    assert [(f.step, f.key, f.severity.value) for f in found] == [(30, "spike", "warning"),
                                                                 (36, "spike", "critical")]
    assert "5001.5x its recent median" in found[1].message


def test_exploding_at_the_second_step_has_no_warmup_blind_spot():
    """An RNN whose gradients blow up 1e4x between step 0 and step 1: reported at step 1."""
    steps = [make_step(step=0, sum_sq=[1e7, 1e7, 1.0]), make_step(step=1, sum_sq=[1e15, 1e15, 1.0])]
    f, = replay(Exploding(), steps)
    assert (f.step, f.key, f.severity.value) == (1, "spike", "critical")
    # a healthy early wobble (3x, 30x) is no spike
    calm = [make_step(step=i, sum_sq=np.full(3, v)) for i, v in enumerate([1.0, 9.0, 900.0, 400.0])]
    assert replay(Exploding(), calm) == []


def test_exploding_judges_the_first_step_by_the_largest_value():
    warn = make_step(step=0, sum_sq=[1e12, 1.0, 1.0], max_abs=[1e5, 0.1, 0.1])
    crit = make_step(step=0, sum_sq=[1e30, 1.0, 1.0], max_abs=[1e10, 0.1, 0.1])
    assert [(f.key, f.severity.value) for f in replay(Exploding(), [warn])] == [("abs", "warning")]
    assert [(f.key, f.severity.value) for f in replay(Exploding(), [crit])] == [("abs", "critical")]
    assert replay(Exploding(max_abs=None), [warn]) == []


def test_a_norm_that_overflowed_float32_is_exploding_not_nonfinite():
    """The collector recomputes a float32-overflowed sum of squares in float64: 8.7e20 is finite there."""
    steps = noisy(20, layers=3)
    steps.append(make_step(step=20, sum_sq=[(8.7e20) ** 2, 1e-2, 1e-2], max_abs=[3e18, 0.01, 0.01]))
    exploding = replay(Exploding(), steps)
    spike = next(f for f in exploding if f.key == "spike")
    assert {(f.step, f.severity.value) for f in exploding} == {(20, "critical")}
    assert "8.7e+20" in spike.message
    assert [f.layers for f in exploding if f.key == "layer"] == [["layer0"]]
    assert replay(NonFinite(), steps) == []
    # beyond float64 too (sum of squares Inf), every value still finite: still exploding's, still critical
    steps[-1] = make_step(step=20, sum_sq=[math.inf, 1e-2, 1e-2], max_abs=[1e160, 0.01, 0.01])
    f, = replay(Exploding(), steps)
    assert (f.key, f.severity.value) == ("abs", "critical") and "overflowed" in f.message
    assert replay(NonFinite(), steps) == []


def test_exploding_leaves_nan_steps_to_nonfinite():
    nan = make_step(step=3, sum_sq=[math.nan, 1.0], nonfinite=[4, 0])
    assert Exploding().update(nan) is None


def test_one_layer_running_away_is_critical_and_named():
    steps = noisy(15, layers=5)
    sq = np.full(5, 1e-2)
    sq[2] *= 1e8  # 1e4x in RMS
    steps += [make_step(step=15 + i, sum_sq=sq) for i in range(3)]
    found = [f for f in replay(Exploding(z_threshold=1e9), steps) if f.key == "layer"]
    assert found and found[0].step == 15 and found[0].layers == ["layer2"]
    assert found[0].severity.value == "critical"


def test_a_tiny_layer_that_gets_some_gradient_back_is_no_explosion():
    """A bias before a BatchNorm (1e-8 of the others) moving to 1e-4 of the others moved 4 orders, upwards,
    yet stays far below the median layer."""
    sq = np.full(5, 1e-2)
    sq[0] = 1e-2 * 1e-16
    steps = [make_step(step=i, sum_sq=sq) for i in range(15)]
    sq2 = sq.copy()
    sq2[0] = 1e-2 * 1e-8
    steps += [make_step(step=15 + i, sum_sq=sq2) for i in range(3)]
    assert replay(Exploding(), steps) == []


def test_exploding_is_silent_on_healthy_noise():
    assert replay(Exploding(), noisy(300)) == []


def test_exploding_contract():
    steps = noisy(40)
    steps[25] = make_step(step=25, sum_sq=np.full(6, 1e-2 * 1e6))
    steps[32] = make_step(step=32, sum_sq=np.full(6, 1e-2 * 1e8))
    check_detector(Exploding, steps)


# ---- vanishing: synthetic ----------------------------------------------------------------------------------
LAYERS = ("0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias")
UNITS = (16, 16, 32, 32, 10, 10)
COUNTS = (144, 16, 4608, 32, 320, 10)


def conv_like(step: int, bias0: float = 1e-18, weight0: float = 1e-4) -> StepStats:
    """conv(0) -> BN -> conv(2) -> BN -> linear(4): the conv biases get ~0 gradient by design."""
    rms = np.array([math.sqrt(weight0), 1e-9, 1e-2, 1e-9, 1e-2, 1e-2])
    rms[1] = math.sqrt(bias0)
    return make_step(step=step, layers=LAYERS, units=UNITS, count=COUNTS, sum_sq=rms**2 * np.array(COUNTS))


def test_biases_before_batch_norm_are_not_vanishing():
    assert replay(Vanishing(), [conv_like(i) for i in range(30)]) == []


def test_a_bias_vanishing_with_its_weight_is_reported():
    found = replay(Vanishing(), [conv_like(i, weight0=1e-20) for i in range(30)])
    assert found and found[0].step == 9 and found[0].layers == ["0.weight", "0.bias"]


def test_a_healthy_head_is_not_vanishing_when_the_layers_before_it_explode():
    """With Adam, a ReLU RNN whose recurrent weights blow up from step 0 keeps training: its head is healthy."""
    names = ("rnn.w_ih", "rnn.w_hh", "rnn.b_ih", "rnn.b_hh", "head.weight", "head.bias")
    steps = [make_step(step=i, layers=names, sum_sq=[1e8, 1e9, 1e9, 1e9, 1e7, 0.05]) for i in range(30)]
    assert replay(Vanishing(), steps) == []


def test_an_exploding_majority_later_on_cannot_drag_the_reference():
    healthy = noisy(20, layers=6)
    exploded = [make_step(step=20 + i, sum_sq=[1e-2, 1e-2, 1e6, 1e6, 1e6, 1e6]) for i in range(20)]
    assert replay(Vanishing(), healthy + exploded) == []


def test_exact_zeros_and_missing_gradients_are_not_vanishing():
    steps = [make_step(step=i, sum_sq=[0.0, 0.0, 1e-2, 1e-2], max_abs=[0.0, 0.0, 0.01, 0.01], count=[100, 0, 100, 100])
             for i in range(30)]
    assert replay(Vanishing(), steps) == []


def test_vanishing_skips_nan_steps_and_steps_without_gradients():
    assert Vanishing().update(make_step(sum_sq=[math.nan, 1.0], nonfinite=[3, 0])) is None
    assert Vanishing().update(make_step(sum_sq=[0.0, 0.0], count=0)) is None


def test_a_block_of_input_side_layers_vanishing_is_named_as_a_range():
    sq = 10.0 ** np.array([-30, -28, -26, -20, -14, -10, -4, -4])
    steps = [make_step(step=i, sum_sq=sq) for i in range(15)]
    f = replay(Vanishing(), steps)[0]
    assert f.step == 9 and f.layers == [f"layer{i}" for i in range(5)]
    assert "layers layer0 to layer4 (5 layers)" in f.message


def test_vanishing_contract():
    steps = noisy(10) + [make_step(step=10 + i, sum_sq=[1e-20, 1e-18] + [1e-2] * 4) for i in range(20)]
    check_detector(Vanishing, steps)


# ---- nonfinite: synthetic ----------------------------------------------------------------------------------
def test_nonfinite_states_its_counts():
    s = make_step(step=4, sum_sq=[math.inf, 1.0, math.nan], nonfinite=[3, 0, 2])
    f, = NonFinite().update(s)
    assert f.layers == ["layer0", "layer2"] and f.value == 5 and "(5 NaN/Inf values)" in f.message


def test_nonfinite_ignores_an_infinite_sum_of_finite_values():
    s = make_step(step=4, sum_sq=[math.inf, 1.0], max_abs=[1e30, 0.1], nonfinite=[0, 0])
    assert NonFinite().update(s) == []


def test_nonfinite_reports_a_nan_max_even_uncounted_and_a_rank_on_its_own():
    s = make_step(step=1, sum_sq=[math.nan, 1.0], max_abs=[math.nan, 0.1], nonfinite=[0, 0])
    f, = NonFinite().update(s)
    assert f.layers == ["layer0"] and "not counted" in f.message and "0 NaN" not in f.message
    r = make_step(step=2, sum_sq=[1.0, 1.0], rank_nonfinite=[False, True])
    f, = NonFinite().update(r)
    assert f.ranks == [1] and f.severity.value == "critical" and "rank 1" in f.message


def test_nonfinite_loss():
    f, = NonFinite().update(make_step(step=7, sum_sq=[1.0], loss=math.nan))
    assert (f.key, f.severity.value) == ("loss", "critical") and "nan" in f.message
    assert NonFinite(check_loss=False).update(make_step(step=7, sum_sq=[1.0], loss=math.nan)) == []


def test_nonfinite_contract():
    steps = [*noisy(10), make_step(step=10, sum_sq=[math.nan] + [1.0] * 5, nonfinite=[2, 0, 0, 0, 0, 0])]
    steps += [*noisy(5, start=11), make_step(step=16, sum_sq=[1.0] * 6, loss=math.inf)]
    check_detector(NonFinite, steps)


# ---- no_gradient: synthetic ---------------------------------------------------------------------------------
def test_a_missing_gradient_is_reported_after_the_window():
    # whole modules (a top-level parameter alone, never used while the rest of the model learns, is a note)
    steps = [make_step(step=i, sum_sq=[1.0, 0.0, 1.0], count=[10, 0, 10], layers=("a.w", "b.w", "c.w"))
             for i in range(15)]
    found = replay(NoGradient(), steps)
    assert found[0].step == 9 and found[0].layers == ["b.w"] and found[0].key == "layers"
    assert found[0].severity.value == "warning" and ".grad is None" in found[0].message
    assert len(found) == 6  # every step while it persists


def test_exact_zeros_are_reported_as_a_freeze_and_clear_when_the_gradient_returns():
    zero = [make_step(step=i, sum_sq=[1.0, 0.0], max_abs=[0.1, 0.0]) for i in range(12)]
    back = [make_step(step=12, sum_sq=[1.0, 1.0])]
    found = replay(NoGradient(), zero + back)
    assert [f.step for f in found] == [9, 10, 11] and "exactly zero" in found[0].message


def test_a_gradient_that_is_zero_now_and_then_is_not_reported():
    """An embedding's unused rows, a branch used every few steps: only whole tensors, only persistent zeros."""
    steps = [make_step(step=i, sum_sq=[1.0, 0.0 if i % 4 else 1.0], max_abs=[0.1, 0.0 if i % 4 else 0.1])
             for i in range(40)]
    assert replay(NoGradient(), steps) == []


def test_every_layer_without_gradient_is_one_finding_about_the_monitor():
    steps = [make_step(step=i, sum_sq=[0.0, 0.0, 0.0], count=0) for i in range(12)]
    found = replay(NoGradient(), steps)
    assert {f.key for f in found} == {"all"} and found[0].step == 9 and found[0].layers == []
    msg = found[0].message
    assert "monitor.step() is placed after optimizer.zero_grad(set_to_none=True)" in msg
    assert "DeepSpeed ZeRO / FSDP1 flat params" in msg


def test_empty_parameters_are_not_judged():
    steps = [make_step(step=i, sum_sq=[1.0, 0.0], count=[10, 0], units=[10, 0]) for i in range(15)]
    assert replay(NoGradient(), steps) == []


def test_a_lone_parameter_never_used_is_a_note_and_a_whole_module_a_warning():
    """A mask token that never gets a gradient beside a projection that does (DINOv2 in classification): info.
    A whole module (weight and bias) that never does: a warning. A lone parameter that *had* a gradient and
    lost it: a warning too."""
    names = ("emb.mask_token", "emb.proj.weight", "side.weight", "side.bias", "head.weight")
    steps = [make_step(step=i, sum_sq=[0.0, 1.0, 0.0, 0.0, 1.0], count=[0, 10, 0, 0, 10], layers=names)
             for i in range(12)]
    found = replay(NoGradient(), steps)
    assert {(f.key, f.severity.value, tuple(f.layers)) for f in found} == {
        ("unused", "info", ("emb.mask_token",)), ("layers", "warning", ("side.weight", "side.bias"))}
    had = [make_step(step=i, sum_sq=[1.0, 1.0], count=[10, 10], layers=names[:2]) for i in range(3)]
    lost = [make_step(step=3 + i, sum_sq=[0.0, 1.0], count=[0, 10], layers=names[:2]) for i in range(12)]
    assert {(f.key, f.severity.value) for f in replay(NoGradient(), had + lost)} == {("layers", "warning")}

def test_no_gradient_contract():
    steps = noisy(10) + [make_step(step=10 + i, sum_sq=[1.0, 0.0, 1.0], count=[10, 0, 10]) for i in range(20)]
    check_detector(NoGradient, steps)


# ---- real training (CPU, a second or two each) ---------------------------------------------------------------
def run(model: nn.Module, opt: torch.optim.Optimizer, steps: int, batches, loss_fn: Callable | None = None,
        before_step: Callable[[int], None] | None = None, scale_loss: Callable[[int], float] | None = None,
        **monitor_kw) -> tuple[list[Finding], list[float], int | None]:
    """Train with a monitor (step after opt.step, before zero_grad); returns the findings, the losses and the
    first step with a NaN/Inf loss or gradient."""
    mon = gfservice.monitor(model, opt, run=f"grad-{id(model)}", service=None, **monitor_kw)
    losses, first_bad = [], None
    for i in range(steps):
        if before_step is not None:
            before_step(i)
        x, y = next(batches)
        loss = (loss_fn or F.cross_entropy)(model(x), y)
        if scale_loss is not None:
            loss = loss * scale_loss(i)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if first_bad is None and (not torch.isfinite(loss) or not all(bool(torch.isfinite(g).all()) for g in grads)):
            first_bad = i
        opt.step()
        mon.step(loss=loss)
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    findings = list(mon.findings)
    assert mon.errors == 0
    mon.close()
    return findings, losses, first_bad


def digit_batches(seed: int = 0, batch: int = 64, image: bool = False):
    x, y = digits()
    if image:
        x = x.view(-1, 1, 8, 8)
    g = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(0, len(x), (batch,), generator=g)
        yield x[idx], y[idx]


def majority_batches(seed: int = 0, length: int = 16, vocab: int = 4):
    g = torch.Generator().manual_seed(seed)
    while True:
        tok = torch.randint(0, vocab, (32, length), generator=g)
        onehot = F.one_hot(tok, vocab).float()
        yield onehot, (onehot.sum(1) + torch.arange(vocab) / 8).argmax(1)


class RNN(nn.Module):
    """A ReLU RNN with its recurrent matrix 3x orthogonal: its gradients grow ~3x per time step."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.rnn = nn.RNN(4, 32, batch_first=True, nonlinearity="relu")
        self.head = nn.Linear(32, 4)
        nn.init.orthogonal_(self.rnn.weight_hh_l0, gain=3.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("seed", [0, 1])
def test_rnn_exploding_from_the_first_steps_is_critical_before_its_nan(one_thread, seed):
    model = RNN(seed)
    found, _, first_bad = run(model, torch.optim.SGD(model.parameters(), lr=0.01), 6, majority_batches(seed))
    exploding = by(found, "exploding")
    assert exploding, [str(f) for f in found]
    first = min(f.since for f in exploding)
    assert first <= 1 and (first_bad is None or first < first_bad)
    assert any(f.severity.value == "critical" for f in exploding)


@pytest.mark.parametrize("seed", [1, 2])
def test_adam_rnn_head_is_not_taken_for_vanishing(one_thread, seed):
    """With Adam the exploded RNN keeps training; its head is the one healthy layer, not a vanishing one."""
    model = RNN(seed)
    found, losses, _ = run(model, torch.optim.Adam(model.parameters(), lr=1e-3), 20, majority_batches(seed))
    assert not by(found, "vanishing"), [str(f) for f in found]
    assert all(math.isfinite(v) for v in losses)


def test_gradient_norm_of_1e20_is_critical_exploding_and_not_nonfinite(one_thread):
    """loss x1e20 at step k: per-layer sums of squares overflow float32, the collector recomputes them in float64."""
    k = 15
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    found, losses, first_bad = run(model, opt, k + 3, digit_batches(), scale_loss=lambda i: 1e20 if i == k else 1.0)
    assert first_bad is None and all(math.isfinite(v) for v in losses)
    assert not by(found, "nonfinite"), [str(f) for f in found]
    f, = by(found, "exploding")
    assert f.since == k and f.severity.value == "critical" and f.key == "spike"


def test_conv_batchnorm_cnn_is_not_vanishing(one_thread):
    """conv -> BN -> ReLU twice: the conv biases get ~1e-6 of the median layer's gradient, by design."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    found, losses, _ = run(model, opt, 30, digit_batches(image=True), deep_every=5)
    mine = [str(f) for f in found if f.detector in ("vanishing", "exploding", "nonfinite", "no_gradient")]
    assert mine == []
    assert sum(losses[-5:]) < sum(losses[:5])


class Add(nn.Module):
    def __init__(self, detach_side: bool) -> None:
        super().__init__()
        self.main, self.side, self.detach_side = nn.Linear(64, 64), nn.Linear(64, 64), detach_side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = self.side(x)
        return self.main(x) + (side.detach() if self.detach_side else side)


def test_a_detached_branch_is_reported_by_no_gradient(one_thread):
    torch.manual_seed(0)
    model = nn.Sequential(Add(detach_side=True), nn.ReLU(), nn.Linear(64, 10))
    found, _, _ = run(model, torch.optim.Adam(model.parameters(), lr=1e-3), 12, digit_batches())
    f, = by(found, "no_gradient")
    assert f.since == 9 and f.layers == ["0.side.weight", "0.side.bias"] and ".grad is None" in f.message
    assert [x.detector for x in found] == ["no_gradient"]


def test_a_freeze_done_with_a_hook_is_no_gradient_not_vanishing(one_thread):
    k = 10
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def freeze(i: int) -> None:
        if i == k:
            for p in model[2].parameters():
                p.register_hook(torch.zeros_like)

    found, _, _ = run(model, torch.optim.Adam(model.parameters(), lr=1e-3), k + 12, digit_batches(),
                      before_step=freeze)
    f, = by(found, "no_gradient")
    assert f.since == k + 9 and f.layers == ["2.weight", "2.bias"] and "exactly zero" in f.message
    assert not by(found, "vanishing")


def test_monitor_step_after_zero_grad_is_one_finding_about_the_monitor(one_thread):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = gfservice.monitor(model, opt, run="misplaced", service=None)
    # gradients that arrive without a backward the monitor sees (as DeepSpeed ZeRO's do): it reads them in
    # monitor.step(); after a backward it would have read them at its end, and zero_grad() would not matter
    for _ in range(12):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mon.step()  # too late: the gradients are gone
    mon.close()
    f, = mon.findings
    assert (f.detector, f.key, f.since) == ("no_gradient", "all", 9)
    assert "zero_grad(set_to_none=True)" in f.message and "DeepSpeed ZeRO / FSDP1" in f.message
