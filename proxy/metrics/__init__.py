"""Prometheus metrics, aggregated over the leader and every worker."""
