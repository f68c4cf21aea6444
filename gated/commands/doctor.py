"""``gated doctor``: check an installation and say what to fix.

Each check gives findings: ``ok``, ``info`` (worth knowing, nothing wrong) or
a problem with the fix spelled out. It reads and probes; it never claims a
pin or changes a file, so it is safe to run next to the running daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import glob
import importlib.util
import math
import os
import sqlite3
import ssl
import stat
import struct
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gated.book import bookfile, codeset, compiler, signing, sitekey
from gated.book import config as config_mod
from gated.book.config import (
    Config,
    GpioActuatorConfig,
    GpioSensorConfig,
    MockActuatorConfig,
    MqttConfig,
    fleet_key_path,
    split_listen,
)
from gated.book.files import user_name
from gated.core.errors import ConfigError

Level = Literal["ok", "info", "problem"]

# Linux GPIO character device, v1 ABI: struct gpiochip_info (name[32],
# label[32], u32 lines) and struct gpioline_info (u32 offset, u32 flags,
# name[32], consumer[32]).
GPIO_GET_CHIPINFO_IOCTL = 0x8044B401
GPIO_GET_LINEINFO_IOCTL = 0xC048B402
GPIOLINE_FLAG_KERNEL = 1 << 0
# The chip behind the 40-pin header on each Raspberry Pi generation.
HEADER_CHIPS = ("pinctrl-bcm2835", "pinctrl-bcm2711", "pinctrl-rp1")
TIMEOUT = 5.0
# Published in config/gated.example.toml, so known to everyone.
DEMO_CODES = frozenset({"471123", "580214"})
DEMO_TOTP = "JBSWY3DPEHPK3PXP"


@dataclass(frozen=True, slots=True)
class Finding:
    level: Level
    topic: str
    message: str
    fix: str = ""


@dataclass(frozen=True, slots=True)
class PinUse:
    gate: str
    role: str  # "relay" or "sensor"
    pin: int | str
    real: bool  # a gpio type, as opposed to mock
    active_high: bool = True

    @property
    def bcm(self) -> int | None:
        text = str(self.pin).upper().removeprefix("GPIO").removeprefix("BCM")
        return int(text) if text.isdigit() else None

    @property
    def label(self) -> str:
        return f"gate {self.gate} {self.role} on GPIO{self.bcm}"


def diagnose(config_path: str, *, dev: Path = Path("/dev"),
             root: Path = Path("/")) -> list[Finding]:
    """``root``: where /etc and /lib are (the local broker's unit and config)."""
    try:
        loaded = compiler.load(config_path)
    except ConfigError as exc:
        where = f" (line {exc.line})" if exc.line else ""
        return [Finding("problem", "config", str(exc),
                        f"edit {exc.file or config_path}{where}, then run "
                        f"`gated check-config {config_path}`")]
    config = loaded.config
    findings = [Finding("ok", "config", f"{loaded.path}: site {config.site.id}, "
                        f"{len(config.gates)} gate(s), "
                        f"{loaded.book.credential_count} credential(s)")]
    findings += check_tokens(config)
    pins = pin_uses(config)
    findings += check_pin_choice(pins)
    findings += check_gpio(pins, dev)
    findings += check_state(loaded.store_path)
    findings += check_state_files(loaded.store_path, loaded.key_path)
    findings.append(check_book(config_path, loaded.store_path))
    if config.mqtt is not None:
        findings.append(check_broker(config.mqtt, loaded.path))
        findings.append(check_message_size(config.mqtt))
        if config.mqtt.fleet_prefix is not None:
            findings.append(check_fleet_key(fleet_key_path(loaded.source, config)))
            findings.append(check_signing(fleet_key_path(loaded.source, config), "fleet"))
            if is_local(config.mqtt.host):
                findings += check_fleet_broker(root)
    findings += check_webhook(config)
    if config.sip is not None:
        findings += check_sip(loaded.store_path.parent)
    if os.geteuid() == 0:
        findings.append(Finding(
            "info", "user", "running as root: the permission checks speak for root",
            "run it as the service user: sudo -u gated /opt/gated/venv/bin/gated doctor"))
    return findings


def check_sip(state_dir: Path) -> list[Finding]:
    """The SIP engine: installed in a version gated knows, and how the daemon last found it."""
    from gated.core.errors import EngineError
    from gated.pbx import baresip

    try:
        version = baresip.read_version()
    except EngineError as exc:
        return [Finding("problem", "sip", str(exc), "sudo apt install baresip-core")]
    findings = [Finding("ok", "sip", f"baresip {version} installed")]
    status = baresip.read_status(state_dir)
    if status is None:
        findings.append(Finding("info", "sip", "the engine has not run here yet",
                                "start gated: sudo systemctl start gated"))
    elif status.get("state") == "running" and status.get("registered") is False:
        findings.append(Finding(
            "problem", "sip", f"the registrar did not take the account: "
            f"{status.get('refusal') or 'no answer'}",
            "check sip.account, the password in sip.password_file, and that the registrar "
            "is reachable; `journalctl -u gated | grep 'sip regist'` says when it tried"))
    elif status.get("state") == "running":
        findings.append(Finding(
            "ok", "sip", f"engine running (pid {status.get('pid')}, restarted "
            f"{status.get('restarts')} time(s)); registration: "
            f"{status.get('registration') or 'not reported yet'}"))
    else:
        findings.append(Finding(
            "problem", "sip", f"engine {status.get('state')} (restarted "
            f"{status.get('restarts')} time(s))",
            "journalctl -u gated | grep 'sip engine' says why"))
    return findings


def check_tokens(config: Config) -> list[Finding]:
    """The example config's secrets are public: none of them may open a real gate."""
    findings = []
    if any(t.startswith("change-me") for t in config.server.tokens):
        findings.append(Finding(
            "problem", "token", "server.tokens still holds the example token",
            "put a long random token there (python3 -c 'import secrets; "
            "print(secrets.token_urlsafe(24))') and the same in the PBX's URL"))
    demo = [c.name for c in config.codes if c.code in DEMO_CODES]
    demo += [t.name for t in config.totp if t.secret.upper().startswith(DEMO_TOTP)]
    if demo:
        findings.append(Finding(
            "problem", "codes", f"the example config's demo credentials are here: "
            f"{', '.join(demo)}", "delete them; anyone who read the example knows them"))
    return findings


def pin_uses(config: Config) -> list[PinUse]:
    uses = []
    for name, gate in config.gates.items():
        actuator = gate.actuator
        if isinstance(actuator, GpioActuatorConfig | MockActuatorConfig):
            uses.append(PinUse(name, "relay", actuator.pin,
                               isinstance(actuator, GpioActuatorConfig), actuator.active_high))
        if gate.sensor is not None:
            uses.append(PinUse(name, "sensor", gate.sensor.pin,
                               isinstance(gate.sensor, GpioSensorConfig)))
    return uses


def check_pin_choice(pins: Iterable[PinUse]) -> list[Finding]:
    """Pins whose level at power-on or whose other use would move a relay."""
    findings = []
    for use in pins:
        bcm = use.bcm
        if bcm is None:
            continue
        problem = ""
        fix = ("relays: an active-high board on GPIO17, 27, 22, 23, 24 or 25 "
               "(pulled low at boot), or an active-low board on GPIO5 or 6 (pulled high at "
               "boot); see hardware/README.md")
        if bcm > 27:
            problem = "is not on the 40-pin header"
        elif bcm in (0, 1):
            problem = "is the HAT ID EEPROM bus"
        elif bcm in (14, 15):
            problem = "is the serial console's UART and toggles during boot"
        elif use.role == "relay" and use.active_high and bcm <= 8:
            problem = ("is pulled high from power-on until gated starts: an active-high "
                       "relay there is energised through every boot")
        elif use.role == "relay" and not use.active_high and bcm >= 9:
            problem = ("is pulled low from power-on until gated starts: an active-low "
                       "relay there is energised through every boot")
        if problem:
            findings.append(Finding("problem", "pin", f"{use.label} {problem}", fix))
        else:
            findings.append(Finding("ok", "pin", f"{use.label}"
                                    + (f" ({'active-high' if use.active_high else 'active-low'})"
                                       if use.role == "relay" else "")))
    return findings


def check_gpio(pins: list[PinUse], dev: Path) -> list[Finding]:
    real = [use for use in pins if use.real]
    chips = sorted(glob.glob(str(dev / "gpiochip*")))
    if not chips:
        if real:
            gates = ", ".join(sorted({use.gate for use in real}))
            return [Finding("problem", "gpio", f"no GPIO chip, but gate(s) {gates} use type gpio",
                            "run on the Raspberry Pi, or use type = \"mock\" to test elsewhere")]
        return [Finding("info", "gpio", "no GPIO chip; mock pins only")]
    if not real:
        return [Finding("info", "gpio", f"{len(chips)} GPIO chip(s); every gate uses mock pins")]
    findings = []
    if importlib.util.find_spec("lgpio") is None:
        findings.append(Finding("problem", "gpio", "the lgpio module is missing",
                                "install gated with its pi extra: "
                                "/opt/gated/venv/bin/pip install '/path/to/gated[pi]' "
                                "(install.sh does this)"))
    header: tuple[str, int] | None = None
    for chip in chips:
        try:
            label, lines = chip_info(chip)
        except OSError as exc:
            if not os.access(chip, os.R_OK | os.W_OK):
                findings.append(Finding(
                    "problem", "gpio", f"cannot open {chip}: {exc.strerror}",
                    "add the user to group gpio (sudo usermod -aG gpio gated) and restart"))
                return findings
            findings.append(Finding("info", "gpio", f"{chip}: {exc.strerror}"))
            continue
        if label in HEADER_CHIPS:
            header = (chip, lines)
            break
    if header is None:
        findings.append(Finding("problem", "gpio", "no Raspberry Pi GPIO header chip among "
                                f"{', '.join(chips)}",
                                "gated's gpio type drives a Raspberry Pi's header pins"))
        return findings
    chip, lines = header
    findings.append(Finding("ok", "gpio", f"{chip} ({lines} lines)"))
    for use in real:
        if use.bcm is None:
            continue
        try:
            consumer, kernel = line_info(chip, use.bcm)
        except OSError as exc:
            findings.append(Finding("problem", "gpio", f"{use.label}: {exc.strerror}"))
            continue
        if not kernel:
            findings.append(Finding("ok", "gpio", f"{use.label}: free"))
        elif consumer in ("lg", "lgpio", "gated"):
            findings.append(Finding("info", "gpio", f"{use.label}: held by {consumer!r} "
                                    "(gated, when it runs)"))
        else:
            findings.append(Finding("problem", "gpio", f"{use.label}: in use by {consumer!r}",
                                    "free the pin (a dtoverlay in /boot/firmware/config.txt?) "
                                    "or choose another"))
    return findings


def chip_info(chip: str) -> tuple[str, int]:
    """(label, number of lines) of a GPIO chip device."""
    fd = os.open(chip, os.O_RDONLY | os.O_CLOEXEC)
    try:
        buffer = fcntl.ioctl(fd, GPIO_GET_CHIPINFO_IOCTL, bytes(68))
    finally:
        os.close(fd)
    return parse_chip_info(buffer)


def parse_chip_info(buffer: bytes) -> tuple[str, int]:
    _name, label, lines = struct.unpack("32s32sI", buffer)
    return _cstr(label), int(lines)


def line_info(chip: str, offset: int) -> tuple[str, bool]:
    """(consumer, in use) of one line; reads, never claims."""
    fd = os.open(chip, os.O_RDONLY | os.O_CLOEXEC)
    try:
        buffer = fcntl.ioctl(fd, GPIO_GET_LINEINFO_IOCTL, struct.pack("II32s32s", offset, 0,
                                                                        b"", b""))
    finally:
        os.close(fd)
    return parse_line_info(buffer)


def parse_line_info(buffer: bytes) -> tuple[str, bool]:
    _offset, flags, _name, consumer = struct.unpack("II32s32s", buffer)
    return _cstr(consumer), bool(flags & GPIOLINE_FLAG_KERNEL)


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def check_state(store: Path) -> list[Finding]:
    directory = store.parent
    if not directory.is_dir():
        existing = next((p for p in directory.parents if p.exists()), None)
        if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK):
            return [Finding("problem", "state", f"{directory} does not exist and cannot be made",
                            "under systemd StateDirectory=gated makes /var/lib/gated; "
                            "elsewhere create it for the user that runs gated")]
        return [Finding("info", "state", f"{directory} does not exist yet; gated will make it")]
    if not os.access(directory, os.W_OK | os.X_OK):
        return [Finding("problem", "state", f"{directory} is not writable",
                        f"chown gated:gated {directory} (systemd's StateDirectory=gated does "
                        "this for /var/lib/gated)")]
    if store.is_symlink():
        return []  # never opened through a link: check_state_files says so
    if not store.exists():
        return [Finding("ok", "state", f"{directory} writable; no entries yet")]
    try:
        conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
        try:
            (verdict,) = conn.execute("PRAGMA quick_check").fetchone()
            (count,) = conn.execute("SELECT count(*) FROM entries").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return [Finding("problem", "state", f"{store}: {exc}",
                        "move the file aside; gated starts a new one")]
    if verdict != "ok":
        return [Finding("problem", "state", f"{store}: quick_check says {verdict}",
                        "stop gated, move the file aside (keep it), start gated")]
    return [Finding("ok", "state", f"{directory} writable; {count} entries, store intact")]


