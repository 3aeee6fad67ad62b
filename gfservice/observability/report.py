"""Pictures of a run's gradient flow, as a PNG or a self-contained HTML page.

:func:`render` draws, from a run's history (its merged :class:`~gfservice.api.StepStats`) and findings:

1. the gradient flow: a heatmap of layers (input at the bottom) by step, colour = log10 RMS gradient, with
   exactly-zero gradients in grey and NaN/Inf in red;
2. the per-layer profile at a few steps (a better ``plot_grad_flow``): log scale, mean |g| on deep steps (RMS
   otherwise) and max |g|, with the band between them shaded;
3. the global gradient norm over steps (and the loss, when known), findings marked where they were raised.

The HTML page embeds the PNG (base64) and lists the findings in a table. matplotlib is an optional extra
(``pip install 'gfservice[report]'``), imported only when a picture is drawn.

Command line (:mod:`gfservice.cli.report`): ``gfservice report RUN --out report.png`` (the service's history of
RUN) or ``gfservice report --history run.npz --out report.html`` (a file :mod:`gfservice.observability.history`
wrote). This module only draws: it reads no service.

>>> from gfservice.testing import make_step
>>> steps = [make_step(step=i, sum_sq=[1.0, 0.5 * 0.9**i]) for i in range(5)]
>>> layer_matrix(steps)[1].round(2).tolist()
[[-1.5, -1.5, -1.5, -1.5, -1.5], [-1.65, -1.67, -1.7, -1.72, -1.74]]
>>> profile_steps(steps, [])
[0, 2, 4]
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gfservice.api import Finding, Severity, StepStats, describe_layers

SEVERITY_COLORS: dict[Severity, str] = {Severity.critical: "#d62728", Severity.warning: "#ff7f0e",
                                        Severity.info: "#1f77b4"}
_CRITICAL, _WARNING, _INFO = (SEVERITY_COLORS[s] for s in (Severity.critical, Severity.warning, Severity.info))
INSTALL_HINT = "pip install 'gfservice[report]'"


class ReportError(RuntimeError):
    """The report cannot be drawn (no steps, unknown step, unknown format, matplotlib missing)."""


def _matplotlib() -> tuple[Any, Any]:
    """``(Figure, colors)`` from matplotlib, without touching pyplot's global state."""
    try:
        from matplotlib import colors
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ReportError(f"gfservice report draws with matplotlib, which is not installed: {INSTALL_HINT}") from exc
    return Figure, colors


def _viridis() -> Any:
    """viridis, with exactly-zero gradients (masked cells) in grey."""
    from matplotlib import colormaps

    return colormaps["viridis"].with_extremes(bad="#d9d9d9")


# ---- data ----------------------------------------------------------------------------------------------------
def _aligned(history: Sequence[StepStats]) -> list[StepStats]:
    """Steps sharing the last step's layers (a run keeps one layout; a restarted run may not), oldest first."""
    if not history:
        raise ReportError("the history has no steps: nothing to draw")
    layers = history[-1].layers
    return sorted((s for s in history if s.layers == layers), key=lambda s: s.step)


