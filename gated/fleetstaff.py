"""Staff publish the fleet's codes as one set (``gated.codeset``): put, rm, import, ls.

Every command reads the broker's manifest first and publishes a new one after
its change, so sites always know the whole set. A single change is a delta
(the code's own retained message, listed in the manifest); past
``codeset.MAX_DELTAS`` deltas, or on ``import``, the whole set is compiled and
published again in chunks, and the deltas are cleared.

No digits reach the broker: a fleet code's ``code_hash`` and the set's
digests are made with the fleet key, which the staff machine must hold as
every site does (``gated codes fleet-key``).

Two staff machines publishing at once: MQTT has no compare-and-set, so a
command reads the manifest again just before publishing its own and once
after; if another one replaced it meanwhile, it merges its change into that
one and publishes again. What the remaining window (milliseconds) can still
lose is a put's listing, not its code: the code stays retained, sites apply it,
and the next command lists it again (``adopted``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from gated import bookfile, codeset, sitekey
from gated.codes import CODE_RE
from gated.codeset import Entry, Manifest, SetError, SetPolicy
from gated.config import CodeConfig, Config, fleet_key_path
from gated.console import counted
from gated.errors import GatedError

if TYPE_CHECKING:
    import aiomqtt

    from gated import compiler
    from gated.mqtt import Incoming

# How often a command merges and publishes again when others keep replacing the manifest.
ATTEMPTS = 5


class FleetError(GatedError):
    """A fleet command could not do what was asked; the message says why."""


def fleet_key(loaded: compiler.Loaded, *, create: bool = False) -> bytes:
    path = fleet_key_path(loaded.source, loaded.config)
    key = (sitekey.ensure_key(path, "fleet key") if create
           else sitekey.read_key(path, "fleet key"))
    if key is None:
        raise FleetError(f"no fleet key at {path}: copy the fleet's key there (mode 0600), "
                         "or make the fleet's first one with `gated codes fleet-key --new`")
    return key


@dataclass
class Broker:
    """What the broker holds under the fleet prefix."""

    manifest: Manifest | None = None
    chunks: dict[int, bytes] = field(default_factory=dict)
    deltas: dict[str, bytes] = field(default_factory=dict)  # retained codes/<id>

    def image(self) -> bookfile.Image | None:
        """The set the manifest names, None when the broker does not hold it whole."""
        manifest = self.manifest
        if manifest is None:
            return None
        assembly = codeset.Assembly(manifest)
        for index, payload in self.chunks.items():
            try:
                prefix, at, data = codeset.read_chunk(payload)
            except SetError:
                continue
            if prefix == assembly.prefix and at == index:
                assembly.add(at, data)
        if not assembly.complete:
            return None
        try:
            return bookfile.image(assembly.data())
        except (SetError, bookfile.BookError):
            return None

    def missing_deltas(self) -> list[str]:
        manifest = self.manifest
        if manifest is None:
            return []
        return [code_id for code_id, digest in manifest.deltas.items()
                if digest is not None and (code_id not in self.deltas or codeset.body_digest(
                    self.deltas[code_id]) != digest)]


async def read(client: aiomqtt.Client, base: str, marker: str, *,
               with_set: bool = True) -> Broker:
    from gated.mqtt import read_retained

    filters = [f"{base}/set", f"{base}/codes/+"]
    if with_set:
        filters.insert(0, f"{base}/set/+")
    found, complete = await read_retained(client, filters, marker_topic=marker, within=15.0)
    del complete  # a cut list shows as a set or delta missing, which is refused
    return from_messages(found, base)


def from_messages(found: list[Incoming], base: str) -> Broker:
    """What the retained messages under ``base`` (the fleet prefix) say."""
    broker = Broker()
    for message in found:
        rest = message.topic.removeprefix(f"{base}/")
        if rest == "set":
            try:
                broker.manifest = codeset.decode_manifest(message.payload)
            except SetError as exc:
                raise FleetError(f"the manifest on {message.topic} cannot be read: {exc}; "
                                 "publish the whole set again with `gated codes import "
                                 "--fleet`") from None
        elif rest.startswith("set/") and rest[4:].isdigit():
            broker.chunks[int(rest[4:])] = message.payload
        elif rest.startswith("codes/") and rest.count("/") == 1 and message.payload:
            broker.deltas[rest[6:]] = message.payload
    return broker


def entry_of(code_id: str, body: bytes, key: bytes) -> Entry:
    """A delta's message as an entry of the set (digits, if any, are keyed here);
    FleetError, in one line, for a message that is no fleet code."""
    try:
        fields = msgspec.json.decode(body)
        if not isinstance(fields, dict):
            raise TypeError("not a JSON object")
        if "code_hash" in fields:
            digest = sitekey.parse_hash(str(fields["code_hash"]))
            if digest is None:
                raise ValueError("its code_hash cannot be read")
        elif isinstance(fields.get("code"), str) and CODE_RE.fullmatch(fields["code"]):
            digest = sitekey.digest(key, fields["code"])
        else:
            raise ValueError("it has neither code nor code_hash")
        # The fields' types as every site checks them (a code's own gates and
        # numbers are each site's to check): a message of the wrong shape is
        # refused here, not listed for sites that would wait for it forever.
        msgspec.convert({"name": code_id, **fields}, CodeConfig)
        policy = SetPolicy.of(fields)
    except (msgspec.DecodeError, msgspec.ValidationError, TypeError, ValueError) as exc:
        raise FleetError(f"the fleet code {code_id!r} on the broker is not one gated can "
                         f"read ({exc}); delete it with `gated codes rm --fleet "
                         f"{code_id}`") from None
    return Entry(digest, policy, str(fields.get("name", code_id)), code_id)


def readable(code_id: str, body: bytes, key: bytes) -> bool:
    try:
        entry_of(code_id, body, key)
    except FleetError:
        return False
    return True


def current(broker: Broker, key: bytes) -> dict[str, Entry]:
    """The fleet's codes now: the set, with the listed deltas laid over it."""
    manifest = broker.manifest
    codes: dict[str, Entry] = {}
    if manifest is not None:
        image = broker.image()
        if image is None:
            raise FleetError("the broker does not hold the whole set its manifest names "
                             f"(serial {manifest.serial}); publish it again with `gated "
                             "codes import --fleet`")
        codes = {entry.id: entry for entry in codeset.entries(image)}
        for code_id, digest in adopted(broker, key).items():
            codes.pop(code_id, None)
            if digest is None:
                continue
            body = broker.deltas.get(code_id)
            if body is None or codeset.body_digest(body) != digest:
                raise FleetError(f"the broker lacks the delta {code_id!r} its manifest "
                                 "lists; publish the whole set again with `gated codes "
                                 "import --fleet`")
            codes[code_id] = entry_of(code_id, body, key)
    else:
        # Codes published one message each before there was a set: taken in,
        # digits hashed with the fleet key, and cleared from the broker (a
        # message that is no code goes too: no site applies it).
        for code_id, body in broker.deltas.items():
            if readable(code_id, body, key):
                codes[code_id] = entry_of(code_id, body, key)
    return codes


