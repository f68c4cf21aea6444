"""The site on the broker: entries out as events; opens, codes and Home Assistant in.

Topics, under the site prefix (default ``gated/<site-id>``), documented in
docs/mqtt.md:

- ``events`` and ``gates/<gate>/event``: one JSON object per entry, not retained.
- ``gates/<gate>/open``: a live, non-empty message opens the gate through the
  gatekeeper, like a call (source ``mqtt``), if it shows it is not late: a
  time in its payload (``{"at": <unix time>}``) or a short MQTT 5 message
  expiry; otherwise it is refused ``stale``. A retained one, found there at
  connect, is ignored: a stale command never opens anything.
- ``codes/<id>``: managed codes (retained JSON; empty deletes); refusals go to
  ``codes/<id>/error`` (retained, cleared once a good version is applied).
  Under ``[mqtt] fleet_prefix`` the same, for codes valid at every site, with
  refusals on ``<fleet>/codes/<id>/error/<site-id>`` (and no word when one is
  applied); those codes are deltas on the fleet's set, ``<fleet>/set`` and its
  chunks (gated.setchannel), whose state this site says on ``fleet``, and are
  applied only as the set's signed manifest lists them. The site's own set
  (``gated codes import``) is ``set`` and its chunks under the site prefix,
  its state on ``codeset``.
- ``alarms``: one JSON message per alarm (``site_locked``, ``caller_locked``,
  their ``*_unlocked`` ends, ``store_failing``, ``store_recovered``,
  ``relay_stuck``, ``held_open``, ``forced_open``, ``code_clashes``,
  ``codes_incomplete``, ``codes_complete``), not retained.
- ``routes/<id>``: routes managed the same way (gated.routebridge).
- ``sync``: a marker gated sends itself after subscribing; when it comes
  back, every retained code and route has arrived, and those deleted while
  gated was away (an empty retained message leaves nothing to receive) are
  withdrawn.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import json
import math
import os
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from gated.book import signing
from gated.book.config import Config, DtmfActuatorConfig
from gated.book.files import FileError
from gated.book.messages import (
    VISITOR_PREFIX,
    Clash,
    ClashWatch,
    ManagedCode,
    ManagedCodes,
    NotHere,
    Rejected,
    Scope,
    parse,
    rebased,
)
from gated.core.decide import Changes
from gated.core.errors import BrokerError
from gated.mqtt import hass, setchannel
from gated.mqtt.link import Incoming, MqttLink
from gated.mqtt.routechannel import RouteChannel
from gated.mqtt.setchannel import SetChannel
from gated.mqtt.verdicts import Verdicts
from gated.site import alarms, events
from gated.site.gatekeeper import Gatekeeper, RawCall

if TYPE_CHECKING:
    from gated.book.codes import CodeBook
    from gated.site.store import Entry

log = structlog.get_logger("gated.bridge")

SYNC_TIMEOUT = 10.0
EVENT_TIMEOUT = 5.0
# Events waiting for the broker beyond this are dropped (the entry store has
# them all); a stalled broker must not grow the daemon without bound.
MAX_PENDING_EVENTS = 1000
# Remote opens being decided at once; more is a flood, not a reception button.
MAX_PENDING_OPENS = 16
# A remote open's payload is `{"at": <unix time>}`, a few dozen bytes; a longer
# one is not read at all (and cannot show when it was sent).
MAX_OPEN_PAYLOAD = 256


class Bridge:
    def __init__(self, link: MqttLink, gatekeeper: Gatekeeper, config: Config, *,
                 fleet_key: tuple[bytes, bool] | None = None,
                 fleet_trust: signing.Trust | None = None,
                 site_trust: signing.Trust | None = None) -> None:
        assert config.mqtt is not None
        self.link = link
        self.gatekeeper = gatekeeper
        self.config = config
        self.site = config.site.id
        self.prefix = config.mqtt_prefix
        self.fleet = config.mqtt.fleet_prefix
        self.codes = ManagedCodes()
        self._clashes = ClashWatch()
        self._pending_events = 0
        self._pending_opens = 0
        self.verdicts = Verdicts(self, "codes")
        self._seen: dict[Scope, set[str]] = {"site": set(), "fleet": set()}
        # While a reload rebases the managed codes in a thread: the ids that
        # messages changed meanwhile, to apply again to the new book.
        self._rebasing: set[str] | None = None
        self._sync_nonce = ""
        self._synced = asyncio.Event()
        self.synced_connections = 0  # connections whose retained codes are all in
        self._closed = False
        # Site codes this daemon published itself (the staff page's visitor codes):
        # by id, whoever waits for this site's word on them.
        self._awaited: dict[str, list[asyncio.Future[str | None]]] = {}
        self._unsubscribe_alarms: Callable[[], None] = lambda: None
        self.routes = RouteChannel(self)
        # Discovery configs cleared for gates taken out: topic -> when.
        self._removed_path = hass.removed_path(gatekeeper.store.path)
        self._removed: dict[str, float] = {}
        self._saving_removed = asyncio.Lock()
        self.fleetset: SetChannel | None = None
        if self.fleet is not None:
            key, keyed = fleet_key if fleet_key is not None else (os.urandom(32), False)
            self.fleetset = SetChannel(
                self, scope="fleet", base=self.fleet, key=key, keyed=keyed,
                trust=fleet_trust or signing.Trust(gatekeeper.store.path.with_name("none")))
            gatekeeper.book.fleet = self.fleetset.codes()
        book = gatekeeper.book
        self.siteset = SetChannel(
            self, scope="site", base=self.prefix, key=book.key, keyed=book.site_key,
            trust=site_trust or signing.Trust(gatekeeper.store.path.with_name("none")))
        book.siteset = self.siteset.codes(book.managed_ids)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def retained_in(self) -> bool:
        """This connection's retained messages have all arrived (the sync came back)."""
        return self._synced.is_set()

    def seen(self, scope: Scope) -> set[str]:
        """Ids of the codes this connection has had a message for."""
        return self._seen[scope]

    def channel(self, scope: Scope) -> SetChannel | None:
        return self.siteset if scope == "site" else self.fleetset

    # -- topics -------------------------------------------------------------------

    def code_topic(self, scope: Scope, code_id: str) -> str:
        base = self.prefix if scope == "site" else self.fleet
        return f"{base}/codes/{code_id}"

    # -- wiring ---------------------------------------------------------------------

    def attach(self) -> None:
        """Register subscriptions, the connect hook and the entry listener."""
        mqtt = self.config.mqtt
        assert mqtt is not None
        link = self.link
        link.subscribe(f"{self.prefix}/gates/+/open", self._on_open)
        # Error topics first: the broker sends retained messages in subscription
        # order, so a known refusal is on record before its code arrives.
        link.subscribe(f"{self.prefix}/codes/+/error",
                       functools.partial(self.verdicts.on_error, "site"))
        # The set before its deltas: a delta's id hides the set's copy.
        self.siteset.attach()
        link.subscribe(f"{self.prefix}/codes/+", functools.partial(self._on_code, "site"))
        if self.fleetset is not None:
            # The set before the deltas: a delta's id hides the set's copy.
            self.fleetset.attach()
            link.subscribe(f"{self.fleet}/codes/+/error/{self.site}",
                           functools.partial(self.verdicts.on_error, "fleet"))
            link.subscribe(f"{self.fleet}/codes/+", functools.partial(self._on_code, "fleet"))
        self.routes.attach()
        link.subscribe(f"{self.prefix}/sync", self._on_sync)
        if mqtt.discovery:
            self._removed = self._load_removed()
            link.subscribe(f"{mqtt.discovery_prefix}/status", self._on_hass_status, qos=0)
            # The retained configs of this site's node, to clear those of gates
            # no longer configured; gated's own announcements need not come back.
            link.subscribe(hass.config_filter(site=self.site,
                                              discovery_prefix=mqtt.discovery_prefix),
                           self._on_hass_config, no_local=True)
        link.on_connect(self._connected)
        if mqtt.events:
            self.gatekeeper.listeners.append(self._on_entry)
        loop = asyncio.get_running_loop()

        def from_any_thread(event: dict[str, Any]) -> None:
            # Alarms come from relay timer threads too: hop onto the loop.
            with contextlib.suppress(RuntimeError):  # the loop has closed: nothing to do
                loop.call_soon_threadsafe(self._on_alarm, event)

        self._unsubscribe_alarms = alarms.subscribe(from_any_thread)

    def load_local(self) -> None:
        """Apply the local copy of managed codes: the site works with the broker down."""
        store = self.gatekeeper.store
        rows = store.load_codes()
        self.siteset.load_local(rows)
        if self.fleetset is not None:
            self.fleetset.load_local(rows)
        manifests = {local[0] for local in setchannel.LOCAL.values()}
        for scope_name, code_id, body in rows:
            if scope_name in manifests:
                continue
            scope: Scope = "fleet" if scope_name == "fleet" else "site"
            try:
                if scope == "fleet" and self.fleet is None:
                    raise NotHere("no [mqtt] fleet_prefix any more")
                self.codes.put(self.gatekeeper.book, parse(scope, code_id, body, self.config))
            except (Rejected, NotHere) as exc:
                log.warning("local copy of a managed code dropped", id=code_id, scope=scope,
                            error=str(exc))
                store.save_code(scope, code_id, None)
        if self.codes.applied:
            log.info("managed codes loaded from the local copy", count=len(self.codes.applied))
        self.routes.load_local()

    async def rebase(self, book: CodeBook, config: Config) -> None:
        """Carry the managed codes over to a reloaded book, before it is swapped in.

        The codes are compiled again in a thread (``book`` is not in use yet);
        messages that arrive meanwhile go to the old book as usual and are
        applied to the new one after, on the loop, with nothing in between
        this and the swap.
        """
        self._rebasing = set()
        try:
            if self.fleetset is not None:
                book.fleet = await asyncio.to_thread(self.fleetset.rebased, config)
            book.siteset = await asyncio.to_thread(self.siteset.rebased, config,
                                                   book.managed_ids)
            fresh, dropped = await asyncio.to_thread(
                rebased, list(self.codes.applied.values()), book, config)
            for code_id in self._rebasing:
                fresh.discard(book, code_id)
                current = self.codes.applied.get(code_id)
                if current is None:
                    continue
                try:
                    fresh.put(book, parse(current.scope, current.id, current.body, config))
                except (Rejected, NotHere) as refused:
                    dropped.append((current, refused))
        finally:
            self._rebasing = None
        self.codes = fresh
        self.config = config
        for code, reason in dropped:
            log.warning("managed code dropped on reload", id=code.id, scope=code.scope,
                        error=_detail(reason))
            self._forget(code.scope, code.id)
            self.verdicts.refuse(code.scope, code.id, str(reason))
        self.routes.rebase(book.routes, config)

    async def close(self, within: float) -> None:
        """Stop taking entries; give remote opens and events ``within`` seconds to finish."""
        self._closed = True  # from here on, opens and codes from the broker are ignored
        self._unsubscribe_alarms()
        if self._on_entry in self.gatekeeper.listeners:
            self.gatekeeper.listeners.remove(self._on_entry)
        await self.link.drain(within)

    # -- connection ---------------------------------------------------------------------

    def _connected(self) -> None:
        # Runs before the first message of this connection is read.
        self._seen = {"site": set(), "fleet": set()}
        self.routes.connected()
        self.siteset.connected()
        if self.fleetset is not None:
            self.fleetset.connected()
        self._sync_nonce = secrets.token_hex(8)
        self._synced = asyncio.Event()
        self.link.spawn(self._sync(self._sync_nonce), "mqtt-code-sync")
        mqtt = self.config.mqtt
        if mqtt is not None and mqtt.discovery:
            self.link.spawn(self.announce(), "mqtt-discovery")

    async def _sync(self, nonce: str) -> None:
        try:
            await self.link.publish(f"{self.prefix}/sync", nonce, qos=1, within=SYNC_TIMEOUT)
            async with asyncio.timeout(SYNC_TIMEOUT):
                await self._synced.wait()
        except (BrokerError, TimeoutError) as exc:
            log.warning("could not confirm the broker's codes; keeping the local copy",
                        error=str(exc) or "no answer")
            return
        if nonce != self._sync_nonce:
            return  # a newer connection took over
        for scope in ("site", "fleet"):
            channel = self.channel(scope)
            if channel is not None and channel.has_set:
                # The manifest, not the list of retained messages, says what is
                # in force: a cut list withdraws nothing it lists.
                for code_id in channel.synced(self._seen[scope]):
                    log.info("managed code withdrawn while gated was away", id=code_id,
                             scope=scope)
                    self._withdraw(scope, code_id)
                continue
            gone = self.codes.ids(scope) - self._seen[scope]
            if gone and not self._seen[scope]:
                # The broker holds none of them: deleted by staff, or a broker
                # that lost its retained messages. Withdrawing is the safe way;
                # say loudly which it might be.
                log.warning("the broker holds none of this site's managed codes; withdrawing "
                            "them all (is the broker's persistence on?)", scope=scope,
                            count=len(gone))
            for code_id in sorted(gone):
                log.info("managed code withdrawn while gated was away", id=code_id, scope=scope)
                self._withdraw(scope, code_id)
        self.routes.synced()
        self.synced_connections += 1

    def _on_sync(self, message: Incoming) -> None:
        if message.payload.decode(errors="replace") == self._sync_nonce:
            self._synced.set()

    # -- remote open ------------------------------------------------------------------------

    def _on_open(self, message: Incoming) -> None:
        gate = message.topic.split("/")[-2]
        if self._closed:
            return
        if message.retain:
            log.warning("retained open command ignored; clear it with an empty retained "
                        "message", gate=gate, topic=message.topic)
            return
        if not message.payload:
            return  # someone clearing a retained message: not a command
        if self._pending_opens >= MAX_PENDING_OPENS:
            log.warning("remote open ignored: too many in progress", gate=gate)
            return
        self._pending_opens += 1
        call = RawCall(gate=gate, source="mqtt", sent=sent_at(message.payload),
                       expiry=message.expiry)
        self.link.spawn(self._open(call), f"mqtt-open-{gate}")

    async def _open(self, call: RawCall) -> None:
        gate = call.gate
        try:
            answer = await self.gatekeeper.call(call)
        finally:
            self._pending_opens -= 1
        log.info("remote open", gate=gate, status=answer.status.value, reason=answer.reason)

    # -- managed codes --------------------------------------------------------------------

    def _on_code(self, scope: Scope, message: Incoming) -> None:
        if self._closed:
            return
        code_id = message.topic.rsplit("/", 1)[1]
        self._seen[scope].add(code_id)
        if self._rebasing is not None:
            self._rebasing.add(code_id)
        channel = self.channel(scope)
        if not message.payload:
            if channel is not None and channel.pending:
                channel.deferred.add(code_id)
                return
            if scope == "fleet" and channel is not None:
                channel.waiting.pop(code_id, None)
            self._withdraw(scope, code_id)
            self._said(scope, code_id, None)
            return
        if scope == "fleet" and channel is not None and not channel.admits(
                code_id, message.payload):
            # Not (yet) in the signed manifest: applied when a manifest lists it
            # as it is, never on the word of whoever could publish it.
            log.info("fleet code waits for the set's manifest to list it", id=code_id)
            return
        self.apply(scope, code_id, message.payload, live=not message.retain)

    def apply(self, scope: Scope, code_id: str, payload: bytes, *, live: bool) -> None:
        """Apply one managed code's message (its set's manifest, if any, agrees)."""
        current = self.codes.get(scope, code_id)
        if current is not None and current.body == payload:
            # In force already: a live sender waits for a word, and a refusal
            # left over from an earlier version must not stay on the broker.
            self.verdicts.clear(scope, code_id, force=live and scope == "site")
            self._said(scope, code_id, None)
            return
        try:
            code = parse(scope, code_id, payload, self.config)
        except NotHere as exc:
            log.info("fleet code not for this site", id=code_id, reason=str(exc))
            self._withdraw(scope, code_id)
            return
        except Rejected as exc:
            log.warning("managed code refused", id=code_id, scope=scope, error=str(exc))
            self.verdicts.refuse(scope, code_id, str(exc))
            self._said(scope, code_id, str(exc))
            return
        try:
            previous = self.codes.put(self.gatekeeper.book, code)
        except Rejected as exc:
            # A clash is refused like any other, in words that do not say why:
            # nothing kept, the same verdict topic, and no hint whose digits.
            log.warning("managed code refused", id=code_id, scope=scope, error=exc.detail)
            self.verdicts.refuse(scope, code_id, str(exc))
            self._said(scope, code_id, str(exc))
            if isinstance(exc, Clash):
                self._clashed()
            return
        self.gatekeeper.store.save_code(scope, code_id, code.body)
        log.info("managed code applied", id=code_id, scope=scope, name=code.credential.name,
                 gates=sorted(code.credential.gates), replaced=previous is not None)
        # A live site code's sender waits for a word. Not so for the fleet's:
        # a word from every site on every change (and again on every bridge
        # reconnect, which delivers retained messages as live) is a storm.
        self.verdicts.clear(scope, code_id, force=live and scope == "site")
        self._said(scope, code_id, None)
        channel = self.channel(scope)
        if channel is not None and channel.has_set:
            channel.confirm()

    def _clashed(self) -> None:
        watch = self._clashes
        if watch.clashed(self.gatekeeper.clock.monotonic()):
            alarms.alarm(log, "code_clashes", "managed codes keep taking other credentials' "
                         "digits: someone may be probing for codes", clashes=watch.limit,
                         seconds=watch.window)

    def _withdraw(self, scope: Scope, code_id: str) -> None:
        removed: ManagedCode | None = self.codes.delete(self.gatekeeper.book, scope, code_id)
        if removed is not None:
            self._forget(scope, code_id)
            log.info("managed code removed", id=code_id, scope=scope)
        self.verdicts.clear(scope, code_id, force=False)

    def withdraw(self, scope: Scope, code_id: str) -> None:
        self._withdraw(scope, code_id)

    def _forget(self, scope: Scope, code_id: str) -> None:
        """Drop a withdrawn code's local copy and its use count (kept where the code
        goes on in its set: a delta folded into a new set is the same code)."""
        self.gatekeeper.store.save_code(scope, code_id, None)
        channel = self.channel(scope)
        if channel is not None and channel.holds(code_id):
            return
        # A code issued again under the same id starts with no uses spent.
        if self.gatekeeper.ledger.uses.pop(code_id, None) is not None:
            self.gatekeeper.store.submit(None, Changes(uses={code_id: 0}), None)

    def send(self, topic: str, payload: bytes) -> None:
        """Publish a retained verdict in the background, if connected."""
        if not self.link.connected:
            return
        self.link.spawn(self._publish_quietly(topic, payload, retain=True), "mqtt-code-verdict")

    async def _publish_quietly(self, topic: str, payload: bytes, *, retain: bool,
                               qos: int = 1) -> None:
        try:
            await self.link.publish(topic, payload, qos=qos, retain=retain, within=EVENT_TIMEOUT)
        except BrokerError as exc:
            log.info("mqtt publish failed", topic=topic, error=str(exc))

    # -- site codes of the daemon's own (the staff page's visitor codes) -----------------

    @property
    def connected(self) -> bool:
        """Connected to the broker, and not stopping."""
        return self.link.connected and not self._closed

    def visitor_codes(self) -> list[ManagedCode]:
        """The site's visitor codes from the broker (ids ``v-…``) now in force here."""
        return [code for code in self.codes.applied.values()
                if code.scope == "site" and code.id.startswith(VISITOR_PREFIX)]

    async def put_code(self, code_id: str, body: bytes, *, within: float) -> str | None:
        """Publish a site code retained, as ``gated codes put`` does (empty: delete it),
        and wait for this site to take it from the broker like anyone's.

        None once it is in force here (or, empty, withdrawn); else why it was
        refused. BrokerError when the broker did not take it; TimeoutError when it
        did, but the code has not come back within ``within`` seconds.
        """
        said: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        waiting = self._awaited.setdefault(code_id, [])
        waiting.append(said)  # before publishing: the broker may send it back at once
        try:
            await self.link.publish(self.code_topic("site", code_id), body, qos=1,
                                    retain=True, within=within)
            async with asyncio.timeout(within):
                return await said
        finally:
            if said in waiting:
                waiting.remove(said)
            if not waiting and self._awaited.get(code_id) is waiting:
                del self._awaited[code_id]

    def _said(self, scope: Scope, code_id: str, refusal: str | None) -> None:
        """This site's word on a code of its own, to whoever waits for it."""
        if scope != "site":
            return
        for said in self._awaited.pop(code_id, []):
            if not said.done():
                said.set_result(refusal)

    # -- events -----------------------------------------------------------------------------

    def _on_entry(self, entry: Entry) -> None:
        # Runs before the caller's answer goes out: only cheap checks here.
        if entry.status == "ALARM":
            return  # sensor alarms go out on <prefix>/alarms
        if not self.link.connected or self._pending_events >= MAX_PENDING_EVENTS:
            return
        self._pending_events += 1
        self.link.spawn(self._publish_event(entry), "mqtt-event")

    async def _publish_event(self, entry: Entry) -> None:
        gate = entry.gate
        payload = events.encode(entry, site=self.site, tz=self.config.tz)
        try:
            await self.link.publish(f"{self.prefix}/events", payload, qos=1,
                                    within=EVENT_TIMEOUT)
            if gate is not None:
                await self.link.publish(hass.gate_event_topic(self.prefix, gate), payload,
                                        qos=1, within=EVENT_TIMEOUT)
            mqtt = self.config.mqtt
            if mqtt is not None and mqtt.discovery:
                # The last-entry sensor's state: retained, so Home Assistant has
                # it again after its own restart.
                await self.link.publish(hass.last_entry_topic(self.prefix), payload, qos=1,
                                        retain=True, within=EVENT_TIMEOUT)
        except BrokerError as exc:
            log.info("event not published", error=str(exc))
        finally:
            self._pending_events -= 1

    def prune_visitors(self, before: float) -> int:
        """Delete from the broker the visitor codes (ids ``v-…``) that expired before
        ``before``; the deletion comes back and withdraws them here too."""
        if not self.link.connected:
            return 0
        expired = [code for code in self.codes.applied.values()
                   if code.scope == "site" and code.id.startswith(VISITOR_PREFIX)
                   and code.credential.valid_until is not None
                   and code.credential.valid_until < before]
        for code in expired:
            self.link.spawn(self._publish_quietly(self.code_topic("site", code.id), b"",
                                                  retain=True), "mqtt-prune")
        return len(expired)

    # -- alarms -----------------------------------------------------------------------------

    def _on_alarm(self, event: dict[str, Any]) -> None:
        """Publish an alarm on <prefix>/alarms (not retained: it is news, not state)."""
        if not self.link.connected:
            return
        moment = dt.datetime.fromtimestamp(event.pop("time"), self.config.tz)
        payload = json.dumps({"time": moment.isoformat(timespec="milliseconds"),
                              "site": self.site, **event}, default=str).encode()
        self.link.spawn(self._publish_quietly(f"{self.prefix}/alarms", payload, retain=False),
                        "mqtt-alarm")

    # -- Home Assistant --------------------------------------------------------------------

    def _on_hass_status(self, message: Incoming) -> None:
        # Home Assistant says "online" when it (re)starts: clear again what was
        # removed (it may have been away then) and announce again. A retained
        # "online" seen at connect needs nothing; connecting announced.
        if message.payload == b"online" and not message.retain:
            self.link.spawn(self._clear_removed(), "mqtt-discovery-clear")
            self.link.spawn(self.announce(), "mqtt-discovery")

    def _load_removed(self) -> dict[str, float]:
        try:
            return hass.load_removed(self._removed_path, self.gatekeeper.clock.now())
        except (OSError, FileError, msgspec.DecodeError) as exc:
            log.warning("removed home assistant entities not read; they are not cleared "
                        "again", path=str(self._removed_path), error=str(exc))
            return {}

    def _remember_removed(self) -> None:
        async def save() -> None:
            # One write at a time, each of the latest list: an older one never
            # lands last.
            async with self._saving_removed:
                try:
                    await asyncio.to_thread(hass.save_removed, self._removed_path,
                                            dict(self._removed))
                except (OSError, FileError) as exc:
                    log.warning("removed home assistant entities not kept",
                                path=str(self._removed_path), error=str(exc))

        self.link.spawn(save(), "mqtt-discovery-removed")

    async def _clear_removed(self) -> None:
        now = self.gatekeeper.clock.now()
        announced = {topic for topic, _ in self._hass_configs()}
        kept = {topic: at for topic, at in self._removed.items()
                if topic not in announced and now - at < hass.KEEP_REMOVED}
        if kept != self._removed:
            self._removed = kept
            self._remember_removed()
        for topic in list(kept):
            await self._publish_quietly(topic, b"", retain=True)
        if kept:
            log.info("home assistant discovery cleared again for entities no longer "
                     "configured", entities=len(kept))

    def _hass_configs(self) -> list[tuple[str, dict[str, Any]]]:
        mqtt = self.config.mqtt
        assert mqtt is not None
        # A call box's gate opens by a tone in a call: a button could only
        # ever answer needs_call.
        return hass.configs(site=self.site, prefix=self.prefix,
                            discovery_prefix=mqtt.discovery_prefix,
                            gates=list(self.config.gates),
                            no_button={name for name, gate in self.config.gates.items()
                                       if isinstance(gate.actuator, DtmfActuatorConfig)})

    def _on_hass_config(self, message: Incoming) -> None:
        # Only what the broker kept, found at connect: a live message is an
        # announcement (with MQTT 3.1.1, gated's own), and empty is a removal.
        if self._closed or not message.retain or not message.payload:
            return
        if message.topic in {topic for topic, _ in self._hass_configs()}:
            return
        if hass.owner(message.payload) != f"{self.prefix}/status":
            return  # another site whose id makes the same node id ("a-b", "a_b")
        log.info("home assistant discovery cleared for an entity no longer configured",
                 topic=message.topic)
        self._removed[message.topic] = self.gatekeeper.clock.now()
        self._removed = hass.latest(self._removed)
        self._remember_removed()
        self.link.spawn(self._publish_quietly(message.topic, b"", retain=True),
                        "mqtt-discovery-clear")

    async def announce(self) -> None:
        configs = self._hass_configs()
        try:
            for topic, payload in configs:
                await self.link.publish(topic, hass.encode(payload), qos=1, retain=True,
                                        within=EVENT_TIMEOUT)
        except BrokerError as exc:
            log.info("discovery not published", error=str(exc))
            return
        log.info("home assistant discovery published", entities=len(configs))


class _Open(msgspec.Struct):
    at: float | None = None


def sent_at(payload: bytes) -> float | None:
    """When a remote open says it was sent (``{"at": <unix time>}``), or None when it
    does not say, or not in a form that can be read."""
    if len(payload) > MAX_OPEN_PAYLOAD:
        return None
    try:
        at = msgspec.json.decode(payload, type=_Open).at
    except msgspec.DecodeError:  # not JSON, not an object, "at" not a number
        return None
    return at if at is not None and math.isfinite(at) else None


def _detail(exc: Rejected | NotHere) -> str:
    return exc.detail if isinstance(exc, Rejected) else str(exc)

