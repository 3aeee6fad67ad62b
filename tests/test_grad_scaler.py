"""A GradScaler's scale and skipped steps reach the statistics; an overflow it skips is ``info``, not a page."""

from __future__ import annotations

import torch

import gfservice


def _inf_at_0(g: torch.Tensor) -> torch.Tensor:
    g = g.clone()
    g.view(-1)[0] = float("inf")
    return g


def test_grad_scaler_scale_and_skipped_steps_are_reported():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    mon = gfservice.monitor(model, opt, run="amp", scaler=scaler, service=None)
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    for step in range(6):
        loss = torch.nn.functional.mse_loss(model(x), y)
        # an overflow in backward at step 3, as a too-high loss scale produces
        hook = model[2].weight.register_hook(_inf_at_0) if step == 3 else None
        scaler.scale(loss).backward()
        if hook is not None:
            hook.remove()
        scaler.step(opt)
        scaler.update()
        mon.step(loss=loss)
        opt.zero_grad()
    agg = mon.transport.aggregator
    history = {s.step: s for s in agg.history("amp")}
    mon.close()
    assert history[2].loss_scale == 1024.0 and not history[2].skipped
    assert history[3].skipped and history[3].loss_scale == 512.0  # the scaler backed off and skipped the step
    assert not history[4].skipped
    (f,) = [f for f in mon.findings if f.detector == "nonfinite"]
    assert f.first_step == 3 and f.severity == gfservice.Severity.info and f.layers == ["2.weight"]
