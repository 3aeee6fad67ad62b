"""The optimisation-health detectors: ``update_ratio``, ``dead_units``, ``precision``, ``loss_spike`` and
``loss_scale``. For each: the plugin contract (``check_detector``), the firing step on synthetic steps, silence
on healthy synthetic steps, configuration, and a small real training run through ``gfservice.monitor``."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from functools import cache

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn
from torch.nn import functional as F

import gfservice
from gfservice.api import StepStats
from gfservice.registry import available, describe
from gfservice.stats import FORMAT_LIMITS, FORMAT_MAX, GradStats
from gfservice.testing import check_detector, make_step, replay
from gfservice_detectors.dead_units import DeadUnits
from gfservice_detectors.loss_scale import LossScale
from gfservice_detectors.loss_spike import LossSpike
from gfservice_detectors.precision import Precision, shares
from gfservice_detectors.update_ratio import UpdateRatio
from tests.models import at_end_of_backward

DETECTORS = {"update_ratio": UpdateRatio, "dead_units": DeadUnits, "precision": Precision,
             "loss_spike": LossSpike, "loss_scale": LossScale}


def test_registered_with_their_fields_and_defaults():
    found = available()
    rows = {r["name"]: r for r in describe()}
    for name, cls in DETECTORS.items():
        assert found.get(name) is cls, f"{name}: pip install -e . registers the entry point"
        assert rows[name]["summary"] and rows[name]["fields"]
    assert rows["dead_units"]["fields"]["max_dead_fraction"][0] == 0.7
    assert rows["update_ratio"]["fields"]["high"][0] == 0.2
    assert rows["precision"]["fields"]["format"][0] is None
    assert rows["loss_spike"]["fields"]["z_threshold"][0] == 6.0
    assert rows["loss_scale"]["fields"]["max_halvings"][0] == 8


@pytest.mark.parametrize(("cls", "field", "bad"), [
    (UpdateRatio, "high", 0), (UpdateRatio, "window", 0), (DeadUnits, "max_dead_fraction", 1.5),
    (DeadUnits, "exclude", "("), (Precision, "format", "fp4"), (Precision, "max_fraction", 0),
    (LossSpike, "window", 2), (LossSpike, "min_ratio", 0.5), (LossScale, "max_halvings", 0),
    (LossScale, "max_skip_fraction", 0),
])
def test_bad_values_are_configuration_errors(cls, field, bad):
    with pytest.raises(ValidationError, match=field):
        cls(**{field: bad})


def test_format_max_sits_next_to_the_limits():
    assert set(FORMAT_MAX) == set(FORMAT_LIMITS)
    assert FORMAT_MAX["fp16"] == float(np.finfo(np.float16).max)
    assert FORMAT_MAX["bf16"] == float(torch.finfo(torch.bfloat16).max)
    assert FORMAT_MAX["fp8_e4m3"] == float(torch.finfo(torch.float8_e4m3fn).max)
    assert FORMAT_MAX["fp8_e5m2"] == float(torch.finfo(torch.float8_e5m2).max)


# ---- update_ratio ------------------------------------------------------------------------------------------
LAYERS = ["0.weight", "0.bias", "2.weight", "2.bias"]
COUNT = [8192, 128, 1280, 10]
UNITS = [128, 128, 10, 10]


def ratio_step(i: int, ratios, weight_norm=(4.0, 0.1, 1.0, 0.03), sum_sq=(1.0, 1.0, 1.0, 1.0), **kw) -> StepStats:
    return make_step(step=i, sum_sq=list(sum_sq), count=COUNT, units=UNITS, layers=LAYERS,
                     weight_norm=list(weight_norm), update_ratio=list(ratios), **kw)


def ratio_steps() -> list[StepStats]:
    healthy = [ratio_step(i, [1e-3, 1e-2, 2e-3, 3e-2]) for i in range(6)]
    hot = [ratio_step(i, [0.4, 0.9, 0.1, 0.9]) for i in range(6, 9)]
    stuck = [ratio_step(i, [1e-3, 1e-2, 0.0, 3e-2]) for i in range(9, 16)]
    return healthy + hot + stuck


def test_update_ratio_contract():
    check_detector(UpdateRatio, ratio_steps())


def test_update_ratio_high_fires_at_once_and_names_matrices_only():
    found = replay(UpdateRatio(), ratio_steps())
    high = [f for f in found if f.key == "high"]
    assert [f.step for f in high] == [6, 7, 8]
    assert high[0].layers == ["0.weight"]  # the biases (0.9) are 1-d; 2.weight (0.1) is below 0.2
    assert high[0].value == pytest.approx(0.4) and high[0].threshold == 0.2
    assert "40% of the weights of layer 0.weight" in high[0].message
    assert [f.step for f in replay(UpdateRatio(window=2), ratio_steps()) if f.key == "high"] == [7, 8]


def test_update_ratio_low_needs_low_window_deep_steps_while_others_learn():
    low = [f for f in replay(UpdateRatio(), ratio_steps()) if f.key == "low"]
    assert low[0].step == 11 and low[0].layers == ["2.weight"]  # 9, 10, 11: three deep steps
    assert "do not move" in low[0].message
    # everything still (a learning rate of 0, or the end of a cosine schedule): nobody learns, nothing to say
    still = [ratio_step(i, [1e-9, 0.0, 0.0, 1e-9]) for i in range(6)]
    assert replay(UpdateRatio(), still) == []
    # a layer without gradient does not move either: that is no_gradient's business
    nograd = [ratio_step(i, [1e-3, 1e-2, 0.0, 3e-2], sum_sq=(1.0, 1.0, 0.0, 1.0)) for i in range(6)]
    assert replay(UpdateRatio(), nograd) == []


def test_update_ratio_skips_small_and_zero_initialised_weights():
    # 2.weight's weights are 1e-4 of the others (a zero-initialised matrix after its first step): its ratio of 1
    # is its first update, not a learning rate problem
    steps = [ratio_step(i, [1e-3, 1e-2, 1.0, 1.0], weight_norm=(4.0, 0.1, 1e-4, 0.0)) for i in range(4)]
    assert replay(UpdateRatio(), steps) == []


def test_update_ratio_does_not_judge_steps_without_an_optimizer_update():
    det = UpdateRatio()
    assert det.update(make_step(sum_sq=[1.0])) is None  # no update statistics
    assert det.update(ratio_step(0, [0.5, 0.5, 0.5, 0.5], skipped=True)) is None  # the GradScaler skipped it


def mlp(*sizes: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        mods += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*mods)


@cache
def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """1797 standard-normal 64-d inputs labelled by a fixed random linear teacher (10 classes): learnable to a
    loss near 0, like sklearn's digits, without importing scikit-learn."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(1797, 64, generator=g)
    return x, (x @ torch.randn(64, 10, generator=g)).argmax(1)


