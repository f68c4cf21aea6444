"""The one place that assembles the daemon from config and owns its lifecycle.

Start: relays off, store opened, ledger restored, webhook listening, READY.
Stop (SIGTERM/SIGINT): stop accepting, finish in-flight answers, relays off,
entries flushed, store closed. SIGHUP or a change of the file reloads the
code book; a bad file keeps the old one serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web

from gated import actuators as actuator_port
from gated import config as config_mod
from gated.app import make_app
from gated.clock import Clock, SystemClock
from gated.config import Loaded, split_listen
from gated.errors import ConfigError
from gated.gatekeeper import Gatekeeper
from gated.lockout import Policy
from gated.notify import notify, watchdog_interval
from gated.store import Store

log = structlog.get_logger("gated.daemon")

RELOAD_POLL_SECONDS = 2.0


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
    gatekeeper: Gatekeeper | None = None
    listening: list[tuple[str, int]] = field(default_factory=list)
    _reloads: asyncio.Queue[str] = field(default_factory=asyncio.Queue)

    @property
    def url(self) -> str:
        host, port = self.listening[0]
        return f"http://{host}:{port}{self.loaded.config.server.path}"

    def assemble(self) -> Gatekeeper:
        config = self.loaded.config
        built: dict[str, actuator_port.Actuator] = {}
        try:
            for name, gate in config.gates.items():
                built[name] = actuator_port.build(name, gate.actuator,
                                                  mock_factory=self.mock_factory)
            store = Store.open(self.loaded.store_path)
        except BaseException:
            for actuator in built.values():
                asyncio.get_running_loop().create_task(actuator.close())
            raise
        ledger = store.load_ledger(policy(self.loaded))
        return Gatekeeper(self.loaded.book, ledger, built, store, self.clock,
                          deadline=config.server.answer_deadline)

    async def run(self) -> None:
        config = self.loaded.config
        gatekeeper = self.gatekeeper = self.assemble()
        runner = web.AppRunner(make_app(gatekeeper, config.server), handle_signals=False,
                               access_log=None,
                               shutdown_timeout=config.server.answer_deadline + 1.0)
        loop = asyncio.get_running_loop()
        if self.install_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, self.stop.set)
            loop.add_signal_handler(signal.SIGHUP, lambda: self._reloads.put_nowait("SIGHUP"))
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(gatekeeper.store.run(), name="store-writer")
                tasks.create_task(self._watch_file(), name="config-watch")
                tasks.create_task(self._reloader(), name="config-reload")
                await runner.setup()
                host, port = split_listen(config.server.listen)
                site = web.TCPSite(runner, host, port, reuse_address=True)
                await site.start()
                self.listening = [s.getsockname()[:2] for s in site._server.sockets]  # type: ignore[union-attr]
                tasks.create_task(self._watchdog(), name="watchdog")
                log.info("listening", address=config.server.listen, path=config.server.path,
                         gates=sorted(config.gates), credentials=gatekeeper.book.credential_count,
                         store=str(gatekeeper.store.path))
                notify("READY=1")
                await self.stop.wait()
                log.info("stopping")
                notify("STOPPING=1")
                await runner.cleanup()  # stop accepting, finish in-flight answers
                await gatekeeper.close()  # relays off
                await gatekeeper.store.flush()
                raise _Stop
        except* _Stop:
            pass
        finally:
            if self.install_signals:
                for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(signum)
            await runner.cleanup()
            await gatekeeper.close()
            gatekeeper.store.close()
            log.info("stopped")

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
            # Parsing 100,000 codes takes a while: off the loop, so calls go on.
            with long_lived():
                loaded = await asyncio.to_thread(config_mod.load, self.loaded.path)
        except ConfigError as exc:
            log.error("config reload refused; the old config keeps serving",
                      error=str(exc), trigger=why)
            return False
        old, new = self.loaded.config, loaded.config
        if (new.gates.keys() != old.gates.keys()
                or any(new.gates[g].actuator != old.gates[g].actuator for g in new.gates)
                or new.server != old.server or new.log != old.log):
            log.error("config reload refused: gates, actuators, [server] or [log] changed; "
                      "restart gated to apply them", trigger=why)
            return False
        gatekeeper.swap(loaded.book)
        self.loaded = loaded
        log.info("config reloaded", credentials=gatekeeper.book.credential_count, trigger=why)
        return True

    async def _watch_file(self) -> None:
        path = self.loaded.path
        last = _stamp(path)
        while True:
            await asyncio.sleep(RELOAD_POLL_SECONDS)
            current = _stamp(path)
            if current != last:
                last = current
                self._reloads.put_nowait("file changed")

    async def _watchdog(self) -> None:
        interval = watchdog_interval()
        if interval is None:
            return
        while True:
            notify("WATCHDOG=1")
            await asyncio.sleep(interval)


def _stamp(path: Any) -> tuple[int, int] | None:
    with contextlib.suppress(OSError):
        info = path.stat()
        return (info.st_mtime_ns, info.st_size)
    return None