def check_state_files(store: Path, key: Path) -> list[Finding]:
    """The store and site key belong to the state directory's owner (the daemon's
    user) and only they can read them: a staff command run as root before the
    daemon's first start could leave them root's."""
    directory = store.parent
    try:
        owner = directory.stat().st_uid
    except OSError:
        return []
    # The store with its -wal and -shm files and the compiled book is one thing to fix.
    groups = [(f"{store}*", [store, store.with_name(store.name + "-wal"),
                             store.with_name(store.name + "-shm"),
                             bookfile.book_path(store)])]
    if key.parent == directory:
        groups.append((str(key), [key]))
    # gated makes no links there, and opens no state file through one: a link
    # is someone's attempt to have a command run as root write elsewhere.
    try:
        linked = {p for p in directory.iterdir() if p.is_symlink()}
    except OSError:
        linked = set()
    if key.is_symlink():
        linked.add(key)
    findings = [Finding("problem", "state", f"{part} is a symbolic link; gated never opens "
                        "a state file through one (someone made it: find out who)",
                        f"rm {part}") for part in sorted(linked)]
    seen = 0
    for target, parts in groups:
        found = []
        for part in parts:
            with contextlib.suppress(OSError):
                if not part.is_symlink():
                    found.append((part, part.stat()))
        seen += len(found)
        strangers = [(part, info) for part, info in found if info.st_uid != owner]
        shared = [(part, info) for part, info in found if info.st_mode & 0o077]
        if strangers:
            part, info = strangers[0]
            findings.append(Finding(
                "problem", "state", f"{part} belongs to {user_name(info.st_uid)}, but the "
                f"state directory to {user_name(owner)}: the daemon cannot use it",
                f"chown {user_name(owner)}: {target}"))
        elif shared:
            part, info = shared[0]
            findings.append(Finding(
                "problem", "state", f"{part} can be read by others "
                f"(mode {stat.S_IMODE(info.st_mode):04o}); it holds callers' numbers or the "
                "site key", f"chmod 600 {target}"))
    if seen and not findings:
        findings.append(Finding("ok", "state",
                                f"store and key private, owned by {user_name(owner)}"))
    return findings


