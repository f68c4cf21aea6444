"""Staff publish code sets (``gated.book.codeset``): the fleet's (put, rm, import) and a
site's own (import).

Every command reads the broker's manifest first and publishes a new one after
its change, signed with staff's signing key (``gated.book.signing``), so sites
always know the whole set and know it is staff's. A single fleet change is a
delta (the code's own retained message, listed in the manifest by its
SHA-256); past ``codeset.MAX_DELTAS`` deltas, or on ``import``, the whole set
is compiled and published again in chunks, and the deltas are cleared. A
site's ``import`` lays the file's codes over the site's set (``--replace``:
the file is the whole set).

A manifest on the broker that this machine's keys do not verify (forged, or
from before sets were signed) is never built on: ``import`` replaces it, and
a fleet put or rm refuses until it has. Serials are microseconds since 1970
and above the last this machine published (kept beside its signing key), so
they only grow, whatever the broker holds; a broker holding an older set than
this machine published (restored from an old copy, a replay) is not built on
either.

No digits reach the broker: a code's ``code_hash`` and the set's digests are
made with the fleet key (the site key for a site's set), which the staff
machine holds as every site does (``gated codes fleet-key``).

Two staff machines publishing at once: MQTT has no compare-and-set, so a
command reads the manifest again just before publishing its own and once
after; if another one replaced it meanwhile, it merges its change into that
one and publishes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import json
import os
import secrets
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from gated.book import bookfile, codeset, files, signing, sitekey
from gated.book.codeset import Entry, Manifest, SetError, SetPolicy
from gated.book.config import CodeConfig, Config, fleet_key_path
from gated.book.messages import Scope
from gated.core.console import counted
from gated.core.credential import CODE_RE
from gated.core.errors import ConfigError, GatedError

if TYPE_CHECKING:
    import aiomqtt

    from gated.book import compiler
    from gated.mqtt.link import Incoming

# How often a command merges and publishes again when others keep replacing the manifest.
ATTEMPTS = 12
# Serials are microseconds: a broker whose set is older than the last this machine
# published by more than a minute went back (restored, replayed); less is a race
# with another staff machine, which the retries settle.
ROLLED_BACK = 60 * 1_000_000
# How long a command waits after publishing before it checks its manifest still stands.
SETTLE = 0.2


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


@dataclass(frozen=True)
class SetKeys:
    """What a staff command needs to publish one set."""

    scope: Scope
    base: str                # the topic prefix the set lives under
    hmac: bytes              # the digests' key: the fleet key, or the site key
    signer: signing.Signer
    trust: signing.Trust     # the public keys whose manifests this machine builds on
    memory: Path             # the last serial this machine published

    def remembered(self) -> int:
        try:
            return int(self.memory.read_text(encoding="ascii").strip() or 0)
        except (OSError, ValueError):
            return 0

    def remember(self, serial: int) -> None:
        if serial > self.remembered():
            files.replace(self.memory, f"{serial}\n".encode("ascii"))

    @contextlib.asynccontextmanager
    async def one_at_a_time(self) -> AsyncIterator[None]:
        """This machine's commands on this set, one after another: two at once would
        publish serials out of order and overwrite each other's listing."""
        fd = files.open_flock(self.memory)
        try:
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # and with it the lock


def fleet_keys(loaded: compiler.Loaded) -> SetKeys:
    """The fleet's keys on this staff machine; FleetError when one is missing."""
    config = loaded.config
    assert config.mqtt is not None
    assert config.mqtt.fleet_prefix is not None
    hmac_path = fleet_key_path(loaded.source, config)
    key = fleet_key(loaded)
    private = signing.private_path(hmac_path)
    try:
        signer = signing.read_private(private)
    except ConfigError as exc:
        raise FleetError(str(exc)) from None
    if signer is None:
        raise FleetError(f"no fleet signing key at {private}: only staff who hold it can "
                         "publish the fleet's codes; copy it there (mode 0600), or make it "
                         "with `gated codes fleet-key --new`")
    return SetKeys("fleet", config.mqtt.fleet_prefix, key, signer,
                   signing.Trust(signing.public_path(hmac_path)),
                   private.with_suffix(".serial"))


