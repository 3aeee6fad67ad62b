"""Issue 21's failure classes on synthetic steps (``gfservice.testing``): a miss or a false alarm fails them.

Slow growth of the global norm (``exploding``, key ``trend``), a jump of a tiny norm in a converged run (no
alarm), conditional computation (an expert that gets gradient on some steps is not detached), a layer whose
units all died (``dead_units``, not ``no_gradient``), a NaN that recurs every k steps (one ``periodic`` finding,
no clipping advice) and the message for a model that no gradient reaches."""

from __future__ import annotations

import numpy as np

from gfservice.testing import make_step, replay
from gfservice_detectors.dead_units import DeadUnits
from gfservice_detectors.exploding import Exploding
from gfservice_detectors.no_gradient import NoGradient
from gfservice_detectors.nonfinite import NonFinite


def _norms(norms, losses=None):
    return [make_step(step=i, sum_sq=[n**2 / 2, n**2 / 2], loss=None if losses is None else losses[i])
            for i, n in enumerate(norms)]


def test_growth_mid_run_is_found_within_its_budget():
    rng = np.random.default_rng(0)
    norms = np.exp(rng.normal(0, 0.3, 200))
    norms[100:] *= 1.05 ** np.arange(100)          # a 5%/step ramp from a settled run: 3x at step 123
    found = [f for f in replay(Exploding(), _norms(norms, [1.0] * 200)) if f.key in ("trend", "spike")]
    assert found and 100 < found[0].step <= 123 + 30, found
    assert found[0].key == "trend" and "zero_grad" in found[0].message


def test_a_slow_noisy_ramp_is_one_finding_not_one_per_flicker_of_its_level():
    rng = np.random.default_rng(3)
    norms = np.exp(rng.normal(0, 0.4, 220))
    norms[100:] *= 1.03 ** np.arange(120)          # 3%/step under heavy batch noise: the level crosses 3x, dips, ...
    # (before the rise waited for a quiet level window to end, this ramp gave three findings: 135, 142, 147)
    found = [f for f in replay(Exploding(), _norms(norms, [1.0] * 220)) if f.key == "trend"]
    assert found and found[0].step <= 100 + 37 + 30, found
    assert len(found) == 1, [f.step for f in found]


def test_growth_unequal_across_layers_is_learning_not_a_trend():
    rng = np.random.default_rng(3)
    base = np.exp(rng.normal(0, 0.2, (200, 2)))
    base[100:, 0] *= 1.06 ** np.arange(100)          # one of two equal layers ramps, the other barely: 10x+ overall
    base[100:, 1] *= 1.01 ** np.arange(100)
    steps = [make_step(step=i, sum_sq=list(r**2)) for i, r in enumerate(base)]
    assert not [f for f in replay(Exploding(), steps) if f.key == "trend" and not f.layers]


def test_a_uniform_rise_under_a_learning_rate_rise_is_explained():
    rng = np.random.default_rng(4)
    norms = np.exp(rng.normal(0, 0.2, 200))
    norms[100:] *= 1.05 ** np.arange(100)
    lrs = [0.1] * 100 + [0.1 * 1.05**i for i in range(100)]   # the learning rate rose with it (a warm-up)
    steps = [make_step(step=i, sum_sq=[n**2 / 2, n**2 / 2], lr=lrs[i]) for i, n in enumerate(norms)]
    assert not [f for f in replay(Exploding(), steps) if f.key == "trend"]


def test_a_spike_after_a_learning_rate_jump_is_critical_and_names_it():
    rng = np.random.default_rng(5)
    norms = np.exp(rng.normal(0, 0.1, 40))
    norms[32] *= 50.0                                # 50x: a warning on its own
    lrs = [1e-3] * 30 + [1e-1] * 10                  # the learning rate jumped 100x at step 30
    steps = [make_step(step=i, sum_sq=[n**2 / 2, n**2 / 2], lr=lrs[i]) for i, n in enumerate(norms)]
    f, = replay(Exploding(), steps)
    assert (f.step, f.key, f.severity.value) == (32, "spike", "critical")
    assert "learning rate rose 100.0x" in f.message and "step 30" in f.message and "clip" not in f.message
    steps = [make_step(step=i, sum_sq=[n**2 / 2, n**2 / 2], lr=1e-3) for i, n in enumerate(norms)]
    f, = replay(Exploding(), steps)
    assert f.severity.value == "warning" and not f.message.startswith("clip")


