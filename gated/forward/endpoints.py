"""``[[forward]]`` endpoints: which entries each takes, and the body it is sent.

Bodies are built when a row is sent, from the stored entry or alarm: the
entry store holds what happened once, and each endpoint's ``caller`` setting
decides what of the caller leaves. Nothing typed by a caller is in an entry,
so no body can carry it; secrets live in the endpoint, never in a body.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import dataclasses
import datetime as dt
import hashlib
import hmac
import urllib.parse
import zoneinfo
from dataclasses import dataclass
from typing import Any

import jinja2
import msgspec
from jinja2.sandbox import ImmutableSandboxedEnvironment

from gated.book.config import Config, ForwardConfig
from gated.core.console import parse_duration
from gated.core.errors import NumberError
from gated.core.lockout import SITE, WITHHELD
from gated.core.numbers import normalise
from gated.site import events
from gated.site.store import Entry

# Reasons whose credential is a route: GA4's ``route`` parameter names it.
ROUTE_REASONS = frozenset({"routed_caller", "granted_route"})
GA4_EVENT = "phone_call"
# GA4 takes events up to 72 hours old; older ones are dropped without a word.
GA4_MAX_AGE = 72 * 3600.0
MIN_SECRET_BYTES = 16
TEXT = "text/plain; charset=utf-8"
# Alarm fields that may leave: the others (paths, errors) are for the log.
ALARM_FIELDS = ("gate", "seconds", "open_seconds", "endpoint", "status")

_environment = ImmutableSandboxedEnvironment(autoescape=False, keep_trailing_newline=True)


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str
    url: str
    host: str  # what logs and alarms name: the URL may carry a secret
    format: str
    numbers: frozenset[str]
    statuses: frozenset[str]
    alarms: bool
    caller: str
    timeout: float
    give_up_after: float
    secret: str | None = None
    event_name: str = GA4_EVENT
    method: str = "POST"
    content_type: str = "application/json"
    template: jinja2.Template | None = None

    def takes(self, entry: Entry) -> bool:
        # A sensor's entry is an alarm: it is forwarded as one, where asked.
        return (entry.source != "sensor"
                and (not self.numbers or entry.did in self.numbers)
                and (not self.statuses or entry.status in self.statuses))


def pseudonym(key: bytes, number: str) -> str:
    """Stable per caller and site, and says nothing without the site key."""
    mac = hmac.new(key, b"forward-caller\0" + number.encode(), hashlib.sha256)
    return "p" + mac.hexdigest()[:24]


def fields(endpoint: Endpoint, kind: str, data: dict[str, Any], *, site: str,
           tz: zoneinfo.ZoneInfo, key: bytes) -> dict[str, Any]:
    """The event a row stands for, as this endpoint may see it."""
    if kind == "entry":
        event = events.event(Entry(**data), site=site, tz=tz)
    else:
        caller = data.get("key")
        event = {
            "event_type": "alarm", "alarm": data.get("alarm", ""),
            "time": dt.datetime.fromtimestamp(float(data.get("time", 0.0)), tz)
            .isoformat(timespec="milliseconds"),
            "site": site, "caller": caller if caller not in (None, SITE, WITHHELD) else None,
            **{k: data[k] for k in ALARM_FIELDS if k in data},
        }
    number = event.get("caller")
    if endpoint.caller == "none":
        event.pop("caller", None)
    elif endpoint.caller == "pseudonym" and number:
        event["caller"] = pseudonym(key, number)
    return event


def body(endpoint: Endpoint, kind: str, data: dict[str, Any], msg_id: str, *, site: str,
         tz: zoneinfo.ZoneInfo, key: bytes) -> bytes:
    """The bytes sent for one row. Raises jinja2's errors for a template that fails."""
    event = fields(endpoint, kind, data, site=site, tz=tz, key=key)
    if endpoint.format == "ga4":
        return msgspec.json.encode(ga4(endpoint, data, event, msg_id, key))
    if endpoint.format == "template":
        assert endpoint.template is not None
        return endpoint.template.render(event).encode()
    return msgspec.json.encode(event)


def ga4(endpoint: Endpoint, data: dict[str, Any], event: dict[str, Any], msg_id: str,
        key: bytes) -> dict[str, Any]:
    # A phone number is personal data GA4 must not get: client_id is always a
    # pseudonym; with caller = "none" one that no other call shares.
    number = data.get("caller")
    client = pseudonym(key, number if number and endpoint.caller != "none" else msg_id)
    reason = str(event.get("reason") or "")
    return {
        "client_id": client,
        "timestamp_micros": int(float(data["time"]) * 1_000_000),
        "events": [{"name": endpoint.event_name, "params": {
            "called_number": event.get("did") or "",
            "gate": event.get("gate") or "",
            "status": event.get("status") or "",
            "reason": reason,
            "route": event.get("credential") or "" if reason in ROUTE_REASONS else "",
        }}],
    }