def check_fleet_key(path: Path) -> Finding:
    """The fleet key: its fingerprint, to compare with the other sites' and the set's."""
    try:
        key = sitekey.read_key(path, "fleet key")
    except ConfigError as exc:
        return Finding("problem", "fleet", str(exc), f"chmod 600 {path}, owned by gated")
    if key is None:
        return Finding("problem", "fleet", f"no fleet key at {path}: this site cannot check "
                       "the fleet's codes", "copy the fleet's key there (mode 0600); "
                       "`gated codes fleet-key` shows its fingerprint")
    return Finding("ok", "fleet", f"fleet key {path}: fingerprint {codeset.fingerprint(key)} "
                   "(the same at every site of the fleet)")


def check_signing(hmac_path: Path, scope: str) -> Finding:
    """The public keys a set must be signed with, and whether the signing key itself is
    here (it belongs on staff machines only)."""
    public, private = signing.public_path(hmac_path), signing.private_path(hmac_path)
    try:
        trusted = signing.read_public(public) if public.exists() else {}
    except ConfigError as exc:
        return Finding("problem", scope, str(exc), f"copy the {scope}'s {public.name} again")
    if not trusted:
        return Finding("problem", scope, f"no public signing key at {public}: this site "
                       f"refuses every {scope} code set (they are signed by staff)",
                       f"copy {public.name} from the staff machine (`gated codes fleet-key "
                       "--new` makes it there)")
    where = (f"; the signing key {private} is here too (fine on a staff machine, not on a "
             "site)" if private.exists() else "")
    return Finding("ok", scope, f"{scope} sets must be signed by: {', '.join(trusted)}{where}")


