#!/usr/bin/env bash
# kvpfs developer entry point. On a fresh Debian machine, as root:
#   ./dev.sh demo              install everything, then run kvpfs on the simulated host in ./demo/kvp
#   ./dev.sh test [ARGS]       install everything, lint (ruff, mypy --strict), then run the whole
#                              test suite (newest PyPI libs)
#   ./dev.sh setup             install only (again only when pyproject.toml or the lists change)
#   ./dev.sh deb               build dist/kvpfs_<version>_all.deb from this checkout
#   ./dev.sh check-depends     that package's Depends against Debian 12 and 13 and Ubuntu
#                              24.04 and 26.04 (versions and sources: debian/check-depends)
#   ./dev.sh smoke-deb         install that package with apt (no PyPI), try it, purge it, check
#                              that nothing is left; with /var/lib/hyperv absent, empty and
#                              full (the machine's own is kept aside and put back)
#   ./dev.sh wheel             sdist + wheel (python -m build), twine check, then pip install
#                              of the wheel and the walk-through in fresh venvs on 3.12, 3.13
#   ./dev.sh test-debian-libs  the whole suite on Debian's python3-pyfuse3/python3-trio and
#                              /usr/bin/python3 (venv in .venv-debian)
#   ./dev.sh test-debian13-libs [TESTS]    TESTS (default: LIB_SET_TESTS, a subset) on Debian
#   ./dev.sh test-ubuntu2404-libs [TESTS]  13's or Ubuntu 24.04's Python, trio, pyfuse3 and
#                              outcome versions, from PyPI on pyenv's Python (.venv-<set>)
#   ./dev.sh ci                all of the above but demo: what .ci/run runs, each stage timed
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
        apt_get update -qq
        apt_get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# apt-get that waits (up to 10 minutes) for another apt or dpkg to finish instead of
