"""The staff page in a real browser: Playwright driving Debian's chromium (never skipped).

These runs also take the screenshots docs/staff-page.md shows (desktop and phone):
into the test's own folder, and into docs/img/ with GATED_SCREENSHOTS=1 (a visitor
code is random, so a plain run would change the pictures each time).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from .helpers import BARRIER, FakeClock
from .staffpage import PASSWORDS, WEB, make_users

CHROMIUM = "/usr/bin/chromium"  # Debian's; ./dev test installs it
DOCS_IMAGES = Path(__file__).resolve().parent.parent / "docs" / "img"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Debian's chromium, headless (as root it needs --no-sandbox)."""
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM,
                                                    args=["--no-sandbox"])
        yield launched
        await launched.close()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    """Where the screenshots go: docs/img/ when asked for, else the test's folder."""
    return DOCS_IMAGES if os.environ.get("GATED_SCREENSHOTS") == "1" else tmp_path


@pytest.fixture
async def site(start_daemon: Callable[..., Any], tmp_path: Path) -> Any:
    """The test site with [web] and its three users."""
    make_users(tmp_path / "state")
    return await start_daemon(WEB, clock=FakeClock())


def _base(site: Any) -> str:
    host, port = site.daemon.web_listening[0]
    return f"http://{host}:{port}"


async def _login(browser: Browser, site: Any, name: str, viewport: dict[str, int]) -> Page:
    page = await browser.new_page(viewport=viewport)  # type: ignore[arg-type]
    await page.goto(_base(site) + "/")
    await expect(page).to_have_url(_base(site) + "/login")
    await page.fill("input[name=username]", name)
    await page.fill("input[name=password]", PASSWORDS[name])
    await page.click("button[type=submit]")
    await expect(page).to_have_url(_base(site) + "/")
    return page


async def test_in_a_browser_a_code_issued_on_the_page_opens_and_arrives_live(
        browser: Browser, site: Any, shots: Path) -> None:
    """Log in, issue a visitor code, call the webhook with it, and watch the entry arrive
    on the open page without a reload."""
    login = await browser.new_page(viewport=DESKTOP)  # type: ignore[arg-type]
    await login.goto(_base(site) + "/login")
    await login.screenshot(path=shots / "staff-login.png")
    await login.close()
    page = await _login(browser, site, "sam", DESKTOP)
    await page.click("text=Visitor codes")
    await page.fill("input[name=name]", "Plumber Bob")
    await page.fill("input[name=hours]", "4")
    await page.fill("input[name=uses]", "2")
    await page.click("text=Issue a code")
    code = (await page.text_content("#code") or "").strip()
    assert code.isdigit() and len(code) == 6
    assert code in await page.input_value("#sms")
    await expect(page.locator(".qr svg")).to_be_visible()
    await page.screenshot(path=shots / "staff-code.png", full_page=True)
    await page.goto(_base(site) + "/")
    await expect(page.locator("#livestate")).to_have_text("live")
    _, body = await site.get(code=code, did=BARRIER, callerid="")
    assert body.startswith("status=ACK")
    first = page.locator("#live tbody tr").first
    await expect(first).to_contain_text("Plumber Bob")
    await expect(first).to_contain_text("ACK")
    assert code not in await page.content()
    await page.screenshot(path=shots / "staff-site.png", full_page=True)


async def test_in_a_browser_staff_open_a_gate_on_a_phone_and_a_viewer_cannot(
        browser: Browser, site: Any, shots: Path) -> None:
    """On a phone-sized screen staff open the barrier (asked, then confirmed) and the relay
    pulses once; a viewer sees no open button and is refused at its address."""
    page = await _login(browser, site, "sam", PHONE)
    await page.screenshot(path=shots / "staff-phone.png", full_page=True)
    await page.click("a[href='/gates/barrier/open']")
    await expect(page.locator("h1")).to_have_text("Open barrier?")
    assert [s.state for s in site.pin(17).states] == [False]
    await page.click("text=Open barrier now")
    await expect(page.locator("h1")).to_have_text("barrier opened")
    for _ in range(300):
        if [s.state for s in site.pin(17).states] == [False, True, False]:
            break
        await asyncio.sleep(0.01)
    assert [s.state for s in site.pin(17).states] == [False, True, False]
    await page.goto(_base(site) + "/log")
    await expect(page.locator("table.entries tbody tr").first).to_contain_text("sam")
    viewer = await _login(browser, site, "vic", PHONE)
    assert await viewer.locator("a[href='/gates/barrier/open']").count() == 0
    response = await viewer.goto(_base(site) + "/gates/barrier/open")
    assert response is not None and response.status == 403
    assert [s.state for s in site.pin(17).states] == [False, True, False]
