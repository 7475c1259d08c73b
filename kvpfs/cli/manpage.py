"""Generate the kvpfs(8) man page: `python3 -m kvpfs.cli.manpage > kvpfs.8`.

Every command, argument and option comes from the argparse parsers `--help` uses
(kvpfs.cli.main, kvpfs.cli.mounthelper), so the page cannot drift from them; the prose
around them (the filesystem, limits, files, exit statuses) is SECTIONS below.
The Debian package build runs this (debian/rules), and tests/test_manpage.py
checks that every option of every subcommand is on the page.

SECTIONS is plain text with a few line-start marks:
`# TITLE` a section, `## Title` a subsection, `* term` a tagged paragraph
(the lines under it are its text), four spaces a literal line, a blank line a
new paragraph, `@NAME@` a generated part; `code` in backquotes is set in bold.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator

from kvpfs import __version__
from kvpfs.cli import mounthelper
from kvpfs.cli.parser import build_parser

SECTIONS = """\
# DESCRIPTION
kvpfs replaces the Hyper-V KVP (Data Exchange) daemon `hv_kvp_daemon`: one process answers the
host on `/dev/vmbus/hv_kvp` and mounts a FUSE filesystem in which each KVP pool is a directory
and each key a file. The pool files `/var/lib/hyperv/.kvp_pool_0` to `.kvp_pool_4` stay
byte-compatible, so cloud-init, WALinuxAgent and scripts that read or append to them keep
working beside kvpfs.

`kvpfs mount` is the daemon; `kvpfs host` plays the host's administrator against a kvpfs
running on the built-in simulated host (`--simulate`); `get`, `set`, `rm`, `ls`, `status` and
`dump` work on the pool files directly, whether or not kvpfs runs; `wait` waits for a key.

The package starts kvpfs.service when `/dev/vmbus/hv_kvp` appears (at boot or on hot-add),
mounted on `/run/kvp`, in place of hv-kvp-daemon.service.

# COMMANDS
@COMMANDS@

# MOUNT HELPER
`mount -t fuse.kvpfs SOURCE MOUNTPOINT -o OPTIONS`, or the fstab line
`kvpfs /run/kvp fuse.kvpfs allow_other 0 0`, makes mount.fuse3 run
`kvpfs SOURCE MOUNTPOINT -o OPTIONS`; `mount -t kvpfs` runs `mount.kvpfs` the same way.
Either returns once the filesystem is mounted and keeps serving it in the background, logging
to syslog; `umount` stops it. The source may be `kvpfs`, `none` or the device's path.

@MOUNT_HELPER@

# THE FILESYSTEM
* external (pool 0)
host to guest data (user data, configuration, keys); written by the host; mode 0500/0400, root
only, as it often holds secrets (`--external-readable` lets everyone read it).
* guest (pool 1)
guest to host data; the only writable directory; mode 0755/0644 (0775/0664 with `--guest-group`).
* auto (pool 2)
the guest's intrinsic data as the host sees it (computed); read-only.
* auto_external (pool 3)
the host's identity (HostName, VirtualMachineId, ...); read-only.
* auto_internal (pool 4)
undocumented host data; read-only.

