"""Forwarding (DESIGN.md §12) against a real HTTP receiver on a free port."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import sqlite3
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import stamina
from standardwebhooks.webhooks import Webhook
from structlog.testing import capture_logs

from gated.book import compiler, sitekey
from gated.cli import main
from gated.core.errors import ConfigError
from gated.forward.endpoints import pseudonym

from .forwarding import (
    API_SECRET,
    SECRET,
    Receiver,
    forward_table,
    ga4_url,
    headers_of,
)
from .helpers import BARRIER, DOOR, RESIDENT, TOKEN, FakeClock, write_config
from .process import DaemonProcess, free_port
from .test_cli_codes import LOG_LINE

OTHER = "+31687654321"
CALLS = 20
METRICS = '\n[metrics]\nlisten = "127.0.0.1:0"\n'


@pytest.fixture(autouse=True)
def fast_retries() -> Iterator[None]:
    """No backoff between attempts, a few attempts per round."""
    with stamina.set_testing(True, attempts=3):
        yield


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    server = Receiver()
    yield server
    await server.stop()


def site_key(running: Any) -> bytes:
    key = sitekey.read_key(running.daemon.loaded.key_path)
    assert key is not None
    return key


def outbox(running: Any) -> list[tuple[Any, ...]]:
    path = running.daemon.gatekeeper.store.path
    with sqlite3.connect(path) as conn:
        return conn.execute(
            "SELECT endpoint, state, status, why FROM outbox ORDER BY id").fetchall()


async def until(predicate: Any, within: float = 10.0) -> None:
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 (a store row has no event to await)
            await asyncio.sleep(0.02)


async def test_json_forward_is_the_event_signed_the_standard_webhooks_way(
        start_daemon: Any, receiver: Receiver) -> None:
    """A granted call reaches the receiver as its event plus the site, signed so that the
    standardwebhooks library verifies it, with the caller as a pseudonym and no digits."""
    await receiver.start()
    running = await start_daemon(forward_table(receiver.url))
    with capture_logs() as logs:
        _, text = await running.get(code="471123", did=BARRIER, callerid=RESIDENT)
        assert text.startswith("status=ACK")
        (request,) = await receiver.wait_for(1)
        await until(lambda: not outbox(running))
    headers = headers_of(request)
    assert headers["content-type"] == "application/json"
    event = Webhook(SECRET).verify(request.body, headers)
    assert headers["webhook-id"].startswith("msg_")
    assert event["site"] == "test" and event["gate"] == "barrier"
    assert (event["status"], event["reason"]) == ("ACK", "granted_code")
    assert event["credential"] == "Demo"
    assert event["caller"] == pseudonym(site_key(running), RESIDENT)
    assert event["did"] == BARRIER
    assert RESIDENT not in request.body.decode()  # the entry's own log line names it
    text = request.body.decode() + repr(logs)
    for secret in ("471123", TOKEN, SECRET):
        assert secret not in text


async def test_forward_retried_after_503_keeps_its_webhook_id(
        start_daemon: Any, receiver: Receiver) -> None:
    """503, 503, then 200: three attempts of one row, every one with the same webhook-id
    and a valid signature, delivered once the endpoint takes it."""
    receiver.script = [503, 503]
    await receiver.start()
    running = await start_daemon(forward_table(receiver.url))
    await running.get(code="471123", did=BARRIER, callerid=RESIDENT)
    requests = await receiver.wait_for(3)
    await until(lambda: not outbox(running))
    ids = {headers_of(r)["webhook-id"] for r in requests}
    assert len(ids) == 1
    for request in requests:
        Webhook(SECRET).verify(request.body, headers_of(request))
    assert len({r.body for r in requests}) == 1


async def test_rejected_forward_is_kept_and_the_rows_behind_it_go_on(
        start_daemon: Any, receiver: Receiver, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A 400 is not retried: the row is kept with why, forward_rejected is raised, the next
    call is still delivered; `gated forward retry` sends the kept one again."""
    receiver.script = [400]
    await receiver.start()
    running = await start_daemon(forward_table(receiver.url))
    with capture_logs() as logs:
        await running.get(code="471123", did=BARRIER, callerid=RESIDENT)
        await running.get(code="5555", did=BARRIER, callerid=OTHER)
        await receiver.wait_for(2)
        await until(lambda: outbox(running) == [("crm", "rejected", 400,
                                                 "HTTP 400: bad field: client_id")])
    (alarm,) = [e for e in logs if e.get("alarm") == "forward_rejected"]
    assert alarm["endpoint"] == "crm" and alarm["host"] == "127.0.0.1" and alarm["status"] == 400
    assert json.loads(receiver.requests[1].body)["credential"] == "Barrier only"

    config = str(tmp_path / "gated.toml")
    capsys.readouterr()  # the daemon's own log lines
    assert main(["-c", config, "forward", "ls"]) == 0
    # The daemon shares this stdout: a line of its (the relay's pulse ending) may land here.
    out = [line for line in capsys.readouterr().out.splitlines() if not LOG_LINE.match(line)]
    assert out[0].split() == ["endpoint", "delivered", "pending", "oldest", "pending",
                              "rejected", "expired"]
    assert out[1].split() == ["crm", "1", "0", "-", "1", "0"]
    assert out[2] == "rejected  crm: 1 x HTTP 400: bad field: client_id"
    assert main(["-c", config, "forward", "retry", "crm"]) == 0
    assert "crm: 1 rejected forward(s) queued again" in capsys.readouterr().out
    # The sender polls the store for rows another process queued.
    requests = await receiver.wait_for(3, within=15)
    assert json.loads(requests[2].body)["credential"] == "Demo"
    await until(lambda: not outbox(running))
    assert main(["-c", config, "forward", "retry", "nobody"]) == 2


