"""Gradient statistics: the torch collection path against the float64 numpy reference, deep statistics and
underflow fractions, merges of shards, layer naming and selection."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from models import mlp

import gfservice
from gfservice.stats import FORMAT_LIMITS, GradStats, merge_shards
from gfservice.training.parameters import clean_name

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _params_with_grads(grads: dict[str, torch.Tensor]) -> list[tuple[str, torch.nn.Parameter]]:
    """Parameters of the gradients' dtypes whose ``.grad`` is set by hand."""
    out = []
    for name, g in grads.items():
        p = torch.nn.Parameter(torch.zeros(g.shape, dtype=g.dtype))
        p.grad = g
        out.append((name, p))
    return out


def _sample_grads(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Gradients over many orders of magnitude, with exact zeros and values near fp16's underflow."""
    gen = torch.Generator().manual_seed(seed)
    wide = torch.randn(257, generator=gen) * torch.exp2(torch.randint(-40, 12, (257,), generator=gen).float())
    near_fp16_limits = torch.tensor([6.0e-8, 1.2e-7, 3.0e-6, 6.0e-5, 6.2e-5, -1.0e-5, 2.0e-8, 0.0, -0.0])
    grads = {
        "enc.weight": torch.randn(16, 12, generator=gen) * 1e-3,
        "enc.bias": torch.zeros(12),
        "mid.weight": torch.cat([wide, near_fp16_limits]),
        "out.weight": torch.randn(3, 5, generator=gen) * 300.0,  # squares overflow fp16, not the fp32 sum
    }
    return {k: v.to(dtype) for k, v in grads.items()}


def _reference(grads: dict[str, torch.Tensor], deep: bool = True) -> GradStats:
    """GradStats.from_arrays on the exact values (widened to float64 where numpy has no such dtype)."""
    return GradStats.from_arrays({k: v.double().numpy() for k, v in grads.items()}, deep=deep)


def _assert_same(got: GradStats, ref: GradStats, rtol: float = 1e-5) -> None:
    assert got.layers == ref.layers
    np.testing.assert_array_equal(got.count, ref.count)
    np.testing.assert_array_equal(got.nonfinite, ref.nonfinite)
    np.testing.assert_allclose(got.max_abs, ref.max_abs, rtol=1e-7)
    np.testing.assert_allclose(got.sum_sq, ref.sum_sq, rtol=rtol)
    if ref.deep:
        assert got.deep
        np.testing.assert_allclose(got.sum_abs, ref.sum_abs, rtol=rtol)
        np.testing.assert_array_equal(got.zeros, ref.zeros)
        np.testing.assert_array_equal(got.exp_hist, ref.exp_hist)
        np.testing.assert_array_equal(got.dead_units, ref.dead_units)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grad_stats_match_float64_reference(dtype):
    grads = _sample_grads(dtype)
    got = gfservice.grad_stats(_params_with_grads(grads), deep=True)
    ref = _reference(grads)
    _assert_same(got, ref)
    # derived quantities follow from the shipped sums
    np.testing.assert_allclose(got.norm, [np.linalg.norm(v.double().numpy()) for v in grads.values()], rtol=1e-5)
    np.testing.assert_allclose(got.rms, np.sqrt(ref.sum_sq / ref.count), rtol=1e-5)
    np.testing.assert_allclose(got.mean_abs, ref.sum_abs / ref.count, rtol=1e-5)
    assert got.zero_fraction[1] == 1.0  # enc.bias is all zeros
    assert got.global_norm == pytest.approx(np.sqrt(ref.sum_sq.sum()), rel=1e-5)


def test_zeros_and_dead_units_read_only_where_the_histogram_allows_them():
    """On CPU zeros and dead rows are counted only in gradients whose exponent bin 0 is not empty, and dead rows
    only where a row's worth of zeros exists: every case against the reference."""
    gen = torch.Generator().manual_seed(7)
    dead = torch.randn(300, 400, generator=gen)
    dead[[3, 7]] = 0.0  # two dead output units
    few = torch.randn(300, 400, generator=gen)
    few[5, :399] = 0.0  # 399 zeros: not a dead row
    subnormal = torch.randn(300, 400, generator=gen)
    subnormal[0, :5] = 1e-40  # bin 0 without a single zero
    grads = {"dead": dead, "few": few, "subnormal": subnormal, "dense": torch.randn(300, 400, generator=gen),
             "bias": torch.zeros(400)}
    got = gfservice.grad_stats(_params_with_grads(grads), deep=True)
    _assert_same(got, _reference(grads))
    assert got.dead_units.tolist() == [2, 0, 0, 0, 400] and got.zeros.tolist() == [800, 399, 0, 0, 400]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_core_statistics_without_deep(dtype):
    grads = _sample_grads(dtype, seed=1)
    got = gfservice.grad_stats(_params_with_grads(grads))
    assert not got.deep and got.sum_abs is None and got.exp_hist is None and got.mean_abs is None
    _assert_same(got, _reference(grads, deep=False))


def test_values_near_fp16_underflow_are_not_lost():
    """fp16 gradients at the bottom of fp16's range: their squares underflow fp16, the statistics must not."""
    tiny = torch.tensor([6e-8] * 100 + [1.2e-7] * 100, dtype=torch.float16)  # fp16 subnormals
    got = gfservice.grad_stats(_params_with_grads({"t": tiny}), deep=True)
    ref = _reference({"t": tiny})
    _assert_same(got, ref)
    assert got.sum_sq[0] > 0 and got.sum_abs[0] > 0 and got.zeros[0] == 0
    assert got.underflow_fraction("fp16").tolist() == [1.0]  # all below fp16's smallest normal
    # 6e-8 rounds to fp16's smallest subnormal 2**-24 (not below it); 1.2e-7 is 2**-23
    assert got.underflow_fraction("fp16", subnormal=True).tolist() == [0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_nonfinite_counts_are_exact(dtype):
    g = torch.ones(10, 10, dtype=dtype)
    g[0, 0], g[3, 4], g[9, 9] = float("nan"), float("inf"), -float("inf")
    grads = {"ok": torch.full((4,), 0.5, dtype=dtype), "bad": g}
    got = gfservice.grad_stats(_params_with_grads(grads), deep=True)
    assert got.nonfinite.tolist() == [0, 3]
    assert np.isfinite(got.sum_sq[0]) and not np.isfinite(got.sum_sq[1])
    assert got.exp_hist[1, 255] == 3 and got.exp_hist[1].sum() == 100


# ---- deep statistics and underflow ------------------------------------------------------------------
def _log_uniform(n: int, lo: int, hi: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mags = np.exp2(rng.uniform(lo, hi, n))
    return (mags * rng.choice([-1.0, 1.0], n)).astype(np.float32)


FORMATS = [(f, s) for f in sorted(FORMAT_LIMITS) for s in (False, True)]


@pytest.mark.parametrize(("fmt", "subnormal"), FORMATS)
def test_underflow_fractions_match_thresholds(fmt, subnormal):
    """The fraction of non-zero |g| below the format's smallest normal (or subnormal) value. fp32's exponent
    histogram cannot tell fp32 subnormals (below 2**-126) apart, so for bf16's subnormal limit every one of them
    counts: an upper bound."""
    vals = np.concatenate([_log_uniform(5000, -149, 8), np.zeros(37, np.float32)])
    got = gfservice.grad_stats(_params_with_grads({"g": torch.from_numpy(vals)}), deep=True)
    a = np.abs(vals.astype(np.float64))
    nz = a[a > 0]
    limit = max(FORMAT_LIMITS[fmt][1 if subnormal else 0], -126)
    assert got.zeros.tolist() == [37]
    frac = got.underflow_fraction(fmt, subnormal=subnormal)
    np.testing.assert_allclose(frac, [np.mean(nz < 2.0**limit)], rtol=1e-12)
    assert 0 < frac[0] < 1


@pytest.mark.parametrize(
    ("fmt", "dtype"),
    [("fp16", torch.float16), ("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)],
)
def test_underflow_fraction_predicts_a_real_cast(fmt, dtype):
    """Cast the gradients to the format for real: the values that become zero, or zero or subnormal, are the
    ones the histogram reports. Left out: values where rounding decides, within a factor of two below the
    smallest subnormal (they may round up to it) and just below the smallest normal (they may round up to it)."""
    normal, subnormal = FORMAT_LIMITS[fmt]
    vals = _log_uniform(20000, subnormal - 8, normal + 6, seed=3)
    e = np.log2(np.abs(vals))
    keep = ~((subnormal - 1 <= e) & (e < subnormal)) & ~((normal - 0.25 < e) & (e < normal))
    vals = vals[keep]
    got = gfservice.grad_stats(_params_with_grads({"g": torch.from_numpy(vals)}), deep=True)
    cast = torch.from_numpy(vals).to(dtype).float().abs().numpy()
    flushed = np.mean(cast == 0)
    subnormal_or_flushed = np.mean(cast < 2.0**normal)
    assert got.underflow_fraction(fmt, subnormal=True)[0] == pytest.approx(flushed, abs=1e-12)
    assert got.underflow_fraction(fmt)[0] == pytest.approx(subnormal_or_flushed, abs=1e-12)
    assert 0.05 < flushed < subnormal_or_flushed < 0.95


def test_bf16_underflow_below_fp32_normal_range():
    """bf16 shares fp32's exponent range: what becomes subnormal or zero in bf16 is what is below 2**-126."""
    vals = _log_uniform(20000, -140, -110, seed=4)
    e = np.log2(np.abs(vals))
    vals = vals[~((e > -126.25) & (e < -126))]  # these round up to 2**-126
    got = gfservice.grad_stats(_params_with_grads({"g": torch.from_numpy(vals)}), deep=True)
    cast = torch.from_numpy(vals).to(torch.bfloat16).float().abs().numpy()
    assert got.underflow_fraction("bf16")[0] == pytest.approx(np.mean(cast < 2.0**-126), abs=1e-12)
    assert 0.2 < got.underflow_fraction("bf16")[0] < 0.8


def test_underflow_fraction_needs_deep_stats_and_a_known_format():
    s = GradStats.from_arrays({"g": np.array([1.0, 1e-9])})
    assert s.underflow_fraction("fp16") is None
    deep = GradStats.from_arrays({"g": np.array([1.0, 1e-9])}, deep=True)
    with pytest.raises(ValueError, match="unknown format 'fp4'"):
        deep.underflow_fraction("fp4")


def test_empty_and_all_zero_layers_have_zero_fractions():
    s = GradStats.from_arrays({"empty": np.zeros(0), "zeros": np.zeros(8)}, deep=True)
    assert s.rms.tolist() == [0.0, 0.0]
    assert s.zero_fraction.tolist() == [0.0, 1.0]
    assert s.underflow_fraction("bf16").tolist() == [0.0, 0.0]


# ---- merges ---------------------------------------------------------------------------------------------
def _shards(a: np.ndarray, n: int) -> list[np.ndarray]:
    """FSDP-like flat shards: uneven, the last possibly empty."""
    return np.array_split(a.ravel(), n)


@pytest.mark.parametrize("world", [2, 3, 8])
def test_sharded_merge_equals_unsharded(world):
    rng = np.random.default_rng(world)
    sharded_w = (rng.normal(size=(7, 5)) * 1e-3).astype(np.float32)
    sharded_w[0, :3] = 0.0
    sharded_w[6, 4] = np.nan
    replicated_b = rng.normal(size=5).astype(np.float32)
    whole = GradStats.from_arrays({"w": sharded_w, "b": replicated_b}, deep=True)
    parts = [
        GradStats.from_arrays({"w": shard, "b": replicated_b}, deep=True)
        for shard in _shards(sharded_w, world)
    ]
    if world == 8:
        assert parts[-1].count[0] < parts[0].count[0]  # uneven shards
    merged = merge_shards(parts, sharded=np.array([True, False]))
    np.testing.assert_array_equal(merged.count, whole.count)  # the replicated layer counted once
    np.testing.assert_array_equal(merged.nonfinite, whole.nonfinite)
    np.testing.assert_array_equal(merged.max_abs, whole.max_abs)
    np.testing.assert_array_equal(merged.zeros, whole.zeros)
    np.testing.assert_array_equal(merged.exp_hist, whole.exp_hist)
    # the NaN makes w's sums NaN in both; b's must agree
    assert np.isnan(merged.sum_sq[0]) and np.isnan(whole.sum_sq[0])
    np.testing.assert_allclose(merged.sum_sq[1], whole.sum_sq[1], rtol=1e-12)
    np.testing.assert_allclose(merged.sum_abs[1], whole.sum_abs[1], rtol=1e-12)


def test_sharded_merge_of_torch_shards_equals_whole_gradient():
    """Each "rank" computes grad_stats of its shard with torch; the merge equals the whole gradient's stats."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 33, generator=gen) * torch.exp2(torch.randint(-20, 4, (64, 1), generator=gen).float())
    b = torch.randn(33, generator=gen)
    whole = gfservice.grad_stats(_params_with_grads({"w": w, "b": b}), deep=True)
    parts = [gfservice.grad_stats(_params_with_grads({"w": shard, "b": b}), deep=True)
             for shard in torch.tensor_split(w, 4, dim=0)]
    merged = merge_shards(parts, sharded=np.array([True, False]))
    _assert_same(merged, whole, rtol=1e-5)
    assert merged.norm[0] == pytest.approx(float(w.double().norm()), rel=1e-5)


def test_replicated_layers_are_counted_once():
    a = GradStats.from_arrays({"w": np.array([3.0, 4.0])}, deep=True)
    merged = merge_shards([a, a, a], sharded=np.array([False]))
    assert merged.count.tolist() == [2] and merged.sum_sq.tolist() == [25.0] and merged.exp_hist.sum() == 2


def test_merge_drops_deep_fields_unless_every_part_has_them_and_needs_one_layout():
    deep = GradStats.from_arrays({"w": np.ones(4)}, deep=True)
    core = GradStats.from_arrays({"w": np.ones(4)})
    merged = merge_shards([deep, core], sharded=np.array([True]))
    assert merged.count.tolist() == [8] and not merged.deep
    with pytest.raises(ValueError, match="one layout"):
        merge_shards([deep, GradStats.from_arrays({"v": np.ones(4)}, deep=True)], sharded=np.array([True]))
    with pytest.raises(ValueError, match="nothing to merge"):
        merge_shards([], sharded=np.array([]))


# ---- naming and selection ------------------------------------------------------------------------------
def test_ddp_wrapped_model_is_named_without_the_prefix(tmp_path):
    """A real DistributedDataParallel wrapper (gloo, one process) reports the same names as the bare model.

    In a child process that ends with ``os._exit``: gloo's ``destroy_process_group`` can deadlock in its
    destructor (a PyTorch bug, with or without gfservice; docs/explanation/troubleshooting.md)."""
    code = f"""
import json, os, torch, torch.distributed as dist, gfservice
model = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
bare = [n for n, _ in model.named_parameters()]
dist.init_process_group("gloo", init_method="file://{tmp_path / 'pg'}", rank=0, world_size=1)
ddp = torch.nn.parallel.DistributedDataParallel(model)
ddp(torch.randn(4, 64)).sum().backward()
stats = gfservice.grad_stats(ddp.named_parameters())
print(json.dumps({{"wrapped": next(n for n, _ in ddp.named_parameters()), "bare": bare,
                  "layers": list(stats.layers), "counts": [int(c) for c in stats.count]}}), flush=True)
os._exit(0)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["wrapped"].startswith("module.")
    assert got["layers"] == got["bare"]
    assert all(c > 0 for c in got["counts"])


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("module.0.weight", "0.weight"),
        ("_orig_mod.encoder.layers.0.bias", "encoder.layers.0.bias"),
        ("module._orig_mod.head.weight", "head.weight"),
        ("_fsdp_wrapped_module.blocks.1._checkpoint_wrapped_module.mlp.weight", "blocks.1.mlp.weight"),
        ("encoder.module_list.0.bias", "encoder.module_list.0.bias"),
        ("submodule.weight", "submodule.weight"),
    ],
)
def test_clean_name(raw, clean):
    assert clean_name(raw) == clean


def test_include_and_exclude_patterns():
    model = mlp(4, width=8)
    model(torch.randn(2, 64)).sum().backward()
    every = gfservice.grad_stats(model.named_parameters())
    assert every.layers == tuple(n for n, _ in model.named_parameters())
    weights = gfservice.grad_stats(model.named_parameters(), exclude=["*.bias"])
    assert weights.layers == ("0.weight", "2.weight", "4.weight", "6.weight")
    some = gfservice.grad_stats(model.named_parameters(), include=["0.*", "6.*"], exclude=["6.bias"])
    assert some.layers == ("0.weight", "0.bias", "6.weight")
    np.testing.assert_array_equal(some.sum_sq, every.sum_sq[[0, 1, 6]])
    with pytest.raises(ValueError, match="no trainable parameters selected"):
        gfservice.grad_stats(model.named_parameters(), include=["nothing.*"])


def test_frozen_parameters_are_not_layers():
    model = mlp(3, width=8)
    model[0].weight.requires_grad_(False)
    model(torch.randn(2, 64)).sum().backward()
    assert "0.weight" not in gfservice.grad_stats(model.named_parameters()).layers


def test_parameter_without_gradient_reports_count_zero():
    model = torch.nn.ModuleDict({"used": torch.nn.Linear(4, 2), "unused": torch.nn.Linear(4, 2)})
    model["used"](torch.randn(3, 4)).sum().backward()
    stats = gfservice.grad_stats(model.named_parameters(), deep=True)
    assert stats.layers == ("used.weight", "used.bias", "unused.weight", "unused.bias")
    assert stats.count.tolist() == [8, 2, 0, 0]
    assert stats.sum_sq[2:].tolist() == [0.0, 0.0] and stats.max_abs[2:].tolist() == [0.0, 0.0]
    assert stats.zeros[2:].tolist() == [0, 0] and stats.exp_hist[2:].sum() == 0
    assert stats.rms[2:].tolist() == [0.0, 0.0] and (stats.rms[:2] > 0).all()


def test_float64_model_through_the_monitor():
    """A float64 model is monitored like any other, weight norms of deep steps included."""
    model = mlp(3, width=8).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = gfservice.monitor(model, opt, run="f64", service=None, deep_every=2)
    x, y = torch.randn(6, 64, dtype=torch.float64), torch.randint(0, 10, (6,))
    for _ in range(4):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        mon.step()
        opt.zero_grad()
    mon.close()
    assert mon.errors == 0
    assert [s.step for s in mon.transport.aggregator.history("f64")] == [0, 1, 2, 3]
