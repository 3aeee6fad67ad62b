"""The fast collection path: the large-tensor CPU kernels against the float64 reference (NaN, Inf, overflow,
fp16, strided), the in-process aggregator off the training thread (verdict at most one step late, findings
flushed), a torch.compile'd model, and no host synchronisation in ``monitor.step()`` on CUDA."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gfservice
from gfservice.service.aggregator import Aggregator
from gfservice.stats import GradStats
from gfservice.training.collect import GradCollector
from gfservice.training.ddp_hook import LocalNormHook
from gfservice.training.kernels.cpu import CHUNK, SMALL
from gfservice.training.monitoring import Monitor, MonitorOptions
from gfservice.training.transport import InProcessTransport

torch.set_num_threads(1)

BIG = SMALL + 17  # above the threshold: the dot + aminmax path


def _params(grads: dict[str, torch.Tensor]) -> list[tuple[str, torch.nn.Parameter]]:
    out = []
    for name, g in grads.items():
        p = torch.nn.Parameter(torch.zeros(g.shape, dtype=g.dtype))
        p.grad = g
        out.append((name, p))
    return out


def _reference(grads: dict[str, torch.Tensor]) -> GradStats:
    return GradStats.from_arrays({k: v.double().numpy() for k, v in grads.items()})


def test_large_tensors_match_the_float64_reference():
    gen = torch.Generator().manual_seed(0)
    strided = (torch.randn(BIG, 2, generator=gen) * 1e-3)[:, 0]  # not contiguous: the foreach path
    grads = {
        "big32": torch.randn(BIG, generator=gen) * torch.exp2(torch.randint(-30, 10, (BIG,), generator=gen)).float(),
        "big64": torch.randn(BIG, generator=gen, dtype=torch.float64) * 1e5,
        "big16": (torch.randn(BIG, generator=gen) * 100).half(),
        "neg": -torch.rand(BIG, generator=gen) - 7.0,  # the largest |g| is a negative value
        "strided": strided,
        "small": torch.randn(5, generator=gen),
    }
    got = gfservice.grad_stats(_params(grads))
    ref = _reference(grads)
    np.testing.assert_allclose(got.sum_sq, ref.sum_sq, rtol=1e-5)
    np.testing.assert_array_equal(got.max_abs, ref.max_abs)
    assert got.nonfinite.tolist() == [0] * 6


@pytest.mark.parametrize("deep", [False, True], ids=["core", "deep"])
@pytest.mark.parametrize("size", [BIG, 3 * CHUNK + 5], ids=["one chunk", "chunks"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_values_in_a_large_tensor_are_counted(bad, size, deep):
    g = torch.ones(size)
    g[123] = bad
    g[size - 1] = bad
    got = gfservice.grad_stats(_params({"ok": torch.ones(size), "bad": g}), deep=deep)
    assert got.nonfinite.tolist() == [0, 2]
    assert not np.isfinite(got.sum_sq[1]) and not np.isfinite(got.max_abs[1])
    assert got.sum_sq[0] == size and got.max_abs[0] == 1.0


def test_chunked_sums_and_maxima_match_the_float64_reference():
    gen = torch.Generator().manual_seed(3)
    grads = {"w": torch.randn(2 * CHUNK + 999, generator=gen) * 1e-4, "v": torch.randn(CHUNK + 1, generator=gen)}
    grads["w"][CHUNK + 7] = -5.0  # the largest |g| sits in the second chunk
    got = gfservice.grad_stats(_params(grads))
    ref = _reference(grads)
    np.testing.assert_allclose(got.sum_sq, ref.sum_sq, rtol=1e-5)  # float32 accumulation, as _foreach_norm
    np.testing.assert_array_equal(got.max_abs, ref.max_abs)


def test_float32_overflow_of_the_sum_is_a_huge_gradient_not_a_nonfinite_one():
    """The float32 sum of squares overflows while every value is finite: recomputed in float64, not flagged."""
    g = torch.full((BIG,), 3e18)
    got = gfservice.grad_stats(_params({"huge": g}))
    assert got.nonfinite.tolist() == [0]
    assert got.max_abs[0] == pytest.approx(3e18, rel=1e-6)
    assert got.sum_sq[0] == pytest.approx(BIG * float(g[0]) ** 2, rel=1e-6)


def test_missing_gradients_count_zero_between_large_ones():
    p = [torch.nn.Parameter(torch.zeros(BIG)) for _ in range(3)]
    p[0].grad, p[2].grad = torch.full((BIG,), 2.0), torch.full((BIG,), -3.0)
    for peak in (True, False):
        stats = GradCollector([(f"p{i}", q) for i, q in enumerate(p)]).launch(peak=peak).resolve().grads
        assert stats.count.tolist() == [BIG, 0, BIG]
        assert stats.max_abs.tolist() == [2.0, 0.0, 3.0] if peak else stats.max_abs is None
        np.testing.assert_allclose(stats.sum_sq, [4.0 * BIG, 0.0, 9.0 * BIG])


def _sums_only(grads: dict[str, torch.Tensor]) -> GradStats:
    """What a CPU core step ships: the one-read sums, made exact as the monitor does before shipping."""
    collector = GradCollector(_params(grads))
    stats = collector.launch().resolve().grads  # CPU, not deep: no maximum read
    collector.make_exact(stats)
    return stats


def test_cpu_core_steps_read_the_sums_once_and_match_the_float64_reference():
    gen = torch.Generator().manual_seed(5)
    grads = {  # small and large layers interleaved: the sums come back in the layers' order
        "small": torch.randn(7, generator=gen),
        "chunks": torch.randn(3 * (1 << 20) + 11, generator=gen) * 1e-3,
        "big64": torch.randn(BIG, generator=gen, dtype=torch.float64),
        "half": torch.randn(BIG, generator=gen).half(),
        "tail": torch.randn(BIG, generator=gen),
    }
    got = _sums_only(grads)
    ref = _reference(grads)
    np.testing.assert_allclose(got.sum_sq, ref.sum_sq, rtol=1e-5)  # float32 within a chunk, as _foreach_norm
    assert got.nonfinite.tolist() == [0] * 5
    assert got.max_abs is None  # every norm below PEAK_BOUND: no value can reach any format's bound


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_cpu_core_steps_count_nonfinite_values_and_then_read_the_maximum(bad):
    g = torch.ones(3 * (1 << 20))
    g[5] = g[-1] = bad
    got = _sums_only({"ok": torch.ones(BIG), "bad": g, "small": torch.ones(3)})
    assert got.nonfinite.tolist() == [0, 2, 0]
    assert got.max_abs is not None and got.max_abs[0] == 1.0 and not np.isfinite(got.max_abs[1])


def test_cpu_core_steps_read_the_maximum_when_a_norm_reaches_the_peak_bound():
    """max |g| <= ||g||: below PEAK_BOUND no value can reach any format's largest value; at it, it is read."""
    from gfservice.stats import PEAK_BOUND

    quiet = _sums_only({"w": torch.full((BIG,), 0.5 * PEAK_BOUND / BIG**0.5)})
    assert quiet.max_abs is None
    loud = _sums_only({"w": torch.full((BIG,), 2 * PEAK_BOUND / BIG**0.5), "v": torch.full((5,), -3.0)})
    np.testing.assert_allclose(loud.max_abs, [2 * PEAK_BOUND / BIG**0.5, 3.0], rtol=1e-6)
    huge = _sums_only({"w": torch.full((BIG,), 3e18)})  # the float32 sum overflows; every value finite
    assert huge.nonfinite.tolist() == [0] and huge.max_abs[0] == pytest.approx(3e18, rel=1e-6)
    assert huge.sum_sq[0] == pytest.approx(BIG * float(torch.tensor(3e18)) ** 2, rel=1e-6)


