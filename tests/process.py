"""Run the real daemon as a subprocess and read its JSON log lines."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class DaemonProcess:
    """``python -m gated run`` with its stdout parsed as JSON events."""

    def __init__(self, config: Path, env: dict[str, str] | None = None,
                 preexec_fn: Callable[[], None] | None = None) -> None:
        self.events: list[dict[str, Any]] = []
        self._lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gated", "-c", str(config), "run"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(env or {})}, preexec_fn=preexec_fn,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = {"event": "non-json", "line": line.rstrip()}
            self._lines.put(event)

    def wait_for(self, name: str, timeout: float = 15.0, **fields: Any) -> dict[str, Any]:
        """Return the first (new) event called ``name`` with ``fields``."""
        for event in self.events:
            if event.get("event") == name and all(event.get(k) == v for k, v in fields.items()):
                return event
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                event = self._lines.get(timeout=0.05)
            except queue.Empty:
                if self.proc.poll() is not None and self._lines.empty():
                    break
                continue
            self.events.append(event)
            if event.get("event") == name and all(event.get(k) == v for k, v in fields.items()):
                return event
        said = [e["line"] for e in self.events if e.get("event") == "non-json"]
        raise AssertionError(f"no {name!r} event; saw {[e.get('event') for e in self.events]}"
                             + (f"; it said {said}" if said else ""))

    def drain(self, timeout: float = 5.0) -> list[dict[str, Any]]:
        self._reader.join(timeout)
        while not self._lines.empty():
            self.events.append(self._lines.get())
        return self.events

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def stop(self) -> int:
        """Stop (SIGTERM, then SIGKILL) and release the pipe; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        code = self.proc.wait(10)
        self.drain()
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return code