def batches(seed: int = 0, batch: int = 64):
    x, y = _data()
    g = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(0, len(x), (batch,), generator=g)
        yield x[idx], y[idx]


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, run: str, *, deep_every: int = 5,
          scaler: torch.amp.GradScaler | None = None, before: Callable[[int], None] | None = None,
          grads: Callable[[int], None] | None = None, batch: Callable[[int, torch.Tensor, torch.Tensor], tuple]
          | None = None, loss_fn: Callable | None = None, data=None, detectors=None) -> list:
    """Train with a monitor (in-process aggregator); return its findings."""
    mon = gfservice.monitor(model, opt, run=run, service=None, deep_every=deep_every, scaler=scaler,
                            detectors=detectors)
    data = data or batches()
    for i in range(steps):
        if before:
            before(i)
        x, y = next(data)
        if batch:
            x, y = batch(i, x, y)
        with torch.autocast("cpu", dtype=torch.float16) if scaler else torch.autocast("cpu", enabled=False):
            loss = (loss_fn or (lambda x, y: F.cross_entropy(model(x).float(), y)))(x, y)
        if grads:  # faults on gradients strike in backward, where the monitor reads them
            at_end_of_backward(model, lambda i=i: grads(i))
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        mon.step(loss=loss.detach())
        opt.zero_grad(set_to_none=True)
    mon.close()
    return mon.findings


