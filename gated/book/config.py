"""The TOML config file, parsed once into frozen typed values.

Unknown keys are rejected and every error names the key path and the line it
was written on: a typo in a gate controller's config must stop it at start,
not silently drop a setting.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import ipaddress
import os
import re
import urllib.parse
import zoneinfo
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import msgspec
import phonenumbers

from gated.core import tomlpos
from gated.core.errors import ConfigError

if TYPE_CHECKING:
    import tomllib as toml
else:
    try:
        # tomllib is tomli's parser in pure Python; tomli's mypyc-compiled
        # wheels (the "fast" extra) parse the same TOML the same way, ~2.4x
        # faster: 2.2 s -> 0.9 s for a 100,000-code file.
        import tomli as toml
    except ImportError:
        import tomllib as toml

_T = TypeVar("_T")

DEFAULT_PATH = "/etc/gated/gated.toml"
# A relay pulse longer than this is a wiring or config mistake, never a need:
# barrier controllers latch the open on a short dry-contact pulse.
MAX_PULSE = 10.0

Seconds = Annotated[float, msgspec.Meta(gt=0)]
# [[totp]] digits and period, inclusive: `gated totp add` checks its options by these.
TOTP_DIGITS = (6, 8)
TOTP_PERIOD = (15, 120)
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
Pulse = Annotated[float, msgspec.Meta(gt=0, le=MAX_PULSE)]


class _Table(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Base of every config table: unknown keys are errors."""


class SiteConfig(_Table, kw_only=True, frozen=True):
    id: Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
    # None: not set, and read as UTC; check-config and the daemon warn of it,
    # since a site's times without an offset are its local time.
    timezone: str | None = None

    @property
    def zone(self) -> str:
        return self.timezone or "UTC"
    region: Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{2}$")] = "NL"
    # The HMAC key codes are looked up by; default: site.key beside the store.
    key_file: str | None = None


class ServerConfig(_Table, kw_only=True, frozen=True):
    listen: str = "127.0.0.1:8080"
    path: Annotated[str, msgspec.Meta(pattern=r"^/[A-Za-z0-9/_.-]*$")] = "/voipgrid"
    tokens: Annotated[list[Annotated[str, msgspec.Meta(min_length=12)]],
                      msgspec.Meta(min_length=1)]
    allow_from: list[str] = []
    # Reverse proxies whose X-Forwarded-For is believed (TLS terminators).
    trusted_proxies: list[str] = []
    answer_deadline: Annotated[float, msgspec.Meta(gt=0, le=30)] = 3.0
    nak_word: Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{2,8}$")] = "NAK"
    max_body: Annotated[int, msgspec.Meta(ge=256, le=1 << 20)] = 8192
    # Open connections at most, keeping file handles for the store and the broker
    # (systemd/gated.service sets LimitNOFILE above it); past it one gives way
    # (gated/site/sockets.py says which) or the new one is told 503.
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=16384)] = 256
    # At max_connections, an address (an IPv6 /64) holding more than this makes room
    # first; allow_from's and trusted proxies' addresses are never counted. It never
    # refuses anyone while there is room, so a busy PBX is not held to it.
    max_per_address: Annotated[int, msgspec.Meta(ge=1, le=16384)] = 16


class _Relay(_Table, tag_field="type", kw_only=True, frozen=True):
    pin: int | str
    active_high: bool = True
    pulse: Pulse = 1.0


class GpioActuatorConfig(_Relay, tag="gpio", kw_only=True, frozen=True):
    """A relay on a real GPIO pin, through gpiozero's default pin factory."""


class MockActuatorConfig(_Relay, tag="mock", kw_only=True, frozen=True):
    """gpiozero MockFactory pins: the daemon runs anywhere, nothing moves."""


class MqttActuatorConfig(_Table, tag_field="type", tag="mqtt", kw_only=True, frozen=True):
    """A relay on the broker (Tasmota, Shelly, ESPHome): see docs/mqtt.md."""

    command_topic: str
    payload: str = "ON"
    state_topic: str | None = None
    state_payload: str = "ON"
    # For devices that report JSON (Shelly Gen2 ``{"output": true}``): compare
    # the value at this key, rendered as JSON text, with state_payload.
    state_key: str | None = None
    confirm: Seconds = 2.0


class DtmfActuatorConfig(_Table, tag_field="type", tag="dtmf", kw_only=True, frozen=True):
    """Call-box mode: the open is a tone played into the call (docs/twilio.md).

    Digits 0-9, * and #; ``w`` waits half a second (TwiML ``<Play digits>``).
    """

    digits: str


ActuatorConfig = GpioActuatorConfig | MockActuatorConfig | MqttActuatorConfig | DtmfActuatorConfig


