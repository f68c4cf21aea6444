"""The TOML config file, parsed once into frozen typed values.

Unknown keys are rejected and every error names the key path and the line it
was written on: a typo in a gate controller's config must stop it at start,
not silently drop a setting.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import ipaddress
import os
import re
import zoneinfo
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import msgspec
import phonenumbers

from gated import tomlpos
from gated.errors import ConfigError

if TYPE_CHECKING:
    import tomllib as toml

    from gated.codes import CodeBook
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
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
Pulse = Annotated[float, msgspec.Meta(gt=0, le=MAX_PULSE)]


class _Table(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Base of every config table: unknown keys are errors."""


class SiteConfig(_Table, kw_only=True, frozen=True):
    id: Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
    timezone: str = "UTC"
    region: Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{2}$")] = "NL"


class ServerConfig(_Table, kw_only=True, frozen=True):
    listen: str = "127.0.0.1:8080"
    path: Annotated[str, msgspec.Meta(pattern=r"^/[A-Za-z0-9/_.-]*$")] = "/voipgrid"
    tokens: Annotated[list[Annotated[str, msgspec.Meta(min_length=12)]],
                      msgspec.Meta(min_length=1)]
    allow_from: list[str] = []
    answer_deadline: Annotated[float, msgspec.Meta(gt=0, le=30)] = 3.0
    nak_word: Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{2,8}$")] = "NAK"
    max_body: Annotated[int, msgspec.Meta(ge=256, le=1 << 20)] = 8192


class _Relay(_Table, tag_field="type", kw_only=True, frozen=True):
    pin: int | str
    active_high: bool = True
    pulse: Pulse = 1.0


class GpioActuatorConfig(_Relay, tag="gpio", kw_only=True, frozen=True):
    """A relay on a real GPIO pin, through gpiozero's default pin factory."""


class MockActuatorConfig(_Relay, tag="mock", kw_only=True, frozen=True):
    """gpiozero MockFactory pins: the daemon runs anywhere, nothing moves."""


class MqttActuatorConfig(_Table, tag_field="type", tag="mqtt", kw_only=True, frozen=True):
    command_topic: str
    payload: str = "ON"
    state_topic: str | None = None
    state_payload: str = "ON"
    confirm: Seconds = 2.0


ActuatorConfig = GpioActuatorConfig | MockActuatorConfig | MqttActuatorConfig


class GateConfig(_Table, kw_only=True, frozen=True):
    numbers: list[str] = []
    actuator: ActuatorConfig
    callers: list[str] = []


class CodeConfig(_Table, kw_only=True, frozen=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=120)]
    id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] | None = None
    code: str
    gates: list[str] = []
    valid_from: dt.datetime | None = None
    valid_until: dt.datetime | None = None
    schedule: list[str] = []
    max_uses: PositiveInt | None = None
    callers: list[str] = []
    callername: str = ""
    destination: str = ""


class TotpConfig(_Table, kw_only=True, frozen=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=120)]
    id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] | None = None
    secret: str
    gates: list[str] = []
    digits: Annotated[int, msgspec.Meta(ge=6, le=8)] = 6
    period: Annotated[int, msgspec.Meta(ge=15, le=120)] = 30
    callername: str = ""
    destination: str = ""


class LockoutConfig(_Table, kw_only=True, frozen=True):
    caller_failures: PositiveInt = 5
    site_failures: PositiveInt = 30
    site_window: Seconds = 3600.0
    lock_seconds: Seconds = 300.0
    max_lock_seconds: Seconds = 86400.0


class MqttConfig(_Table, kw_only=True, frozen=True):
    host: str = "localhost"
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 1883
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    prefix: str | None = None
    fleet_prefix: str | None = None
    client_id: str | None = None
    keepalive: Annotated[int, msgspec.Meta(ge=5, le=3600)] = 30
    discovery_prefix: str = "homeassistant"


class LogConfig(_Table, kw_only=True, frozen=True):
    path: str = "/var/lib/gated/entries.sqlite3"
    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"


class MetricsConfig(_Table, kw_only=True, frozen=True):
    listen: str = "127.0.0.1:9108"