def site_keys(loaded: compiler.Loaded) -> SetKeys:
    """The site's set keys: the site key, and a signing key made by the first command
    that needs one (with the public key beside it, which the daemon reads)."""
    if not loaded.book.site_key:
        raise FleetError(f"no site key at {loaded.key_path}, so the digits would go to the "
                         "broker in clear; run this where gated runs")
    try:
        signer, made = signing.make_keys(loaded.key_path)
    except ConfigError as exc:
        raise FleetError(str(exc)) from None
    if made:
        print(f"made the site's signing key {signing.private_path(loaded.key_path)} and "
              f"its public key {signing.public_path(loaded.key_path)} (the daemon reads it)")
    private = signing.private_path(loaded.key_path)
    return SetKeys("site", loaded.config.mqtt_prefix, loaded.book.key, signer,
                   signing.Trust(signing.public_path(loaded.key_path)),
                   private.with_suffix(".serial"))


@dataclass
class Broker:
    """What the broker holds under a set's prefix."""

    manifest: Manifest | None = None   # signed by a key this machine trusts
    chunks: dict[int, bytes] = field(default_factory=dict)
    deltas: dict[str, bytes] = field(default_factory=dict)  # retained codes/<id>
    refused: str | None = None         # why a manifest on the broker is not built on

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
            return bookfile.image(bytes(assembly.data()))
        except (SetError, bookfile.BookError):
            return None

    def missing_deltas(self) -> list[str]:
        manifest = self.manifest
        if manifest is None:
            return []
        return [code_id for code_id, digest in manifest.deltas.items()
                if digest is not None and (code_id not in self.deltas or codeset.body_digest(
                    self.deltas[code_id]) != digest)]


async def read(client: aiomqtt.Client, keys: SetKeys, marker: str, *,
               with_set: bool = True) -> Broker:
    from gated.mqtt.link import read_retained

    base = keys.base
    filters = [f"{base}/set", f"{base}/codes/+"]
    if with_set:
        filters.insert(0, f"{base}/set/+")
    found, complete = await read_retained(client, filters, marker_topic=marker, within=15.0)
    del complete  # a cut list shows as a set or delta missing, which is refused
    return from_messages(found, base, keys.trust)


def from_messages(found: list[Incoming], base: str, trust: signing.Trust | None) -> Broker:
    """What the retained messages under ``base`` say; with ``trust``, a manifest that
    its keys do not verify is set aside (``refused``), never built on."""
    broker = Broker()
    for message in found:
        rest = message.topic.removeprefix(f"{base}/")
        if rest == "set":
            try:
                manifest = codeset.decode_manifest(message.payload)
            except SetError as exc:
                broker.refused = f"the manifest on {message.topic} cannot be read ({exc})"
                continue
            problem = manifest.check(trust, base) if trust is not None else None
            if problem is None:
                broker.manifest = manifest
            else:
                broker.refused = (f"the manifest on {message.topic} (serial {manifest.serial}) "
                                  f"is not staff's: {problem}")
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


def current(broker: Broker, keys: SetKeys) -> dict[str, Entry]:
    """The codes of a set now: the set, with the listed deltas laid over it."""
    manifest = broker.manifest
    key = keys.hmac
    codes: dict[str, Entry] = {}
    if broker.refused is not None:
        raise FleetError(f"{broker.refused}; nothing is built on it: publish the whole set "
                         f"again with `{_import_command(keys)}`, which replaces it")
    if manifest is not None:
        # Older by more than a race between two machines could make it: the broker
        # went back (a restore from an old copy, a replay) and lost changes.
        if manifest.serial < keys.remembered() - ROLLED_BACK:
            raise FleetError(
                f"the broker holds serial {manifest.serial}, older than the "
                f"{keys.remembered()} this machine published last: it lost changes (restored "
                f"from an old copy, or a replay); publish the whole set again with "
                f"`{_import_command(keys)}`")
        image = broker.image()
        if image is None:
            raise FleetError("the broker does not hold the whole set its manifest names "
                             f"(serial {manifest.serial}); publish it again with "
                             f"`{_import_command(keys)}`")
        codes = {entry.id: entry for entry in codeset.entries(image)}
        for code_id, digest in adopted(broker, keys).items():
            codes.pop(code_id, None)
            if digest is None:
                continue
            body = broker.deltas.get(code_id)
            if body is None or codeset.body_digest(body) != digest:
                raise FleetError(f"the broker lacks the delta {code_id!r} its manifest "
                                 "lists; publish the whole set again with `gated codes "
                                 "import --fleet`")
            codes[code_id] = entry_of(code_id, body, key)
    return codes


