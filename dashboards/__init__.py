"""gfservice's Grafana dashboards: built by :mod:`dashboards.build`, committed as JSON beside it."""