class _ThreadNotingAggregator(Aggregator):
    """A real aggregator that notes on which thread each message arrives."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.threads: set[int] = set()

    def submit(self, message):
        self.threads.add(threading.get_ident())
        return super().submit(message)


def _nan_at_0(g: torch.Tensor) -> torch.Tensor:
    g = g.clone()
    g.view(-1)[0] = float("nan")
    return g


def _train(mon, model, opt, steps: int, nan_at: int | None = None, check=None) -> None:
    gen = torch.Generator().manual_seed(0)
    for i in range(steps):
        loss = model(torch.randn(8, 6, generator=gen)).pow(2).mean()
        # a NaN made during backward (the monitor reads the gradients at its end, before clipping)
        hook = next(model.parameters()).register_hook(_nan_at_0) if i == nan_at else None
        loss.backward()
        if hook is not None:
            hook.remove()
        opt.step()
        mon.step(loss=loss)
        opt.zero_grad()
        if check is not None:
            check(i)


def test_detectors_run_off_the_training_thread_and_the_verdict_is_at_most_one_step_late():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    agg = _ThreadNotingAggregator(detector_settings={"nonfinite": {"stop_run": True}})
    transport = InProcessTransport(agg)
    mon = Monitor(model, opt, transport, MonitorOptions(run="bg", deep_every=0))
    seen: dict[int, tuple[bool, int]] = {}
    _train(mon, model, opt, steps=8, nan_at=4, check=lambda i: seen.__setitem__(i, (mon.should_stop, transport.late)))
    assert not any(seen[i][0] for i in range(4))
    # the NaN at step 4 stops the run by the next step at the latest, unless the detectors fell behind meanwhile
    # (monitor.step() waits for them at most InProcessTransport.handoff_wait_s: transport.late counts it)
    assert seen[5][0] or seen[5][1] > seen[4][1]
    transport.flush()
    assert mon.should_stop
    assert {f.detector for f in mon.findings} == {"nonfinite"}  # findings flush what is in flight
    mon.close()
    assert threading.get_ident() not in agg.threads and len(agg.threads) == 1
    assert transport.rejected == 0 and transport.errors == 0 and mon.errors == 0


def test_findings_right_after_the_loop_and_after_close():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = gfservice.monitor(model, opt, run="flush", service=None, deep_every=0)
    _train(mon, model, opt, steps=3, nan_at=2)
    assert {f.detector for f in mon.findings} == {"nonfinite"}
    assert mon.latest().step == 2
    mon.close()
    assert {f.detector for f in mon.findings} == {"nonfinite"}


def test_a_failing_aggregator_never_reaches_the_training_loop():
    class Broken(Aggregator):
        def submit(self, message):
            raise RuntimeError("boom")

    transport = InProcessTransport(Broken())
    model = torch.nn.Linear(6, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = Monitor(model, opt, transport, MonitorOptions(run="broken", deep_every=0))
    _train(mon, model, opt, steps=2)
    mon.close()
    assert transport.errors == 4 and mon.errors == 0  # layout, two steps, run end: each logged and counted


def test_a_compiled_model_is_monitored_from_outside_the_graph():
    """torch.compile (the aot_eager backend: dynamo and AOT autograd, no C++ build) wraps the model; the monitor
    sees the original parameter names and the compiled backward's gradients."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    model = torch.compile(eager, backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = gfservice.monitor(model, opt, run="compiled", service=None, deep_every=2)
    _train(mon, model, opt, steps=3)
    latest = mon.latest()
    mon.close()
    assert latest is not None and latest.step == 2 and mon.errors == 0
    assert list(latest.layers) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert np.all(latest.grads.sum_sq > 0) and latest.grads.deep


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU (CI has none): run on a GPU machine, or benchmarks/gpu.py")
def test_no_host_sync_cuda():
    """Under ``set_sync_debug_mode("error")`` any host synchronisation inside ``monitor.step()`` raises (the
    monitor would log and count it in ``errors``): core, deep and update statistics, loss, AMP loss scale."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 8)).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda")
    mon = gfservice.monitor(model, opt, run="nosync", service=None, deep_every=3, scaler=scaler)
    x = torch.randn(32, 64, device=dev)
    for i in range(10):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x).float().pow(2).mean()
        scaler.scale(loss).backward()
        scaler.step(opt)  # the scaler's own inf check syncs (and the weight snapshot of deep steps runs here)
        scaler.update()
        torch.cuda.synchronize()
        if i >= 3:  # after a warm-up (allocator, kernels, the Triton self-check): the monitor must not sync
            torch.cuda.set_sync_debug_mode("error")
        try:
            mon.step(loss=loss.detach())
        finally:
            torch.cuda.set_sync_debug_mode(0)
        opt.zero_grad()
    assert mon.errors == 0
    mon.close()
    latest = mon.latest()
    assert latest is not None and latest.step == 9 and latest.loss is not None


def test_weight_and_update_sums_match_the_float64_reference():
    """Deep steps that saw the optimizer step: sums of squares of the weights after it and of the update."""
    gen = torch.Generator().manual_seed(11)
    params = [torch.nn.Parameter(torch.randn(*shape, generator=gen)) for shape in ((300, 400), (7,), (BIG,))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    collector = GradCollector([(f"p{i}", p) for i, p in enumerate(params)])
    before = [p.detach().double().clone() for p in params]
    collector.snapshot_weights()
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen) * 1e-3)
    got = collector.launch(deep=True).resolve().grads
    after = [p.detach().double() for p in params]
    np.testing.assert_allclose(got.weight_sq, [float(a.square().sum()) for a in after], rtol=1e-5)
    np.testing.assert_allclose(got.update_sq, [float((a - b).square().sum())
                                               for a, b in zip(after, before, strict=True)],
                               rtol=1e-4)


_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@st.composite
def _gradient_lists(draw) -> dict[str, torch.Tensor]:
    """Tiny, middling and large gradients of every float dtype, some strided, some with NaN/Inf."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    out = {}
    for k in range(draw(st.integers(1, 12))):
        n = draw(st.sampled_from([1, 2, 80, 4095, 4096, 4097, 6400, BIG]))
        dtype = draw(st.sampled_from(_DTYPES))
        g = torch.randn(n, 2, generator=gen) * 10.0 ** draw(st.integers(-20, 1))
        g = g[:, 0] if draw(st.booleans()) else g.t().reshape(2, n).t()  # strided, or 2-d and not contiguous
        g = g.to(dtype)
        if draw(st.booleans()) and draw(st.booleans()):
            g = g.clone()
            g.view(-1)[draw(st.integers(0, n - 1))] = draw(st.sampled_from([float("nan"), float("inf")]))
        out[f"g{k}"] = g
    return out


