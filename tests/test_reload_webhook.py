"""The webhook's own settings on reload: token rotation, allow_from, what needs a restart."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from .helpers import BARRIER, TOKEN, write_config

OLD_TOKENS = f'tokens = ["{TOKEN}", "second-token-abcdefgh"]'
NEW = "rotated-token-9876543210"
# A route-only code: ACK without opening anything, and no guess counted.
SALES = {"code": "9000", "did": BARRIER}
SALES_ACK = "status=ACK&callername=Sales+desk&destination=%2B31501234599"


async def test_token_rotation_by_reload_refuses_no_call(start_daemon: Any,
                                                        tmp_path: Path) -> None:
    """Add a token and reload: both work; drop the old one and reload: it gets 403.
    Calls run throughout, and none with a token in both the old and new set is refused."""
    running = await start_daemon()
    path = tmp_path / "gated.toml"
    text = path.read_text()
    assert OLD_TOKENS in text
    settings = running.daemon._webhook_settings
    seen: list[tuple[str, int, int, int]] = []  # token, HTTP status, phase sent, phase answered
    done = asyncio.Event()

    def phase() -> int:
        """Reloads applied so far, read from the settings the webhook judges calls by.

        reload() applies them before its last await returns, so a phase moved
        after it would count a rightful answer in between as a violation.
        """
        live = settings.current
        return 0 if not live.token_ok(NEW) else 1 if live.token_ok(TOKEN) else 2

    async def caller() -> None:
        while not done.is_set():
            for token in (TOKEN, NEW):
                sent = phase()
                status, body = await running.get(token=token, **SALES)
                assert status == 403 or body == SALES_ACK
                seen.append((token, status, sent, phase()))

    async def calls_in(wanted: int, count: int = 40) -> None:
        while sum(1 for _, _, sent, got in seen if sent == got == wanted) < count:  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    callers = [asyncio.create_task(caller()) for _ in range(4)]
    try:
        await calls_in(0)
        path.write_text(text.replace(OLD_TOKENS, f'tokens = ["{TOKEN}", "{NEW}"]'))
        assert await running.daemon.reload("SIGHUP")
        assert phase() == 1
        await calls_in(1)
        path.write_text(text.replace(OLD_TOKENS, f'tokens = ["{NEW}"]'))
        assert await running.daemon.reload("SIGHUP")
        assert phase() == 2
        await calls_in(2)
    finally:
        done.set()
        await asyncio.gather(*callers)
    # The old token: never refused before its removal was applied, always after.
    assert [c for c in seen if c[0] == TOKEN and c[3] < 2 and c[1] != 200] == []
    assert [c for c in seen if c[0] == TOKEN and c[2] == 2 and c[1] != 403] == []
    # The new one: refused before it was added, never once it was.
    assert [c for c in seen if c[0] == NEW and c[3] == 0 and c[1] != 403] == []
    assert [c for c in seen if c[0] == NEW and c[2] >= 1 and c[1] != 200] == []
    # Calls ran in each phase and none of them failed.
    assert {(sent, got) for _, _, sent, got in seen} >= {(0, 0), (1, 1), (2, 2)}


async def test_allow_from_applies_on_reload_and_listen_needs_a_restart(
        start_daemon: Any, tmp_path: Path) -> None:
    """allow_from and trusted_proxies take effect on reload; a new listen address is refused,
    named, and the old settings keep serving."""
    running = await start_daemon()
    path = tmp_path / "gated.toml"
    text = path.read_text()
    path.write_text(text.replace("allow_from = []", 'allow_from = ["192.0.2.0/24"]'))
    assert await running.daemon.reload("SIGHUP")
    # Closed at accept, before a byte is read: the client sees the end of the
    # connection, or a reset if its request was still being written.
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await running.get(**SALES)
    # Behind a trusted proxy, the forwarded client is the one allow_from judges.
    path.write_text(text.replace("allow_from = []", 'allow_from = ["192.0.2.0/24"]\n'
                                 'trusted_proxies = ["127.0.0.1/32"]'))
    assert await running.daemon.reload("SIGHUP")
    async with running.session.get(running.url, params={"token": TOKEN, **SALES},
                                   headers={"X-Forwarded-For": "192.0.2.7"}) as response:
        assert (response.status, await response.text()) == (200, SALES_ACK)
    with capture_logs() as logs:
        path.write_text(text.replace('listen = "127.0.0.1:0"', 'listen = "127.0.0.1:1"')
                        .replace(OLD_TOKENS, f'tokens = ["{NEW}"]'))
        assert not await running.daemon.reload("SIGHUP")
    # The file watcher may reload the same file meanwhile: the SIGHUP's refusal is the one.
    (refusal,) = [e for e in logs if e["event"].startswith("config reload refused")
                  and e["trigger"] == "SIGHUP"]
    assert refusal["changed"] == ["server.listen"]
    assert TOKEN not in repr(logs) and NEW not in repr(logs)
    # Nothing of the refused file applied: the old token and allow_from still hold.
    assert (await running.get(**SALES))[0] == 403
    async with running.session.get(running.url, params={"token": TOKEN, **SALES},
                                   headers={"X-Forwarded-For": "192.0.2.7"}) as response:
        assert response.status == 200


@pytest.mark.parametrize(("table", "lines"), [
    ("lockout", "[lockout]\ncaller_failures = 2\n"),
    ("metrics", '[metrics]\nlisten = "127.0.0.1:0"\n'),
])
async def test_a_reload_never_claims_a_change_it_does_not_apply(
        start_daemon: Any, tmp_path: Path, table: str, lines: str) -> None:
    """A change that only a restart applies ([lockout], [metrics]) is refused by name,
    not reported as `config reloaded` while the old settings go on."""
    running = await start_daemon()
    path = tmp_path / "gated.toml"
    path.write_text(path.read_text() + "\n" + lines)
    with capture_logs() as logs:
        assert not await running.daemon.reload("SIGHUP")
    # The file watcher may reload the same file meanwhile: the SIGHUP's refusal is the one.
    (refusal,) = [e for e in logs if e["event"].startswith("config reload refused")
                  and e["trigger"] == "SIGHUP"]
    assert refusal["changed"] == [table]


async def test_check_config_says_whether_a_reload_applies_an_edit(
        start_daemon: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """check-config compares the file with the config the daemon runs with, by the one
    reload-versus-restart list: a new token a reload applies; a new listen address it
    names as needing a restart, as the reload itself then refuses it."""
    import json

    from gated.cli import main

    path = write_config(tmp_path, "")
    capsys.readouterr()
    assert main(["check-config", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["restart_needed_for"] is None  # no daemon yet
    running = await start_daemon()
    text = path.read_text()
    path.write_text(text.replace(OLD_TOKENS, f'tokens = ["{NEW}"]'))
    capsys.readouterr()
    assert main(["check-config", str(path)]) == 0
    assert "a reload applies this file" in capsys.readouterr().out
    path.write_text(text.replace('listen = "127.0.0.1:0"', 'listen = "127.0.0.1:1"'))
    assert main(["check-config", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["restart_needed_for"] == ["server.listen"]
    assert main(["check-config", str(path)]) == 0
    assert "restart gated for server.listen" in capsys.readouterr().out
    assert not await running.daemon.reload("SIGHUP")
    path.write_text(text.replace(OLD_TOKENS, f'tokens = ["{NEW}"]'))
    assert await running.daemon.reload("SIGHUP")
    capsys.readouterr()
    assert main(["check-config", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["restart_needed_for"] == []
