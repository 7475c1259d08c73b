#!/usr/bin/env bash
# kvpfs developer entry point. On a fresh Debian machine, as root:
#   ./dev.sh demo              install everything, then run kvpfs on the simulated host in ./demo/kvp
#   ./dev.sh test [ARGS]       install everything, lint (ruff, mypy --strict), then run the whole
#                              test suite (newest PyPI libs)
#   ./dev.sh setup             install only (again only when pyproject.toml or the lists change)
#   ./dev.sh deb               build dist/kvpfs_<version>_all.deb from this checkout
#   ./dev.sh smoke-deb         install that package with apt (no PyPI), try it, purge it, check
#                              that nothing is left
#   ./dev.sh test-debian-libs  the whole suite on Debian's python3-pyfuse3/python3-trio and
#                              /usr/bin/python3 (venv in .venv-debian)
#   ./dev.sh ci                all of the above but demo: what .ci/run runs
# Each stage is one function below; `ci` lists them in order.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${KVPFS_VENV:-$PWD/.venv}
# Salt (tests/tools) in a venv of its own: its pins must not decide the test tools' versions.
SALT_VENV=${KVPFS_SALT_VENV:-$PWD/.venv-salt}
DEBIAN_VENV=${KVPFS_DEBIAN_VENV:-$PWD/.venv-debian}
# Debian's own tools must run on Debian's python3, whatever python3 PATH finds first.
SYSTEM_PATH=/usr/local/sbin:/usr/sbin:/sbin:/usr/bin:/bin

# What the suite needs from Debian.
TEST_DEBS=(fuse3 libfuse3-dev pkg-config hyperv-daemons iproute2 util-linux attr
           systemd udev python3-gi gir1.2-nm-1.0 man-db python3-venv inotify-tools
           vim-tiny podman runc bubblewrap busybox-static puppet rsync nano tar findutils
           grep plocate)
# What building the package and running the suite on Debian's libraries need.
DEB_BUILD_DEBS=(build-essential debhelper dh-python pybuild-plugin-pyproject python3-all
                python3-setuptools lintian man-db)
DEBIAN_LIBS_DEBS=(python3-pyfuse3 python3-trio python3-venv python3-setuptools)

# Install the Debian packages among "$@" that are missing.
need_debs() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "dev.sh: installing Debian packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# Run "$@" quietly: its output is shown only if it fails.
quietly() {
    local log
    log=$(mktemp)
    if ! "$@" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        echo "dev.sh: failed: $*" >&2
        return 1
    fi
    rm -f "$log"
}

# A hash of what an install depends on; the venv is (re)installed only when it changes.
install_stamp() {
    { cat pyproject.toml; echo "$*"; "$1" --version 2>&1; } | sha256sum | cut -d' ' -f1
}

setup() {
    need_debs "${TEST_DEBS[@]}"
    # Debian's hyperv-daemons units must never grab a (simulated or real) device here.
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV"
    fi
    local stamp
    stamp=$(install_stamp "$VENV/bin/python" "${TEST_DEBS[*]}")
    if [ "$(cat "$VENV/.kvpfs-installed" 2>/dev/null)" != "$stamp" ]; then
        echo "dev.sh: installing kvpfs and its test tools into $VENV"
        quietly "$VENV/bin/python" -m pip install --upgrade pip
        quietly "$VENV/bin/python" -m pip install -e ".[test]"
        echo "$stamp" >"$VENV/.kvpfs-installed"
    fi
    if [ ! -x "$SALT_VENV/bin/salt-call" ]; then
        echo "dev.sh: installing Salt into $SALT_VENV (for tests/tools)"
        [ -x "$SALT_VENV/bin/python" ] || python3 -m venv "$SALT_VENV"
        quietly "$SALT_VENV/bin/python" -m pip install "salt>=3006"
    fi
}

demo() {
    setup
    mkdir -p demo/kvp
    exec "$VENV/bin/kvpfs" mount demo/kvp --simulate --pool-dir demo/pools
}

# ruff on everything, mypy --strict on kvpfs/ (pyproject.toml): before the suite, in seconds.
lint() {
    echo "dev.sh: ruff check, mypy --strict kvpfs"
    "$VENV/bin/ruff" check kvpfs tests bench emulation
    "$VENV/bin/mypy"
}

test_pypi() {
    setup
    lint
    "$VENV/bin/python" -m pytest "$@"
}