def _import_command(keys: SetKeys) -> str:
    return ("gated codes import --fleet FILE" if keys.scope == "fleet"
            else "gated codes import --replace FILE")


def adopted(broker: Broker, keys: SetKeys) -> dict[str, str | None]:
    """The manifest's deltas. A fleet code on the broker that no signed manifest
    lists is nobody's word (anyone who can publish could have put it there): it
    is never taken into a set. (A put whose listing another staff command's
    manifest replaced at that moment is listed again by its own retry.)"""
    manifest = broker.manifest
    del keys
    return dict(manifest.deltas) if manifest is not None else {}


def hashed_body(fields: dict[str, Any], code: str, key: bytes) -> bytes:
    """A fleet code's message: its digits as the fleet key's hash."""
    body = {k: v for k, v in fields.items() if k != "code"}
    body["code_hash"] = sitekey.code_hash(key, code)
    return json.dumps(body, ensure_ascii=False).encode()


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _next_serial(broker: Broker, keys: SetKeys) -> int:
    known = [keys.remembered()]
    if broker.manifest is not None:
        known.append(broker.manifest.serial)
    return codeset.new_serial(*known)


def compile_set(entries: Iterable[Entry], broker: Broker,
                keys: SetKeys) -> tuple[list[bytes], Manifest]:
    """A whole set's chunks and the signed manifest that names them."""
    data = codeset.build(entries)
    chunks = codeset.split(data)
    manifest = Manifest(serial=_next_serial(broker, keys), version=codeset.version_of(data),
                        size=len(data), chunks=len(chunks),
                        codes=bookfile.read_header(data)[0].codes,
                        key=codeset.fingerprint(keys.hmac), time=_now(), prefix=keys.base)
    return chunks, manifest.signed(keys.signer)


async def send_set(client: aiomqtt.Client, keys: SetKeys, chunks: list[bytes],
                   manifest: Manifest, broker: Broker, clear: Iterable[str]) -> None:
    """Chunks, then the manifest, then clear what it replaces (the deltas ``clear``)."""
    base = keys.base
    for index, chunk in enumerate(chunks):
        await client.publish(f"{base}/set/{index}", chunk, qos=1, retain=True)
    await client.publish(f"{base}/set", manifest.encode(), qos=1, retain=True)
    keys.remember(manifest.serial)
    # After the manifest: a site that reads the broker meanwhile finds the
    # old deltas still there for the old manifest.
    stale = {index for index in broker.chunks if index >= len(chunks)}
    if broker.manifest is not None:
        stale |= set(range(len(chunks), broker.manifest.chunks))
    for index in sorted(stale):
        await client.publish(f"{base}/set/{index}", b"", qos=1, retain=True)
    for code_id in sorted(set(clear)):
        await client.publish(f"{base}/codes/{code_id}", b"", qos=1, retain=True)


async def publish_set(client: aiomqtt.Client, keys: SetKeys, entries: Iterable[Entry],
                      broker: Broker, clear: Iterable[str] | None = None) -> Manifest:
    """Publish a whole set (compiled here); by default every delta goes."""
    chunks, manifest = compile_set(entries, broker, keys)
    if clear is None:
        clear = set(broker.deltas) | set(
            broker.manifest.deltas if broker.manifest is not None else ())
    await send_set(client, keys, chunks, manifest, broker, clear)
    return manifest


