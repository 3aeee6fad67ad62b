"""gfservice: training health for PyTorch. Gradient statistics, pluggable detectors, Prometheus and Grafana.

Quick start::

    monitor = gfservice.monitor(model, optimizer, run="exp-42")
    ...   # loss.backward(); optimizer.step()
    monitor.step(loss=loss)
"""

from gfservice.api import Detector, DetectorConfig, Finding, Severity, StepStats
from gfservice.collect import grad_stats
from gfservice.monitor import Monitor, monitor
from gfservice.stats import GradStats

__version__ = "0.1.0"

__all__ = [
    "Detector",
    "DetectorConfig",
    "Finding",
    "GradStats",
    "Monitor",
    "Severity",
    "StepStats",
    "__version__",
    "grad_stats",
    "monitor",
]