deb() {
    need_debs "${DEB_BUILD_DEBS[@]}"
    local version build
    version=$(dpkg-parsechangelog -l debian/changelog -S Version)
    build=$(mktemp -d)
    # Build a copy of the checkout as it is (committed or not, without ignored
    # files), so that the checkout stays clean and the result lands in dist/.
    mkdir "$build/kvpfs"
    git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' file; do [ -e "$file" ] && printf '%s\0' "$file"; done |
        tar --null -T - -cf - | tar -xf - -C "$build/kvpfs"
    echo "dev.sh: building kvpfs $version (log: $build/build.log)"
    if ! (cd "$build/kvpfs" && PATH=$SYSTEM_PATH dpkg-buildpackage -b -us -uc) \
            >"$build/build.log" 2>&1; then
        tail -40 "$build/build.log" >&2
        echo "dev.sh: the package build failed; full log: $build/build.log" >&2
        return 1
    fi
    mkdir -p dist
    cp "$build/kvpfs_${version}_all.deb" dist/
    echo "dev.sh: built dist/kvpfs_${version}_all.deb"
    echo "dev.sh: lintian (fails on errors; warnings are explained in debian/README.source):"
    PATH=$SYSTEM_PATH lintian --info --fail-on error "dist/kvpfs_${version}_all.deb"
    rm -rf "$build"
}

# Where a package may leave files; compared before install and after purge.
file_list() {
    find /etc /usr /var/lib -xdev \( -path /var/lib/apt -o -path /var/lib/dpkg \
        -o -path /var/cache \) -prune -o -print 2>/dev/null | sort
}