async def change(client: aiomqtt.Client, keys: SetKeys, marker: str,
                 code_id: str, body: bytes | None) -> Manifest:
    """Put (``body``) or delete (None) one fleet code, as a delta or a new set."""
    async with keys.one_at_a_time():
        return await _change(client, keys, marker, code_id, body)


async def _change(client: aiomqtt.Client, keys: SetKeys, marker: str,
                  code_id: str, body: bytes | None) -> Manifest:
    base = keys.base
    for attempt in range(ATTEMPTS):
        broker = await read(client, keys, marker)
        manifest = broker.manifest
        deltas = adopted(broker, keys)
        if manifest is None or len(deltas | {code_id: None}) > codeset.MAX_DELTAS:
            codes = current(broker, keys)
            codes.pop(code_id, None)
            if body is not None:
                codes[code_id] = entry_of(code_id, body, keys.hmac)
            published = await publish_set(client, keys, codes.values(), broker)
        else:
            # The set itself must be whole before anything is laid over it.
            current(broker, keys)
            deltas[code_id] = None if body is None else codeset.body_digest(body)
            published = msgspec.structs.replace(
                manifest, serial=_next_serial(broker, keys), deltas=deltas,
                time=_now()).signed(keys.signer)
            if not await _still(client, keys, marker, manifest):
                continue  # replaced since it was read: start again from the new one
            # A put: the code, then the manifest that lists it. A delete: the
            # manifest first, so no site ever goes back to the set's own copy.
            delta = f"{base}/codes/{code_id}"
            if body is not None:
                await client.publish(delta, body, qos=1, retain=True)
            await client.publish(f"{base}/set", published.encode(), qos=1, retain=True)
            keys.remember(published.serial)
            if body is None:
                await client.publish(delta, b"", qos=1, retain=True)
        # A moment before looking: another command that read the manifest before
        # ours and publishes after would drop our listing, and a code no signed
        # manifest lists is applied nowhere. Its read-check-publish takes
        # milliseconds; past this pause, ours is either still there or seen gone.
        await asyncio.sleep(SETTLE + secrets.randbelow(200) / 1000)
        if await _still(client, keys, marker, published):
            return published
        # Someone published another manifest meanwhile: do it again on theirs.
        # Backing off further each time, at random: commands that collided once
        # spread out instead of colliding again.
        await asyncio.sleep(secrets.randbelow(250 * (attempt + 2)) / 1000)
    raise FleetError(f"the fleet's manifest kept changing under this command ({ATTEMPTS} "
                     "tries); run it again")


async def _still(client: aiomqtt.Client, keys: SetKeys, marker: str, ours: Manifest) -> bool:
    broker = await read(client, keys, marker, with_set=False)
    return broker.manifest is not None and broker.manifest.serial == ours.serial


async def replace_all(client: aiomqtt.Client, keys: SetKeys, marker: str,
                      entries: list[Entry]) -> tuple[Manifest, str | None]:
    """Make ``entries`` the whole set (``gated codes import --fleet``, ``--replace``); the
    manifest, and what was said of a manifest on the broker that it replaced unread."""
    async with keys.one_at_a_time():
        broker = await read(client, keys, marker)
        return await publish_set(client, keys, entries, broker), broker.refused


async def merge(client: aiomqtt.Client, keys: SetKeys, marker: str,
                entries: list[Entry]) -> Manifest:
    """Lay ``entries`` over the set on the broker (a site's ``gated codes import``): the
    set's other codes stay, and the codes of these ids published one message each
    are cleared so the set's version takes their place."""
    async with keys.one_at_a_time():
        broker = await read(client, keys, marker)
        codes = current(broker, keys) if broker.manifest is not None else {}
        if broker.refused is not None:
            raise FleetError(f"{broker.refused}; nothing is built on it: publish the whole "
                             f"set with `{_import_command(keys)}`, which replaces it")
        codes.update((entry.id, entry) for entry in entries)
        ids = {entry.id for entry in entries}
        return await publish_set(client, keys, codes.values(), broker,
                                 clear=[code_id for code_id in broker.deltas if code_id in ids])


