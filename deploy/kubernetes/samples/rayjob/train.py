"""The RayJob sample's training job: a small Ray Train run (an MLP on scikit-learn's digits, DDP over gloo on the
CPU workers) watched by ``gfservice.monitor``, which finds the service the entrypoint started on this cluster.

    python train.py [--run NAME] [--steps 300] [--workers 2] [--fault none|nan@STEP|explode@STEP|vanish]
"""

from __future__ import annotations

import argparse

import ray

from gfservice.cli.workload import WorkloadConfig, fit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="rayjob-sample", help="run name: the `run` label of its metrics and alerts")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (one CPU each)")
    p.add_argument("--fault", default="none", help="inject a fault to see it found, e.g. nan@150")
    args = p.parse_args()
    ray.init()  # this job's cluster: `ray job submit` sets RAY_ADDRESS
    cfg = WorkloadConfig(run=args.run, steps=args.steps, fault=args.fault, step_delay_s=0.2, service="auto")
    cfg.fault_kind()  # a bad --fault fails here, before anything starts
    result = fit(cfg, args.workers, "/tmp/ray_results")
    print(f"run {args.run}: {'failed: ' + str(result.error) if result.error else 'done'}")


if __name__ == "__main__":
    main()