smoke_deb() {
    local deb before after tmp state_before state_after
    deb=$(ls dist/kvpfs_*_all.deb 2>/dev/null | sort -V | tail -1)
    [ -n "$deb" ] || { echo "dev.sh: no dist/kvpfs_*_all.deb: run ./dev.sh deb first" >&2; return 1; }
    if dpkg-query -W -f='${Status}' kvpfs 2>/dev/null | grep -q "ok installed"; then
        echo "dev.sh: kvpfs is already installed: purge it first (apt purge kvpfs)" >&2
        return 1
    fi
    tmp=$(mktemp -d)
    before=$tmp/before after=$tmp/after
    state_before=$(systemctl is-enabled hv-kvp-daemon.service 2>/dev/null || true)
    file_list >"$before"

    echo "dev.sh: apt install ./$deb (Debian archive only: PyPI is out of reach)"
    # Nothing pip-related may run: an install that reached for PyPI would fail here.
    (export PIP_NO_INDEX=1 PIP_INDEX_URL=http://127.0.0.1:9/ DEBIAN_FRONTEND=noninteractive
     PATH=$SYSTEM_PATH apt-get install -y -q --no-install-recommends "./$deb" >"$tmp/apt.log" 2>&1) \
        || { cat "$tmp/apt.log" >&2; return 1; }
    # Globals: the EXIT trap (a failed step) must still find them.
    pkgdir=$(mktemp -d)
    mnt=$pkgdir/kvp
    mkdir "$mnt"
    kvpfs_pid=""
    trap 'umount "$mnt" 2>/dev/null; [ -z "$kvpfs_pid" ] || kill "$kvpfs_pid" 2>/dev/null; true' EXIT
    (
        set -x
        PATH=$SYSTEM_PATH
        command -v kvpfs | grep -qx /usr/bin/kvpfs
        head -1 /usr/bin/kvpfs | grep -qx '#! */usr/bin/python3'
        cd /  # not the checkout's kvpfs
        /usr/bin/python3 -c 'import kvpfs, trio, pyfuse3; assert all(m.__file__.startswith("/usr/lib/python3/") for m in (kvpfs, trio, pyfuse3)), (kvpfs, trio, pyfuse3)'
        kvpfs --version
    )
    # The README's walk-through, with the installed command on the system's python3.
    PATH=$SYSTEM_PATH kvpfs mount "$mnt" --simulate --pool-dir "$pkgdir/pools" \
        >"$tmp/mount.log" 2>&1 &
    kvpfs_pid=$!
    local waited=0
    until PATH=$SYSTEM_PATH kvpfs host --mount "$mnt" list auto_external >/dev/null 2>&1; do
        kill -0 "$kvpfs_pid" 2>/dev/null || { cat "$tmp/mount.log" >&2; return 1; }
        [ $waited -lt 300 ] || { echo "dev.sh: kvpfs did not come up in 30 s" >&2; return 1; }
        sleep 0.1; waited=$((waited + 1))
    done
    (
        set -x
        PATH=$SYSTEM_PATH
        ls "$mnt/auto_external"
        kvpfs host --mount "$mnt" set external greeting hello
        [ "$(cat "$mnt/external/greeting")" = hello ]
        echo Ready >"$mnt/guest/Status"
        kvpfs host --mount "$mnt" list guest | grep -qx "$(printf 'Status\tReady')"
        kvpfs host --mount "$mnt" list auto --json >/dev/null
        kvpfs get --pool-dir "$pkgdir/pools" guest Status | grep -qx Ready
    )
    umount "$mnt"
    wait "$kvpfs_pid"
    kvpfs_pid=""
    (
        set -x
        PATH=$SYSTEM_PATH
        # mount(8) -> /sbin/mount.kvpfs, and mount(8) -> mount.fuse3 -> kvpfs
        mount -t kvpfs kvpfs "$mnt" -o "simulate,pool_dir=$pkgdir/pools"
        [ "$(cat "$mnt/guest/Status")" = Ready ]
        umount "$mnt"
        mount -t fuse.kvpfs kvpfs "$mnt" -o "simulate,pool_dir=$pkgdir/pools"
        [ "$(cat "$mnt/external/greeting")" = hello ]
        umount "$mnt"
        [ "$(man -w kvpfs)" = /usr/share/man/man8/kvpfs.8.gz ]
        man -w mount.kvpfs
        MANWIDTH=80 man kvpfs 2>&1 | grep -q "kvpfs host ip set"
        systemd-analyze verify /lib/systemd/system/kvpfs.service
        grep -qx 'ExecStart=/usr/bin/kvpfs mount ${KVPFS_MOUNTPOINT} --allow-other $KVPFS_OPTIONS' \
            /lib/systemd/system/kvpfs.service
        [ -f /lib/udev/rules.d/60-kvpfs.rules ]
        # hv-kvp-daemon.service gets the drop-in, and its condition keeps it from starting.
        systemd-delta --no-pager --type=extended |
            grep -q 'hv-kvp-daemon.service.d/kvpfs.conf'
        condition=$(grep '^Condition' /lib/systemd/system/hv-kvp-daemon.service.d/kvpfs.conf)
        ! systemd-analyze condition "$condition"
        dpkg-query -W -f='${Conffiles}\n' kvpfs | grep -q ' /etc/default/kvpfs '
    )
    trap - EXIT
    # Maintainer scripts are idempotent: run each once more, as dpkg may after a failure.
    local version
    version=$(dpkg-query -W -f='${Version}' kvpfs)
    (set -x; export DPKG_MAINTSCRIPT_PACKAGE=kvpfs DPKG_MAINTSCRIPT_NAME=postinst
     /var/lib/dpkg/info/kvpfs.postinst configure "$version")
    echo "dev.sh: apt remove kvpfs, then apt purge kvpfs"
    PATH=$SYSTEM_PATH apt-get remove -y -q kvpfs >"$tmp/apt.log" 2>&1 \
        || { cat "$tmp/apt.log" >&2; return 1; }
    (set -x; export DPKG_MAINTSCRIPT_PACKAGE=kvpfs DPKG_MAINTSCRIPT_NAME=postrm
     /var/lib/dpkg/info/kvpfs.postrm remove)
    PATH=$SYSTEM_PATH apt-get purge -y -q kvpfs >"$tmp/apt.log" 2>&1 \
        || { cat "$tmp/apt.log" >&2; return 1; }
    rm -rf "$pkgdir"
    file_list >"$after"
    # Anything new that no installed package owns is left over (the dependencies
    # apt pulled in stay installed; their byte-code caches are theirs). dpkg knows
    # files by the path they were shipped at: /lib/x for what find sees as /usr/lib/x.
    local leftover=() new_paths
    new_paths=$tmp/new
    comm -13 "$before" "$after" >"$new_paths"
    owners() { { xargs -r -d '\n' dpkg -S 2>/dev/null || true; } | sed -n 's/^[^:]*: //p' | sort -u; }
    {
        owners <"$new_paths"
        sed -n 's,^/usr\(/\(lib\|lib64\|bin\|sbin\)/\),\1,p' "$new_paths" | owners |
            sed 's,^,/usr,'
    } | sort -u >"$tmp/owned"
    mapfile -t leftover < <(comm -23 "$new_paths" "$tmp/owned" |
        grep -v -e '/__pycache__$' -e '/__pycache__/' ; grep kvpfs "$new_paths")
    local removed
    removed=$(comm -23 "$before" "$after")
    state_after=$(systemctl is-enabled hv-kvp-daemon.service 2>/dev/null || true)
    if [ ${#leftover[@]} -gt 0 ] || [ -n "$removed" ] || [ "$state_before" != "$state_after" ] \
            || dpkg-query -W kvpfs >/dev/null 2>&1; then
        echo "dev.sh: the purge did not restore the machine:" >&2
        printf '  left behind: %s\n' "${leftover[@]}" >&2
        [ -z "$removed" ] || printf '  removed: %s\n' $removed >&2
        echo "  hv-kvp-daemon.service: $state_before -> $state_after" >&2
        dpkg-query -W kvpfs >&2 2>/dev/null || true
        return 1
    fi
    rm -rf "$tmp"
    echo "dev.sh: smoke test passed; purge left nothing behind" \
         "(hv-kvp-daemon.service: ${state_after:-no unit})"
}

test_debian_libs() {
    need_debs "${TEST_DEBS[@]}" "${DEBIAN_LIBS_DEBS[@]}"
    local python=/usr/bin/python3
    if [ ! -x "$DEBIAN_VENV/bin/python" ]; then
        "$python" -m venv --system-site-packages "$DEBIAN_VENV"
    fi
    local stamp
    stamp=$(install_stamp "$DEBIAN_VENV/bin/python" "${DEBIAN_LIBS_DEBS[*]}" \
            "$(dpkg-query -W -f='${Version} ' python3-trio python3-pyfuse3)")
    if [ "$(cat "$DEBIAN_VENV/.kvpfs-installed" 2>/dev/null)" != "$stamp" ]; then
        echo "dev.sh: installing kvpfs (on Debian's trio and pyfuse3) and the test tools" \
             "into $DEBIAN_VENV"
        # Test tools from PyPI, pinned so that pip can never replace Debian's libraries.
        local pins
        pins=$(mktemp)
        "$python" - >"$pins" <<'EOF'
import importlib.metadata as m
for name in ("trio", "pyfuse3", "outcome", "sniffio", "attrs", "idna", "sortedcontainers"):
    try:
        print(f"{name}=={m.version(name)}")
    except m.PackageNotFoundError:
        pass
EOF
        local tools
        tools=$("$python" -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["test"]))')
        # shellcheck disable=SC2086
        quietly "$DEBIAN_VENV/bin/python" -m pip install -c "$pins" $tools
        rm -f "$pins"
        # kvpfs itself built with Debian's setuptools, its dependencies being Debian's.
        quietly "$DEBIAN_VENV/bin/python" -m pip install --no-deps --no-build-isolation -e .
        rm -rf kvpfs.egg-info
        echo "$stamp" >"$DEBIAN_VENV/.kvpfs-installed"
    fi
    "$DEBIAN_VENV/bin/python" - <<'EOF'
import sys, pyfuse3, trio
print(f"dev.sh: suite on Python {sys.version.split()[0]}, trio {trio.__version__}"
      f" ({trio.__file__}), pyfuse3 {pyfuse3.__version__}")
assert trio.__file__.startswith("/usr/lib/python3/"), "trio is not Debian's"
assert pyfuse3.__file__.startswith("/usr/lib/python3/"), "pyfuse3 is not Debian's"
EOF
    local deselect=()
    if ! "$DEBIAN_VENV/bin/python" -c 'import sys, kvpfs.compat as c; sys.exit(not c.fuse_can_poll())'
    then
        echo "dev.sh: this pyfuse3 cannot poll FUSE files (3.5 can): the tests marked" \
             "fuse_poll (the emulated device, select() on /.events) are left out"
        deselect=(-m "not fuse_poll")
    fi
    "$DEBIAN_VENV/bin/python" -m pytest "${deselect[@]}" "$@"
}

# Every stage, timed. `./dev.sh test` (README's command) is the first.
ci() {
    local stage start
    for stage in "test" deb smoke-deb test-debian-libs; do
        start=$SECONDS
        echo "=== dev.sh $stage"
        "./dev.sh" "$stage"
        echo "=== dev.sh $stage: passed in $((SECONDS - start)) s"
    done
}

command=${1:-}
[ $# -gt 0 ] && shift
case "$command" in
    setup) setup ;;
    demo) demo ;;
    test) test_pypi "$@" ;;
    deb) deb ;;
    smoke-deb) smoke_deb "$@" ;;
    test-debian-libs) test_debian_libs "$@" ;;
    ci) ci ;;
    *)
        echo "usage: $0 demo|test|setup|deb|smoke-deb|test-debian-libs|ci" >&2
        exit 2 ;;
esac
