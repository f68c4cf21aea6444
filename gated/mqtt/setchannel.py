"""A code set at one site: manifest and chunks in, the set applied whole.

Two channels of this kind: the fleet's set (under ``[mqtt] fleet_prefix``,
digests under the fleet key) and the site's own (under the site prefix,
digests under the site key, published by ``gated codes import``). See
``gated.book.codeset`` for what travels. This site keeps the set in force as a
file beside its store (``<store>.fleet-<version>``, ``<store>.site-<version>``,
mapped as the compiled book is) and the manifest in its local copy, so a
restart answers from the whole set at once, broker or no broker.

A manifest is taken only when it is signed by a key this site trusts
(``gated.book.signing``; else alarm ``codes_unsigned``) and its serial is above the
one in force (else alarm ``codes_rollback``): whoever can write to the broker
can neither forge a set nor bring back an older one. A new set replaces the
old one only when every chunk is in and the digest matches. A fleet delta is
applied only as the signed manifest lists it (its message's SHA-256); a
site's own codes may also come one message each, as the broker's ACL allows
(``gated.mqtt.bridge``). While the site cannot confirm that it holds what the
manifest names, it keeps what it has, raises ``codes_incomplete`` and says so
on ``<prefix>/fleet`` or ``<prefix>/codeset`` (retained); ``codes_complete``
when it can.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from gated.book import bookfile, codeset, files, signing, sitekey
from gated.book.codes import ELSEWHERE, FleetCodes, StaticCodes, as_u64
from gated.book.codeset import Assembly, Manifest, SetError
from gated.book.config import Config, fleet_key_path
from gated.book.messages import Rejected, Scope, compile_policy
from gated.core.credential import Credential
from gated.core.errors import ConfigError
from gated.site import alarms
from gated.site.heap import release_memory

if TYPE_CHECKING:
    from gated.mqtt.link import Incoming
    from gated.mqtt.port import Site

log = structlog.get_logger("gated.setchannel")

# Scope and id of each set's manifest in the local copy of managed codes.
LOCAL: dict[Scope, tuple[str, str]] = {"fleet": ("fleetset", "manifest"),
                                       "site": ("siteset", "manifest")}
# How long after connecting (or a new manifest) the set may take to arrive
# before the site says it cannot confirm it.
GRACE = 30.0
# Chunks that arrive before their (signed) manifest are not yet anyone's word:
# kept for one set, within a few chunks' worth of memory.
EARLY_BYTES = 8 * codeset.CHUNK_BYTES
# Fleet deltas that arrive before the manifest listing them, kept until it comes.
WAITING_DELTAS = 2 * codeset.MAX_DELTAS
# What each channel says its state on, under the site prefix.
STATE_TOPIC: dict[Scope, str] = {"fleet": "fleet", "site": "codeset"}


def set_path(store_path: Path, version: str, scope: Scope = "fleet") -> Path:
    return store_path.with_name(f"{store_path.name}.{scope}-{version[:16]}")


def load_key(source: Path, config: Config) -> tuple[bytes, bool]:
    """The fleet key, or a throw-away one (False) when this site has none."""
    path = fleet_key_path(source, config)
    try:
        key = sitekey.read_key(path, "fleet key")
    except ConfigError as exc:
        log.error("fleet codes cannot be checked", error=str(exc))
        key = None
    if key is None:
        return os.urandom(sitekey.KEY_BYTES), False
    return key, True


def fleet_trust(source: Path, config: Config) -> signing.Trust:
    """The public keys the fleet's sets must be signed with (fleet-signing.pub)."""
    return signing.Trust(signing.public_path(fleet_key_path(source, config)))


def view(image: bookfile.Image, config: Config, scope: Scope) -> tuple[StaticCodes, int]:
    """A set as this site applies it, and how many of its policies it cannot apply."""
    policies: list[Credential] = []
    refused = 0
    for policy in codeset.policies(image):
        try:
            policies.append(compile_policy(policy.fields(), config, scope))
        except Rejected:
            refused += 1
            policies.append(ELSEWHERE)
    return StaticCodes(as_u64(image.section("prefixes")), image.section("records"),
                       as_u64(image.section("ids")), image.section("names"), policies), refused


def _let_go(outgoing: list[object], stale: Path | None) -> None:
    """Drop the last references to an old set (its mapping goes with them), remove
    its file, and hand the heap the new one's chunks used back to the system."""
    outgoing.clear()
    if stale is not None:
        with contextlib.suppress(OSError):
            stale.unlink()
    release_memory()


