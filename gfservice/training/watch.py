"""Findings where people already look: the training log, TensorBoard, Weights & Biases and MLflow.

A :class:`Watch` follows one run from rank 0, off the training thread. It polls the run's merged steps and
findings, logs every finding once when it opens and once when it clears, and hands each merged step and each
finding to the sinks chosen with ``monitor(..., sinks=[...])`` or ``sinks = [...]`` in the configuration:

- ``"tensorboard"`` or ``"tensorboard:DIR"``: scalars (global norm, loss, per-depth RMS) and findings as text;
- ``"wandb"``: ``run.log`` scalars on the ``gradflow/step`` axis, ``run.alert`` for critical findings;
- ``"mlflow"``: ``log_metrics`` into the active MLflow run (one is started when none is).

>>> from gfservice.testing import make_step
>>> seen = []
>>> class Collect:
...     def step(self, stats): seen.append(("step", stats.step))
...     def opened(self, finding): seen.append(("opened", finding.detector))
...     def cleared(self, finding): seen.append(("cleared", finding.detector))
...     def close(self): seen.append(("close",))
>>> steps = [make_step(sum_sq=[1.0, 4.0], count=1, step=s, run="r") for s in range(2)]
>>> nan = Finding(detector="nonfinite", severity="critical", run="r", step=1, message="NaN", first_step=1)
>>> w = Watch("r", lambda: (steps, [nan]), [Collect()])
>>> w.poll()
>>> w.poll()   # nothing new: nothing is repeated
>>> w.close()
>>> seen
[('step', 0), ('step', 1), ('opened', 'nonfinite'), ('close',)]
>>> scalars(steps[1], depth_buckets=2)["gradflow/grad_norm"]
2.23606797749979
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from gfservice.api import Finding, Severity, StepStats
from gfservice.stats import depth_buckets

log = logging.getLogger("gfservice.findings")

__all__ = ["MLflowSink", "Sink", "TensorBoardSink", "WandbSink", "Watch", "make_sinks", "scalars"]

#: Log level of a finding as it opens, by severity.
_LEVEL = {Severity.critical: logging.ERROR, Severity.warning: logging.WARNING, Severity.info: logging.INFO}

Source = Callable[[], tuple[Sequence[StepStats], Sequence[Finding]]]


class Sink(Protocol):
    """Where a :class:`Watch` sends what it sees. Each call must be quick and must not raise for long."""

    def step(self, stats: StepStats) -> None: ...

    def opened(self, finding: Finding) -> None: ...

    def cleared(self, finding: Finding) -> None: ...

    def close(self) -> None: ...


def scalars(stats: StepStats, depth_buckets: int = 8) -> dict[str, float]:
    """The scalars a sink writes for one merged step (names under ``gradflow/``; unknown values left out)."""
    out: dict[str, float] = {}
    g = stats.grads
    if len(g.layers):
        out["gradflow/grad_norm"] = float(g.global_norm)
        out["gradflow/nonfinite"] = float(g.nonfinite.sum())
        rms = _depth(g.sum_sq, g.count, depth_buckets)
        for i, v in enumerate(rms):
            if v is not None:
                out[f"gradflow/depth_rms/{i:02d}"] = v
    for name in ("loss", "lr", "loss_scale"):
        v = getattr(stats, name)
        if v is not None and math.isfinite(v):
            out[f"gradflow/{name}"] = float(v)
    return out


_depth = depth_buckets  # the exporter's per-depth RMS: the same picture as the dashboard's


def describe(f: Finding) -> str:
    """One line for a finding: ``critical nonfinite at step 40 [layers] (run r): message``."""
    where = f" [{', '.join(f.layers[:3])}{', ...' if len(f.layers) > 3 else ''}]" if f.layers else ""
    ranks = f" ranks {f.ranks}" if f.ranks else ""
    return f"{f.severity.value} {f.detector} at step {f.since}{where}{ranks} (run {f.run}): {f.message}"


class Watch:
    """Follows one run: new merged steps and finding openings/clearings go to the log and the sinks.

    ``source()`` returns the run's merged steps (oldest first) and its findings with their lifecycle.
    :meth:`start` polls every ``interval_s`` on a daemon thread; :meth:`close` polls a last time.
    A sink that raises is logged once and dropped; the others go on.
    """

    def __init__(self, run: str, source: Source, sinks: Iterable[Sink] = (), interval_s: float = 1.0):
        self.run = run
        self.source = source
        self.sinks = list(sinks)
        self.interval_s = interval_s
        self._last_step = -1
        self._open: set[tuple[str, str, str, int | None]] = set()
        self._announced: set[tuple[str, str, str, int | None]] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Watch:
        self._thread = threading.Thread(target=self._loop, name=f"gfservice-watch-{self.run}", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def poll(self) -> None:
        """Send what is new since the last poll; never raises."""
        with self._lock:
            try:
                steps, findings = self.source()
            except Exception as exc:  # the service may be gone: try again next time
                log.debug("gfservice watch of %s: %s", self.run, exc)
                return
            for stats in steps:
                if stats.step > self._last_step:
                    self._last_step = stats.step
                    self._each("step", stats)
            for f in findings:
                ident = (f.detector, f.key, f.attempt, f.since)
                if ident not in self._announced:
                    self._announced.add(ident)
                    self._open.add(ident)
                    level = _LEVEL[f.severity]
                    log.log(level, "gfservice finding opened: %s", describe(f))
                    self._each("opened", f)
                if not f.active and ident in self._open:
                    self._open.discard(ident)
                    log.info("gfservice finding cleared: %s %s (run %s) after step %s", f.severity.value, f.detector,
                             f.run, f.last_step)
                    self._each("cleared", f)

    def _each(self, method: str, arg: Any) -> None:
        for sink in list(self.sinks):
            try:
                getattr(sink, method)(arg)
            except Exception:
                log.exception("gfservice: sink %s failed in %s; it is dropped", type(sink).__name__, method)
                self.sinks.remove(sink)

    def close(self) -> None:
        """Stop polling, send what is left, close the sinks."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.poll()
        for sink in self.sinks:
            try:
                sink.close()
            except Exception:
                log.exception("gfservice: closing sink %s failed", type(sink).__name__)


