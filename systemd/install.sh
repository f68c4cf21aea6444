#!/usr/bin/env bash
# Install gated on Raspberry Pi OS (Bookworm) as docs/install.md describes.
#
#   sudo ./systemd/install.sh            install or upgrade, enable and start
#   ./systemd/install.sh --root DIR      lay the same files into DIR: the steps that
#                                        need the real system (apt-get, users, starting
#                                        the service) are printed instead of run
#
# Safe to run again: it upgrades gated, keeps /etc/gated/gated.toml, and only
# creates the user and group when they are missing.
set -euo pipefail

SRC=$(cd "$(dirname "$0")/.." && pwd)
ROOT=""
# The system's Python: the gated user must be able to run it, which a pyenv or
# conda Python under someone's home directory does not allow.
PYTHON=${PYTHON:-/usr/bin/python3}

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT=$(realpath -m "${2:?--root needs a directory}"); shift 2 ;;
        --root=*) ROOT=$(realpath -m "${1#--root=}"); shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
done

if [ -z "$ROOT" ] && [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root (sudo $0), or with --root DIR to try it out" >&2
    exit 1
fi

OPT=$ROOT/opt/gated
VENV=$OPT/venv
ETC=$ROOT/etc/gated
UNIT=$ROOT/etc/systemd/system/gated.service

step() { printf '\n== %s\n' "$*"; }
# The parts only a real system has: run them, or under --root say what would run.
system() {
    if [ -n "$ROOT" ]; then echo "   (--root: not run) $*"; else echo "   $*"; "$@"; fi
}

step "1. Packages"
packages=(python3-venv)
case "$(dpkg --print-architecture 2>/dev/null || true)" in
    # Raspberry Pi OS ships lgpio, the GPIO library gpiozero uses on every Pi model.
    arm64|armhf) packages+=(python3-lgpio) ;;
esac
# A fresh image's package lists may be stale: update once if the install fails.
system apt-get install -y "${packages[@]}" ||
    { system apt-get update && system apt-get install -y "${packages[@]}"; }

step "2. User gated in group gpio"
if [ -n "$ROOT" ] || getent group gpio >/dev/null; then :; else
    # Raspberry Pi OS has this group and gives it the GPIO devices; elsewhere make it.
    system groupadd --system gpio
fi
if [ -z "$ROOT" ] && id gated >/dev/null 2>&1; then
    system usermod --append --groups gpio gated
else
    system useradd --system --user-group --groups gpio --home-dir /var/lib/gated \
        --no-create-home --shell /usr/sbin/nologin gated
fi

step "3. gated in a virtual environment under /opt/gated"
install -d -m 0755 "$OPT"
if [ ! -x "$VENV/bin/python" ]; then
    # System site packages: the venv sees Raspberry Pi OS's own lgpio.
    "$PYTHON" -m venv --system-site-packages "$VENV"
    echo "   created $VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install "$SRC[pi,fast]"
# The same version number from a newer checkout must still replace the code.
pip install --force-reinstall --no-deps "$SRC"
echo "   installed $("$VENV/bin/gated" --version)"
install -d -m 0755 "$ROOT/usr/local/bin"
ln -sfn /opt/gated/venv/bin/gated "$ROOT/usr/local/bin/gated"
echo "   linked /usr/local/bin/gated"

step "4. Config in /etc/gated"
install -d -m 0750 "$ETC"
if [ -e "$ETC/gated.toml" ]; then
    echo "   kept $ETC/gated.toml"
else
    token=$("$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(24))')
    # A starting point with a fresh token and no credentials: the example
    # config's demo code must never reach a real gate. Its gate stays on mock
    # pins until the wiring is done (hardware/README.md).
    cat > "$ETC/gated.toml.new" <<EOF
# gated config, written by install.sh. Every key: docs/config.md in the source
# (an annotated example: config/gated.example.toml); the steps: docs/install.md,
# hardware/README.md, docs/dialplan.md.

[site]
id = "site"                        # a short name for this site (MQTT prefix gated/<id>)
timezone = "Europe/Amsterdam"
region = "NL"                      # default region for national numbers

[server]
listen = "127.0.0.1:8080"          # the TLS proxy in front forwards here
path = "/voipgrid"
tokens = ["$token"]
answer_deadline = 3.0

[gates.barrier]
numbers = []                       # the number(s) visitors call for this gate
# Mock pins until the relay is wired and bench-tested; then type = "gpio".
actuator = { type = "mock", pin = 17, active_high = true, pulse = 1.0 }
callers = []                       # numbers that open by just calling

[log]
path = "/var/lib/gated/entries.sqlite3"

[metrics]
listen = "127.0.0.1:9108"          # /metrics and /healthz for monitoring
EOF
    chmod 0640 "$ETC/gated.toml.new"
    mv "$ETC/gated.toml.new" "$ETC/gated.toml"
    echo "   wrote $ETC/gated.toml (webhook token: see server.tokens)"
fi
system chown root:gated "$ETC" "$ETC/gated.toml"

step "5. The systemd unit"
install -d -m 0755 "$(dirname "$UNIT")"
if cmp -s "$SRC/systemd/gated.service" "$UNIT"; then
    echo "   unchanged $UNIT"
else
    install -m 0644 "$SRC/systemd/gated.service" "$UNIT"
    echo "   installed $UNIT"
fi

step "6. Enable and start"
if [ -n "$ROOT" ]; then
    # systemctl --root makes the same links as `enable`, offline.
    systemctl --root="$ROOT" enable gated.service
    system systemctl daemon-reload
    system systemctl restart gated.service
else
    systemctl daemon-reload
    systemctl enable gated.service
    systemctl restart gated.service
fi

step "7. Check"
if [ -n "$ROOT" ]; then
    echo "   (--root: not run) runuser -u gated -- /opt/gated/venv/bin/gated doctor"
else
    # Type=notify: the restart above returned once gated was answering.
    runuser -u gated -- /opt/gated/venv/bin/gated --config /etc/gated/gated.toml doctor || true
fi
echo
echo "Done. Next: wire the relay (hardware/README.md), set the gate's type = \"gpio\""
echo "in /etc/gated/gated.toml, then: sudo systemctl restart gated &&"
echo "sudo -u gated gated --config /etc/gated/gated.toml doctor"
