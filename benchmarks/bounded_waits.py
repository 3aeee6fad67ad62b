"""The training thread's waits (issue 22): ``monitor.step()`` with a hung plugin detector in-process, against the
same loop with healthy detectors, and ``monitor.step()`` and ``close()`` when the Ray service is gone (``--ray``).

    python benchmarks/bounded_waits.py [--steps 300] [--ray]

Prints the median, 99th percentile and worst ``monitor.step()`` in ms, and how long ``close()`` took.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

from gfservice.api import Detector, DetectorConfig
from gfservice.service.aggregator import Aggregator
from gfservice.training.monitoring import Monitor, MonitorOptions
from gfservice.training.transport import InProcessTransport


class Hang(Detector):
    """Hangs on its second step until released (a plugin stuck on I/O or a lock)."""

    name = "hang"

    def __init__(self, config=None, release: threading.Event | None = None):
        self.config = config or DetectorConfig()
        self.release = release or threading.Event()
        self.calls = 0

    def update(self, stats):
        self.calls += 1
        if self.calls == 2:
            self.release.wait(60)
        return None


def step_times(agg: Aggregator, steps: int) -> tuple[list[float], InProcessTransport, float]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    transport = InProcessTransport(agg)
    mon = Monitor(model, opt, transport, MonitorOptions(run="bench", deep_every=50))
    times = []
    for _ in range(steps):
        model(torch.randn(32, 256)).pow(2).mean().backward()
        opt.step()
        t0 = time.perf_counter()
        mon.step()
        times.append(time.perf_counter() - t0)
        opt.zero_grad()
    t0 = time.perf_counter()
    mon.close()
    return times, transport, time.perf_counter() - t0


def summary(label: str, times: list[float]) -> str:
    ms = sorted(t * 1e3 for t in times)
    return (f"{label:<28} median {statistics.median(ms):6.2f} ms   p99 {ms[int(0.99 * (len(ms) - 1))]:6.2f} ms   "
            f"worst {ms[-1]:6.2f} ms")


def ray_stopped(steps: int = 50) -> tuple[list[float], float]:
    """``monitor.step()`` and ``close()`` of a monitor whose Ray service was stopped mid-run."""
    import ray

    import gfservice
    from gfservice.config import Settings
    from gfservice.hosting import actor as svc

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR", namespace="bench")
    settings = Settings.model_validate({"service": {"metrics_port": None, "snapshot_path": "", "name": "bw",
                                                    "namespace": "bw"}})
    svc.start(settings)
    model = torch.nn.Linear(8, 1)
    mon = gfservice.monitor(model, run="bw", service="bw/bw", sinks=[])
    for _ in range(3):
        model(torch.randn(4, 8)).sum().backward()
        mon.step()
    svc.stop("bw", "bw")
    times = []
    for _ in range(steps):
        model(torch.randn(4, 8)).sum().backward()
        t0 = time.perf_counter()
        mon.step()
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    mon.close()
    took = time.perf_counter() - t0
    ray.shutdown()
    return times, took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--ray", action="store_true", help="also time close() with a stopped Ray service")
    args = ap.parse_args()
    healthy, _, healthy_close = step_times(Aggregator(), args.steps)
    print(summary("healthy detectors", healthy), f"  close {healthy_close:.2f} s")
    release = threading.Event()
    hung_agg = Aggregator(detector_factory=lambda: {"hang": Hang(release=release)})
    timer = threading.Timer(30, release.set)  # close() needs the judge back (or gives up after its bound)
    timer.start()
    hung, transport, hung_close = step_times(hung_agg, args.steps)
    release.set()
    timer.cancel()
    print(summary("a hung detector", hung), f"  close {hung_close:.2f} s   late {transport.late}  "
          f"dropped {transport.dropped}")
    if args.ray:
        stopped, stopped_close = ray_stopped()
        print(summary("the Ray service stopped", stopped), f"  close {stopped_close:.2f} s")


if __name__ == "__main__":
    main()
