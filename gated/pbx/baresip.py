"""The baresip adapter behind the call-engine port: a child process gated supervises.

gated writes baresip's ``config`` and ``accounts`` (and the sounds it plays)
into a folder of the state directory (0700, files 0600), starts ``baresip -f``
there, and drives it over its ``ctrl_tcp`` module on 127.0.0.1: netstrings
both ways, ``{"command": …, "params": …, "token": …}`` out, events and replies
in. Measured on Debian's baresip 1.0.0 (the one version this adapter knows):

- the ``menu`` module's commands act on the current call only, so the engine
  takes one call at a time (``call_max_calls 1``: another is answered busy);
- the jitter buffer drops repeated digits unless ``jitter_buffer_delay 0-0``;
- ``ausrc aufile,<wav>`` hangs the call up at the file's end, so every sound is
  padded with silence to ``max_call``, and the source is set back after a call;
- no event carries the address an INVITE came from: the verbose log's
  ``sipsess connect via UDP A --> B`` line, followed by the call's
  ``Incoming call from`` line, is read for it. A call whose source was not seen
  has none, and a trunk's allowlist refuses it;
- events go only to a control connection the engine has accepted, and it
  registers and takes calls the moment it starts: a call then (a registrar
  calls at once) would ring with nobody told. So the engine starts with no
  account, and gated adds them (``uanew``) on its connection: the engine
  accepts it before it reads the command, and until then answers a call 404;
- its reports are not always UTF-8 or plain text: ``reginfo`` repeats the
  registrar's Server header byte for byte, and colours the state.

A killed or hung engine is restarted (the call in progress is lost and told
as ended); the webhook never waits on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import ipaddress
import json
import math
import re
import shutil
import socket
import struct
import subprocess
import wave
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from gated.book import config as config_mod
from gated.book import files
from gated.book.config import Config
from gated.core.errors import EngineError
from gated.core.numbers import normalise
from gated.core.printable import printable
from gated.pbx.engine import Digit, Ended, Event, Incoming, Sound

log = structlog.get_logger("gated.sip")
# A call box's tones: the pause a `w` stands for, and the gap between two keys.
TONE_PAUSE = 0.5
TONE_GAP = 0.25
# How long tones wait for the call's media to be up (it is, within milliseconds of
# the answer, on any working line).
MEDIA_WAIT = 2.0

KNOWN_VERSIONS = ("1.0.0",)
RATE = 8000
_VERSION = re.compile(rb"baresip v(\d+\.\d+\.\d+)")
_CONNECT = re.compile(r"sipsess connect via \S+ (\S+) --> ")
_INCOMING = re.compile(r"Incoming call from: (?:.* )?(sips?:\S+) - ")
_COLOUR = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # the engine's terminal colours
MAX_FRAME = 65536  # no reply or event of baresip's comes near; a bigger one is a fault
SOURCE_WAIT = 1.0  # how long an INVITE's source may lag its event (a pipe, a socket)
STATUS = "status.json"  # beside the engine's files: what `gated doctor` reads
START_WAIT = 10.0  # from starting the child to its control port answering
BACKOFF = (0.1, 5.0)


def read_version(binary: str = "baresip") -> str:
    """The engine's version, or EngineError in one line when it is missing or unknown."""
    path = shutil.which(binary)
    if path is None:
        raise EngineError(f"{binary} is not installed: sudo apt install baresip-core")
    try:
        done = subprocess.run([path, "-h"], capture_output=True, timeout=10, check=False)  # noqa: S603 - a fixed argument list
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EngineError(f"{binary} -h failed: {exc}") from None
    found = _VERSION.search(done.stdout + done.stderr)
    version = found.group(1).decode() if found else "?"
    if version not in KNOWN_VERSIONS:
        raise EngineError(f"baresip {version} is not a version gated knows "
                          f"({', '.join(KNOWN_VERSIONS)}); install Debian's baresip-core")
    return version