def check_book(config_path: str, store: Path) -> Finding:
    """Whether a restart will map the compiled code book or compile it first."""
    path = bookfile.book_path(store)
    header = bookfile.peek(path)
    if header is None:
        return Finding("info", "book", f"no compiled code book at {path} yet: the next start "
                       "compiles it (a few seconds for 100,000 codes)")
    if compiler.cached(config_path) is None:
        return Finding("info", "book", f"{path} was compiled from another config, site key, "
                       "time zone or version of gated (or is damaged): the next start or "
                       "reload compiles it again")
    size = path.stat().st_size
    return Finding("ok", "book", f"{path} matches this config ({header.codes} static codes, "
                   f"{size / 1e6:.1f} MB): a restart answers from it at once")


def check_broker(mqtt: MqttConfig, config_path: Path) -> Finding:
    """A real MQTT CONNECT with the daemon's own settings (TLS, protocol, login)."""
    from gated.core.errors import BrokerError, ConfigError
    from gated.mqtt.link import connect

    where = f"{mqtt.host}:{mqtt.port}"
    fix = "check [mqtt] host, port, username, password and tls_ca, and that the broker runs"
    ca_file = config_mod.resolve(config_path, mqtt.tls_ca) if mqtt.tls_ca else None

    async def attempt() -> None:
        async with asyncio.timeout(TIMEOUT), connect(mqtt, f"gated-doctor-{os.getpid()}",
                                                      ca_file=ca_file):
            pass

    try:
        asyncio.run(attempt())
    except TimeoutError:
        return Finding("problem", "broker", f"{where} did not answer within {TIMEOUT:g}s", fix)
    except BrokerError as exc:  # its message names the broker
        return Finding("problem", "broker", f"cannot reach the {exc}", fix)
    except (ConfigError, OSError, ssl.SSLError) as exc:
        return Finding("problem", "broker", f"cannot reach {where}: {exc}", fix)
    return Finding("ok", "broker", f"{where} accepts gated's connection")


