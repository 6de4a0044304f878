"""Prometheus metrics for the gateway, the agent and Control: our fast families, exposed
through ``prometheus_client``.

Theory of operation
-------------------
A ``Registry`` holds metric families (counter, gauge, histogram), each with a fixed
tuple of label names and one child per label-value tuple.  Updates are plain dict
operations on the event loop (no locks: everything runs in one thread), so the data
path's per-request cost is a dict update, not ``prometheus_client``'s locked value
objects.  ``render()`` first runs the registered collectors (callbacks that refresh
gauges from live state, e.g. WireGuard peers), then hands the families to
``prometheus_client`` through :class:`RegistryCollector` (a custom collector that reads
the values at scrape time), together with its ``process_*`` and ``python_info``
collectors and ``kakuremichi_build_info``; ``prometheus_client`` writes the text
exposition (0.0.4) with its escaping.

``Metrics`` is the gateway's own set of families.  The data path calls its small
methods; the lead's WireGuard backends call ``set_wireguard_peer`` (or register a
collector and use ``registry`` directly for anything new).

Label cardinality is bounded by the tunnel table: requests that match no tunnel are
counted under ``tunnel=""`` and ``domain=""``, never under the attacker-chosen Host.
"""

from __future__ import annotations

import logging
import math
import platform
from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from common import __version__

log = logging.getLogger(__name__)

#: what generate_latest writes (the classic text format; names escaped to underscores)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

