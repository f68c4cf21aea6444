"""The staff page (DESIGN §16) served by the real daemon: who may do what, and the
attacks it must stand (a forged POST, a missing token, a viewer's open, guessed passwords)."""

from __future__ import annotations

import asyncio
import fcntl
import io
import json
import os
import re
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gated import cli
from gated.site.store import Entry
from gated.web import users as users_mod

from .broker import Mosquitto, Probe, eventually, mqtt_ready, mqtt_table
from .helpers import BARRIER, FakeClock
from .staffpage import WEB, Browser, csrf_of, make_users


class Site:
    def __init__(self, running: Any, state: Path) -> None:
        self.running = running
        self.state = state
        host, port = running.daemon.web_listening[0]
        self.base = f"http://{host}:{port}"
        self.browsers: list[Browser] = []

    def browser(self) -> Browser:
        browser = Browser.open(self.base)
        self.browsers.append(browser)
        return browser

    async def as_user(self, name: str) -> Browser:
        browser = self.browser()
        status, _, headers = await browser.login(name)
        assert status == 303 and headers["Location"] == "/"
        return browser

    def pin_states(self, number: int = 17) -> list[bool]:
        return [s.state for s in self.running.pin(number).states]

    def entries(self) -> list[tuple[str, str, str, str]]:
        conn = sqlite3.connect(self.state / "entries.sqlite3")
        try:
            return conn.execute("SELECT source, credential, status, gate FROM entries "
                                "ORDER BY id").fetchall()
        finally:
            conn.close()


@pytest.fixture
async def site(start_daemon: Callable[..., Any], tmp_path: Path) -> AsyncIterator[Site]:
    """The test site with [web], and an admin, a staff member and a viewer."""
    make_users(tmp_path / "state")
    running = await start_daemon(WEB, clock=FakeClock())
    made = Site(running, tmp_path / "state")
    yield made
    for browser in made.browsers:
        await browser.close()


async def _released(site: Site, number: int = 17) -> list[bool]:
    """The pin's history once it is off again (bounded wait)."""
    for _ in range(300):
        states = site.pin_states(number)
        if len(states) > 1 and not states[-1]:
            return states
        await asyncio.sleep(0.01)
    return site.pin_states(number)


