"""Prometheus metrics, one registry per worker (no process-wide collectors)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]


class Metrics:
    """The worker's metrics. ``requests_inflight`` keeps its unprefixed name: the platform's
    autoscaler reads it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests_inflight = Gauge(
            "requests_inflight", "Jobs running now (0 or 1).", registry=r
        )
        self.jobs = Counter("sprocket_jobs", "Jobs finished, by outcome.", ["outcome"], registry=r)
        self.predict_seconds = Histogram(
            "sprocket_predict_seconds",
            "Seconds spent in predict().",
            buckets=(0.001, 0.01, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, float("inf")),
            registry=r,
        )
        self.download_bytes = Counter(
            "sprocket_download_bytes", "Bytes of input files downloaded.", registry=r
        )
        self.upload_bytes = Counter(
            "sprocket_upload_bytes", "Bytes of output files uploaded.", registry=r
        )
        self.claims = Counter("sprocket_claims", "Jobs claimed from the queue.", registry=r)
        self.claim_errors = Counter(
            "sprocket_claim_errors", "Claim requests that failed and were retried.", registry=r
        )
        self.report_retries = Counter(
            "sprocket_report_retries", "Final reports sent again after an error.", registry=r
        )
        self.heartbeat_failures = Counter(
            "sprocket_heartbeat_failures", "Running-status updates that failed.", registry=r
        )
        self.info_flushes = Counter(
            "sprocket_info_flushes", "Status updates that carried emit_info data.", registry=r
        )

    def exposition(self) -> bytes:
        """The text exposition format served at ``/metrics``."""
        return generate_latest(self.registry)
