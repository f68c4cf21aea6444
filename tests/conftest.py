from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from gpiozero import Device
from gpiozero.pins.mock import MockFactory
from hypothesis import settings

from gated.book import compiler
from gated.daemon import Daemon

from .broker import Mosquitto, Probe
from .fleet import Fleet, start_fleet
from .helpers import TOKEN, write_config

# Property tests check behaviour, never speed: a shared machine under load makes any
# per-example deadline fail now and then (the benchmark measures speed).
settings.register_profile("gated", deadline=None)
settings.load_profile("gated")

@pytest.fixture
def mock_factory() -> Iterator[MockFactory]:
    """gpiozero's MockFactory, reset after the test (the gpiozero tests' pattern)."""
    factory = MockFactory()
    yield factory
    factory.reset()
    Device.pin_factory = None


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A real Mosquitto on a free port (list it before start_daemon: it stops last)."""
    server = Mosquitto(tmp_path / "broker")
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def probe(broker: Mosquitto) -> AsyncIterator[Probe]:
    """The test's own MQTT client on ``broker``."""
    client = await Probe(broker.port).connect()
    yield client
    await client.disconnect()


class Running:
    """A daemon running in the test's event loop on a free port."""

    def __init__(self, daemon: Daemon, task: asyncio.Task[None],
                 session: aiohttp.ClientSession, factory: MockFactory) -> None:
        self.daemon = daemon
        self.task = task
        self.session = session
        self.factory = factory

    @property
    def url(self) -> str:
        return self.daemon.url

    async def stop(self) -> None:
        """Stop the daemon as SIGTERM would, and wait until it has finished."""
        self.daemon.stop.set()
        await asyncio.wait_for(self.task, 10)

    def pin(self, number: int) -> Any:
        return self.factory.pin(number)

    async def get(self, token: str = TOKEN, **params: str) -> tuple[int, str]:
        async with self.session.get(self.url, params={"token": token, **params}) as response:
            return response.status, await response.text()

    async def post(self, data: Any, **params: str) -> tuple[int, str]:
        async with self.session.post(self.url, params=params, data=data) as response:
            return response.status, await response.text()


StartDaemon = Callable[..., "asyncio.Future[Running]"]


@pytest.fixture
async def start_daemon(tmp_path: Path, mock_factory: MockFactory
                       ) -> AsyncIterator[Callable[..., Any]]:
    """Start the real daemon (real aiohttp server, real SQLite, mock pins)."""
    started: list[tuple[Daemon, asyncio.Task[None], aiohttp.ClientSession]] = []

    async def start(extra: str = "", *, actuators: dict[str, Any] | None = None,
                    clock: Any = None, config: Path | None = None, **kwargs: Any) -> Running:
        """``config``: run on this file as it stands instead of writing gated.toml."""
        path = config or write_config(tmp_path, extra, **kwargs)
        daemon = Daemon(compiler.load(path, create_key=True), mock_factory=mock_factory,
                        install_signals=False)
        if clock is not None:
            daemon.clock = clock
        task = asyncio.create_task(daemon.run())
        for _ in range(500):
            if daemon.ready.is_set() or task.done():
                break
            await asyncio.sleep(0.01)
        if task.done():
            task.result()
        assert daemon.gatekeeper is not None
        if actuators:
            daemon.gatekeeper.actuators.update(actuators)
        session = aiohttp.ClientSession()
        started.append((daemon, task, session))
        return Running(daemon, task, session, mock_factory)

    yield start
    for daemon, task, session in started:
        await session.close()
        daemon.stop.set()
        await asyncio.wait_for(task, 10)


@pytest.fixture
async def make_fleet(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Start central + two bridged edges (tests/fleet.py), linked; all stopped after."""
    fleets: list[Fleet] = []

    async def make(**options: Any) -> Fleet:
        fleet = start_fleet(tmp_path / f"fleet{len(fleets)}", **options)
        fleets.append(fleet)
        await asyncio.gather(*(fleet.linked(edge) for edge in fleet.edges))
        return fleet

    yield make
    for fleet in fleets:
        await fleet.close()


@pytest.fixture
async def fleet(make_fleet: Callable[..., Any]) -> Fleet:
    """Central + edge1 (noord) + edge2 (zuid, behind a link a test can cut), default settings."""
    return await make_fleet()  # type: ignore[no-any-return]