def local_address() -> str:
    """The address the machine reaches others from (baresip refuses a loopback one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: only a route is chosen
        return str(probe.getsockname()[0])


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# -- the sounds ---------------------------------------------------------------------------

def _tone(hz: float, seconds: float, volume: float = 0.3) -> bytes:
    count = int(RATE * seconds)
    return b"".join(struct.pack("<h", int(32767 * volume * math.sin(2 * math.pi * hz * n / RATE)))
                    for n in range(count))


def _silence(seconds: float) -> bytes:
    return b"\0\0" * int(RATE * seconds)


def read_prompt(path: Path) -> bytes:
    """A site's prompt as raw samples; EngineError unless 16-bit PCM mono 8 kHz."""
    try:
        with wave.open(str(path), "rb") as w:
            if (w.getnchannels(), w.getsampwidth(), w.getframerate()) != (1, 2, RATE):
                raise EngineError(f"{path}: the prompt must be 16-bit PCM mono 8 kHz WAV")
            return w.readframes(w.getnframes())
    except (OSError, wave.Error, EOFError) as exc:
        raise EngineError(f"{path}: not a WAV gated can play: {exc}") from None


def sounds(prompt: bytes | None, seconds: float) -> dict[Sound, bytes]:
    """Each sound as a WAV, padded with silence to ``seconds``: baresip ends the call
    at a file's end, and a call never lasts longer than that."""
    said = prompt if prompt is not None else _tone(425, 0.5)
    low = _tone(300, 0.2) + _silence(0.1) + _tone(300, 0.2) + _silence(0.3)
    out: dict[Sound, bytes] = {}
    # "quiet": the call's media running while a call box's tones are sent (the
    # engine sends telephone-events only with the audio it is sending).
    for name, samples in (("prompt", said), ("wrong", low + said), ("quiet", b"")):
        samples += _silence(max(0.0, seconds + 5 - len(samples) / (2 * RATE)))
        buffer = io.BytesIO()
        with wave.open(buffer, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(RATE)
            w.writeframes(samples)
        out[name] = buffer.getvalue()  # type: ignore[index]
    return out


# -- the files ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Setup:
    """What the engine is started with."""

    folder: Path
    address: str              # net_interface: the machine's own address
    accounts: tuple[str, ...]  # baresip account lines, given over the control port
    listen: str | None = None  # trunk mode: sip_listen
    ctrl_port: int = 0         # 0: a free one at each start
    domain: str = ""           # register mode: the provider's host (transfers go there)


def account_line(aor: str, password: str | None) -> str:
    if password is not None and re.search(r"[;>\s\"]", password):
        raise EngineError("sip.password_file: baresip cannot take a password with ; > \" "
                          "or white space in it")
    line = f"<{aor}>;answermode=manual"
    if password is None:
        return line + ";regint=0"
    return line + f";auth_pass={password};regint=300"


def config_text(setup: Setup, ctrl_port: int) -> str:
    lines = [
        "poll_method epoll",
        f"net_interface {setup.address}",
        *([f"sip_listen {setup.listen}"] if setup.listen else []),
        "call_max_calls 1",
        "audio_player aubridge,play-null",
        "audio_source aubridge,src-null",
        "audio_alert aubridge,alert-null",
        "statmode_default off",
        "jitter_buffer_delay 0-0",
        "module_path /usr/lib/baresip/modules",
        "module g711.so",
        "module aubridge.so",
        "module aufile.so",
        "module_app account.so",
        "module_app menu.so",
        "module_app ctrl_tcp.so",
        f"ctrl_tcp_listen 127.0.0.1:{ctrl_port}",
    ]
    return "\n".join(lines) + "\n"


def write_files(setup: Setup, ctrl_port: int, played: dict[Sound, bytes]) -> None:
    files.make_dir(setup.folder)
    files.replace(setup.folder / "config", config_text(setup, ctrl_port).encode())
    # No account in it: they come over the control port once gated listens (and
    # without the file the engine writes a template of its own).
    files.replace(setup.folder / "accounts", b"")
    for name, data in played.items():
        path = setup.folder / f"{name}.wav"
        with contextlib.suppress(OSError):
            if path.stat().st_size == len(data) and path.read_bytes() == data:
                continue  # a restart rewrites megabytes of an SD card for nothing
        files.replace(path, data)


def plain(text: str) -> str:
    """An engine's report on one line in plain words: its colours and any control
    character (a registrar's Server header is repeated in it) left out."""
    return printable(" ".join(_COLOUR.sub("", text).split()))


def netstring(message: dict[str, str]) -> bytes:
    body = json.dumps(message).encode()
    return str(len(body)).encode() + b":" + body + b","


# -- the engine ---------------------------------------------------------------------------

class BaresipEngine:
    """A supervised baresip: the call-engine port over its control port."""

    plays_tones = True  # the menu's `sndcode`, as RFC 4733 telephone-events
    probe_every = 10.0  # seconds between two questions to the engine
    probe_wait = 5.0    # an engine that takes longer to answer one is hung

    def __init__(self, setup: Setup, played: Callable[[], dict[Sound, bytes]], *,
                 binary: str = "baresip") -> None:
        self.setup = setup
        # Made again at each start rather than held: padded to a call's length,
        # the sounds are megabytes a Pi would otherwise carry all day.
        self.played = played
        self.binary = binary
        self.state = "starting"
        self.restarts = 0
        self.pid: int | None = None
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._writer: asyncio.StreamWriter | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._calls: set[str] = set()
        self._established: dict[str, asyncio.Event] = {}
        self._sources: dict[str, str] = {}
        self._peers: dict[str, str] = {}  # call -> the host its INVITE came from
        self._seen = asyncio.Event()
        self._last_source: str | None = None
        self._token = 0
        # Commands whose answer repeats a secret (an account's password): never logged.
        self._secret_tokens: set[str] = set()
        self._probed = asyncio.Event()
        self._probe_token = ""
        self.probes = 0  # questions the engine has answered
        self.registration = ""  # what the engine last said of its registrations
        # What the registrar last said: None until it answers (or with no account to register).
        self.registered: bool | None = None
        self.refusal = ""  # its answer when it did not take the account
        self._reported: dict[str, object] = {}

    # -- supervision ------------------------------------------------------------------

    def _report(self) -> None:
        """The engine's state for `gated doctor`, written only when it changes."""
        status: dict[str, object] = {"state": self.state, "pid": self.pid,
                                     "restarts": self.restarts,
                                     "registration": self.registration,
                                     "registered": self.registered, "refusal": self.refusal}
        if status == self._reported:
            return
        self._reported = status
        try:
            files.replace(self.setup.folder / STATUS, json.dumps(status).encode())
        except (OSError, files.FileError) as exc:
            log.warning("sip engine status not written", error=str(exc))

    async def run(self) -> None:
        """Start the engine and keep it running: restarted whenever it dies or hangs."""
        backoff = BACKOFF[0]
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await self._run_once()
            except EngineError as exc:
                log.error("sip engine failed", error=str(exc))
            except OSError as exc:
                log.error("sip engine failed", error=f"{type(exc).__name__}: {exc}")
            finally:
                await self._lost()
            self.state = "restarting"
            self.restarts += 1
            self._report()
            if loop.time() - started > 30:
                backoff = BACKOFF[0]
            log.warning("sip engine restarting", restarts=self.restarts, after=backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF[1])

    async def _run_once(self) -> None:
        port = self.setup.ctrl_port or free_port()
        self.registered, self.refusal = None, ""  # a new engine registers afresh
        write_files(self.setup, port, self.played())
        argv = [self.binary, "-v", "-f", str(self.setup.folder)]
        stdbuf = shutil.which("stdbuf")
        if stdbuf is not None:
            argv = [stdbuf, "-oL", "-eL", *argv]  # its log lines as they happen
        process = self._process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        self.pid = process.pid
        output = asyncio.create_task(self._read_output(process))
        try:
            reader, writer = await self._connect(port, process)
            self._writer = writer
            # Only now: the engine takes calls for an account from the moment it has it,
            # and tells of them only on a connection it accepted before.
            for account in self.setup.accounts:
                await self._send("uanew", account, secret=True)
            self.state = "running"
            self._report()
            log.info("sip engine running", pid=process.pid, ctrl=f"127.0.0.1:{port}")
            try:
                async with asyncio.TaskGroup() as both:
                    both.create_task(self._read_events(reader))
                    both.create_task(self._probe())
            except* (EngineError, OSError) as failed:
                raise failed.exceptions[0] from None
        finally:
            closing, self._writer = self._writer, None
            if closing is not None:
                closing.close()  # not waited for: the child is killed next, whatever comes
            output.cancel()
            await self._stop_process()

    async def _connect(self, port: int, process: asyncio.subprocess.Process
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_WAIT
        while True:
            if process.returncode is not None:
                raise EngineError(f"baresip exited at start ({process.returncode})")
            try:
                return await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                if loop.time() > deadline:
                    raise EngineError("baresip's control port never answered") from None
                await asyncio.sleep(0.05)

    async def _stop_process(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        await process.wait()

    async def stop(self) -> None:
        await self._stop_process()

    async def _lost(self) -> None:
        # The engine took its calls with it: each is over.
        for call in sorted(self._calls):
            self._queue.put_nowait(Ended(call))
        self._calls.clear()
        self._sources.clear()
        self._peers.clear()
        self._secret_tokens.clear()

    async def _read_output(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while line := await process.stdout.readline():
            text = line.decode(errors="replace")
            if (found := _CONNECT.search(text)) is not None:
                self._last_source = found.group(1)
            elif (found := _INCOMING.search(text)) is not None and self._last_source:
                self._sources[found.group(1)] = self._last_source
                self._last_source = None
                self._seen.set()

    async def _read_events(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                size = int((await reader.readuntil(b":"))[:-1])
            except (asyncio.IncompleteReadError, ValueError, asyncio.LimitOverrunError):
                raise EngineError("baresip's control connection closed") from None
            if not 0 <= size <= MAX_FRAME:
                raise EngineError("baresip sent a frame gated does not take")
            try:
                body = await reader.readexactly(size + 1)
            except asyncio.IncompleteReadError:
                raise EngineError("baresip's control connection closed") from None
            try:
                # Not always UTF-8: a registrar's Server header comes through as it was sent.
                message = json.loads(body[:-1].decode(errors="replace"))
            except ValueError:
                continue
            if isinstance(message, dict):
                await self._message(message)

    async def _probe(self) -> None:
        """Ask the engine for its registrations now and then: one that does not answer
        is hung, and is killed and started again like one that died."""
        while True:
            await asyncio.sleep(self.probe_every)
            self._probed.clear()
            self._probe_token = await self._send("reginfo")
            try:
                async with asyncio.timeout(self.probe_wait):
                    await self._probed.wait()
            except TimeoutError:
                raise EngineError("baresip stopped answering its control port") from None

    async def _message(self, message: dict[str, object]) -> None:
        if message.get("response"):
            token = message.get("token")
            if token == self._probe_token:
                self.registration = plain(str(message.get("data", "")))[:300]
                self.probes += 1
                self._probed.set()
                self._report()
            if token in self._secret_tokens:
                self._secret_tokens.discard(str(token))
                if not message.get("ok"):
                    log.warning("sip engine refused a command", token=token)
            elif not message.get("ok"):
                log.warning("sip engine refused a command", token=token,
                            answer=plain(str(message.get("data", "")))[:200])
            return
        kind, call = message.get("type"), str(message.get("id", ""))
        if kind in ("REGISTER_OK", "REGISTER_FAIL"):
            self._registrar_said(kind == "REGISTER_OK", str(message.get("param", "")))
            return
        if not call:
            return
        if kind == "CALL_INCOMING":
            peer = str(message.get("peeruri", ""))
            self._calls.add(call)
            source = await self._source(peer)
            if source is not None:
                self._peers[call] = source.rsplit(":", 1)[0]
            self._queue.put_nowait(Incoming(call, peer, str(message.get("accountaor", "")),
                                            source))
        elif kind == "CALL_ESTABLISHED":
            self._established.setdefault(call, asyncio.Event()).set()
        elif kind == "CALL_DTMF_START":
            self._queue.put_nowait(Digit(call, str(message.get("param", ""))))
        elif kind == "CALL_CLOSED":
            self._calls.discard(call)
            self._established.pop(call, None)
            self._peers.pop(call, None)
            self._queue.put_nowait(Ended(call))
            # The source a prompt switched to stays for later calls.
            await self._send("ausrc", "aubridge,src-null")

    def _registrar_said(self, ok: bool, answer: str) -> None:
        """A registration taken is logged when it was not before; each refusal is (the
        engine tries again only after half a minute or more), and kept for doctor."""
        answer = plain(answer)[:100]
        if ok and self.registered is not True:
            log.info("sip registered", answer=answer)
        elif not ok:
            log.warning("sip registration failed", why=answer)
        self.registered, self.refusal = ok, "" if ok else answer
        self._report()

    async def _source(self, peer: str) -> str | None:
        """Where the call's INVITE came from, as the engine's log said; None if unseen."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SOURCE_WAIT
        while peer not in self._sources:
            left = deadline - loop.time()
            if left <= 0:
                return None
            self._seen.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._seen.wait()
        return self._sources.pop(peer)

    # -- the port -----------------------------------------------------------------------

    async def events(self) -> AsyncIterator[Event]:
        while True:
            yield await self._queue.get()

    async def _send(self, command: str, params: str = "", *, secret: bool = False) -> str:
        writer = self._writer
        if writer is None:
            raise EngineError("the SIP engine is not running")
        self._token += 1
        message = {"command": command, "token": f"g{self._token}"}
        if params:
            message["params"] = params
        if secret:
            self._secret_tokens.add(message["token"])
        writer.write(netstring(message))
        await writer.drain()
        return message["token"]

    async def _on(self, call: str, command: str, params: str = "") -> None:
        # The menu's commands act on the current call: the only one there is.
        if call in self._calls:
            await self._send(command, params)

    async def answer(self, call: str) -> None:
        await self._on(call, "accept")

    async def play(self, call: str, sound: Sound) -> None:
        await self._on(call, "ausrc", f"aufile,{self.setup.folder / f'{sound}.wav'}")

    async def send_tones(self, call: str, digits: str) -> None:
        """A call box's open: each key as a telephone-event, ``w`` a half-second pause
        (as in ``[gates.*.actuator] digits``), a short gap between keys so the box
        hears two presses of the same key as two."""
        # Telephone-events travel in the call's media: not before it is up, and
        # only while the engine is sending audio (silence will do).
        up = self._established.setdefault(call, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(MEDIA_WAIT):
                await up.wait()
        await self.play(call, "quiet")
        await asyncio.sleep(TONE_GAP)
        for key in digits:
            if key == "w":
                await asyncio.sleep(TONE_PAUSE)
                continue
            await self._on(call, "sndcode", key)
            await asyncio.sleep(TONE_GAP)

    async def transfer(self, call: str, number: str) -> None:
        await self._on(call, "transfer", self.transfer_uri(call, number))

    async def hang_up(self, call: str) -> None:
        await self._on(call, "hangup")

    def transfer_uri(self, call: str, number: str) -> str:
        """Register mode: through the provider; trunk mode: back to the trunk that called."""
        host = self.setup.domain or self._peers.get(call) or self.setup.address
        return f"sip:{number}@{host}"


def trunk_accounts(numbers: list[str], address: str) -> tuple[str, ...]:
    """One account per number a gate answers on: baresip 1.0.0 answers others 404."""
    return tuple(account_line(f"sip:{n}@{address}", None) for n in dict.fromkeys(numbers))


def host_of(listen: str) -> str:
    host = listen.rpartition(":")[0].strip("[]")
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).is_unspecified:
            return local_address()
    return host


def engine_for(config: Config, config_path: Path, state_dir: Path) -> BaresipEngine:
    """The engine a site's ``[sip]`` asks for; EngineError, in one line, when it cannot run."""
    sip = config.sip
    assert sip is not None
    read_version()
    prompt = None
    if sip.prompt is not None:
        prompt = read_prompt(config_mod.resolve(config_path, sip.prompt))
    folder = state_dir / "baresip"
    if sip.listen is not None:
        address = host_of(sip.listen)
        numbers = [normalise(n, config.site.region) or n
                   for gate in config.gates.values() for n in gate.numbers]
        setup = Setup(folder, address, trunk_accounts(numbers, address), listen=sip.listen)
    else:
        assert sip.account is not None
        assert sip.password_file is not None
        secret = config_mod.resolve(config_path, sip.password_file)
        try:
            password = secret.read_text().strip()
        except OSError as exc:
            raise EngineError(f"sip.password_file: cannot read {secret}: {exc}") from None
        domain = sip.account.split("@", 1)[1].split(";", 1)[0]
        setup = Setup(folder, local_address(), (account_line(sip.account, password),),
                      domain=domain)
    return BaresipEngine(setup, functools.partial(sounds, prompt, sip.max_call))


def read_status(state_dir: Path) -> dict[str, object] | None:
    """What the daemon last wrote of its engine, or None if it never ran here."""
    try:
        status = json.loads((state_dir / "baresip" / STATUS).read_text())
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None
