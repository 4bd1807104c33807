"""Operations tooling: alert rules from KPI targets, the Grafana dashboard, the local demo."""