def _mine(findings, name):
    return [f for f in findings if f.detector == name and f.severity.value != "info"]


def test_real_adamw_at_a_huge_learning_rate_is_reported_at_the_first_deep_step(one_thread):
    model = mlp(64, 64, 64, 10)
    found = _mine(train(model, torch.optim.AdamW(model.parameters(), lr=0.08), 12, "hot", deep_every=5),
                  "update_ratio")
    assert found and found[0].first_step == 0 and found[0].key == "high"
    assert {"0.weight", "2.weight", "4.weight"} <= set(found[0].layers)
    assert not {n for n in found[0].layers if n.endswith("bias")}


def test_real_adam_at_a_usual_learning_rate_is_silent(one_thread):
    model = mlp(64, 64, 64, 10)
    assert _mine(train(model, torch.optim.Adam(model.parameters(), lr=1e-3), 60, "ok", deep_every=2),
                 "update_ratio") == []


def test_real_layer_left_out_of_the_optimizer_is_reported(one_thread):
    """A parameter group that forgot a layer: it gets gradients, it never moves."""
    model = mlp(64, 64, 64, 10)
    params = [p for n, p in model.named_parameters() if not n.startswith("2.")]
    found = _mine(train(model, torch.optim.SGD(params, lr=0.05, momentum=0.9), 16, "left-out", deep_every=5),
                  "update_ratio")
    assert found and found[0].key == "low" and found[0].first_step == 10  # deep steps 0, 5, 10
    assert found[0].layers == ["2.weight", "2.bias"]


# ---- dead_units --------------------------------------------------------------------------------------------
def dead_step(i: int, dead, deep: bool = True, zeros=(0, 0, 0, 0), count=COUNT, layers=LAYERS) -> StepStats:
    if not deep:
        return make_step(step=i, sum_sq=[1.0] * 4, count=list(count), units=UNITS, layers=layers)
    return make_step(step=i, sum_sq=[1.0] * 4, count=list(count), units=UNITS, layers=layers, sum_abs=[1.0] * 4,
                     zeros=list(zeros), dead_units=list(dead))


def dead_steps() -> list[StepStats]:
    steps = [dead_step(i, [5, 5, 0, 0], deep=i % 2 == 0) for i in range(10)]
    steps += [dead_step(i, [100, 100, 0, 0], deep=i % 2 == 0) for i in range(10, 20)]
    return steps + [dead_step(i, [5, 5, 0, 0]) for i in range(20, 24)]


def test_dead_units_contract():
    check_detector(DeadUnits, dead_steps())


def test_dead_units_fire_at_the_second_dead_deep_step_naming_weight_and_bias():
    det = DeadUnits()
    judged = [(s.step, det.update(s)) for s in dead_steps()]
    fired = [(step, f) for step, found in judged if found for f in found]
    assert fired[0][0] == 12  # dead from step 10: deep steps 10 and 12
    f = fired[0][1]
    assert f.layers == ["0.weight", "0.bias"] and f.value == pytest.approx(100 / 128) and f.threshold == 0.7
    assert "78% of the output units of layers 0.weight, 0.bias" in f.message
    assert dict(judged)[13] is None  # not a deep step: the finding stands
    assert dict(judged)[20] == []  # alive again: cleared