def check_message_size(mqtt: MqttConfig) -> Finding:
    """Who keeps a message larger than any gated needs out of its memory."""
    from gated.mqtt.link import MAX_PACKET, MAX_PAYLOAD

    if mqtt.protocol == "5":
        return Finding("ok", "size", f"MQTT 5: the broker sends gated no message over "
                       f"{MAX_PACKET:,} bytes (Maximum Packet Size)")
    return Finding(
        "info", "size", "MQTT 3.1.1 cannot tell the broker the largest message gated takes: "
        f"one over {MAX_PACKET:,} bytes ends its connection unread, again at every connect "
        "while the broker keeps it",
        f"set `message_size_limit {MAX_PAYLOAD}` in the broker's mosquitto.conf, or use "
        'protocol = "5" (docs/mqtt.md, Message size)')


# What a fleet of 1,000 sites needs of its central Mosquitto (docs/fleet.md,
# "A fleet of 1,000 sites"): open files beyond one per connection, a bound on
# what one slow client may hold queued, and no whole-store write per change.
FLEET_OPEN_FILES = 4096
SYSTEMD_OPEN_FILES = 1024  # systemd's soft default when a unit sets none
FLEET_QUEUED_BYTES = 16 * 1024 * 1024
FLEET_AUTOSAVE_CHANGES = 1000
FLEET_AUTOSAVE_SECONDS = 30
UNIT_DIRS = ("etc/systemd/system", "run/systemd/system", "lib/systemd/system",
             "usr/lib/systemd/system")
FLEET_DOC = "docs/fleet.md, A fleet of 1,000 sites"


