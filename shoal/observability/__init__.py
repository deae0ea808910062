"""Sight into a running mesh: Prometheus metrics, OpenTelemetry traces, structured logs.

``enable_metrics()`` and ``enable_tracing()`` turn each on for the process; both are off
until then and cost nothing measurable while off.
"""

from shoal.observability.metrics import Metrics, active, disable_metrics, enable_metrics

__all__ = ["Metrics", "active", "disable_metrics", "enable_metrics"]