def sample_entry() -> Entry:
    """A granted call with every field set: a template is tried on it at load."""
    return Entry(time=1_790_000_000.0, gate="barrier", caller="+31612345678",
                 did="+31501234567", status="ACK", reason="granted_code",
                 callername="Sample", credential="Sample code", credential_id="sample",
                 kind="code", actuator="pulsed", latency_ms=12.5)


def sample_alarm() -> dict[str, Any]:
    return {"alarm": "held_open", "time": 1_790_000_000.0, "gate": "barrier",
            "open_seconds": 120.0}


def build(config: Config, fail: Any = None) -> list[Endpoint]:
    """The config's endpoints; ``fail(key, message)`` makes the error for a bad one."""
    built: list[Endpoint] = []
    names: set[str] = set()
    for index, forward in enumerate(config.forward):
        where = ("forward", index)

        def refuse(key: str, message: str, where: tuple[Any, ...] = where) -> Exception:
            if fail is None:
                return ValueError(message)
            return fail((*where, key), message)  # type: ignore[no-any-return]

        if forward.name in names:
            raise refuse("name", f"another [[forward]] is called {forward.name!r}")
        names.add(forward.name)
        built.append(_endpoint(config, forward, refuse))
    return built


def check(config: Config, fail: Any) -> None:
    build(config, fail)


def _endpoint(config: Config, forward: ForwardConfig, refuse: Any) -> Endpoint:
    url = urllib.parse.urlsplit(forward.url)
    if url.scheme not in ("http", "https") or not url.hostname:
        # Not the value: a URL may hold a secret.
        raise refuse("url", "expected an http:// or https:// URL with a host")
    try:
        give_up = parse_duration(forward.give_up_after, "give_up_after")
    except argparse.ArgumentTypeError as exc:
        raise refuse("give_up_after", str(exc).partition(": ")[2]) from None
    if give_up <= 0:
        raise refuse("give_up_after", "must be longer than 0s")
    numbers = set()
    for index, raw in enumerate(forward.numbers):
        try:
            number = normalise(raw, config.site.region)
        except NumberError as exc:
            raise refuse("numbers", f"item {index}: {exc}") from None
        if number is not None:
            numbers.add(number)
    for key, formats in (("secret", ("json",)), ("event_name", ("ga4",)),
                         ("method", ("template",)), ("content_type", ("template",)),
                         ("body", ("template",))):
        if getattr(forward, key) is not None and forward.format not in formats:
            raise refuse(key, f"only for format = {formats[0]!r}")
    endpoint = Endpoint(
        name=forward.name, url=forward.url, host=url.hostname, format=forward.format,
        numbers=frozenset(numbers), statuses=frozenset(forward.statuses),
        alarms=forward.alarms, caller=forward.caller, timeout=forward.timeout,
        give_up_after=give_up)
    if forward.format == "json":
        if not forward.secret:
            raise refuse("secret", "json forwards are signed: set a secret "
                         "(whsec_ and base64, as Standard Webhooks receivers expect)")
        _check_secret(forward.secret, refuse)
        return _replace(endpoint, secret=forward.secret)
    if forward.format == "ga4":
        if forward.alarms:
            raise refuse("alarms", "GA4 takes calls, not alarms")
        if give_up > GA4_MAX_AGE:
            raise refuse("give_up_after", "GA4 drops events older than 72h")
        query = urllib.parse.parse_qs(url.query)
        if "measurement_id" not in query or "api_secret" not in query:
            raise refuse("url", "a GA4 URL carries measurement_id and api_secret")
        return _replace(endpoint, event_name=forward.event_name or GA4_EVENT)
    if forward.body is None:
        raise refuse("body", "a template forward needs a body")
    template = _template(endpoint, forward.body, refuse)
    return _replace(endpoint, method=forward.method or "POST",
                    content_type=forward.content_type or TEXT, template=template)


def _replace(endpoint: Endpoint, **changes: Any) -> Endpoint:
    return dataclasses.replace(endpoint, **changes)


def _check_secret(secret: str, refuse: Any) -> None:
    text = secret.removeprefix("whsec_")
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise refuse("secret", "not base64 (after the whsec_ prefix)") from None
    if len(key) < MIN_SECRET_BYTES:
        raise refuse("secret", f"too short: at least {MIN_SECRET_BYTES} bytes "
                      "(openssl rand -base64 32)")


def _template(endpoint: Endpoint, text: str, refuse: Any) -> jinja2.Template:
    try:
        template = _environment.from_string(text)
    except jinja2.TemplateSyntaxError as exc:
        raise refuse("body", f"template line {exc.lineno}: {exc.message}") from None
    trial = _replace(endpoint, template=template)
    tz = zoneinfo.ZoneInfo("UTC")
    samples: list[tuple[str, dict[str, Any]]] = [("entry", sample_entry().as_dict())]
    if endpoint.alarms:
        samples.append(("alarm", sample_alarm()))
    for kind, data in samples:
        try:
            body(trial, kind, data, "msg_sample", site="sample", tz=tz, key=b"k" * 32)
        except Exception as exc:  # a template can raise anything; say it once, at load
            raise refuse("body", f"template cannot render a sample {kind}: "
                         f"{type(exc).__name__}: {exc}") from None
    return template
