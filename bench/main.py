"""kvpfs benchmark: host transactions, filesystem operations, end to end, memory, start-up.

Everything is measured in one run on this machine: kvpfs and Debian's
hv_kvp_daemon on the same emulated /dev/vmbus/hv_kvp (emulation/), kvpfs's
filesystem beside tmpfs and a minimal pyfuse3 filesystem (bench/floorfs.py).
It prints Markdown tables and one PASS/MISS line per target of the
performance issue. Needs root, /dev/fuse and hyperv-daemons (./dev.sh installs
them). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from bench import common, fsbench, hostbench, inprocess, startbench
from bench.common import (
    Stat,
    Table,
    fmt_mb,
    fmt_rate,
    fmt_ratio,
    fmt_stat,
    fmt_time,
    ratio,
)
from bench.fsbench import FLOOR, KVPFS, TMPFS, FsConfig, FsResult
from bench.hostbench import REFERENCE, HostConfig, HostResult
from bench.startbench import StartResult
from emulation.kvphost import run_emulated_device
from emulation.refdaemon import REFERENCE_DAEMON

SECTIONS = ("host", "fs", "start")
FLAT_LIMIT = 1.5
ENUM_SPEEDUP = 20.0
SMALL_POOL_LIMIT = 1.5
FLOOR_LIMIT = 1.5
LS_LIMIT = 0.100
RSS_LIMIT = 60 * 2**20
READY_LIMIT = 1.0
SMALL, LARGE = 10, 5000


def _sizes(text: str) -> list[int]:
    try:
        return [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"sizes are comma-separated integers: {text!r}") from None


def _cpus(text: str) -> set[int] | None:
    if text == "all":
        return None
    try:
        cpus = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        raise SystemExit(f"--cpus takes CPU numbers like 0 or 0,1, or 'all': {text!r}") from None
    if not cpus <= os.sched_getaffinity(0):
        raise SystemExit(f"--cpus {text}: this process may run on CPUs "
                         f"{sorted(os.sched_getaffinity(0))} only")
    return cpus


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__.split("\n\n")[0],
        epilog="Prints Markdown tables on stdout, progress on stderr. Exit status 0 when every"
               " target that was measured is met, 1 when one is missed.",
    )
    parser.add_argument("--sizes", type=_sizes, default=None,
                        help="pool sizes measured for both daemons (default 10,1000,5000;"
                             " --quick: 10,1000)")
    parser.add_argument("--kvpfs-sizes", type=_sizes, default=None,
                        help="further sizes for kvpfs alone (default 10000; --quick: none)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="repeats per measurement (default 5; --quick: 2)")
    parser.add_argument("--pass-repeat", type=int, default=None,
                        help="full ENUMERATE passes per daemon and size, each thousands of"
                             " requests long (default 3; --quick: 1)")
    parser.add_argument("--batch", type=int, default=None,
                        help="host requests per timed batch (default 20; --quick: 10)")
    parser.add_argument("--fs-seconds", type=float, default=None,
                        help="seconds per timed filesystem batch (default 0.15; --quick: 0.05)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"which sections to run (default all: {','.join(SECTIONS)})")
    parser.add_argument("--cpus", default="0",
                        help="CPUs the benchmark and everything it starts (daemons, emulator,"
                             " filesystems) run on, e.g. 0 or 0,1, or 'all' (default 0: on this"
                             " VM, unpinned runs are bimodal, because waking a process on the"
                             " other vCPU costs 50-100 µs and the scheduler places it at random)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and few repeats: a smoke run of well under a minute")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="sample kvpfs with py-spy during the host and filesystem sections"
                             " and write collapsed stacks and summaries to DIR (timings are"
                             " then not comparable)")
    parser.add_argument("--kvpfs-src", type=Path, metavar="DIR",
                        help="run the kvpfs package found in DIR (another checkout or a"
                             " patched copy) instead of this checkout's, to compare changes")
    parser.add_argument("--workdir", type=Path,
                        help="where pools and mounts go (default: a new directory in /tmp,"
                             " removed at the end)")
    return parser


@dataclass
class Options:
    sizes: list[int]
    kvpfs_sizes: list[int]
    repeat: int
    pass_repeat: int
    batch: int
    fs_seconds: float
    sections: list[str]
    profile: Path | None
    workdir: Path | None
    kvpfs_src: Path | None
    cpus: set[int] | None

    @property
    def all_sizes(self) -> list[int]:
        return sorted(set(self.sizes) | set(self.kvpfs_sizes))


def resolve(args: argparse.Namespace) -> Options:
    quick = args.quick
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")

    def pick(value, default, quick_default):
        return value if value is not None else (quick_default if quick else default)

    options = Options(
        sizes=pick(args.sizes, [10, 1000, 5000], [10, 1000]),
        kvpfs_sizes=pick(args.kvpfs_sizes, [10000], []),
        repeat=pick(args.repeat, 5, 2),
        pass_repeat=pick(args.pass_repeat, 3, 1),
        batch=pick(args.batch, 20, 10),
        fs_seconds=pick(args.fs_seconds, 0.15, 0.05),
        sections=sections,
        profile=args.profile,
        workdir=args.workdir,
        kvpfs_src=args.kvpfs_src.resolve() if args.kvpfs_src else None,
        cpus=_cpus(args.cpus),
    )
    if options.kvpfs_src and not (options.kvpfs_src / "kvpfs" / "__init__.py").exists():
        raise SystemExit(f"--kvpfs-src {options.kvpfs_src}: no kvpfs package there")
    if min(options.repeat, options.pass_repeat, options.batch) < 1 or not options.all_sizes:
        raise SystemExit("repeats and --batch must be at least 1, and a size is needed")
    if min(options.all_sizes) < 4:
        raise SystemExit("pool sizes must be at least 4")
    return options


# ---------------------------------------------------------------------- results


@dataclass
class Results:
    floor: dict[int, tuple[Stat, Stat]] = field(default_factory=dict)  # size -> wall, CPU
    host: dict[tuple[str, int], HostResult] = field(default_factory=dict)
    inprocess: dict[int, dict[str, Stat]] = field(default_factory=dict)
    fs: dict[int, FsResult] = field(default_factory=dict)
    start: dict[int, StartResult] = field(default_factory=dict)


def run_all(options: Options, workdir: Path, results: Results) -> None:
    host_config = HostConfig(
        repeat=options.repeat, pass_repeat=min(options.pass_repeat, options.repeat),
        batch=options.batch, first_batch=max(2, options.batch // 4),
        intrinsic_passes=3, e2e_samples=max(3, options.batch // 4),
        profile_dir=options.profile,
    )
    fs_config = FsConfig(repeat=options.repeat, batch_seconds=options.fs_seconds,
                         profile_dir=options.profile)
    if "host" in options.sections:
        for size in options.all_sizes:
            both = size in options.sizes
            progress(f"host: {'hv_kvp_daemon and ' if both else ''}kvpfs, {size:,} records")
            by_daemon, results.floor[size] = hostbench.run_host(
                size, workdir, host_config, reference=both)
            for daemon, result in by_daemon.items():
                results.host[(daemon, size)] = result
            if options.kvpfs_src is None:  # in process, this checkout's kvpfs runs
                progress(f"host: kvpfs in process (no device), {size:,} records")
                results.inprocess[size] = inprocess.run_inprocess(size, workdir, host_config)
    if not {"fs", "start"} & set(options.sections):
        return
    with run_emulated_device(workdir / "emulator", host_timeout=300.0) as (device, _host):
        if "fs" in options.sections:
            for size in options.all_sizes:
                progress(f"filesystem: {size:,} files")
                results.fs[size] = fsbench.run_fs(device, size, workdir, fs_config)
        if "start" in options.sections:
            for size in options.all_sizes:
                progress(f"start-up and memory: {size:,} records per pool")
                results.start[size] = startbench.run_start(device, size, workdir, options.repeat)


def progress(text: str) -> None:
    print(f"# {time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- tables


def host_tables(options: Options, results: Results) -> list[Table]:
    if not results.host:
        return []
    per_request = Table(
        "Host requests through the emulated /dev/vmbus/hv_kvp (time per request)",
        ["records", "request", "kvpfs", "kvpfs req/s", "kvpfs CPU", "kvpfs in-process",
         "hv_kvp_daemon", "hv req/s", "hv CPU", "speed-up"],
        [
            f"kvpfs and hv_kvp_daemon run on two instances of the emulated device and take "
            f"turns every {hostbench.ROUND} requests. Each request is timed alone; a repeat "
            "gives the median of its batch (pool 0 ENUMERATE: of the pass's requests; pool 2: "
            "the median of 3 passes' means), the table the median over repeats ±half their "
            "range. CPU: the daemon's own CPU time (all threads) per request, mean over the "
            "batch. speed-up: hv_kvp_daemon time ÷ kvpfs time. kvpfs in-process: "
            "`DeviceServer.answer` alone on the same pools, no device (kvpfs's own work; SET "
            "and DELETE include their worker-thread hop).",
            "Emulation floor (bench/nulldaemon.py, a Python daemon that answers at once, "
            "measured before each size's kvpfs) per request, and its CPU time (device I/O "
            "through the emulator's FUSE file); every figure above includes it: "
            + "; ".join(f"{size:,}: {fmt_stat(wall)}, CPU {fmt_time(cpu.median)}"
                        for size, (wall, cpu) in sorted(results.floor.items())) + ".",
        ],
    )
    passes = Table(
        "Full ENUMERATE pass of pool 0 (what the host does to read a pool)",
        ["records", "kvpfs", "hv_kvp_daemon", "speed-up (wall)", "speed-up (daemon CPU)",
         "emulation floor x (N+1)"],
        [f"A pass is ENUMERATE of index 0, 1, ... until the daemon answers HV_S_CONT (N+1 "
         f"requests); where N+1 < {hostbench.PASS_REQUESTS} a repeat makes several passes "
         "and counts their median."],
        text_columns=1,
    )
    e2e = Table(
        "End to end",
        ["records", "path", "kvpfs", "hv_kvp_daemon + tool writing the pool file"],
        ["guest write: kvpfs `echo v > guest/KEY` (open, write, close); beside hv_kvp_daemon "
         "a program writing the record in .kvp_pool_1 under its locks. The host then "
         "ENUMERATEs the key's index until it sees the value. host SET (pool 3): then read "
         "until the new value is returned (kvpfs `cat auto_external/KEY`, else the pool file)."],
    )
    for size in options.all_sizes:
        kv = results.host.get((hostbench.KVPFS, size))
        ref = results.host.get((REFERENCE, size))
        if kv is None:
            continue
        own = results.inprocess.get(size, {})
        for op, label in hostbench.OPS:
            k, r = kv.ops.get(op), ref.ops.get(op) if ref else None
            per_request.add(
                f"{size:,}", label, fmt_stat(k), fmt_rate(k), fmt_time(kv.cpu[op].median),
                fmt_stat(own.get(op)), fmt_stat(r), fmt_rate(r),
                fmt_time(ref.cpu[op].median) if ref else "-", fmt_ratio(ratio(r, k)),
            )
        passes.add(
            f"{size:,}", fmt_stat(kv.enumerate_pass),
            fmt_stat(ref.enumerate_pass) if ref else "-",
            fmt_ratio(ratio(ref.enumerate_pass, kv.enumerate_pass)) if ref else "-",
            fmt_ratio(ratio(ref.cpu["enumerate"], kv.cpu["enumerate"])) if ref else "-",
            fmt_time(results.floor[size][0].median * (size + 1)) if size in results.floor
            else "-",
        )
        for op, label in hostbench.E2E:
            e2e.add(f"{size:,}", label, fmt_stat(kv.e2e[op]),
                    fmt_stat(ref.e2e[op]) if ref else "-")
    return [per_request, passes, e2e]


def fs_table(options: Options, results: Results) -> list[Table]:
    if not results.fs:
        return []
    table = Table(
        "Filesystem operations (time per operation)",
        ["files", "operation", "tmpfs", "pyfuse3 floor", "kvpfs", "kvpfs ÷ floor",
         "kvpfs ÷ tmpfs"],
        [
            "Each operation is timed alone; a repeat gives the median of its batch, the table "
            "the median over repeats ±half their range.",
            "kvpfs: `guest` directory of a pool with that many records; entry and attribute "
            "timeouts 1 s, the page cache kept across opens while a value is unchanged, flush "
            "commits writes.",
            "pyfuse3 floor (bench/floorfs.py): one process serving fixed 64-byte files, entry "
            "and attribute timeouts 1 s, keep_cache=True, no flush (the kernel stops sending "
            "FLUSH after the first ENOSYS), writes discarded.",
            "expired entry: files whose 1 s entry/attribute timeouts ran out (the benchmark "
            "waits 1.1 s), so the kernel must LOOKUP the name again; tmpfs has no timeouts.",
        ],
    )
    for size in options.all_sizes:
        result = results.fs.get(size)
        if result is None:
            continue
        for op, label in fsbench.OPS:
            t, f, k = (result.ops[name][op] for name in (TMPFS, FLOOR, KVPFS))
            table.add(f"{size:,}", label, fmt_stat(t), fmt_stat(f), fmt_stat(k),
                      fmt_ratio(ratio(k, f)), fmt_ratio(ratio(k, t)))
    return [table]


def start_table(options: Options, results: Results) -> list[Table]:
    if not results.start:
        return []
    table = Table(
        "Start-up and memory of kvpfs (N records in each of pools 0, 1 and 3)",
        ["records per pool", "start → ready mount", "RSS at ready", "RSS after ls -l of 3 pools",
         "peak RSS", "hv_kvp_daemon RSS"],
        ["start: spawning `kvpfs mount` (interpreter and imports included) to READY=1, "
         "sent once pools are loaded, the device registered and the mount up. "
         "hv_kvp_daemon RSS: after its host section (it keeps every record in memory)."],
        text_columns=1,
    )
    for size in options.all_sizes:
        result = results.start.get(size)
        if result is None:
            continue
        ref = results.host.get((REFERENCE, size))
        table.add(f"{size:,}", fmt_stat(result.ready), fmt_mb(result.rss_ready.median),
                  fmt_mb(result.rss_used.median), fmt_mb(result.hwm),
                  fmt_mb(ref.rss) if ref else "-")
    return [table]


# ---------------------------------------------------------------------- targets


@dataclass
class Verdict:
    ok: bool | None  # None: not measured in this run
    text: str

    def render(self) -> str:
        word = {True: "PASS", False: "MISS", None: "SKIP"}[self.ok]
        return f"{word}  {self.text}"


def check_targets(results: Results) -> list[Verdict]:
    verdicts: list[Verdict] = []
    kv_small = results.host.get((hostbench.KVPFS, SMALL))
    kv_large = results.host.get((hostbench.KVPFS, LARGE))
    ref_small = results.host.get((REFERENCE, SMALL))
    ref_large = results.host.get((REFERENCE, LARGE))
    labels = dict(hostbench.OPS)

    if kv_small and kv_large:
        ratios = {op: ratio(kv_large.ops[op], kv_small.ops[op]) or 0.0
                  for op in hostbench.FLAT_OPS}
        cpu = {op: ratio(kv_large.cpu[op], kv_small.cpu[op]) or 0.0 for op in hostbench.FLAT_OPS}
        worst = max(ratios, key=lambda op: ratios[op])
        detail = ", ".join(f"{labels[op]} {r:.2f}x (CPU {cpu[op]:.2f}x)"
                           for op, r in ratios.items())
        first = ratio(kv_large.ops["delete_first"], kv_small.ops["delete_first"])
        verdicts.append(Verdict(
            ratios[worst] <= FLAT_LIMIT,
            f"host request cost at {LARGE:,} records ≤ {FLAT_LIMIT}x the cost at {SMALL}: "
            f"worst {labels[worst]} {ratios[worst]:.2f}x. All, by wall time (and by kvpfs CPU"
            f" time): {detail}. Not counted: DELETE of the first record, which shifts the "
            f"pool, {fmt_ratio(first)}",
        ))
    else:
        verdicts.append(Verdict(None, f"host cost flat: needs sizes {SMALL} and {LARGE}"))

    if kv_large and ref_large:
        assert kv_large.enumerate_pass and ref_large.enumerate_pass
        wall = ratio(ref_large.enumerate_pass, kv_large.enumerate_pass) or 0.0
        cpu = ratio(ref_large.cpu["enumerate"], kv_large.cpu["enumerate"]) or 0.0
        floor = results.floor[LARGE][0].median * (LARGE + 1) if LARGE in results.floor else 0.0
        verdicts.append(Verdict(
            wall >= ENUM_SPEEDUP,
            f"full ENUMERATE of {LARGE:,} records ≥ {ENUM_SPEEDUP:.0f}x faster than "
            f"hv_kvp_daemon: {wall:.1f}x ({fmt_time(kv_large.enumerate_pass.median)} vs "
            f"{fmt_time(ref_large.enumerate_pass.median)}; the emulation alone costs "
            f"{fmt_time(floor)} of each pass; by daemon CPU time {cpu:.1f}x)",
        ))
    else:
        verdicts.append(Verdict(None, f"ENUMERATE speed-up: needs size {LARGE} for both"))

    if kv_small and ref_small:
        ratios = {op: ratio(kv_small.ops[op], ref_small.ops[op]) or 0.0
                  for op, _ in hostbench.OPS}
        worst = max(ratios, key=lambda op: ratios[op])
        detail = ", ".join(f"{labels[op]} {r:.2f}x" for op, r in ratios.items())
        verdicts.append(Verdict(
            ratios[worst] <= SMALL_POOL_LIMIT,
            f"single requests at {SMALL} records ≤ {SMALL_POOL_LIMIT}x hv_kvp_daemon's time: "
            f"worst {labels[worst]} {ratios[worst]:.2f}x (kvpfs ÷ hv_kvp_daemon: {detail})",
        ))
    else:
        verdicts.append(Verdict(None, f"small-pool requests: needs size {SMALL} for both"))

    if results.fs:
        fs_labels = dict(fsbench.OPS)
        worst_overall = 0.0
        parts = []
        for size, result in sorted(results.fs.items()):
            ratios = {op: ratio(result.ops[KVPFS][op], result.ops[FLOOR][op]) or 0.0
                      for op in ("stat_cached", "stat_expired", "read", "read_expired")}
            worst = max(ratios, key=lambda op: ratios[op])
            worst_overall = max(worst_overall, ratios[worst])
            parts.append(f"{size:,}: {fs_labels[worst]} {ratios[worst]:.2f}x")
        verdicts.append(Verdict(
            worst_overall <= FLOOR_LIMIT,
            f"stat and open+read+close ≤ {FLOOR_LIMIT}x the pyfuse3 floor at every size "
            f"(worst per size: {'; '.join(parts)})",
        ))
        ls = results.fs.get(LARGE)
        if ls:
            t = ls.ops[KVPFS]["ls"]
            verdicts.append(Verdict(t.median < LS_LIMIT,
                                    f"ls of {LARGE:,} keys < {LS_LIMIT * 1e3:.0f} ms: "
                                    f"{fmt_stat(t)}"))
        else:
            verdicts.append(Verdict(None, f"ls of {LARGE:,} keys: needs size {LARGE}"))
    else:
        verdicts.append(Verdict(None, "filesystem vs floor: fs section not run"))

    if results.start:
        big = results.start.get(LARGE)
        if big:
            verdicts.append(Verdict(
                big.hwm < RSS_LIMIT,
                f"resident memory < {fmt_mb(RSS_LIMIT)} with {LARGE:,} records in pools 0, 1 "
                f"and 3: peak {fmt_mb(big.hwm)} (at ready {fmt_mb(big.rss_ready.median)}, "
                f"after listing every file {fmt_mb(big.rss_used.median)})",
            ))
        else:
            verdicts.append(Verdict(None, f"memory: needs size {LARGE}"))
        slowest = max(results.start.values(), key=lambda r: r.ready.median)
        each = ", ".join(f"{r.size:,}: {fmt_time(r.ready.median)}"
                         for r in sorted(results.start.values(), key=lambda r: r.size))
        verdicts.append(Verdict(
            slowest.ready.median <= READY_LIMIT,
            f"ready mount ≤ {READY_LIMIT:.0f} s after start at every size ({each})",
        ))
    else:
        verdicts.append(Verdict(None, "memory and start-up: start section not run"))
    return verdicts


# ---------------------------------------------------------------------- main


def describe_machine(options: Options) -> list[str]:
    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "?"

    dpkg = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "hyperv-daemons"],
                          capture_output=True, text=True, check=False)
    load = os.getloadavg()
    return [
        f"kvpfs {version('kvpfs')} benchmark, {time.strftime('%Y-%m-%d %H:%M')}",
        f"Linux {platform.release()}, {os.cpu_count()} CPUs, Python {platform.python_version()},"
        f" pyfuse3 {version('pyfuse3')}, trio {version('trio')}, hv_kvp_daemon from "
        f"hyperv-daemons {dpkg.stdout.strip() or '?'}; load average at start "
        f"{load[0]:.2f}",
        f"sizes {','.join(map(str, options.sizes))} (both daemons)"
        + (f" + {','.join(map(str, options.kvpfs_sizes))} (kvpfs alone)"
           if options.kvpfs_sizes else "")
        + f", {options.repeat} repeats ({options.pass_repeat} full ENUMERATE passes), "
        f"host batches of {options.batch} requests, "
        f"filesystem batches of {options.fs_seconds:g} s, "
        + ("unpinned" if options.cpus is None
           else f"everything on CPU {','.join(map(str, sorted(options.cpus)))}")
        + (f"; kvpfs from {options.kvpfs_src}" if options.kvpfs_src else ""),
    ]


def preflight() -> None:
    problems = []
    if os.geteuid() != 0:
        problems.append("run as root (FUSE mounts, namespaces, drop_caches)")
    if not os.path.exists("/dev/fuse"):
        problems.append("/dev/fuse is missing")
    if shutil.which("fusermount3") is None:
        problems.append("fusermount3 is missing (apt-get install fuse3)")
    if not os.access(REFERENCE_DAEMON, os.X_OK):
        problems.append(f"{REFERENCE_DAEMON} is missing (apt-get install hyperv-daemons)")
    if problems:
        raise SystemExit("bench/run.py: " + "; ".join(problems))


def main(argv: Sequence[str] | None = None) -> int:
    options = resolve(build_parser().parse_args(argv))
    preflight()
    if options.cpus is not None:
        os.sched_setaffinity(0, options.cpus)  # inherited by every process started from here
    if options.kvpfs_src:
        common.KVPFS_SOURCE = options.kvpfs_src
    header = describe_machine(options)
    results = Results()
    started = time.perf_counter()
    workdir = options.workdir or Path(tempfile.mkdtemp(prefix="kvpfs-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        run_all(options, workdir, results)
    finally:
        if options.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.perf_counter() - started
    header[1] += f", at the end {os.getloadavg()[0]:.2f}"
    out = [*(f"{line}  " for line in header), ""]
    for table in (*host_tables(options, results), *fs_table(options, results),
                  *start_table(options, results)):
        out += [table.render(), ""]
    verdicts = check_targets(results)
    out += ["### Targets", "", "```", *(v.render() for v in verdicts), "```", "",
            f"(run took {elapsed:.0f} s)"]
    print("\n".join(out))
    if options.profile:
        print(f"\npy-spy profiles of kvpfs: {options.profile}/*.summary.txt", file=sys.stderr)
    return 0 if all(v.ok is not False for v in verdicts) else 1
