"""Issue 21, classes 3, 4 (embeddings) and 6: what the run itself says (optimizer groups, module kinds, the
gradients' format) travels on the wire into ``StepStats``, and the detectors judge with it: a learning rate so low
that nothing moves, a weight-decay collapse blamed on weight decay, embedding tables told by their module, and an
fp16 model without a loss scaler judged by ``precision``. A miss or a false alarm fails these tests."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gfservice
from gfservice.service.aggregator import Aggregator
from gfservice.testing import make_step, replay
from gfservice.wire import Rejected, parse
from gfservice_detectors.dead_units import DeadUnits
from gfservice_detectors.precision import Precision
from gfservice_detectors.update_ratio import UpdateRatio

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = {"kind": "layout", "run": "r", "rank": 0, "world_size": 1, "layers": ["emb.weight", "w"],
          "numel": [8, 4], "sharded": [False, False]}
CORE = {"count": [8, 4], "sum_sq": [1.0, 0.5], "max_abs": [0.9, 0.5], "nonfinite": [0, 0]}


# ---- the wire ---------------------------------------------------------------------------------------------
def test_the_new_fields_are_optional_and_older_messages_still_parse():
    lay = parse(LAYOUT)
    rep = parse({"kind": "step", "run": "r", "rank": 0, "step": 0, "stats": CORE})
    assert lay.kinds == [] and rep.group_lr is None and rep.layer_group is None and rep.precision is None


def test_the_new_fields_round_trip_and_reach_step_stats():
    agg = Aggregator()
    agg.submit({**LAYOUT, "kinds": ["embedding", ""]})
    agg.submit({"kind": "step", "run": "r", "rank": 0, "step": 0, "stats": CORE, "group_lr": [0.1, 0.01],
                "group_wd": [0.0, 0.5], "layer_group": [1, -1], "precision": "fp16", "autocast": "bf16"})
    agg.flush("r")
    s = agg.latest("r")
    assert s.layer_kinds == ("embedding", "")
    assert s.group_lr.tolist() == [0.1, 0.01] and s.layer_group.tolist() == [1, -1]
    assert s.per_layer(s.group_wd)[0] == 0.5 and np.isnan(s.per_layer(s.group_wd)[1])
    assert (s.precision, s.autocast) == ("fp16", "bf16")


@pytest.mark.parametrize("bad", [
    {"layer_group": [0, 2], "group_lr": [0.1]},                 # a group that does not exist
    {"layer_group": [0], "group_lr": [0.1]},                    # not one entry per layer
    {"group_lr": [float("nan")]},                               # not finite
    {"group_wd": [-1.0]},                                       # negative
    {"precision": "fp64"},                                      # not a low-precision format
])
def test_hostile_run_context_is_refused(bad):
    with pytest.raises(Rejected):
        parse({"kind": "step", "run": "r", "rank": 0, "step": 0, "stats": CORE, **bad})


def test_layout_kinds_must_match_the_layers():
    with pytest.raises(Rejected):
        parse({**LAYOUT, "kinds": ["embedding"]})
    with pytest.raises(Rejected):
        parse({**LAYOUT, "kinds": ["Embedding!", ""]})


# ---- the monitor reads them ---------------------------------------------------------------------------------
class Factors(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.users = torch.nn.Embedding(50, 4)  # a table not named *emb*
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.users(x)).sum()


def test_the_monitor_sends_groups_kinds_and_format():
    model = Factors()
    opt = torch.optim.AdamW([{"params": [model.users.weight], "lr": 0.01, "weight_decay": 0.0},
                             {"params": model.head.parameters()}], lr=1e-3, weight_decay=0.1)
    with gfservice.monitor(model, opt, run="ctx", service=None, deep_every=2, sinks=[]) as mon:
        for _ in range(3):
            model(torch.randint(0, 50, (8,))).backward()
            opt.step()
            mon.step()
            opt.zero_grad()
        history = mon.transport.aggregator.history("ctx")
    deep = history[-1]
    assert deep.layer_kinds == ("embedding", "", "")
    assert deep.group_lr.tolist() == [0.01, 1e-3] and deep.group_wd.tolist() == [0.0, 0.1]
    assert deep.layer_group.tolist() == [0, 1, 1] and history[1].layer_group is None  # deep steps only
    assert deep.precision is None


def test_the_monitor_reads_a_half_model_s_format():
    model = torch.nn.Linear(4, 2).half()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gfservice.monitor(model, opt, run="half", service=None, sinks=[]) as mon:
        model(torch.ones(3, 4, dtype=torch.half)).float().sum().backward()
        opt.step()
        mon.step()
        assert mon.transport.aggregator.history("half")[-1].precision == "fp16"


# ---- update_ratio: optimizer awareness ---------------------------------------------------------------------
def ratio_step(i, ratio, lr, wd=0.0, weight=(4.0, 1.0)):
    return make_step(step=i, sum_sq=[1.0, 1.0], count=[8192, 1280], units=[64, 10], layers=["0.weight", "2.weight"],
                     weight_norm=list(weight), update_ratio=[ratio, ratio], lr=lr, group_lr=[lr],
                     group_wd=[wd], layer_group=[0, 0])


def test_a_learning_rate_so_low_nothing_moves_is_found_and_named():
    found = replay(UpdateRatio(), [ratio_step(i * 10, 3e-8, 1e-7) for i in range(3)])
    assert [(f.step, f.key) for f in found][:1] == [(10, "stuck")]
    assert "learning rate (1e-07) is too low" in found[0].message


def test_without_group_settings_the_step_lr_is_named():
    steps = [make_step(step=i, sum_sq=[1.0], count=[8192], units=[64], weight_norm=[4.0], update_ratio=[1e-9],
                       lr=1e-9) for i in range(2)]
    assert "(1e-09)" in replay(UpdateRatio(), steps)[0].message


@pytest.mark.parametrize("lrs", [
    [1e-3, 1e-3, 1e-5, 1e-8, 1e-9],      # a schedule annealed to ~0: nothing moves, by design
    [0.0, 1e-9, 1e-8, 1e-7, 1e-6],      # a warm-up from 0
])
def test_a_schedule_that_brings_the_lr_down_or_up_is_not_stuck(lrs):
    steps = [ratio_step(i, 1e-3 if lr >= 1e-3 else 1e-9, lr) for i, lr in enumerate(lrs)]
    assert [f.key for f in replay(UpdateRatio(), steps)] == []


def test_a_weight_decay_collapse_is_blamed_on_weight_decay_not_the_learning_rate():
    steps = [ratio_step(i, 0.25, 1e-3, 100.0, weight=(4.0 * 0.9 ** i, 0.9 ** i)) for i in range(3)]
    found = replay(UpdateRatio(), steps)
    assert {f.key for f in found} == {"decay"}
    assert "weight decay 100 at learning rate 0.001 removes 10%" in found[0].message


def test_healthy_decay_is_quiet():
    # AdamW's usual 1e-3 x 0.1 (weights shrink 0.01% a step from decay) on shrinking weights
    steps = [ratio_step(i, 1e-3, 1e-3, 0.1, weight=(4.0 * 0.99 ** i, 0.99 ** i)) for i in range(5)]
    assert replay(UpdateRatio(), steps) == []


# ---- dead_units: structure, not names ----------------------------------------------------------------------
def dead_step(i, kinds, name="users.weight"):
    return make_step(step=i, sum_sq=[1.0], count=[48000], units=[3000], layers=[name], sum_abs=[1.0],
                     zeros=[45000], dead_units=[2800], layer_kinds=kinds)


def test_embedding_tables_are_told_by_their_module_not_their_name():
    assert replay(DeadUnits(), [dead_step(i, ["embedding"]) for i in range(3)]) == []
    # a layer that is not a table is judged, whatever its name says
    assert replay(DeadUnits(), [dead_step(i, [""], "tok_embeddings.weight") for i in range(3)])


def test_without_kinds_the_name_patterns_still_apply():
    assert replay(DeadUnits(), [dead_step(i, None, "wte.weight") for i in range(3)]) == []
    assert replay(DeadUnits(), [dead_step(i, None, "users.weight") for i in range(3)])


# ---- precision from the run itself --------------------------------------------------------------------------
def fp16_steps(factor_at, zeros_dead_layer=False, precision="fp16", steps=4):
    rng = np.random.default_rng(0)
    out = []
    for i in range(steps):
        g = {f"{k}.weight": rng.normal(0, 1e-2, (64, 32)).astype(np.float16) for k in range(4)}
        if i >= factor_at:
            g = {k: (v * 1e-6).astype(np.float16) for k, v in g.items()}  # flushes to 0 in fp16
        if zeros_dead_layer and i >= 1:
            g["0.weight"][:60] = 0  # one layer's units die (dead_units' job, not precision's)
        grads = gfservice.stats.GradStats.from_arrays({k: v.astype(np.float32) for k, v in g.items()}, deep=True)
        out.append(gfservice.api.StepStats(run="p", step=i, grads=grads, precision=precision))
    return out


def test_an_fp16_model_whose_gradients_flush_to_zero_is_found_within_two_deep_steps():
    found = replay(Precision(), fp16_steps(factor_at=2))
    assert [(f.step, f.key) for f in found][:1] == [(3, "underflow")]
    assert "in fp16" in found[0].message


def test_healthy_fp16_and_a_dead_layer_are_not_underflow():
    assert replay(Precision(), fp16_steps(factor_at=99)) == []
    assert replay(Precision(), fp16_steps(factor_at=99, zeros_dead_layer=True)) == []


def test_bf16_from_the_run_is_judged_as_bf16():
    assert replay(Precision(), fp16_steps(factor_at=99, precision="bf16")) == []


# ---- the zoo's scenarios of these classes ------------------------------------------------------------------
SCENARIOS = ["lr_too_low", "lr_too_low_adam", "slow_sgd", "wd_collapse", "wd_collapse_sgd", "adamw_strong_wd",
             "recommender", "baskets", "fp16_model_underflow", "fp16_resmlp_underflow", "fp16_model",
             "bf16_model", "bf16", "amp_fp16"]


@pytest.mark.slow
@pytest.mark.parametrize("name", SCENARIOS)
def test_the_zoo_scenarios_of_these_classes_pass(name):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import detection
    import zoo

    logging.getLogger("gfservice").setLevel(logging.ERROR)
    sc = next(s for s in zoo.SCENARIOS if s.name == name)
    res = detection.train(sc, 0, 10, None)
    assert res.verdict == "PASS", (res.verdict, res.why, res.alarms)