class _Sensor(_Table, tag_field="type", kw_only=True, frozen=True):
    """A reed or limit switch on an input pin, between the pin and GND by default."""

    pin: int | str
    pull_up: bool = True
    # Which contact state means "gate open". A door contact that is closed
    # while the gate is shut reads "open" on a cut wire too, so a broken
    # sensor raises an alarm instead of staying silent.
    open_when: Literal["contact_open", "contact_closed"] = "contact_open"
    confirm: Annotated[float, msgspec.Meta(ge=0)] = 2.0
    window: Seconds = 10.0
    held_open: Annotated[float, msgspec.Meta(ge=0)] = 120.0
    forced_open: bool = True
    bounce: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.05


class GpioSensorConfig(_Sensor, tag="gpio", kw_only=True, frozen=True):
    """A switch on a real GPIO input pin."""


class MockSensorConfig(_Sensor, tag="mock", kw_only=True, frozen=True):
    """A switch on a gpiozero mock pin, for a gate whose actuator is mock."""


SensorConfig = GpioSensorConfig | MockSensorConfig


class GateConfig(_Table, kw_only=True, frozen=True):
    numbers: list[str] = []
    actuator: ActuatorConfig
    callers: list[str] = []
    sensor: SensorConfig | None = None


# Bounds on what a credential carries, the same for [[codes]] in the file and
# for codes published over MQTT (one struct checks both): the PBX shows at most
# 64 characters of a callername, and no field needs to be bigger than what a
# person would type into it.
def _most(count: int) -> msgspec.Meta:
    return msgspec.Meta(max_length=count)


# What the PBX shows of a name, and what any dial plan needs for a destination.
MAX_CALLERNAME = 64
MAX_DESTINATION = 64
MAX_NAME = 120
_GateName = Annotated[str, _most(32)]
_Number = Annotated[str, _most(32)]
Callername = Annotated[str, _most(MAX_CALLERNAME)]
Destination = Annotated[str, _most(MAX_DESTINATION)]


class CodeConfig(_Table, kw_only=True, frozen=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME)]
    id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] | None = None
    code: Annotated[str, _most(16)] | None = None
    # "hmac-sha256:<hex>", made by `gated codes hash`
    code_hash: Annotated[str, _most(76)] | None = None
    gates: Annotated[list[_GateName], _most(256)] = []
    valid_from: dt.datetime | None = None
    valid_until: dt.datetime | None = None
    schedule: Annotated[list[Annotated[str, _most(64)]], _most(64)] = []
    max_uses: PositiveInt | None = None
    callers: Annotated[list[_Number], _most(1000)] = []
    callername: Callername = ""
    destination: Destination = ""


class TotpConfig(_Table, kw_only=True, frozen=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME)]
    id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] | None = None
    secret: str
    gates: list[str] = []
    digits: Annotated[int, msgspec.Meta(ge=TOTP_DIGITS[0], le=TOTP_DIGITS[1])] = 6
    period: Annotated[int, msgspec.Meta(ge=TOTP_PERIOD[0], le=TOTP_PERIOD[1])] = 30
    callername: Callername = ""
    destination: Destination = ""


# A route's fields, the same in [[routes]] and over MQTT; ``file`` only in the file.
class RouteFields(_Table, kw_only=True, frozen=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME)]
    numbers: Annotated[list[_Number], _most(256)] = []
    # E.164 numbers, or E.164 prefixes ending in "*"
    callers: Annotated[list[_Number], _most(10_000)] = []
    destination: Destination = ""
    callername: Callername = ""
    schedule: Annotated[list[Annotated[str, _most(64)]], _most(64)] = []


class RouteConfig(RouteFields, kw_only=True, frozen=True):
    # CSV, header number,destination,callername; relative to the config's folder
    file: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)] | None = None


class LockoutConfig(_Table, kw_only=True, frozen=True):
    caller_failures: PositiveInt = 5
    site_failures: PositiveInt = 30
    site_window: Seconds = 3600.0
    lock_seconds: Seconds = 300.0
    max_lock_seconds: Seconds = 86400.0


class VisitorsConfig(_Table, kw_only=True, frozen=True):
    length: Annotated[int, msgspec.Meta(ge=6, le=12)] = 6
    # Expired visitor codes are deleted this long after they expire.
    keep_expired: Annotated[float, msgspec.Meta(ge=0)] = 86400.0