async def test_pbx_answer_does_not_wait_for_a_hanging_endpoint(
        start_daemon: Any, receiver: Receiver) -> None:
    """With the endpoint hanging far longer than the answer deadline, every call is still
    answered, well before the deadline; the forward stays queued."""
    receiver.hang = True
    await receiver.start()
    running = await start_daemon(forward_table(receiver.url, extra="timeout = 60.0"))
    await running.get(code="471123", did=BARRIER, callerid=RESIDENT)
    await receiver.wait_for(1)  # the sender is now stuck on the first row
    took = []
    for _ in range(10):
        started = time.monotonic()
        status, text = await running.get(code="5555", did=BARRIER, callerid=RESIDENT)
        took.append(time.monotonic() - started)
        assert status == 200 and text.startswith("status=ACK")
    assert max(took) < running.daemon.gatekeeper.deadline
    assert len(outbox(running)) == 11 and len(receiver.requests) == 1


async def test_forwards_queued_while_the_endpoint_is_down_arrive_in_order(
        start_daemon: Any, receiver: Receiver) -> None:
    """Nothing listening: the rows wait, retries are logged by endpoint and host only;
    once the receiver is up they arrive, oldest first."""
    running = await start_daemon(forward_table(ga4_url(receiver), fmt="ga4", caller="number"))
    callers = ["+31612345671", "+31612345672", "+31612345673"]
    with capture_logs() as logs:
        for caller in callers:
            _, text = await running.get(code="5555", did=BARRIER, callerid=caller)
            assert text.startswith("status=ACK")
        await asyncio.sleep(0.3)  # let the sender fail a few rounds
    assert len(outbox(running)) == 3
    retries = [e for e in logs if e["event"] == "forward retrying"]
    assert retries and {tuple(sorted(e)) for e in retries} == {
        ("attempt", "endpoint", "event", "host", "log_level", "why")}
    assert retries[0]["why"] == "unreachable (ClientConnectorError)"
    assert API_SECRET not in repr(logs) and "measurement_id" not in repr(logs)
    await receiver.start()
    requests = await receiver.wait_for(3)
    key = site_key(running)
    assert [json.loads(r.body)["client_id"] for r in requests] == [
        pseudonym(key, caller) for caller in callers]
    await until(lambda: not outbox(running))


async def test_a_changed_forward_waits_for_a_restart(start_daemon: Any, tmp_path: Path,
                                                     receiver: Receiver) -> None:
    """A reload that changes a [[forward]] table is refused and the old one keeps serving."""
    running = await start_daemon(forward_table(receiver.url))
    path = tmp_path / "gated.toml"
    path.write_text(path.read_text().replace('name = "crm"', 'name = "crm2"'))
    with capture_logs() as logs:
        assert await running.daemon.reload() is False
    (refusal,) = [e for e in logs if e.get("changed")]
    assert refusal["changed"] == ["forward"]