def test_dead_units_leave_biases_empty_layers_and_embeddings_alone():
    # a 1-d parameter alone (2.bias all dead), no gradient (count 0), every value zero: none is judged
    steps = [dead_step(i, [5, 5, 10, 10], zeros=(0, 0, 1280, 10)) for i in range(4)]
    assert replay(DeadUnits(), steps) == []
    steps = [dead_step(i, [128, 128, 0, 0], count=(0, 0, 1280, 10)) for i in range(4)]
    assert replay(DeadUnits(), steps) == []
    # an embedding table: the tokens absent from a batch are rows with zero gradient
    emb = ["tok_embeddings.weight", "norm.weight", "2.weight", "2.bias"]
    steps = [dead_step(i, [120, 0, 0, 0], layers=emb) for i in range(4)]
    assert replay(DeadUnits(), steps) == []
    assert replay(DeadUnits(exclude=""), steps)[0].layers == ["tok_embeddings.weight"]


def test_real_dead_relus_are_found_within_two_deep_steps(one_thread):
    model = mlp(64, 128, 128, 10)

    def kill(i: int) -> None:
        if i == 20:
            with torch.no_grad():
                model[0].bias[:120] = -100.0  # 120 of 128 ReLUs never fire again

    found = _mine(train(model, torch.optim.Adam(model.parameters(), lr=1e-3), 40, "dead", deep_every=5,
                        before=kill), "dead_units")
    assert found and found[0].first_step == 25  # deep steps 20 and 25
    assert found[0].layers[:2] == ["0.weight", "0.bias"] and "2.bias" not in found[0].layers


# ---- precision ---------------------------------------------------------------------------------------------
def prec_step(i: int, factor: float, loss_scale: float | None = 65536.0, seed: int = 0, **kw) -> StepStats:
    rng = np.random.default_rng(seed + i)
    g = {"0.weight": rng.normal(0, 1e-3, (64, 32)), "0.bias": rng.normal(0, 1e-3, 64),
         "2.weight": rng.normal(0, 1e-2, (10, 64))}
    stats = GradStats.from_arrays({k: v * factor for k, v in g.items()}, deep=kw.pop("deep", True))
    return StepStats(run="t", step=i, grads=stats, loss_scale=loss_scale, **kw)


def test_precision_contract():
    steps = [prec_step(i, 1.0, deep=i % 2 == 0) for i in range(6)] + [prec_step(i, 1e-9) for i in range(6, 12)]
    check_detector(Precision, steps)


def test_precision_fp16_with_a_loss_scale_fires_at_the_second_deep_step():
    steps = [prec_step(i, 1.0) for i in range(4)] + [prec_step(i, 1e-9) for i in range(4, 8)]
    found = replay(Precision(), steps)
    assert found[0].step == 5 and found[0].key == "underflow"
    assert found[0].layers == ["0.weight", "2.weight"]  # the bias is 1-d: not judged
    assert "in fp16 (scaled by 65536)" in found[0].message
    assert replay(Precision(window=1), steps)[0].step == 4


def test_precision_judges_the_scaled_values():
    # 1e-4 of the healthy gradients: ~1e-7..1e-6, under fp16's smallest normal (6.1e-5) unscaled, ~1e-2 at a
    # scale of 65536
    steps = [prec_step(i, 1e-4) for i in range(4)]
    assert replay(Precision(), steps) == []
    assert replay(Precision(), [prec_step(i, 1e-4, loss_scale=1.0) for i in range(4)])[0].step == 1


def test_precision_stays_silent_without_a_format():
    det = Precision()
    assert det.update(prec_step(0, 1e-12, loss_scale=None)) is None  # no scaler, no format: not judged
    assert det.update(prec_step(1, 1.0, deep=False)) is None  # not a deep step
    steps = [prec_step(i, 1e-6, loss_scale=None) for i in range(4)]
    found = replay(Precision(format="fp16"), steps)
    assert found[0].step == 1 and "flush to zero in fp16 at 2 deep steps" in found[0].message
    assert replay(Precision(format="bf16"), steps) == []


