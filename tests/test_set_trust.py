"""Code sets on a broker others can write: the attacker has the broker's staff or Home
Assistant login (or its backups), never staff's signing key.

Each test plays that attacker with real Mosquitto, the real daemon and the real command
line, through nothing but MQTT messages: a replayed older set, a widened delta with a
rewritten manifest, a forged manifest left for staff to build on, chunks nobody vouched
for. The last one imports 100,000 site codes through a default broker, as a new user would.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from gated.cli import main
from gated.mqtt import setchannel

from .broker import Mosquitto, Probe, eventually, mqtt_ready, mqtt_table
from .helpers import BARRIER
from .test_cli_codes import gated

FLEET = "gated/fleet"
FLEET_MQTT = f'fleet_prefix = "{FLEET}"'


async def site_with_fleet(broker: Mosquitto, start_daemon: Any, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str], rows: str) -> Any:
    """The fleet's keys made and ``rows`` (CSV) published as the fleet's set, as staff do,
    and a site started with the keys that holds the set whole."""
    config = str(tmp_path / "gated.toml")
    csv = tmp_path / "fleet.csv"
    csv.write_text(rows)
    running = await start_daemon(mqtt_table(broker, FLEET_MQTT))  # writes the config
    code, out = await gated(capsys, "-c", config, "codes", "fleet-key", "--new")
    assert code == 0, out
    code, out = await gated(capsys, "-c", config, "codes", "import", "--fleet", str(csv),
                            "--wait", "0")
    assert code == 0, out
    await running.stop()
    running = await start_daemon(mqtt_table(broker, FLEET_MQTT))  # now with the keys
    await eventually(lambda: running.daemon.bridge.fleetset.complete, within=10)
    return running


def alarms_of(probe: Probe) -> list[str]:
    return [json.loads(m.payload)["alarm"] for m in probe.on("gated/test/alarms")]


async def test_a_replayed_older_fleet_set_never_brings_back_a_revoked_code(
        broker: Mosquitto, probe: Probe, start_daemon: Any, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Staff revoke a code; the older set (manifest and chunk, recorded off the broker) is
    published again while the site is down: at its restart the site refuses it, raises
    codes_rollback, and the revoked code stays NAK; replayed live, the same."""
    await probe.subscribe(f"{FLEET}/#", "gated/test/alarms")
    config = str(tmp_path / "gated.toml")
    running = await site_with_fleet(broker, start_daemon, tmp_path, capsys,
                                    "id,name,code,gates\ncourier,Courier,61616161,*\n"
                                    "old-courier,Old courier,62626262,*\n")
    assert await running.get(code="62626262", did=BARRIER) == (200, "status=ACK")
    old_manifest = probe.on(f"{FLEET}/set")[-1].payload
    old_chunk = probe.on(f"{FLEET}/set/0")[-1].payload

    code, out = await gated(capsys, "-c", config, "codes", "rm", "--fleet", "old-courier")
    assert code == 0, out
    await eventually(lambda: running.daemon.bridge.fleetset.manifest is not None
                     and "old-courier" in running.daemon.bridge.fleetset.manifest.deltas)
    assert await running.get(code="62626262", did=BARRIER) == (200, "status=NAK")
    await running.stop()

    await probe.publish(f"{FLEET}/set/0", old_chunk, retain=True)
    await probe.publish(f"{FLEET}/set", old_manifest, retain=True)
    running = await start_daemon(mqtt_table(broker, FLEET_MQTT))
    await eventually(lambda: "codes_rollback" in alarms_of(probe), within=10)
    assert await running.get(code="62626262", did=BARRIER) == (200, "status=NAK")
    assert await running.get(code="61616161", did=BARRIER) == (200, "status=ACK")

    await probe.publish(f"{FLEET}/set", old_manifest)  # live, as a recording played back
    await asyncio.sleep(0.5)
    assert await running.get(code="62626262", did=BARRIER) == (200, "status=NAK")


