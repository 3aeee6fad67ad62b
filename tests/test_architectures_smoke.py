"""A quick subset of the real-architecture sweep (``benchmarks/architectures.py``): a false alarm or a miss fails.

Healthy runs of architectures whose parameters get tiny gradients at initialisation or by construction (a post-LN
BERT's query and key projections, MobileNetV2's projection BatchNorm biases) must raise nothing; a NaN batch in a
ViT is critical at its step; an EfficientNet with transformers' N(0, 0.02) BatchNorm weights is vanishing.
"""

from __future__ import annotations

import numpy as np
import pytest

from gfservice.testing import make_step, replay
from gfservice_detectors.vanishing import Vanishing

transformers = pytest.importorskip("transformers")

from benchmarks import architectures as sweep  # noqa: E402  (needs transformers)

RUNS = ["bert", "mobilenet_v2", "vit:nan_batch", "efficientnet:bn_init"]


@pytest.mark.slow
@pytest.mark.parametrize("run", RUNS)
def test_the_architecture_sweep_subset_passes(one_thread, run):
    [(arch, fault)] = sweep.plan(run)
    result = sweep.train(arch, fault)
    assert result.monitor_errors == 0
    assert result.verdict == "PASS", (result.why, result.messages)


def test_the_sweep_covers_at_least_25_architectures_and_plans_its_faults():
    assert len({a.name for a in sweep.ARCHS}) >= 25
    runs = sweep.plan()
    assert {f.name for _, f in runs if f is not None} == set(sweep.FAULTS)
    assert all(f is None or f.expected is None or f.expected in sweep.TARGETS for _, f in runs)
    with pytest.raises(ValueError, match="unknown run"):
        sweep.plan("no_such_architecture")


# ---- the vanishing detector on the profiles the sweep measured ----------------------------------------------
def _blocks(step: int, query: list[float], rest: float = 1e-2):
    """Two-block encoder: per block a query weight (tiny at init in a post-LN BERT), a value weight, a norm."""
    layers, rms = [], []
    for b, q in enumerate(query):
        layers += [f"enc.layer.{b}.query.weight", f"enc.layer.{b}.value.weight", f"enc.layer.{b}.norm.weight"]
        rms += [q, rest, rest]
    layers.append("head.weight")
    rms.append(rest)
    count = np.full(len(layers), 1024)
    return make_step(step=step, layers=tuple(layers), count=count, sum_sq=np.array(rms) ** 2 * count)


def test_vanishing_needs_a_depth_profile_among_layers_of_the_same_role():
    at_init = [_blocks(i, query=[1e-9, 1e-9]) for i in range(30)]  # every block's query alike: healthy
    assert replay(Vanishing(), at_init) == []
    depth = [_blocks(i, query=[1e-9, 1e-2], rest=1e-2) for i in range(30)]  # block 0's query 7 orders behind block 1's
    found = replay(Vanishing(), depth)
    assert found and found[0].step == 9 and found[0].layers == ["enc.layer.0.query.weight"]


def test_a_batchnorm_bias_under_the_floor_beside_its_weight_is_not_vanishing():
    """MobileNetV2/EfficientNet: the projection BatchNorm's bias reaches the loss only through later BatchNorms."""
    layers = (*(f"layer.{b}.project_bn.{p}" for b in range(4) for p in ("weight", "bias")), "head.bias")
    rms = [1e-2, 1e-8] * 3 + [1e-2, 1e-2] + [1e-1]  # the last block's bias feeds the head: it is larger
    steps = [make_step(step=i, layers=layers, count=[32] * 9, sum_sq=[32 * r**2 for r in rms]) for i in range(30)]
    assert replay(Vanishing(), steps) == []


def test_a_whole_gradient_under_the_floor_is_still_reported():
    layers = ("embed.weight", "proj.weight", "head.weight")  # no two layers of one role: no depth profile
    found = replay(Vanishing(), [make_step(step=i, layers=layers, sum_sq=[1e-20] * 3) for i in range(15)])
    assert found and "every layer is under it alike" in found[0].message
