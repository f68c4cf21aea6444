"""The one place that assembles the daemon from config and owns its lifecycle.

Start: the state lock (one daemon per store), relays off, store opened,
ledger restored, managed codes loaded from their local copy, webhook
listening, MQTT link connecting (in the background: a site opens its GPIO
gates with the broker down), READY.
Stop (SIGTERM/SIGINT): stop accepting, finish in-flight answers and remote
opens, relays off, entries flushed, ``offline`` published, store closed.
SIGHUP or a change of the file reloads the code book (managed codes carried
over) and the webhook's tokens and address lists; a bad file, or one that
changes what only a restart applies, keeps the old one serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import sqlite3
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from gated import actuators as actuator_port
from gated import forward
from gated.app import REQUEST_LIMITS, make_app
from gated.book import compiler
from gated.book import config as config_mod
from gated.book.compiler import Loaded
from gated.book.config import split_listen
from gated.core.clock import Clock, SystemClock
from gated.core.decide import Changes
from gated.core.errors import ConfigError, GatedError, StoreError
from gated.core.lockout import SITE, Policy
from gated.pbx.twiml import TWIML, LiveTwiml, TwimlSettings
from gated.pbx.voipgrid import WEBHOOK, LiveSettings, webhook_settings
from gated.site import alarms, statelock, visitors
from gated.site.gatekeeper import Gatekeeper
from gated.site.heap import release_memory
from gated.site.notify import notify, watchdog_interval
from gated.site.ports import Actuator
from gated.site.sensor import ConfirmingActuator, GateSensor
from gated.site.sockets import CappedSite
from gated.site.store import (
    Entry,
    Store,
    clears_after,
    data_version,
    last_clear,
    load_visitors,
    prune_visitors,
)

if TYPE_CHECKING:
    # Loaded only on sites that use them: a site without a broker or metrics
    # does not carry paho and prometheus_client (~2.7 MB) in its memory.
    from gated.book.codes import CodeBook
    from gated.mqtt.bridge import Bridge
    from gated.mqtt.link import MqttLink
    from gated.pbx.baresip import BaresipEngine
    from gated.pbx.sip import SipCalls
    from gated.site.metrics import Metrics
    from gated.web.server import StaffPage

# A reload compiled here (not in the child) checks the forwards too.
config_mod.add_check(forward.check)
log = structlog.get_logger("gated.daemon")

RELOAD_POLL_SECONDS = 2.0
HOUSEKEEPING_SECONDS = 1.0
PRUNE_SECONDS = 60.0
# A scraper or two: part of the files the webhook's cap leaves to the rest.
METRICS_CONNECTIONS = 16


@contextlib.contextmanager
def long_lived() -> Iterator[None]:
    """Build the config and code book with the cyclic GC held off, then freeze them.

    A 100,000-code book is over a million objects that live until the next
    reload. Left to the collector, each full collection walked all of them
    (~250 ms here, far longer on a Pi) while calls waited, every few seconds
    under load, and the first collection after a load did the same once.
    Frozen objects are still freed by reference counting when a reload drops
    them; the book holds no reference cycles.
    """
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


class _Stop(Exception):
    """Raised inside the task group to end it once shutdown is done."""


def policy(loaded: Loaded) -> Policy:
    lock = loaded.config.lockout
    return Policy(lock.caller_failures, lock.site_failures, lock.site_window,
                  lock.lock_seconds, lock.max_lock_seconds)


@dataclass
class Daemon:
    loaded: Loaded
    clock: Clock = field(default_factory=SystemClock)
    mock_factory: Any = None
    install_signals: bool = True
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    # Set with READY=1: every port listening, the webhook and metrics both served.
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    gatekeeper: Gatekeeper | None = None
    link: MqttLink | None = None
    bridge: Bridge | None = None
    listening: list[tuple[str, int]] = field(default_factory=list)
    metrics_listening: list[tuple[str, int]] = field(default_factory=list)
    web_listening: list[tuple[str, int]] = field(default_factory=list)
    sensors: dict[str, GateSensor] = field(default_factory=dict)
    # Set by [metrics]; others (the MQTT link) may set its gauges.
    metrics: Metrics | None = None
    _reloads: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    _visitors_version: int = 0
    _clears_seen: int = 0  # the last `gated lockout clear` request followed
    _alarms: asyncio.Queue[tuple[str, str, float]] = field(default_factory=asyncio.Queue)
    _webhook: web.TCPSite | None = None
    _webhook_settings: LiveSettings | None = None
    _twiml_settings: LiveTwiml | None = None
    state_lock: statelock.StateLock | None = None
    sip_engine: BaresipEngine | None = None
    staff_page: StaffPage | None = None

    @property
    def url(self) -> str:
        host, port = self.listening[0]
        return f"http://{host}:{port}{self.loaded.config.server.path}"

    async def assemble(self) -> Gatekeeper:
        config = self.loaded.config
        # First of all: a second daemon on this state stops here, before it
        # touches a pin, the store or the broker (if ``claim_state`` did not
        # stop it before it compiled anything).
        lock = self.state_lock
        if lock is None or lock.path != statelock.lock_path(self.loaded.store_path):
            if lock is not None:
                lock.release()
            self.state_lock = None
            self.state_lock = statelock.hold(self.loaded.store_path)
        built: dict[str, Actuator] = {}
        store: Store | None = None
        try:
            link = self.link = make_link(self.loaded)
            for name, gate in config.gates.items():
                built[name] = actuator_port.build(name, gate.actuator,
                                                  mock_factory=self.mock_factory, mqtt=link)
                if gate.sensor is not None:
                    sensor = self.sensors[name] = GateSensor.create(
                        name, gate.sensor, mock_factory=self.mock_factory,
                        on_alarm=lambda *alarm: self._alarms.put_nowait(alarm))
                    built[name] = ConfirmingActuator(built[name], sensor)
            store = Store.open(self.loaded.store_path)
            # Before the ledger: a lock cleared by hand between the two reads
            # is then cleared again (harmless), never missed.
            self._clears_seen = last_clear(store.connection)
            ledger = store.load_ledger(policy(self.loaded), self.clock.now())
            # Read the version first: a visitor code issued right after this
            # load then still shows up as a change for housekeeping.
            self._visitors_version = data_version(store.connection)
            visitors.install(self.loaded.book, load_visitors(store.connection))
            gatekeeper = Gatekeeper(self.loaded.book, ledger, built, store, self.clock,
                                    deadline=config.server.answer_deadline)
            if link is not None:
                from gated.book import signing
                from gated.mqtt import setchannel
                from gated.mqtt.bridge import Bridge

                fleet = config.mqtt is not None and config.mqtt.fleet_prefix is not None
                bridge = self.bridge = Bridge(
                    link, gatekeeper, config,
                    fleet_key=setchannel.load_key(self.loaded.source, config) if fleet else None,
                    fleet_trust=setchannel.fleet_trust(self.loaded.source, config)
                    if fleet else None,
                    site_trust=signing.Trust(signing.public_path(self.loaded.key_path)))
                bridge.attach()
                bridge.load_local()
        except BaseException:
            # Whatever failed, nothing stays claimed: relays off, pins freed.
            for actuator in built.values():
                await actuator.close()
            for sensor in self.sensors.values():
                sensor.close()
            if store is not None:
                store.close()
            if self.state_lock is not None:
                self.state_lock.release()
            raise
        return gatekeeper

    async def run(self) -> None:
        config = self.loaded.config
        gatekeeper = self.gatekeeper = await self.assemble()
        runner = web.AppRunner(make_app(gatekeeper, config.server, config.twiml,
                                        region=config.site.region), handle_signals=False,
                               access_log=None, keepalive_timeout=75.0,
                               shutdown_timeout=config.server.answer_deadline + 1.0,
                               max_line_size=REQUEST_LIMITS["max_line_size"],
                               max_field_size=REQUEST_LIMITS["max_field_size"],
                               max_headers=REQUEST_LIMITS["max_headers"])
        self._webhook_settings = runner.app[WEBHOOK]
        self._twiml_settings = runner.app.get(TWIML)
        compiler.keep_in_force(compiler.without_credentials(self.loaded))
        forwarder = None
        if config.forward:  # jinja2 and the HTTP client load only on sites that forward
            from gated.forward.sender import make_forwarder

            forwarder = make_forwarder(self.loaded, gatekeeper.store, self.clock)
        metrics_runner: web.AppRunner | None = None
        if config.metrics is not None:
            from gated.site.metrics import Metrics, make_metrics_app

            metrics = self.metrics = Metrics(mqtt=config.mqtt is not None)
            gatekeeper.listeners.append(metrics.entry)
            gatekeeper.lock_listeners.append(metrics.lock)
            metrics.watch(gatekeeper, self.sensors)
            if forwarder is not None:
                metrics.watch_forwards(forwarder)
            link = self.link
            if link is not None:
                metrics.mqtt_connected.set_function(lambda: float(link.connected))
            metrics_runner = web.AppRunner(make_metrics_app(metrics, self.problem),
                                           handle_signals=False, access_log=None)
        web_runner = self._staff_page(gatekeeper)
        loop = asyncio.get_running_loop()
        if self.install_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self.stop.set)
            loop.add_signal_handler(signal.SIGHUP, lambda: self._reloads.put_nowait("SIGHUP"))
        try:
            async with asyncio.TaskGroup() as tasks:
                sip_calls = self._sip(gatekeeper)
                if forwarder is not None:  # before the writer: it writes every entry's forwards
                    forwarder.attach()
                    tasks.create_task(forwarder.run(), name="forward")
                tasks.create_task(gatekeeper.store.run(), name="store-writer")
                tasks.create_task(self._watch_file(), name="config-watch")
                tasks.create_task(self._reloader(), name="config-reload")
                tasks.create_task(self._housekeeping(), name="housekeeping")
                tasks.create_task(self._record_alarms(), name="sensor-alarms")
                await runner.setup()
                host, port = split_listen(config.server.listen)
                deadline = config.server.answer_deadline
                site = self._webhook = CappedSite(
                    runner, host, port, max_connections=config.server.max_connections,
                    max_per_address=config.server.max_per_address, deadline=deadline,
                    admission=self._webhook_settings, reuse_address=True)
                await _listen(site, "server.listen", config.server.listen)
                self.listening = [s.getsockname()[:2] for s in site._server.sockets]  # type: ignore[union-attr]
                if metrics_runner is not None and config.metrics is not None:
                    await metrics_runner.setup()
                    host, port = split_listen(config.metrics.listen)
                    metrics_site = CappedSite(metrics_runner, host, port,
                                              max_connections=METRICS_CONNECTIONS,
                                              deadline=deadline, reuse_address=True)
                    await _listen(metrics_site, "metrics.listen", config.metrics.listen)
                    self.metrics_listening = [
                        s.getsockname()[:2]
                        for s in metrics_site._server.sockets  # type: ignore[union-attr]
                    ]
                    log.info("metrics listening", address=config.metrics.listen)
                if web_runner is not None and config.web is not None:
                    await web_runner.setup()
                    host, port = split_listen(config.web.listen)
                    web_site = web.TCPSite(web_runner, host, port, reuse_address=True,
                                           ssl_context=self._web_tls())
                    await _listen(web_site, "web.listen", config.web.listen)
                    self.web_listening = [
                        s.getsockname()[:2]
                        for s in web_site._server.sockets  # type: ignore[union-attr]
                    ]
                    log.info("staff page listening", address=config.web.listen,
                             tls=config.web.tls_cert is not None)
                # Only once the ports are ours: a gated that cannot listen (another
                # one has the port) must never reach the broker, where it would
                # take the running one's client id and say "offline" for it.
                if self.link is not None:
                    tasks.create_task(self.link.run(), name="mqtt")
                tasks.create_task(self._watchdog(), name="watchdog")
                if sip_calls is not None and self.sip_engine is not None:
                    # Its own task, restarted by its own loop: a dead engine never
                    # takes the webhook down.
                    tasks.create_task(self.sip_engine.run(), name="sip-engine")
                    tasks.create_task(sip_calls.run(), name="sip-calls")
                log.info("listening", address=config.server.listen, path=config.server.path,
                         gates=sorted(config.gates), credentials=gatekeeper.book.credential_count,
                         book=self.loaded.origin,
                         store=str(gatekeeper.store.path))
                notify("READY=1")
                self.ready.set()
                await self.stop.wait()
                log.info("stopping")
                notify("STOPPING=1")
                await runner.cleanup()  # stop accepting, finish in-flight answers
                if web_runner is not None:  # an open from the page is one more answer
                    await web_runner.cleanup()
                if self.bridge is not None:  # remote opens and events in flight
                    await self.bridge.close(config.server.answer_deadline)
                await gatekeeper.close()  # relays off
                await self._drain_alarms()
                await gatekeeper.store.flush()
                if self.link is not None:
                    await self.link.close()  # "offline", then disconnect
                raise _Stop
        except* _Stop:
            pass
        except* GatedError as failed:  # a failed start: its one line, not a group
            raise failed.exceptions[0] from None
        finally:
            if self.install_signals:
                for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(signum)
            await runner.cleanup()
            if metrics_runner is not None:
                await metrics_runner.cleanup()
            if web_runner is not None:
                await web_runner.cleanup()
            await gatekeeper.close()
            if self.link is not None:
                await self.link.close(within=0.5)
            gatekeeper.store.close()
            if self.state_lock is not None:
                self.state_lock.release()
            log.info("stopped")

    def _sip(self, gatekeeper: Gatekeeper) -> SipCalls | None:
        """The SIP endpoint of a site with [sip]: engine checked and set up, not started."""
        config = self.loaded.config
        if config.sip is None:
            return None
        from gated.pbx.baresip import engine_for
        from gated.pbx.sip import SipCalls, settings_for

        engine = self.sip_engine = engine_for(config, self.loaded.source,
                                              self.loaded.store_path.parent)
        return SipCalls(engine, gatekeeper, settings_for(config))

    def _staff_page(self, gatekeeper: Gatekeeper) -> web.AppRunner | None:
        """The staff page's runner (DESIGN §16), when ``[web]`` asks for one."""
        if self.loaded.config.web is None:
            return None
        from gated.web.server import StaffPage, make_web_app

        page = StaffPage(gatekeeper, lambda: self.loaded.config,
                         state_dir=self.loaded.store_path.parent,
                         store_path=self.loaded.store_path, clock=self.clock,
                         tls=self.loaded.config.web.tls_cert is not None,
                         sensors=lambda: {n: s.is_open for n, s in self.sensors.items()},
                         broker=self.bridge)
        self.staff_page = page
        # Live logs never end by themselves: at a stop they are cut, not awaited.
        return web.AppRunner(make_web_app(page), handle_signals=False, access_log=None,
                             shutdown_timeout=1.0)

    def _web_tls(self) -> ssl.SSLContext | None:
        web_config = self.loaded.config.web
        if web_config is None or web_config.tls_cert is None or web_config.tls_key is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(config_mod.resolve(self.loaded.source, web_config.tls_cert),
                                    config_mod.resolve(self.loaded.source, web_config.tls_key))
        except (OSError, ssl.SSLError) as exc:
            raise GatedError(f"web.tls_cert/tls_key: cannot load them: {exc}") from None
        return context

    def problem(self) -> str | None:
        """For /healthz: None while calls can be answered and recorded, else why not."""
        gatekeeper, site = self.gatekeeper, self._webhook
        if self.stop.is_set():
            return "stopping"
        server = site._server if site is not None else None
        if gatekeeper is None or server is None or not server.is_serving():
            return "webhook not listening"
        store = gatekeeper.store
        if not store.healthy:
            return f"entry store failing: {store.buffered} entries held in memory"
        return None

    async def _record_alarms(self) -> None:
        while True:
            alarm = await self._alarms.get()
            await self._record_alarm(*alarm)

    async def _drain_alarms(self) -> None:
        while not self._alarms.empty():
            await self._record_alarm(*self._alarms.get_nowait())

    async def _record_alarm(self, gate: str, kind: str, seconds: float) -> None:
        gatekeeper = self.gatekeeper
        assert gatekeeper is not None
        # An alarm is an entry with source "sensor" and status ALARM: `gated
        # log`, the metrics and the event stream show it beside the calls.
        await gatekeeper.note(Entry(
            time=self.clock.now(), gate=gate, caller=None, did=None, status="ALARM",
            reason=kind, latency_ms=round(seconds * 1000, 3), source="sensor"))

    async def _reloader(self) -> None:
        while True:
            why = await self._reloads.get()
            await self.reload(why)

    async def reload(self, why: str = "request") -> bool:
        """Re-read the config; swap the code book only if the whole file is good."""
        gatekeeper = self.gatekeeper
        if gatekeeper is None:
            return False
        try:
            # A child process compiles the new book (parsing 100,000 codes takes
            # seconds and hundreds of megabytes); this one maps the result.
            loaded = await compiler.load_in_child(self.loaded.path)
            compiler.warn_unkept(loaded)
        except ConfigError as exc:
            log.error("config reload refused; the old config keeps serving",
                      error=str(exc), trigger=why)
            return False
        old, new = self.loaded.config, loaded.config
        if changed := restart_needed(self.loaded, loaded):
            log.error("config reload refused: restart gated to apply these changes; "
                      "the old config keeps serving", changed=changed, trigger=why)
            return False
        slim = compiler.without_credentials(loaded)
        # The new book's TOTP tables for now, off the loop: else the first code
        # typed after the swap would build them (10,000 users: two HMACs each,
        # a step) while its caller and everyone behind it waits. Steps of
        # unchanged TOTP users are taken over, not built again.
        await asyncio.to_thread(adopt_totp_steps, loaded.book, gatekeeper.book)
        await build_totp_steps(loaded.book, self.clock.now())
        # Visitor codes first, so the managed codes' clash check sees them.
        loaded.book.visitors = gatekeeper.book.visitors
        if self.bridge is not None:
            await self.bridge.rebase(loaded.book, slim.config)
        gatekeeper.swap(loaded.book)
        if new.server != old.server and self._webhook_settings is not None:
            # In the same step as the book: no call sees one without the other.
            self._webhook_settings.current = webhook_settings(new.server)
        if new.twiml != old.twiml and new.twiml is not None and self._twiml_settings is not None:
            self._twiml_settings.current = TwimlSettings.build(new.twiml, new.site.region)
        self.loaded = slim
        compiler.keep_in_force(slim)
        # Nothing may keep the parsed tables (or the old book) alive past here.
        del loaded, old, new
        await asyncio.to_thread(release_memory)
        log.info("config reloaded", credentials=gatekeeper.book.credential_count, trigger=why)
        return True

    async def _watch_file(self) -> None:
        last = self._stamps()
        while True:
            await asyncio.sleep(RELOAD_POLL_SECONDS)
            current = self._stamps()
            # A file first named by a reload is no change of its own.
            if any(last.get(path, stamp) != stamp for path, stamp in current.items()):
                self._reloads.put_nowait("file changed")
            last = current

    def _stamps(self) -> dict[Any, tuple[int, ...] | None]:
        """The config file and the routes' CSV files (a CRM export replaced is a reload)."""
        return {path: _stamp(path)
                for path in (self.loaded.path, *compiler.route_files(self.loaded))}

    async def _housekeeping(self) -> None:
        """Once a second: visitor codes from other processes, pruning, TOTP
        tables for the next step, and the end of locks."""
        gatekeeper = self.gatekeeper
        assert gatekeeper is not None
        store = gatekeeper.store
        seen = self._visitors_version
        pruned = 0.0
        while True:
            now = self.clock.now()
            try:
                version = await store.call(data_version)
                if version != seen:
                    rows = await store.call(load_visitors)
                    visitors.install(gatekeeper.book, rows)
                    log.info("visitor codes loaded", count=len(rows))
                    seen = version
                    await self._clear_locks(gatekeeper)
                if now - pruned > PRUNE_SECONDS:
                    pruned = now
                    keep = self.loaded.config.visitors.keep_expired
                    if removed := await store.call(prune_visitors, now - keep):
                        log.info("expired visitor codes pruned", count=removed)
                    if self.bridge is not None and (removed := self.bridge.prune_visitors(
                            now - keep)):
                        log.info("expired visitor codes deleted from the broker", count=removed)
            except sqlite3.Error as exc:
                # The writer raises the store alarm; here it is enough to try again.
                log.debug("housekeeping could not read the store", error=str(exc))
            await build_totp_steps(gatekeeper.book, now)
            for key in gatekeeper.ledger.lockout.ended(now):
                kind = "site_unlocked" if key == SITE else "caller_unlocked"
                alarms.alarm(log, kind, key=key)
            await asyncio.sleep(HOUSEKEEPING_SECONDS)

    async def _clear_locks(self, gatekeeper: Gatekeeper) -> None:
        """Follow `gated lockout clear`: it cleared the stored strikes; clear ours."""
        store = gatekeeper.store
        for request, key in await store.call(clears_after, self._clears_seen):
            self._clears_seen = request
            ledger = gatekeeper.ledger
            if ledger.lockout.clear(key):
                # Written as any change to the strikes, so a lock this daemon
                # had not stored yet does not come back at the next start.
                store.submit(None, Changes(strikes=[key]), ledger)
                alarms.alarm(log, "lockout_cleared", key=key)

    async def _watchdog(self) -> None:
        interval = watchdog_interval()
        if interval is None:
            return
        while True:
            notify("WATCHDOG=1")
            await asyncio.sleep(interval)


