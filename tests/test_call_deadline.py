"""One deadline per call: one timer bounds every wait, and every call is answered by it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gated.app import make_app
from gated.book import compiler
from gated.core.clock import SystemClock
from gated.core.deadline import Deadline
from gated.core.decide import Ledger, Status
from gated.core.lockout import Policy
from gated.site.gatekeeper import Answer, Gatekeeper, RawCall
from gated.site.store import Store, read_entries

from .helpers import (
    BARRIER,
    RESIDENT,
    SINGLE_USE,
    TOKEN,
    FakeActuator,
    TimerCountingLoop,
    write_config,
)


class HangingActuator:
    """An actuator whose open never completes, and that notes being given up on."""

    def __init__(self, gate: str) -> None:
        self.gate = gate
        self.given_up = False

    async def open(self) -> str:
        try:
            await asyncio.get_running_loop().create_future()  # no timer of its own
        except asyncio.CancelledError:
            self.given_up = True
            raise
        return "never"

    async def close(self) -> None:
        pass


@contextlib.asynccontextmanager
async def gatekeeper_on(tmp_path: Path, actuator: Any, deadline: float,
                        kind: type[Gatekeeper] = Gatekeeper) -> AsyncIterator[Gatekeeper]:
    """A real Gatekeeper on a real store (its writer running) with a single-use code."""
    loaded = compiler.load(write_config(tmp_path, SINGLE_USE, deadline=deadline))
    store = Store.open(tmp_path / "entries.sqlite3")
    gatekeeper = kind(loaded.book, Ledger.fresh(Policy()), {"barrier": actuator}, store,
                      SystemClock(), deadline=deadline)
    writer = asyncio.create_task(store.run())
    try:
        yield gatekeeper
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        store.close()


def test_a_hanging_actuator_is_answered_err_deadline_on_one_timer(tmp_path: Path) -> None:
    """A single-use code whose actuator never answers: ERR at the deadline, the open
    given up, the use refunded and the entry recorded as `deadline`; that call and the
    next (use made durable, open, entry made durable) each put one timer on the loop."""
    hanging = HangingActuator("barrier")
    deadline = 0.2

    async def calls() -> tuple[list[Answer], list[int], list[float]]:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, TimerCountingLoop)
        answers, timers, took = [], [], []
        async with gatekeeper_on(tmp_path, hanging, deadline) as gatekeeper:
            for actuator in (hanging, FakeActuator("barrier")):
                gatekeeper.actuators["barrier"] = actuator
                before, started = loop.timers, loop.time()
                answers.append(await gatekeeper.call(
                    RawCall(code="111111", did=BARRIER, callerid=RESIDENT)))
                timers.append(loop.timers - before)
                took.append(loop.time() - started)
            await gatekeeper.store.flush()
        return answers, timers, took

    with asyncio.Runner(loop_factory=TimerCountingLoop) as runner:
        answers, timers, took = runner.run(calls())
    assert [a.status for a in answers] == [Status.ERR, Status.ACK]  # the use came back
    assert hanging.given_up
    assert took[0] < deadline + 1.0  # answered at its deadline, not hung
    entries = list(reversed(read_entries(tmp_path / "entries.sqlite3")))
    assert [(e.status, e.actuator) for e in entries] == [("ERR", "deadline"), ("ACK", "faked")]
    assert timers == [1, 1]


class ForgetfulGatekeeper(Gatekeeper):
    """A gatekeeper with a bug: its open waits outside the call's deadline."""

    async def _open(self, gate: str, _deadline: Any,
                    can_play_tones: bool) -> tuple[Status, str, str]:
        await asyncio.get_running_loop().create_future()
        return Status.ACK, "never", ""


async def test_a_wait_the_gatekeeper_forgot_to_bound_is_still_answered_err(
        tmp_path: Path) -> None:
    """Even a wait no guard bounds ends at the call's deadline: the webhook answers ERR
    instead of leaving the PBX hanging."""
    loaded = compiler.load(write_config(tmp_path, deadline=0.2))
    async with gatekeeper_on(tmp_path, FakeActuator("barrier"), 0.2,
                             kind=ForgetfulGatekeeper) as gatekeeper:
        server = TestServer(make_app(gatekeeper, loaded.config.server))
        await server.start_server()
        try:
            async with aiohttp.ClientSession() as session:
                started = time.monotonic()
                async with session.get(server.make_url("/voipgrid"), params={
                        "token": TOKEN, "code": "471123", "did": BARRIER}) as response:
                    assert (response.status, await response.text()) == (200, "status=ERR")
                assert time.monotonic() - started < 3.0
        finally:
            await server.close()


async def test_a_wait_entered_after_the_deadline_never_starts() -> None:
    """Once the time is up, the next wait is refused before it begins (an open that
    would energise a relay at once is never made late)."""
    loop = asyncio.get_running_loop()
    deadline = Deadline(loop.time())
    started = []

    async def relay() -> None:
        started.append(True)

    try:
        with pytest.raises(TimeoutError), deadline:
            await relay()
    finally:
        deadline.close()
    assert started == []


async def test_a_cancel_from_elsewhere_stays_a_cancel() -> None:
    """A call cancelled by someone else (a shutdown) while it waits is not mistaken for
    its deadline: the cancellation goes on, and the deadline never fires later."""
    loop = asyncio.get_running_loop()
    waiting = asyncio.Event()

    async def call() -> None:
        deadline = Deadline(loop.time() + 0.1)
        try:
            with deadline:
                waiting.set()
                await loop.create_future()
        finally:
            deadline.close()

    task = asyncio.create_task(call())
    await waiting.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelling() == 1