def is_local(host: str) -> bool:
    """Whether the broker runs on this machine (where its files can be read)."""
    import socket

    return (host in ("localhost", "::1") or host.startswith("127.")
            or host in (socket.gethostname(), socket.getfqdn()))


def unit_setting(root: Path, unit: str, key: str) -> tuple[str, Path] | None:
    """The last ``key=`` a systemd unit and its drop-ins set, and where; None if unset
    or the unit is not here. Drop-ins apply in name order, /etc's over /lib's."""
    files: list[Path] = []
    main = next((root / d / unit for d in UNIT_DIRS if (root / d / unit).is_file()), None)
    if main is not None:
        files.append(main)
    dropins: dict[str, Path] = {}
    for d in reversed(UNIT_DIRS):  # earlier directories win a name
        for path in sorted((root / d / f"{unit}.d").glob("*.conf")):
            dropins[path.name] = path
    files += [dropins[name] for name in sorted(dropins)]
    found = None
    for path in files:
        section = ""
        with contextlib.suppress(OSError, UnicodeDecodeError):
            for line in path.read_text().splitlines():
                line = line.strip()
                if line.startswith("["):
                    section = line
                elif section == "[Service]" and line.startswith(f"{key}="):
                    found = (line.split("=", 1)[1].strip(), path)
    return found


def mosquitto_settings(root: Path) -> dict[str, str] | None:
    """mosquitto.conf's settings (the last of each, include_dir followed); None if
    there is no /etc/mosquitto/mosquitto.conf."""
    conf = root / "etc/mosquitto/mosquitto.conf"
    if not conf.is_file():
        return None
    settings: dict[str, str] = {}

    def read(path: Path) -> None:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            for line in path.read_text().splitlines():
                key, _, value = line.strip().partition(" ")
                if not key or key.startswith("#"):
                    continue
                if key == "include_dir":
                    for part in sorted((root / value.strip().lstrip("/")).glob("*.conf")):
                        read(part)
                else:
                    settings[key] = value.strip()

    read(conf)
    return settings


def check_fleet_broker(root: Path) -> list[Finding]:
    """The local Mosquitto's limits for a fleet's central broker, where they can be read."""
    findings = []
    limit = unit_setting(root, "mosquitto.service", "LimitNOFILE")
    if limit is not None or any((root / d / "mosquitto.service").is_file() for d in UNIT_DIRS):
        text = limit[0] if limit is not None else f"{SYSTEMD_OPEN_FILES} (systemd's default)"
        soft = text.split(":", 1)[0].split(" ", 1)[0]
        files_open = (math.inf if soft == "infinity" else
                      int(soft) if soft.isdigit() else SYSTEMD_OPEN_FILES)
        if files_open < FLEET_OPEN_FILES:
            findings.append(Finding(
                "info", "capacity", f"the local mosquitto.service may open {text} files: past "
                f"about {int(files_open) - 10:,} connections it refuses sites (its log says "
                "\"denied access by tcpd\") and they never get the fleet's set",
                "for a fleet of hundreds of sites, a drop-in "
                "/etc/systemd/system/mosquitto.service.d/nofile.conf with [Service] and "
                "LimitNOFILE=65536; then systemctl daemon-reload and systemctl restart "
                f"mosquitto ({FLEET_DOC})"))
        else:
            findings.append(Finding("ok", "capacity", f"mosquitto.service LimitNOFILE={text}"))
    settings = mosquitto_settings(root)
    if settings is None:
        return findings
    queued = settings.get("max_queued_bytes", "0")
    if not queued.isdigit() or int(queued) == 0:
        findings.append(Finding(
            "info", "capacity", "mosquitto.conf sets no max_queued_bytes: a client away "
            "with a persistent session (an edge's bridge) holds up to max_queued_messages "
            "messages, chunks of sets long replaced among them, in memory and in every save",
            f"max_queued_bytes {FLEET_QUEUED_BYTES} (room for a few sets of 50,000 codes and "
            f"their deltas; {FLEET_DOC})"))
    elif int(queued) < FLEET_QUEUED_BYTES:
        findings.append(Finding(
            "info", "capacity", f"mosquitto.conf's max_queued_bytes {int(queued):,} is less "
            f"than {FLEET_QUEUED_BYTES:,}: an edge's bridge away while a set is published "
            "may lose chunks of it, and its site says its codes are incomplete",
            f"max_queued_bytes {FLEET_QUEUED_BYTES} ({FLEET_DOC})"))
    else:
        findings.append(Finding("ok", "capacity", f"max_queued_bytes {int(queued):,}"))
    if settings.get("persistence") == "true":
        interval = settings.get("autosave_interval", "1800")
        every = int(interval) if interval.isdigit() else 1800
        on_changes = settings.get("autosave_on_changes") == "true"
        if (every < FLEET_AUTOSAVE_CHANGES) if on_changes else (every < FLEET_AUTOSAVE_SECONDS):
            unit = "changes" if on_changes else "seconds"
            findings.append(Finding(
                "info", "capacity", f"Mosquitto writes its whole store every {every} {unit}: "
                "a fleet connecting at once makes thousands of changes, and with "
                "autosave_interval 1 a storm of 1,000 sessions wrote 447 MB",
                f"autosave_on_changes false and autosave_interval 60 (a crash loses at most "
                f"a minute; {FLEET_DOC})"))
        else:
            findings.append(Finding("ok", "capacity", f"autosave every {every} "
                                    f"{'changes' if on_changes else 'seconds'}"))
    return findings


