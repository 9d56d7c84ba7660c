"""Prometheus metrics: requests by route template and status, latency, and jobs by status (counted
from the database at scrape time). One registry per app, so tests can build many apps."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lathe.db.queries import count_jobs_by_status
from lathe.db.tables import JobStatus


class JobsCollector:
    def __init__(self, session_factory):
        self.session_factory = session_factory

    def collect(self):
        gauge = GaugeMetricFamily("lathe_jobs", "Jobs by status.", labels=["status"])
        counts = {str(s): 0 for s in JobStatus}
        try:
            with self.session_factory() as session:
                counts.update(count_jobs_by_status(session))
        except Exception:  # noqa: BLE001 - a scrape must not fail because the DB is down
            return
        for status, n in counts.items():
            gauge.add_metric([status], n)
        yield gauge


def make_registry(session_factory) -> tuple[CollectorRegistry, Counter, Histogram]:
    registry = CollectorRegistry()
    requests = Counter("lathe_http_requests", "HTTP requests.", ["method", "route", "status"], registry=registry)
    latency = Histogram("lathe_http_request_duration_seconds", "Time to the response headers.",
                        ["method", "route"], registry=registry)
    registry.register(JobsCollector(session_factory))
    return registry, requests, latency


class MetricsMiddleware:
    """Pure ASGI (streaming responses pass through untouched). Labels use the route template, so
    ids never explode the label space; unmatched paths share one label."""

    def __init__(self, app: ASGIApp, requests: Counter, latency: Histogram):
        self.app, self.requests, self.latency = app, requests, latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                self.latency.labels(scope["method"], self._route(scope)).observe(time.perf_counter() - start)
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.requests.labels(scope["method"], self._route(scope), str(status)).inc()

    @staticmethod
    def _route(scope: Scope) -> str:
        route = scope.get("route")
        return getattr(route, "path", None) or "unmatched"