LabelValues = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_value(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Family:
    kind = ""

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)

    def _key(self, labels: dict[str, str]) -> LabelValues:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {sorted(labels)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def header(self) -> list[str]:
        help_text = self.help.replace("\\", "\\\\").replace("\n", "\\n")
        return [f"# HELP {self.name} {help_text}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> list[str]:
        raise NotImplementedError


class Counter(_Family):
    """A monotonically increasing count per label set."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labelnames)
        self._values: dict[LabelValues, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def items(self) -> list[tuple[LabelValues, float]]:
        """Every label-value tuple (in ``labelnames`` order) and its count."""
        return list(self._values.items())

    def child(self, **labels: str) -> Callable[[float], None]:
        """An ``inc`` bound to one label set, its key built once (for hot paths)."""
        key = self._key(labels)
        values = self._values

        def inc(amount: float = 1.0) -> None:
            values[key] = values.get(key, 0.0) + amount

        return inc

    def samples(self) -> list[str]:
        return [
            f"{self.name}{_labels(self.labelnames, k)} {_format_value(v)}"
            for k, v in sorted(self._values.items())
        ]


class Gauge(_Family):
    """A value that goes up and down per label set."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labelnames)
        self._values: dict[LabelValues, float] = {}

    def set(self, value: float, **labels: str) -> None:
        self._values[self._key(labels)] = float(value)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount

    def dec(self, amount: float = 1.0, **labels: str) -> None:
        self.inc(-amount, **labels)

    def get(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def remove(self, **labels: str) -> None:
        self._values.pop(self._key(labels), None)

    def clear(self) -> None:
        self._values.clear()

    def items(self) -> list[tuple[LabelValues, float]]:
        """Every label-value tuple (in ``labelnames`` order) and its value."""
        return list(self._values.items())

    def samples(self) -> list[str]:
        return [
            f"{self.name}{_labels(self.labelnames, k)} {_format_value(v)}"
            for k, v in sorted(self._values.items())
        ]


class Histogram(_Family):
    """Cumulative buckets, sum and count per label set."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str] = (),
        buckets: Iterable[float] = DEFAULT_BUCKETS,
    ) -> None:
        super().__init__(name, help_text, labelnames)
        bounds = sorted(float(b) for b in buckets if not math.isinf(b))
        self.bounds = (*bounds, math.inf)
        self._counts: dict[LabelValues, list[int]] = {}
        self._sums: dict[LabelValues, float] = {}

    def observe(self, value: float, **labels: str) -> None:
        self.observe_key(self._key(labels), value)

    def key(self, **labels: str) -> LabelValues:
        """The label key of one label set, for ``observe_key`` on a hot path."""
        return self._key(labels)

    def observe_key(self, key: LabelValues, value: float) -> None:
        counts = self._counts.get(key)
        if counts is None:
            counts = self._counts[key] = [0] * len(self.bounds)
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                counts[i] += 1
                break
        self._sums[key] = self._sums.get(key, 0.0) + value

    def count(self, **labels: str) -> int:
        return sum(self._counts.get(self._key(labels), ()))

    def series(self) -> list[tuple[LabelValues, list[tuple[str, float]], float]]:
        """Per label set: cumulative ``(le, count)`` buckets and the sum."""
        out = []
        for key, counts in sorted(self._counts.items()):
            running = 0
            buckets = []
            for bound, n in zip(self.bounds, counts, strict=True):
                running += n
                buckets.append((_format_value(bound), float(running)))
            out.append((key, buckets, self._sums[key]))
        return out

    def samples(self) -> list[str]:
        lines = []
        for key, counts in sorted(self._counts.items()):
            running = 0
            for bound, n in zip(self.bounds, counts, strict=True):
                running += n
                le = f'le="{_format_value(bound)}"'
                lines.append(f"{self.name}_bucket{_labels(self.labelnames, key, le)} {running}")
            labels = _labels(self.labelnames, key)
            lines.append(f"{self.name}_sum{labels} {_format_value(self._sums[key])}")
            lines.append(f"{self.name}_count{labels} {running}")
        return lines


class Registry:
    """A set of metric families plus scrape-time collectors."""

    def __init__(self) -> None:
        self._families: dict[str, _Family] = {}
        self._collectors: list[Callable[[], None]] = []
        self._exposition: CollectorRegistry | None = None

    def _add(self, family: _Family) -> None:
        if family.name in self._families:
            raise ValueError(f"metric {family.name} already registered")
        self._families[family.name] = family

    def counter(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Counter:
        family = Counter(name, help_text, labelnames)
        self._add(family)
        return family

    def gauge(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Gauge:
        family = Gauge(name, help_text, labelnames)
        self._add(family)
        return family

    def histogram(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str] = (),
        buckets: Iterable[float] = DEFAULT_BUCKETS,
    ) -> Histogram:
        family = Histogram(name, help_text, labelnames, buckets)
        self._add(family)
        return family

    def add_collector(self, collector: Callable[[], None]) -> None:
        """Run ``collector()`` before every scrape (to refresh gauges from live state)."""
        self._collectors.append(collector)

    def refresh(self) -> None:
        """Run the collectors (a failing one is logged; the others still run)."""
        for collector in list(self._collectors):
            try:
                collector()
            except Exception:
                log.exception("metrics collector failed")

    def families(self) -> list[_Family]:
        return [self._families[name] for name in sorted(self._families)]

    def render(self) -> str:
        """The text exposition of these families plus ``process_*``, ``python_info`` and
        ``kakuremichi_build_info``, written by ``prometheus_client``."""
        self.refresh()
        if self._exposition is None:
            self._exposition = CollectorRegistry(auto_describe=False)
            self._exposition.register(RegistryCollector(self))
            ProcessCollector(registry=self._exposition)
            PlatformCollector(registry=self._exposition)
        return generate_latest(self._exposition).decode()

    def render_plain(self) -> str:
        """Only these families, in our own writer (tests compare it with the above)."""
        self.refresh()
        lines: list[str] = []
        for family in self.families():
            lines.extend(family.header())
            lines.extend(family.samples())
        return "\n".join(lines) + "\n"


def build_info() -> GaugeMetricFamily:
    """``kakuremichi_build_info{version, python}`` 1, as Prometheus conventions have it."""
    family = GaugeMetricFamily(
        "kakuremichi_build_info",
        "kakuremichi's version and the Python it runs on; always 1.",
        labels=("version", "python"),
    )
    family.add_metric((__version__, platform.python_version()), 1.0)
    return family


class RegistryCollector:
    """A ``prometheus_client`` collector reading a :class:`Registry` at scrape time."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        yield build_info()
        for family in self.registry.families():
            labels = list(family.labelnames)
            if isinstance(family, Counter):
                counter = CounterMetricFamily(family.name, family.help, labels=labels)
                for key, value in sorted(family.items()):
                    counter.add_metric(list(key), value)
                yield counter
            elif isinstance(family, Gauge):
                gauge = GaugeMetricFamily(family.name, family.help, labels=labels)
                for key, value in sorted(family.items()):
                    gauge.add_metric(list(key), value)
                yield gauge
            elif isinstance(family, Histogram):
                histogram = HistogramMetricFamily(family.name, family.help, labels=labels)
                for key, buckets, total in family.series():
                    histogram.add_metric(list(key), buckets, total)
                yield histogram


#: bound label keys kept for request_done (cleared when full: tunnels come and go)
_MAX_BOUND_KEYS = 4096


class Metrics:
    """The data path's metric families (gateway and agent) and the calls made on them."""

    def __init__(self, registry: Registry | None = None) -> None:
        self.registry = registry if registry is not None else Registry()
        r = self.registry
        self.requests = r.counter(
            "kakuremichi_http_requests_total",
            "HTTP requests answered, by tunnel, domain and status code.",
            ("tunnel", "domain", "code"),
        )
        self.request_bytes = r.counter(
            "kakuremichi_http_request_body_bytes_total",
            "Request body bytes received from clients, by tunnel.",
            ("tunnel",),
        )
        self.response_bytes = r.counter(
            "kakuremichi_http_response_body_bytes_total",
            "Response body bytes sent to clients, by tunnel.",
            ("tunnel",),
        )
        self.latency = r.histogram(
            "kakuremichi_http_request_duration_seconds",
            "Time from complete request headers to the end of the response, by tunnel.",
            ("tunnel",),
        )
        self.active_connections = r.gauge(
            "kakuremichi_active_connections",
            "Open client connections, by listener kind (http, https, tcp, websocket).",
            ("listener",),
        )
        self.rejected = r.counter(
            "kakuremichi_rejected_total",
            "Requests or connections refused by a protection limit, by reason.",
            ("reason",),
        )
        self.upstream_errors = r.counter(
            "kakuremichi_upstream_errors_total",
            "Failures reaching or reading from an agent, by tunnel and kind.",
            ("tunnel", "kind"),
        )
        self.upstream_connections = r.counter(
            "kakuremichi_upstream_connections_total",
            "Connections to agents taken for a request, by result (dialed, reused).",
            ("result",),
        )
        self.listener_bind_errors = r.gauge(
            "kakuremichi_listener_bind_errors",
            "Raw tunnel ports that could not be bound (retried), by protocol.",
            ("protocol",),
        )
        self.tcp_connections = r.counter(
            "kakuremichi_tcp_connections_total",
            "Raw TCP tunnel connections accepted, by tunnel.",
            ("tunnel",),
        )
        self.tcp_bytes = r.counter(
            "kakuremichi_tcp_bytes_total",
            "Raw TCP tunnel bytes, by tunnel and direction (in = from client).",
            ("tunnel", "direction"),
        )
        self.http_tunnel_connections = r.counter(
            "kakuremichi_http_tunnel_connections_total",
            "Connections of HTTP tunnels spliced to their local target (agent), by tunnel.",
            ("tunnel",),
        )
        self.http_tunnel_bytes = r.counter(
            "kakuremichi_http_tunnel_bytes_total",
            "Bytes of HTTP tunnels spliced at the agent, by tunnel and direction "
            "(in = towards the local target).",
            ("tunnel", "direction"),
        )
        self.udp_bytes = r.counter(
            "kakuremichi_udp_bytes_total",
            "Raw UDP tunnel payload bytes, by tunnel and direction (in = from client).",
            ("tunnel", "direction"),
        )
        self.udp_flows = r.gauge(
            "kakuremichi_udp_flows",
            "Open UDP flows (client address -> agent), by tunnel.",
            ("tunnel",),
        )
        self.wireguard_handshake_age = r.gauge(
            "kakuremichi_wireguard_last_handshake_age_seconds",
            "Seconds since the last WireGuard handshake with each agent (+Inf if never).",
            ("agent",),
        )
        self.wireguard_bytes = r.counter(
            "kakuremichi_wireguard_bytes_total",
            "WireGuard transport bytes per agent and direction (rx, tx).",
            ("agent", "direction"),
        )
        self.replica_state = r.gauge(
            "kakuremichi_replica_state",
            "1 for the state each replica of a replicated tunnel is in (healthy, ejected, "
            "standby, draining, unhealthy, offline), by tunnel and agent.",
            ("tunnel", "agent", "state"),
        )
        self.replica_ejections = r.counter(
            "kakuremichi_replica_ejections_total",
            "Replicas taken out for a back-off after a failed dial or a reset before any "
            "answer, by tunnel and agent.",
            ("tunnel", "agent"),
        )
        self.replica_retries = r.counter(
            "kakuremichi_replica_retries_total",
            "Requests, connections or flows sent to another replica than first chosen, by "
            "tunnel and reason (replica_failed, replica_unavailable).",
            ("tunnel", "reason"),
        )
        # counters for WireGuard are fed from absolute readings; keep the last ones
        self._wg_last: dict[tuple[str, str], float] = {}
        self._request_keys: dict[
            tuple[str, str, int], tuple[Callable[[float], None], LabelValues]
        ] = {}
        self._response_bytes: dict[str, Callable[[float], None]] = {}
        #: ``upstream_connections`` of a reused connection, bound once
        self.upstream_reused = self.upstream_connections.child(result="reused")

    # -- data path -------------------------------------------------------------------

    def request_done(self, tunnel: str, domain: str, status: int, seconds: float | None) -> None:
        # once per request: the label keys are built once per (tunnel, domain, status)
        bound = self._request_keys.get((tunnel, domain, status))
        if bound is None:
            if len(self._request_keys) >= _MAX_BOUND_KEYS:
                self._request_keys.clear()
            bound = (
                self.requests.child(tunnel=tunnel, domain=domain, code=str(status)),
                self.latency.key(tunnel=tunnel),
            )
            self._request_keys[(tunnel, domain, status)] = bound
        bound[0](1.0)
        if seconds is not None:
            self.latency.observe_key(bound[1], seconds)

    def response_bytes_for(self, tunnel: str) -> Callable[[float], None]:
        """``response_bytes.inc`` bound to one tunnel (its key built once per tunnel)."""
        bound = self._response_bytes.get(tunnel)
        if bound is None:
            if len(self._response_bytes) >= _MAX_BOUND_KEYS:
                self._response_bytes.clear()
            bound = self._response_bytes[tunnel] = self.response_bytes.child(tunnel=tunnel)
        return bound

    def connection_opened(self, listener: str) -> None:
        self.active_connections.inc(listener=listener)

    def connection_closed(self, listener: str) -> None:
        self.active_connections.dec(listener=listener)

    def watch_replicas(self, states: Callable[[], Iterable[tuple[str, str, str]]]) -> None:
        """Refresh ``replica_state`` at every scrape from ``states()``: (tunnel, agent,
        state) of every replica (``common.relay.balance.Balancer.states``)."""

        def collect() -> None:
            self.replica_state.clear()
            for tunnel, agent, state in states():
                self.replica_state.set(1.0, tunnel=tunnel, agent=agent, state=state)

        self.registry.add_collector(collect)

    # -- WireGuard (fed by the gateway's backend) ------------------------------------

    def set_wireguard_peer(
        self, agent_id: str, handshake_age: float | None, rx_bytes: int, tx_bytes: int
    ) -> None:
        """Record a reading of one agent peer: handshake age (None = never) and totals.

        Byte totals are absolute interface counters; a reading lower than the previous
        one (interface recreated) restarts the delta from zero.
        """
        self.wireguard_handshake_age.set(
            math.inf if handshake_age is None else handshake_age, agent=agent_id
        )
        for direction, total in (("rx", rx_bytes), ("tx", tx_bytes)):
            last = self._wg_last.get((agent_id, direction), 0.0)
            delta = total - last if total >= last else total
            self._wg_last[(agent_id, direction)] = float(total)
            if delta > 0:
                self.wireguard_bytes.inc(delta, agent=agent_id, direction=direction)

    def forget_wireguard_peer(self, agent_id: str) -> None:
        self.wireguard_handshake_age.remove(agent=agent_id)
        self._wg_last.pop((agent_id, "rx"), None)
        self._wg_last.pop((agent_id, "tx"), None)

    def tunnel_totals(self) -> dict[str, tuple[int, int, int, int]]:
        """Per tunnel since start: (requests, errors, bytes in, bytes out), what Control's
        dashboard charts (``common.protocol.Stats``).  Requests are HTTP answers or raw
        TCP connections; errors the 5xx answers, or for raw tunnels the failures to
        reach the agent (whichever is larger: a failed HTTP dial is also a 502);
        bytes are bodies and raw payloads, in = from clients.  Requests that matched no
        tunnel (``tunnel=""``) are left out."""
        totals: dict[str, list[int]] = {}

        def add(tunnel: str, index: int, amount: float) -> None:
            if tunnel:
                totals.setdefault(tunnel, [0, 0, 0, 0, 0])[index] += int(amount)

        for (tunnel, _domain, code), n in self.requests.items():
            add(tunnel, 0, n)
            if code.isdigit() and int(code) >= 500:
                add(tunnel, 1, n)
        for (tunnel,), n in self.tcp_connections.items():
            add(tunnel, 0, n)
        for (tunnel, _kind), n in self.upstream_errors.items():
            add(tunnel, 4, n)
        for (tunnel,), n in self.request_bytes.items():
            add(tunnel, 2, n)
        for (tunnel,), n in self.response_bytes.items():
            add(tunnel, 3, n)
        for family in (self.tcp_bytes, self.udp_bytes):
            for (tunnel, direction), n in family.items():
                add(tunnel, 2 if direction == "in" else 3, n)
        return {t: (v[0], max(v[1], v[4]), v[2], v[3]) for t, v in totals.items()}

    def render(self) -> str:
        return self.registry.render()