async def test_a_fleet_code_widened_without_the_signing_key_opens_nowhere(
        broker: Mosquitto, probe: Probe, start_daemon: Any, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Someone who can write the fleet's topics takes a delta, drops its validity, and
    rewrites the manifest's digest and serial: the site refuses the manifest (alarm
    codes_unsigned), never applies the widened code, and still opens with the others."""
    await probe.subscribe(f"{FLEET}/#", "gated/test/alarms")
    config = str(tmp_path / "gated.toml")
    running = await site_with_fleet(broker, start_daemon, tmp_path, capsys,
                                    "name,code,gates\nCourier,61616161,*\n")
    code, out = await gated(capsys, "-c", config, "codes", "put", "--fleet", "later",
                            "--code", "71717171", "--gates", "*",
                            "--valid-from", "2099-01-01T00:00", "--wait", "0")
    assert code == 0, out
    await eventually(lambda: running.daemon.bridge.codes.get("fleet", "later") is not None)
    assert await running.get(code="71717171", did=BARRIER) == (200, "status=NAK")

    delta = json.loads(probe.on(f"{FLEET}/codes/later")[-1].payload)
    del delta["valid_from"]
    widened = json.dumps(delta).encode()
    manifest = json.loads(probe.on(f"{FLEET}/set")[-1].payload)
    manifest["deltas"]["later"] = hashlib.sha256(widened).hexdigest()
    manifest["serial"] += 1
    await probe.publish(f"{FLEET}/codes/later", widened, retain=True)
    await probe.publish(f"{FLEET}/set", json.dumps(manifest).encode(), retain=True)
    await eventually(lambda: "codes_unsigned" in alarms_of(probe), within=5)
    assert await running.get(code="71717171", did=BARRIER) == (200, "status=NAK")

    # Unsigned altogether (as a publisher without any key would make it): the same.
    manifest.pop("signature", None)
    manifest["serial"] += 1
    await probe.publish(f"{FLEET}/set", json.dumps(manifest).encode(), retain=True)
    await running.stop()
    running = await start_daemon(mqtt_table(broker, FLEET_MQTT))
    await mqtt_ready(running)
    await asyncio.sleep(0.5)
    assert await running.get(code="71717171", did=BARRIER) == (200, "status=NAK")
    assert await running.get(code="61616161", did=BARRIER) == (200, "status=ACK")


async def test_staff_never_build_on_a_forged_manifest_and_their_serial_only_grows(
        broker: Mosquitto, probe: Probe, start_daemon: Any, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A forged manifest with a huge serial left on the broker: a fleet put refuses to lay
    a change over it and says why; an import replaces it, with a serial above both the
    forged one's and what the site holds, and the site applies it."""
    await probe.subscribe(f"{FLEET}/#")
    config = str(tmp_path / "gated.toml")
    csv = tmp_path / "fleet.csv"
    running = await site_with_fleet(broker, start_daemon, tmp_path, capsys,
                                    "name,code,gates\nCourier,61616161,*\n")
    fleetset = running.daemon.bridge.fleetset
    held = fleetset.manifest.serial

    forged = json.loads(probe.on(f"{FLEET}/set")[-1].payload)
    forged["serial"] = held * 10
    forged["deltas"] = {"mine": "0" * 64}
    await probe.publish(f"{FLEET}/set", json.dumps(forged).encode(), retain=True)
    capsys.readouterr()
    code = await asyncio.to_thread(main, ["-c", config, "codes", "put", "--fleet", "extra",
                                          "--code", "72727272", "--gates", "*", "--wait", "0"])
    said = capsys.readouterr()
    assert code != 0
    assert "is not staff's" in said.err + said.out and "nothing is built on it" in said.err

    code, out = await gated(capsys, "-c", config, "codes", "import", "--fleet", str(csv),
                            "--wait", "5")
    assert code == 0, out
    assert "replaced what was on the broker" in out and "applied by gated at site test" in out
    assert fleetset.manifest.serial > held
    assert await running.get(code="61616161", did=BARRIER) == (200, "status=ACK")


async def test_chunks_nobody_vouched_for_cost_a_site_a_few_chunks_of_memory(
        broker: Mosquitto, probe: Probe, start_daemon: Any, tmp_path: Path) -> None:
    """Sixty 1 MB chunks of a set no signed manifest names: the site keeps at most a few
    chunks' worth, and its set in force is untouched."""
    running = await start_daemon(mqtt_table(broker, FLEET_MQTT))
    await mqtt_ready(running)
    fleetset = running.daemon.bridge.fleetset
    junk = b"GSC1" + bytes(16)
    for index in range(60):
        await probe.publish(f"{FLEET}/set/{index}", junk + index.to_bytes(4, "little")
                            + bytes(1024 * 1024))
    await probe.publish(f"{FLEET}/sync-probe", b"x")
    await asyncio.sleep(0.5)
    held = sum(len(data) for part in fleetset._early.values() for data in part.values())
    assert held <= setchannel.EARLY_BYTES
    assert fleetset.manifest is None and fleetset.pending is False


async def test_a_hundred_thousand_site_codes_imported_arrive_whole_and_survive_a_restart(
        broker: Mosquitto, start_daemon: Any, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`gated codes import` of 100,000 site codes through a default Mosquitto (queue of
    1,000 messages a client): the site holds every one, `import` says what it applied,
    and after a restart every code is still there and none was withdrawn."""
    config = str(tmp_path / "gated.toml")
    csv = tmp_path / "codes.csv"
    csv.write_text("name,code,gates\n" + "".join(
        f"Code {n},{n:08d},barrier\n" for n in range(100_000)))
    running = await start_daemon(mqtt_table(broker))
    await mqtt_ready(running)
    code, out = await gated(capsys, "-c", config, "codes", "import", str(csv), "--wait", "60")
    assert code == 0, out
    assert "published 100,000 codes" in out, out
    assert "applied by gated at site test: 100000 codes" in out, out
    book = running.daemon.gatekeeper.book
    assert book.siteset is not None and len(book.siteset) == 100_000
    for n in (0, 54_321, 99_999):
        assert await running.get(code=f"{n:08d}", did=BARRIER) == (200, "status=ACK")

    await running.stop()
    running = await start_daemon(mqtt_table(broker))
    await mqtt_ready(running)
    await eventually(lambda: running.daemon.bridge.synced_connections >= 1, within=10)
    assert len(running.daemon.gatekeeper.book.siteset) == 100_000
    assert await running.get(code="00099999", did=BARRIER) == (200, "status=ACK")
    assert await running.get(code="00100000", did=BARRIER) == (200, "status=NAK")