def _local(listen: str) -> tuple[str, int]:
    host, port = split_listen(listen)
    # A wildcard address is reached through loopback.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104
    return (f"[{host}]" if ":" in host else host), port


def check_webhook(config: Config) -> list[Finding]:
    host, port = _local(config.server.listen)
    url = f"http://{host}:{port}{config.server.path}"
    status, body = _get(url)
    findings = []
    if status is None and body == CLOSED and not _admits(config, host.strip("[]")):
        findings.append(Finding("ok", "webhook", f"{url} closes this machine's connection "
                                "at once (it is not in allow_from, as it should)"))
    elif status is None:
        findings.append(Finding("problem", "webhook", f"nothing answers on {url}: {body}",
                                "start gated (sudo systemctl start gated) and read why it "
                                "stopped: journalctl -u gated -n 50"))
    elif status == 403:
        findings.append(Finding("ok", "webhook", f"{url} answers (403 without a token, as it "
                                "should)"))
    else:
        findings.append(Finding("problem", "webhook", f"{url} answered HTTP {status} without "
                                "a token; expected 403",
                                "something else listens there: check server.listen and path"))
    if config.metrics is not None:
        host, port = _local(config.metrics.listen)
        url = f"http://{host}:{port}/healthz"
        status, body = _get(url)
        if status == 200:
            findings.append(Finding("ok", "health", f"{url}: ok"))
        elif status is None:
            findings.append(Finding("problem", "health", f"nothing answers on {url}: {body}",
                                    "start gated; check [metrics] listen"))
        else:
            findings.append(Finding("problem", "health", f"{url}: {status} {body.strip()}",
                                    "see journalctl -u gated for the alarm"))
    return findings


def _admits(config: Config, address: str) -> bool:
    """Whether the webhook hears a connection from ``address`` (allow_from, at accept)."""
    from gated.pbx.voipgrid import LiveSettings, webhook_settings

    admission = LiveSettings(webhook_settings(config.server), shared=config.twiml is not None)
    return admission.admits(address)


CLOSED = "closed without an answer"


def _get(url: str) -> tuple[int | None, str]:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:  # noqa: S310 (our own URL)
            return int(response.status), response.read(512).decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(512).decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ConnectionResetError):  # http.client's RemoteDisconnected too
            return None, CLOSED
        return None, str(reason)


def report(findings: list[Finding]) -> tuple[str, int]:
    """The text to print and how many problems it lists."""
    lines = []
    for finding in findings:
        mark = {"ok": "ok     ", "info": "info   ", "problem": "PROBLEM"}[finding.level]
        lines.append(f"{mark}  {finding.topic:8} {finding.message}")
        if finding.fix and finding.level != "ok":
            lines.append(f"{'':9}{'fix:':8} {finding.fix}")
    problems = sum(1 for f in findings if f.level == "problem")
    lines.append(f"{problems} problem(s)" if problems else "no problems found")
    return "\n".join(lines), problems
