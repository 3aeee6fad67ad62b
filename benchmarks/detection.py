"""Detector evaluation: train every scenario of ``benchmarks/zoo.py`` with a monitor and score the findings.

```bash
.venv/bin/python benchmarks/detection.py                      # every scenario, 3 seeds: about 4 minutes on 2 cores
.venv/bin/python benchmarks/detection.py --quick              # 1 seed of a handful of scenarios: under a minute
.venv/bin/python benchmarks/detection.py --only mlp,nan_batch --seeds 1 --json out.json
.venv/bin/python benchmarks/detection.py --config gfservice.toml   # detector settings to try, for every run
.venv/bin/python benchmarks/detection.py --list               # the scenarios
```

Each run uses only the public API (``gfservice.monitor(..., service=None)``, ``monitor.step(loss=...)``,
``monitor.findings``). A finding of severity warning or critical is an *alarm*; info findings are listed apart
and never count. The targets, per run:

- healthy: no alarm at all (else FALSE-ALARM);
- pathological: the expected detector raises an alarm at or after the onset and by its deadline (else MISS):
  NaN/Inf critical at the very step; an explosion before the first non-finite value (within 10 steps when
  none follows); vanishing within 100 steps; dead units, update ratio, precision and missing gradients within
  two deep steps (``--deep-every``); a loss spike within two steps; a loss-scale collapse within 20 steps; a
  diverging or straggling rank within 50 steps. Where the scenario states the layers, the alarms in the
  window must name all of them and nothing else; detectors the scenario forbids must stay silent.

Detectors that are not installed yet are expected all the same: their scenarios read as MISS (the baseline).
The output is a Markdown table (one row per run), the alarms that were not expected, and a summary: detection
rate on pathological runs, false alarms per 10,000 healthy steps and wall time. ``--json PATH`` writes all of it.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from typing import Any

import numpy as np
import torch
from torch import nn

import gfservice

if __package__:  # imported as benchmarks.detection
    from . import zoo
else:  # run as a script: benchmarks/ is on sys.path
    import zoo  # type: ignore[no-redef]


@dataclass(frozen=True)
class Target:
    """When an expected detector must have fired: ``steps`` after the onset, or by the ``deep_steps``-th deep step."""

    text: str
    steps: int | None = None
    deep_steps: int = 0
    critical: bool = False
    before_nonfinite: bool = False
    #: Count ``steps`` from the first step at or after the onset where the level of the gradient norm (the
    #: median of the 5 steps centred on it; the norm of the scenario's layers, else the global norm, before
    #: clipping in a clipped run) stands ``rise`` times above its reference (the median of the 10 steps before
    #: the onset; the first step's norm when the onset is 0), not from the onset (see :func:`rise_step`).
    rise: float | None = None

    def deadline(self, onset: int, deep_every: int) -> int:
        """The last step at which a finding still counts (20 steps after the onset when nothing says)."""
        if self.deep_steps and deep_every:
            first_deep = -(-onset // deep_every) * deep_every
            return first_deep + (self.deep_steps - 1) * deep_every
        return onset + (20 if self.steps is None else self.steps)


DEEP = Target("within two deep steps", deep_steps=2)
TARGETS: dict[str, Target] = {
    "nonfinite": Target("critical at the very step", steps=0, critical=True),
    "exploding": Target("before the first non-finite value, within 10 steps", steps=10, before_nonfinite=True),
    "vanishing": Target("within 100 steps", steps=100),
    "dead_units": DEEP, "update_ratio": DEEP, "precision": DEEP, "no_gradient": DEEP,
    "loss_spike": Target("within 2 steps", steps=2),
    "loss_scale": Target("within 20 steps", steps=20),
    "rank_divergence": Target("within 50 steps", steps=50),
    "straggler": Target("within 50 steps", steps=50),
    "trend": Target("within 30 steps of a 3x rise", steps=30, rise=3.0),
}


@dataclass
class Result:
    """One run: what was expected, what fired, and the verdict."""

    scenario: str
    seed: int
    kind: str
    steps: int
    onset: int | None
    expected: str | None
    installed: bool | None
    target: str = ""  # when the expected detector must fire
    alarms: dict[str, int] = field(default_factory=dict)  # detector -> first step of a warning/critical finding
    infos: dict[str, int] = field(default_factory=dict)  # detector -> first step of an info finding
    first_nonfinite: int | None = None  # ground truth: first step with a NaN/Inf loss or gradient
    rise_step: int | None = None  # ground truth of trend targets: first step of the 3x rise
    fired: int | None = None  # first step the expected detector raised an alarm (at or after the onset)
    delay: int | None = None
    deadline: int | None = None
    layers_ok: bool | None = None
    named: list[str] = field(default_factory=list)
    before_nonfinite: bool | None = None
    verdict: str = ""
    why: str = ""
    extras: list[dict[str, Any]] = field(default_factory=list)  # alarms of other detectors after the onset
    pre_onset: list[dict[str, Any]] = field(default_factory=list)  # alarms before the onset
    false_alarms: list[dict[str, Any]] = field(default_factory=list)  # healthy runs: every alarm
    loss_first: float | str = 0.0  # loss at step 0
    loss_last: float | str = 0.0  # mean loss of the last 10 steps
    wall_s: float = 0.0
    monitor_errors: int = 0
    dropped_overrides: list[str] = field(default_factory=list)


@cache
def installed(detector: str) -> bool:
    """Whether ``detector`` is installed, asked through the public API (an unknown detector is a ValueError)."""
    try:
        mon = gfservice.monitor(nn.Linear(1, 1), None, run=f"probe-{detector}", service=None,
                                detectors={detector: {}})
    except ValueError:
        return False
    mon.close()
    return True


def open_monitor(run: zoo.Run, name: str, overrides: dict[str, dict[str, Any]], deep_every: int,
                 config: str | None) -> tuple[Any, list[str]]:
    """``gfservice.monitor`` with the scenario's overrides, dropping detectors and fields that do not exist."""
    todo = {det: dict(fields) for det, fields in overrides.items()}
    dropped: list[str] = []
    while True:
        try:
            mon = gfservice.monitor(run.model, run.optimizer, run=name, service=None, deep_every=deep_every,
                                    scaler=run.scaler, config=config, detectors=todo or None)
            return mon, dropped
        except ValueError as exc:
            msg = str(exc)
            unknown = re.search(r"unknown detector '([^']+)'", msg)
            bad = re.search(r"detector '([^']+)': (.*)", msg)
            if unknown and unknown.group(1) in todo:
                dropped.append(f"{unknown.group(1)} (not installed)")
                del todo[unknown.group(1)]
            elif bad and bad.group(1) in todo:
                det = bad.group(1)
                fields = [f for f in re.findall(r"(?:^|; )(\w+): ", bad.group(2)) if f in todo[det]]
                for f in fields or list(todo[det]):
                    dropped.append(f"{det}.{f}")
                    todo[det].pop(f)
                if not fields:
                    del todo[det]
            else:
                raise


