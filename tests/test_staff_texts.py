"""Every word the staff page shows comes from one language file: the templates and the
server name only keys, and a translation is one more file with the same keys."""

from __future__ import annotations

import re
from pathlib import Path

import jinja2
import pytest

from gated.web import texts
from gated.web.users import ROLES

WEB = Path(texts.__file__).resolve().parent
TEMPLATES = sorted((WEB / "templates").glob("*.html"))
# A key built in a template ("users.role_" + r) must exist for every value it takes.
BUILT = {"users.role_": ROLES, "index.state_": ("open", "closed", "none")}
JINJA = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", re.S)
SHOWN_ATTRS = re.compile(r'\b(?:placeholder|aria-label|title|alt|value)="([^"]*)"')


def _template_keys(source: str) -> tuple[set[str], set[str]]:
    whole = set(re.findall(r'\bt\("([^"]+)"\s*[,)]', source))
    built = set(re.findall(r'\bt\("([^"]+)"\s*\+', source))
    return whole, built


def test_every_key_the_pages_ask_for_is_in_the_language_file() -> None:
    """Each t("key") of every template and of server.py names a text of en.toml."""
    english = texts.language("en")
    for template in TEMPLATES:
        whole, built = _template_keys(template.read_text())
        for key in whole:
            english(key)  # raises for a missing key
        for prefix in built:
            assert prefix in BUILT, f"{template.name}: a key built from {prefix!r}"
            for value in BUILT[prefix]:
                english(prefix + value)
    server = (WEB / "server.py").read_text()
    keys = set(re.findall(r'(?:texts|_t\(request\))\("([a-z_]+\.[a-z_]+)"', server))
    keys |= set(re.findall(r'_Refused\("([a-z_]+\.[a-z_]+)"', server))
    assert len(keys) > 20
    for key in keys:
        english(key)


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_no_template_holds_words_of_its_own(template: Path) -> None:
    """Outside its t(...) calls a template shows no letters: no text node, and no
    placeholder, label, title or button value of literal English."""
    source = JINJA.sub("", template.read_text())
    source = re.sub(r"<!doctype html>", "", source, flags=re.I)
    shown = [value for value in SHOWN_ATTRS.findall(source)
             if value not in ("", "csrf") and not value.replace(".", "").isdigit()]
    nodes = [node.strip() for node in re.sub(r"<[^>]*>", "\n", source).split("\n")]
    words = [text for text in nodes + shown if re.search(r"[A-Za-z]", text)]
    assert words == [], f"{template.name} holds literal text: {words}"


def test_a_second_language_file_with_the_same_keys_loads_and_renders(
        tmp_path: Path) -> None:
    """A copy of en.toml with every text changed loads with the same keys and renders a
    page in that language; a file missing a key stops the page, never shows a blank."""
    source = (WEB / "lang" / "en.toml").read_text()
    translated = re.sub(r'^(\w+ = )"', r'\1"XX ', source, flags=re.M)
    (tmp_path / "xx.toml").write_text(translated)
    english, other = texts.language("en"), texts.load(tmp_path / "xx.toml")
    assert set(other.texts) == set(english.texts) and other.language == "xx"
    assert all(text.startswith("XX ") for text in other.texts.values())
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(WEB / "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined)
    context = {"t": other, "site": "test", "visit": None, "csrf": "", "login_csrf": "c",
               "error": "", "no_users": True, "first_user": "gated users add",
               "may_issue": False, "may_admin": False}
    html = env.get_template("login.html").render(context)
    assert "XX Log in" in html and 'lang="xx"' in html and ">Log in<" not in html
    missing = re.sub(r'^submit = .*$', "", translated, flags=re.M)
    (tmp_path / "yy.toml").write_text(missing)
    with pytest.raises(texts.TextsError):
        env.get_template("login.html").render({**context, "t": texts.load(
            tmp_path / "yy.toml")})


def test_the_live_logs_script_takes_its_words_from_the_page() -> None:
    """The script shows no word of its own: what it writes comes from the page's texts."""
    script = (WEB / "static" / "live.js").read_text()
    assert re.findall(r'textContent\s*=\s*"[^"]*[A-Za-z][^"]*"', script) == []
    assert 'data-live="{{ t("index.live") }}"' in (WEB / "templates" / "index.html").read_text()