class MqttConfig(_Table, kw_only=True, frozen=True):
    host: str = "localhost"
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 1883
    username: str | None = None
    password: str | None = None
    tls: bool = False                   # TLS with the system's CAs; tls_ca implies TLS
    tls_ca: str | None = None           # CA file for a private broker (relative to this file)
    # "5" lets commands carry a message expiry, so a broker never hands an
    # open to a device that reconnects later; "3.1.1" for brokers without v5.
    protocol: Literal["5", "3.1.1"] = "5"
    prefix: str | None = None
    fleet_prefix: str | None = None
    # The key fleet codes' digests are made with, shared by the fleet's sites
    # (default: fleet.key beside the site key).
    fleet_key_file: str | None = None
    client_id: str | None = None
    keepalive: Annotated[int, msgspec.Meta(ge=5, le=3600)] = 30
    reconnect_min: Annotated[float, msgspec.Meta(ge=0.05, le=60)] = 0.5
    reconnect_max: Annotated[float, msgspec.Meta(ge=0.05, le=600)] = 30.0
    # Before its first connect the site waits a random moment up to this many
    # seconds, so a fleet restarting together (a power cut, an upgrade) does
    # not arrive at its broker all at once: docs/fleet.md.
    connect_spread: Annotated[float, msgspec.Meta(ge=0, le=600)] = 5.0
    events: bool = True                 # every entry on <prefix>/events
    discovery: bool = True              # Home Assistant MQTT discovery
    discovery_prefix: str = "homeassistant"


Said = Annotated[str, msgspec.Meta(min_length=1, max_length=400)]


class TwimlConfig(_Table, kw_only=True, frozen=True):
    """The TwiML webhook (Twilio, SignalWire, Telnyx TeXML): see docs/twilio.md."""

    path: Annotated[str, msgspec.Meta(pattern=r"^/[A-Za-z0-9/_.-]*$")] = "/twiml"
    # The URL as the platform calls it: signatures cover it, and the
    # <Gather> action points below it. Behind a TLS proxy it is not the
    # address gated listens on.
    public_url: str
    # Omitted: requests carry ?token= one of [server] tokens instead.
    auth_token: Annotated[str, msgspec.Meta(min_length=16, max_length=128)] | None = None
    language: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$")] = (
        "en-US")
    voice: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._:-]{0,64}$")] = ""
    prompt: Said = "Enter your code, then press the hash key."
    wrong: Said = "That code is not valid."
    welcome: Said = "Welcome."
    attempts: Annotated[int, msgspec.Meta(ge=1, le=10)] = 3
    input_timeout: Annotated[int, msgspec.Meta(ge=1, le=60)] = 6
    fallback: str = ""
    # The platform's account (Twilio: AC + 32 hex); set, a request naming another
    # is refused before anything is decided.
    account_sid: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")] | None = None


class SipConfig(_Table, kw_only=True, frozen=True):
    """gated's own SIP endpoint: see docs/sip.md."""

    engine: Literal["baresip"] = "baresip"
    # Register mode: the account gated registers (works behind NAT) ...
    account: Annotated[str, msgspec.Meta(pattern=r"^sips?:[^@\s]+@[^\s]+$")] | None = None
    password_file: str | None = None
    # ... or trunk mode: where the engine listens, and the only addresses it takes calls from.
    listen: str | None = None
    trunk_from: Annotated[list[Annotated[str, _most(64)]], _most(64)] = []
    prompt: str | None = None  # a WAV (16-bit PCM mono 8 kHz); unset: a short tone
    attempts: Annotated[int, msgspec.Meta(ge=1, le=10)] = 3
    input_timeout: Annotated[int, msgspec.Meta(ge=1, le=60)] = 5
    fallback: str = ""
    max_call: Annotated[int, msgspec.Meta(ge=10, le=3600)] = 120


class LogConfig(_Table, kw_only=True, frozen=True):
    path: str = "/var/lib/gated/entries.sqlite3"
    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"


class MetricsConfig(_Table, kw_only=True, frozen=True):
    listen: str = "127.0.0.1:9108"


class WebConfig(_Table, kw_only=True, frozen=True):
    """The staff page (DESIGN §16): its own port, never the webhook's."""

    listen: str = "127.0.0.1:8443"
    tls_cert: str | None = None     # both, or neither (then a TLS proxy in front, docs/tls.md)
    tls_key: str | None = None
    session_hours: Annotated[float, msgspec.Meta(gt=0, le=24 * 31)] = 12.0


class ForwardConfig(_Table, kw_only=True, frozen=True):
    """One endpoint that entries (and alarms) are forwarded to: docs/forwarding.md."""

    name: Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")]
    # May carry a secret (GA4's api_secret, an ntfy topic): logged by host only.
    url: Annotated[str, msgspec.Meta(min_length=1, max_length=2048)]
    format: Literal["json", "ga4", "template"] = "json"
    secret: str | None = None                       # json: the Standard Webhooks key
    numbers: Annotated[list[_Number], _most(1000)] = []
    statuses: list[Literal["ACK", "NAK", "ERR"]] = []
    alarms: bool = False
    caller: Literal["number", "pseudonym", "none"] = "pseudonym"
    timeout: Annotated[float, msgspec.Meta(gt=0, le=120)] = 5.0
    give_up_after: str = "24h"
    event_name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,39}$")] | None = None
    method: Literal["POST", "PUT"] | None = None
    content_type: Annotated[str, _most(128)] | None = None
    body: Annotated[str, _most(16384)] | None = None