def _first(f: Any) -> int:
    return f.first_step if f.first_step is not None else f.step


def _brief(f: Any) -> dict[str, Any]:
    return {"detector": f.detector, "severity": f.severity.value, "step": _first(f), "layers": list(f.layers),
            "message": f.message}


def _num(x: float) -> float | str:
    return float(f"{x:.4g}") if math.isfinite(x) else str(x)


def _values(g: torch.Tensor) -> torch.Tensor:
    return g.coalesce().values() if g.is_sparse else g


def rise_step(norms: Sequence[float], onset: int, rise: float, half: int = 2) -> int | None:
    """The first step at or after ``onset`` whose norm *level* is ``rise`` times its reference (see
    ``Target.rise``): the level is the median of the ``2 * half + 1`` steps centred on the step, so that one noisy
    step touching ``rise`` does not start the clock before the norm has risen (a healthy run's norm touches 3x its
    median now and then).

    >>> rise_step([1.0] * 10 + [1.0, 2.0, 3.5, 9.0, 9.0, 9.0], 10, 3.0)
    12
    >>> rise_step([1.0] * 10 + [1.0, 3.5, 1.0, 1.0, 1.0, 3.5, 4.0, 4.0, 4.0], 10, 3.0)   # one noisy step is not
    15
    """
    before = [n for n in norms[max(0, onset - 10):onset] if math.isfinite(n)]
    ref = float(np.median(before)) if before else norms[onset]
    for i in range(onset, len(norms)):
        window = [n for n in norms[max(0, i - half): i + half + 1] if not math.isnan(n)]
        if window and not float(np.median(window)) < rise * ref:
            return i
    return None


