from __future__ import annotations

import asyncio
import time
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from gated.site.metrics import Metrics
from gated.site.store import connect

from .helpers import BARRIER, DOOR, RESIDENT, FakeActuator

METRICS = """
[metrics]
listen = "127.0.0.1:0"
"""

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def base(running: Any) -> str:
    host, port = running.daemon.metrics_listening[0]
    return f"http://{host}:{port}"


async def scrape(running: Any) -> Samples:
    async with running.session.get(f"{base(running)}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await response.text()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def health(running: Any) -> tuple[int, str]:
    async with running.session.get(f"{base(running)}/healthz") as response:
        return response.status, await response.text()


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def test_answers_latency_and_failures_are_counted(start_daemon: Any) -> None:
    """Each answer is counted by status and reason; opens feed the histogram or failures."""
    running = await start_daemon(METRICS, actuators={"door": FakeActuator("door", fail=True)})
    assert await running.get(code="471123", did=BARRIER, callerid=RESIDENT) == (
        200, "status=ACK&callername=Welcome&destination=201")
    assert await running.get(code="", did=BARRIER, callerid=RESIDENT) == (200, "status=ACK")
    assert (await running.get(code="000000", did=BARRIER, callerid="0687654321"))[1] == "status=NAK"
    assert (await running.get(code="471123", did=DOOR, callerid=RESIDENT))[1] == "status=ERR"
    samples = await scrape(running)
    assert value(samples, "gated_answers_total", status="ACK", reason="granted_code") == 1
    assert value(samples, "gated_answers_total", status="ACK", reason="granted_caller") == 1
    assert value(samples, "gated_answers_total", status="NAK", reason="unknown_code") == 1
    assert value(samples, "gated_answers_total", status="ERR", reason="granted_code") == 1
    assert value(samples, "gated_open_latency_seconds_count", gate="barrier") == 2
    assert value(samples, "gated_open_latency_seconds_count", gate="door") is None
    assert value(samples, "gated_actuator_failures_total", gate="door",
                 result="actuator_failed") == 1
    assert value(samples, "gated_entries_buffered") == 0
    assert value(samples, "gated_store_healthy") == 1
    assert value(samples, "gated_info", version="0.1.0") == 1
    # No [mqtt]: no connection gauge to raise a false alarm.
    assert not any(name == "gated_mqtt_connected" for name, _ in samples)


async def test_lockouts_are_counted_and_shown(start_daemon: Any) -> None:
    """A caller locked after five wrong codes shows as a lockout and a locked caller."""
    running = await start_daemon(METRICS)
    for guess in range(5):
        await running.get(code=f"10000{guess}", did=BARRIER, callerid="0687654321")
    assert (await running.get(code="471123", did=BARRIER, callerid="0687654321"))[1] == (
        "status=NAK")
    samples = await scrape(running)
    assert value(samples, "gated_lockouts_total", kind="caller_locked") == 1
    assert value(samples, "gated_callers_locked") == 1
    assert value(samples, "gated_site_locked") == 0
    assert value(samples, "gated_answers_total", status="NAK", reason="locked_out") == 1


async def test_sensor_alarms_and_position_are_exported(start_daemon: Any) -> None:
    """A forced_open alarm is counted and the gate reads open."""
    running = await start_daemon(METRICS + """
        [gates.barrier.sensor]
        type = "mock"
        pin = 22
        open_when = "contact_closed"
        bounce = 0
        """)
    assert value(await scrape(running), "gated_gate_open", gate="barrier") == 0
    running.pin(22).drive_low()
    # Generous: the alarm is counted once its entry is written, and a busy
    # machine's fsync can take most of a second.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        samples = await scrape(running)
        if value(samples, "gated_alarms_total", gate="barrier", alarm="forced_open"):
            break
        await asyncio.sleep(0.02)
    assert value(samples, "gated_alarms_total", gate="barrier", alarm="forced_open") == 1
    assert value(samples, "gated_gate_open", gate="barrier") == 1
    # An alarm is not an answer to anyone.
    assert not any(name == "gated_answers_total" for name, _ in samples)


async def test_healthz_reports_a_failing_store_and_its_recovery(start_daemon: Any) -> None:
    """/healthz is 503 with the reason while entries pile up in memory, 200 once written."""
    # A short deadline: while the store fails, each answer waits it out.
    running = await start_daemon(METRICS, deadline=0.5)
    assert await health(running) == (200, "ok\n")
    store = running.daemon.gatekeeper.store
    store._conn.close()  # every write now fails inside SQLite
    assert await running.get(code="", did=BARRIER, callerid=RESIDENT) == (200, "status=ACK")
    assert await health(running) == (503, "entry store failing: 1 entries held in memory\n")
    samples = await scrape(running)
    assert value(samples, "gated_entries_buffered") == 1
    assert value(samples, "gated_store_healthy") == 0
    store._conn = connect(store.path)
    assert await store.flush()
    assert await health(running) == (200, "ok\n")


async def test_healthz_fails_when_the_webhook_stops_listening(start_daemon: Any) -> None:
    """With the webhook socket closed, the monitor hears 503 and why."""
    running = await start_daemon(METRICS)
    await running.daemon._webhook.stop()
    assert await health(running) == (503, "webhook not listening\n")


async def test_metrics_are_not_served_on_the_webhook_port(start_daemon: Any) -> None:
    """The webhook's port has no /metrics or /healthz."""
    running = await start_daemon(METRICS)
    webhook = running.url.rsplit("/", 1)[0]
    for path in ("/metrics", "/healthz"):
        async with running.session.get(webhook + path) as response:
            assert response.status == 404
    assert running.daemon.metrics_listening[0] != running.daemon.listening[0]


def test_each_daemon_has_its_own_registry() -> None:
    """Two Metrics in one process neither clash nor share counts."""
    first, second = Metrics(), Metrics(mqtt=True)
    first.answers.labels("ACK", "granted_code").inc()
    second.mqtt_connected.set(1)
    assert b'gated_answers_total{reason="granted_code",status="ACK"} 1.0' in first.render()
    assert b"gated_answers_total{" not in second.render()
    assert b"gated_mqtt_connected 1.0" in second.render()
    assert b"gated_mqtt_connected" not in first.render()