class Config(_Table, kw_only=True, frozen=True):
    site: SiteConfig
    server: ServerConfig
    gates: dict[str, GateConfig]
    codes: list[CodeConfig] = []
    totp: list[TotpConfig] = []
    lockout: LockoutConfig = LockoutConfig()
    mqtt: MqttConfig | None = None
    log: LogConfig = LogConfig()
    metrics: MetricsConfig | None = None

    @property
    def tz(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.site.timezone)

    @property
    def mqtt_prefix(self) -> str:
        if self.mqtt is not None and self.mqtt.prefix:
            return self.mqtt.prefix
        return f"gated/{self.site.id}"


class Loaded(msgspec.Struct, frozen=True):
    """A validated config, where it came from, and its compiled code book."""

    config: Config
    path: Path
    book: CodeBook

    @property
    def store_path(self) -> Path:
        return resolve(self.path, self.config.log.path)


def resolve(config_path: Path, value: str) -> Path:
    """Relative paths in the config are relative to the config file's folder."""
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else (config_path.parent / path).resolve()


def default_path() -> str:
    return os.environ.get("GATED_CONFIG", DEFAULT_PATH)


def load(path: str | os.PathLike[str]) -> Loaded:
    """Read, parse and check a config file, or raise ConfigError naming key and line."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", file=str(file)) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError("not UTF-8 text", file=str(file)) from exc
    config, book = parse(text, source=str(file))
    return Loaded(config=config, path=file.resolve(), book=book)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a config is built.

    Parsing makes millions of containers that all live on, and each full
    collection while they pile up scans every one made so far: with 100,000
    codes that was a third of the load time, for nothing collected.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@_gc_paused()
def parse(text: str, *, source: str = "") -> tuple[Config, CodeBook]:
    """Parse TOML text into a checked Config and the code book compiled from it."""
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
        return ConfigError(message, path=tomlpos.format_path(key), file=source,
                           line=tomlpos.line_of(lines, key))

    config = _convert(raw, fail)
    # The plain dicts of a large file weigh more than the checked config they
    # became: free them before the code book is built, not after.
    del raw
    _check(config, fail)
    # Credentials, numbers and schedules are compiled by the code book, which
    # reports its own key paths.
    from gated.codes import compile_book

    return config, compile_book(config, error=fail)


def _convert(raw: dict[str, Any], fail: Any) -> Config:
    # msgspec reports dict keys as "[...]"; check each gate on its own so the
    # error can name it.
    gates = raw.get("gates")
    if isinstance(gates, dict):
        for name, gate in gates.items():
            _convert_one(gate, GateConfig, ("gates", name), fail)
    return _convert_one(raw, Config, (), fail)


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


def _check(config: Config, fail: Any) -> None:
    """Checks that span several fields, each naming the key it is about."""
    try:
        zoneinfo.ZoneInfo(config.site.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise fail(("site", "timezone"), f"unknown time zone {config.site.timezone!r}") from None
    if config.site.region not in phonenumbers.SUPPORTED_REGIONS:
        raise fail(("site", "region"), f"unknown region {config.site.region!r}")
    _check_listen(config.server.listen, ("server", "listen"), fail)
    if config.metrics is not None:
        _check_listen(config.metrics.listen, ("metrics", "listen"), fail)
    for index, cidr in enumerate(config.server.allow_from):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise fail(("server", "allow_from", index), f"not a network: {cidr!r}") from None
    if not config.gates:
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
    for name, gate in config.gates.items():
        if isinstance(gate.actuator, GpioActuatorConfig | MockActuatorConfig):
            pin = str(gate.actuator.pin).upper().removeprefix("GPIO").removeprefix("BCM")
            if pin in pins:
                raise fail(("gates", name, "actuator", "pin"),
                           f"pin {gate.actuator.pin} is already gate {pins[pin]!r}'s")
            pins[pin] = name
    mqtt_gates = [n for n, g in config.gates.items() if isinstance(g.actuator, MqttActuatorConfig)]
    if mqtt_gates and config.mqtt is None:
        raise fail(("gates", mqtt_gates[0], "actuator"), "an mqtt actuator needs an [mqtt] table")


def _check_listen(value: str, key: tomlpos.Key, fail: Any) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536 or not host:
        raise fail(key, f"expected host:port, got {value!r}")


def split_listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)