def test_precision_overflow_is_judged_with_an_explicit_format():
    steps = [prec_step(i, 1e6, loss_scale=None) for i in range(3)]  # |g| ~ 1e3..1e4: above fp8 e4m3's 448
    found = replay(Precision(format="fp8_e4m3"), steps)
    assert [f.key for f in found if f.step == 1] == ["overflow"]
    assert "would overflow in fp8_e4m3" in found[0].message
    # with a loss scale and no format, overflow is the GradScaler's routine
    assert [f.key for f in replay(Precision(), [prec_step(i, 1e3) for i in range(3)])] == []


def test_shares_counts_zeros_out_and_shifts_by_the_scale():
    g = GradStats.from_arrays({"g": np.array([0.0, 0.0, 1e-9, 1e-6, 1.0, 7e4])}, deep=True)
    under, over = shares(g, "fp16")
    assert under.tolist() == [0.25] and over.tolist() == [0.25]
    under, over = shares(g, "fp16", limit="normal")
    assert under.tolist() == [0.5]
    under, over = shares(g, "fp16", shift=-20)  # x2**-20: 1e-6 flushes too, 7e4 no longer overflows
    assert under.tolist() == [0.5] and over.tolist() == [0.0]


def test_real_underflow_with_format_fp16_is_found_within_two_deep_steps(one_thread):
    model = mlp(64, 32, 10)

    def shrink(i: int) -> None:
        if i >= 10:
            for p in model.parameters():
                p.grad.mul_(1e-6)

    found = _mine(train(model, torch.optim.Adam(model.parameters(), lr=1e-3), 20, "underflow", deep_every=5,
                        grads=shrink, detectors={"precision": {"format": "fp16"}}), "precision")
    assert found and found[0].first_step == 15  # deep steps 10 and 15
    assert found[0].layers == ["0.weight", "2.weight"]


def test_real_fp16_autocast_with_a_grad_scaler_is_silent(one_thread):
    model = mlp(64, 32, 10)
    scaler = torch.amp.GradScaler("cpu")
    found = train(model, torch.optim.SGD(model.parameters(), lr=0.05), 30, "amp", deep_every=2, scaler=scaler)
    assert _mine(found, "precision") == [] and _mine(found, "loss_scale") == []


# ---- loss_spike ----------------------------------------------------------------------------------------------
def loss_steps(losses, nonfinite_at: int | None = None) -> list[StepStats]:
    out = []
    for i, v in enumerate(losses):
        bad = nonfinite_at is not None and i == nonfinite_at
        out.append(make_step(step=i, sum_sq=[math.nan if bad else 1.0], nonfinite=[3 if bad else 0], loss=float(v)))
    return out