def layer_matrix(history: Sequence[StepStats]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(steps, log10 RMS (layers x steps), non-finite mask)``; NaN where the RMS is zero or non-finite."""
    steps = _aligned(history)
    rms = np.stack([s.grads.rms for s in steps], axis=1)
    bad = np.stack([s.grads.nonfinite > 0 for s in steps], axis=1) | ~np.isfinite(rms)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where((rms > 0) & ~bad, np.log10(np.where(rms > 0, rms, 1.0)), np.nan)
    return np.array([s.step for s in steps]), logs, bad


def profile_steps(history: Sequence[StepStats], findings: Sequence[Finding], count: int = 3) -> list[int]:
    """Default steps of the per-layer profile: first, middle and last, plus where the worst finding began."""
    steps = [s.step for s in _aligned(history)]
    picks = [steps[round(i * (len(steps) - 1) / max(count - 1, 1))] for i in range(count)] if count > 1 else steps[-1:]
    if findings:
        worst = max(findings, key=lambda f: (f.severity.rank, -(f.first_step or f.step)))
        start = worst.first_step if worst.first_step is not None else worst.step
        if start in steps:
            picks.append(start)
    return sorted(set(picks))


# ---- drawing -------------------------------------------------------------------------------------------------
def _layer_ticks(ax: Any, layers: Sequence[str], axis: str) -> None:
    n = len(layers)
    idx = list(range(n)) if n <= 40 else sorted(set(np.linspace(0, n - 1, 20).round().astype(int).tolist()))
    labels = [layers[i] if len(layers[i]) <= 32 else "..." + layers[i][-29:] for i in idx]
    if axis == "y":
        ax.set_yticks(idx, labels, fontsize=7 if n > 12 else 8)
    else:
        ax.set_xticks(idx, labels, rotation=90, fontsize=7 if n > 12 else 8)


def _finding_start(f: Finding) -> int:
    return f.first_step if f.first_step is not None else f.step


def _draw_heatmap(fig: Any, ax: Any, colors: Any, history: Sequence[StepStats], findings: Sequence[Finding]) -> None:
    steps, logs, bad = layer_matrix(history)
    layers = _aligned(history)[-1].layers
    y = np.arange(len(layers))
    cmap = _viridis()
    finite = logs[np.isfinite(logs)]
    if finite.size > 200:  # a few outliers must not wash out the picture: clip to the 0.5-99.5 percentiles
        vmin, vmax = (float(v) for v in np.percentile(finite, [0.5, 99.5]))
    else:
        vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (-1.0, 1.0)
    if vmin == vmax:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    extend = {(False, False): "neither", (True, False): "min", (False, True): "max", (True, True): "both"}[
        (bool(finite.size and finite.min() < vmin), bool(finite.size and finite.max() > vmax))]
    mesh = ax.pcolormesh(steps, y, np.ma.masked_invalid(logs), cmap=cmap, vmin=vmin, vmax=vmax,
                         shading="nearest", rasterized=True)
    if bad.any():
        red = colors.ListedColormap(["#e31a1c"])
        ax.pcolormesh(steps, y, np.ma.masked_where(~bad, np.ones_like(logs)), cmap=red, vmin=0, vmax=1,
                      shading="nearest", rasterized=True)
    cbar = fig.colorbar(mesh, cax=ax.inset_axes((1.01, 0.0, 0.015, 1.0)), extend=extend)
    cbar.set_label("log10 RMS gradient")
    _layer_ticks(ax, layers, "y")
    ax.set_ylabel("layer (input at the bottom)")
    ax.set_xlabel("step")
    notes = [n for n, seen in (("grey: exactly zero", (np.isnan(logs) & ~bad).any()), ("red: NaN/Inf", bad.any()))
             if seen]
    ax.set_title("Gradient flow: log10 RMS gradient of each layer" + (f"   ({', '.join(notes)})" if notes else ""),
                 fontsize=10)
    for f in findings:
        start = _finding_start(f)
        if steps[0] <= start <= steps[-1]:
            ax.plot([start], [len(layers) - 0.5], marker="v", markersize=9, clip_on=False,
                    color=SEVERITY_COLORS[f.severity], markeredgecolor="black", zorder=5)


def _draw_profile(ax: Any, history: Sequence[StepStats], chosen: Sequence[int]) -> None:
    by_step = {s.step: s for s in _aligned(history)}
    layers = _aligned(history)[-1].layers
    x = np.arange(len(layers))
    cycle = ["#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
    values = []
    for s in by_step.values():
        for arr in (s.grads.rms, s.grads.max_abs):
            if arr is not None:
                values.append(arr[np.isfinite(arr) & (arr > 0)])
    pos = np.concatenate(values) if values else np.zeros(0)
    floor = float(pos.min()) / 10 if pos.size else 1e-12
    bad_seen = zero_seen = False
    for i, step in enumerate(chosen):
        s = by_step[step]
        color = cycle[i % len(cycle)]
        g = s.grads
        deep = g.mean_abs is not None
        mean = g.mean_abs if g.mean_abs is not None else g.rms
        peak = g.max_abs if g.max_abs is not None else np.full(len(mean), np.nan)  # not read on CPU core steps
        ok = np.isfinite(mean) & (g.nonfinite == 0)
        m = np.where(ok & (mean > 0), mean, np.nan)
        p = np.where(ok & (peak > 0), peak, np.nan)
        what = "mean |g|" if deep else "RMS"
        ax.plot(x, m, "-o" if len(layers) <= 60 else "-", color=color, markersize=3, linewidth=1.4,
                label=f"step {step}: {what}")
        ax.plot(x, p, "--", color=color, linewidth=1.0, alpha=0.9, label=f"step {step}: max |g|")
        ax.fill_between(x, m, p, color=color, alpha=0.12, linewidth=0)
        zero = ok & (peak == 0) if g.max_abs is not None else ok & (g.sum_sq == 0)
        if zero.any():
            zero_seen = True
            ax.plot(x[zero], np.full(zero.sum(), floor), "v", color=color, markersize=7)
        if (~ok).any():
            bad_seen = True
            ax.plot(x[~ok], np.full((~ok).sum(), floor), "X", color="#e31a1c", markersize=8)
    ax.set_yscale("log")
    ax.set_xlim(-0.5, len(layers) - 0.5)
    _layer_ticks(ax, layers, "x")
    ax.set_ylabel("|gradient|")
    notes = [n for n, seen in (("v: all-zero layer", zero_seen), ("red X: NaN/Inf layer", bad_seen)) if seen]
    ax.set_title("Per-layer gradient profile (input on the left)" + (f"   ({', '.join(notes)})" if notes else ""),
                 fontsize=10)
    ax.grid(True, which="major", axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _draw_norm(ax: Any, history: Sequence[StepStats], findings: Sequence[Finding]) -> None:
    steps = sorted(history, key=lambda s: s.step)
    x = np.array([s.step for s in steps])
    norm = np.array([s.global_norm for s in steps])
    ok = np.isfinite(norm) & (norm > 0)
    ax.plot(x[ok], norm[ok], color="#1f77b4", linewidth=1.3, label="global gradient norm")
    if (~np.isfinite(norm)).any():
        top = float(norm[ok].max()) * 3 if ok.any() else 1.0
        bad = ~np.isfinite(norm)
        ax.plot(x[bad], np.full(bad.sum(), top), "X", color="#e31a1c", markersize=8, label="NaN/Inf norm")
    skipped = np.array([s.skipped for s in steps])
    if skipped.any() and ok.any():
        ax.plot(x[skipped & ok], norm[skipped & ok], "o", mfc="none", color="gray", label="step skipped (scaler)")
    if ok.any() and norm[ok].max() / norm[ok].min() > 20:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("global L2 norm")
    seen: set[tuple[str, str]] = set()
    for f in sorted(findings, key=_finding_start):
        sev = f.severity.value
        color = SEVERITY_COLORS[f.severity]
        start = _finding_start(f)
        label = f"{f.detector} ({sev})"
        ax.axvline(start, color=color, linestyle=":", linewidth=1.4,
                   label=label if (f.detector, sev) not in seen else None)
        seen.add((f.detector, sev))
        end = f.last_step if f.last_step is not None else start
        if end > start:
            ax.axvspan(start, end, color=color, alpha=0.08, linewidth=0)
    loss = np.array([np.nan if s.loss is None else s.loss for s in steps], dtype=float)
    handles, labels = ax.get_legend_handles_labels()
    if np.isfinite(loss).any():
        twin = ax.twinx()
        line = twin.plot(x, loss, color="#7f7f7f", linewidth=1.0, alpha=0.8, label="loss")
        twin.set_ylabel("loss", color="#7f7f7f")
        if np.nanmin(loss) > 0 and np.nanmax(loss) / np.nanmin(loss) > 100:
            twin.set_yscale("log")
        handles, labels = handles + line, [*labels, "loss"]
    ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.07, 1.0), borderaxespad=0)
    ax.set_title("Global gradient norm, findings marked where they were raised", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)


def figure(history: Sequence[StepStats], findings: Sequence[Finding] = (), steps: Sequence[int] | None = None) -> Any:
    """The report as a matplotlib ``Figure`` (no pyplot state is touched)."""
    Figure, colors = _matplotlib()
    aligned = _aligned(history)
    available = {s.step for s in aligned}
    chosen = sorted(set(steps)) if steps else profile_steps(aligned, findings)
    missing = [s for s in chosen if s not in available]
    if missing:
        raise ReportError(f"steps {missing} are not in the history (it holds {len(available)} steps from "
                          f"{min(available)} to {max(available)})")
    n_layers = len(aligned[-1].layers)
    height = 4.0 + min(6.0, 0.12 * n_layers)
    fig = Figure(figsize=(12, height + 7.5), layout="constrained")
    grid = fig.add_gridspec(3, 1, height_ratios=[height, 4.0, 3.5])
    run = aligned[-1].run
    fig.suptitle(f"gfservice: run {run}, steps {aligned[0].step} to {aligned[-1].step}, {n_layers} layers, "
                 f"{len(findings)} finding{'s' if len(findings) != 1 else ''}", fontsize=12, fontweight="bold")
    _draw_heatmap(fig, fig.add_subplot(grid[0]), colors, aligned, findings)
    _draw_profile(fig.add_subplot(grid[1]), aligned, chosen)
    _draw_norm(fig.add_subplot(grid[2]), history, findings)
    return fig


def png_bytes(history: Sequence[StepStats], findings: Sequence[Finding] = (), steps: Sequence[int] | None = None,
              dpi: int = 100) -> bytes:
    """The report as PNG bytes."""
    buf = io.BytesIO()
    figure(history, findings, steps).savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _fmt(v: float | None) -> str:
    if v is None:
        return ""
    return f"{v:.4g}" if math.isfinite(v) else str(v)


def html_page(history: Sequence[StepStats], findings: Sequence[Finding] = (), steps: Sequence[int] | None = None,
              dpi: int = 100) -> str:
    """A self-contained HTML page: the picture (embedded PNG) and a table of the findings."""
    png = base64.b64encode(png_bytes(history, findings, steps, dpi)).decode("ascii")
    aligned = _aligned(history)
    run = html.escape(aligned[-1].run)
    last = aligned[-1]
    rows = []
    for f in sorted(findings, key=lambda f: (-f.severity.rank, _finding_start(f))):
        sev = f.severity.value
        rows.append(
            "<tr>"
            f'<td><span class="sev {sev}">{sev}</span></td><td>{html.escape(f.detector)}</td>'
            f"<td>{_finding_start(f)}</td><td>{'' if f.last_step is None else f.last_step}</td>"
            f"<td>{'yes' if f.active else 'no'}</td>"
            f"<td>{html.escape(describe_layers(f.layers)) if f.layers else ''}</td>"
            f"<td>{html.escape(', '.join(map(str, f.ranks)))}</td>"
            f"<td>{html.escape(f.message)}</td><td>{_fmt(f.value)}</td><td>{_fmt(f.threshold)}</td>"
            "</tr>"
        )
    table = (
        "<table><thead><tr><th>severity</th><th>detector</th><th>first step</th><th>last step</th><th>active</th>"
        "<th>layers</th><th>ranks</th><th>message</th><th>value</th><th>threshold</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>" if rows else "<p>No findings: every detector stayed quiet.</p>"
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>gfservice report: run {run}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
img {{ max-width: 100%; height: auto; border: 1px solid #ddd; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }}
th {{ background: #f4f4f4; }}
.sev {{ font-weight: bold; padding: 0.1em 0.4em; border-radius: 3px; color: white; }}
.critical {{ background: {_CRITICAL}; }} .warning {{ background: {_WARNING}; }}
.info {{ background: {_INFO}; }}
</style>
</head>
<body>
<h1>Gradient flow of run {run}</h1>
<p>Steps {aligned[0].step} to {last.step} ({len(aligned)} merged steps), {len(last.layers)} layers;
last global gradient norm {_fmt(last.global_norm)}.</p>
<img alt="Gradient flow of run {run}: heatmap of log10 RMS gradient by layer and step, per-layer profile, and
global gradient norm with findings" src="data:image/png;base64,{png}">
<h2>Findings ({len(findings)})</h2>
{table}
</body>
</html>
"""


def render(
    history: Sequence[StepStats],
    findings: Sequence[Finding],
    out_path: str | os.PathLike[str],
    steps: Sequence[int] | None = None,
    *,
    dpi: int = 100,
) -> Path:
    """Write the report to ``out_path``: a PNG for ``.png``, a self-contained page for ``.html``/``.htm``.

    ``steps`` picks the steps of the per-layer profile (default: first, middle, last, and where the most
    severe finding began).
    """
    out = Path(out_path)
    suffix = out.suffix.lower()
    if suffix not in (".png", ".html", ".htm"):
        raise ReportError(f"cannot tell the report format from {out.name!r}: name it .png or .html")
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".png":
        out.write_bytes(png_bytes(history, findings, steps, dpi))
    else:
        out.write_text(html_page(history, findings, steps, dpi), encoding="utf-8")
    return out
