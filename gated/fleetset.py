"""The fleet's code set at one site: manifest and chunks in, the set applied whole.

See ``gated.codeset`` for what travels. This site keeps the set in force as a
file beside its store (``<store>.fleet-<version>``, mapped as the compiled
book is) and the manifest in its local copy, so a restart answers from the
whole set at once, broker or no broker. A new set replaces the old one only
when every chunk is in and the digest matches; deltas apply one by one as
before (``gated.bridge``). While the site cannot confirm that it holds what
the manifest names, it keeps what it has, raises ``codes_incomplete`` and
says so on ``<prefix>/fleet`` (retained); ``codes_complete`` when it can.
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

from gated import alarms, bookfile, codeset, files, sitekey
from gated.codes import ELSEWHERE, Credential, FleetCodes, StaticCodes, as_u64
from gated.codeset import Assembly, Manifest, SetError
from gated.config import Config, fleet_key_path
from gated.errors import ConfigError
from gated.heap import release_memory
from gated.managed import Rejected, compile_policy

if TYPE_CHECKING:
    from gated.bridge import Bridge
    from gated.mqtt import Incoming

log = structlog.get_logger("gated.fleetset")

# Scope and id of the manifest in the local copy of managed codes.
LOCAL = ("fleetset", "manifest")
# How long after connecting (or a new manifest) the set may take to arrive
# before the site says it cannot confirm it.
GRACE = 30.0
# Chunks that arrive before their manifest are kept for at most this many sets.
EARLY_SETS = 1


def set_path(store_path: Path, version: str) -> Path:
    return store_path.with_name(f"{store_path.name}.fleet-{version[:16]}")


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


def view(image: bookfile.Image, config: Config) -> tuple[StaticCodes, int]:
    """A set as this site applies it, and how many of its policies it cannot apply."""
    policies: list[Credential] = []
    refused = 0
    for policy in codeset.policies(image):
        try:
            policies.append(compile_policy(policy.fields(), config))
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


class FleetSet:
    def __init__(self, bridge: Bridge, *, key: bytes, keyed: bool) -> None:
        self.bridge = bridge
        self.key = key
        self.keyed = keyed  # whether this site holds the fleet key
        self.fingerprint = codeset.fingerprint(key) if keyed else ""
        self.manifest: Manifest | None = None  # in force here
        self.newest: Manifest | None = None    # the broker's latest (this connection)
        self.image: bookfile.Image | None = None
        self._assembly: Assembly | None = None
        self._early: dict[str, dict[int, bytes]] = {}
        self._installing: str | None = None
        self._alarmed = False
        self._check: asyncio.TimerHandle | None = None
        self.grace = GRACE
        self._retry: tuple[Manifest, bytes] | None = None  # a checked set not yet written
        self._said: tuple[bool, int | None] | None = None  # the state last published
        # Deltas cleared while a new set is on its way (an import clears them
        # after publishing the set that holds them): withdrawn once it is in.
        self.deferred: set[str] = set()

    @property
    def base(self) -> str:
        assert self.bridge.fleet is not None
        return self.bridge.fleet

    @property
    def store_path(self) -> Path:
        return self.bridge.gatekeeper.store.path

    def codes(self) -> FleetCodes:
        """An empty fleet for a new book: the set comes with ``load_local`` or the broker."""
        return FleetCodes(key=self.key)

    # -- wiring --------------------------------------------------------------------

    def attach(self) -> None:
        link = self.bridge.link
        link.subscribe(f"{self.base}/set/+", self._on_chunk)
        link.subscribe(f"{self.base}/set", self._on_manifest)

    def load_local(self, rows: list[tuple[str, str, bytes]]) -> None:
        """Map the set in force from the local copy, before the deltas are applied."""
        fleet = self.bridge.gatekeeper.book.fleet
        assert fleet is not None
        for scope, item_id, body in rows:
            if (scope, item_id) != LOCAL:
                continue
            try:
                manifest = codeset.decode_manifest(body)
                # The manifest names the set by the SHA-256 of all its bytes: that
                # one check covers what the book's own checksum would.
                image = bookfile.map_file(set_path(self.store_path, manifest.version),
                                          checksum=False)
                if codeset.version_of(image.buffer) != manifest.version:
                    raise SetError("the file is not the set the manifest names")
                fleet.static, _ = view(image, self.bridge.config)
            except (SetError, bookfile.BookError, OSError) as exc:
                log.warning("local copy of the fleet's code set unusable; waiting for the "
                            "broker's", error=str(exc))
                continue
            self.manifest, self.image = manifest, image
            fleet.listed = frozenset(manifest.deltas)
            log.info("fleet code set loaded from the local copy", codes=len(fleet.static),
                     serial=manifest.serial)
        # Sets (and their write locks) a crash left behind: this daemon holds
        # the state lock, so nothing else is writing them.
        keep = set_path(self.store_path, self.manifest.version) if self.manifest else None
        for stale in self.store_path.parent.glob(f"{self.store_path.name}.fleet-*"):
            if stale != keep:
                with contextlib.suppress(OSError):
                    stale.unlink()

    def connected(self) -> None:
        self.newest = None
        self._said = None
        self._assembly = None
        self._early.clear()

    def rebased(self, config: Config) -> FleetCodes:
        """The fleet for a reloaded book (policies compiled again); runs in a thread."""
        fleet = FleetCodes(key=self.key)
        if self.image is not None and self.manifest is not None:
            fleet.static, _ = view(self.image, config)
            fleet.listed = frozenset(self.manifest.deltas)
        return fleet

    # -- messages --------------------------------------------------------------------

    def _on_manifest(self, message: Incoming) -> None:
        if self.bridge.closed or not message.payload:
            return
        try:
            manifest = codeset.decode_manifest(message.payload)
        except SetError as exc:
            log.warning("fleet manifest refused", error=str(exc))
            return
        if self.newest is not None and manifest.serial < self.newest.serial and not message.retain:
            return  # an older one, late
        self.newest = manifest
        if not self.keyed or manifest.key != self.fingerprint:
            self.confirm_later()
            log.error("the fleet's code set is made with another fleet key than this "
                      "site's; keeping what this site has", set_key=manifest.key,
                      site_key=self.fingerprint or "none")
            return
        if self.manifest is not None and manifest.version == self.manifest.version:
            self._apply_deltas(manifest)
            return
        assembly = self._assembly = Assembly(manifest)
        for index, data in self._early.pop(assembly.prefix, {}).items():
            assembly.add(index, data)
        self._early.clear()
        self.confirm_later()
        if assembly.complete:
            self._install(assembly)

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
        # A new set's chunks come before its manifest: kept, for one set, within
        # what a set may weigh.
        early = self._early.setdefault(prefix, {})
        if len(data) <= codeset.MAX_CHUNK_BYTES and len(early) < codeset.MAX_CHUNKS:
            early[index] = data
        while len(self._early) > EARLY_SETS:
            del self._early[next(iter(self._early))]

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

    def _install_bytes(self, manifest: Manifest, data: bytes) -> None:
        self._installing = manifest.version
        self.bridge.link.spawn(self._installed(manifest, lambda: data), "fleet-set-install")

    async def _installed(self, manifest: Manifest, data: Any) -> None:
        config = self.bridge.config
        path = set_path(self.store_path, manifest.version)

        checked: list[bytes] = []

        def prepare() -> tuple[bookfile.Image, StaticCodes, int]:
            # All off the loop: checking, writing and mapping 3 MB, and the policies.
            checked.append(data())  # its SHA-256 checked against the manifest
            files.replace(path, checked[0])
            image = bookfile.map_file(path, checksum=False, inside=False)  # data() checked it
            return (image, *view(image, config))

        try:
            image, static, refused = await asyncio.to_thread(prepare)
        except (SetError, bookfile.BookError, files.FileError, OSError) as exc:
            log.warning("fleet code set not applied; keeping the one in force", error=str(exc))
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
            static, refused = await asyncio.to_thread(view, image, self.bridge.config)
        fleet = self.bridge.gatekeeper.book.fleet
        assert fleet is not None
        old = self.manifest
        # The old set, to let go of in a thread: unmapping it and unlinking its
        # file take milliseconds a call should not wait for.
        outgoing: list[object] = [fleet.static, self.image]
        # One step on the loop: no call sees the new set with the manifest's
        # replaced or deleted codes still in force.
        fleet.static, fleet.listed = static, frozenset(manifest.deltas)
        self.manifest, self.image = manifest, image
        log.info("fleet code set applied", codes=len(static), serial=manifest.serial,
                 chunks=manifest.chunks, refused_policies=refused)
        if refused:
            log.warning("some of the fleet's codes cannot apply at this site (a caller "
                        "number or schedule it cannot read)", policies=refused)
        self._apply_deltas(manifest)
        self._withdraw_deferred()
        stale = (set_path(self.store_path, old.version)
                 if old is not None and old.version != manifest.version else None)
        del static, image
        await asyncio.to_thread(_let_go, outgoing, stale)

    def _apply_deltas(self, manifest: Manifest) -> None:
        """The manifest's word on deltas: deleted ones go, the rest hide the set's copy."""
        bridge = self.bridge
        fleet = bridge.gatekeeper.book.fleet
        assert fleet is not None
        for code_id, digest in manifest.deltas.items():
            if digest is None:
                bridge.withdraw_fleet(code_id)
        if bridge.retained_in and self.newest is manifest:
            # After this connection's retained messages: a delta neither listed
            # nor on the broker was dropped from the set (a whole set published
            # again without it).
            for code_id in self.unlisted(bridge.seen("fleet")):
                bridge.withdraw_fleet(code_id)
        self.manifest = manifest
        fleet.listed = frozenset(manifest.deltas)
        bridge.gatekeeper.store.save_code(*LOCAL, manifest.encode())
        self.confirm()

    def _withdraw_deferred(self) -> None:
        listed = self.manifest.deltas if self.manifest is not None else {}
        for code_id in sorted(self.deferred):
            if listed.get(code_id) is None:
                self.bridge.withdraw_fleet(code_id)
        self.deferred.clear()

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
            code = applied.get("fleet", code_id)
            if code is None or codeset.body_digest(code.body) != digest:
                deltas.append(code_id)
        return chunks, deltas

    @property
    def complete(self) -> bool:
        return self._complete(*self.missing())

    def _complete(self, chunks: int, deltas: list[str]) -> bool:
        return (self.newest is not None and not chunks and not deltas and self.keyed
                and self.newest.key == self.fingerprint)

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
            log.warning("the broker holds no fleet manifest; keeping the fleet's codes "
                        "this site has")
            return []
        return sorted(self.unlisted(seen))

    def unlisted(self, seen: set[str]) -> list[str]:
        """This site's deltas neither listed in the broker's manifest nor on the broker."""
        newest = self.newest
        assert newest is not None
        listed = {code_id for code_id, digest in newest.deltas.items() if digest is not None}
        return [code_id for code_id in self.bridge.codes.ids("fleet")
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
            alarms.alarm(log, "codes_complete", "the fleet's code set is complete here again",
                         level="info", serial=self.newest.serial if self.newest else None)
        elif not complete and final and not self._alarmed and (
                self.newest is not None or self.manifest is not None):
            self._alarmed = True
            newest = self.newest
            alarms.alarm(log, "codes_incomplete", "cannot confirm the fleet's code set; "
                         "keeping the codes this site has",
                         serial=newest.serial if newest else None,
                         missing_chunks=chunks, missing_deltas=len(deltas),
                         key_matches=newest.key == self.fingerprint if newest else None,
                         manifest_on_broker=newest is not None)
        self._publish_state(complete, chunks, deltas)

    def _publish_state(self, complete: bool, chunks: int, deltas: list[str]) -> None:
        """``<prefix>/fleet`` (retained), when what it says changed: not per delta."""
        bridge = self.bridge
        said = (complete, self.manifest.serial if self.manifest else None)
        if not bridge.link.connected or said == self._said:
            return
        self._said = said
        fleet = bridge.gatekeeper.book.fleet
        state = {
            "site": bridge.site, "complete": complete,
            "serial": self.manifest.serial if self.manifest else None,
            "broker_serial": self.newest.serial if self.newest else None,
            "codes": len(fleet) if fleet is not None else 0,
            "missing_chunks": chunks, "missing_deltas": deltas[:20],
            "time": dt.datetime.fromtimestamp(bridge.gatekeeper.clock.now(), bridge.config.tz)
            .isoformat(timespec="seconds"),
        }
        bridge.send(f"{bridge.prefix}/fleet", json.dumps(state).encode())
