"""Session-wide test infrastructure: one local Ray cluster and one gfservice service for the whole session.

Tests that need them take the ``service`` (a :class:`gfservice.service.client.Client`) or ``ray_cluster`` fixture;
the cluster starts on first use and stops at the end of the session.
"""

from __future__ import annotations

import os
import tempfile

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """The service's default state directory (``$XDG_STATE_HOME/gfservice``: snapshots, discovery files) is a
    fresh one for each test session: no test, doctest or Ray worker reads or writes the user's own, and two
    sessions on one machine never see each other's state."""
    os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="gfservice-test-state-")


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Four logical CPUs on two cores: the trainer's controller and two workers fit without deadlock.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             namespace="gfservice-tests")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def service_settings(tmp_path_factory):
    from gfservice.config import AggregatorConfig, ServiceConfig, Settings

    tmp = tmp_path_factory.mktemp("service")
    return Settings(
        aggregator=AggregatorConfig(merge_timeout_s=2.0),
        service=ServiceConfig(
            snapshot_path=str(tmp / "snapshot.json"),
            snapshot_interval_s=0.5,
            metrics_port=0,
            sd_file=str(tmp / "prometheus-sd.json"),
            exporter={"finding_linger_s": 5},
        ),
    )


@pytest.fixture(scope="session")
def service(ray_cluster, service_settings):
    from gfservice.hosting import actor as svc
    from gfservice.service.client import Client

    handle, _ = svc.start(service_settings)
    yield Client(handle)
    svc.stop(service_settings.service.name, service_settings.service.namespace)