def adopt_totp_steps(new: CodeBook, old: CodeBook) -> None:
    for period, table in new.totp.items():
        if period in old.totp:
            table.adopt(old.totp[period])


async def build_totp_steps(book: CodeBook, now: float) -> None:
    """Build the TOTP tables a lookup will soon need: 10,000 HMACs a step, built
    off the loop and installed on it."""
    for table in book.totp.values():
        for step in table.missing(now):
            built = await asyncio.to_thread(table.build, step)
            # A lookup may have built it meanwhile: the one in use stays.
            if step not in table.steps:
                table.install(step, built)


async def _listen(site: web.TCPSite, key: str, address: str) -> None:
    """Start listening, or fail the start with one line naming the address."""
    try:
        await site.start()
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise GatedError(f"cannot listen on {address} ({key}): {reason}") from None


def restart_needed(old: Loaded, new: Loaded) -> list[str]:
    """What differs between two configs that only a restart applies (by key, never value)."""
    changed = config_mod.restart_changes(old.config, new.config)
    # The same words can name other files when the config's symlink now points
    # into another folder (relative paths follow the file, not the link).
    if old.store_path != new.store_path and "log" not in changed:
        changed.append("log.path (now names another file)")
    if old.key_path != new.key_path and "site.key_file" not in changed:
        changed.append("site.key_file (now names another file)")
    if old.mqtt_ca_file != new.mqtt_ca_file and "mqtt" not in changed:
        changed.append("mqtt.tls_ca (now names another file)")
    return changed