def adopted(broker: Broker, key: bytes) -> dict[str, str | None]:
    """The manifest's deltas, plus any readable code on the broker it does not list.

    A put whose manifest another staff command replaced at the same moment
    left its code retained but unlisted; sites apply it all the same, and the
    next command lists it again instead of losing it.
    """
    manifest = broker.manifest
    deltas: dict[str, str | None] = dict(manifest.deltas) if manifest is not None else {}
    for code_id, body in broker.deltas.items():
        if code_id not in deltas and readable(code_id, body, key):
            deltas[code_id] = codeset.body_digest(body)
    return deltas


def hashed_body(fields: dict[str, Any], code: str, key: bytes) -> bytes:
    """A fleet code's message: its digits as the fleet key's hash."""
    body = {k: v for k, v in fields.items() if k != "code"}
    body["code_hash"] = sitekey.code_hash(key, code)
    return json.dumps(body, ensure_ascii=False).encode()


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def compile_set(entries: Iterable[Entry], previous: Manifest | None,
                key: bytes) -> tuple[list[bytes], Manifest]:
    """A whole set's chunks and the manifest that names them."""
    data = codeset.build(entries)
    chunks = codeset.split(data)
    return chunks, Manifest(serial=codeset.new_serial(previous),
                            version=codeset.version_of(data), size=len(data),
                            chunks=len(chunks), codes=bookfile.read_header(data)[0].codes,
                            key=codeset.fingerprint(key), time=_now())


async def send_set(client: aiomqtt.Client, base: str, chunks: list[bytes], manifest: Manifest,
                   broker: Broker) -> None:
    """Chunks, then the manifest, then clear what it replaces."""
    for index, chunk in enumerate(chunks):
        await client.publish(f"{base}/set/{index}", chunk, qos=1, retain=True)
    await client.publish(f"{base}/set", manifest.encode(), qos=1, retain=True)
    # After the manifest: a site that reads the broker meanwhile finds the
    # old deltas still there for the old manifest.
    stale = {index for index in broker.chunks if index >= len(chunks)}
    if broker.manifest is not None:
        stale |= set(range(len(chunks), broker.manifest.chunks))
    for index in sorted(stale):
        await client.publish(f"{base}/set/{index}", b"", qos=1, retain=True)
    for code_id in sorted(set(broker.deltas) | set(
            broker.manifest.deltas if broker.manifest is not None else ())):
        await client.publish(f"{base}/codes/{code_id}", b"", qos=1, retain=True)


async def publish_set(client: aiomqtt.Client, base: str, entries: Iterable[Entry],
                      broker: Broker, key: bytes) -> Manifest:
    """Publish a whole set (compiled here)."""
    chunks, manifest = compile_set(entries, broker.manifest, key)
    await send_set(client, base, chunks, manifest, broker)
    return manifest