class Config(_Table, kw_only=True, frozen=True):
    site: SiteConfig
    server: ServerConfig
    gates: dict[str, GateConfig]
    codes: list[CodeConfig] = []
    totp: list[TotpConfig] = []
    routes: list[RouteConfig] = []
    lockout: LockoutConfig = LockoutConfig()
    visitors: VisitorsConfig = VisitorsConfig()
    mqtt: MqttConfig | None = None
    log: LogConfig = LogConfig()
    metrics: MetricsConfig | None = None
    web: WebConfig | None = None
    twiml: TwimlConfig | None = None
    sip: SipConfig | None = None
    forward: list[ForwardConfig] = []

    @property
    def tz(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.site.zone)

    @property
    def mqtt_prefix(self) -> str:
        if self.mqtt is not None and self.mqtt.prefix:
            return self.mqtt.prefix
        return f"gated/{self.site.id}"


# What a reload applies and what only a restart does: the one list the daemon's
# reload refuses by and docs/config.md is checked against (tests/test_config_reference.py).
# Key paths as the reference writes them, "<name>" for a gate's name; a table
# named whole means each of its keys, and adding or removing it. Every other
# key reloads: the webhook reads its settings on each call and the code book is
# compiled again, while these shape a listening socket, a connection, a file or
# state kept since the start.
RESTART_ONLY: tuple[str, ...] = (
    "server.listen", "server.path", "server.answer_deadline", "server.max_body",
    "server.max_connections", "server.max_per_address",
    "site.id", "site.key_file",
    "gates.<name>.actuator", "gates.<name>.sensor",
    # The lockout policy is the ledger's, held since the start with its strikes.
    "lockout", "log", "metrics", "mqtt", "forward", "web",
    "twiml.path",
    # The engine is started with its accounts and listening address.
    "sip",
)
# Tables that some reloadable keys live in but that only a restart adds or removes.
RESTART_TO_ADD: tuple[str, ...] = ("gates.<name>", "twiml")


def applies(path: str) -> Literal["reload", "restart"]:
    """Whether a reload applies a change to the key at ``path`` or a restart is needed."""
    whole = [p for p in RESTART_ONLY if path == p or path.startswith(p + ".")]
    return "restart" if whole else "reload"


def _pairs(old: Any, new: Any, parts: list[str], done: str) -> Iterator[tuple[str, Any, Any]]:
    """The values at a key path in two configs, "<name>" taken over the names in both."""
    if not parts:
        yield done, old, new
        return
    head, rest = parts[0], parts[1:]
    if head == "<name>":
        for name in new.keys() & old.keys():
            yield from _pairs(old[name], new[name], rest, f"{done}.{name}")
        return
    yield from _pairs(getattr(old, head, None), getattr(new, head, None), rest,
                      f"{done}.{head}" if done else head)


def restart_changes(old: Config, new: Config) -> list[str]:
    """The key paths whose change between two configs only a restart applies (never values)."""
    changed: list[str] = []
    for path in RESTART_TO_ADD:
        table = path.removesuffix(".<name>")
        before, after = getattr(old, table), getattr(new, table)
        if (before.keys() if isinstance(before, dict) else before is None) != (
                after.keys() if isinstance(after, dict) else after is None):
            changed.append(table)
    for path in RESTART_ONLY:
        for where, before, after in _pairs(old, new, path.split("."), ""):
            if before != after and not any(where.startswith(table + ".") for table in changed):
                changed.append(where)
    return changed


def key_path(config_path: Path, config: Config) -> Path:
    if config.site.key_file:
        return resolve_state(config_path, config.site.key_file)
    return resolve_state(config_path, config.log.path).parent / "site.key"


def fleet_key_path(config_path: Path, config: Config) -> Path:
    mqtt = config.mqtt
    if mqtt is not None and mqtt.fleet_key_file:
        return resolve_state(config_path, mqtt.fleet_key_file)
    return key_path(config_path, config).with_name("fleet.key")


def resolve(config_path: Path, value: str) -> Path:
    """Relative paths in the config are relative to the config file's folder.

    For a config reached through a symlink, that is the folder of the file it
    points to.
    """
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else (config_path.resolve().parent / path).resolve()