def claim_state(config_path: str | None) -> statelock.StateLock | None:
    """The state lock, taken before the config is compiled, where its store will be.

    A second daemon then stops before its compiler rewrites the running one's
    code book. The place comes from a quick look at the file, so only another
    holder is an error here; anything else (no such folder yet, a wrong
    guess) waits for the real path, which ``assemble`` locks.
    """
    store = compiler.hinted_store(config_path)
    if store is None or not store.parent.is_dir():
        return None
    try:
        return statelock.hold(store)
    except statelock.Held:
        raise
    except StoreError:
        return None


def make_link(loaded: Loaded) -> MqttLink | None:
    """The MQTT link ``[mqtt]`` asks for, or None without one."""
    config = loaded.config
    mqtt = config.mqtt
    if mqtt is None:
        return None
    from gated.mqtt.link import MqttLink

    return MqttLink(mqtt, prefix=config.mqtt_prefix, client_id=mqtt.client_id or
                    f"gated-{config.site.id}", ca_file=loaded.mqtt_ca_file)


def _stamp(path: Any) -> tuple[int, ...] | None:
    # stat follows a symlink: pointed at another file, the inode says so even
    # when size and mtime happen to match.
    with contextlib.suppress(OSError):
        info = path.stat()
        return (info.st_mtime_ns, info.st_size, info.st_ino, info.st_dev)
    return None
