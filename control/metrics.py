"""Control's own ``/metrics`` (Prometheus text format 0.0.4).

Counts only, no names or addresses: connected gateways and agents, configuration
frames queued, ``stats`` reports taken, dashboard sign-ins by result, live dashboard
streams and events published.  Served on Control's main port without a token (like
the gateway's on its admin port); put it behind the proxy's access rules if even
these counts are private.
"""

from __future__ import annotations

from common.relay.metrics import CONTENT_TYPE, Counter, Registry
from control.web.pages import Dashboard
from control.ws.hub import Hub

__all__ = ["CONTENT_TYPE", "control_metrics"]


def control_metrics(hub: Hub, dashboard: Dashboard) -> Registry:
    """A registry whose gauges and counters are read from the hub and the dashboard at
    every scrape."""
    registry = Registry()
    clients = registry.gauge(
        "kakuremichi_control_connected_clients",
        "Gateways and agents connected to the hub, by kind.",
        ("kind",),
    )
    reports = registry.counter(
        "kakuremichi_control_stats_reports_total",
        "stats frames taken from gateways and agents since start.",
    )
    logins = registry.counter(
        "kakuremichi_control_dashboard_logins_total",
        "Dashboard sign-ins since start, by result (ok, failed, limited).",
        ("result",),
    )
    streams = registry.gauge(
        "kakuremichi_control_dashboard_streams",
        "Open live-update streams (dashboard pages).",
    )
    events = registry.counter(
        "kakuremichi_control_events_published_total",
        "Events published to the dashboard since start (presence, health, traffic, change).",
    )

    def catch_up(counter: Counter, total: float, **labels: str) -> None:
        # the counts live where they happen; a scrape moves the counter up to them
        counter.inc(max(0.0, total - counter.get(**labels)), **labels)

    def collect() -> None:
        for kind in ("agent", "gateway"):
            clients.set(len(hub.connected(kind)), kind=kind)
        catch_up(reports, hub.traffic.reports)
        for result, count in dashboard.logins.items():
            catch_up(logins, count, result=result)
        streams.set(len(hub.events))
        catch_up(events, hub.events.published)

    registry.add_collector(collect)
    return registry
