"""An entry that is not durable by the answer deadline is still written, later."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from pathlib import Path

from structlog.testing import capture_logs

from gated.book import compiler
from gated.core.clock import SystemClock
from gated.core.decide import Ledger, Status
from gated.core.lockout import Policy
from gated.site.gatekeeper import Gatekeeper, RawCall
from gated.site.store import Store, _Pending, read_entries

from .helpers import BARRIER, RESIDENT, FakeActuator, write_config


class SlowStore(Store):
    """A store whose disk takes longer than the answer deadline to commit."""

    def _write(self, batch: Sequence[_Pending]) -> None:
        time.sleep(0.3)
        super()._write(batch)


async def test_a_slow_disk_costs_durability_at_answer_time_not_the_entry(
        tmp_path: Path) -> None:
    """Past the deadline the answer goes out marked not durable; the entry still lands."""
    loaded = compiler.load(write_config(tmp_path))
    store = SlowStore.open(tmp_path / "entries.sqlite3")
    gatekeeper = Gatekeeper(loaded.book, Ledger.fresh(Policy()),
                            {"barrier": FakeActuator("barrier")}, store, SystemClock(),
                            deadline=0.05)
    writer = asyncio.create_task(store.run())
    try:
        with capture_logs() as logs:
            answer = await gatekeeper.call(RawCall(code="471123", did=BARRIER, callerid=RESIDENT))
        assert answer.status is Status.ACK
        assert [e["durable"] for e in logs if e["event"] == "entry"] == [False]
        assert await store.flush()
        (entry,) = read_entries(store.path)
        assert (entry.status, entry.credential) == ("ACK", "Demo")
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        store.close()
