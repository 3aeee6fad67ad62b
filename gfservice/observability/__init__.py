"""What people look at: the Prometheus exporter and discovery, alert definitions, Grafana, reports, history files."""