class TensorBoardSink:
    """Scalars under ``gradflow/`` and findings as text, in TensorBoard event files under ``log_dir``."""

    def __init__(self, log_dir: str | None = None, run: str = "run"):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer = SummaryWriter(log_dir=log_dir or os.path.join("runs", run))

    def step(self, stats: StepStats) -> None:
        for tag, value in scalars(stats).items():
            self.writer.add_scalar(tag, value, stats.step, walltime=stats.time)

    def opened(self, finding: Finding) -> None:
        self.writer.add_text("gradflow/findings", f"**opened** {describe(finding)}", finding.since or finding.step)

    def cleared(self, finding: Finding) -> None:
        self.writer.add_text("gradflow/findings", f"cleared: {finding.severity.value} {finding.detector}",
                             finding.last_step or finding.step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """``run.log`` of the scalars on their own ``gradflow/step`` axis; ``run.alert`` for critical findings.

    Uses the active ``wandb.run``, else starts one named after the gfservice run (``WANDB_MODE=offline``
    works as usual); only a run it started is finished on close.
    """

    def __init__(self, run: str = "run", wandb_run: Any = None):
        import wandb

        self._wandb = wandb
        self._owned = wandb_run is None and wandb.run is None
        self.run = wandb_run or wandb.run or wandb.init(project="gfservice", name=run)
        self.run.define_metric("gradflow/step")
        self.run.define_metric("gradflow/*", step_metric="gradflow/step")

    def step(self, stats: StepStats) -> None:
        self.run.log({"gradflow/step": stats.step, **scalars(stats)})

    def opened(self, finding: Finding) -> None:
        if finding.severity is Severity.critical:
            self.run.alert(title=f"gfservice: {finding.detector} in {finding.run}", text=describe(finding),
                           level=self._wandb.AlertLevel.ERROR)  # type: ignore[attr-defined]

    def cleared(self, finding: Finding) -> None:
        pass

    def close(self) -> None:
        if self._owned:
            self.run.finish()


class MLflowSink:
    """``log_metrics`` of the scalars (names with ``/`` kept) at the step into the active MLflow run (one is
    started when none is); findings as tags. Written by run id, not through MLflow's active run, which is
    per thread: the sink is fed from the watch's thread and closed from another."""

    def __init__(self, run: str = "run"):
        import mlflow

        active = mlflow.active_run()
        self._owned = active is None
        self._run_id = (active or mlflow.start_run(run_name=run)).info.run_id
        self._client = mlflow.MlflowClient()
        self._metric = mlflow.entities.Metric

    def step(self, stats: StepStats) -> None:
        now = int(time.time() * 1000)
        self._client.log_batch(self._run_id, metrics=[self._metric(k, v, now, stats.step)
                                                      for k, v in scalars(stats).items()])

    def opened(self, finding: Finding) -> None:
        self._client.set_tag(self._run_id, f"gfservice.finding.{finding.detector}", describe(finding)[:5000])

    def cleared(self, finding: Finding) -> None:
        self._client.set_tag(self._run_id, f"gfservice.finding.{finding.detector}",
                             f"cleared after step {finding.last_step}")

    def close(self) -> None:
        if self._owned:
            self._client.set_terminated(self._run_id)
            import mlflow

            active = mlflow.active_run()
            if active is not None and active.info.run_id == self._run_id:
                mlflow.end_run()  # on the thread that started it: its active run is over


def make_sinks(specs: Iterable[str | Sink], run: str) -> list[Sink]:
    """Sinks from names (``"tensorboard[:DIR]"``, ``"wandb"``, ``"mlflow"``) or ready sink objects.

    >>> make_sinks(["nope"], "r")
    Traceback (most recent call last):
    ...
    ValueError: unknown sink 'nope': use 'tensorboard[:DIR]', 'wandb', 'mlflow' or a sink object
    """
    out: list[Sink] = []
    for spec in specs:
        if not isinstance(spec, str):
            out.append(spec)
            continue
        kind, _, arg = spec.partition(":")
        if kind == "tensorboard":
            out.append(TensorBoardSink(arg or None, run=run))
        elif kind == "wandb":
            out.append(WandbSink(run=run))
        elif kind == "mlflow":
            out.append(MLflowSink(run=run))
        else:
            raise ValueError(f"unknown sink {spec!r}: use 'tensorboard[:DIR]', 'wandb', 'mlflow' or a sink object")
    return out