def resolve_state(config_path: Path, value: str) -> Path:
    """As ``resolve``, for a state file: its folder resolved, its own name kept.

    A state file that is a symbolic link is refused (``gated.book.files``), so the
    link must be what is checked, not the file it names (and the files made
    beside it must not land in that file's folder).
    """
    path = Path(os.path.expanduser(value))
    if path.is_absolute():
        return path
    joined = config_path.resolve().parent / path
    if joined.name in ("", ".", ".."):
        return joined.resolve()
    return joined.parent.resolve() / joined.name


def resolve_in(folder: Path | None, value: str) -> Path:
    """A path from the config, relative to ``folder`` (the config file's; None: here)."""
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else ((folder or Path.cwd()) / path).resolve()


def default_path() -> str:
    return os.environ.get("GATED_CONFIG", DEFAULT_PATH)


ErrorFactory = Callable[[tomlpos.Key, str], ConfigError]


# A staff machine runs no webhook: its file needs no [server] table, and this
# stands in for the token it would need (never served: `gated run` reads the
# file as a site's, and stops at the missing table).
STAFF_TOKEN = "staff-machine-no-webhook"  # noqa: S105 (a placeholder, never a credential)


def parse(text: str, *, source: str = "", staff: bool = False) -> tuple[Config, ErrorFactory]:
    """Parse TOML text into a checked Config, and the error factory that names
    a key's line in this text (for the checks the code book compiler makes).

    ``staff``: a staff machine's file, for the broker commands: ``[site] id`` and
    ``[mqtt]`` suffice; without [server] or [gates] it still loads."""
    config, fail, _ = _parse(text, source, streamed=False, staff=staff)
    return config, fail


class StreamedCodes:
    """The [[codes]] of a file as parsed TOML tables, each checked as it is taken.

    A 100,000-code file is about 100 MB of parsed tables; checked all at once
    the codes' structs add 35 MB beside them. Taken one at a time, each
    table is freed as its struct is made, and the struct once it is compiled.
    """

    def __init__(self, tables: list[Any], fail: ErrorFactory) -> None:
        self._tables = tables
        self._fail = fail

    def __len__(self) -> int:
        return len(self._tables)

    def __iter__(self) -> Iterator[CodeConfig]:
        tables = self._tables
        for index in range(len(tables)):
            table, tables[index] = tables[index], None
            yield _convert_one(table, CodeConfig, ("codes", index), self._fail)


def parse_streamed(text: str, *, source: str = ""
                   ) -> tuple[Config, ErrorFactory, StreamedCodes]:
    """As ``parse``, with the [[codes]] left out of the Config and handed over to be
    checked one at a time (the compiler's child process, for large files).

    Every error is the same one line; where a file has several, one in a code
    may be reported after one elsewhere instead of before it.
    """
    config, fail, codes = _parse(text, source, streamed=True)
    return config, fail, StreamedCodes(codes, fail)


def _parse(text: str, source: str, *, streamed: bool, staff: bool = False
           ) -> tuple[Config, ErrorFactory, list[Any]]:
    try:
        raw = toml.loads(text)
    except toml.TOMLDecodeError as exc:
        match = re.search(r"line (\d+)", str(exc))
        raise ConfigError(f"not valid TOML: {exc}", file=source,
                          line=int(match.group(1)) if match else None) from exc
    lines: dict[tomlpos.Key, int] = {}

    def fail(key: tomlpos.Key, message: str) -> ConfigError:
        # Line numbers are only needed for an error: mapping every key of a
        # 100,000-code file costs more time and memory than parsing it.
        if not lines:
            lines.update(tomlpos.key_lines(text))
        return ConfigError(plain(message), path=tomlpos.format_path(key), file=source,
                           line=tomlpos.line_of(lines, key))

    codes: list[Any] = []
    tables = raw.get("codes")
    if streamed and isinstance(tables, list) and all(isinstance(t, dict) for t in tables):
        codes = raw.pop("codes")
    if staff:
        raw.setdefault("server", {"tokens": [STAFF_TOKEN]})
        raw.setdefault("gates", {})
    config = _convert(raw, fail)
    # The plain dicts of a large file weigh more than the checked config they
    # became: free them before the code book is built, not after.
    del raw, tables
    check(config, fail, staff=staff)
    return config, fail, codes


# What msgspec calls the types, in the words of the people writing the file.
_TYPE_WORDS = {"str": "text in quotes", "int": "a whole number", "float": "a number",
               "bool": "true or false", "array": "a list in [brackets]", "object": "a table",
               "datetime": "a date and time", "null": None}


def _type_words(names: str) -> str:
    words = [_TYPE_WORDS.get(name.strip(), name.strip()) for name in names.split("|")]
    return " or ".join(w for w in words if w)