A read returns the value's exact bytes. A write is committed when the file is closed, so the
host never sees half a value; `fsync` commits what was written so far. One trailing newline is
dropped unless kvpfs runs with `--raw`. In guest/, names starting with a dot live only in kvpfs
until renamed to a normal name (editors' temporary files).

Keys may contain anything but NUL. A key maps to a file name by escaping `/`, `%`, control
characters and a leading dot as `%XX` (upper-case hex); a name longer than 255 bytes once escaped
is shortened with `%~` and a hash. The raw key is in the extended attribute `user.kvp.key`, the
pool in `user.kvp.pool`. Host changes appear at once; changes other programs make to the pool
files within a second. `/.events` is a feed of changes (`kvpfs wait` reads it).

# LIMITS AND ERRORS
Checked when a file is written, with nothing stored on failure and a log line naming the limit
(beyond them the kernel would silently cut what the host receives):
* ENAMETOOLONG
a key (file name) longer than 254 UTF-16 units (or 511 bytes).
* EFBIG
a value longer than 1022 UTF-16 units (or 2047 bytes).
* EILSEQ
a value that is not valid UTF-8.
* EINVAL
a NUL byte in a value, or a file name that is not a key's escaped name.
* EACCES
any change outside guest/, even by root.

A pool lock held by another program for longer than `--lock-timeout` makes the host's request
fail at once with HV_E_FAIL, with a log line naming the holder. If the device does not exist kvpfs
says this is not a Hyper-V guest; if it is busy, it names hv_kvp_daemon as the likely holder.

# FILES
* /var/lib/hyperv/.kvp_pool_0 ... .kvp_pool_4
the pool files (2,560-byte records: 512-byte key, 2,048-byte value).
* /var/lib/hyperv/.kvpfs-journal.kvp_pool_N
each pool's redo journal, empty between changes.
* /var/lib/hyperv/.kvpfs-keymeta
mode, owner, mtime and trailing newline of guest keys written through the mount.
* /dev/vmbus/hv_kvp
the KVP device.
* /run/kvp
the service's mount point (KVPFS_MOUNTPOINT).
* /run/kvpfs/
control sockets, one per mount (`kvpfs host` uses them).
* /etc/default/kvpfs
settings of kvpfs.service: KVPFS_MOUNTPOINT, KVPFS_OPTIONS (more `kvpfs mount` options).
* /lib/systemd/system/kvpfs.service
the unit, started by the udev rule /lib/udev/rules.d/60-kvpfs.rules when the device appears.
* /lib/systemd/system/hv-kvp-daemon.service.d/kvpfs.conf
keeps hv-kvp-daemon.service from starting while kvpfs is installed (the device serves one
daemon); removing the package hands the device back to it.

# EXIT STATUS
* 0
success.
* 1
the host answered with a failure status, or the key is missing.
* 2
usage or validation error (bad option, unknown group, value over a limit).
* 3
kvpfs is not reachable or could not start (no device, device busy, mount failed).
* 4
I/O error on a pool file (lock timeout, unreadable file).
* 124
`kvpfs wait --timeout` ran out.
* 130
interrupted (Ctrl-C).

# SEE ALSO
hv_kvp_daemon(8), mount.fuse3(8), fusermount3(1), systemd.service(5)
"""

# Positional arguments that have no help text in the parsers.
POSITIONAL_HELP = {
    "mountpoint": "the directory to mount on",
    "pool": "a pool by number (0-4) or name: external, guest, auto, auto_external,"
            " auto_internal",
    "key": "the key, as the host names it (not escaped)",
    "value": "the value",
    "paths": "the source (kvpfs, none or the device's path) and the mount point",
}


def escape(text: str) -> str:
    """Roff-safe text, `code` in bold; no line may start with a control character."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    text = re.sub(r"`([^`]+)`", r"\\fB\1\\fR", text)
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line
                     for line in text.split("\n"))


Parser = argparse.ArgumentParser


def subcommands(parser: Parser) -> Iterator[tuple[str, str, Parser]]:
    """(name, one-line help, parser) of each direct subcommand, in --help's order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, helps.get(name, ""), sub


def walk(parser: argparse.ArgumentParser, words: tuple[str, ...] = ("kvpfs",),
         summary: str = "") -> Iterator[tuple[tuple[str, ...], str, argparse.ArgumentParser]]:
    """Every parser of the tree with the words that select it, parents first."""
    yield words, summary, parser
    for name, help_text, sub in subcommands(parser):
        yield from walk(sub, (*words, name), help_text)


def documented_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The arguments --help shows, but for -h and the subcommand choice."""
    return [action for action in parser._actions
            if action.help is not argparse.SUPPRESS
            and not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction))]


def _usage(parser: argparse.ArgumentParser) -> str:
    return " ".join(parser.format_usage().removeprefix("usage:").split())


def _short_usage(words: tuple[str, ...], parser: argparse.ArgumentParser) -> str:
    """`kvpfs ls [options] pool` for the synopsis; the full usage is under COMMANDS."""
    formatter = parser._get_formatter()
    positionals = [formatter._format_args(action, action.dest)
                   for action in documented_actions(parser) if not action.option_strings]
    subs = [action for action in parser._actions
            if isinstance(action, argparse._SubParsersAction)]
    if subs:
        positionals.append("{" + ",".join(subs[0].choices) + "} ...")
    return " ".join([*words, "[options]", *positionals])


def _term(action: argparse.Action, formatter: argparse.HelpFormatter) -> str:
    if not action.option_strings:
        return f"\\fI{escape(formatter._metavar_formatter(action, action.dest)(1)[0])}\\fR"
    names = ", ".join(f"\\fB{escape(option)}\\fR" for option in action.option_strings)
    if action.nargs == 0:
        return names
    metavar = formatter._format_args(action, action.dest.upper())
    return f"{names} \\fI{escape(metavar)}\\fR"


def _help(action: argparse.Action, formatter: argparse.HelpFormatter) -> str:
    if action.help:
        return formatter._expand_help(action)
    return POSITIONAL_HELP.get(action.dest, "")


def _sentence(text: str) -> str:
    """--help's fragments ("log every host message") as sentences on the page."""
    if not text:
        return ""
    return text[0].upper() + text[1:] + ("" if text.endswith((".", "!", "?")) else ".")


def command_section(words: tuple[str, ...], summary: str,
                    parser: argparse.ArgumentParser) -> list[str]:
    formatter = parser._get_formatter()
    out = [f'.SS "{escape(" ".join(words))}"']
    if summary:
        out += [escape(_sentence(summary))]
    if parser.description and len(words) > 1:
        out += [".PP", escape(parser.description)]
    out += [".PP", f"\\fB{escape(_usage(parser))}\\fR"]
    for action in documented_actions(parser):
        out += [".TP", _term(action, formatter)]
        text = _help(action, formatter)
        out += [escape(_sentence(text))]
    return [line for line in out if line]


def commands() -> list[str]:
    out: list[str] = []
    for words, summary, parser in walk(build_parser()):
        if len(words) == 1:
            out += [".PP", "Options of \\fBkvpfs\\fR itself:"]
            out += command_section(words, summary, parser)[1:]
            continue
        out += command_section(words, summary, parser)
    return out


def mount_helper() -> list[str]:
    parser = mounthelper.build_helper_parser()
    out = command_section(("mount.kvpfs",), "mount kvpfs the fstab way", parser)
    flags = ", ".join(f"\\fB{escape(name)}\\fR" for name in mounthelper.FLAG_OPTIONS)
    values = ", ".join(f"\\fB{escape(name)}=\\fR\\fI{escape(name.upper())}\\fR"
                       for name in mounthelper.VALUE_OPTIONS)
    out += [".PP", "Mount options (\\fB\\-o\\fR):", ".TP", f"{flags}, {values}"]
    out += ["the \\fBkvpfs mount\\fR option of that name (\\fBpool_dir=\\fR\\fIDIR\\fR is"
            " \\fB\\-\\-pool\\-dir\\fR \\fIDIR\\fR)."]
    out += [".TP", ", ".join(f"\\fB{escape(name)}\\fR" for name in mounthelper.FUSE_OPTIONS),
            "passed to FUSE."]
    ignored = [*mounthelper.IGNORED_OPTIONS, *(f"{p}*" for p in mounthelper.IGNORED_PREFIXES)]
    out += [".TP", ", ".join(f"\\fB{escape(name)}\\fR" for name in ignored),
            "ignored (kvpfs always mounts nosuid,nodev)."]
    out += [".PP", "Any other option is refused: a misspelt option never mounts silently"
            " without it."]
    return out


def prose(text: str, parts: dict[str, list[str]]) -> list[str]:
    """SECTIONS' light markup to roff."""
    out: list[str] = []
    literal = False
    for line in text.splitlines():
        if line.startswith("    "):
            if not literal:
                out += [".PP", ".RS", ".nf"]
                literal = True
            out.append(escape(line[4:]))
            continue
        if literal:
            out += [".fi", ".RE"]
            literal = False
        if line.startswith("# "):
            out.append(f'.SH "{escape(line[2:])}"')
        elif line.startswith("## "):
            out.append(f'.SS "{escape(line[3:])}"')
        elif line.startswith("* "):
            out += [".TP", f"\\fB{escape(line[2:])}\\fR"]
        elif line.startswith("@") and line.endswith("@"):
            out += parts[line.strip("@")]
        elif not line.strip():
            out.append(".PP")
        else:
            out.append(escape(line))
    if literal:
        out += [".fi", ".RE"]
    # A paragraph mark right after a heading or before another one is noise.
    cleaned: list[str] = []
    for line in out:
        if line == ".PP" and cleaned and cleaned[-1].startswith((".SH", ".SS", ".PP", ".TP")):
            continue
        cleaned.append(line)
    return cleaned


def render() -> str:
    parser = build_parser()
    lines = [
        f'.TH KVPFS 8 "" "kvpfs {escape(__version__)}" "System Administration"',
        ".SH NAME",
        "kvpfs, mount.kvpfs \\- Hyper\\-V KVP (Data Exchange) pools as a filesystem",
        ".SH SYNOPSIS",
    ]
    usages = [_short_usage(("kvpfs", name), sub) for name, _help, sub in subcommands(parser)]
    usages.append(_usage(mounthelper.build_helper_parser()))
    lines += [".ad l", ".nh"]  # command lines: no stretched spaces, no hyphenation
    lines += "\n.br\n".join(f"\\fB{escape(usage)}\\fR" for usage in usages).split("\n")
    lines.append(".hy")
    lines += prose(SECTIONS, {"COMMANDS": commands(), "MOUNT_HELPER": mount_helper()})
    return "\n".join(lines) + "\n"


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