def test_one_layer_growing_against_the_rest_is_found_from_the_start():
    rng = np.random.default_rng(1)
    steady = np.exp(rng.normal(0, 0.1, (80, 3)))
    grown = steady.copy()
    grown[:, 0] *= np.arange(1, 81)                 # a .grad never cleared: linear growth from step 0 (3x at 2)
    steps = [make_step(step=i, sum_sq=list(r**2), layers=["a", "b", "c"]) for i, r in enumerate(grown)]
    found = [f for f in replay(Exploding(), steps) if f.key == "trend"]
    assert found and found[0].step <= 2 + 30 and found[0].layers == ["a"], found
    steps = [make_step(step=i, sum_sq=list(r**2), layers=["a", "b", "c"]) for i, r in enumerate(steady)]
    assert not replay(Exploding(), steps)


def test_growth_at_the_start_of_a_run_is_not_a_trend():
    norms = np.geomspace(1e-3, 1.0, 100)            # a GAN generator while its discriminator learns
    losses = np.linspace(0.7, 2.0, 100)
    assert not [f for f in replay(Exploding(), _norms(norms, losses)) if f.key == "trend"]


def test_a_step_change_is_not_a_trend():
    rng = np.random.default_rng(2)
    norms = np.exp(rng.normal(0, 0.2, 300))
    norms[150:] *= 4.0                              # an SGDR restart: 4x at once, with the learning rate
    lrs = [0.01] * 150 + [0.1] * 150
    steps = [make_step(step=i, sum_sq=[n**2 / 2, n**2 / 2], lr=lrs[i]) for i, n in enumerate(norms)]
    assert not [f for f in replay(Exploding(), steps) if f.key == "trend"]
    rest = np.exp(rng.normal(0, 0.2, 300))          # a layer unfrozen: the new layer alone
    steps = [make_step(step=i, sum_sq=[n**2, (0.0 if i < 150 else 15 * m**2)]) for i, (n, m) in
             enumerate(zip(norms / 4, rest, strict=True))]
    assert not [f for f in replay(Exploding(), steps) if f.key == "trend" and not f.layers]
    # the same 4x on every layer with no learning-rate rise: a common factor appeared (a loss weight, a scale)
    assert [f.key for f in replay(Exploding(), _norms(norms))] == ["trend"]


def test_jump_of_a_tiny_norm_near_convergence_is_not_an_explosion():
    norms = np.geomspace(1.0, 5e-3, 300)
    norms[:20] = 0.5
    norms[290] = 40 * norms[289]                    # 40x, still below the run's early scale
    assert replay(Exploding(), _norms(norms)) == []
    norms[295] = 2e3 * norms[294]                   # above the early scale: an explosion
    assert [f.step for f in replay(Exploding(), _norms(norms))] == [295]


def _moe_step(i, hit):
    layers = ["router.weight", "experts.0.weight", "experts.1.weight", "experts.2.weight"]
    return make_step(step=i, sum_sq=[1.0] + [1.0 if h else 0.0 for h in hit],
                     count=[10] + [10 if h else 0 for h in hit], layers=layers)


def test_idle_expert_is_not_a_detached_branch():
    rng = np.random.default_rng(1)
    steps = [_moe_step(i, [True, rng.random() < 0.7, rng.random() < 0.1 or i == 3]) for i in range(300)]
    assert replay(NoGradient(), steps) == []


def test_expert_that_routing_leaves_for_long_is_not_a_detached_branch():
    # an expert chosen on 10% of the early steps, then on none for 150 steps: the router moved away from it
    rng = np.random.default_rng(3)
    steps = [_moe_step(i, [True, rng.random() < 0.5, (i < 60 and rng.random() < 0.1) or i == 3])
             for i in range(300)]
    assert replay(NoGradient(), steps) == []


