"""gfservice: training health for PyTorch. Gradient statistics, pluggable detectors, Prometheus and Grafana.

Quick start::

    monitor = gfservice.monitor(model, optimizer, run="exp-42")
    ...   # loss.backward(); optimizer.step()
    monitor.step(loss=loss)
"""

__version__ = "0.1.0"

from gfservice.api import Detector, DetectorConfig, Finding, Severity, StepStats
from gfservice.client import connect
from gfservice.collect import grad_stats
from gfservice.monitor import Monitor, monitor
from gfservice.stats import GradStats

__all__ = [
    "Detector",
    "DetectorConfig",
    "Finding",
    "GradStats",
    "Monitor",
    "Severity",
    "StepStats",
    "__version__",
    "connect",
    "grad_stats",
    "monitor",
]
