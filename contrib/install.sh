#!/usr/bin/env bash
# Install kvpfs as the system's KVP daemon, in place of hv_kvp_daemon, without the
# Debian package (./dev.sh deb builds it; it does all this and more). As root:
#
#   contrib/install.sh                 venv in /opt/kvpfs from this checkout, then install
#   contrib/install.sh --kvpfs PATH    use an existing kvpfs executable instead
#   contrib/install.sh --root DIR      only write the files below DIR (packaging, tests)
#   contrib/install.sh --uninstall     remove what an install added, unmask hv-kvp-daemon
#
# What it installs:
#   /usr/local/bin/kvpfs          -> the venv's kvpfs (the unit's ExecStart, and what
#                                    mount.fuse3 finds in mount(8)'s PATH for fuse.kvpfs)
#   /sbin/mount.kvpfs             -> the venv's mount.kvpfs (for `mount -t kvpfs`)
#   /etc/systemd/system/kvpfs.service
#   /etc/udev/rules.d/60-kvpfs.rules
#   /etc/default/kvpfs            (only if missing: settings, all commented out)
# Then, on a running systemd: masks the other KVP daemons' units (the device
# serves one daemon; 60-hyperv-daemons.rules would still start hv-kvp-daemon),
# reloads systemd and udev, and starts kvpfs if /dev/vmbus/hv_kvp exists.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
checkout=$(dirname "$here")
root=""
venv=/opt/kvpfs
kvpfs_bin=""
action=install
other_daemons=(hv-kvp-daemon.service hyperv-daemons.hv-kvp-daemon.service
               hypervkvpd.service hv_kvp_daemon.service)

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --root) root=${2:?--root needs a directory}; shift 2 ;;
        --venv) venv=${2:?--venv needs a directory}; shift 2 ;;
        --kvpfs) kvpfs_bin=${2:?--kvpfs needs a path}; shift 2 ;;
        --uninstall) action=uninstall; shift ;;
        -h|--help) usage 0 ;;
        *) echo "install.sh: unknown argument $1" >&2; usage ;;
    esac
done

live=true  # act on the running system (systemctl, udevadm)?
if [ -n "$root" ]; then
    live=false
    root=$(cd "$root" && pwd)
fi
if $live && [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root (or with --root DIR)" >&2
    exit 1
fi
systemd_running() { $live && [ -d /run/systemd/system ]; }

if [ "$action" = uninstall ]; then
    if systemd_running; then
        systemctl disable --now kvpfs.service >/dev/null 2>&1 || true
    fi
    rm -f "$root/usr/local/bin/kvpfs" "$root/sbin/mount.kvpfs" \
          "$root/etc/systemd/system/kvpfs.service" \
          "$root/etc/systemd/system/multi-user.target.wants/kvpfs.service" \
          "$root/etc/udev/rules.d/60-kvpfs.rules"
    if systemd_running; then
        systemctl unmask "${other_daemons[@]}" >/dev/null 2>&1 || true
        systemctl daemon-reload
        udevadm control --reload 2>/dev/null || true
        echo "install.sh: kvpfs removed; start the previous daemon with:" \
             "systemctl start hv-kvp-daemon.service"
    fi
    echo "install.sh: left in place: $root/etc/default/kvpfs$([ -d "$venv" ] && echo " and $venv")"
    exit 0
fi

if $live && dpkg-query -W -f='${Status}' kvpfs 2>/dev/null | grep -q "ok installed"; then
    echo "install.sh: the kvpfs Debian package is installed and already is the KVP daemon;" \
         "remove it first (apt remove kvpfs) to install from a checkout" >&2
    exit 1
fi
if $live && ! command -v fusermount3 >/dev/null; then
    echo "install.sh: fusermount3 is missing: apt-get install fuse3" >&2
    exit 1
fi
if [ -z "$kvpfs_bin" ]; then
    # Building pyfuse3 needs what ./dev.sh setup installs: python3-venv libfuse3-dev pkg-config.
    echo "install.sh: installing kvpfs from $checkout into the venv $venv"
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q "$checkout"
    kvpfs_bin=$venv/bin/kvpfs
fi
[ -x "$kvpfs_bin" ] || { echo "install.sh: $kvpfs_bin is not an executable" >&2; exit 1; }
kvpfs_bin=$(cd "$(dirname "$kvpfs_bin")" && pwd)/$(basename "$kvpfs_bin")
helper_bin=$(dirname "$kvpfs_bin")/mount.kvpfs

install -d "$root/usr/local/bin" "$root/sbin" "$root/etc/systemd/system" \
           "$root/etc/udev/rules.d" "$root/etc/default"
ln -sfn "$kvpfs_bin" "$root/usr/local/bin/kvpfs"
if [ -x "$helper_bin" ]; then
    ln -sfn "$helper_bin" "$root/sbin/mount.kvpfs"
fi
install -m 0644 "$here/kvpfs.service" "$root/etc/systemd/system/kvpfs.service"
install -m 0644 "$here/60-kvpfs.rules" "$root/etc/udev/rules.d/60-kvpfs.rules"
if [ ! -e "$root/etc/default/kvpfs" ]; then
    install -m 0644 "$here/kvpfs.default" "$root/etc/default/kvpfs"
fi
echo "install.sh: installed the unit, the udev rule and $root/usr/local/bin/kvpfs -> $kvpfs_bin"

if ! systemd_running; then
    $live && echo "install.sh: systemd is not running: nothing started"
    exit 0
fi
# Masking keeps 60-hyperv-daemons.rules from starting hv-kvp-daemon beside us;
# stop whichever runs now so that kvpfs can open the device.
systemctl mask "${other_daemons[@]}" >/dev/null 2>&1  # "does not exist, proceeding anyway"
systemctl stop "${other_daemons[@]}" >/dev/null 2>&1 || true
systemctl daemon-reload
udevadm control --reload 2>/dev/null || true
systemctl enable kvpfs.service 2>/dev/null
if [ -e /dev/vmbus/hv_kvp ]; then
    systemctl restart kvpfs.service
    echo "install.sh: kvpfs.service started; try: ls /run/kvp (or your KVPFS_MOUNTPOINT)"
else
    echo "install.sh: /dev/vmbus/hv_kvp does not exist (not a Hyper-V guest?): kvpfs will" \
         "start when it appears"
fi