# failing at once on the lock: other jobs on the machine may be installing too.
# DPkg::Lock::Timeout covers the dpkg frontend lock; `update` takes the lists lock,
# which apt 2.6 does not wait for, so a busy `update` is retried.
apt_get() {
    local try
    if [ "$1" = update ]; then
        for try in 1 2 3 4 5 6; do
            apt-get -o DPkg::Lock::Timeout=600 "$@" && return 0
            echo "dev.sh: apt-get update failed (try $try of 6; another apt may hold the" \
                 "lists lock), again in 30 s" >&2
            sleep 30
        done
        return 1
    fi
    apt-get -o DPkg::Lock::Timeout=600 "$@"
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
    { cat pyproject.toml kvpfs/__init__.py; echo "$*"; "$1" --version 2>&1; } |
        sha256sum | cut -d' ' -f1
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

# Steps run when dev.sh exits, the last added first: a failed step must still undo
# what was done (a mount, a package, a directory moved aside).
EXIT_STEPS=()
on_exit() {
    EXIT_STEPS+=("$1")
    trap run_exit_steps EXIT
}
run_exit_steps() {
    local i
    for ((i = ${#EXIT_STEPS[@]} - 1; i >= 0; i--)); do
        eval "${EXIT_STEPS[i]}" || true
    done
}

# README's walk-through on the simulated host, with the first kvpfs on PATH=$1, in
# directory $2 (mount point $2/kvp, pools in $2/pools): a key the host sets reads
# back, a value the guest writes reaches the host.
walkthrough() {
    local path=$1 dir=$2 mnt=$2/kvp pid waited=0
    mkdir -p "$mnt"
    PATH=$path kvpfs mount "$mnt" --simulate --pool-dir "$dir/pools" >"$dir/mount.log" 2>&1 &
    pid=$!
    on_exit "umount '$mnt' 2>/dev/null; kill $pid 2>/dev/null"
    until PATH=$path kvpfs host --mount "$mnt" list auto_external >/dev/null 2>&1; do
        kill -0 "$pid" 2>/dev/null || { cat "$dir/mount.log" >&2; return 1; }
        [ $waited -lt 300 ] || { echo "dev.sh: kvpfs did not come up in 30 s" >&2; return 1; }
        sleep 0.1; waited=$((waited + 1))
    done
    (
        set -x
        PATH=$path
        ls "$mnt/auto_external"
        kvpfs host --mount "$mnt" set external greeting hello
        [ "$(cat "$mnt/external/greeting")" = hello ]
        echo Ready >"$mnt/guest/Status"
        kvpfs host --mount "$mnt" list guest | grep -qx "$(printf 'Status\tReady')"
        kvpfs host --mount "$mnt" list auto --json >/dev/null
        kvpfs get --pool-dir "$dir/pools" guest Status | grep -qx Ready
    )
    umount "$mnt"
    wait "$pid"
}

# What /var/lib/hyperv holds, to compare before install and after purge.
hyperv_state() {
    if [ -d /var/lib/hyperv ]; then
        (cd /var/lib/hyperv && find . -printf '%p %y %m %s\n' | sort &&
         find . -type f -print0 | sort -z | xargs -0 -r sha256sum)
    else
        echo absent
    fi
}

# smoke-deb runs once at a time on a machine: it moves /var/lib/hyperv aside.
SMOKE_LOCK=/run/lock/kvpfs-smoke-deb.lock
SAVED_HYPERV=/var/lib/.kvpfs-smoke-deb.saved-hyperv

smoke_deb() {
    local deb tmp
    deb=$(ls dist/kvpfs_*_all.deb 2>/dev/null | sort -V | tail -1)
    [ -n "$deb" ] || { echo "dev.sh: no dist/kvpfs_*_all.deb: run ./dev.sh deb first" >&2; return 1; }
    exec 9>"$SMOKE_LOCK"
    flock -w 900 9 || { echo "dev.sh: another smoke-deb holds $SMOKE_LOCK" >&2; return 1; }
    if dpkg-query -W -f='${Status}' kvpfs 2>/dev/null | grep -q "ok installed"; then
        echo "dev.sh: kvpfs is already installed: purge it first (apt purge kvpfs)" >&2
        return 1
    fi
    if [ -e "$SAVED_HYPERV" ]; then
        echo "dev.sh: $SAVED_HYPERV exists: an earlier smoke-deb was killed before it put" \
             "the machine's /var/lib/hyperv back. Check it, move it back to /var/lib/hyperv" \
             "(or remove it), then run this again." >&2
        return 1
    fi
    tmp=$(mktemp -d)
    # The package must leave /var/lib/hyperv as it found it, in each state it can find
    # it in. The machine's own directory (if any) waits aside and comes back at the end,
    # also when a step fails; a kvpfs still installed then is purged first (it is ours:
    # smoke-deb refuses to start beside an installed kvpfs).
    if [ -e /var/lib/hyperv ]; then
        echo "dev.sh: this machine has /var/lib/hyperv: kept aside at $SAVED_HYPERV meanwhile"
        mv /var/lib/hyperv "$SAVED_HYPERV"
    fi
    on_exit "restore_hyperv '$tmp'"

    local case
    for case in absent empty with-pools; do
        rm -rf /var/lib/hyperv  # what the previous case left (it made it)
        case $case in
            empty) mkdir -m 0755 /var/lib/hyperv ;;
            with-pools)
                mkdir -m 0755 /var/lib/hyperv
                # A pool with one record (512-byte key, 2048-byte value, NUL-padded),
                # as hv_kvp_daemon leaves it, and a file of its network scripts.
                python3 -c 'import sys; sys.stdout.buffer.write(b"smoke".ljust(512, b"\0") + b"before".ljust(2048, b"\0"))' \
                    >/var/lib/hyperv/.kvp_pool_0
                : >/var/lib/hyperv/.kvp_pool_1
                echo 'DEVICE=eth0' >/var/lib/hyperv/ifcfg-eth0 ;;
        esac
        echo "=== dev.sh smoke-deb: /var/lib/hyperv $case before install"
        smoke_deb_case "$deb" "$tmp" "$case"
    done
    echo "dev.sh: smoke test passed; purge left nothing behind and /var/lib/hyperv as it" \
         "was, absent, empty or with pools"
}

# Undo what smoke_deb changed: a kvpfs it installed, the /var/lib/hyperv of its cases,
# and put the machine's /var/lib/hyperv back.
restore_hyperv() {
    if dpkg-query -W -f='${Status}' kvpfs 2>/dev/null | grep -q "ok installed\|config-files"; then
        echo "dev.sh: purging the kvpfs that smoke-deb installed" >&2
        PATH=$SYSTEM_PATH apt_get purge -y -q kvpfs >/dev/null 2>&1 || true
    fi
    rm -rf /var/lib/hyperv
    if [ -e "$SAVED_HYPERV" ]; then
        mv "$SAVED_HYPERV" /var/lib/hyperv
        echo "dev.sh: /var/lib/hyperv of this machine put back"
    fi
    rm -rf "$1"
}

# One install, try, remove, purge cycle; $3 names the state of /var/lib/hyperv.
smoke_deb_case() {
    local deb=$1 tmp=$2 case=$3 before=$2/before after=$2/after state_before state_after
    local hyperv_before hyperv_after marker=/var/lib/kvpfs/created-var-lib-hyperv
    state_before=$(systemctl is-enabled hv-kvp-daemon.service 2>/dev/null || true)
    hyperv_before=$(hyperv_state)
    file_list >"$before"

    echo "dev.sh: apt install ./$deb (Debian archive only: PyPI is out of reach)"
    apt_install_deb "$deb" "$tmp"
    # postinst notes that kvpfs made /var/lib/hyperv exactly when it was absent.
    if [ "$case" = absent ]; then
        [ -d /var/lib/hyperv ] && [ -e $marker ] ||
            { echo "dev.sh: postinst did not make /var/lib/hyperv and $marker" >&2; return 1; }
    else
        [ ! -e $marker ] ||
            { echo "dev.sh: postinst claims a /var/lib/hyperv that was there before" >&2; return 1; }
    fi
    if [ "$case" = absent ]; then
        smoke_deb_installed "$tmp"
    fi
    # Maintainer scripts are idempotent: run each once more, as dpkg may after a failure.
    local version
    version=$(dpkg-query -W -f='${Version}' kvpfs)
    (set -x; export DPKG_MAINTSCRIPT_PACKAGE=kvpfs DPKG_MAINTSCRIPT_NAME=postinst
     /var/lib/dpkg/info/kvpfs.postinst configure "$version")
    echo "dev.sh: apt remove kvpfs, then apt purge kvpfs"
    PATH=$SYSTEM_PATH apt_get remove -y -q kvpfs >"$tmp/apt.log" 2>&1 \
        || { cat "$tmp/apt.log" >&2; return 1; }
    (set -x; export DPKG_MAINTSCRIPT_PACKAGE=kvpfs DPKG_MAINTSCRIPT_NAME=postrm
     /var/lib/dpkg/info/kvpfs.postrm remove)
    if [ "$case" = absent ]; then
        # A reinstall after remove keeps the note: kvpfs still made the directory.
        echo "dev.sh: apt install ./$deb again after the remove"
        apt_install_deb "$deb" "$tmp"
        [ -e $marker ] || { echo "dev.sh: the reinstall lost $marker" >&2; return 1; }
    fi
    PATH=$SYSTEM_PATH apt_get purge -y -q kvpfs >"$tmp/apt.log" 2>&1 \
        || { cat "$tmp/apt.log" >&2; return 1; }
    file_list >"$after"
    hyperv_after=$(hyperv_state)
    # Anything new that no installed package owns is left over (the dependencies
    # apt pulled in stay installed; their byte-code caches are theirs). dpkg knows
    # files by the path they were shipped at: /lib/x for what find sees as /usr/lib/x.
    local leftover=() new_paths=$tmp/new
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
            || [ "$hyperv_before" != "$hyperv_after" ] || dpkg-query -W kvpfs >/dev/null 2>&1; then
        echo "dev.sh: the purge did not restore the machine (/var/lib/hyperv $case before):" >&2
        [ ${#leftover[@]} -eq 0 ] || printf '  left behind: %s\n' "${leftover[@]}" >&2
        [ -z "$removed" ] || printf '  removed: %s\n' $removed >&2
        [ "$hyperv_before" = "$hyperv_after" ] ||
            printf '  /var/lib/hyperv before:\n%s\n  after:\n%s\n' "$hyperv_before" "$hyperv_after" >&2
        echo "  hv-kvp-daemon.service: $state_before -> $state_after" >&2
        dpkg-query -W kvpfs >&2 2>/dev/null || true
        return 1
    fi
    echo "dev.sh: purged; nothing left behind, /var/lib/hyperv as before ($case)" \
         "(hv-kvp-daemon.service: ${state_after:-no unit})"
}

# apt install ./$1 with PyPI out of reach: an install that reached for it would fail.
apt_install_deb() {
    (export PIP_NO_INDEX=1 PIP_INDEX_URL=http://127.0.0.1:9/ DEBIAN_FRONTEND=noninteractive
     PATH=$SYSTEM_PATH apt_get install -y -q --no-install-recommends "./$1" >"$2/apt.log" 2>&1) \
        || { cat "$2/apt.log" >&2; return 1; }
}

# The installed package: its command, walk-through, mount helpers, man page, unit,
# udev rule, drop-in (on Debian's and Ubuntu's hv-kvp-daemon.service) and conffile.
smoke_deb_installed() {
    local tmp=$1 pkgdir
    pkgdir=$(mktemp -d)
    on_exit "rm -rf '$pkgdir'"
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
    walkthrough "$SYSTEM_PATH" "$pkgdir"
    local mnt=$pkgdir/kvp
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
    # Ubuntu's linux-cloud-tools-common names its unit hv-kvp-daemon.service too: with
    # the drop-in installed, that unit's first failed condition is the drop-in's.
    local units=$tmp/ubuntu-units result
    mkdir -p "$units"
    cp tests/fixtures/units/ubuntu-hv-kvp-daemon.service "$units/hv-kvp-daemon.service"
    result=$(SYSTEMD_UNIT_PATH=$units:/lib/systemd/system \
             systemd-analyze condition --unit=hv-kvp-daemon.service 2>&1 || true)
    echo "dev.sh: Ubuntu's hv-kvp-daemon.service with the drop-in: $result"
    grep -q 'hv-kvp-daemon.service: ConditionPathExists=!/lib/systemd/system/kvpfs.service failed' \
        <<<"$result" || { echo "dev.sh: the drop-in does not apply to Ubuntu's unit" >&2; return 1; }
    result=$(SYSTEMD_UNIT_PATH=$units systemd-analyze condition --unit=hv-kvp-daemon.service 2>&1 || true)
    ! grep -q 'kvpfs' <<<"$result" ||
        { echo "dev.sh: the Ubuntu unit check would pass without the drop-in: $result" >&2; return 1; }
    rm -rf "$pkgdir"
}

# The built .deb's Depends against Debian 12 and 13 and Ubuntu 24.04 and 26.04
# (the table of their versions, and where it comes from, is in debian/check-depends).
check_depends() {
    local deb
    deb=$(ls dist/kvpfs_*_all.deb 2>/dev/null | sort -V | tail -1)
    [ -n "$deb" ] || { echo "dev.sh: no dist/kvpfs_*_all.deb: run ./dev.sh deb first" >&2; return 1; }
    /usr/bin/python3 debian/check-depends "$deb"
    # Debian's archive is reachable from here: apt's own solver, on Debian 13's package
    # index (in a directory of its own; this machine's apt setup is left alone), as on
    # an empty trixie machine.
    local apt_dir opts
    apt_dir=$(mktemp -d)
    on_exit "rm -rf '$apt_dir'"
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/prefs"
    : >"$apt_dir/status"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]" \
         "http://deb.debian.org/debian trixie main" >"$apt_dir/sources.list"
    opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::State::status=$apt_dir/status"
          -o "Dir::Cache=$apt_dir/cache" -o Dir::Etc::Preferences=/dev/null
          -o "Dir::Etc::PreferencesParts=$apt_dir/prefs" -o Acquire::Languages=none
          -o "APT::Architecture=$(dpkg --print-architecture)")
    echo "dev.sh: apt-get --simulate install ./$deb on Debian 13 trixie's package index"
    quietly apt-get "${opts[@]}" update
    apt-get "${opts[@]}" --simulate --no-install-recommends install "./$deb" >"$apt_dir/sim" 2>&1 ||
        { cat "$apt_dir/sim" >&2; echo "dev.sh: apt cannot install $deb on Debian 13" >&2; return 1; }
    grep -E '^Inst (kvpfs|python3|python3-trio|python3-pyfuse3|python3-outcome|fuse3) ' \
        "$apt_dir/sim" | sed 's/^/    /'
    rm -rf "$apt_dir"
}

# The release for PyPI: `python -m build` makes the sdist, then the wheel from it, into
# dist/; twine checks both (metadata, README rendering). Then each Python that PyPI users
# run it on gets a fresh venv, `pip install dist/kvpfs-<version>-py3-none-any.whl` (trio
# and pyfuse3 from PyPI, pyfuse3 built against libfuse3-dev), and README's walk-through
# with that venv's kvpfs.
RELEASE_VENV=${KVPFS_RELEASE_VENV:-$PWD/.venv-release}
WHEEL_PYTHONS=(3.12 3.13)
wheel() {
    need_debs "${TEST_DEBS[@]}"
    if [ ! -x "$RELEASE_VENV/bin/python" ]; then
        python3 -m venv "$RELEASE_VENV"
    fi
    local stamp version
    stamp=$(install_stamp "$RELEASE_VENV/bin/python" release)
    if [ "$(cat "$RELEASE_VENV/.kvpfs-installed" 2>/dev/null)" != "$stamp" ]; then
        echo "dev.sh: installing build and twine into $RELEASE_VENV"
        quietly "$RELEASE_VENV/bin/python" -m pip install --upgrade pip
        quietly "$RELEASE_VENV/bin/python" -m pip install build twine
        echo "$stamp" >"$RELEASE_VENV/.kvpfs-installed"
    fi
    version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' kvpfs/__init__.py)
    rm -f "dist/kvpfs-$version.tar.gz" "dist/kvpfs-$version-py3-none-any.whl"
    echo "dev.sh: python -m build (sdist, then the wheel from the sdist)"
    quietly "$RELEASE_VENV/bin/python" -m build --outdir dist .
    local sdist=dist/kvpfs-$version.tar.gz whl=dist/kvpfs-$version-py3-none-any.whl
    "$RELEASE_VENV/bin/twine" check --strict "$sdist" "$whl"
    # The license travels with both; the metadata names it.
    "$RELEASE_VENV/bin/python" - "$sdist" "$whl" "$version" <<'EOF'
import sys, tarfile, zipfile
sdist, whl, version = sys.argv[1:]
with zipfile.ZipFile(whl) as wheel:
    names = wheel.namelist()
    metadata = wheel.read(f"kvpfs-{version}.dist-info/METADATA").decode()
assert f"kvpfs-{version}.dist-info/licenses/LICENSE" in names, names
assert "License-File: LICENSE" in metadata.splitlines(), metadata[:2000]
assert f"Version: {version}" in metadata.splitlines()
assert not [n for n in names if n.startswith("tests/")], "tests in the wheel"
with tarfile.open(sdist) as tar:
    assert f"kvpfs-{version}/LICENSE" in tar.getnames()
print(f"dev.sh: {whl}: {len(names)} files, LICENSE in the wheel and the sdist")
EOF
    local minor python dir
    for minor in "${WHEEL_PYTHONS[@]}"; do
        python=$(pyenv_python "$minor")
        if [ -z "$python" ]; then
            python_missing "pip install of the wheel on Python $minor" "$minor"
            continue
        fi
        dir=$(mktemp -d)
        on_exit "rm -rf '$dir'"
        echo "dev.sh: a fresh venv on Python $("$python" -c 'import platform; print(platform.python_version())'): pip install $whl"
        "$python" -m venv "$dir/venv"
        quietly "$dir/venv/bin/python" -m pip install "$whl"
        "$dir/venv/bin/kvpfs" --version | grep -qx "kvpfs $version" ||
            { echo "dev.sh: kvpfs --version is not kvpfs $version" >&2; return 1; }
        # (a console script's sys.path starts at its venv: not this checkout's kvpfs/)
        walkthrough "$dir/venv/bin:$SYSTEM_PATH" "$dir"
        rm -rf "$dir"
        echo "dev.sh: the wheel installs and runs the walk-through on Python $minor"
    done
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

# The library sets of the other releases kvpfs supports, at the versions each ships
# (docs/packaging.md, "Which versions, and where they come from"), installed from PyPI
# on pyenv's interpreter of the same Python minor version. Debian 12's set is tested
# on Debian's own packages (test-debian-libs), the newest releases by `test`.
#                 Python trio         pyfuse3        outcome        attrs
LIB_SET_debian13=(3.13 trio==0.29.0 pyfuse3==3.4.0 outcome==1.2.0 attrs==25.3.0
                  idna==3.10 sniffio==1.3.1 sortedcontainers==2.4.0)
LIB_SET_ubuntu2404=(3.12 trio==0.24.0 pyfuse3==3.3.0 outcome==1.2.0 attrs==23.2.0
                    idna==3.6 sniffio==1.3.0 sortedcontainers==2.4.0)
# What CI runs on these two sets. The whole suite takes 5-6 minutes a set on this
# 2-core machine, and four whole runs beside the package stages would leave too little
# of .ci/run's 30 minutes as the suite grows. So the whole suite runs on the newest
# releases and on Debian 12's, the two ends of what kvpfs/compat.py bridges; on the
# sets in between, these directories cover every place where the libraries' versions
# show: the codec and compat (bytes), the store, its worker threads and the device
# server (store), the pyfuse3 handlers called directly (operations), and real FUSE
# mounts with /.events, inotify and permissions (mount). Left out: tests/process
# (lifecycle, crash, systemd, network namespaces), which drive the same code through
# subprocesses. `./dev.sh test-debian13-libs tests` runs the whole suite on a set.
LIB_SET_TESTS=(tests/bytes tests/store tests/operations tests/mount)

# The newest pyenv interpreter of Python $1 (3.13: ~/.pyenv/versions/3.13.N), or nothing.
pyenv_python() {
    local minor=$1 dir
    dir=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}/versions/$minor".* 2>/dev/null |
          grep -E "/$minor\.[0-9]+\$" | sort -V | tail -1 || true)
    if [ -n "$dir" ] && [ -x "$dir/bin/python$minor" ]; then
        echo "$dir/bin/python$minor"
    fi
}

# Python $2 is missing for what $1 needs: say so, and fail under CI=true.
python_missing() {
    echo "dev.sh: no Python $2 under ${PYENV_ROOT:-$HOME/.pyenv}/versions: $1 cannot run" >&2
    if [ "${CI:-}" = true ]; then
        echo "dev.sh: failed: under CI=true every Python it names must be there" >&2
        return 1
    fi
    echo "dev.sh: $1 left out (a failure under CI=true)" >&2
}

# Check that the venv's python ($1) has exactly the pins "${@:2}", and say what it runs.
check_lib_set() {
    "$1" - "${@:2}" <<'EOF'
import importlib.metadata as m, sys
pins = dict(pin.split("==") for pin in sys.argv[1:])
wrong = [f"{name}=={want} (found {m.version(name)})" for name, want in pins.items()
         if m.version(name) != want]
if wrong:
    sys.exit(f"dev.sh: not the library set asked for: {', '.join(wrong)}")
import pyfuse3, trio
print(f"dev.sh: on Python {sys.version.split()[0]}, trio {trio.__version__},"
      f" pyfuse3 {pyfuse3.__version__}, outcome {m.version('outcome')}")
EOF
}

# The tests (by default LIB_SET_TESTS) on library set $1, in .venv-$1.
test_lib_set() {
    local name=$1
    shift
    local -n lib_set="LIB_SET_$name"
    local minor=${lib_set[0]} pins=("${lib_set[@]:1}") python venv=$PWD/.venv-$name
    need_debs "${TEST_DEBS[@]}"  # libfuse3-dev and pkg-config: pyfuse3 is built here
    python=$(pyenv_python "$minor")
    if [ -z "$python" ]; then
        python_missing "the $name library set" "$minor"
        return
    fi
    if [ ! -x "$venv/bin/python" ]; then
        "$python" -m venv "$venv"
    fi
    local stamp
    stamp=$(install_stamp "$venv/bin/python" "${pins[*]}")
    if [ "$(cat "$venv/.kvpfs-installed" 2>/dev/null)" != "$stamp" ]; then
        echo "dev.sh: installing kvpfs and the test tools on ${pins[*]} into $venv"
        printf '%s\n' "${pins[@]}" >"$venv/constraints.txt"
        quietly "$venv/bin/python" -m pip install --upgrade pip
        quietly "$venv/bin/python" -m pip install -c "$venv/constraints.txt" -e ".[test]"
        echo "$stamp" >"$venv/.kvpfs-installed"
    fi
    check_lib_set "$venv/bin/python" "${pins[@]}"
    local deselect=()
    if ! "$venv/bin/python" -c 'import sys, kvpfs.compat as c; sys.exit(not c.fuse_can_poll())'
    then
        echo "dev.sh: this pyfuse3 cannot poll FUSE files (3.5 can): the tests marked" \
             "fuse_poll are left out"
        deselect=(-m "not fuse_poll")
    fi
    # Tests named on the command line replace LIB_SET_TESTS; options add to them.
    local arg named=()
    for arg in "$@"; do
        [ ! -e "${arg%%::*}" ] || named+=("$arg")
    done
    [ ${#named[@]} -gt 0 ] || set -- "$@" "${LIB_SET_TESTS[@]}"
    "$venv/bin/python" -m pytest "${deselect[@]}" "$@"
}

# Every stage, timed; a summary of the times at the end. `./dev.sh test` (README's
# command) is the first.
ci() {
    local stage start times=() total_start=$SECONDS
    for stage in "test" deb check-depends smoke-deb wheel test-debian-libs \
                 test-debian13-libs test-ubuntu2404-libs; do
        start=$SECONDS
        echo "=== dev.sh $stage"
        "./dev.sh" "$stage"
        echo "=== dev.sh $stage: passed in $((SECONDS - start)) s"
        times+=("$(printf '%-22s %5d s' "$stage" $((SECONDS - start)))")
    done
    echo "=== dev.sh ci: every stage passed in $((SECONDS - total_start)) s"
    printf '    %s\n' "${times[@]}"
}

command=${1:-}
[ $# -gt 0 ] && shift
case "$command" in
    setup) setup ;;
    demo) demo ;;
    test) test_pypi "$@" ;;
    deb) deb ;;
    check-depends) check_depends ;;
    smoke-deb) smoke_deb "$@" ;;
    wheel) wheel ;;
    test-debian-libs) test_debian_libs "$@" ;;
    test-debian13-libs) test_lib_set debian13 "$@" ;;
    test-ubuntu2404-libs) test_lib_set ubuntu2404 "$@" ;;
    ci) ci ;;
    *)
        echo "usage: $0 demo|test|setup|deb|check-depends|smoke-deb|wheel|test-debian-libs|test-debian13-libs|test-ubuntu2404-libs|ci" >&2
        exit 2 ;;
esac