class SetChannel:
    """One code set's messages at this site (the fleet's or the site's own)."""

    def __init__(self, bridge: Site, *, scope: Scope, base: str, key: bytes, keyed: bool,
                 trust: signing.Trust) -> None:
        self.bridge = bridge
        self.scope: Scope = scope
        self.base = base          # the topic prefix the set lives under
        self.key = key
        self.keyed = keyed  # whether this site holds the key the set's digests are made with
        self.trust = trust
        self.local = LOCAL[scope]
        self.fingerprint = codeset.fingerprint(key) if keyed else ""
        self.manifest: Manifest | None = None  # in force here
        self.newest: Manifest | None = None    # the broker's latest signed one (this connection)
        self.image: bookfile.Image | None = None
        self._assembly: Assembly | None = None
        self._early: dict[str, dict[int, bytes]] = {}
        self._early_bytes = 0
        self._early_dropped = False
        # Fleet deltas not (yet) listed by a signed manifest: id -> message.
        self.waiting: dict[str, bytes] = {}
        self._refused: str | None = None  # the last manifest refused, not to alarm twice
        self._installing: str | None = None
        self._alarmed = False
        self._check: asyncio.TimerHandle | None = None
        self.grace = GRACE
        # A checked set not yet written (a full disk), to try again.
        self._retry: tuple[Manifest, bytes | bytearray] | None = None
        self._said: tuple[bool, int | None] | None = None  # the state last published
        # Deltas cleared while a new set is on its way (an import clears them
        # after publishing the set that holds them): withdrawn once it is in.
        self.deferred: set[str] = set()

    @property
    def store_path(self) -> Path:
        return self.bridge.gatekeeper.store.path

    @property
    def what(self) -> str:
        return "the fleet's code set" if self.scope == "fleet" else "the site's code set"

    def _path(self, version: str) -> Path:
        return set_path(self.store_path, version, self.scope)

    def in_book(self) -> FleetCodes:
        found = (self.bridge.gatekeeper.book.fleet if self.scope == "fleet"
                 else self.bridge.gatekeeper.book.siteset)
        assert found is not None
        return found

    def codes(self, managed_ids: dict[str, bytes] | None = None) -> FleetCodes:
        """An empty set for a new book: the set comes with ``load_local`` or the broker.
        The site's set shares the book's managed ids: a site code of the same id
        published on its own takes the set's copy's place."""
        codes = FleetCodes(key=self.key)
        if managed_ids is not None:
            codes.managed_ids = managed_ids
        return codes

    # -- wiring --------------------------------------------------------------------

    def attach(self) -> None:
        link = self.bridge.link
        # The manifest first: the broker sends retained messages in subscription
        # order, so at connect the chunks come once the manifest vouched for them.
        link.subscribe(f"{self.base}/set", self._on_manifest)
        link.subscribe(f"{self.base}/set/+", self._on_chunk)

    def load_local(self, rows: list[tuple[str, str, bytes]]) -> None:
        """Map the set in force from the local copy, before the deltas are applied."""
        fleet = self.in_book()
        for scope, item_id, body in rows:
            if (scope, item_id) != self.local:
                continue
            try:
                manifest = codeset.decode_manifest(body)
                # The manifest names the set by the SHA-256 of all its bytes: that
                # one check covers what the book's own checksum would.
                image = bookfile.map_file(self._path(manifest.version), checksum=False)
                if codeset.version_of(image.buffer) != manifest.version:
                    raise SetError("the file is not the set the manifest names")
                fleet.static, _ = view(image, self.bridge.config, self.scope)
            except (SetError, bookfile.BookError, OSError) as exc:
                log.warning(f"local copy of {self.what} unusable; waiting for the broker's",
                            error=str(exc))
                continue
            self.manifest, self.image = manifest, image
            fleet.listed = frozenset(manifest.deltas)
            log.info(f"{self.what} loaded from the local copy", codes=len(fleet.static),
                     serial=manifest.serial)
        # Sets (and their write locks) a crash left behind: this daemon holds
        # the state lock, so nothing else is writing them.
        keep = self._path(self.manifest.version) if self.manifest else None
        for stale in self.store_path.parent.glob(f"{self.store_path.name}.{self.scope}-*"):
            if stale != keep:
                with contextlib.suppress(OSError):
                    stale.unlink()

    def connected(self) -> None:
        self.newest = None
        self._said = None
        self._assembly = None
        self._early.clear()
        self._early_bytes = 0
        self._early_dropped = False
        self.waiting.clear()
        self._refused = None

    def rebased(self, config: Config, managed_ids: dict[str, bytes] | None = None) -> FleetCodes:
        """The set for a reloaded book (policies compiled again); runs in a thread."""
        fleet = self.codes(managed_ids)
        if self.image is not None and self.manifest is not None:
            fleet.static, _ = view(self.image, config, self.scope)
            fleet.listed = frozenset(self.manifest.deltas)
        return fleet

    # -- messages --------------------------------------------------------------------

    def _on_manifest(self, message: Incoming) -> None:
        if self.bridge.closed or not message.payload:
            return
        try:
            manifest = codeset.decode_manifest(message.payload)
        except SetError as exc:
            log.warning(f"a manifest of {self.what} refused", error=str(exc))
            return
        problem = manifest.check(self.trust, self.base)
        if problem is not None:
            self._refuse("codes_unsigned", f"a manifest of {self.what} that is not staff's "
                         "(no valid signature) refused; keeping the set in force",
                         manifest, problem)
            return
        floor = max((m for m in (self.manifest, self.newest) if m is not None),
                    key=lambda m: m.serial, default=None)
        if floor is not None and (manifest.serial < floor.serial or (
                manifest.serial == floor.serial and manifest != floor)):
            self._refuse("codes_rollback", f"an older manifest of {self.what} refused (a "
                         "replay, or a broker restored from an old copy); keeping the set in "
                         "force", manifest, f"serial {manifest.serial} is not above "
                         f"{floor.serial}", in_force=floor.serial)
            return
        self.newest = manifest
        if not self.keyed or manifest.key != self.fingerprint:
            self.confirm_later()
            log.error(f"{self.what} is made with another key than this site's; keeping "
                      "what this site has", set_key=manifest.key,
                      site_key=self.fingerprint or "none")
            return
        if self.manifest is not None and manifest.version == self.manifest.version:
            self._apply_deltas(manifest)
            return
        assembly = self._assembly = Assembly(manifest)
        for index, data in self._early.pop(assembly.prefix, {}).items():
            assembly.add(index, data)
        dropped = self._early_dropped
        self._early.clear()
        self._early_bytes = 0
        self._early_dropped = False
        self.confirm_later()
        if assembly.complete:
            self._install(assembly)
        elif dropped:
            # Chunks let go of while nobody had vouched for them: the broker
            # keeps them retained and sends them again on a new subscribe.
            self.bridge.link.spawn(self.bridge.link.resubscribe(f"{self.base}/set/+"),
                                   "set-chunks-again")

    def _on_chunk(self, message: Incoming) -> None:
        if self.bridge.closed or not message.payload:
            return
        try:
            prefix, index, data = codeset.read_chunk(message.payload)
        except SetError:
            return
        assembly = self._assembly
        if assembly is not None and assembly.prefix == prefix:
            if assembly.add(index, data):
                self._install(assembly)
            return
        if self.manifest is not None and self.manifest.version.startswith(prefix):
            return  # the set in force already
        # A new set's chunks come before its manifest. Nobody has vouched for
        # them yet: kept for one set, within a few chunks' worth; the rest
        # come again with the manifest (they are retained).
        if prefix not in self._early:
            self._early.clear()
            self._early_bytes = 0
            self._early_dropped = False
        early = self._early.setdefault(prefix, {})
        if self._early_bytes + len(data) <= EARLY_BYTES and index not in early:
            early[index] = data
            self._early_bytes += len(data)
        elif index not in early:
            self._early_dropped = True

    # -- applying --------------------------------------------------------------------

    @property
    def pending(self) -> bool:
        """A new set is arriving or being applied."""
        return self._assembly is not None or self._installing is not None

    def _install(self, assembly: Assembly) -> None:
        if self._installing == assembly.manifest.version:
            return
        self._assembly = None  # pending stays true through _installing
        self._installing = assembly.manifest.version
        self.bridge.link.spawn(self._installed(assembly.manifest, assembly.data),
                               "fleet-set-install")

    def _install_bytes(self, manifest: Manifest, data: bytes | bytearray) -> None:
        self._installing = manifest.version
        self.bridge.link.spawn(self._installed(manifest, lambda: data), "fleet-set-install")

    async def _installed(self, manifest: Manifest, data: Any) -> None:
        config = self.bridge.config
        path = self._path(manifest.version)

        checked: list[bytes | bytearray] = []

        def prepare() -> tuple[bookfile.Image, StaticCodes, int]:
            # All off the loop: checking, writing and mapping 3 MB, and the policies.
            checked.append(data())  # its SHA-256 checked against the manifest
            files.replace(path, checked[0])
            image = bookfile.map_file(path, checksum=False, inside=False)  # data() checked it
            return (image, *view(image, config, self.scope))

        try:
            image, static, refused = await asyncio.to_thread(prepare)
        except (SetError, bookfile.BookError, files.FileError, OSError) as exc:
            log.warning(f"{self.what} not applied; keeping the one in force", error=str(exc))
            self._installing = None
            # Whole and checked, but not written (a full disk): tried again when
            # the grace runs out, and after it, until it is or a newer set comes.
            self._retry = (manifest, checked[0]) if checked else None
            self._withdraw_deferred()
            self.confirm_later()
            return
        finally:
            if self._installing == manifest.version:
                self._installing = None
        if self.bridge.config is not config:  # a reload changed the site meanwhile
            static, refused = await asyncio.to_thread(view, image, self.bridge.config, self.scope)
        fleet = self.in_book()
        old = self.manifest
        # The old set, to let go of in a thread: unmapping it and unlinking its
        # file take milliseconds a call should not wait for.
        outgoing: list[object] = [fleet.static, self.image]
        # One step on the loop: no call sees the new set with the manifest's
        # replaced or deleted codes still in force.
        fleet.static, fleet.listed = static, frozenset(manifest.deltas)
        self.manifest, self.image = manifest, image
        log.info(f"{self.what} applied", codes=len(static), serial=manifest.serial,
                 chunks=manifest.chunks, refused_policies=refused)
        if refused:
            log.warning(f"some codes of {self.what} cannot apply at this site (a gate, "
                        "caller number or schedule it cannot read)", policies=refused)
        self._apply_deltas(manifest)
        self._withdraw_deferred()
        stale = (self._path(old.version)
                 if old is not None and old.version != manifest.version else None)
        del static, image
        await asyncio.to_thread(_let_go, outgoing, stale)

    def _apply_deltas(self, manifest: Manifest) -> None:
        """The manifest's word on deltas: deleted ones go, listed ones that were waiting
        for it apply, and the rest hide the set's copy."""
        bridge = self.bridge
        fleet = self.in_book()
        for code_id, digest in manifest.deltas.items():
            if digest is None:
                bridge.withdraw(self.scope, code_id)
        if bridge.retained_in and self.newest is manifest:
            # After this connection's retained messages: a delta neither listed
            # nor on the broker was dropped from the set (a whole set published
            # again without it).
            for code_id in self.unlisted(bridge.seen(self.scope)):
                bridge.withdraw(self.scope, code_id)
        self.manifest = manifest
        fleet.listed = frozenset(manifest.deltas)
        bridge.gatekeeper.store.save_code(*self.local, manifest.encode())
        for code_id, body in list(self.waiting.items()):
            if self.admits(code_id, body):
                del self.waiting[code_id]
                bridge.apply(self.scope, code_id, body, live=False)
        self.confirm()

    def admits(self, code_id: str, body: bytes) -> bool:
        """Whether a signed manifest (the broker's latest, else the one in force) lists
        this delta as it is; else it waits (fleet deltas are nobody's word alone)."""
        manifest = self.newest or self.manifest
        digest = manifest.deltas.get(code_id) if manifest is not None else None
        if digest is not None and digest == codeset.body_digest(body):
            return True
        if len(self.waiting) < WAITING_DELTAS or code_id in self.waiting:
            self.waiting[code_id] = body
        return False

    def _withdraw_deferred(self) -> None:
        listed = self.manifest.deltas if self.manifest is not None else {}
        for code_id in sorted(self.deferred):
            if listed.get(code_id) is None:
                self.bridge.withdraw(self.scope, code_id)
        self.deferred.clear()

    def _refuse(self, alarm: str, message: str, manifest: Manifest, problem: str,
                **fields: Any) -> None:
        """A manifest not taken: said once per manifest (a retained one comes back at
        every connect, and is said again then)."""
        said = f"{alarm}:{manifest.serial}:{manifest.signature[:32]}"
        if said == self._refused:
            return
        self._refused = said
        alarms.alarm(log, alarm, message, scope=self.scope, serial=manifest.serial,
                     problem=problem, **fields)

    # -- confirming --------------------------------------------------------------------

    def missing(self) -> tuple[int, list[str]]:
        """What this site lacks of the broker's latest: chunks, and deltas by id."""
        newest = self.newest
        if newest is None:
            return 0, []
        chunks = 0
        if self.manifest is None or self.manifest.version != newest.version:
            assembly = self._assembly
            chunks = assembly.missing if assembly is not None else newest.chunks
        applied = self.bridge.codes
        deltas = []
        for code_id, digest in newest.deltas.items():
            if digest is None:
                continue
            code = applied.get(self.scope, code_id)
            if code is None or codeset.body_digest(code.body) != digest:
                deltas.append(code_id)
        return chunks, deltas

    @property
    def complete(self) -> bool:
        return self._complete(*self.missing())

    def _complete(self, chunks: int, deltas: list[str]) -> bool:
        return (self.newest is not None and not chunks and not deltas and self.keyed
                and self.newest.key == self.fingerprint)

    def holds(self, code_id: str) -> bool:
        """Whether the set in force has a code of this id that it does not replace."""
        manifest = self.manifest
        return (manifest is not None and code_id not in manifest.deltas
                and self.in_book().static.has_id(code_id))

    @property
    def has_set(self) -> bool:
        """A manifest is in force here or on the broker: withdrawals go by it."""
        return self.manifest is not None or self.newest is not None

    def synced(self, seen: set[str]) -> list[str]:
        """After the connection's retained messages are in: the deltas to withdraw."""
        self.confirm_later()
        if self.newest is None:
            # A broker without the manifest this site had (an edge replaced with
            # an empty store, a bridge not up yet) cannot say what was deleted.
            log.warning(f"the broker holds no manifest of {self.what}; keeping the codes "
                        "this site has", scope=self.scope)
            return []
        return sorted(self.unlisted(seen))

    def unlisted(self, seen: set[str]) -> list[str]:
        """This site's deltas neither listed in the broker's manifest nor on the broker."""
        newest = self.newest
        assert newest is not None
        listed = {code_id for code_id, digest in newest.deltas.items() if digest is not None}
        return [code_id for code_id in self.bridge.codes.ids(self.scope)
                if code_id not in listed and code_id not in seen]

    def confirm_later(self) -> None:
        if self._check is not None:
            self._check.cancel()
        self._check = asyncio.get_running_loop().call_later(self.grace, self.confirm, True)

    def confirm(self, final: bool = False) -> None:
        """Say whether this site holds the broker's set; ``final``: the grace is over."""
        if self.bridge.closed:
            return
        retry = self._retry
        if final and retry is not None:
            self._retry = None
            if not self.pending and self.newest == retry[0]:
                self._install_bytes(*retry)
        chunks, deltas = self.missing()
        complete = self._complete(chunks, deltas)
        if complete and self._check is not None:
            self._check.cancel()
            self._check = None
        if complete and self._alarmed:
            self._alarmed = False
            alarms.alarm(log, "codes_complete", f"{self.what} is complete here again",
                         level="info", scope=self.scope,
                         serial=self.newest.serial if self.newest else None)
        elif not complete and final and not self._alarmed and (
                self.newest is not None or self.manifest is not None):
            self._alarmed = True
            newest = self.newest
            alarms.alarm(log, "codes_incomplete", f"cannot confirm {self.what}; keeping "
                         "the codes this site has", scope=self.scope,
                         serial=newest.serial if newest else None,
                         missing_chunks=chunks, missing_deltas=len(deltas),
                         key_matches=newest.key == self.fingerprint if newest else None,
                         manifest_on_broker=newest is not None)
        self._publish_state(complete, chunks, deltas)

    def _publish_state(self, complete: bool, chunks: int, deltas: list[str]) -> None:
        """``<prefix>/fleet`` or ``<prefix>/codeset`` (retained), when what it says changed:
        not per delta."""
        bridge = self.bridge
        said = (complete, self.manifest.serial if self.manifest else None)
        if not bridge.link.connected or said == self._said:
            return
        self._said = said
        fleet = self.in_book()
        state = {
            "site": bridge.site, "complete": complete,
            "serial": self.manifest.serial if self.manifest else None,
            "broker_serial": self.newest.serial if self.newest else None,
            "codes": len(fleet),
            "missing_chunks": chunks, "missing_deltas": deltas[:20],
            "time": dt.datetime.fromtimestamp(bridge.gatekeeper.clock.now(), bridge.config.tz)
            .isoformat(timespec="seconds"),
        }
        bridge.send(f"{bridge.prefix}/{STATE_TOPIC[self.scope]}", json.dumps(state).encode())