def train(sc: zoo.Scenario, seed: int, deep_every: int, config: str | None) -> Result:
    """Run one scenario with one seed and score it."""
    t0 = time.perf_counter()
    run = sc.make(seed)
    layers = [n for n, p in run.model.named_parameters() if p.requires_grad]
    watched = sc.layers.must(layers) if sc.layers is not None else set(layers)
    mon, dropped = open_monitor(run, f"{sc.name}-s{seed}", sc.detectors, deep_every, config)
    losses: list[float] = []
    norms: list[float] = []
    first_bad: int | None = None
    for i in range(sc.steps):
        loss = run.step(i)
        grads = {n: _values(p.grad) for n, p in run.model.named_parameters() if p.grad is not None}
        if first_bad is None and (not torch.isfinite(loss)
                                  or not all(bool(torch.isfinite(g).all()) for g in grads.values())):
            first_bad = i
        if run.clip and sc.layers is None:  # the rise the fault causes, not what clipping leaves of it
            norms.append(run.preclip_norm if run.preclip_norm is not None else math.nan)
        else:
            norms.append(math.sqrt(sum(float(g.double().square().sum()) for n, g in grads.items() if n in watched)))
        mon.step(loss=loss)
        # the zoo judges the detectors on every step: its tiny models step faster than detection runs on a loaded
        # machine, where the in-process transport would drop reports (by design, counted) and so change what the
        # detectors see from one run to the next. Waiting here changes no finding's step, only the wall time.
        mon.transport.flush()
        run.finish()
        losses.append(float(loss))
    findings = list(mon.findings)
    errors = mon.errors
    mon.close()
    res = Result(sc.name, seed, sc.kind, sc.steps, sc.onset, sc.expected,
                 installed(sc.expected) if sc.expected else None, first_nonfinite=first_bad,
                 monitor_errors=errors, dropped_overrides=dropped,
                 loss_first=_num(losses[0]), loss_last=_num(sum(losses[-10:]) / len(losses[-10:])))
    alarms = sorted((f for f in findings if f.severity.value != "info"), key=_first)
    for f in sorted(findings, key=_first):
        (res.infos if f.severity.value == "info" else res.alarms).setdefault(f.detector, _first(f))
    target = TARGETS.get(sc.target or sc.expected or "")
    if target is not None and target.rise and sc.onset is not None:
        res.rise_step = rise_step(norms, sc.onset, target.rise)
    score(res, sc, alarms, layers, deep_every)
    res.wall_s = round(time.perf_counter() - t0, 2)
    return res


def score(res: Result, sc: zoo.Scenario, alarms: list[Any], layers: Sequence[str], deep_every: int) -> None:
    """Fill in the verdict of ``res`` from its alarms (warning/critical findings, sorted by first step)."""
    alarms = [f for f in alarms if f.severity.value != "info"]
    errors = [f"{res.monitor_errors} monitor errors"] if res.monitor_errors else []
    if sc.kind == "healthy" or sc.expected is None or sc.onset is None:
        res.false_alarms = [_brief(f) for f in alarms]
        res.verdict = "FALSE-ALARM" if alarms else "ERROR" if errors else "PASS"
        res.why = ", ".join([*sorted({f.detector for f in alarms}), *errors])
        return
    onset, exp = sc.onset, sc.expected
    target = TARGETS.get(sc.target or exp, Target("within 20 steps", steps=20))
    deadline = target.deadline(onset, deep_every)
    if target.rise:
        deadline = target.deadline(onset if res.rise_step is None else res.rise_step, deep_every)
    if target.before_nonfinite and res.first_nonfinite is not None and res.first_nonfinite >= onset:
        deadline = min(deadline, res.first_nonfinite - 1)
    res.deadline, res.target = deadline, target.text
    res.pre_onset = [_brief(f) for f in alarms if _first(f) < onset]
    res.extras = [_brief(f) for f in alarms if _first(f) >= onset and f.detector != exp]
    mine = [f for f in alarms if f.detector == exp and _first(f) >= onset]
    if target.critical:
        mine = [f for f in mine if f.severity.value == "critical"]
    if mine:
        res.fired = _first(mine[0])
        res.delay = res.fired - onset
    in_time = [f for f in mine if _first(f) <= deadline]
    if target.before_nonfinite and res.fired is not None:
        res.before_nonfinite = res.first_nonfinite is None or res.fired < res.first_nonfinite
    if in_time:
        res.named = list(dict.fromkeys(n for f in in_time for n in f.layers))
        if sc.layers is not None:
            res.layers_ok = sc.layers.check(res.named, layers)
    forbidden = [f for f in alarms if f.detector in sc.forbid]
    why = []
    if not res.installed:
        why.append("not installed")
    elif res.fired is None:
        why.append("not raised" + (" (critical)" if target.critical else ""))
    elif not in_time:
        why.append(f"late: +{res.delay}, deadline +{deadline - onset}"
                   + (" (after the first non-finite value)" if res.before_nonfinite is False else ""))
    if res.layers_ok is False:
        shown = ", ".join(res.named) if len(res.named) <= 3 else f"{res.named[0]} .. {res.named[-1]}"
        why.append(f"named {len(res.named)} layers ({shown}), expected {sc.layers.describe if sc.layers else ''}")
    if forbidden:
        why.append(f"{forbidden[0].detector} fired at step {_first(forbidden[0])}")
    why += errors
    res.verdict = "PASS" if not why else "MISS"
    res.why = "; ".join(why)


