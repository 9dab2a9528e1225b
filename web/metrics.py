"""The web server's Prometheus metrics and its ``GET /metrics`` (summed over every gunicorn process: shared/metrics.py).

Requests are counted by route, the URL rule that matched (``/v1/transcriptions/<job_id>``), never the raw path, so job
ids cannot multiply the series; a path no rule matches is ``<unmatched>``. A long-poll's latency includes its
``?wait=``. The queue depth of each lane is read from Redis when scraped.

``/metrics`` needs no API key, like ``/healthz``: it must not be reachable from the public internet (block it at the
proxy; Prometheus scrapes the web processes directly).
"""

from __future__ import annotations

import logging
import time

import redis
from flask import Flask, Response, request, request_started
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from shared import metrics
from shared.config import Settings

log = logging.getLogger(__name__)

UNMATCHED = "<unmatched>"  # the route of a request no URL rule matched (404, 405)
_ROUTE = "arabic_words.route"  # where the matched rule is left in the WSGI environ for the middleware
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})  # any other: "other"

REQUESTS = Counter(
    "arabic_words_http_requests_total",
    "HTTP requests answered, by route (the URL rule, not the path), method and status",
    ["route", "method", "status"],
)
LATENCY = Histogram(
    "arabic_words_http_request_duration_seconds",
    "Seconds from a request's arrival to its response, by route and method (a long-poll's includes its wait)",
    ["route", "method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 40),
)
IN_PROGRESS = Gauge(
    "arabic_words_http_requests_in_progress",
    "Requests being answered now, open long-polls included, over every live web process",
    multiprocess_mode="livesum",
)
QUEUE_DEPTH = "arabic_words_queue_depth"


def queue_lanes(settings: Settings) -> dict[str, str]:
    """Each lane's Celery queue, as ``arabic_words_queue_depth`` reports them (a new lane is one more entry)."""
    return {"interactive": settings.QUEUE, "batch": settings.batch_queue}


def install(app: Flask, settings: Settings, client: redis.Redis) -> None:
    """Count and time every request of ``app`` and answer ``GET /metrics``."""
    registry = metrics.exposition_registry()
    registry.register(QueueDepthCollector(client, queue_lanes(settings)))
    app.wsgi_app = _Observed(app.wsgi_app)
    request_started.connect(_remember_route, app)

    def metrics_view() -> Response:
        body, content_type = metrics.render(registry)
        return Response(body, content_type=content_type)

    app.add_url_rule("/metrics", "metrics", metrics_view, methods=["GET"])


def _remember_route(sender: Flask, **_: object) -> None:
    rule = request.url_rule
    request.environ[_ROUTE] = rule.rule if rule is not None else UNMATCHED


class _Observed:
    """WSGI middleware around the Flask app: every answer is counted, whatever produced it (a view, an error
    handler, Flask's own 404)."""

    def __init__(self, wsgi_app) -> None:
        self.wsgi_app = wsgi_app

    def __call__(self, environ, start_response):
        started = time.perf_counter()
        status = ["500"]  # if the app raises instead of answering

        def capture(status_line, headers, exc_info=None):
            status[0] = status_line.split(" ", 1)[0]
            return start_response(status_line, headers, exc_info)

        IN_PROGRESS.inc()
        try:
            return self.wsgi_app(environ, capture)
        finally:
            IN_PROGRESS.dec()
            route = environ.get(_ROUTE, UNMATCHED)
            method = environ.get("REQUEST_METHOD", "")
            method = method if method in _METHODS else "other"
            REQUESTS.labels(route, method, status[0]).inc()
            LATENCY.labels(route, method).observe(time.perf_counter() - started)


class QueueDepthCollector:
    """``arabic_words_queue_depth{lane, queue}``: jobs waiting in each lane's queue (Celery's Redis transport keeps a
    queue as a list under its name), read when scraped. Left out of a scrape while Redis does not answer."""

    def __init__(self, client: redis.Redis, lanes: dict[str, str]) -> None:
        self.client = client
        self.lanes = lanes

    def collect(self):
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for queue in self.lanes.values():
                    pipe.llen(queue)
                depths = pipe.execute()
        except redis.RedisError as exc:
            log.warning("queue depth not read: %s", exc)
            return
        family = GaugeMetricFamily(
            QUEUE_DEPTH, "Jobs waiting in each lane's queue (Redis, at scrape time)", labels=["lane", "queue"]
        )
        for (lane, queue), depth in zip(self.lanes.items(), depths, strict=True):
            family.add_metric([lane, queue], int(depth))
        yield family
