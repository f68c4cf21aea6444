"""A relay on the broker: publish a payload to a command topic, optionally await its echo.

Tasmota, Shelly and ESPHome relays all work this way; docs/mqtt.md has a
config for each. The relay's own pulse setting (Tasmota ``PulseTime``, Shelly
``toggle_after``, an ESPHome ``on_turn_on`` delay) ends the pulse: the device
enforces it, not gated, so a lost "off" can never hold a barrier open.

Never late, from this side (the link's docstring has the rest): with no live
broker connection the open fails at once (``actuator_unreachable``) and is
not kept for later. A command is QoS 1, never retained, and expires on the
broker after ``confirm`` seconds (MQTT 5). When it is not acknowledged in
time the link resets its connection, so it cannot trail in afterwards.

With ``state_topic`` the answer waits for the device's report that it
switched (``state_payload``, or with ``state_key`` that value inside a JSON
report). Only a live report counts: a retained one is old news. No report
within ``confirm`` seconds is ``actuator_timeout``, and the PBX hears ERR.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import msgspec
import structlog

from gated.book.config import MqttActuatorConfig
from gated.core.errors import (
    ActuatorTimeout,
    ActuatorUnreachable,
    BrokerTimeout,
    BrokerUnavailable,
)
from gated.mqtt.link import Incoming, MqttLink

log = structlog.get_logger("gated.actuator.mqtt")


class MqttActuator:
    def __init__(self, gate: str, config: MqttActuatorConfig, link: MqttLink) -> None:
        self.gate = gate
        self.tones = ""
        self.config = config
        self.link = link
        self._waiters: set[asyncio.Future[None]] = set()
        # Whole seconds on the broker; at least one, and no shorter than the
        # time the answer waits for the device.
        self.expiry = max(1, math.ceil(config.confirm))
        if config.state_topic is not None:
            link.subscribe(config.state_topic, self._on_state, no_local=True)

    def confirms(self, payload: bytes) -> bool:
        """Whether a state report says the relay switched on."""
        wanted = self.config.state_payload
        if self.config.state_key is None:
            return payload.decode(errors="replace").strip() == wanted
        try:
            report: Any = msgspec.json.decode(payload)
        except msgspec.DecodeError:
            return False
        for part in self.config.state_key.split("."):
            if not isinstance(report, dict) or part not in report:
                return False
            report = report[part]
        text = report if isinstance(report, str) else msgspec.json.encode(report).decode()
        return text == wanted

    def _on_state(self, message: Incoming) -> None:
        if message.retain or not self.confirms(message.payload):
            return
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def open(self) -> str:
        if not self.link.connected:
            raise ActuatorUnreachable(f"gate {self.gate!r}: no connection to the MQTT broker")
        loop = asyncio.get_running_loop()
        started = loop.time()
        echo: asyncio.Future[None] | None = None
        if self.config.state_topic is not None:
            # Listening before publishing: a fast device may answer at once.
            echo = loop.create_future()
            self._waiters.add(echo)
        try:
            try:
                await self.link.publish(self.config.command_topic, self.config.payload, qos=1,
                                        retain=False, within=self.config.confirm,
                                        expiry=self.expiry, command=True)
            except BrokerUnavailable as exc:
                raise ActuatorUnreachable(f"gate {self.gate!r}: {exc}") from None
            except BrokerTimeout as exc:
                raise ActuatorTimeout(f"gate {self.gate!r}: {exc}") from None
            if echo is None:
                log.info("mqtt command published", gate=self.gate,
                         topic=self.config.command_topic)
                return "published"
            remaining = self.config.confirm - (loop.time() - started)
            try:
                async with asyncio.timeout(max(remaining, 0.0)):
                    await echo
            except TimeoutError:
                raise ActuatorTimeout(
                    f"gate {self.gate!r}: no {self.config.state_topic} report within "
                    f"{self.config.confirm:g}s") from None
            log.info("mqtt command confirmed", gate=self.gate,
                     ms=round((loop.time() - started) * 1000, 1))
            return "confirmed"
        finally:
            if echo is not None:
                self._waiters.discard(echo)
                echo.cancel()

    async def close(self) -> None:
        """Nothing to release: the device ends its own pulse, the link is the daemon's."""