@settings(max_examples=40, deadline=None)
@given(_gradient_lists())
def test_cpu_core_sums_match_the_float64_reference_in_any_mix(grads):
    """Whatever the mix of sizes, dtypes and layouts, each layer's sum lands in its own place: tiny ones summed
    together, large ones by BLAS, the rest by one norm; NaN/Inf counted exactly."""
    got = _sums_only(grads)
    ref = _reference(grads)
    finite = ref.nonfinite == 0
    # float32 accumulation (as in clip_grad_norm_) drifts ~sqrt(n) * 6e-8: 1.4e-5 was seen on 65,553 strided
    # float32 elements. A sum in the wrong place is off by orders of magnitude, far past this tolerance.
    np.testing.assert_allclose(got.sum_sq[finite], ref.sum_sq[finite], rtol=1e-4)
    assert got.nonfinite.tolist() == ref.nonfinite.tolist()


def test_the_ddp_hook_passes_ddps_own_signature_check():
    """``LocalNormHook.install`` registers a hook that DDP accepts (an annotation DDP does not know makes it
    refuse the hook, and install would quietly give None: no rank would be named for a NaN)."""

    class CheckingDDP:
        def register_comm_hook(self, state, hook):
            torch.nn.parallel.DistributedDataParallel._check_comm_hook(self, hook)  # type: ignore[arg-type]

        def _log_and_throw(self, err_type, message):
            raise err_type(message)

    assert LocalNormHook.install(CheckingDDP()) is not None