# ---- reporting -----------------------------------------------------------------------------------------------
def _steps(d: dict[str, int]) -> str:
    return ", ".join(f"{k}@{v}" for k, v in sorted(d.items(), key=lambda kv: kv[1])) or "-"


def _g(x: float | str) -> str:
    return f"{x:.3g}" if isinstance(x, float) else x


def table(results: list[Result]) -> str:
    head = ["scenario", "seed", "kind", "onset", "expected", "alarms (first step)", "info", "delay", "layers",
            "before NaN", "loss", "verdict", "note"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        expected = "-" if r.expected is None else r.expected + ("" if r.installed else " (n/i)")
        layers = {None: "-", True: "ok", False: "WRONG"}[r.layers_ok]
        before = {None: "-", True: "yes", False: "NO"}[r.before_nonfinite]
        cells = [r.scenario, str(r.seed), r.kind[:4], "-" if r.onset is None else str(r.onset), expected,
                 _steps(r.alarms), _steps(r.infos), "-" if r.delay is None else f"+{r.delay}", layers, before,
                 f"{_g(r.loss_first)} -> {_g(r.loss_last)}",
                 f"**{r.verdict}**" if r.verdict != "PASS" else r.verdict, r.why]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def grouped(results: list[Result], attr: str) -> list[str]:
    """Alarms of ``attr`` (extras, pre_onset, false_alarms) grouped by scenario and detector, one line each."""
    groups: dict[tuple[str, str], list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for r in results:
        for f in getattr(r, attr):
            groups[(r.scenario, f["detector"])].append((r.seed, f))
    lines = []
    for (scen, det), hits in groups.items():
        where = ", ".join(dict.fromkeys(f"s{seed}@{f['step']}" for seed, f in hits))
        f = hits[0][1]
        msg = f["message"] if len(f["message"]) <= 160 else f["message"][:157] + "..."
        lines.append(f"- {scen} / {det} [{f['severity']}] ({where}): {msg}")
    return lines


def summary(results: list[Result], wall_s: float, cpu_s: float) -> dict[str, Any]:
    healthy = [r for r in results if r.kind == "healthy"]
    patho = [r for r in results if r.kind == "pathological"]
    healthy_steps = sum(r.steps for r in healthy)
    n_false = sum(len(r.false_alarms) for r in healthy)
    live = [r for r in patho if r.installed]
    pre_steps = sum(r.onset or 0 for r in patho)
    n_pre = sum(len(r.pre_onset) for r in patho)
    by_scenario: dict[str, list[str]] = defaultdict(list)
    for r in patho:
        by_scenario[r.scenario].append(r.verdict)
    return {
        "runs": len(results),
        "pathological_runs": len(patho),
        "detected": sum(r.verdict == "PASS" for r in patho),
        "detection_rate": sum(r.verdict == "PASS" for r in patho) / len(patho) if patho else None,
        "detection_rate_installed": sum(r.verdict == "PASS" for r in live) / len(live) if live else None,
        "not_installed": sorted({r.expected for r in patho if not r.installed and r.expected}),
        "per_scenario": {k: f"{v.count('PASS')}/{len(v)}" for k, v in by_scenario.items()},
        "healthy_runs": len(healthy),
        "healthy_runs_with_alarms": sum(r.verdict != "PASS" for r in healthy),
        "healthy_steps": healthy_steps,
        "false_alarms": n_false,
        "false_alarms_per_10k_steps": 1e4 * n_false / healthy_steps if healthy_steps else None,
        "false_alarms_by_detector": dict(Counter(f["detector"] for r in healthy for f in r.false_alarms)),
        "pre_onset_alarms": n_pre,
        "pre_onset_steps": pre_steps,
        "monitor_errors": sum(r.monitor_errors for r in results),
        "dropped_overrides": sorted({f"{d} ({r.scenario})" for r in results for d in r.dropped_overrides}),
        "wall_s": round(wall_s, 1),
        "cpu_s": round(cpu_s, 1),
    }


def report(results: list[Result], s: dict[str, Any]) -> str:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.0f}%"

    out = ["## Runs", "", table(results), "",
           "alarms: warning/critical findings as detector@first step; info: info findings (not alarms); delay: "
           "steps from the onset to the expected detector's first alarm; n/i: the expected detector is not "
           "installed; layers: whether the alarms named the expected layers; before NaN: whether an explosion "
           "was found before the first non-finite value; loss: at step 0 -> mean of the last 10 steps.", ""]
    for title, attr in (("False alarms on healthy runs", "false_alarms"),
                        ("Unexpected extra alarms on pathological runs (after the onset)", "extras"),
                        ("Alarms before the onset on pathological runs", "pre_onset")):
        lines = grouped(results, attr)
        out += [f"## {title}", "", *(lines or ["none"]), ""]
    fa = s["false_alarms_per_10k_steps"]
    out += [
        "## Summary", "",
        f"- detection rate on pathological runs: {s['detected']}/{s['pathological_runs']} "
        f"({pct(s['detection_rate'])}); with an installed expected detector: {pct(s['detection_rate_installed'])}",
        f"- per scenario: {', '.join(f'{k} {v}' for k, v in s['per_scenario'].items())}",
        f"- expected detectors not installed: {', '.join(s['not_installed']) or 'none'}",
        f"- false alarms: {s['false_alarms']} in {s['healthy_steps']} healthy steps = "
        f"{'-' if fa is None else f'{fa:.1f}'} per 10,000 steps; {s['healthy_runs_with_alarms']}/{s['healthy_runs']}"
        f" healthy runs with an alarm; by detector: {s['false_alarms_by_detector'] or 'none'}",
        f"- alarms before the onset on pathological runs: {s['pre_onset_alarms']} in {s['pre_onset_steps']} steps",
        f"- monitor errors: {s['monitor_errors']}; detector overrides dropped: "
        f"{', '.join(s['dropped_overrides']) or 'none'}",
        f"- wall time: {s['wall_s']} s (CPU time {s['cpu_s']} s: on a busy machine the wall time says little)",
    ]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="one seed of the smoke-test scenarios (under a minute)")
    ap.add_argument("--only", help="comma-separated scenario names")
    ap.add_argument("--seeds", type=int, help="seeds per scenario (default 3; 1 with --quick)")
    ap.add_argument("--deep-every", type=int, default=10, help="deep statistics every N steps (default 10)")
    ap.add_argument("--config", help="a gfservice TOML/YAML configuration file for every run's detectors")
    ap.add_argument("--json", help="write the raw results and the summary to this file")
    ap.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.list:
        for sc in zoo.SCENARIOS:
            exp = f"onset {sc.onset}, expects {sc.expected}" if sc.expected else "no alarm expected"
            print(f"{sc.name:18} {sc.kind:12} {sc.steps:4} steps  {exp}: {sc.description}")
        return 0
    if args.only:
        unknown = [n for n in args.only.split(",") if n not in zoo.BY_NAME]
        if unknown:
            ap.error(f"unknown scenario {', '.join(unknown)}; --list shows them")
        chosen = [zoo.BY_NAME[n] for n in args.only.split(",")]
    else:
        chosen = [sc for sc in zoo.SCENARIOS if sc.quick or not args.quick]
    seeds = args.seeds or (1 if args.quick else 3)
    zoo.digits()  # one-time costs (sklearn, detector plugins) outside the per-run wall times
    installed("nonfinite")
    t0, c0 = time.perf_counter(), time.process_time()
    results: list[Result] = []
    total = len(chosen) * seeds
    for sc in chosen:
        for seed in range(seeds):
            r = train(sc, seed, args.deep_every, args.config)
            results.append(r)
            print(f"[{len(results)}/{total}] {sc.name} seed {seed}: {r.verdict} {r.why} ({r.wall_s:.1f} s)",
                  file=sys.stderr, flush=True)
    s = summary(results, time.perf_counter() - t0, time.process_time() - c0)
    print(report(results, s))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"summary": s, "args": vars(args), "results": [asdict(r) for r in results]}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
