"""A second baresip as a real caller: it dials gated's engine and reports what it saw."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

from gated.pbx.baresip import free_port, netstring

from .sipp import free_udp


class Caller:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.events: list[str] = []  # the event types, in order
        self.heard: list[str] = []   # the keys the far end sent (telephone-events)

    def dial(self, uri: str) -> None:
        self.writer.write(netstring({"command": "dial", "params": uri, "token": "d1"}))


async def _read(reader: asyncio.StreamReader, caller: Caller) -> None:
    while True:
        size = int((await reader.readuntil(b":"))[:-1])
        message = json.loads((await reader.readexactly(size + 1))[:-1])
        if message.get("event"):
            caller.events.append(str(message.get("type")))
            if message.get("type") == "CALL_DTMF_START":
                caller.heard.append(str(message.get("param")))


def _write_files(folder: Path, number: str, host: str, ctrl: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config").write_text("\n".join([
        "poll_method epoll", f"net_interface {host}", f"sip_listen {host}:{free_udp(host)}",
        "audio_player aubridge,play-null", "audio_source aubridge,src-null",
        "audio_alert aubridge,alert-null", "statmode_default off",
        # Every key at once, a repeated one too (the default jitter buffer drops them).
        "jitter_buffer_delay 0-0",
        "module_path /usr/lib/baresip/modules", "module g711.so", "module aubridge.so",
        "module_app account.so", "module_app menu.so", "module_app ctrl_tcp.so",
        f"ctrl_tcp_listen 127.0.0.1:{ctrl}", ""]))
    (folder / "accounts").write_text(f"<sip:{number}@{host}>;regint=0\n")


@contextlib.asynccontextmanager
async def baresip_caller(folder: Path, number: str, host: str) -> AsyncIterator[Caller]:
    """A baresip with the account ``sip:<number>@<host>``, its control port connected."""
    ctrl = free_port()
    _write_files(folder, number, host, ctrl)
    binary = shutil.which("baresip")
    assert binary is not None
    process = await asyncio.create_subprocess_exec(
        binary, "-f", str(folder), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    reading: asyncio.Task[None] | None = None
    writer: asyncio.StreamWriter | None = None
    try:
        for _ in range(200):
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", ctrl)
                break
            except OSError:
                await asyncio.sleep(0.05)
        assert writer is not None, "the caller's baresip never opened its control port"
        caller = Caller(writer)
        reading = asyncio.create_task(_read(reader, caller))
        yield caller
    finally:
        if reading is not None:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, asyncio.IncompleteReadError):
                await reading
        if writer is not None:
            writer.close()
        process.kill()
        await process.wait()
