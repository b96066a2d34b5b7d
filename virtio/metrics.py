"""Prometheus exposition of the exports' statistics (``--metrics-port PORT``).

The figures are those of ``query-stats`` (``ExportSet.snapshot``), taken on the
trio thread at each scrape (``trio.from_thread``): one source of truth.  Served by
``prometheus_client``'s HTTP server thread on 127.0.0.1 unless
``--metrics-address`` says otherwise.  Names (all with an ``export`` label, queue
figures with ``queue`` too):

* ``virtio_requests_total{kind}``, ``virtio_request_bytes_total{kind}``,
  ``virtio_request_status_total{status}`` -- by the device's request kinds/statuses;
* ``virtio_completed_total{path="dataplane"|"python"}``, ``virtio_in_flight``;
* ``virtio_notifications_total{decision="sent"|"suppressed"}``;
* ``virtio_request_latency_seconds`` (histogram: pop to used entry);
* ``virtio_connections_total``, ``virtio_connections_refused_total``,
  ``virtio_protocol_errors_total``, ``virtio_resubmitted_total``, ``virtio_needs_reset``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import trio

from virtio.stats import LATENCY_BOUNDS_US

log = logging.getLogger(__name__)


class ExportsCollector:
    """A prometheus_client collector over ``snapshot()`` (called on the trio thread)."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]], token: trio.lowlevel.TrioToken):
        self._snapshot = snapshot
        self._token = token

    def describe(self) -> list:
        return []  # the families depend on the exports of the moment

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        try:
            snap = trio.from_thread.run_sync(self._snapshot, trio_token=self._token)
        except (trio.RunFinishedError, RuntimeError):
            return
        q_labels = ["export", "type", "queue"]
        requests = CounterMetricFamily(
            "virtio_requests", "Requests completed, by kind", labels=[*q_labels, "kind"]
        )
        nbytes = CounterMetricFamily(
            "virtio_request_bytes", "Data bytes moved, by kind", labels=[*q_labels, "kind"]
        )
        status = CounterMetricFamily(
            "virtio_request_status", "Requests by status", labels=[*q_labels, "status"]
        )
        completed = CounterMetricFamily(
            "virtio_completed",
            "Used entries published, by the path that served them",
            labels=[*q_labels, "path"],
        )
        in_flight = GaugeMetricFamily(
            "virtio_in_flight", "Chains popped and not yet used", labels=q_labels
        )
        notes = CounterMetricFamily(
            "virtio_notifications",
            "Used buffer notification decisions (virtio 1.4 2.7.7 / 2.8.10)",
            labels=[*q_labels, "decision"],
        )
        latency = HistogramMetricFamily(
            "virtio_request_latency_seconds",
            "Request latency from pop to used entry",
            labels=q_labels,
        )
        e_labels = ["export", "type"]
        server = {
            key: CounterMetricFamily(f"virtio_{name}", text, labels=e_labels)
            for key, name, text in (
                ("connections", "connections", "Front-end connections served"),
                ("refused", "connections_refused", "Connections refused (device busy)"),
                ("errors", "protocol_errors", "Protocol errors"),
                ("resubmitted", "resubmitted", "In-flight requests resubmitted on reconnect"),
            )
        }
        needs_reset = GaugeMetricFamily(
            "virtio_needs_reset", "The device is in DEVICE_NEEDS_RESET", labels=e_labels
        )
        for export in snap["exports"]:
            e = [export["id"], export["type"]]
            for key, family in server.items():
                family.add_metric(e, export[key])
            needs_reset.add_metric(e, int(export["needs_reset"]))
            for q in export["queues"]:
                lq = [*e, str(q["queue"])]
                for kind, n in q["requests"].items():
                    requests.add_metric([*lq, kind], n)
                for kind, n in q["bytes"].items():
                    nbytes.add_metric([*lq, kind], n)
                for name, n in q["status"].items():
                    status.add_metric([*lq, name], n)
                completed.add_metric([*lq, "dataplane"], q["dataplane"])
                completed.add_metric([*lq, "python"], q["python"])
                in_flight.add_metric(lq, q["in_flight"])
                notes.add_metric([*lq, "sent"], q["notifications"]["sent"])
                notes.add_metric([*lq, "suppressed"], q["notifications"]["suppressed"])
                lat = q["latency"]
                cumulative, buckets = 0, []
                for bound, n in zip(LATENCY_BOUNDS_US, lat["buckets_us"], strict=False):
                    cumulative += n
                    buckets.append((repr(bound / 1e6), cumulative))
                buckets.append(("+Inf", lat["count"]))
                latency.add_metric(lq, buckets, lat["sum_us"] / 1e6)
        yield from (requests, nbytes, status, completed, in_flight, notes, latency)
        yield from server.values()
        yield needs_reset


def start_metrics_server(
    port: int, address: str, snapshot: Callable[[], dict[str, Any]]
) -> Callable[[], None]:
    """Serve ``/metrics`` on ``address:port`` (a thread); returns a stop function."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(ExportsCollector(snapshot, trio.lowlevel.current_trio_token()))
    httpd, thread = start_http_server(port, address, registry=registry)
    log.info("metrics: http://%s:%d/metrics", address, httpd.server_port)

    def stop() -> None:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)

    return stop
