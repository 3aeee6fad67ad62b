"""``gfservice report``: pictures of a real (short, CPU) training run, and the history file they can come from."""

from __future__ import annotations

import argparse
import base64
import re
import sys

import numpy as np
import pytest
import torch

import gfservice
from gfservice.api import StepStats
from gfservice.cli import report as report_command
from gfservice.observability import history as hist
from gfservice.observability import report
from tests.models import at_end_of_backward

RUN = "report-test"
SPIKE, NAN = 30, 45


@pytest.fixture(scope="module")
def trained() -> tuple[list[StepStats], list[gfservice.Finding]]:
    """60 steps of a 13-layer MLP; the gradients spike 1000x at step 30 and hold a NaN at step 45 (both steps skip
    the optimizer, as a GradScaler would, so the weights stay sound)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        blocks: list[torch.nn.Module] = []
        for _ in range(6):
            blocks += [torch.nn.Linear(16, 16), torch.nn.Tanh()]
        model = torch.nn.Sequential(*blocks, torch.nn.Linear(16, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        mon = gfservice.monitor(model, opt, run=RUN, service=None, deep_every=10)
        x, y = torch.randn(64, 16), torch.randn(64, 1)
        for step in range(60):
            if step == SPIKE:  # faults strike in backward, where the monitor reads the gradients
                at_end_of_backward(model, lambda: [p.grad.mul_(1e3) for p in model.parameters()])
            if step == NAN:
                at_end_of_backward(model, lambda: model[0].weight.grad.__setitem__((0, 0), float("nan")))
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            if step not in (SPIKE, NAN):
                opt.step()
            mon.step(loss=loss)
            opt.zero_grad()
        mon.close()
    finally:
        torch.set_num_threads(threads)
    agg = mon.transport.aggregator
    return agg.history(RUN), agg.findings(RUN)


def test_the_run_has_the_injected_findings(trained):
    steps, findings = trained
    assert [s.step for s in steps] == list(range(60))
    assert {(f.detector, f.first_step) for f in findings} >= {("exploding", SPIKE), ("nonfinite", NAN)}


def test_png_is_a_real_picture(trained, tmp_path):
    steps, findings = trained
    out = report.render(steps, findings, tmp_path / "report.png", dpi=80)
    import matplotlib.image

    img = matplotlib.image.imread(out)
    assert img.ndim == 3 and img.shape[0] > 600 and img.shape[1] > 800
    rgb = (img[..., :3] * 255).round().astype(np.uint8).reshape(-1, 3)
    colours = np.unique(rgb, axis=0)
    assert len(colours) > 200, f"only {len(colours)} distinct colours: the picture is (nearly) blank"
    assert float(img[..., :3].std()) > 0.1
    # The NaN cell of the heatmap and the NaN markers are drawn in red (#e31a1c).
    red = np.all(np.abs(rgb.astype(int) - [0xE3, 0x1A, 0x1C]) <= 8, axis=1)
    assert red.sum() > 50


def test_html_is_self_contained(trained, tmp_path):
    steps, findings = trained
    page = report.render(steps, findings, tmp_path / "report.html", dpi=60).read_text(encoding="utf-8")
    m = re.search(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert m, "no embedded PNG"
    assert base64.b64decode(m.group(1)).startswith(b"\x89PNG\r\n\x1a\n")
    assert not re.search(r'(src|href)="(?!data:)', page), "the page must not load anything"
    rows = re.findall(r"<tr><td>.*?</tr>", page)
    assert len(rows) == len(findings)
    nan_row = next(r for r in rows if ">nonfinite<" in r)
    assert "critical" in nan_row and f"<td>{NAN}</td>" in nan_row and "0.weight" in nan_row
    assert any(">exploding<" in r and f"<td>{SPIKE}</td>" in r for r in rows)
    assert f"Gradient flow of run {RUN}" in page


def test_history_file_round_trip(trained, tmp_path):
    steps, findings = trained
    path = hist.save(tmp_path / "run.gfhist", steps, findings)  # any name: written as given
    assert path.exists() and path.name == "run.gfhist"
    back = hist.load(path)
    assert back.run == RUN and back.findings == findings and len(back.steps) == len(steps)
    for a, b in zip(steps, back.steps, strict=True):
        assert (a.run, a.step, a.time, a.loss, a.lr, a.loss_scale, a.skipped, a.missing_ranks) == (
            b.run, b.step, b.time, b.loss, b.lr, b.loss_scale, b.skipped, b.missing_ranks)
        assert a.layers == b.layers
        for name in hist.GRAD_ARRAYS:
            x, y = getattr(a.grads, name), getattr(b.grads, name)
            assert (x is None) == (y is None), name
            if x is not None:
                assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y, equal_nan=True), name
        for name in hist.STEP_ARRAYS:
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None) == (y is None), name
            if x is not None:
                assert x.dtype == y.dtype and np.array_equal(x, y, equal_nan=True), name
    assert any(s.grads.deep for s in back.steps) and any(np.isnan(s.grads.sum_sq).any() for s in back.steps)
    assert report.png_bytes(back.steps, back.findings, dpi=40) == report.png_bytes(steps, findings, dpi=40)


def test_command_line_from_a_history_file(trained, tmp_path, capsys):
    steps, findings = trained
    saved = hist.save(tmp_path / "run.npz", steps, findings)
    parser = argparse.ArgumentParser(prog="gfservice")
    report_command.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", "--history", str(saved), "--out", str(tmp_path / "r.png"),
                              "--steps", f"0,{NAN},59", "--dpi", "40"])
    assert args.func(args) == 0
    assert (tmp_path / "r.png").read_bytes().startswith(b"\x89PNG")
    assert "wrote" in capsys.readouterr().out
    bad = parser.parse_args(["report", "other-run", "--history", str(saved), "--out", str(tmp_path / "x.png")])
    assert bad.func(bad) == 1
    assert f"gfservice report: {saved} holds run '{RUN}', not 'other-run'" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_clear_errors(trained, tmp_path, monkeypatch):
    steps, findings = trained
    with pytest.raises(report.ReportError, match=r"name it \.png or \.html"):
        report.render(steps, findings, tmp_path / "report.pdf")
    with pytest.raises(report.ReportError, match="no steps"):
        report.render([], [], tmp_path / "report.png")
    with pytest.raises(report.ReportError, match=r"steps \[999\] are not in the history .* from 0 to 59"):
        report.render(steps, findings, tmp_path / "report.png", steps=[0, 999])
    with pytest.raises(ValueError, match=r"history file .*absent\.npz does not exist"):
        hist.load(tmp_path / "absent.npz")
    (tmp_path / "junk.npz").write_bytes(b"not an archive")
    with pytest.raises(ValueError, match="not a gfservice history file"):
        hist.load(tmp_path / "junk.npz")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the optional extra were not installed
    with pytest.raises(report.ReportError, match=re.escape("pip install 'gfservice[report]'")):
        report.render(steps, findings, tmp_path / "report.png")