async def test_forward_expires_after_give_up_after(start_daemon: Any, receiver: Receiver) -> None:
    """A row the endpoint never took is dropped once give_up_after has passed
    (on the daemon's clock), with the alarm forward_expired."""
    clock = FakeClock(wall=time.time())
    running = await start_daemon(forward_table(receiver.url, extra='give_up_after = "1h"'),
                                 clock=clock)
    with capture_logs() as logs:
        await running.get(code="5555", did=BARRIER, callerid=RESIDENT)
        await asyncio.sleep(0.2)
        assert len(outbox(running)) == 1
        clock.advance(3601)
        await until(lambda: not outbox(running))
        await until(lambda: any(e.get("alarm") == "forward_expired" for e in logs))
    path = running.daemon.gatekeeper.store.path
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT delivered, expired FROM forward_totals").fetchall() == [(0, 1)]


async def test_ga4_body_is_a_measurement_protocol_event(
        start_daemon: Any, receiver: Receiver) -> None:
    """GA4: client_id the caller's pseudonym, timestamp_micros the entry's time, one event
    with called_number, gate, status, reason and route; api_secret only in the URL."""
    await receiver.start()
    running = await start_daemon(forward_table(
        ga4_url(receiver), fmt="ga4", caller="number", extra='event_name = "gate_call"'))
    with capture_logs() as logs:
        await running.get(code="9000", did=BARRIER, callerid=RESIDENT)
        (request,) = await receiver.wait_for(1)
    body = json.loads(request.body)
    path = running.daemon.gatekeeper.store.path
    with sqlite3.connect(path) as conn:
        (when,) = conn.execute("SELECT time FROM entries").fetchone()
    assert body == {
        "client_id": pseudonym(site_key(running), RESIDENT),
        "timestamp_micros": int(when * 1_000_000),
        "events": [{"name": "gate_call", "params": {
            "called_number": BARRIER, "gate": "barrier", "status": "ACK",
            "reason": "granted_route", "route": "Sales"}}],
    }
    assert API_SECRET not in repr(logs) and RESIDENT not in request.body.decode()


async def test_template_renders_the_event_in_a_sandbox(
        start_daemon: Any, receiver: Receiver) -> None:
    """A template sees the event's fields; a field not set and a private attribute
    render empty."""
    await receiver.start()
    body = "{{ gate }}: {{ status }} {{ reason }} [{{ nothing }}] [{{ ''.__class__ }}]"
    running = await start_daemon(forward_table(
        receiver.url, fmt="template", extra=f"body = {json.dumps(body)}"))
    await running.get(code="471123", did=BARRIER, callerid=RESIDENT)
    (request,) = await receiver.wait_for(1)
    assert request.body.decode() == "barrier: ACK granted_code [] []"
    assert headers_of(request)["content-type"] == "text/plain; charset=utf-8"


@pytest.mark.parametrize(("body", "message"), [
    ("{{ ''.__class__.__mro__ }}", "template cannot render a sample entry: SecurityError"),
    ("{{ gate.__class__.__subclasses__() }}", "template cannot render a sample entry"),
    ("{{ gate ", "template line 1: unexpected end of template"),
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
])
def test_template_that_cannot_render_is_a_config_error(tmp_path: Path, body: str,
                                                        message: str) -> None:
    """A template with a syntax error, or one the sandbox refuses, stops the load with
    the key and its line."""
    path = write_config(tmp_path, forward_table("https://ntfy.sh/gate", fmt="template",
                                                extra=f"body = {json.dumps(body)}"))
    with pytest.raises(ConfigError) as caught:
        compiler.load(path)
    assert caught.value.path == "forward[0].body"
    assert caught.value.line is not None and message in str(caught.value)


@pytest.mark.parametrize(("table", "path", "message"), [
    ('\n[[forward]]\nname = "crm"\nurl = "https://x.example/h"\n', "forward[0].secret",
     "json forwards are signed"),
    (forward_table("ftp://x.example/h"), "forward[0].url", "http:// or https://"),
    (forward_table("https://x.example/h", extra="colour = 1"), "forward[0].colour",
     "unknown key"),
    (forward_table("https://x.example/h", extra='give_up_after = "soon"'),
     "forward[0].give_up_after", "expected e.g. 90m"),
    (forward_table("https://x.example/h", extra='event_name = "x"'), "forward[0].event_name",
     "only for format = 'ga4'"),
    (forward_table("https://www.google-analytics.com/mp/collect?measurement_id=G-1",
                   fmt="ga4"), "forward[0].url", "api_secret"),
    (forward_table("https://x.example/h") + forward_table("https://y.example/h"),
     "forward[1].name", "another [[forward]]"),
])
def test_bad_forward_tables_name_key_and_line(tmp_path: Path, table: str, path: str,
                                               message: str) -> None:
    """Each mistake in a [[forward]] table stops the load naming the key; a URL's value
    (it may hold a secret) is never echoed."""
    file = write_config(tmp_path, table)
    with pytest.raises(ConfigError) as caught:
        compiler.load(file)
    assert caught.value.path == path and caught.value.line is not None
    assert message in str(caught.value)
    assert "x.example" not in str(caught.value)