def plain(message: str) -> str:
    """msgspec's type and bound messages in plain words (no value is echoed: it may be
    a code); other messages as they are."""
    wrong = re.fullmatch(r"Expected `([^`]+)`, got `([^`]+)`", message)
    if wrong:
        expected, got = wrong.groups()
        text = f"expected {_type_words(expected)}, got {_type_words(got)}"
        if "str" in expected.split(" | ") and got in ("int", "float"):
            # code = 123456 is a number to TOML, and would lose leading zeros.
            text += ': put it in quotes, e.g. code = "012345"'
        return text
    bound = re.fullmatch(r"Expected `(str|array|object)` of length ([<>]=) (\d+)", message)
    if bound:
        kind, op, count = bound.groups()
        unit = "characters" if kind == "str" else "items" if kind == "array" else "keys"
        return (f"must be at least {count} {unit} long" if op == ">=" else
                f"must be at most {count} {unit} long")
    number = re.fullmatch(r"Expected `(int|float)` ([<>]=?) ([-\d.]+)", message)
    if number:
        _, op, limit = number.groups()
        words = {">=": "at least", "<=": "at most", ">": "more than", "<": "less than"}
        return f"must be {words[op]} {limit}"
    return message


def _convert(raw: dict[str, Any], fail: Any) -> Config:
    # msgspec reports dict keys as "[...]"; check each gate on its own so the
    # error can name it.
    gates = raw.get("gates")
    if isinstance(gates, dict):
        for name, gate in gates.items():
            _convert_one(gate, GateConfig, ("gates", name), fail)
    return _convert_one(raw, Config, (), fail)


def convert(raw: Any, kind: type[_T], base: tomlpos.Key, fail: Any) -> _T:
    """Check plain data against a config type; errors name the key path via ``fail``."""
    return _convert_one(raw, kind, base, fail)


def _convert_one(raw: Any, kind: type[_T], base: tomlpos.Key, fail: Any) -> _T:
    try:
        return msgspec.convert(raw, kind, strict=True)
    except msgspec.ValidationError as exc:
        message, _, where = str(exc).partition(" - at `")
        key = (*base, *tomlpos.parse_path(where.rstrip("`"))) if where else base
        unknown = re.match(r"Object contains unknown field `(.+)`", message)
        if unknown:
            key = (*key, unknown.group(1))
            message = "unknown key"
        missing = re.match(r"Object missing required field `(.+)`", message)
        if missing:
            key = (*key, missing.group(1))
            message = "required key is missing"
        raise fail(key, message) from None


Check = Callable[["Config", Any], None]
# Checks of tables whose meaning lives in a higher floor (a forward's template
# renders an entry): the assembly points (gated.cli, gated.daemon) add them,
# so a bad one is refused at load, by key and line, like any other.
_extra_checks: list[Check] = []


def add_check(check: Check) -> None:
    if check not in _extra_checks:
        _extra_checks.append(check)