async def change(client: aiomqtt.Client, base: str, marker: str, key: bytes,
                 code_id: str, body: bytes | None) -> Manifest:
    """Put (``body``) or delete (None) one fleet code, as a delta or a new set."""
    for _ in range(ATTEMPTS):
        broker = await read(client, base, marker)
        manifest = broker.manifest
        deltas = adopted(broker, key)
        if manifest is None or len(deltas | {code_id: None}) > codeset.MAX_DELTAS:
            codes = current(broker, key)
            codes.pop(code_id, None)
            if body is not None:
                codes[code_id] = entry_of(code_id, body, key)
            published = await publish_set(client, base, codes.values(), broker, key)
        else:
            # The set itself must be whole before anything is laid over it.
            current(broker, key)
            deltas[code_id] = None if body is None else codeset.body_digest(body)
            published = msgspec.structs.replace(
                manifest, serial=codeset.new_serial(manifest), deltas=deltas, time=_now())
            if not await _still(client, base, marker, manifest):
                continue  # replaced since it was read: start again from the new one
            # A put: the code, then the manifest that lists it. A delete: the
            # manifest first, so no site ever goes back to the set's own copy.
            delta = f"{base}/codes/{code_id}"
            if body is not None:
                await client.publish(delta, body, qos=1, retain=True)
            await client.publish(f"{base}/set", published.encode(), qos=1, retain=True)
            if body is None:
                await client.publish(delta, b"", qos=1, retain=True)
        if await _still(client, base, marker, published):
            return published
        # Someone published another manifest meanwhile: do it again on theirs.
        await asyncio.sleep(secrets.randbelow(500) / 1000)
    raise FleetError(f"the fleet's manifest kept changing under this command ({ATTEMPTS} "
                     "tries); run it again")


async def _still(client: aiomqtt.Client, base: str, marker: str, ours: Manifest) -> bool:
    broker = await read(client, base, marker, with_set=False)
    return broker.manifest is not None and broker.manifest.serial == ours.serial


async def replace_all(client: aiomqtt.Client, base: str, marker: str, key: bytes,
                      entries: list[Entry]) -> Manifest:
    """Make ``entries`` the fleet's whole set (``gated codes import --fleet``)."""
    broker = await read(client, base, marker)
    return await publish_set(client, base, entries, broker, key)


def rows(broker: Broker, tz: Any) -> tuple[list[dict[str, Any]], bool, str]:
    """The fleet's codes for ``gated codes ls --broker``, whether the list is whole, and a
    line saying so."""
    manifest = broker.manifest
    if manifest is None:
        return [], False, ""
    image = broker.image()
    missing = broker.missing_deltas()
    listed: dict[str, dict[str, Any]] = {}
    if image is not None:
        for entry in codeset.entries(image):
            if entry.id not in manifest.deltas:
                listed[entry.id] = {"scope": "fleet", "id": entry.id, "name": entry.name,
                                    **entry.policy.fields()}
    for code_id, digest in manifest.deltas.items():
        body = broker.deltas.get(code_id)
        if digest is None or body is None or codeset.body_digest(body) != digest:
            continue
        try:
            fields = msgspec.json.decode(body, type=dict[str, Any])
        except msgspec.DecodeError:
            fields = {"unreadable": True}
        fields.pop("code_hash", None)
        fields.pop("code", None)
        listed[code_id] = {"scope": "fleet", "id": code_id, "name": code_id, **fields}
    whole = image is not None and not missing
    expected = manifest.codes + sum(1 for d in manifest.deltas.values() if d is not None)
    if whole:
        line = (f"fleet set serial {manifest.serial}: complete ({counted(len(listed), 'code')}, "
                f"{counted(manifest.chunks, 'chunk')}, "
                f"{counted(len(manifest.deltas), 'delta')})")
    else:
        parts = []
        if image is None:
            parts.append("the set's chunks are not all on the broker")
        if missing:
            parts.append(f"{len(missing)} listed deltas are missing")
        line = (f"fleet set serial {manifest.serial}: INCOMPLETE, {'; '.join(parts)} "
                f"(listed {len(listed)} of about {expected}); publish it again with "
                "`gated codes import --fleet`")
    del tz
    return [listed[k] for k in sorted(listed)], whole, line


def new_key(path: Path) -> bytes:
    if sitekey.read_key(path, "fleet key") is not None:
        raise FleetError(f"{path} holds a fleet key already; a new one would make every "
                         "fleet code unreadable at the sites that have the old one")
    return sitekey.ensure_key(path, "fleet key")


def describe_key(loaded: compiler.Loaded, config: Config, create: bool) -> str:
    path = fleet_key_path(loaded.source, config)
    key = new_key(path) if create else sitekey.read_key(path, "fleet key")
    if key is None:
        return (f"no fleet key at {path}; make the fleet's first one with `gated codes "
                "fleet-key --new` and copy it to every site (mode 0600)")
    return f"fleet key {path}: fingerprint {codeset.fingerprint(key)}"
