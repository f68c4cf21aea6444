from __future__ import annotations

import re
from pathlib import Path

from gated import errors
from gated.decide import GUESS_REASONS

ROOT = Path(__file__).resolve().parent.parent
SOURCES = "\n".join(p.read_text() for p in (ROOT / "gated").rglob("*.py"))


def test_every_reason_gated_logs_is_in_the_troubleshooting_table() -> None:
    """Each reason and actuator result the code can record has a row in docs/dialplan.md."""
    table = (ROOT / "docs" / "dialplan.md").read_text().split("## 4.")[1]
    refusals = (set(re.findall(r'nak\("(\w+)"', SOURCES)) | set(GUESS_REASONS)
                | set(re.findall(r'Status\.ERR, "(\w+)"', SOURCES)))
    grants = {f"granted_{kind}" for kind in ("code", "totp", "caller", "route", "remote")}
    failures = {cls.reason for cls in vars(errors).values()
                if isinstance(cls, type) and issubclass(cls, errors.ActuatorError)}
    results = {"pulsed", "joined", "confirmed", "deadline", "internal_error",
               "held_open", "forced_open"}
    for word in refusals | grants | failures | results:
        assert re.search(rf"\b{word}\b", table), word


def test_docs_link_to_files_that_exist() -> None:
    """Relative links in docs/ and hardware/ point at files in the repository."""
    for page in [*(ROOT / "docs").glob("*.md"), ROOT / "hardware" / "README.md"]:
        for target in re.findall(r"\]\(([^)#:]+)\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name}: {target}"
