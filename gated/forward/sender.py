"""Delivering the outbox: one task per endpoint, in order, never on the answer path.

Each sender holds the head of its endpoint's queue and nothing more; the
rows behind it stay in SQLite. Connection errors, timeouts, 408, 429 and 5xx
are retried with stamina's capped, jittered exponential backoff until the
row's ``give_up_after`` has passed (then it is dropped: ``forward_expired``);
any other answer outside 2xx is a rejection (kept, ``forward_rejected``) and
the queue goes on. Logs and alarms name the endpoint and its host, never the
URL (it may carry a secret) or a body.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import sqlite3
import zoneinfo
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec
import stamina
import structlog
from standardwebhooks.webhooks import Webhook

from gated.book import sitekey
from gated.core.clock import Clock
from gated.core.printable import printable
from gated.forward import outbox
from gated.forward.endpoints import Endpoint, body, build
from gated.site import alarms
from gated.site.store import Store, connect

if TYPE_CHECKING:
    from gated.book.compiler import Loaded

log = structlog.get_logger("gated.forward")

# Backoff between attempts at one row: 1 s, 2 s, 4 s ... capped at a minute,
# plus up to a second of jitter so a fleet does not come back in step.
WAIT_INITIAL = 1.0
WAIT_MAX = 60.0
WAIT_JITTER = 1.0
# A `gated forward retry` from another process is seen within this.
POLL_SECONDS = 2.0
# What of a rejection's answer is kept to say why.
WHY_LENGTH = 200


class Retryable(Exception):
    """The endpoint may take the row later: unreachable, slow, 408, 429 or 5xx."""


class Rejected(Exception):
    """The endpoint refused the row (another 4xx, a redirect): it will not change its mind."""

    def __init__(self, status: int | None, why: str) -> None:
        super().__init__(why)
        self.status = status
        self.why = why


class Expired(Exception):
    """The row's give_up_after has passed."""


