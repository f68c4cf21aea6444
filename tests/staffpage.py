"""The staff page under test: the real daemon with [web], users made the CLI's way,
and a browser-like client that logs in (its own cookie jar)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from gated.web import users as users_mod

WEB = """
[web]
listen = "127.0.0.1:0"
session_hours = 12
"""
PASSWORDS = {"ada": "ada-password-1", "sam": "sam-password-1", "vic": "vic-password-1"}
ROLES = {"ada": "admin", "sam": "staff", "vic": "viewer"}


def make_users(state: Path) -> None:
    users_mod.save(users_mod.users_path(state), {
        name: users_mod.make(name, ROLES[name], password)  # type: ignore[arg-type]
        for name, password in PASSWORDS.items()})


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "the page has no csrf field"
    return found.group(1)


@dataclass
class Browser:
    """One person's client: a cookie jar that takes 127.0.0.1's cookies."""

    base: str
    session: aiohttp.ClientSession

    @classmethod
    def open(cls, base: str) -> Browser:
        return cls(base, aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)))

    async def get(self, path: str, **kwargs: Any) -> tuple[int, str, Any]:
        async with self.session.get(self.base + path, allow_redirects=False,
                                    **kwargs) as response:
            return response.status, await response.text(), response.headers

    async def post(self, path: str, data: Any, **kwargs: Any) -> tuple[int, str, Any]:
        headers = {"Origin": self.base, "Sec-Fetch-Site": "same-origin",
                   **kwargs.pop("headers", {})}
        async with self.session.post(self.base + path, data=data, allow_redirects=False,
                                     headers=headers, **kwargs) as response:
            return response.status, await response.text(), response.headers

    async def login(self, name: str, password: str | None = None) -> tuple[int, str, Any]:
        _, html, _ = await self.get("/login")
        return await self.post("/login", {"username": name, "csrf": csrf_of(html),
                                          "password": password or PASSWORDS[name]})

    async def csrf(self, path: str = "/") -> str:
        _, html, _ = await self.get(path)
        return csrf_of(html)

    async def close(self) -> None:
        await self.session.close()