def check(config: Config, fail: Any, *, staff: bool = False) -> None:
    """Checks that span several fields, each naming the key it is about."""
    try:
        zoneinfo.ZoneInfo(config.site.zone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise fail(("site", "timezone"), f"unknown time zone {config.site.timezone!r}") from None
    if config.site.region not in phonenumbers.SUPPORTED_REGIONS:
        raise fail(("site", "region"), f"unknown region {config.site.region!r}")
    _check_listen(config.server.listen, ("server", "listen"), fail)
    if config.metrics is not None:
        _check_listen(config.metrics.listen, ("metrics", "listen"), fail)
        metrics, webhook = split_listen(config.metrics.listen), split_listen(config.server.listen)
        if metrics[1] != 0 and metrics[1] == webhook[1]:
            # The webhook may be exposed through a proxy; metrics never.
            raise fail(("metrics", "listen"), "must be another port than server.listen")
    if config.web is not None:
        _check_listen(config.web.listen, ("web", "listen"), fail)
        taken = {split_listen(config.server.listen)[1]}
        if config.metrics is not None:
            taken.add(split_listen(config.metrics.listen)[1])
        port = split_listen(config.web.listen)[1]
        if port != 0 and port in taken:
            raise fail(("web", "listen"), "must be another port than server.listen and "
                       "metrics.listen")
        if (config.web.tls_cert is None) != (config.web.tls_key is None):
            raise fail(("web", "tls_key" if config.web.tls_key is None else "tls_cert"),
                       "tls_cert and tls_key go together")
    for key in ("allow_from", "trusted_proxies"):
        for index, cidr in enumerate(getattr(config.server, key)):
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise fail(("server", key, index), f"not a network: {cidr!r}") from None
    if not config.gates and not staff:
        raise fail(("gates",), "at least one gate is needed")
    if len(config.gates) > 1:
        for name, gate in config.gates.items():
            if not gate.numbers:
                raise fail(("gates", name, "numbers"),
                           "a site with several gates needs the called numbers of each")
    for name in config.gates:
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,31}", name):
            raise fail(("gates", name), "gate names are lower-case letters, digits, - and _")
    pins: dict[str, str] = {}

    def claim(value: int | str, key: tomlpos.Key, owner: str) -> None:
        pin = str(value).upper().removeprefix("GPIO").removeprefix("BCM")
        if pin in pins:
            raise fail(key, f"pin {value} is already {pins[pin]}")
        pins[pin] = owner

    for name, gate in config.gates.items():
        if isinstance(gate.actuator, GpioActuatorConfig | MockActuatorConfig):
            claim(gate.actuator.pin, ("gates", name, "actuator", "pin"), f"gate {name!r}'s relay")
    for name, gate in config.gates.items():
        if gate.sensor is not None:
            claim(gate.sensor.pin, ("gates", name, "sensor", "pin"), f"gate {name!r}'s sensor")
            _check_sensor(name, gate, config.server.answer_deadline, fail)
    mqtt_gates = [n for n, g in config.gates.items() if isinstance(g.actuator, MqttActuatorConfig)]
    if mqtt_gates and config.mqtt is None:
        raise fail(("gates", mqtt_gates[0], "actuator"), "an mqtt actuator needs an [mqtt] table")
    if mqtt_gates and config.mqtt is not None and config.mqtt.protocol != "5":
        # Without MQTT 5's message expiry a device with a persistent session
        # could receive a queued open long after the caller was answered.
        raise fail(("mqtt", "protocol"),
                   'mqtt actuators need protocol = "5" (commands must expire)')
    for name in mqtt_gates:
        _check_mqtt_actuator(config, name, fail)
    if config.mqtt is not None:
        _check_mqtt(config, config.mqtt, fail)
    for name, gate in config.gates.items():
        if isinstance(gate.actuator, DtmfActuatorConfig) and not re.fullmatch(
                r"[0-9*#w]{1,32}", gate.actuator.digits):
            raise fail(("gates", name, "actuator", "digits"),
                       "the tone: 0-9, * and #, w for a half-second pause; at most 32")
        if isinstance(gate.actuator, DtmfActuatorConfig) and gate.sensor is not None:
            # The tone is played after the answer: no sensor could confirm
            # an open before it, so every open would be ERR not_moved.
            raise fail(("gates", name, "sensor"),
                       "a dtmf gate opens after the answer; a sensor cannot confirm it")
    _check_twiml(config, fail)
    _check_sip(config, fail)
    for extra in _extra_checks:
        extra(config, fail)


def topic_problem(topic: str, *, prefix: bool = False) -> str | None:
    """Why ``topic`` cannot be published to (or used as a topic prefix), or None."""
    if not topic:
        return "a topic cannot be empty"
    if "+" in topic or "#" in topic or "\0" in topic:
        return "a topic to publish to cannot hold the wildcards + or #"
    if topic.startswith("$"):
        return "topics starting with $ belong to the broker"
    if prefix and (topic.endswith("/") or topic.startswith("/")):
        return "a prefix has no leading or trailing /"
    if len(topic.encode()) > 32767:
        return "topic too long"
    return None


def _check_mqtt_actuator(config: Config, name: str, fail: Any) -> None:
    actuator = config.gates[name].actuator
    assert isinstance(actuator, MqttActuatorConfig)
    where = ("gates", name, "actuator")
    for key in ("command_topic", "state_topic"):
        topic = getattr(actuator, key)
        problem = topic_problem(topic) if topic is not None else None
        if problem:
            raise fail((*where, key), problem)
    if actuator.state_topic == actuator.command_topic:
        raise fail((*where, "state_topic"),
                   "the state topic must differ from the command topic, or the command "
                   "would confirm itself")
    if actuator.state_key is not None and actuator.state_topic is None:
        raise fail((*where, "state_key"), "state_key needs a state_topic")
    if actuator.confirm >= config.server.answer_deadline:
        raise fail((*where, "confirm"),
                   f"must be shorter than server.answer_deadline "
                   f"({config.server.answer_deadline}s), or the PBX is answered first")


def _check_mqtt(config: Config, mqtt: MqttConfig, fail: Any) -> None:
    for key in ("prefix", "fleet_prefix", "discovery_prefix"):
        value = getattr(mqtt, key)
        problem = topic_problem(value, prefix=True) if value is not None else None
        if problem:
            raise fail(("mqtt", key), problem)
    if mqtt.fleet_prefix is not None and mqtt.fleet_prefix == config.mqtt_prefix:
        raise fail(("mqtt", "fleet_prefix"), "must differ from the site's own prefix")
    if mqtt.password is not None and mqtt.username is None:
        raise fail(("mqtt", "password"), "a password needs a username")
    if mqtt.reconnect_min > mqtt.reconnect_max:
        raise fail(("mqtt", "reconnect_min"), "must not be longer than reconnect_max")
    if mqtt.client_id is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", mqtt.client_id):
        raise fail(("mqtt", "client_id"), "letters, digits, _ . and -, at most 64")


