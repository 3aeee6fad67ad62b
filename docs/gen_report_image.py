"""Draw docs/assets/report.png, the report picture the *Dashboards and reports* page shows: a short CPU run of a
13-layer MLP whose gradients spike 1000x at step 30 and hold a NaN at step 45 (as tests/test_report.py trains).
Run by hand after the report changes: ``python docs/gen_report_image.py`` (a few seconds).
"""

from __future__ import annotations

from pathlib import Path

import torch

import gfservice
from gfservice.observability import report

OUT = Path(__file__).resolve().parent / "assets/report.png"


def main() -> None:
    torch.manual_seed(0)
    blocks: list[torch.nn.Module] = []
    for _ in range(6):
        blocks += [torch.nn.Linear(16, 16), torch.nn.Tanh()]
    model = torch.nn.Sequential(*blocks, torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = gfservice.monitor(model, opt, run="exp-42", service=None, deep_every=10)
    x, y = torch.randn(64, 16), torch.randn(64, 1)
    for step in range(60):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if step == 30:
            for p in model.parameters():
                p.grad.mul_(1e3)
        if step == 45:
            model[0].weight.grad[0, 0] = float("nan")
        if step not in (30, 45):
            opt.step()
        mon.step(loss=loss)
        opt.zero_grad()
    mon.close()
    OUT.parent.mkdir(exist_ok=True)
    aggregator = mon.transport.aggregator
    report.render(aggregator.history("exp-42"), aggregator.findings("exp-42"), OUT, dpi=80)
    print(OUT)


if __name__ == "__main__":
    main()
