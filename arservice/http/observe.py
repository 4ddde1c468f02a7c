"""GET / (the status page and its files under /static/) and GET /metrics (Prometheus).

The page is static and holds no data: its script polls GET /status (a plain API route) with the
bearer token the user typed, kept in sessionStorage. /metrics asks the broker loop for a snapshot
over inproc, as every route does, and renders the text here with prometheus_client, so the
format's cost falls on an HTTP thread, not on the loop.
"""

import os
from collections.abc import Iterator
from typing import Any

import falcon
from prometheus_client import CollectorRegistry, exposition
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString

from .. import protocol
from ..client import DEFAULT_WAIT_S, ZMQClient

STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")
# The page shows strings an instance may have chosen (error messages, info): it renders them as
# text only, and this policy keeps any markup that slipped through from running or loading anything.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}
METRIC_FAMILIES = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily}
# This process's CPU, memory, file descriptors and GC: in `arservice --runner ...` the broker loop lives here too.
PROCESS_REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=PROCESS_REGISTRY)
GCCollector(registry=PROCESS_REGISTRY)


class BrokerSnapshot:
    """One scrape: the families the broker handed out (see broker/metrics.py), then this process's own."""

    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        for name, kind, help_text, labels, samples in self.families:
            if kind == "histogram":
                bounds, series = samples
                family = HistogramMetricFamily(name, help_text, labels=labels)
                for values, counts in series:
                    cumulative, buckets = 0, []
                    for bound, count in zip([*bounds, float("inf")], counts[:-1], strict=False):
                        cumulative += count
                        buckets.append((floatToGoString(bound), cumulative))
                    family.add_metric(values, buckets, counts[-1])
            else:
                family = METRIC_FAMILIES[kind](name, help_text, labels=labels)
                for values, value in samples:
                    family.add_metric(values, value)
            yield family
        yield from PROCESS_REGISTRY.collect()


class MetricsResource:
    def __init__(self, broker: ZMQClient) -> None:
        self.broker = broker

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        families = self.broker.request(protocol.METRICS, DEFAULT_WAIT_S)["families"]
        encode, resp.content_type = exposition.choose_encoder(req.get_header("Accept"))  # type: ignore[arg-type]  # it takes None as ''
        resp.data = encode(BrokerSnapshot(families))


class PageResource:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = falcon.MEDIA_HTML
        resp.set_headers(PAGE_HEADERS)
        with open(os.path.join(STATIC_DIR, "index.html"), "rb") as f:
            resp.data = f.read()


def add_routes(app: falcon.App, broker: ZMQClient) -> None:
    """The page needs no token to load (it holds nothing); its data and /metrics do (app.Authorization)."""
    app.add_route("/", PageResource())
    app.add_static_route("/static", STATIC_DIR)
    app.add_route("/metrics", MetricsResource(broker))