def _check_twiml(config: Config, fail: Any) -> None:
    twiml = config.twiml
    if twiml is None:
        for name, gate in config.gates.items():
            if isinstance(gate.actuator, DtmfActuatorConfig) and config.sip is None:
                raise fail(("gates", name, "actuator", "type"),
                           "a dtmf gate opens by a tone played into a call: it needs a "
                           "[twiml] table (docs/twilio.md) or a [sip] one (docs/sip.md)")
        return
    ours = twiml.path.rstrip("/")
    if ours in ("", config.server.path, f"{config.server.path}/code") or (
            config.server.path == f"{ours}/code"):
        raise fail(("twiml", "path"), f"must not be server.path ({config.server.path}) "
                   "or overlap it: the VoIPGRID and TwiML webhooks are told apart by path")
    url = urllib.parse.urlsplit(twiml.public_url)
    if url.scheme not in ("http", "https") or not url.hostname or url.query or url.fragment \
            or twiml.public_url.endswith("/"):
        raise fail(("twiml", "public_url"),
                   "the full URL the platform calls, e.g. https://gate.example.nl/twiml "
                   "(no query, no trailing /)")
    if twiml.auth_token is not None and importlib.util.find_spec("twilio") is None:
        raise fail(("twiml", "auth_token"), "checking the signature needs the twilio package: "
                   "pip install 'gated[twilio]'")
    if twiml.fallback:
        from gated.core.errors import NumberError
        from gated.core.numbers import normalise

        try:
            number = normalise(twiml.fallback, config.site.region)
        except NumberError:
            number = None
        if number is None or not number.startswith("+"):
            raise fail(("twiml", "fallback"), "a phone number the platform can dial")


def _check_sip(config: Config, fail: Any) -> None:
    sip = config.sip
    if sip is None:
        return
    if (sip.account is None) == (sip.listen is None):
        raise fail(("sip",), "either account (register mode) or listen (trunk mode), "
                   "not both and not neither")
    if sip.account is not None and sip.password_file is None:
        raise fail(("sip", "password_file"), "register mode needs the account's password file")
    if sip.listen is not None:
        _check_listen(sip.listen, ("sip", "listen"), fail)
        if not sip.trunk_from:
            raise fail(("sip", "trunk_from"), "trunk mode takes calls only from these "
                       "addresses: name the trunk's (e.g. [\"185.0.0.0/24\"])")
    for index, value in enumerate(sip.trunk_from):
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise fail(("sip", "trunk_from", index),
                       f"an address or network, e.g. 185.0.0.0/24, got {value!r}") from None
    if sip.fallback:
        from gated.core.errors import NumberError
        from gated.core.numbers import normalise

        try:
            number = normalise(sip.fallback, config.site.region)
        except NumberError:
            number = None
        if number is None:
            raise fail(("sip", "fallback"), "a phone number the trunk or provider can dial")


def _check_sensor(name: str, gate: GateConfig, deadline: float, fail: Any) -> None:
    sensor = gate.sensor
    assert sensor is not None
    mock_relay = isinstance(gate.actuator, MockActuatorConfig)
    if isinstance(sensor, MockSensorConfig) != mock_relay:
        # A real relay with a mock sensor would never confirm an open, and a
        # mock relay with a real sensor would raise forced_open on every call.
        want = "mock" if mock_relay else "gpio"
        raise fail(("gates", name, "sensor", "type"),
                   f"must be {want!r} on a gate whose actuator is "
                   f"{gate.actuator.__struct_config__.tag!r}")
    if sensor.confirm >= deadline:
        raise fail(("gates", name, "sensor", "confirm"),
                    f"must be shorter than server.answer_deadline ({deadline}s): the "
                    "answer waits for the confirmation")
    if sensor.bounce >= sensor.confirm:
        raise fail(("gates", name, "sensor", "bounce"),
                   f"must be shorter than sensor.confirm ({sensor.confirm}s), or no open "
                   "could ever be confirmed")
    if sensor.confirm > sensor.window:
        raise fail(("gates", name, "sensor", "window"),
                   f"must be at least sensor.confirm ({sensor.confirm}s)")


def _check_listen(value: str, key: tomlpos.Key, fail: Any) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536 or not host:
        raise fail(key, f"expected host:port, got {value!r}")


def split_listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)
