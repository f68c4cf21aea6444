from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yarl

from gated.core import errors
from gated.core.decide import GUESS_REASONS, ROUTED, STALE, STORE_FAILING

from .helpers import BARRIER, TOKEN

ROOT = Path(__file__).resolve().parent.parent
SOURCES = "\n".join(p.read_text() for p in (ROOT / "gated").rglob("*.py"))


def test_every_reason_gated_logs_is_in_the_troubleshooting_table() -> None:
    """Each reason and actuator result the code can record has a row in docs/dialplan.md."""
    table = (ROOT / "docs" / "dialplan.md").read_text().split("## 4.")[1]
    refusals = (set(re.findall(r'nak\("(\w+)"', SOURCES)) | set(GUESS_REASONS)
                | set(re.findall(r'Status\.ERR, "(\w+)"', SOURCES))) | {STORE_FAILING, STALE}
    grants = {f"granted_{kind}" for kind in ("code", "totp", "caller", "route", "remote")}
    grants.add(ROUTED)
    failures = {cls.reason for cls in vars(errors).values()
                if isinstance(cls, type) and issubclass(cls, errors.ActuatorError)}
    results = {"pulsed", "joined", "confirmed", "deadline", "internal_error",
               "held_open", "forced_open", "dtmf"}
    for word in refusals | grants | failures | results:
        assert re.search(rf"\b{word}\b", table), word


def _pages() -> list[Path]:
    return [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), ROOT / "hardware" / "README.md"]


def test_docs_link_to_files_that_exist() -> None:
    """Relative links in the README, docs/ and hardware/ point at files in the repository."""
    for page in _pages():
        for target in re.findall(r"\]\(([^)#:]+)\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name}: {target}"


def _documented_templates() -> list[tuple[str, str]]:
    pages = [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    return [(page.name, url) for page in pages
            for url in re.findall(r"https?://\S*\{code\}\S*", page.read_text())]


def test_the_docs_show_the_webhook_url_template() -> None:
    """The URL template the installer copies is in the README and the dial-plan guide."""
    assert {name for name, _ in _documented_templates()} >= {"README.md", "dialplan.md"}


@pytest.mark.parametrize(("page", "template"), _documented_templates())
async def test_a_trailing_hash_in_the_code_loses_no_parameter(start_daemon: Any, page: str,
                                                              template: str) -> None:
    """A PBX that fills in the typed `471123#` unencoded still sends did and callerid.

    Any HTTP client ends the URL at a raw `#` (what follows is a fragment and
    never leaves the client), so every parameter after `{code}` would be lost.
    """
    running = await start_daemon()
    filled = (template.rstrip("`.,)").replace("SECRET", TOKEN)
              .replace("{code}", "471123#").replace("{did}", BARRIER)
              .replace("{callerid}", "0612345678").replace("{callername}", "Jan"))
    sent = yarl.URL(filled)  # as the PBX's client parses it: the fragment stays behind
    url = yarl.URL(running.url).with_query(sent.query)
    async with running.session.get(url) as response:
        assert (response.status, (await response.text()).split("&")[0]) == (200, "status=ACK"), page


def _code_blocks(page: str) -> list[str]:
    """The text of each fenced block without a language (config files) in ``page``."""
    blocks: list[str] = []
    block: list[str] | None = None
    fence = ""
    for line in (ROOT / "docs" / page).read_text().splitlines(keepends=True):
        if block is None and line.startswith("```"):
            fence, block = line.strip(), []
        elif block is not None and line.strip() == "```":
            if fence == "```":
                blocks.append("".join(block))
            block = None
        elif block is not None:
            block.append(line)
    return blocks


def _user_blocks(text: str) -> dict[str, list[str]]:
    """An acl_file's lines per ``user``, comments and blank lines left out."""
    blocks: dict[str, list[str]] = {}
    user = ""
    for line in text.splitlines():
        if line.startswith("user "):
            user = line.split(" ", 1)[1]
        if line and not line.startswith("#"):
            blocks.setdefault(user, []).append(line)
    return blocks


def test_the_fleet_guide_shows_the_broker_files_as_they_are() -> None:
    """docs/fleet.md shows config/mosquitto/acl whole and the bridge file's settings."""
    acl = (ROOT / "config" / "mosquitto" / "acl").read_text()
    bridge = (ROOT / "config" / "mosquitto" / "bridge-noord.conf").read_text()
    blocks = _code_blocks("fleet.md")
    assert acl in blocks
    settings = [line for line in bridge.splitlines() if line and not line.startswith("#")]
    assert any([line for line in block.splitlines() if line] == settings for block in blocks)


def test_the_acl_in_the_mqtt_guide_is_the_files() -> None:
    """Each user block docs/mqtt.md shows is that user's block in config/mosquitto/acl."""
    acl = _user_blocks((ROOT / "config" / "mosquitto" / "acl").read_text())
    [shown] = [b for b in _code_blocks("mqtt.md") if b.startswith("user ")]
    users = _user_blocks(shown)
    assert set(users) == {"gated-noord", "staff", "homeassistant"}
    for user, lines in users.items():
        assert lines == acl[user], user


def test_the_docs_index_links_every_page() -> None:
    """docs/README.md links each page and picture in docs/, so none is found only by chance."""
    index = (ROOT / "docs" / "README.md").read_text()
    linked = set(re.findall(r"\]\(([^)#:]+)\)", index))
    pages = {p.name for p in (ROOT / "docs").iterdir() if p.suffix in (".md", ".svg")}
    assert pages - {"README.md"} <= linked


def _anchors(page: Path) -> set[str]:
    """The section anchors GitHub makes of a page's headings (code blocks left out)."""
    anchors: set[str] = set()
    fenced = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (heading := re.match(r"#{1,6} (.*)", line)):
            words = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower())
            anchors.add(words.replace(" ", "-"))
    return anchors


def test_links_to_a_section_find_it() -> None:
    """A link to page.md#section in the README, docs/ or hardware/ names a heading on that page."""
    for page in _pages():
        for target, anchor in re.findall(r"\]\(([^)#:]*)#([^)]+)\)", page.read_text()):
            assert anchor in _anchors(page.parent / target if target else page), \
                f"{page.name}: {target}#{anchor}"
