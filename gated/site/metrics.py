"""Prometheus metrics and the health check, served on ``[metrics] listen`` only.

Counters are fed from the gatekeeper's entry and lock listeners, so every
call path (webhook, remote open, sensor alarm) is counted the same way.
Values that already live elsewhere (entries buffered, locks in force, gate
position) are read at scrape time instead of being copied. Each daemon has its
own registry: tests run several daemons in one process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gated import __version__
from gated.core.lockout import SITE, LockEvent
from gated.site.sockets import name_no_server
from gated.site.store import Entry

if TYPE_CHECKING:
    from gated.site.gatekeeper import Gatekeeper
    from gated.site.sensor import GateSensor

# From a fast relay (a few ms) to the slowest confirmation a deadline allows.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0)
TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"

# A health check: None when healthy, else what is wrong.
HealthCheck = Callable[[], str | None]


class _Named(Protocol):
    @property
    def name(self) -> str: ...


class _Clock(Protocol):
    def now(self) -> float: ...


class Forwards(Protocol):
    """What the metrics read of the forwarder (``gated.forward.sender.Forwarder``)."""

    @property
    def endpoints(self) -> Sequence[_Named]: ...
    @property
    def clock(self) -> _Clock: ...
    @property
    def delivered(self) -> Mapping[str, int]: ...
    @property
    def rejected(self) -> Mapping[str, int]: ...
    @property
    def expired(self) -> Mapping[str, int]: ...
    @property
    def pending(self) -> Mapping[str, tuple[int, float | None]]: ...


METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
HEALTH: web.AppKey[HealthCheck] = web.AppKey("health")


class Metrics:
    def __init__(self, *, mqtt: bool = False) -> None:
        registry = self.registry = CollectorRegistry()
        self.answers = Counter(
            "gated_answers", "Calls answered, by status (ACK/NAK/ERR) and reason",
            ["status", "reason"], registry=registry)
        self.open_latency = Histogram(
            "gated_open_latency_seconds",
            "From a call arriving to its open command issued (or confirmed by the sensor)",
            ["gate"], buckets=LATENCY_BUCKETS, registry=registry)
        self.actuator_failures = Counter(
            "gated_actuator_failures", "Opens decided but not carried out, by result",
            ["gate", "result"], registry=registry)
        self.lockouts = Counter(
            "gated_lockouts", "Locks begun, per caller (caller_locked) or site-wide (site_locked)",
            ["kind"], registry=registry)
        self.alarms = Counter(
            "gated_alarms", "Gate-position alarms (held_open, forced_open)",
            ["gate", "alarm"], registry=registry)
        # Set by the MQTT connection; only exported when [mqtt] is configured,
        # so a site without a broker shows no false "disconnected".
        self.mqtt_connected = Gauge(
            "gated_mqtt_connected", "1 while connected to the MQTT broker",
            registry=registry if mqtt else None)
        Gauge("gated_info", "The running version", ["version"],
              registry=registry).labels(__version__).set(1)

    def entry(self, entry: Entry) -> None:
        """An entry listener: count what the entry says happened."""
        if entry.source == "sensor":
            self.alarms.labels(entry.gate or "", entry.reason).inc()
            return
        self.answers.labels(entry.status, entry.reason).inc()
        if not entry.actuator or entry.gate is None:
            return  # nothing was to be opened
        if entry.status == "ACK":
            self.open_latency.labels(entry.gate).observe(entry.latency_ms / 1000)
        else:
            self.actuator_failures.labels(entry.gate, entry.actuator).inc()

    def lock(self, event: LockEvent) -> None:
        """A lock listener."""
        self.lockouts.labels(event.kind).inc()

    def watch(self, gatekeeper: Gatekeeper, sensors: Mapping[str, GateSensor]) -> None:
        """Export the store's, the lockout's and the sensors' state at scrape time."""
        self.registry.register(_StateCollector(gatekeeper, sensors))

    def watch_forwards(self, forwarder: Forwards) -> None:
        """Export each [[forward]] endpoint's queue at scrape time."""
        self.registry.register(_ForwardCollector(forwarder))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    def __init__(self, gatekeeper: Gatekeeper, sensors: Mapping[str, GateSensor]) -> None:
        self._gatekeeper = gatekeeper
        self._sensors = sensors

    def collect(self) -> Iterator[Metric]:
        gatekeeper = self._gatekeeper
        store = gatekeeper.store
        yield GaugeMetricFamily("gated_entries_buffered",
                                "Entries held in memory, not yet written to the store",
                                value=store.buffered)
        yield CounterMetricFamily("gated_entries_dropped",
                                  "Entries lost because the store failed and the buffer was full",
                                  value=store.dropped)
        yield GaugeMetricFamily("gated_store_healthy", "1 while the entry store accepts writes",
                                value=int(store.healthy))
        now = gatekeeper.clock.now()
        lockout = gatekeeper.ledger.lockout
        yield GaugeMetricFamily("gated_site_locked", "1 while code entry is locked site-wide",
                                value=int(lockout.site_locked(now)))
        yield GaugeMetricFamily(
            "gated_callers_locked", "Caller numbers locked out now",
            # The announced locks, not a scan of up to 50,000 callers per scrape.
            value=sum(1 for key in lockout.announced if key != SITE
                      and lockout.caller_locked(key, now)))
        position = GaugeMetricFamily("gated_gate_open", "1 while the gate's sensor reads open",
                                     labels=["gate"])
        for name, sensor in sorted(self._sensors.items()):
            position.add_metric([name], int(sensor.is_open))
        yield position


class _ForwardCollector(Collector):
    def __init__(self, forwarder: Forwards) -> None:
        self._forwarder = forwarder

    def collect(self) -> Iterator[Metric]:
        forwarder = self._forwarder
        names = [e.name for e in forwarder.endpoints]
        for metric, helptext, counts in (
                ("gated_forward_delivered", "Forwards delivered, per endpoint",
                 forwarder.delivered),
                ("gated_forward_rejected", "Forwards the endpoint refused (kept; see "
                 "gated forward ls)", forwarder.rejected),
                ("gated_forward_expired", "Forwards dropped after give_up_after",
                 forwarder.expired)):
            family = CounterMetricFamily(metric, helptext, labels=["endpoint"])
            for name in names:
                family.add_metric([name], counts[name])
            yield family
        pending = GaugeMetricFamily("gated_forward_pending", "Forwards waiting to be sent",
                                    labels=["endpoint"])
        age = GaugeMetricFamily("gated_forward_oldest_pending_seconds",
                                "Age of the oldest forward waiting to be sent (0: none)",
                                labels=["endpoint"])
        now = forwarder.clock.now()
        for name in names:
            count, oldest = forwarder.pending.get(name, (0, None))
            pending.add_metric([name], count)
            age.add_metric([name], max(now - oldest, 0.0) if oldest is not None else 0.0)
        yield pending
        yield age


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": TEXT_FORMAT})


async def _healthz(request: web.Request) -> web.Response:
    problem = request.app[HEALTH]()
    if problem is None:
        return web.Response(text="ok\n", content_type="text/plain")
    return web.Response(text=f"{problem}\n", status=503, content_type="text/plain")


def make_metrics_app(metrics: Metrics, health: HealthCheck) -> web.Application:
    """/metrics and /healthz: never on the webhook's address."""
    app = web.Application()
    name_no_server(app)
    app[METRICS] = metrics
    app[HEALTH] = health
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    return app