def test_mixture_whose_every_expert_goes_silent_is_reported():
    rng = np.random.default_rng(4)
    steps = [_moe_step(i, [True, rng.random() < 0.5, rng.random() < 0.5 or i == 3]) for i in range(100)]
    steps += [_moe_step(i, [False, False, False]) for i in range(100, 140)]   # the expert layer cut off at 100
    f = replay(NoGradient(), steps)[0]
    assert 100 < f.step <= 110 and f.layers == ["experts.0.weight", "experts.1.weight", "experts.2.weight"], f


def test_router_without_gradient_is_reported_among_experts():
    rng = np.random.default_rng(2)
    layers = ["router.weight", "experts.0.weight", "experts.1.weight"]
    steps = [make_step(step=i, sum_sq=[0.0, 1.0, 1.0 if rng.random() < 0.5 else 0.0],
                       count=[0, 10, 10], layers=layers) for i in range(40)]
    f = replay(NoGradient(), steps)[0]
    assert f.step == 9 and f.layers == ["router.weight"]


def _dead_step(i, dead):
    layers = ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    z = [dead, dead, dead, False, False, False]
    return make_step(step=i, sum_sq=[0.0 if d else 1.0 for d in z], max_abs=[0.0 if d else 0.1 for d in z],
                     count=[8192, 128, 16384, 128, 1280, 10], units=[128, 128, 128, 128, 10, 10], layers=layers,
                     zeros=[c if d else 0 for c, d in zip([8192, 128, 16384, 128, 1280, 10], z, strict=True)],
                     dead_units=[128 if d else 0 for d in z], sum_abs=[1.0] * 6)


def test_layer_whose_units_all_died_is_dead_units_not_no_gradient():
    steps = [_dead_step(i, i >= 5) for i in range(30)]
    assert replay(NoGradient(), steps) == []
    f = replay(DeadUnits(), steps)[0]
    assert f.step == 6 and {"0.weight", "0.bias"} <= set(f.layers)


def test_recurring_nan_is_one_periodic_finding_without_clipping_advice():
    steps = [make_step(step=i, sum_sq=[1.0, float("nan") if i >= 10 and i % 25 == 10 else 1.0],
                       nonfinite=[0, 3 if i >= 10 and i % 25 == 10 else 0]) for i in range(120)]
    findings = replay(NonFinite(), steps)
    periodic = [f for f in findings if f.key == "periodic"]
    assert [f.step for f in periodic] == [85, 110]
    assert "every 25 steps" in periodic[0].message
    assert all("enable gradient clipping" not in f.message for f in findings)


def test_no_gradient_anywhere_names_a_cut_off_loss():
    steps = [make_step(step=i, sum_sq=[0.0, 0.0], count=0) for i in range(10)]
    f, = replay(NoGradient(), steps)
    assert ".detach()" in f.message and "no gradient reaches" in f.message


def test_the_set_of_layers_may_change_mid_run():
    rng = np.random.default_rng(6)
    steps = [make_step(step=i, sum_sq=list(np.exp(rng.normal(0, 0.2, 2 if i < 60 else 3)))) for i in range(120)]
    assert not [f for f in replay(Exploding(), steps) if f.key == "trend"]


def test_one_small_layer_compounding_against_the_rest_is_found():
    """A per-parameter factor that compounds (5%/step) on a layer that carries a tenth of the gradient: the
    share-of-norm rule (``RampTest``) never judges it, the steady-rise rule (``SteadyLayerRise``) does."""
    rng = np.random.default_rng(6)
    common = rng.normal(0, 0.3, 200)                 # batch noise every layer shares
    norms = np.exp(common[:, None] + rng.normal(0, 0.05, (200, 3))) * np.array([0.35, 0.7, 0.6])
    norms[100:, 0] *= 1.05 ** np.arange(100)         # 3x at step ~123
    steps = [make_step(step=i, sum_sq=list(r**2), layers=["a", "b", "c"]) for i, r in enumerate(norms)]
    found = [f for f in replay(Exploding(), steps) if f.key == "trend"]
    assert found and 100 < found[0].step <= 123 + 30 and found[0].layers == ["a"], found
    assert "compounds on this layer alone" in found[0].message
    norms[100:, 0] /= 1.05 ** np.arange(100)
    steps = [make_step(step=i, sum_sq=list(r**2), layers=["a", "b", "c"]) for i, r in enumerate(norms)]
    assert not replay(Exploding(), steps)