def noisy_falling(n: int = 200, seed: int = 0, noise: float = 0.1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return 2.0 * np.exp(-np.arange(n) / 80) * np.exp(rng.normal(0, noise, n))


def test_loss_spike_contract():
    losses = noisy_falling()
    losses[150] *= 4
    check_detector(LossSpike, loss_steps(losses))


@pytest.mark.parametrize("seed", range(10))
def test_loss_spike_is_silent_on_a_noisy_falling_loss(seed):
    assert replay(LossSpike(), loss_steps(noisy_falling(400, seed, noise=0.2))) == []


def test_loss_spike_fires_at_the_spike_of_a_still_falling_loss():
    losses = noisy_falling(seed=1, noise=0.05)
    losses[160] *= 3
    found = replay(LossSpike(), loss_steps(losses))
    assert [(f.step, f.key, f.severity.value) for f in found] == [(160, "spike", "warning")]
    assert "x its recent level" in found[0].message and "at step 160" in found[0].message


def test_loss_spike_needs_a_full_excursion_window_or_a_blow_up():
    """Before ``min_excursions`` excursions a jump is reported only if it lifts the loss by the run's starting
    level: a heavy-tailed run's first outliers after convergence are not "new" spikes, a blow-up is."""
    losses = noisy_falling(seed=1, noise=0.05)
    losses[100] *= 3  # 0.57 over a level of 0.29, the start is ~1.8: too early to vouch for
    assert replay(LossSpike(), loss_steps(losses)) == []
    assert [f.step for f in replay(LossSpike(min_excursions=0), loss_steps(losses))] == [100]
    losses[100] *= 10  # now 8.3 over the level: more than the starting loss
    assert [f.step for f in replay(LossSpike(), loss_steps(losses))] == [100]


def test_loss_spike_consecutive_and_divergence():
    losses = noisy_falling(seed=2, noise=0.05)
    losses[160] *= 3
    losses[180:182] *= 4
    assert [f.step for f in replay(LossSpike(consecutive=2), loss_steps(losses))] == [181]
    steps = loss_steps(losses, nonfinite_at=161)
    found = [(f.step, f.key, f.severity.value) for f in replay(LossSpike(), steps)]
    assert (161, "diverged", "critical") in found and (160, "spike", "warning") in found
    # non-finite gradients without a spike before them are nonfinite's business
    assert all(f.key != "diverged" for f in replay(LossSpike(), loss_steps(noisy_falling(), nonfinite_at=50)))


def test_loss_spike_skips_missing_and_non_finite_losses():
    det = LossSpike()
    assert det.update(make_step(sum_sq=[1.0])) is None
    steps = loss_steps(noisy_falling(seed=3, noise=0.05))
    steps[60] = make_step(step=60, sum_sq=[1.0], loss=math.inf)
    assert replay(det, steps) == []


def ln_regression_batches(seed: int = 0):
    g = torch.Generator().manual_seed(10_000 + seed)
    x = _data()[0]
    y = F.layer_norm(torch.tanh(x @ torch.randn(64, 32, generator=g) / 8) @ torch.randn(32, 16, generator=g), (16,))
    gen = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(0, len(x), (64,), generator=gen)
        yield x[idx], y[idx]


def test_real_loss_spike_behind_a_layernorm_is_found_at_once(one_thread):
    """Regression through an output LayerNorm; one batch with targets x1.3: the loss triples, the gradient
    norm does not grow (the zoo's loss_spike_ln)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 16), nn.LayerNorm(16, elementwise_affine=False))
    found = train(model, torch.optim.Adam(model.parameters(), lr=3e-3), 160, "ln", deep_every=0,
                  data=ln_regression_batches(), loss_fn=lambda x, y: F.mse_loss(model(x), y),
                  batch=lambda i, x, y: (x, y * 1.3) if i == 150 else (x, y))
    spikes = _mine(found, "loss_spike")
    assert [f.first_step for f in spikes] == [150]
    assert _mine(found, "exploding") == []


def test_real_classifier_near_convergence_is_silent(one_thread):
    """A classifier trained to a low loss: its minibatch cross-entropy is heavy-tailed (one misclassified sample
    reads several times the median)."""
    model = mlp(64, 64, 64, 10)
    found = train(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), 300, "near-zero",
                  deep_every=0)
    assert _mine(found, "loss_spike") == []


# ---- loss_scale ----------------------------------------------------------------------------------------------
def scale_steps(scales) -> list[StepStats]:
    return [make_step(step=i, sum_sq=[1.0], loss_scale=float(s), skipped=i > 0 and s < scales[i - 1])
            for i, s in enumerate(scales)]


def test_loss_scale_contract():
    scales = [65536.0 / 2**k for k in range(5)] + [4096.0] * 30 + [4096.0 / 2**k for k in range(1, 20)]
    check_detector(LossScale, scale_steps(scales))


def test_loss_scale_normal_scaler_behaviour_is_silent():
    # calibration: 7 halvings from 65536 at the start; later a growth (x2) and the overflow that follows it,
    # every 40 steps
    scales = [65536.0 / 2**k for k in range(8)]
    level = scales[-1]
    for _ in range(10):
        scales += [level] * 39 + [2 * level, level]
    assert replay(LossScale(), scale_steps(scales)) == []


def test_loss_scale_collapse_is_found_within_twenty_steps():
    scales = [65536.0] * 100 + [65536.0 / 2**k for k in range(1, 41)]  # halved at every step from 100
    found = replay(LossScale(), scale_steps(scales))
    collapse = [f for f in found if f.key == "collapse"]
    floor = [f for f in found if f.key == "floor"]
    assert collapse[0].step == 107 and collapse[0].severity.value == "warning"  # the 8th halving
    assert floor[0].step == 116 and floor[0].severity.value == "critical"  # 65536 / 2**17 = 0.5
    assert "halved 8 times in the last 20 steps" in collapse[0].message


def test_loss_scale_slow_bleed_of_skipped_steps():
    # a scaler that grows the scale back at once (growth_interval 1) but overflows at every third step
    scales = [1024.0] * 10 + [512.0, 1024.0, 1024.0] * 40
    found = replay(LossScale(), scale_steps(scales))
    assert {f.key for f in found} == {"skips"}
    assert found[0].step == 99  # the window fills at step 99: 30 of its 100 steps were skipped


def test_loss_scale_without_a_scaler_is_not_judged():
    assert LossScale().update(make_step(sum_sq=[1.0])) is None


def test_real_grad_scaler_collapse_is_found_within_twenty_steps(one_thread):
    model = mlp(64, 32, 10)
    scaler = torch.amp.GradScaler("cpu")

    def inf_grad(i: int) -> None:
        if i >= 30:
            model[0].weight.grad[0, 0] = float("inf")

    found = train(model, torch.optim.SGD(model.parameters(), lr=0.05), 60, "collapse", deep_every=0,
                  scaler=scaler, grads=inf_grad)
    mine = _mine(found, "loss_scale")
    assert mine and 30 <= mine[0].first_step <= 50 and mine[0].key == "collapse"
    assert any(f.key == "floor" and f.severity.value == "critical" for f in mine)


def test_a_converged_loss_wobbling_near_zero_is_not_a_spike():
    """Full-batch regression converges to ~1e-6 of its starting loss, where rounding noise doubles it from one
    step to the next: large factors on the log scale, nothing that matters (a false page in the alerting
    end-to-end test before ``min_rise``)."""
    rng = np.random.default_rng(0)
    losses = np.concatenate([np.geomspace(10.0, 1e-5, 60), 1e-5 * np.exp(rng.normal(0, 0.05, 160))])
    losses[200] = 4e-5  # 4x its level, but 4e-6 of the starting loss
    steps = [make_step(step=i, sum_sq=[1.0], loss=float(v)) for i, v in enumerate(losses)]
    assert replay(LossSpike(), steps) == []
    losses[200] = 0.5  # a real spike: 5% of the starting loss
    steps[200] = make_step(step=200, sum_sq=[1.0], loss=0.5)
    assert [f.step for f in replay(LossSpike(), steps)] == [200]


def test_loss_spike_in_a_heavy_tailed_run_needs_a_blow_up():
    """Heavy-tailed losses (outliers 10-30x the level, now and then) blind the excursion test; a loss that jumps
    back above the run's starting level is still a spike."""
    rng = np.random.default_rng(7)
    losses = np.concatenate([np.geomspace(1.0, 1e-3, 40), 1e-3 * np.exp(rng.normal(0, 0.2, 260))])
    losses[40::23] *= rng.uniform(10, 30, len(losses[40::23]))
    assert replay(LossSpike(), loss_steps(losses)) == []
    losses[250] = 0.9                                # 0.9 over a level of 1e-3: the run's whole starting loss
    assert [f.step for f in replay(LossSpike(), loss_steps(losses))] == [250]
