from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from .helpers import BARRIER, RESIDENT, TOKEN, write_config

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "gated.service"
MAX_EXPOSURE = 2.0


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_unit_hardening_scores_two_or_lower() -> None:
    """systemd-analyze rates the shipped unit's exposure at 2.0 or lower."""
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True, text=True, timeout=60, check=False)
    match = re.search(r"Overall exposure level for gated\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match[1]) <= MAX_EXPOSURE, result.stdout


def test_unit_runs_the_installed_daemon_as_gated_with_gpio_access() -> None:
    """The unit matches what install.sh lays down and what the daemon needs."""
    unit = unit_settings()
    assert unit["Type"] == ["notify"]
    assert unit["ExecStart"] == ["/opt/gated/venv/bin/gated --config /etc/gated/gated.toml run"]
    assert (unit["User"], unit["SupplementaryGroups"]) == (["gated"], ["gpio"])
    assert unit["StateDirectory"] == ["gated"]
    assert unit["WorkingDirectory"] == ["/var/lib/gated"]
    assert unit["DeviceAllow"] == ["char-gpiochip rw"]
    assert unit["Restart"] == ["on-failure"]
    assert float(unit["WatchdogSec"][0]) > 0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


Daemon = tuple[subprocess.Popen[bytes], socket.socket, int]


@contextlib.contextmanager
def notifying_daemon(tmp_path: Path, **env: str) -> Iterator[Daemon]:
    """A real daemon process on the test site, its NOTIFY_SOCKET listener and its port;
    killed at the end if it still runs."""
    port = free_port()
    config = write_config(tmp_path)
    config.write_text(config.read_text().replace('listen = "127.0.0.1:0"',
                                                 f'listen = "127.0.0.1:{port}"'))
    address = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(address)
    listener.settimeout(10)
    environ = {**os.environ, "NOTIFY_SOCKET": address, **env}
    environ.pop("WATCHDOG_PID", None)
    daemon = subprocess.Popen([sys.executable, "-m", "gated", "--config", str(config), "run"],
                              env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield daemon, listener, port
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        assert daemon.stderr is not None
        daemon.stderr.close()
        listener.close()


def call_resident(port: int) -> bytes:
    """A resident's call (no code) to the daemon: its answer's body."""
    query = f"token={TOKEN}&code=&did={BARRIER}&callerid={RESIDENT}".replace("+", "%2B")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/voipgrid?{query}",
                                timeout=5) as response:
        body: bytes = response.read()
    return body


def test_daemon_sends_ready_then_watchdog_and_stops_on_sigterm(tmp_path: Path) -> None:
    """A real daemon process says READY=1 once answering, pings WATCHDOG=1, exits 0 on TERM."""
    with notifying_daemon(tmp_path, WATCHDOG_USEC="200000") as (daemon, listener, port):
        assert listener.recv(256) == b"READY=1"
        # READY means the webhook answers now, not soon.
        assert call_resident(port) == b"status=ACK"
        started = time.monotonic()
        pings = [listener.recv(256) for _ in range(3)]
        assert pings == [b"WATCHDOG=1"] * 3
        assert time.monotonic() - started < 1.0  # every 0.1 s, half of WATCHDOG_USEC
        daemon.send_signal(signal.SIGTERM)
        while (message := listener.recv(256)) == b"WATCHDOG=1":
            pass
        assert message == b"STOPPING=1"
        assert daemon.wait(10) == 0


def test_a_site_without_code_sets_or_a_staff_page_carries_neither_library(
        tmp_path: Path) -> None:
    """`gated run` on a site with no broker and no staff page loads neither cryptography
    (signed code sets) nor argon2 (the page's passwords), and makes no argon2 hash at
    start: every command built every command's parser, and both came in with it
    (~6 MB of the daemon's memory, and a 64 MiB hash at each start)."""
    with notifying_daemon(tmp_path) as (daemon, listener, port):
        assert listener.recv(256) == b"READY=1"
        assert call_resident(port) == b"status=ACK"
        mapped = Path(f"/proc/{daemon.pid}/maps").read_text()
        libraries = {line.split()[-1] for line in mapped.splitlines() if ".so" in line}
        assert [path for path in libraries if "/cryptography/" in path
                or "/argon2" in path or "_cffi_backend" in path] == []
        # The high-water mark stays far below an argon2 hash's 64 MiB over the start.
        status = Path(f"/proc/{daemon.pid}/status").read_text()
        peak_kib = int(status.split("VmHWM:")[1].split()[0])
        rss_kib = int(status.split("VmRSS:")[1].split()[0])
        assert peak_kib - rss_kib < 32 * 1024
