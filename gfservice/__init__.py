"""gfservice: training health for PyTorch. Gradient statistics, pluggable detectors, Prometheus and Grafana.

Quick start::

    monitor = gfservice.monitor(model, optimizer, run="exp-42")
    ...   # loss.backward(); optimizer.step()
    monitor.step(loss=loss)

torch is imported only when ``monitor``, ``Monitor`` or ``grad_stats`` is first used, so the command line
and the service start fast.
"""

from typing import TYPE_CHECKING, Any

from gfservice._version import __version__
from gfservice.api import Detector, DetectorConfig, Finding, Severity, StepStats
from gfservice.stats import GradStats

if TYPE_CHECKING:
    from gfservice.service.client import connect
    from gfservice.training.collect import grad_stats
    from gfservice.training.guard import GuardConfig
    from gfservice.training.monitoring import Monitor, monitor

_LAZY = {
    "grad_stats": "gfservice.training.collect",
    "monitor": "gfservice.training.monitoring",
    "Monitor": "gfservice.training.monitoring",
    "connect": "gfservice.service.client",
    "GuardConfig": "gfservice.training.guard",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gfservice' has no attribute {name!r}")


__all__ = [
    "Detector",
    "DetectorConfig",
    "Finding",
    "GradStats",
    "GuardConfig",
    "Monitor",
    "Severity",
    "StepStats",
    "__version__",
    "connect",
    "grad_stats",
    "monitor",
]
