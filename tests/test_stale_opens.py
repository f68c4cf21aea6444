"""A remote open is never late: one that cannot show it was sent within the answer
deadline (a time in its payload, or a short MQTT 5 message expiry) opens nothing and
is recorded ``stale``, however it got held up (a bridge's queue, a broker's)."""

from __future__ import annotations

from typing import Any

from structlog.testing import capture_logs

from .broker import (
    Mosquitto,
    Probe,
    entries,
    eventually,
    mqtt_ready,
    mqtt_table,
    open_payload,
    states,
)
from .helpers import FakeClock

PREFIX = "gated/test"
OPEN = f"{PREFIX}/gates/barrier/open"

at = open_payload


async def _each_recorded(running: Any, probe: Probe, payloads: list[bytes], *,
                         expiry: int | None = None) -> list[tuple[Any, ...]]:
    """Publish the payloads one by one, each once the previous one is recorded; what
    each entry and its event say."""
    for count, payload in enumerate(payloads, 1):
        await probe.publish(OPEN, payload, expiry=expiry)
        await probe.wait_for(f"{PREFIX}/events", count)
    found = [(e.gate, e.status, e.reason, e.source, e.actuator) for e in entries(running)]
    published = [(m.json()["gate"], m.json()["status"], m.json()["reason"], m.json()["source"],
                  m.json()["actuator"]) for m in probe.on(f"{PREFIX}/events")]
    assert published == found
    return found


async def test_a_remote_open_sent_within_the_answer_deadline_opens(
        broker: Mosquitto, probe: Probe, start_daemon: Any) -> None:
    """{"at": <unix time>} opens when it is no older than the answer deadline (3 s here)
    and at most 2 s ahead of the site's clock: an int, a float, both edges."""
    clock = FakeClock()
    await probe.subscribe(f"{PREFIX}/events")
    running = await start_daemon(mqtt_table(broker), pulse=0.05, clock=clock)
    await mqtt_ready(running)
    barrier = running.pin(17)
    now = clock.now()
    opens = [at(now), at(int(now) - 3), at(now + 2.0), b' { "at" : %d } ' % int(now)]
    for count, payload in enumerate(opens, 1):
        await probe.publish(OPEN, payload)
        await probe.wait_for(f"{PREFIX}/events", count)
        await eventually(lambda: not barrier.state)
    assert states(barrier) == [False, *[True, False] * len(opens)]
    assert [(e.gate, e.status, e.reason, e.source, e.actuator) for e in entries(running)] == [
        ("barrier", "ACK", "granted_remote", "mqtt", "pulsed")] * len(opens)


async def test_a_remote_open_that_cannot_show_it_is_not_late_opens_nothing(
        broker: Mosquitto, probe: Probe, start_daemon: Any) -> None:
    """Older than the deadline, from the future, no time at all (the old plain `open`),
    a bad time or no JSON: nothing opens, each is a refused entry `stale` (source mqtt,
    published as an event), and the log line says which it was."""
    clock = FakeClock()
    await probe.subscribe(f"{PREFIX}/events")
    running = await start_daemon(mqtt_table(broker), pulse=0.05, clock=clock)
    await mqtt_ready(running)
    now = clock.now()
    refused = [
        at(now - 3.01), at(now - 62), at(now + 2.01), at(now + 3600),
        b"open", b'{"at": "now"}', b'{"at": true}', b'{"at": NaN}', b'{"at": 1e999}',
        b'{"when": 1}', b"[1790000000]", b'{"at": ' + b"9" * 500 + b"}", b"{not json",
        b"\xff\xfe",
    ]
    with capture_logs() as logs:
        found = await _each_recorded(running, probe, refused)
    assert states(running.pin(17)) == [False]
    assert found == [("barrier", "NAK", "stale", "mqtt", "")] * len(refused)
    why = [line["why"] for line in logs if line["event"].startswith("remote open refused")]
    assert why == ["too old"] * 2 + ["in the future"] * 2 + ["no time"] * 10
    # Still a remote open like any other once it is fresh.
    await probe.publish(OPEN, at(clock.now()))
    await eventually(lambda: len(states(running.pin(17))) == 3)
    await eventually(lambda: len(entries(running)) == len(refused) + 1)
    assert entries(running)[-1].reason == "granted_remote"


async def test_an_mqtt5_open_with_a_message_expiry_within_the_deadline_opens(
        broker: Mosquitto, start_daemon: Any) -> None:
    """No time in the payload, but an MQTT 5 expiry of at most the answer deadline
    (rounded up to whole seconds: 3 s here) bounds its age: it opens. A longer expiry
    does not, and neither does a short one on a payload whose own time is too old."""
    clock = FakeClock()
    probe = await Probe(broker.port, mqtt5=True).connect()
    try:
        await probe.subscribe(f"{PREFIX}/events")
        running = await start_daemon(mqtt_table(broker), pulse=0.05, clock=clock)
        await mqtt_ready(running)
        barrier = running.pin(17)
        await probe.publish(OPEN, b"open", expiry=3)
        await probe.wait_for(f"{PREFIX}/events", 1)
        await eventually(lambda: not barrier.state)
        await probe.publish(OPEN, b"open", expiry=4)
        await probe.wait_for(f"{PREFIX}/events", 2)
        await probe.publish(OPEN, b"open", expiry=3600)
        await probe.wait_for(f"{PREFIX}/events", 3)
        await probe.publish(OPEN, at(clock.now() - 62), expiry=1)
        await probe.wait_for(f"{PREFIX}/events", 4)
        await probe.publish(OPEN, b"open")  # MQTT 5, but no expiry
        await probe.wait_for(f"{PREFIX}/events", 5)
        assert states(barrier) == [False, True, False]
        assert [(e.status, e.reason) for e in entries(running)] == [
            ("ACK", "granted_remote"), ("NAK", "stale"), ("NAK", "stale"), ("NAK", "stale"),
            ("NAK", "stale")]
    finally:
        await probe.disconnect()


async def test_a_remote_open_still_ignores_retained_and_empty_messages(
        broker: Mosquitto, probe: Probe, start_daemon: Any) -> None:
    """A fresh time does not make a retained open count, and an empty message is no
    command: neither opens nor is recorded."""
    clock = FakeClock()
    await probe.publish(OPEN, at(clock.now()), retain=True)
    await probe.subscribe(f"{PREFIX}/events")
    running = await start_daemon(mqtt_table(broker), pulse=0.05, clock=clock)
    await mqtt_ready(running)
    await probe.publish(OPEN, b"", retain=True)
    await probe.publish(OPEN, b"")
    await probe.publish(OPEN, b"open")  # recorded: everything before it was not
    await probe.wait_for(f"{PREFIX}/events", 1)
    assert states(running.pin(17)) == [False]
    assert [e.reason for e in entries(running)] == ["stale"]
