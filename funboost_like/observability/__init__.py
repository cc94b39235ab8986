"""Observability: Prometheus numbers (:mod:`.metrics`, :mod:`.prometheus`) and OpenTelemetry spans (:mod:`.tracing`).

Importing this package imports neither ``prometheus_client`` nor ``opentelemetry``, and starts nothing:
recording starts with the ``METRICS`` setting, spans with an OpenTelemetry SDK (docs/metrics.md).
"""
