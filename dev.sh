#!/usr/bin/env bash
# kvpfs developer entry point. On a fresh Debian machine, as root:
#   ./dev.sh demo   install everything, then run kvpfs on the simulated host in ./demo/kvp
#   ./dev.sh test   install everything, then run the whole test suite
#   ./dev.sh setup  install only
set -euo pipefail
cd "$(dirname "$0")"
VENV=${KVPFS_VENV:-$PWD/.venv}

setup() {
    local missing=()
    for pkg in fuse3 libfuse3-dev pkg-config hyperv-daemons iproute2 util-linux attr \
               systemd udev python3-gi gir1.2-nm-1.0 inotify-tools; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "dev.sh: installing Debian packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    # Debian's hyperv-daemons units must never grab a (simulated or real) device here.
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV"
    fi
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
    "$VENV/bin/python" -m pip install -q -e ".[test]"
}

case "${1:-}" in
    setup)
        setup ;;
    demo)
        setup
        mkdir -p demo/kvp
        exec "$VENV/bin/kvpfs" mount demo/kvp --simulate --pool-dir demo/pools ;;
    test)
        setup
        shift
        exec "$VENV/bin/python" -m pytest "$@" ;;
    *)
        echo "usage: $0 demo|test|setup" >&2
        exit 2 ;;
esac
