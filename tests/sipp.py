"""sipp as the caller: a scenario that calls, types digits as RFC 4733 events and waits
for gated's BYE (sipp exits 0 only when it got one and answered it)."""

from __future__ import annotations

import asyncio
import shutil
import socket
from pathlib import Path

PCAPS = Path("/usr/share/sip-tester")
_NAMES = {"#": "pound", "*": "star"}
# Where a caller's INVITE goes: the number asked for (-s) at the address sipp calls.
SERVICE = "sip:[service]@[remote_ip]:[remote_port]"

_INVITE = """
  <send retrans="500"><![CDATA[
      INVITE {target} SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: "Visitor" <sip:{caller}@[local_ip]:[local_port]>;tag=[pid]SIPpTag09[call_number]
      To: <{to}>
      Call-ID: [call_id]
      CSeq: 1 INVITE
      Contact: sip:{caller}@[local_ip]:[local_port]
      Max-Forwards: 70
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=user1 53655765 2353687637 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[local_ip_type] [local_ip]
      t=0 0
      m=audio [auto_media_port] RTP/AVP 8 101
      a=rtpmap:8 PCMA/8000
      a=rtpmap:101 telephone-event/8000
      a=fmtp:101 0-15

    ]]></send>
  <recv response="100" optional="true"/>
  <recv response="180" optional="true"/>
  <recv response="183" optional="true"/>
  <recv response="200" rtd="true"/>
  <send><![CDATA[
      ACK {target} SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: "Visitor" <sip:{caller}@[local_ip]:[local_port]>;tag=[pid]SIPpTag09[call_number]
      To: <{to}>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 1 ACK
      Contact: sip:{caller}@[local_ip]:[local_port]
      Max-Forwards: 70
      Content-Length: 0

    ]]></send>
"""

_BYE = """
  <recv request="BYE" timeout="15000"/>
  <send><![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Contact: <sip:[local_ip]:[local_port];transport=[transport]>
      Content-Length: 0

    ]]></send>
"""


_INFO = """
  <send><![CDATA[
      INFO {target} SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: "Visitor" <sip:{caller}@[local_ip]:[local_port]>;tag=[pid]SIPpTag09[call_number]
      To: <{to}>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: {cseq} INFO
      Contact: sip:{caller}@[local_ip]:[local_port]
      Max-Forwards: 70
      Content-Type: application/dtmf-relay
      Content-Length: [len]

      Signal={key}
      Duration=160
    ]]></send>
  <recv response="200"/>"""


def scenario(caller: str, codes: list[str], *, info: bool = False) -> str:
    """Call, then type each of ``codes`` (a pause before each); then wait for the BYE."""
    return ('<?xml version="1.0" encoding="ISO-8859-1" ?>\n<scenario name="gated caller">'
            + dialogue(caller, codes, info=info) + "\n</scenario>\n")


def dialogue(caller: str, codes: list[str], *, info: bool = False, target: str = SERVICE,
             to: str = SERVICE) -> str:
    """The call's part of a scenario: INVITE ``target`` (To ``to``), the keys, the BYE.

    No pause follows the last key: a BYE that came during one would be unexpected.
    """
    body = _INVITE.format(caller=caller, target=target, to=to)
    cseq = 1
    for code in codes:
        body += '\n  <pause milliseconds="1200"/>'
        for n, key in enumerate(code):
            if n:
                body += '\n  <pause milliseconds="250"/>'
            if info:
                cseq += 1
                body += _INFO.format(caller=caller, cseq=cseq, key=key, target=target, to=to)
                continue
            pcap = PCAPS / f"dtmf_2833_{_NAMES.get(key, key)}.pcap"
            body += f'\n  <nop><action><exec play_pcap_audio="{pcap}"/></action></nop>'
    return body + _BYE


def free_udp(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def call(folder: Path, target: str, called: str, caller: str, codes: list[str],
               host: str, *, info: bool = False) -> tuple[int, str]:
    """Run one sipp call; (its exit status, its error log)."""
    sipp = shutil.which("sipp")
    assert sipp is not None, "sipp is missing: ./dev test installs sip-tester"
    path = write_scenario(folder, scenario(caller, codes, info=info))
    process = await asyncio.create_subprocess_exec(
        sipp, "-sf", str(path), "-s", called, target, "-i", host,
        "-p", str(free_udp(host)), "-mp", str(free_udp(host) & ~1), "-m", "1",
        "-nostdin", "-trace_err", "-error_file", str(folder / "errors.log"),
        cwd=folder, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    status = await asyncio.wait_for(process.wait(), 60)
    return status, read_errors(folder / "errors.log")


def write_scenario(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "caller.xml"
    path.write_text(text)
    return path


def read_errors(path: Path) -> str:
    return path.read_text() if path.exists() else ""