async def test_kill_9_with_forwards_pending_loses_none(tmp_path: Path,
                                                       receiver: Receiver) -> None:
    """The real daemon killed with -9 while its endpoint is down: after a restart with
    the endpoint up, every answered call's forward arrives at least once."""
    port = free_port()  # not the receiver's: it holds that one
    config = write_config(tmp_path, forward_table(receiver.url, caller="number"))
    config.write_text(config.read_text().replace("127.0.0.1:0", f"127.0.0.1:{port}"))
    url = f"http://127.0.0.1:{port}/voipgrid"
    answered: list[str] = []
    daemon = DaemonProcess(config)
    try:
        await asyncio.to_thread(daemon.wait_for, "listening")
        async with aiohttp.ClientSession() as session:
            for index in range(CALLS):
                caller = f"+316120000{index:02d}"
                params = {"token": TOKEN, "code": "471123", "did": BARRIER, "callerid": caller}
                async with session.get(url, params=params) as response:
                    if (await response.text()).startswith("status=ACK"):
                        answered.append(caller)
        daemon.proc.kill()
        assert await asyncio.to_thread(daemon.proc.wait, 10) == -signal.SIGKILL
    finally:
        daemon.stop()
    assert len(pending(config)) == len(answered)
    await receiver.start()
    again = DaemonProcess(config)
    try:
        await asyncio.to_thread(again.wait_for, "listening")
        await receiver.wait_for(len(answered), within=30)
        await until(lambda: not pending(config), within=10)
    finally:
        again.stop()
    delivered = [json.loads(r.body)["caller"] for r in receiver.requests]
    print(f"kill -9: {len(answered)} answered, {len(set(delivered))} delivered "
          f"({len(delivered)} requests)")
    assert len(answered) == CALLS
    assert set(answered) <= set(delivered)
    text = repr(daemon.events + again.events)
    assert "471123" not in text and SECRET not in text


def pending(config: Path) -> list[tuple[Any, ...]]:
    store = config.parent / "state" / "entries.sqlite3"
    with sqlite3.connect(store) as conn:
        return conn.execute("SELECT id FROM outbox").fetchall()


async def test_alarms_are_forwarded_where_asked_and_metrics_count_each_endpoint(
        start_daemon: Any, receiver: Receiver) -> None:
    """A caller locked out raises caller_locked: the endpoint with alarms = true gets it
    (the caller as a pseudonym), the one without does not; /metrics counts per endpoint."""
    await receiver.start()
    calls_only = forward_table(receiver.url.replace("/hook", "/calls"), name="calls",
                               extra='statuses = ["ACK"]')
    ops = forward_table(receiver.url.replace("/hook", "/ops"), name="ops", fmt="template",
                        extra='alarms = true\nstatuses = ["ERR"]\n'
                              'body = "{{ alarm }} {{ caller }} {{ gate }}"')
    running = await start_daemon(METRICS + calls_only + ops)
    for _ in range(5):
        await running.get(code="000000", did=BARRIER, callerid=OTHER)
    await running.get(code="471123", did=BARRIER, callerid=RESIDENT)
    requests = await receiver.wait_for(2)
    await until(lambda: not outbox(running))
    assert len(requests) == 2
    (alarm,) = [r for r in requests if not r.body.startswith(b"{")]
    assert alarm.body.decode() == f"caller_locked {pseudonym(site_key(running), OTHER)} "
    (call,) = [r for r in requests if r.body.startswith(b"{")]
    assert json.loads(call.body)["status"] == "ACK"
    async with running.session.get(metrics_url(running)) as response:
        text = await response.text()
    for line in ('gated_forward_delivered_total{endpoint="calls"} 1.0',
                 'gated_forward_delivered_total{endpoint="ops"} 1.0',
                 'gated_forward_rejected_total{endpoint="ops"} 0.0',
                 'gated_forward_expired_total{endpoint="calls"} 0.0'):
        assert line in text
    assert 'gated_forward_pending{endpoint="ops"}' in text
    assert 'gated_forward_oldest_pending_seconds{endpoint="calls"}' in text


