"""What the alerts, the dashboards and Grafana agree on, written once.

>>> DATASOURCE_UID, STALL_AFTER_S
('gfservice-prometheus', 600)
"""

from __future__ import annotations

__all__ = ["DATASOURCE_UID", "STALL_AFTER_S"]

#: uid of the Prometheus data source that deploy/grafana/provisioning/datasources/gfservice.yml provisions: the
#: Grafana-managed alert rules query it, and it is the dashboards' default ``datasource``.
DATASOURCE_UID = "gfservice-prometheus"
#: Seconds without a merged step after which a run that has not finished counts as stalled: the
#: GradflowTrainingStalled alert fires, and the dashboards show the run as stale.
STALL_AFTER_S = 600