async def test_a_forged_post_from_another_origin_opens_nothing(site: Site) -> None:
    """A staff member's logged-in browser made to POST by another site's page opens no gate."""
    sam = await site.as_user("sam")
    csrf = await sam.csrf()
    for headers in ({"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
                    {"Origin": "https://evil.example", "Sec-Fetch-Site": ""},
                    {"Origin": "null"},
                    {"Sec-Fetch-Site": "same-site"}):
        status, body, _ = await sam.post("/gates/barrier/open", {"csrf": csrf}, headers=headers)
        assert status == 403, (headers, status)
        assert "did not come from this site" in body
    assert site.pin_states() == [False]
    assert site.entries() == []


async def test_a_post_without_the_sessions_token_opens_nothing(site: Site) -> None:
    """A state change without the session's CSRF token (missing, another's, or none at all
    without a session) is 403 and changes nothing."""
    sam = await site.as_user("sam")
    ada = await site.as_user("ada")
    others = await ada.csrf()
    for data in ({}, {"csrf": ""}, {"csrf": others}, {"csrf": "x" * 43}):
        status, _, _ = await sam.post("/gates/barrier/open", data)
        assert status == 403, data
    stranger = site.browser()
    status, _, _ = await stranger.post("/gates/barrier/open", {"csrf": others})
    assert status == 403
    status, _, _ = await sam.post("/visitors", {"name": "x", "hours": "1", "gates": "barrier"})
    assert status == 403
    assert site.pin_states() == [False]
    assert site.entries() == []


async def test_a_viewer_never_opens_a_gate(site: Site) -> None:
    """A viewer sees the site and the log, but their open (with a good token) is 403."""
    vic = await site.as_user("vic")
    status, html, _ = await vic.get("/")
    assert status == 200 and "barrier" in html and "/gates/barrier/open" not in html
    csrf = await vic.csrf()
    status, _, _ = await vic.post("/gates/barrier/open", {"csrf": csrf})
    assert status == 403
    status, _, _ = await vic.get("/visitors")
    assert status == 403
    status, _, _ = await vic.post("/visitors", {"csrf": csrf, "name": "x", "hours": "1",
                                                "gates": "barrier"})
    assert status == 403
    assert site.pin_states() == [False]
    assert site.entries() == []


async def test_a_guessed_password_is_slowed_and_never_says_who_exists(site: Site) -> None:
    """Wrong passwords answer alike for a real and an unknown name; after 5 failures even
    the right one waits (429), 1 s then doubling; the wait passes and is forgotten."""
    clock: FakeClock = site.running.daemon.clock
    guesser = site.browser()
    real = await guesser.login("ada", "not-her-password")
    ghost = await guesser.login("nobody", "not-her-password")
    assert real[0] == ghost[0] == 401
    assert real[1].replace(re.search(r'value="[^"]+"', real[1])[0], "") == (  # type: ignore[index]
        ghost[1].replace(re.search(r'value="[^"]+"', ghost[1])[0], ""))  # type: ignore[index]
    for _ in range(3):
        assert (await guesser.login("ada", "still-wrong-1"))[0] == 401
    status, body, headers = await guesser.login("ada")  # the right password, too soon
    assert status == 429 and headers["Retry-After"] == "1"
    assert "logged in" not in body.lower()
    clock.advance(1.5)
    assert (await guesser.login("ada", "wrong-again-1"))[0] == 401
    status, _, headers = await guesser.login("ada")
    assert status == 429 and headers["Retry-After"] == "2"
    clock.advance(3600 + 1)  # a quiet hour: forgotten, never a permanent ban
    status, _, headers = await guesser.login("ada")
    assert status == 303 and headers["Location"] == "/"


async def test_staff_open_a_gate_through_the_gatekeeper_recorded_with_their_name(
        site: Site) -> None:
    """A staff member's confirmed open pulses the relay once and is an entry with
    source web and their name."""
    sam = await site.as_user("sam")
    status, html, _ = await sam.get("/gates/barrier/open")
    assert status == 200 and "Open barrier now" in html
    assert site.pin_states() == [False]  # the GET only asks
    status, html, _ = await sam.post("/gates/barrier/open", {"csrf": await sam.csrf()})
    assert status == 200 and "barrier opened" in html
    assert await _released(site) == [False, True, False]
    assert site.entries() == [("web", "sam", "ACK", "barrier")]
    status, _, _ = await sam.post("/gates/nowhere/open", {"csrf": await sam.csrf()})
    assert status == 404


async def test_without_a_session_pages_go_to_login_and_posts_are_refused(site: Site) -> None:
    """No session: a page redirects to /login, the live log, the CSV and every POST are
    403; the login page says how to make a first user only when there is none."""
    stranger = site.browser()
    for path in ("/", "/log", "/visitors", "/gates/barrier/open"):
        status, _, headers = await stranger.get(path)
        assert status == 303 and headers["Location"] == "/login", path
    for path in ("/events", "/log.csv"):
        assert (await stranger.get(path))[0] == 403, path
    assert (await stranger.post("/logout", {}))[0] == 403
    _, html, _ = await stranger.get("/login")
    assert "gated users add" not in html
    (site.state / "users.json").unlink()
    _, html, _ = await stranger.get("/login")
    assert "gated users add NAME --role admin" in html


async def test_a_password_change_ends_every_session(site: Site, monkeypatch:
                                                     pytest.MonkeyPatch) -> None:
    """`gated users passwd` ends the user's sessions at once; logout ends its own."""
    phone, laptop = await site.as_user("sam"), await site.as_user("sam")
    assert (await phone.get("/"))[0] == 200
    monkeypatch.setattr("sys.stdin", io.StringIO("a-new-password-9\n"))
    config = str(site.running.daemon.loaded.path)
    assert cli.main(["users", "passwd", "sam", "-c", config]) == 0
    for browser in (phone, laptop):
        status, _, headers = await browser.get("/")
        assert status == 303 and headers["Location"] == "/login"
    fresh = site.browser()
    assert (await fresh.login("sam", "a-new-password-9"))[0] == 303
    status, _, _ = await fresh.post("/logout", {"csrf": await fresh.csrf()})
    assert status == 303
    assert (await fresh.get("/"))[0] == 303


async def test_pages_forbid_framing_foreign_scripts_and_cors(site: Site) -> None:
    """Every answer, refusals too, carries a CSP of this origin only, X-Frame-Options DENY,
    and no CORS header; the session cookie is HttpOnly and SameSite=Strict."""
    stranger = site.browser()
    for status_path in ("/login", "/events", "/static/style.css"):
        _, _, headers = await stranger.get(status_path, headers={"Origin": "https://x.example"})
        csp = headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp and "http" not in csp
        assert headers["X-Frame-Options"] == "DENY"
        assert "Access-Control-Allow-Origin" not in headers
    _, html, _ = await stranger.get("/login")
    assert "<script>" not in html and "http://" not in html and "https://" not in html
    _, _, headers = await stranger.login("ada")
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie


async def test_a_visitor_code_from_the_page_opens_through_the_webhook(site: Site) -> None:
    """Staff issue a code (shown once, with an SMS text of at most 160 characters, a tel:
    link and its QR); it opens by the webhook as many times as given; revoked, it opens
    nothing."""
    sam = await site.as_user("sam")
    csrf = await sam.csrf("/visitors")
    status, html, _ = await sam.post("/visitors", {"csrf": csrf, "name": "Plumber <b>Bob</b>",
                                                   "hours": "4", "uses": "1",
                                                   "gates": "barrier"})
    assert status == 200
    code = re.search(r'<p class="code" id="code">(\d+)</p>', html)[1]  # type: ignore[index]
    sms = re.search(r'<textarea[^>]*>([^<]*)</textarea>', html)[1]  # type: ignore[index]
    assert code in sms and BARRIER in sms and len(sms) <= 160
    assert f'href="tel:{BARRIER},,{code}%23"' in html
    assert "<svg" in html and "Plumber &lt;b&gt;Bob&lt;/b&gt;" in html
    assert (await site.running.get(code=code, did=BARRIER, callerid=""))[1].startswith(
        "status=ACK")
    assert (await site.running.get(code=code, did=BARRIER, callerid=""))[1].startswith(
        "status=NAK")
    _, listing, _ = await sam.get("/visitors")
    assert code not in listing  # never shown again
    status, html, _ = await sam.post("/visitors", {"csrf": csrf, "name": "Second",
                                                   "hours": "1", "gates": "barrier"})
    second = re.search(r'id="code">(\d+)<', html)[1]  # type: ignore[index]
    visitor_id = re.findall(r'/visitors/([0-9a-f]+)/revoke', (await sam.get("/visitors"))[1])
    assert len(visitor_id) == 2
    for vid in visitor_id:
        assert (await sam.post(f"/visitors/{vid}/revoke", {"csrf": csrf}))[0] == 303
    assert (await site.running.get(code=second, did=BARRIER, callerid=""))[1].startswith(
        "status=NAK")
    status, html, _ = await sam.post("/visitors", {"csrf": csrf, "name": "x", "hours": "zero",
                                                   "gates": "barrier"})
    assert status == 400 and "Hours must be" in html


async def _submit(site: Site, entries: list[Entry]) -> None:
    store = site.running.daemon.gatekeeper.store
    for entry in entries:
        store.submit(entry, None, None)
    assert await store.flush()


async def test_the_log_pages_filters_and_exports_without_running_a_cell(site: Site) -> None:
    """The log shows 50 entries a page with a link to older ones, filters by gate, and its
    CSV quotes a name a spreadsheet would run."""
    now = site.running.daemon.clock.now()
    await _submit(site, [Entry(time=now + i, gate="barrier" if i % 2 else "door",
                               caller="+31612345678", did=BARRIER, status="ACK",
                               reason="granted", credential=f"=HYPERLINK(\"x\",\"{i}\")")
                         for i in range(120)])
    vic = await site.as_user("vic")
    status, html, _ = await vic.get("/log")
    assert status == 200 and html.count("<tr class=\"s-ACK\">") == 50
    older = re.search(r'href="(/log\?before=\d+)"', html)[1]  # type: ignore[index]
    _, html, _ = await vic.get(older)
    assert html.count("<tr class=\"s-ACK\">") == 50
    _, html, _ = await vic.get("/log?gate=door")
    assert "<td>barrier</td>" not in html
    status, text, headers = await vic.get("/log.csv?gate=barrier")
    assert status == 200 and headers["Content-Type"].startswith("text/csv")
    lines = text.strip().splitlines()
    assert len(lines) == 61
    assert "\"'=HYPERLINK" in lines[1] and ",+31612345678," in lines[1]


async def test_the_live_log_gets_each_entry_and_never_a_typed_digit(site: Site) -> None:
    """/events sends one `entry` event per entry, the JSON of docs/mqtt.md, without the
    digits the caller typed."""
    vic = await site.as_user("vic")
    async with vic.session.get(site.base + "/events") as stream:
        assert stream.status == 200
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        answer = asyncio.ensure_future(site.running.get(code="471123", did=BARRIER,
                                                        callerid="+31612345678"))
        lines: list[str] = []
        async with asyncio.timeout(10):
            while not any(line.startswith("data:") for line in lines):
                lines.append((await stream.content.readline()).decode().strip())
        assert (await answer)[1].startswith("status=ACK")
    assert "event: entry" in lines
    event = json.loads(next(line for line in lines if line.startswith("data:"))[5:])
    assert event["credential"] == "Demo" and event["gate"] == "barrier"
    assert event["result"] == "granted" and event["site"] == "test"
    assert "471123" not in json.dumps(event)


def test_users_are_made_by_the_command_line_and_never_by_default(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`gated users add/ls/rm` keep argon2id hashes in a private file; a short password or
    a taken name changes nothing."""
    from .helpers import write_config

    config = str(write_config(tmp_path, WEB))
    path = tmp_path / "state" / "users.json"
    assert cli.main(["users", "ls", "-c", config]) == 0
    assert not path.exists()
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert cli.main(["users", "add", "ada", "--role", "admin", "-c", config,
                     "--password-stdin"]) == 2
    assert not path.exists()
    monkeypatch.setattr("sys.stdin", io.StringIO("long-enough-password\n"))
    assert cli.main(["users", "add", "ada", "--role", "admin", "-c", config,
                     "--password-stdin"]) == 0
    text = path.read_text()
    assert "$argon2id$" in text and "long-enough-password" not in text
    assert path.stat().st_mode & 0o777 == 0o600
    monkeypatch.setattr("sys.stdin", io.StringIO("another-password-2\n"))
    assert cli.main(["users", "add", "ada", "--role", "viewer", "-c", config]) == 2
    assert path.read_text() == text
    capsys.readouterr()
    assert cli.main(["users", "ls", "-c", config]) == 0
    assert "ada" in capsys.readouterr().out
    assert cli.main(["users", "rm", "ada", "-c", config]) == 0
    assert json.loads(path.read_text()) == {"users": {}}


async def test_a_session_cookie_is_secure_behind_the_local_tls_proxy(site: Site) -> None:
    """Behind docs/tls.md's proxy (on this machine, X-Forwarded-Proto: https) the session
    cookie is Secure too."""
    browser = site.browser()
    _, html, _ = await browser.get("/login")
    status, _, headers = await browser.post(
        "/login", {"username": "ada", "password": "ada-password-1", "csrf": csrf_of(html)},
        headers={"X-Forwarded-Proto": "https"})
    assert status == 303 and "Secure" in headers["Set-Cookie"]



async def test_a_guesser_behind_the_tls_proxy_never_holds_other_staff_out(site: Site) -> None:
    """Behind the TLS proxy on this machine, the backoff counts the client the proxy names:
    one guesser's failures never hold another member of staff out."""
    guesser, ada = site.browser(), site.browser()
    outside = {"X-Forwarded-For": "203.0.113.9"}
    for number in range(6):
        _, html, _ = await guesser.get("/login")
        status, _, _ = await guesser.post("/login", {
            "username": f"nobody{number}", "password": "guess-guess-1",
            "csrf": csrf_of(html)}, headers=outside)
        assert status == (401 if number < 5 else 429)
    _, html, _ = await ada.get("/login")
    status, _, headers = await ada.post("/login", {
        "username": "ada", "password": "ada-password-1", "csrf": csrf_of(html)},
        headers={"X-Forwarded-For": "198.51.100.7"})
    assert status == 303 and headers["Location"] == "/"


async def test_an_extended_visitor_code_opens_past_its_first_end(site: Site) -> None:
    """Staff extend a visitor code by hours; past its first end it still opens, and an
    extension without the session's token changes nothing."""
    clock: FakeClock = site.running.daemon.clock
    sam = await site.as_user("sam")
    csrf = await sam.csrf("/visitors")
    _, html, _ = await sam.post("/visitors", {"csrf": csrf, "name": "Courier", "hours": "1",
                                              "gates": "barrier"})
    code = re.search(r'id="code">(\d+)<', html)[1]  # type: ignore[index]
    vid = re.findall(r'/visitors/([0-9a-f]+)/extend', (await sam.get("/visitors"))[1])[0]
    assert (await sam.post(f"/visitors/{vid}/extend", {"hours": "24"}))[0] == 403
    assert (await sam.post(f"/visitors/{vid}/extend", {"csrf": csrf, "hours": "x"}))[0] == 400
    assert (await sam.post(f"/visitors/{vid}/extend", {"csrf": csrf, "hours": "3"}))[0] == 303
    clock.advance(2 * 3600)
    assert (await site.running.get(code=code, did=BARRIER, callerid=""))[1].startswith(
        "status=ACK")
    clock.advance(3 * 3600)
    assert (await site.running.get(code=code, did=BARRIER, callerid=""))[1].startswith(
        "status=NAK")


def _users_file(site: Site) -> dict[str, Any]:
    users: dict[str, Any] = json.loads((site.state / "users.json").read_text())["users"]
    return {name: item["role"] for name, item in users.items()}


def _user_entries(site: Site) -> list[tuple[str, str, str]]:
    conn = sqlite3.connect(site.state / "entries.sqlite3")
    try:
        return conn.execute("SELECT credential, reason, credential_id FROM entries "
                            "WHERE kind = 'user' ORDER BY id").fetchall()
    finally:
        conn.close()


async def test_only_admins_reach_any_users_url(site: Site) -> None:
    """A staff member or a viewer gets 403 on every /users URL, GET or POST with a good
    token, and no user changes."""
    before = (site.state / "users.json").read_bytes()
    for name in ("sam", "vic"):
        browser = await site.as_user(name)
        csrf = await browser.csrf()
        for path in ("/users", "/users/ada/role", "/users/nobody/anything"):
            assert (await browser.get(path))[0] == 403, (name, path)
        for path, data in (("/users", {"name": "mallory", "role": "admin",
                                       "password": "mallory-pass-1",
                                       "password2": "mallory-pass-1"}),
                           ("/users/ada/role", {"role": "viewer"}),
                           ("/users/ada/password", {"password": "taken-over-1",
                                                    "password2": "taken-over-1"}),
                           ("/users/ada/remove", {}),
                           (f"/users/{name}/role", {"role": "admin"})):
            status, _, _ = await browser.post(path, {"csrf": csrf, **data})
            assert status == 403, (name, path, status)
        _, html, _ = await browser.get("/")
        assert 'href="/users"' not in html
    assert (site.state / "users.json").read_bytes() == before
    assert _user_entries(site) == []


async def test_a_forged_or_tokenless_users_post_changes_no_user(site: Site) -> None:
    """An admin's browser made to POST to /users by another origin, or without the
    session's token, adds nobody; the same form from the page with its token does."""
    ada = await site.as_user("ada")
    csrf = await ada.csrf("/users")
    form = {"name": "mallory", "role": "admin", "password": "mallory-pass-1",
            "password2": "mallory-pass-1"}
    for headers in ({"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
                    {"Origin": "null"}):
        assert (await ada.post("/users", {"csrf": csrf, **form}, headers=headers))[0] == 403
    for data in (form, {"csrf": "", **form}, {"csrf": "x" * 43, **form}):
        assert (await ada.post("/users", data))[0] == 403
    assert (await ada.post("/users/sam/remove", {}))[0] == 403
    assert set(_users_file(site)) == {"ada", "sam", "vic"}
    status, html, _ = await ada.post("/users", {"csrf": csrf, **form})
    assert status == 200 and "User mallory added." in html
    assert _users_file(site)["mallory"] == "admin"
    assert "mallory-pass-1" not in html


async def test_admins_manage_users_and_each_change_ends_that_users_sessions(
        site: Site) -> None:
    """An admin adds a user (password typed twice), changes their role, resets their
    password and removes them; each change is an entry naming the admin and ends the
    user's sessions at once."""
    ada = await site.as_user("ada")
    _, html, _ = await ada.get("/users")
    assert all(name in html for name in ("ada", "sam", "vic"))
    csrf = csrf_of(html)
    status, html, _ = await ada.post("/users", {"csrf": csrf, "name": "bob", "role": "staff",
                                                "password": "bob-password-1",
                                                "password2": "bob-password-2"})
    assert status == 400 and "The two passwords differ." in html
    status, html, _ = await ada.post("/users", {"csrf": csrf, "name": "sam", "role": "staff",
                                                "password": "bob-password-1",
                                                "password2": "bob-password-1"})
    assert status == 409
    status, _, _ = await ada.post("/users", {"csrf": csrf, "name": "bob", "role": "staff",
                                             "password": "bob-password-1",
                                             "password2": "bob-password-1"})
    assert status == 200 and _users_file(site)["bob"] == "staff"
    bob = site.browser()
    assert (await bob.login("bob", "bob-password-1"))[0] == 303
    assert (await bob.get("/visitors"))[0] == 200
    status, html, _ = await ada.post("/users/bob/role", {"csrf": csrf, "role": "viewer"})
    assert status == 200 and _users_file(site)["bob"] == "viewer"
    assert (await bob.get("/"))[0] == 303  # the role change ended the session
    assert (await bob.login("bob", "bob-password-1"))[0] == 303
    assert (await bob.get("/visitors"))[0] == 403  # a viewer now
    status, _, _ = await ada.post("/users/bob/password", {
        "csrf": csrf, "password": "bob-password-9", "password2": "bob-password-9"})
    assert status == 200
    assert (await bob.get("/"))[0] == 303
    assert (await bob.login("bob", "bob-password-1"))[0] == 401
    assert (await bob.login("bob", "bob-password-9"))[0] == 303
    status, _, _ = await ada.post("/users/bob/remove", {"csrf": csrf})
    assert status == 200 and "bob" not in _users_file(site)
    assert (await bob.get("/"))[0] == 303
    assert (await bob.login("bob", "bob-password-9"))[0] == 401
    assert (await ada.post("/users/nobody/remove", {"csrf": csrf}))[0] == 404
    assert _user_entries(site) == [("ada", "user-added", "user:bob"),
                                   ("ada", "user-role", "user:bob"),
                                   ("ada", "user-password", "user:bob"),
                                   ("ada", "user-removed", "user:bob")]


async def test_the_last_admin_is_never_removed_or_demoted(site: Site) -> None:
    """The only admin cannot remove or demote themselves (409, nothing changes); once
    there is a second admin they can, and their own session ends."""
    ada = await site.as_user("ada")
    csrf = await ada.csrf("/users")
    for path, data in (("/users/ada/remove", {}), ("/users/ada/role", {"role": "staff"}),
                       ("/users/ada/role", {"role": "viewer"})):
        status, html, _ = await ada.post(path, {"csrf": csrf, **data})
        assert status == 409 and "last admin" in html, path
    assert _users_file(site)["ada"] == "admin"
    assert (await ada.post("/users/sam/role", {"csrf": csrf, "role": "admin"}))[0] == 200
    status, _, headers = await ada.post("/users/ada/role", {"csrf": csrf, "role": "staff"})
    assert status == 303 and headers["Location"] == "/login"
    assert _users_file(site) == {"ada": "staff", "sam": "admin", "vic": "viewer"}
    assert (await ada.get("/"))[0] == 303


async def test_ten_logins_at_once_never_run_more_than_two_password_checks(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ten logins at once run at most two argon2id checks (64 MiB each) at a time, the rest
    wait their turn and all log in; past the bounded queue a login gets 429."""
    import threading

    real = users_mod.verify
    lock = threading.Lock()
    release = threading.Event()
    counts = {"running": 0, "peak": 0, "entered": 0}

    def counted(user: Any, password: str) -> bool:
        with lock:
            counts["running"] += 1
            counts["entered"] += 1
            counts["peak"] = max(counts["peak"], counts["running"])
        try:
            release.wait(10)  # bounded: held so that the others pile up behind
            return real(user, password)
        finally:
            with lock:
                counts["running"] -= 1

    monkeypatch.setattr(users_mod, "verify", counted)
    page: Any = getattr(site.running.daemon, "staff_page", None)
    browsers = [site.browser() for _ in range(10)]
    forms = [csrf_of((await b.get("/login"))[1]) for b in browsers]

    async def login(browser: Any, csrf: str) -> int:
        return (await browser.post("/login", {"username": "ada", "csrf": csrf,
                                              "password": "ada-password-1"}))[0]

    tasks = [asyncio.create_task(login(b, c)) for b, c in zip(browsers, forms, strict=True)]
    for _ in range(1000):  # until every login is in a check or waits for one
        checks = getattr(page, "checks", None)
        if counts["entered"] > 2 or (
                checks is not None and counts["running"] == 2 and checks.waiting == 8):
            break
        await asyncio.sleep(0.01)
    release.set()
    statuses = await asyncio.gather(*tasks)
    assert counts["peak"] <= 2, f"{counts['peak']} password checks ran at once"
    assert statuses == [303] * 10
    assert counts["entered"] == 10

    # Past the queue: one check running, one waiting, the next is told to come back.
    from gated.web.server import PasswordChecks

    page.checks = PasswordChecks(limit=1, queue=1)
    release.clear()
    counts.update(entered=0, peak=0)
    first = asyncio.create_task(login(browsers[0], csrf_of((await browsers[0].get(
        "/login"))[1])))
    second = asyncio.create_task(login(browsers[1], csrf_of((await browsers[1].get(
        "/login"))[1])))
    for _ in range(1000):
        if counts["running"] == 1 and page.checks.waiting == 1:
            break
        await asyncio.sleep(0.01)
    status, body, headers = await browsers[2].login("ada")
    assert status == 429 and headers["Retry-After"] == "1" and "Try again" in body
    release.set()
    assert await asyncio.gather(first, second) == [303, 303]


# -- two writers of users.json ----------------------------------------------------------

def _lock_waiters(lock: Path) -> int:
    """How many wait for ``lock``'s flock, as the kernel says (/proc/locks)."""
    inode = f":{lock.stat().st_ino}"
    return sum(1 for line in Path("/proc/locks").read_text().splitlines()
               if " -> " in line and line.split()[-3].endswith(inode))


def _reads_a_pipe(pid: int) -> bool:
    """Whether process ``pid`` waits to read a pipe (its stdin, here)."""
    return "pipe_read" in Path(f"/proc/{pid}/wchan").read_text()


async def _gated(site: Site, *args: str) -> asyncio.subprocess.Process:
    """`gated ARGS` as a process of its own, on the test site's config."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gated", "-c", str(site.state.parent / "gated.toml"), *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)


CAROL = {"name": "carol", "role": "staff", "password": "carol-password-1",
         "password2": "carol-password-1"}


@pytest.mark.parametrize("second", ["page", "command line"])
async def test_two_changes_to_the_users_at_once_lose_neither(site: Site, second: str) -> None:
    """A change from the page or from `gated users` while another writer is between reading
    users.json and writing it waits for that writer (users.json.flock), so both are kept."""
    path = site.state / "users.json"
    lock = path.with_name("users.json.flock")
    ada = await site.as_user("ada")
    csrf = await ada.csrf("/users")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # the first writer takes the lock and reads
        theirs = users_mod.load(path)
        change: asyncio.Future[Any]
        if second == "page":
            change = asyncio.ensure_future(ada.post("/users", {"csrf": csrf, **CAROL}))
        else:
            process = await _gated(site, "users", "add", "carol", "--role", "staff",
                                   "--password-stdin")
            change = asyncio.ensure_future(process.communicate(b"carol-password-1\n"))
        for _ in range(3000):  # until the second change is made, or waits for the lock
            if change.done() or _lock_waiters(lock):
                break
            await asyncio.sleep(0.01)
        theirs["bob"] = users_mod.make("bob", "viewer", "bob-password-1")
        users_mod.save(path, theirs)  # ... and writes what it read, with its change
    finally:
        os.close(fd)
    said = await asyncio.wait_for(change, 30)
    if second == "page":
        assert said[0] == 200 and "User carol added." in said[1]
    else:
        assert process.returncode == 0, said
    assert _users_file(site) == {"ada": "admin", "sam": "staff", "vic": "viewer",
                                 "bob": "viewer", "carol": "staff"}


async def test_a_user_added_on_the_page_while_gated_users_waits_for_a_password_is_kept(
        site: Site) -> None:
    """`gated users add` waiting for its password while an admin adds a user on the page
    keeps that user: the command line reads the file again once it has the password."""
    process = await _gated(site, "users", "add", "bob", "--role", "viewer",
                           "--password-stdin")
    for _ in range(3000):  # until it waits on its stdin (the password)
        if process.returncode is not None or _reads_a_pipe(process.pid):
            break
        await asyncio.sleep(0.01)
    ada = await site.as_user("ada")
    status, html, _ = await ada.post("/users", {"csrf": await ada.csrf("/users"), **CAROL})
    assert status == 200 and "User carol added." in html
    said = await asyncio.wait_for(process.communicate(b"bob-password-1\n"), 30)
    assert process.returncode == 0, said
    assert _users_file(site) == {"ada": "admin", "sam": "staff", "vic": "viewer",
                                 "bob": "viewer", "carol": "staff"}


# -- behind a proxy on another machine -----------------------------------------------------

@pytest.fixture
async def proxied(start_daemon: Callable[..., Any], tmp_path: Path) -> AsyncIterator[Site]:
    """The test site whose [server] trusts a proxy at 127.0.0.3 (a machine of its own here:
    the page takes only 127.0.0.1 and ::1 for this one)."""
    make_users(tmp_path / "state")
    running = await start_daemon(WEB, clock=FakeClock(),
                                 server='trusted_proxies = ["127.0.0.3/32"]')
    made = Site(running, tmp_path / "state")
    yield made
    for browser in made.browsers:
        await browser.close()


def _from(site: Site, address: str) -> Browser:
    """A browser whose connections come from ``address``."""
    browser = Browser(site.base, aiohttp.ClientSession(
        cookie_jar=aiohttp.CookieJar(unsafe=True),
        connector=aiohttp.TCPConnector(local_addr=(address, 0))))
    site.browsers.append(browser)
    return browser


async def _guess(browser: Browser, number: int, headers: dict[str, str]) -> int:
    """One wrong login (a new name each time: only the address can add them up)."""
    _, html, _ = await browser.get("/login")
    status, _, _ = await browser.post("/login", {
        "username": f"nobody{number}", "password": "guess-guess-1", "csrf": csrf_of(html)},
        headers=headers)
    return status


async def test_a_trusted_proxy_elsewhere_gets_secure_cookies_and_per_client_backoff(
        proxied: Site) -> None:
    """Through a proxy in [server] trusted_proxies on another machine, the session cookie
    is Secure when it says https, and the backoff counts the client it names (past its own
    trusted hops), so one guesser behind it never holds other staff out."""
    proxy = _from(proxied, "127.0.0.3")
    statuses = []
    for number in range(7):
        # The guesser writes a new address of its own each time; the proxy appends
        # whom it saw (203.0.113.9), after a hop of its own.
        statuses.append(await _guess(proxy, number, {
            "X-Forwarded-For": f"10.9.9.{number}, 203.0.113.9, 127.0.0.3"}))
    assert statuses == [401] * 5 + [429] * 2
    _, html, _ = await proxy.get("/login")
    status, _, headers = await proxy.post("/login", {
        "username": "ada", "password": "ada-password-1", "csrf": csrf_of(html)},
        headers={"X-Forwarded-For": "198.51.100.7", "X-Forwarded-Proto": "https"})
    assert status == 303 and headers["Location"] == "/"
    assert "Secure" in headers["Set-Cookie"]


async def test_forwarded_headers_from_an_untrusted_peer_are_ignored(proxied: Site) -> None:
    """A client that is neither loopback nor a trusted proxy gets no Secure cookie for
    saying https, and cannot escape its backoff by naming other clients."""
    stranger = _from(proxied, "127.0.0.2")
    statuses = [await _guess(stranger, number, {"X-Forwarded-For": f"203.0.113.{number}"})
                for number in range(6)]
    assert statuses == [401] * 5 + [429]
    honest = _from(proxied, "127.0.0.4")
    _, html, _ = await honest.get("/login")
    status, _, headers = await honest.post("/login", {
        "username": "sam", "password": "sam-password-1", "csrf": csrf_of(html)},
        headers={"X-Forwarded-Proto": "https"})
    assert status == 303 and "Secure" not in headers["Set-Cookie"]


# -- visitor codes on a broker site ----------------------------------------------------

@pytest.fixture
async def broker_site(broker: Mosquitto, start_daemon: Callable[..., Any],
                      tmp_path: Path) -> AsyncIterator[Site]:
    """The test site with [web] and [mqtt] on a real Mosquitto, connected and synced."""
    make_users(tmp_path / "state")
    running = await start_daemon(WEB + mqtt_table(broker))
    await mqtt_ready(running)
    made = Site(running, tmp_path / "state")
    yield made
    for browser in made.browsers:
        await browser.close()


def _local_visitors(site: Site) -> int:
    conn = sqlite3.connect(site.state / "entries.sqlite3")
    try:
        return int(conn.execute("SELECT count(*) FROM visitors").fetchone()[0])
    finally:
        conn.close()


async def test_a_visitor_code_from_the_page_on_a_broker_site_lives_on_the_broker(
        broker_site: Site, probe: Probe) -> None:
    """On a site with [mqtt] the page issues a code as `gated codes issue` does: a retained
    keyed hash under codes/v-… that every subscriber sees, applied here from the broker (no
    local row); the page lists it, extends it and revokes it on the broker too."""
    site = broker_site
    await probe.subscribe("gated/test/codes/+")
    sam = await site.as_user("sam")
    csrf = await sam.csrf("/visitors")
    status, html, _ = await sam.post("/visitors", {"csrf": csrf, "name": "Loodgieter",
                                                   "hours": "4", "uses": "1",
                                                   "gates": "barrier"})
    assert status == 200, html
    code = re.search(r'id="code">(\d+)<', html)[1]  # type: ignore[index]
    (published,) = await probe.wait_for("gated/test/codes/+", 1)
    topic = published.topic
    assert topic.startswith("gated/test/codes/v-")
    assert b"hmac-sha256:" in published.payload and code.encode() not in published.payload
    assert _local_visitors(site) == 0
    late = await Probe(probe.port).connect()  # Home Assistant, another gated: retained
    try:
        await late.subscribe(topic)
        (retained,) = await late.wait_for(topic, 1)
        assert retained.payload == published.payload
    finally:
        await late.disconnect()
    assert (await site.running.get(code=code, did=BARRIER, callerid=""))[1].startswith(
        "status=ACK")
    assert (await site.running.get(code=code, did=BARRIER, callerid=""))[1].startswith(
        "status=NAK")  # one use

    code_id = topic.rsplit("/", 1)[1]
    _, listing, _ = await sam.get("/visitors")
    assert "Loodgieter" in listing and f"/visitors/{code_id}/revoke" in listing
    assert code not in listing
    before = json.loads(published.payload)["valid_until"]
    assert (await sam.post(f"/visitors/{code_id}/extend", {"csrf": csrf, "hours": "2"}))[
        0] == 303
    extended = (await probe.wait_for(topic, 2))[-1]
    assert json.loads(extended.payload)["valid_until"] > before
    assert (await sam.post(f"/visitors/{code_id}/revoke", {"csrf": csrf}))[0] == 303
    assert (await probe.wait_for(topic, 3))[-1].payload == b""
    bridge = site.running.daemon.bridge
    await eventually(lambda: bridge.codes.get("site", code_id) is None)
    assert "Loodgieter" not in (await sam.get("/visitors"))[1]


async def test_a_broker_site_issues_no_code_from_the_page_while_the_broker_is_away(
        broker: Mosquitto, broker_site: Site) -> None:
    """With [mqtt] and the broker not connected, the page says so and issues nothing (no
    local code the site's other gated and Home Assistant would never see); once the broker
    is back it issues again."""
    site = broker_site
    sam = await site.as_user("sam")
    csrf = await sam.csrf("/visitors")
    broker.stop()
    link = site.running.daemon.link
    await eventually(lambda: not link.connected)
    _, html, _ = await sam.get("/visitors")
    assert "not connected" in html
    status, html, _ = await sam.post("/visitors", {"csrf": csrf, "name": "Loodgieter",
                                                   "hours": "4", "gates": "barrier"})
    assert status == 503 and "not connected" in html and 'id="code"' not in html
    assert _local_visitors(site) == 0 and not site.running.daemon.bridge.visitor_codes()
    broker.start()
    await mqtt_ready(site.running, connections=2)
    status, html, _ = await sam.post("/visitors", {"csrf": csrf, "name": "Loodgieter",
                                                   "hours": "4", "gates": "barrier"})
    assert status == 200 and 'id="code"' in html
