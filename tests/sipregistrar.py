"""sipp as a provider's registrar: it challenges gated's REGISTER (401, digest), takes the
authenticated one and, when asked, calls the contact gated registered, typing digits.

The scenario checks what a registrar would: the second REGISTER carries an Authorization
with the account's user and the registrar's realm, and its digest is the one the
password makes (sipp's ``verifyauth``). Anything else fails the run (a non-zero exit).
Each registration is logged as ``registered <user>@<host>:<port>`` (the contact) in
``registrar.log``, so a test can call that contact from elsewhere; ``messages.log``
holds the whole exchange for whoever reads a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

from . import sipp

REALM = "gated.test"
NONCE = "5e1c0ffee5e1c0ffee5e1c0ffee5e1c0"

_REPLY = """
  <send><![CDATA[
      SIP/2.0 {status}
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpReg[call_number]
      [last_Call-ID:]
      [last_CSeq:]{extra}
      Content-Length: 0

    ]]></send>"""

# The contact gated registered: user, host and port (baresip makes the user
# "<account user>-<its own id>", and takes calls at it).
_CONTACT = r"<sip:([^@>]+)@([^:;>]+):([0-9]+)"


def _register(round_: int, user: str, password: str, expires: int, server: str) -> str:
    """One registration, as a provider's registrar does it: the REGISTER is challenged
    (401, digest), the authenticated one is checked and granted ``expires`` seconds."""
    contact = (f'<ereg regexp={quoteattr(_CONTACT)} search_in="hdr" header="Contact:" '
               'check_it="true" assign_to="junk,cuser,chost,cport"/>')
    said = ('username="' + re.escape(user) + '"', 'realm="' + re.escape(REALM) + '"')
    checks = "".join(f'<ereg regexp={quoteattr(pattern)} search_in="hdr" header="Authorization:" '
                     'check_it="true" assign_to="junk"/>' for pattern in said)
    verify = (f'<verifyauth assign_to="authed" username={quoteattr(user)} '
              f'password={quoteattr(password)}/>')
    challenge = _REPLY.format(
        status="401 Unauthorized",
        extra=f'\n      WWW-Authenticate: Digest realm="{REALM}", nonce="{NONCE}", algorithm=MD5')
    granted = (f"\n      Contact: <sip:[$cuser]@[$chost]:[$cport]>;expires={expires}"
               f"\n      Expires: {expires}" + (f"\n      Server: {server}" if server else ""))
    return (f'\n  <recv request="REGISTER"><action>{contact}</action></recv>'
            + challenge
            + f'\n  <recv request="REGISTER"><action>{contact}{checks}{verify}</action></recv>'
            f'\n  <nop test="authed" next="registered{round_}"/>'
            + _REPLY.format(status="403 Forbidden", extra="")
            + '\n  <nop next="refused"/>'
            f'\n  <label id="registered{round_}"/>'
            + _REPLY.format(status="200 OK", extra=granted)
            + '\n  <nop><action><log message="registered [$cuser]@[$chost]:[$cport]"/>'
            "</action></nop>")


def scenario(user: str, password: str, *, grants: tuple[int, ...] = (3600,),
             server: str = "", caller: str | None = None, codes: list[str] | None = None
             ) -> str:
    """Register gated once for each of ``grants`` (the seconds each registration is granted:
    a short one is renewed); with ``caller``, then call the contact it registered as the
    provider would, typing ``codes``, and wait for the BYE. ``server``: the Server header
    of the registrar's 200 OK (written as ISO-8859-1, as a registrar may send it)."""
    body = "".join(_register(n, user, password, expires, server)
                   for n, expires in enumerate(grants))
    if caller is not None:
        # The call goes where the REGISTER's Contact said, as a provider's proxy sends it.
        body += ('\n  <nop><action><setdest host="[$chost]" port="[$cport]" protocol="udp"/>'
                 "</action></nop>")
        body += sipp.dialogue(caller, codes or [], target="sip:[$cuser]@[$chost]:[$cport]",
                              to=f"sip:{user}@[local_ip]:[local_port]")
    # A REGISTER that was not what it should be: the run fails (a reply never comes).
    body += ('\n  <nop next="done"/>'
             '\n  <label id="refused"/>'
             '\n  <recv request="NEVER" timeout="10"/>'
             '\n  <label id="done"/>')
    return ('<?xml version="1.0" encoding="ISO-8859-1" ?>\n<scenario name="registrar">'
            + body + "\n</scenario>\n")


@dataclass
class Registrar:
    """A sipp registrar running in the background."""

    address: str  # host:port gated registers with
    folder: Path
    process: asyncio.subprocess.Process

    def contacts(self) -> list[str]:
        """The contacts registered so far (user@host:port), in order."""
        log = self.folder / "registrar.log"
        text = log.read_text() if log.exists() else ""
        return re.findall(r"registered (\S+)", text)

    async def finished(self, within: float = 60) -> tuple[int, str]:
        """Its exit status and error log, once the scenario has run to its end."""
        status = await asyncio.wait_for(self.process.wait(), within)
        return status, sipp.read_errors(self.folder / "errors.log")


def _write(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "registrar.xml"
    path.write_text(text, encoding="latin-1")  # the scenario's own encoding, byte for byte
    return path


@contextlib.asynccontextmanager
async def registrar(folder: Path, host: str, user: str, password: str, *,
                    grants: tuple[int, ...] = (3600,), server: str = "",
                    caller: str | None = None, codes: list[str] | None = None
                    ) -> AsyncIterator[Registrar]:
    """sipp as the registrar at ``host`` on a free port; stopped when the block ends."""
    binary = shutil.which("sipp")
    assert binary is not None, "sipp is missing: ./dev test installs sip-tester"
    path = _write(folder, scenario(user, password, grants=grants, server=server,
                                   caller=caller, codes=codes))
    port = sipp.free_udp(host)
    process = await asyncio.create_subprocess_exec(
        binary, "-sf", str(path), "-i", host, "-p", str(port),
        "-mp", str(sipp.free_udp(host) & ~1), "-m", "1", "-nostdin",
        "-trace_err", "-error_file", str(folder / "errors.log"),
        "-trace_logs", "-log_file", str(folder / "registrar.log"),
        "-trace_msg", "-message_file", str(folder / "messages.log"),
        cwd=folder, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        yield Registrar(f"{host}:{port}", folder, process)
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