def rows(broker: Broker, tz: Any,
         scope: Scope = "fleet") -> tuple[list[dict[str, Any]], bool, str]:
    """A set's codes for ``gated codes ls --broker``, whether the list is whole, and a
    line saying so."""
    manifest = broker.manifest
    what = "fleet set" if scope == "fleet" else "site set"
    again = ("gated codes import --fleet" if scope == "fleet"
             else "gated codes import --replace")
    if manifest is None:
        return [], False, (f"{what}: {broker.refused}; publish it again with `{again}`"
                           if broker.refused else "")
    image = broker.image()
    missing = broker.missing_deltas()
    listed: dict[str, dict[str, Any]] = {}
    if image is not None:
        for entry in codeset.entries(image):
            if entry.id not in manifest.deltas:
                listed[entry.id] = {"scope": scope, "id": entry.id, "name": entry.name,
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
        listed[code_id] = {"scope": scope, "id": code_id, "name": code_id, **fields}
    whole = image is not None and not missing
    expected = manifest.codes + sum(1 for d in manifest.deltas.values() if d is not None)
    if whole:
        line = (f"{what} serial {manifest.serial}: complete ({counted(len(listed), 'code')}, "
                f"{counted(manifest.chunks, 'chunk')}, "
                f"{counted(len(manifest.deltas), 'delta')})")
    else:
        parts = []
        if image is None:
            parts.append("the set's chunks are not all on the broker")
        if missing:
            parts.append(f"{len(missing)} listed deltas are missing")
        line = (f"{what} serial {manifest.serial}: INCOMPLETE, {'; '.join(parts)} "
                f"(listed {len(listed)} of about {expected}); publish it again with "
                f"`{again}`")
    del tz
    return [listed[k] for k in sorted(listed)], whole, line


def new_keys(path: Path) -> list[str]:
    """The fleet's keys beside ``path`` (the fleet key), made where missing; lines
    saying what was made. FleetError when there is nothing to make."""
    made = []
    if sitekey.read_key(path, "fleet key") is None:
        sitekey.ensure_key(path, "fleet key")
        made.append(f"made the fleet key {path}")
    try:
        _signer, new = signing.make_keys(path)
    except ConfigError as exc:
        raise FleetError(str(exc)) from None
    if new:
        made.append(f"made the fleet's signing key {signing.private_path(path)} (staff only) "
                    f"and its public key {signing.public_path(path)}")
    if not made:
        raise FleetError(f"{path} and its signing key exist already; a new fleet key would "
                         "make every fleet code unreadable at the sites that have the old "
                         "one (docs/fleet.md says how to roll the signing key)")
    return made


def describe_key(loaded: compiler.Loaded, config: Config, create: bool) -> tuple[str, bool]:
    """What this machine holds of the fleet's keys, and whether it holds them all."""
    path = fleet_key_path(loaded.source, config)
    lines = new_keys(path) if create else []
    key = sitekey.read_key(path, "fleet key")
    if key is None:
        return (f"no fleet key at {path}; make the fleet's keys with `gated codes fleet-key "
                "--new` on the staff machine, then copy fleet.key and fleet-signing.pub to "
                "every site (mode 0600)"), False
    lines.append(f"fleet key {path}: fingerprint {codeset.fingerprint(key)}")
    private, public = signing.private_path(path), signing.public_path(path)
    try:
        signer = signing.read_private(private)
        trusted = signing.read_public(public) if public.exists() else {}
    except ConfigError as exc:
        raise FleetError(str(exc)) from None
    if signer is not None:
        lines.append(f"signing key {private}: {signer.fingerprint} (staff only: it "
                     "publishes the fleet's codes)")
    lines.append(f"public signing keys {public}: " + (", ".join(trusted) if trusted else
                 "none (this site refuses every fleet set; copy the fleet's here)"))
    if create:
        lines.append(f"sites need {path.name} and {public.name} (mode 0600, owned by gated), "
                     f"never {private.name}")
    return "\n".join(lines), bool(trusted)
