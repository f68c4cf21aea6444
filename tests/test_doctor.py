from __future__ import annotations

import asyncio
import shutil
import socket
import sqlite3
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from gpiozero.pins.mock import MockFactory

from gated.book import codeset, compiler, signing, sitekey
from gated.book import config as config_mod
from gated.cli import main
from gated.commands import doctor
from gated.daemon import Daemon

from .helpers import config_text


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def site_config(tmp_path: Path, extra: str = "", *, port: int | None = None,
                **kwargs: Any) -> Path:
    """The test site on a known port, its pins chosen the way hardware/README.md says."""
    text = config_text(tmp_path, extra, **kwargs).replace(
        'listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port or free_port()}"', 1).replace(
        "pin = 27, active_high = false", "pin = 6, active_high = false").replace(
        'code = "471123"', 'code = "739261"')  # the example's demo code is public
    path = tmp_path / "gated.toml"
    path.write_text(text)
    return path


@pytest.fixture
async def running_site(tmp_path: Path, mock_factory: MockFactory) -> AsyncIterator[Path]:
    """A real daemon serving the webhook and /healthz on known ports; yields its config."""
    path = site_config(tmp_path, f'[metrics]\nlisten = "127.0.0.1:{free_port()}"\n')
    daemon = Daemon(compiler.load(path), mock_factory=mock_factory, install_signals=False)
    task = asyncio.create_task(daemon.run())
    while not daemon.metrics_listening and not task.done():  # noqa: ASYNC110 (no event to await)
        await asyncio.sleep(0.01)
    yield path
    daemon.stop.set()
    await asyncio.wait_for(task, 10)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[int]:
    """A real Mosquitto broker on a free port."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    broker = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.02)
    yield port
    broker.terminate()
    broker.wait(5)


def problems(findings: list[doctor.Finding]) -> list[str]:
    return [f"{f.topic}: {f.message}" for f in findings if f.level == "problem"]


async def test_a_healthy_mock_site_has_no_problems(running_site: Path, tmp_path: Path) -> None:
    """Against the running daemon on a machine without GPIO: mock pins, no problems."""
    dev = tmp_path / "dev"
    dev.mkdir()
    findings = await asyncio.to_thread(doctor.diagnose, str(running_site), dev=dev)
    assert problems(findings) == []
    messages = {(f.topic, f.message) for f in findings}
    assert ("gpio", "no GPIO chip; mock pins only") in messages
    assert any(t == "webhook" and "answers (403 without a token" in m for t, m in messages)
    assert any(t == "health" and m.endswith("/healthz: ok") for t, m in messages)
    assert any(t == "state" and "writable" in m for t, m in messages)


async def test_a_webhook_closing_this_machine_at_accept_is_no_problem(
        tmp_path: Path, mock_factory: MockFactory) -> None:
    """With allow_from naming only the PBX's addresses, the webhook closes the doctor's
    own connection at once: that is said to be as it should, not that nothing answers."""
    path = site_config(tmp_path, allow_from=("192.0.2.0/24",))
    daemon = Daemon(compiler.load(path), mock_factory=mock_factory, install_signals=False)
    task = asyncio.create_task(daemon.run())
    await asyncio.wait_for(daemon.ready.wait(), 10)
    try:
        findings = await asyncio.to_thread(doctor.check_webhook, compiler.load(path).config)
    finally:
        daemon.stop.set()
        await asyncio.wait_for(task, 10)
    assert [(f.level, f.message.split(" ", 1)[1]) for f in findings] == [
        ("ok", "closes this machine's connection at once (it is not in allow_from, "
               "as it should)")]


def test_a_broken_install_lists_each_problem_with_its_fix(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """gpio gates without GPIO, a boot-high relay pin, a public demo code, no daemon: exit 1."""
    path = site_config(tmp_path)
    path.write_text(path.read_text().replace('type = "mock", pin = 17, active_high = true',
                                             'type = "gpio", pin = 4, active_high = true')
                    .replace('code = "739261"', 'code = "471123"'))
    dev = tmp_path / "dev"
    dev.mkdir()
    assert main(["--config", str(path), "doctor", "--dev", str(dev)]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM  gpio     no GPIO chip, but gate(s) barrier use type gpio" in out
    assert "PROBLEM  pin      gate barrier relay on GPIO4 is pulled high from power-on" in out
    assert "PROBLEM  webhook  nothing answers on http://127.0.0.1:" in out
    assert "fix:     start gated (sudo systemctl start gated)" in out
    assert "PROBLEM  codes    the example config's demo credentials are here: Demo" in out
    assert out.rstrip().endswith("4 problem(s)")


def test_a_config_error_names_the_key_and_the_fix(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bad config is the one problem reported, with its key path and line."""
    path = site_config(tmp_path)
    path.write_text(path.read_text().replace('region = "NL"', 'region = "NL"\ncolour = 1'))
    assert main(["--config", str(path), "doctor"]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM  config" in out and "site.colour: unknown key" in out
    assert f"fix:     edit {path} (line 6), then run `gated check-config {path}`" in out


@pytest.mark.parametrize(
    ("pin", "active_high", "complaint"),
    [
        (17, True, None),
        (5, False, None),
        (4, True, "pulled high from power-on"),
        (27, False, "pulled low from power-on"),
        (14, True, "UART"),
        (0, False, "EEPROM"),
        (40, True, "not on the 40-pin header"),
    ],
)
def test_pin_choice_follows_the_boot_levels(pin: int, active_high: bool,
                                             complaint: str | None) -> None:
    """A relay pin is refused where its boot level would energise the relay."""
    (finding,) = doctor.check_pin_choice([doctor.PinUse("gate", "relay", pin, True, active_high)])
    if complaint is None:
        assert finding.level == "ok"
    else:
        assert finding.level == "problem" and complaint in finding.message
        assert "GPIO17" in finding.fix


def test_broker_reached_with_a_real_connect(mosquitto: int, tmp_path: Path) -> None:
    """A broker that accepts the MQTT CONNECT is ok; a closed port is a problem."""
    ok = doctor.check_broker(config_mod.MqttConfig(host="127.0.0.1", port=mosquitto), tmp_path)
    assert (ok.level, ok.message) == ("ok", f"127.0.0.1:{mosquitto} accepts gated's connection")
    down = doctor.check_broker(config_mod.MqttConfig(host="127.0.0.1", port=free_port()),
                               tmp_path)
    assert down.level == "problem" and "cannot reach" in down.message
    assert "[mqtt] host, port" in down.fix


def test_doctor_asks_a_3_1_1_site_for_the_brokers_message_size_limit(
        mosquitto: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """MQTT 3.1.1 cannot bound what the broker sends: doctor gives the broker's setting;
    with MQTT 5 it says the connection itself bounds it."""
    from gated.mqtt.link import MAX_PAYLOAD

    table = f'[mqtt]\nhost = "127.0.0.1"\nport = {mosquitto}\n'
    main(["--config", str(site_config(tmp_path, table + 'protocol = "3.1.1"\n')), "doctor"])
    out = capsys.readouterr().out
    assert "info     size     MQTT 3.1.1 cannot tell the broker the largest message" in out
    assert f"set `message_size_limit {MAX_PAYLOAD}` in the broker's mosquitto.conf" in out
    main(["--config", str(site_config(tmp_path, table)), "doctor"])
    out = capsys.readouterr().out
    assert "ok       size     MQTT 5: the broker sends gated no message over" in out
    assert "message_size_limit" not in out


def test_state_directory_checks(tmp_path: Path) -> None:
    """Missing-but-makeable, impossible, and an intact store each get their own word."""
    assert doctor.check_state(tmp_path / "new" / "entries.sqlite3")[0].level == "info"
    blocker = tmp_path / "file"
    blocker.write_text("")
    (finding,) = doctor.check_state(blocker / "state" / "entries.sqlite3")
    assert finding.level == "problem" and "cannot be made" in finding.message
    store = tmp_path / "entries.sqlite3"
    conn = sqlite3.connect(store)
    with conn:
        conn.execute("CREATE TABLE entries (id INTEGER)")
        conn.execute("INSERT INTO entries VALUES (1)")
    conn.close()
    (finding,) = doctor.check_state(store)
    assert (finding.level, finding.message) == ("ok", f"{tmp_path} writable; 1 entries, "
                                                "store intact")


def test_a_device_that_is_not_a_gpio_chip_is_reported(tmp_path: Path) -> None:
    """A gpiochip node that answers no GPIO ioctl is named, and no header chip is found."""
    dev = tmp_path / "dev"
    dev.mkdir()
    (dev / "gpiochip0").write_text("")
    use = doctor.PinUse("barrier", "relay", 17, real=True)
    findings = doctor.check_gpio([use], dev)
    assert any(f.level == "info" and f.message.startswith(f"{dev}/gpiochip0:") for f in findings)
    assert any(f.level == "problem" and "no Raspberry Pi GPIO header chip" in f.message
               for f in findings)


def test_gpio_ioctl_answers_are_decoded() -> None:
    """The chip label and a line's consumer come out of the kernel's structs."""
    chip = struct.pack("32s32sI", b"gpiochip0", b"pinctrl-rp1", 54)
    assert doctor.parse_chip_info(chip) == ("pinctrl-rp1", 54)
    line = struct.pack("II32s32s", 17, doctor.GPIOLINE_FLAG_KERNEL | 2, b"GPIO17", b"lg")
    assert doctor.parse_line_info(line) == ("lg", True)
    assert doctor.parse_line_info(struct.pack("II32s32s", 6, 0, b"GPIO6", b"")) == ("", False)


def test_the_compiled_book_is_reported_as_a_restart_will_find_it(tmp_path: Path) -> None:
    """None yet, then matching (a restart maps it), then stale after an edit."""
    path = site_config(tmp_path)

    def book() -> doctor.Finding:
        (finding,) = [f for f in doctor.diagnose(str(path), dev=tmp_path)
                      if f.topic == "book"]
        return finding

    assert (book().level, "no compiled code book" in book().message) == ("info", True)
    compiler.load_for_daemon(path)
    assert book().level == "ok" and "matches this config (3 static codes" in book().message
    path.write_text(path.read_text().replace('code = "5555"', 'code = "5556"'))
    assert book().level == "info" and "compiles it again" in book().message


def test_the_fleet_key_is_reported_by_its_fingerprint(tmp_path: Path) -> None:
    """With a fleet prefix: no fleet key, or no public signing key, is a problem with its
    fix; keys are shown by their fingerprints (never their bytes), to compare across
    sites; a signing key on the machine is said (it belongs on staff machines only)."""
    path = site_config(tmp_path, '[mqtt]\nport = 1\nfleet_prefix = "gated/fleet"\n')

    def fleet() -> list[doctor.Finding]:
        return [f for f in doctor.diagnose(str(path), dev=tmp_path) if f.topic == "fleet"]

    missing, unsigned = fleet()
    assert missing.level == "problem" and "no fleet key" in missing.message
    assert "fleet-key" in missing.fix
    assert unsigned.level == "problem" and "refuses every fleet code set" in unsigned.message
    key_path = tmp_path / "state" / "fleet.key"
    key = sitekey.ensure_key(key_path, "fleet key")
    signer, _ = signing.make_keys(key_path)
    found, trusted = fleet()
    assert found.level == "ok" and codeset.fingerprint(key) in found.message
    assert key.hex() not in found.message
    assert trusted.level == "ok" and signer.fingerprint in trusted.message
    assert "is here too" in trusted.message
    signing.private_path(key_path).unlink()
    assert "is here too" not in fleet()[1].message


def test_doctor_warns_where_the_local_broker_would_fail_a_fleet_of_1000_sites(
        tmp_path: Path) -> None:
    """On a fleet's staff machine with the broker on it, doctor reads Debian's
    mosquitto.service and mosquitto.conf and says, with the fix, where a large fleet
    would break them: 1,024 open files, no max_queued_bytes, a save per change; it is
    content once the drop-in and settings are there, and says nothing of a remote broker."""
    root = tmp_path / "root"
    (root / "lib/systemd/system").mkdir(parents=True)
    (root / "lib/systemd/system/mosquitto.service").write_text(
        "[Unit]\nDescription=Mosquitto MQTT Broker\n\n[Service]\nType=notify\n"
        "ExecStart=/usr/sbin/mosquitto -c /etc/mosquitto/mosquitto.conf\n")
    (root / "etc/mosquitto/conf.d").mkdir(parents=True)
    (root / "etc/mosquitto/mosquitto.conf").write_text(
        "# Place your local configuration in /etc/mosquitto/conf.d/\n"
        "persistence true\npersistence_location /var/lib/mosquitto/\n"
        "include_dir /etc/mosquitto/conf.d\n")
    (root / "etc/mosquitto/conf.d/gated.conf").write_text(
        "autosave_on_changes true\nautosave_interval 1\n")
    table = '[mqtt]\nhost = "localhost"\nport = 1\nfleet_prefix = "gated/fleet"\n'
    path = site_config(tmp_path, table)

    def capacity(at: Path = root) -> list[doctor.Finding]:
        return [f for f in doctor.diagnose(str(path), dev=tmp_path, root=at)
                if f.topic == "capacity"]

    files, queued, autosave = capacity()
    assert files.level == "info" and "1024 (systemd's default)" in files.message
    assert "denied access by tcpd" in files.message
    assert "mosquitto.service.d/nofile.conf" in files.fix and "LimitNOFILE=65536" in files.fix
    assert queued.level == "info" and "max_queued_bytes 16777216" in queued.fix
    assert autosave.level == "info" and "every 1 changes" in autosave.message
    assert "autosave_interval 60" in autosave.fix

    (root / "etc/systemd/system/mosquitto.service.d").mkdir(parents=True)
    (root / "etc/systemd/system/mosquitto.service.d/nofile.conf").write_text(
        "[Service]\nLimitNOFILE=65536\n")
    (root / "etc/mosquitto/conf.d/gated.conf").write_text(
        "autosave_on_changes false\nautosave_interval 60\nmax_queued_bytes 16777216\n")
    assert [(f.level, f.message) for f in capacity()] == [
        ("ok", "mosquitto.service LimitNOFILE=65536"), ("ok", "max_queued_bytes 16,777,216"),
        ("ok", "autosave every 60 seconds")]
    assert capacity(tmp_path / "nothing") == []

    path = site_config(tmp_path, table.replace("localhost", "broker.example.nl"))
    assert capacity() == []
