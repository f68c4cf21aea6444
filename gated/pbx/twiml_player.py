"""``gated call --twiml``: play the TwiML platform's side of a whole call.

It sends what Twilio would: the incoming call, then each code typed at a
``<Gather>``, posted to the action URL the answer named, each request signed
with the auth token for the URL as the platform calls it (``public_url``),
and sent to where gated listens, as a TLS proxy would pass it on. It prints
what the caller would hear and what a call box would receive.
"""

from __future__ import annotations

import re
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gated.book.config import Config
from gated.core.errors import GatedError

Print = Callable[[str], None]
# The AccountSid a call names when the site pins none (gated then reads none).
ANY_ACCOUNT = "AC" + "0" * 32


@dataclass(frozen=True, slots=True)
class Platform:
    public_url: str
    local_url: str  # where the requests are sent: gated itself, or its proxy
    auth_token: str | None
    token: str | None  # ?token= when the platform does not sign
    wrong: str
    timeout: float = 10.0
    account_sid: str = ANY_ACCOUNT  # [twiml] account_sid, when the site pins one

    @classmethod
    def from_config(cls, config: Config, url: str | None, timeout: float) -> Platform:
        twiml = config.twiml
        if twiml is None:
            raise GatedError("the config has no [twiml] table (docs/twilio.md)")
        local = url or f"http://{config.server.listen}{twiml.path.rstrip('/')}"
        token = None if twiml.auth_token else config.server.tokens[0]
        return cls(twiml.public_url, local.rstrip("/"), twiml.auth_token, token, twiml.wrong,
                   timeout, twiml.account_sid or ANY_ACCOUNT)

    def sign(self, url: str, params: dict[str, str]) -> dict[str, str]:
        if self.auth_token is None:
            return {}
        try:
            from twilio.request_validator import RequestValidator
        except ImportError:
            raise GatedError("signing needs the twilio package: pip install 'gated[twilio]'"
                             ) from None
        return {"X-Twilio-Signature":
                RequestValidator(self.auth_token).compute_signature(url, params)}

    def local(self, url: str) -> str:
        """Where to send a request for ``url`` (a URL below ``public_url``)."""
        if url.startswith(self.public_url):
            return self.local_url + url[len(self.public_url):]
        return url

    def post(self, url: str, params: dict[str, str]) -> tuple[int, str, float]:
        data = urllib.parse.urlencode(params).encode()
        request = urllib.request.Request(self.local(url), data=data, method="POST",  # noqa: S310 (the URL is the user's)
                                         headers=self.sign(url, params))
        started = time.monotonic()
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                return response.status, response.read().decode(), time.monotonic() - started
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace"), time.monotonic() - started


def _shown(url: str) -> str:
    return re.sub(r"(token=)[^&]*", r"\1***", url)


def play(platform: Platform, *, caller: str, called: str, callername: str,
         codes: Sequence[str], out: Print = print) -> int:
    """Play one call; 0 when it ended admitted (a tone, a welcome), 1 when not, 2 on no answer."""
    call_sid = "CA" + secrets.token_hex(16)
    base = {"CallSid": call_sid, "AccountSid": platform.account_sid, "From": caller, "To": called,
            "CallStatus": "ringing", "Direction": "inbound", "ApiVersion": "2010-04-01"}
    if callername:
        base["CallerName"] = callername
    url = platform.public_url
    if platform.token is not None:
        url += "?" + urllib.parse.urlencode({"token": platform.token})
    params = dict(base)
    out(f"call {call_sid} from {caller or '(withheld)'} to {called}")
    typed = list(codes)
    while True:
        signed = "signed" if platform.auth_token else "token"
        out(f"POST {_shown(url)} ({signed}) -> {_shown(platform.local(url))}")
        try:
            status, body, elapsed = platform.post(url, params)
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            out(f"no answer: {getattr(exc, 'reason', exc)}")
            return 2
        if status != 200:
            out(f"HTTP {status}: {body.strip()}")
            if status == 403:
                out("-> refused: check [twiml] auth_token and public_url (the URL the platform "
                    "signs), or the token")
            return 2
        out(f"HTTP {status} in {elapsed * 1000:.0f} ms")
        try:
            root = ET.fromstring(body)  # noqa: S314 (gated's own answer, asked for by this command)
        except ET.ParseError as exc:
            out(f"not TwiML: {exc}")
            return 2
        verbs = list(root)
        gather = next((v for v in verbs if v.tag == "Gather"), None)
        if gather is None:
            for verb in verbs:
                _describe(verb, out)
            return _verdict(verbs, platform.wrong, out)
        # The platform runs the verbs up to the <Gather>; those after it only
        # when nothing is typed.
        at = verbs.index(gather)
        for verb in verbs[:at + 1]:
            _describe(verb, out)
        if not typed:
            out("  (the caller types nothing)")
            for verb in verbs[at + 1:]:
                _describe(verb, out)
            out("-> not admitted: no input, the call went to the fallback")
            return 1
        code = typed.pop(0)
        out(f"caller types {'*' * len(code)}#")
        url = gather.get("action", "")
        params = {**base, "CallStatus": "in-progress", "Digits": code}


def _describe(verb: ET.Element, out: Print) -> None:
    if verb.tag == "Say":
        voice = f", {verb.get('voice')}" if verb.get("voice") else ""
        out(f'  caller hears  "{verb.text or ""}" ({verb.get("language", "")}{voice})')
    elif verb.tag == "Play" and verb.get("digits"):
        out(f"  call box hears the tones {verb.get('digits')}: the door opens")
    elif verb.tag == "Gather":
        for inner in verb:
            _describe(inner, out)
        out(f"  waits {verb.get('timeout')} s for digits ending in "
            f"{verb.get('finishOnKey')}, then POST {_shown(verb.get('action', ''))}")
    elif verb.tag == "Dial":
        out(f"  put through to {verb.text}")
    elif verb.tag == "Hangup":
        out("  call ends")
    else:
        out(f"  <{verb.tag}>")


def _verdict(verbs: list[ET.Element], wrong: str, out: Print) -> int:
    """Admitted: a tone played, or a welcome said (ACK); anything else is the fallback."""
    if any(v.tag == "Play" for v in verbs):
        out("-> admitted: the call box got its tone")
        return 0
    if verbs and verbs[0].tag == "Say" and verbs[0].text != wrong:
        out("-> admitted (ACK)")
        return 0
    out("-> not admitted: the call went to the fallback")
    return 1
