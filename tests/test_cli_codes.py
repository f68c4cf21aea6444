"""``gated codes put|rm|ls`` against a real broker and a running daemon."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from gated.cli import main

from .broker import Mosquitto, Probe, eventually, mqtt_ready, mqtt_table
from .helpers import BARRIER, DOOR, FakeClock, write_config

LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[")


async def gated(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Run the command line in a thread (it runs its own event loop); (exit code, stdout)."""
    capsys.readouterr()
    code = await asyncio.to_thread(main, list(argv))
    # The daemon in the same process logs to stdout too; keep the tool's lines.
    out = capsys.readouterr().out
    return code, "".join(line for line in out.splitlines(keepends=True)
                         if not LOG_LINE.match(line))


async def test_put_ls_rm_round_trip(broker: Mosquitto, start_daemon: Any, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """put publishes and reports gated's verdict; ls lists without digits unless asked;
    rm deletes; the webhook answers follow each step."""
    running = await start_daemon(mqtt_table(broker))
    await mqtt_ready(running)
    config = str(tmp_path / "gated.toml")
    code, out = await gated(capsys, "-c", config, "codes", "put", "visitor-1", "--code",
                            "246810", "--gates", "barrier,door", "--name", "Jan's visitor",
                            "--valid-until", "2099-12-24T18:00", "--max-uses", "3")
    assert code == 0, out
    assert out.splitlines() == ["published gated/test/codes/visitor-1 (as a keyed hash)",
                                "applied by gated at site test"]
    assert await running.get(code="246810", did=DOOR) == (200, "status=ACK")

    code, out = await gated(capsys, "-c", config, "codes", "ls", "--broker")
    assert code == 0
    assert "visitor-1" in out and "Jan's visitor" in out and "2099-12-24T18:00:00" in out
    assert "246810" not in out
    # The broker holds only the keyed hash, so not even --show-codes can show digits.
    code, out = await gated(capsys, "-c", config, "codes", "ls", "--broker", "--show-codes")
    assert "246810" not in out and "visitor-1" in out
    code, out = await gated(capsys, "-c", config, "codes", "ls", "--broker", "--json")
    (listed,) = [json.loads(line) for line in out.splitlines()]
    assert listed == {"scope": "site", "id": "visitor-1", "name": "Jan's visitor",
                      "gates": ["barrier", "door"], "valid_until": "2099-12-24T18:00:00",
                      "max_uses": 3}

    code, out = await gated(capsys, "-c", config, "codes", "rm", "visitor-1")
    assert (code, out.strip()) == (0, "deleted gated/test/codes/visitor-1")
    bridge = running.daemon.bridge
    await eventually(lambda: bridge.codes.get("site", "visitor-1") is None)
    assert await running.get(code="246810", did=DOOR) == (200, "status=NAK")
    code, out = await gated(capsys, "-c", config, "codes", "rm", "visitor-1")
    assert code == 1 and "was not on the broker" in out
    code, out = await gated(capsys, "-c", config, "codes", "ls", "--broker")
    assert out.strip() == "no codes on the broker"


async def test_made_up_code_is_printed_once_and_works(broker: Mosquitto, start_daemon: Any,
                                                      tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    """put without --code makes up random digits and prints them; they open the gate."""
    running = await start_daemon(mqtt_table(broker))
    await mqtt_ready(running)
    code, out = await gated(capsys, "-c", str(tmp_path / "gated.toml"), "codes", "put",
                            "courier", "--gates", "barrier", "--digits", "8")
    assert code == 0, out
    (digits,) = re.findall(r"^code: (\d{8})$", out, re.MULTILINE)
    assert await running.get(code=digits, did=BARRIER) == (200, "status=ACK")


async def test_put_reports_refusals_from_here_and_from_gated(
        broker: Mosquitto, probe: Probe, start_daemon: Any, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A code this config already shows is wrong is not published; one only gated can
    refuse (digits taken) is published and the refusal reported, exit 1."""
    await probe.subscribe("gated/test/codes/#")
    running = await start_daemon(mqtt_table(broker))
    await mqtt_ready(running)
    config = str(tmp_path / "gated.toml")
    code, out = await gated(capsys, "-c", config, "codes", "put", "v", "--code", "246810",
                            "--gates", "nowhere")
    assert (code, out.strip()) == (2, "not published: gates[0]: no gate named 'nowhere'")
    code, out = await gated(capsys, "-c", config, "codes", "put", "v", "--code", "5555",
                            "--gates", "barrier")
    assert code == 1
    assert out.splitlines()[-1] == "refused by gated at site test: not accepted"
    assert [m.topic for m in probe.on("gated/test/codes/+")] == ["gated/test/codes/v"]


async def test_put_with_no_daemon_says_so(broker: Mosquitto, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """With gated away the code is still published (retained) and the tool says so."""
    path = write_config(tmp_path, mqtt_table(broker))
    code, out = await gated(capsys, "-c", str(path), "codes", "put", "v", "--code", "246810",
                            "--gates", "barrier", "--wait", "0.3", "--plain")
    assert code == 0
    assert "no word from gated at site test within 0.3s" in out


async def test_broker_down_is_a_clear_error(broker: Mosquitto, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """No broker: one line naming it, exit 2, no traceback."""
    path = write_config(tmp_path, mqtt_table(broker))
    broker.stop()
    capsys.readouterr()
    code = await asyncio.to_thread(main, ["-c", str(path), "codes", "ls", "--broker"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"error: MQTT broker 127.0.0.1:{broker.port}:")


async def test_visitor_code_with_mqtt_lives_on_the_broker_as_a_hash_and_is_pruned(
        broker: Mosquitto, probe: Any, start_daemon: Any, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`codes issue` with [mqtt] publishes a hashed managed code that opens once; once
    expired (plus keep_expired) the daemon deletes it from the broker."""
    clock = FakeClock(wall=time.time())
    running = await start_daemon(mqtt_table(broker) + "\n[visitors]\nkeep_expired = 0\n",
                                 clock=clock)
    await mqtt_ready(running)
    config = str(tmp_path / "gated.toml")
    code, out = await gated(capsys, "-c", config, "codes", "issue", "--name", "Loodgieter",
                            "--gates", "barrier", "--valid-for", "1h", "--max-uses", "1")
    assert code == 0, out
    published, digits_line, verdict = out.splitlines()
    assert published.startswith("published gated/test/codes/v-") and "keyed hash" in published
    digits = digits_line.removeprefix("code: ")
    assert digits.isdigit() and len(digits) == 6
    assert verdict == "applied by gated at site test"
    topic = published.split()[1]
    await probe.subscribe(topic)
    (retained,) = await probe.wait_for(topic, 1)
    assert digits.encode() not in retained.payload and b"hmac-sha256:" in retained.payload
    assert await running.get(code=digits, did=BARRIER) == (200, "status=ACK")
    assert await running.get(code=digits, did=BARRIER) == (200, "status=NAK")
    await running.daemon.gatekeeper.store.flush()
    code, out = await gated(capsys, "-c", config, "codes", "ls")
    (row,) = [line.split() for line in out.splitlines() if "Loodgieter" in line]
    assert row[0] == "visitor" and row[2] == "barrier" and row[-1] == "0"  # no uses left

    clock.advance(3600 + 61)  # expired, and the daemon's minute-long prune interval passed
    bridge = running.daemon.bridge
    await eventually(lambda: not bridge.codes.applied, within=10)
    messages = await probe.wait_for(topic, 2)
    assert messages[-1].payload == b""


async def test_put_without_the_site_key_refuses_to_send_digits(
        broker: Mosquitto, probe: Any, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """On a machine without the site key, put refuses (digits would travel in clear)
    unless --plain says that is meant."""
    config = write_config(tmp_path, mqtt_table(broker))
    await probe.subscribe("gated/test/codes/+")
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["-c", str(config), "codes", "put", "v1", "--code",
                                          "246810", "--gates", "barrier", "--wait", "0"]) == 2
    assert "no site key" in capsys.readouterr().err
    assert probe.on("gated/test/codes/+") == []
    code, out = await gated(capsys, "-c", str(config), "codes", "put", "v1", "--code",
                            "246810", "--gates", "barrier", "--wait", "0", "--plain")
    assert code == 0 and "keyed hash" not in out
    (sent,) = await probe.wait_for("gated/test/codes/+", 1)
    assert b"246810" in sent.payload


async def test_import_publishes_a_csvs_codes_as_keyed_hashes(
        broker: Mosquitto, start_daemon: Any, tmp_path: Path, probe: Probe,
        capsys: pytest.CaptureFixture[str]) -> None:
    """import (no --fleet) publishes the file as the site's signed set, hashed with the site
    key, and says the site applied it; the site opens with them; the broker never holds
    the digits."""
    await probe.subscribe("gated/test/#")
    running = await start_daemon(mqtt_table(broker))
    await mqtt_ready(running)
    csv = tmp_path / "codes.csv"
    csv.write_text("\ufeffname;code;gates;schedule\r\n"
                   "Cleaner;61616161;door;mon-sun 00:00-23:59\r\n"
                   "Flat 12;62626262;barrier;\r\n")
    code, out = await gated(capsys, "-c", str(tmp_path / "gated.toml"), "codes", "import",
                            str(csv))
    assert code == 0, out
    assert "published 2 codes" in out and "applied by gated at site test: 2 codes" in out
    assert len(running.daemon.gatekeeper.book.siteset) == 2
    assert await running.get(code="61616161", did=DOOR) == (200, "status=ACK")
    assert await running.get(code="62626262", did=BARRIER) == (200, "status=ACK")
    assert await running.get(code="62626262", did=DOOR) == (200, "status=NAK")
    everything = b"".join(m.payload for m in probe.received)
    assert b"61616161" not in everything and b"62626262" not in everything


async def test_a_staff_machine_needs_only_its_site_id_and_the_broker(
        broker: Mosquitto, start_daemon: Any, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A staff machine's file of [site] id (and the site key's path) and [mqtt], with no
    token, gate or log path, is enough to put, list and delete a site's codes."""
    running = await start_daemon(mqtt_table(broker))
    await mqtt_ready(running)
    staff = tmp_path / "staff" / "staff.toml"
    staff.parent.mkdir()
    staff.write_text(f'[site]\nid = "test"\nkey_file = "{tmp_path / "state" / "site.key"}"\n'
                     + mqtt_table(broker))
    code, out = await gated(capsys, "-c", str(staff), "codes", "put", "cleaner", "--code",
                            "246810", "--gates", "barrier", "--name", "Cleaner")
    assert code == 0, out
    assert out.splitlines() == ["published gated/test/codes/cleaner (as a keyed hash)",
                                "applied by gated at site test"]
    assert await running.get(code="246810", did=BARRIER) == (200, "status=ACK")
    code, out = await gated(capsys, "-c", str(staff), "codes", "ls", "--broker", "--json")
    assert [json.loads(line)["id"] for line in out.splitlines()] == ["cleaner"]
    code, out = await gated(capsys, "-c", str(staff), "codes", "put", "x", "--code", "246811",
                            "--gates", "nowhere")
    # The file names no gates to check against: the site's gated checks and says.
    assert code == 1 and "refused by gated at site test" in out and "nowhere" in out
    code, out = await gated(capsys, "-c", str(staff), "codes", "rm", "cleaner")
    assert (code, out.strip()) == (0, "deleted gated/test/codes/cleaner")
    code, out = await gated(capsys, "-c", str(staff), "routes", "ls", "--broker", "--json")
    assert code == 0
