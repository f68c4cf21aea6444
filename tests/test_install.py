from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from gated.book import compiler

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "systemd" / "install.sh"
DOC = ROOT / "docs" / "install.md"


def install(root: Path) -> str:
    result = subprocess.run(["bash", str(SCRIPT), "--root", str(root)], capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.slow
def test_install_twice_into_a_scratch_root(tmp_path: Path) -> None:
    """Two runs lay down a working venv, config, unit and links; the second changes nothing."""
    root = tmp_path / "root"
    first = install(root)
    config = root / "etc" / "gated" / "gated.toml"
    written = config.read_bytes()
    second = install(root)

    assert f"wrote {config}" in first and f"kept {config}" in second
    assert config.read_bytes() == written
    assert stat.S_IMODE(config.stat().st_mode) == 0o640
    assert stat.S_IMODE(config.parent.stat().st_mode) == 0o750
    loaded = compiler.load(config)
    (token,) = loaded.config.server.tokens
    assert len(token) >= 24 and not token.startswith("change-me")
    assert loaded.book.credential_count == 0  # no demo codes on a real gate
    assert loaded.store_path == Path("/var/lib/gated/entries.sqlite3")

    gated = root / "opt" / "gated" / "venv" / "bin" / "gated"
    version = subprocess.run([str(gated), "--version"], capture_output=True, text=True,
                             check=True).stdout
    assert version.startswith("gated ")
    assert os.readlink(root / "usr" / "local" / "bin" / "gated") == "/opt/gated/venv/bin/gated"

    unit = root / "etc" / "systemd" / "system" / "gated.service"
    assert unit.read_bytes() == (ROOT / "systemd" / "gated.service").read_bytes()
    assert "unchanged" in second.split("== 5.")[1].split("==")[0]
    wants = unit.parent / "multi-user.target.wants" / "gated.service"
    assert os.readlink(wants) == "/etc/systemd/system/gated.service"

    # The parts that need the real system are shown, not run.
    for command in ("apt-get install -y python3-venv", "useradd --system --user-group "
                    "--groups gpio", "chown root:gated", "systemctl restart gated.service"):
        assert f"(--root: not run) {command}" in second


def test_the_script_does_the_steps_the_doc_describes() -> None:
    """install.sh's numbered steps are docs/install.md's, in the same order."""
    script = re.findall(r'^step "(\d+\. [^"]+)"', SCRIPT.read_text(), re.MULTILINE)
    doc = re.findall(r"^### (\d+\. .+)$", DOC.read_text(), re.MULTILINE)
    assert script == doc
    assert len(script) == 7


def test_install_refuses_a_normal_user_without_root_dir() -> None:
    """Run by a normal user without --root, it stops before touching anything."""
    # As root (CI, containers), drop to nobody the way a normal user would run it,
    # from a copy nobody can read: the checkout may be private to its owner.
    as_user = (["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
               if os.geteuid() == 0 else [])
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "systemd" / "install.sh"
        script.parent.mkdir()
        shutil.copy(SCRIPT, script)
        for path in (Path(folder), script.parent, script):
            path.chmod(0o755)
        result = subprocess.run([*as_user, "bash", str(script)], capture_output=True,
                                text=True, timeout=30, check=False, cwd="/")
    assert result.returncode == 1 and "run as root" in result.stderr
    assert result.stdout == ""


def test_install_rejects_unknown_arguments() -> None:
    """A mistyped option is an error, not a surprise install."""
    result = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 2 and "unknown argument --bogus" in result.stderr