class Forwarder:
    """The senders of every endpoint, over one HTTP session."""

    def __init__(self, endpoints: Sequence[Endpoint], store: Store, clock: Clock, *,
                 site: str, tz: zoneinfo.ZoneInfo, key: bytes) -> None:
        self.endpoints = tuple(endpoints)
        self.router = outbox.Router(endpoints)
        self.store = store
        self.clock = clock
        self.site, self.tz, self.key = site, tz, key
        self.delivered: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.expired: Counter[str] = Counter()
        # Refreshed from the store after each change: read at scrape time.
        self.pending: dict[str, tuple[int, float | None]] = {}
        self._unsubscribe: Callable[[], None] = lambda: None
        self._refreshed = 0.0
        # Its own connection on its own thread: a sender's reads and marks never
        # queue in front of the writer whose commits the PBX's answers wait for.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gated-forward")
        self._conn: sqlite3.Connection | None = None

    async def _call(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run ``function(connection, *args)`` on the forwarder's own thread."""
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, self._on_thread, function, args)

    def _on_thread(self, function: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        if self._conn is None:
            self._conn = connect(self.store.path)
        return function(self._conn, *args)

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def attach(self) -> None:
        """From now on the store queues this daemon's rows with their entries."""
        self.store.outbox = self.router

    async def run(self) -> None:
        # The backoff is ours; stamina's own hooks would log the exception's
        # repr, which for some client errors holds the URL.
        stamina.instrumentation.set_on_retry_hooks([])
        if any(e.alarms for e in self.endpoints):
            loop = asyncio.get_running_loop()

            def queue(alarm: dict[str, Any]) -> None:  # from any thread
                with contextlib.suppress(RuntimeError):  # the loop has closed
                    loop.call_soon_threadsafe(self.store.submit_alarm, alarm)

            self._unsubscribe = alarms.subscribe(queue)
        try:
            async with aiohttp.ClientSession() as session, asyncio.TaskGroup() as tasks:
                await self.refresh()
                for endpoint in self.endpoints:
                    tasks.create_task(self._sender(session, endpoint),
                                      name=f"forward-{endpoint.name}")
        finally:
            self._unsubscribe()
            # On the thread that made the connection; then the thread ends.
            await asyncio.shield(asyncio.get_running_loop().run_in_executor(
                self._executor, self._close))
            self._executor.shutdown(wait=False)

    async def refresh(self) -> None:
        self._refreshed = self.clock.monotonic()
        with contextlib.suppress(sqlite3.Error):
            self.pending = await self._call(outbox.pending_counts)

    async def _sender(self, session: aiohttp.ClientSession, endpoint: Endpoint) -> None:
        wake = self.router.wakes[endpoint.name]
        while True:
            wake.clear()
            try:
                row = await self._call(outbox.head, endpoint.name)
            except sqlite3.Error as exc:
                log.warning("forward queue unreadable", endpoint=endpoint.name, error=str(exc))
                row = None
            if row is None:
                await self.refresh()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(POLL_SECONDS):
                        await wake.wait()
                continue
            try:
                await self._deliver(session, endpoint, row)
            except Exception as exc:  # forwarding must never take the gate down with it
                # The row stays queued (a disk that refuses the mark, say) and
                # is sent again: at least once.
                log.error("forward failed; trying again", endpoint=endpoint.name,
                          host=endpoint.host, error=type(exc).__name__)
                await asyncio.sleep(WAIT_MAX / 4)
            if self.clock.monotonic() - self._refreshed > POLL_SECONDS:
                await self.refresh()

    async def _deliver(self, session: aiohttp.ClientSession, endpoint: Endpoint,
                       row: outbox.Row) -> None:
        deadline = row.created + endpoint.give_up_after
        attempts = row.attempts
        where = {"endpoint": endpoint.name, "host": endpoint.host}
        try:
            payload = body(endpoint, row.kind, msgspec.json.decode(row.body), row.msg_id,
                           site=self.site, tz=self.tz, key=self.key)
        except Exception as exc:  # a template that fails on this row: it always will
            await self._reject(endpoint, row, None, f"template failed: {type(exc).__name__}",
                               attempts)
            return
        while True:
            remaining = deadline - self.clock.now()
            try:
                async for attempt in stamina.retry_context(
                        on=Retryable, attempts=None, timeout=max(remaining, 0.001),
                        wait_initial=WAIT_INITIAL, wait_max=WAIT_MAX, wait_jitter=WAIT_JITTER):
                    with attempt:
                        if self.clock.now() >= deadline:
                            raise Expired
                        attempts += 1
                        try:
                            await self._send(session, endpoint, row, payload)
                        except Retryable as exc:
                            log.info("forward retrying", **where, why=str(exc), attempt=attempts)
                            await self._note_attempt(row, attempts)
                            raise
            except Rejected as exc:
                await self._reject(endpoint, row, exc.status, exc.why, attempts)
                return
            except (Expired, Retryable):
                left = deadline - self.clock.now()
                if left > 0:
                    # Out of attempts before the deadline (stamina's test mode
                    # caps them, its clock is not ours): go on, after a pause.
                    await asyncio.sleep(0.01 if stamina.is_testing() else min(left, WAIT_INITIAL))
                    continue
                await self._call(outbox.expired, row)
                self.expired[endpoint.name] += 1
                if row.kind != "alarm":  # see _reject
                    alarms.alarm(log, "forward_expired", "forward given up after give_up_after",
                                 **where, attempts=attempts)
                return
            await self._call(outbox.delivered, row, self.clock.now())
            self.delivered[endpoint.name] += 1
            log.debug("forward delivered", **where, attempts=attempts)
            return

    async def _note_attempt(self, row: outbox.Row, attempts: int) -> None:
        with contextlib.suppress(sqlite3.Error):
            await self._call(outbox.attempted, row, attempts)

    async def _reject(self, endpoint: Endpoint, row: outbox.Row, status: int | None,
                      why: str, attempts: int) -> None:
        keep_since = self.clock.now() - endpoint.give_up_after
        await self._call(functools.partial(outbox.rejected, keep_since=keep_since),
                         row, status, why, attempts)
        self.rejected[endpoint.name] += 1
        if row.kind == "alarm":
            # Alarms about alarms: two endpoints that both refuse would pass
            # forward_rejected back and forth for ever. Logged, counted, kept.
            log.warning("forwarded alarm rejected", endpoint=endpoint.name,
                        host=endpoint.host, status=status, why=why)
            return
        alarms.alarm(log, "forward_rejected", "forward rejected by its endpoint",
                     endpoint=endpoint.name, host=endpoint.host, status=status, why=why)

    async def _send(self, session: aiohttp.ClientSession, endpoint: Endpoint,
                    row: outbox.Row, payload: bytes) -> None:
        headers = {"Content-Type": endpoint.content_type}
        if endpoint.secret is not None:
            now = dt.datetime.fromtimestamp(self.clock.now(), dt.UTC)
            headers["webhook-id"] = row.msg_id
            headers["webhook-timestamp"] = str(int(now.timestamp()))
            headers["webhook-signature"] = Webhook(endpoint.secret).sign(
                row.msg_id, now, payload.decode())
        try:
            async with session.request(
                    endpoint.method, endpoint.url, data=payload, headers=headers,
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=endpoint.timeout)) as response:
                status = response.status
                if 200 <= status < 300:
                    return
                text = await _answer(response)
        except TimeoutError:
            raise Retryable(f"no answer within {endpoint.timeout}s") from None
        except aiohttp.ClientError as exc:
            # The class says enough; its text can hold the URL.
            raise Retryable(f"unreachable ({type(exc).__name__})") from None
        except OSError as exc:
            raise Retryable(f"unreachable ({exc.strerror or type(exc).__name__})") from None
        if status in (408, 429) or status >= 500:
            raise Retryable(f"HTTP {status}")
        raise Rejected(status, f"HTTP {status}" + (f": {text}" if text else ""))


async def _answer(response: aiohttp.ClientResponse) -> str:
    """The start of a refusal's body, on one line: what the endpoint said was wrong."""
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, UnicodeDecodeError):
        return printable((await response.content.read(WHY_LENGTH)).decode(errors="replace"))
    return ""


def make_forwarder(loaded: Loaded, store: Store, clock: Clock) -> Forwarder | None:
    """The forwarder ``[[forward]]`` asks for, or None without one."""
    config = loaded.config
    if not config.forward:
        return None
    key = sitekey.read_key(loaded.key_path)
    assert key is not None  # the daemon loads its config with create_key
    return Forwarder(build(config), store, clock, site=config.site.id, tz=config.tz, key=key)