def metrics_url(running: Any) -> str:
    host, port = running.daemon.metrics_listening[0]
    return f"http://{host}:{port}/metrics"


def test_every_forward_in_the_docs_is_a_config_that_loads(tmp_path: Path) -> None:
    """The recipes in docs/forwarding.md (ntfy, Slack, GA4, the signed CRM) and the
    example config's commented block pass the config check, their templates included."""
    root = Path(__file__).resolve().parent.parent
    page = (root / "docs" / "forwarding.md").read_text()
    blocks = [textwrap.dedent(block) for block in
              re.findall(r"```toml\n(.*?)```", page, re.DOTALL) if "[[forward]]" in block]
    example = (root / "config" / "gated.example.toml").read_text().partition("# [[forward]]")[2]
    blocks.append("[[forward]]" + "\n".join(line.removeprefix("# ")
                                             for line in example.splitlines()))
    assert len(blocks) == 5
    for block in blocks:
        loaded = compiler.load(write_config(tmp_path, block))
        assert len(loaded.config.forward) == 1


def test_check_config_names_each_forward_by_host_only(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`gated check-config` lists the endpoints without the secrets in their URLs."""
    receiver_url = "https://www.google-analytics.com/mp/collect?measurement_id=G-1&api_secret="
    path = write_config(tmp_path, forward_table(receiver_url + API_SECRET, fmt="ga4"))
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "forward   crm: ga4 to www.google-analytics.com, caller pseudonym" in out
    assert API_SECRET not in out and "G-1" not in out


def test_pseudonym_is_stable_per_caller_and_useless_without_the_key() -> None:
    """The same caller and key give the same pseudonym; another key or caller another;
    the number is nowhere in it."""
    key, other = b"a" * 32, b"b" * 32
    assert pseudonym(key, RESIDENT) == pseudonym(key, RESIDENT)
    assert pseudonym(key, RESIDENT) != pseudonym(other, RESIDENT)
    assert pseudonym(key, RESIDENT) != pseudonym(key, OTHER)
    assert RESIDENT[1:] not in pseudonym(key, RESIDENT)


async def test_numbers_pick_the_calls_an_endpoint_gets(start_daemon: Any,
                                                       receiver: Receiver) -> None:
    """`numbers`, written in any form, takes only calls to those called numbers."""
    await receiver.start()
    running = await start_daemon(forward_table(receiver.url, extra='numbers = ["0501234568"]'))
    await running.get(code="471123", did=BARRIER, callerid=RESIDENT)
    await running.get(code="471123", did=DOOR, callerid=RESIDENT)
    (request,) = await receiver.wait_for(1)
    await until(lambda: not outbox(running))
    assert json.loads(request.body)["gate"] == "door"
    assert len(receiver.requests) == 1


async def test_webhook_id_is_the_same_after_a_restart(start_daemon: Any, tmp_path: Path,
                                                      receiver: Receiver) -> None:
    """A forward tried before a stop and sent after the restart keeps its webhook-id:
    the receiver can tell it is the same one."""
    receiver.script = [503] * 10_000
    await receiver.start()
    first = await start_daemon(forward_table(receiver.url))
    await first.get(code="471123", did=BARRIER, callerid=RESIDENT)
    await receiver.wait_for(1)
    await first.stop()
    tried = len(receiver.requests)
    receiver.script.clear()
    second = await start_daemon(config=tmp_path / "gated.toml")
    await receiver.wait_for(tried + 1)
    await until(lambda: not outbox(second))
    ids = {headers_of(r)["webhook-id"] for r in receiver.requests}
    assert len(ids) == 1


async def test_a_receiver_holds_its_port_from_the_start() -> None:
    """A receiver not up yet refuses connections as a down endpoint does, and no other
    server (another test's receiver, in this run or another on the machine) can listen
    on its port and be sent the forwards meant for it."""
    down = Receiver()
    try:
        with socket.socket() as stranger:
            # As aiohttp's TCPSite binds: with SO_REUSEADDR.
            stranger.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with pytest.raises(OSError, match="Address already in use"):
                stranger.bind(("127.0.0.1", down.port))
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", down.port), timeout=5).close()
    finally:
        await down.stop()


async def test_a_receiver_counts_only_the_requests_sent_to_its_own_url(
        receiver: Receiver) -> None:
    """A request to the receiver's port but not to its URL (someone's curl, another run's
    sender aimed at a port since reused) is answered 404 and not counted as received."""
    await receiver.start()
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{receiver.port}/voipgrid",
                               headers={"User-Agent": "curl/7.88.1"}) as response:
            assert response.status == 404
        for url in (f"http://127.0.0.1:{receiver.port}/hook",
                    f"http://127.0.0.1:{receiver.port}/mp/collect?measurement_id=G-TEST"):
            async with session.post(url, data=b"{}") as response:
                assert response.status == 404
        async with session.post(receiver.url, data=b"{}") as response:
            assert response.status == 200
    assert [r.body for r in receiver.requests] == [b"{}"]


async def test_template_that_fails_on_a_real_entry_rejects_that_row(
        start_daemon: Any, receiver: Receiver) -> None:
    """A template that passed the sample but fails on one entry: that row is kept as
    rejected with the error's name, and the next is sent."""
    await receiver.start()
    body = "{{ 1 // (kind | length) }} {{ reason }}"  # no credential: kind is empty
    running = await start_daemon(forward_table(
        receiver.url, fmt="template", extra=f"body = {json.dumps(body)}"))
    with capture_logs() as logs:
        await running.get(did=BARRIER, callerid=RESIDENT)  # opens by caller, no code
        await running.get(code="471123", did=BARRIER, callerid=RESIDENT)
        (request,) = await receiver.wait_for(1)
        await until(lambda: outbox(running) == [
            ("crm", "rejected", None, "template failed: ZeroDivisionError")])
    assert request.body == b"0 granted_code"
    assert [e["why"] for e in logs if e.get("alarm") == "forward_rejected"] == [
        "template failed: ZeroDivisionError"]


async def test_a_routed_call_to_a_campaign_line_is_a_ga4_event_naming_its_route(
        start_daemon: Any, receiver: Receiver) -> None:
    """A known caller routed on a campaign line: GA4 gets the line as called_number, no
    gate, reason routed_caller and the route's name."""
    await receiver.start()
    line = "+31501234500"
    routes = (f'\n[[routes]]\nname = "Key accounts"\nnumbers = ["{line}"]\n'
              f'callers = ["{OTHER}"]\ndestination = "+31501234510"\n')
    running = await start_daemon(routes + forward_table(
        ga4_url(receiver), fmt="ga4", extra=f'numbers = ["{line}"]'))
    _, text = await running.get(did=line, callerid=OTHER)
    assert text.startswith("status=ACK")
    (request,) = await receiver.wait_for(1)
    assert json.loads(request.body)["events"] == [{"name": "phone_call", "params": {
        "called_number": line, "gate": "", "status": "ACK", "reason": "routed_caller",
        "route": "Key accounts"}}]


async def test_two_refusing_alarm_endpoints_do_not_pass_alarms_back_and_forth(
        start_daemon: Any) -> None:
    """Both endpoints refuse everything: a rejected entry raises forward_rejected, which
    goes to the other endpoint, whose refusal of that alarm raises nothing more."""
    first, second = Receiver(script=[400] * 50), Receiver(script=[400] * 50)
    await first.start()
    await second.start()
    running = await start_daemon(
        forward_table(first.url, name="a", extra="alarms = true\n")
        + forward_table(second.url, name="b", extra="alarms = true\n"))
    await running.get(code="471123", did=BARRIER, callerid=RESIDENT)
    # The entry to each, then each one's forward_rejected to the other: four in all.
    await first.wait_for(2)
    await second.wait_for(2)
    await asyncio.sleep(1.5)  # what a loop would send next has had time to arrive
    assert (len(first.requests), len(second.requests)) == (2, 2)
    await first.stop()
    await second.stop()


async def test_rejections_older_than_give_up_after_do_not_pile_up(
        start_daemon: Any, receiver: Receiver) -> None:
    """An endpoint that refuses everything: each rejection is kept for give_up_after (to
    retry), then dropped, so the outbox cannot grow until the disk is full."""
    receiver.script = [400] * 10
    await receiver.start()
    running = await start_daemon(forward_table(receiver.url, extra='give_up_after = "1s"\n'))
    await running.get(code="471123", did=BARRIER, callerid=RESIDENT)
    await until(lambda: [r[1] for r in outbox(running)] == ["rejected"])
    await asyncio.sleep(1.2)  # the first rejection is now older than give_up_after
    await running.get(code="5555", did=BARRIER, callerid=OTHER)
    await receiver.wait_for(2)
    await until(lambda: [r[1] for r in outbox(running)] == ["rejected"])
