"""Tests for kvpfs.host.intrinsic: OS information from a fake root, and the bounded FQDN cache."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest
import trio
import trio.testing

from kvpfs.host.intrinsic import KEYS, FqdnCache, Intrinsics, OsInfo, read_os_info, resolve_fqdn


def write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------- os-release


def test_os_release_double_quotes(tmp_path: Path) -> None:
    write(
        tmp_path,
        "etc/os-release",
        'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n'
        'NAME="Debian GNU/Linux"\n'
        'VERSION_ID="12"\n'
        'VERSION="12 (bookworm)"\n'
        "ID=debian\n",
    )
    assert read_os_info(tmp_path) == OsInfo("Debian GNU/Linux", "12", "")


def test_os_release_single_quotes_and_bare_values(tmp_path: Path) -> None:
    write(tmp_path, "etc/os-release", "NAME='Fedora Linux'\nVERSION_ID=40\n")
    assert read_os_info(tmp_path) == OsInfo("Fedora Linux", "40", "")


def test_os_release_backslash_escapes(tmp_path: Path) -> None:
    write(
        tmp_path,
        "etc/os-release",
        '# a comment line\n\nNAME="My \\"Quoted\\" OS \\\\ \\$HOME \\`x\\`"\nVERSION_ID="22.04"\n',
    )
    assert read_os_info(tmp_path) == OsInfo('My "Quoted" OS \\ $HOME `x`', "22.04", "")


def test_os_release_whitespace_and_missing_fields(tmp_path: Path) -> None:
    write(tmp_path, "etc/os-release", '  NAME = "Spaced Linux"  \nID=spaced\n')
    assert read_os_info(tmp_path) == OsInfo("Spaced Linux", "", "")


def test_usr_lib_os_release_is_the_fallback(tmp_path: Path) -> None:
    write(tmp_path, "usr/lib/os-release", 'NAME="From usr/lib"\nVERSION_ID="7"\n')
    write(tmp_path, "etc/redhat-release", "Not used\n")
    assert read_os_info(tmp_path) == OsInfo("From usr/lib", "7", "")


def test_etc_os_release_wins_over_usr_lib(tmp_path: Path) -> None:
    write(tmp_path, "etc/os-release", 'NAME="From etc"\nVERSION_ID="1"\n')
    write(tmp_path, "usr/lib/os-release", 'NAME="From usr/lib"\nVERSION_ID="2"\n')
    assert read_os_info(tmp_path) == OsInfo("From etc", "1", "")


def test_legacy_redhat_release(tmp_path: Path) -> None:
    write(tmp_path, "etc/redhat-release", "CentOS release 6.10 (Final)\n")
    assert read_os_info(tmp_path) == OsInfo("CentOS release 6.10 (Final)", "", "")


def test_legacy_release_lines_two_and_three(tmp_path: Path) -> None:
    write(tmp_path, "etc/redhat-release", "Some Linux\n  7  \n9\nignored\n")
    assert read_os_info(tmp_path) == OsInfo("Some Linux", "7", "9")


def test_legacy_suse_release_comes_first(tmp_path: Path) -> None:
    write(
        tmp_path,
        "etc/SuSE-release",
        "SUSE Linux Enterprise Server 11 (x86_64)\nVERSION = 11\nPATCHLEVEL = 4\n",
    )
    write(tmp_path, "etc/redhat-release", "Red Hat\n")
    assert read_os_info(tmp_path) == OsInfo(
        "SUSE Linux Enterprise Server 11 (x86_64)", "VERSION = 11", "PATCHLEVEL = 4"
    )


def test_no_release_file_uses_uname(tmp_path: Path) -> None:
    assert read_os_info(tmp_path) == OsInfo(os.uname().sysname, "", "")


def test_intrinsics_values_in_order() -> None:
    fqdn = FqdnCache()
    fqdn.value = "vm.example.test"
    intrinsics = Intrinsics(fqdn, os_info=OsInfo("Test OS", "3", "1"))
    intrinsics.integration_version = "3.1"
    items = [intrinsics.value(index) for index in range(len(KEYS))]
    assert [k for k, _ in items] == list(KEYS)
    assert len(items) == 10
    values = dict(items)
    uname = os.uname()
    assert values["FullyQualifiedDomainName"] == "vm.example.test"
    assert values["IntegrationServicesVersion"] == "3.1"
    assert values["OSName"] == "Test OS"
    assert (values["OSMajorVersion"], values["OSMinorVersion"]) == ("3", "1")
    assert values["OSBuildNumber"] == uname.release
    assert values["OSVersion"] == uname.release.split("-", 1)[0]
    assert values["ProcessorArchitecture"] == uname.machine
    assert "127.0.0.1" not in values["NetworkAddressIPv4"].split(";")
    assert "::1" not in values["NetworkAddressIPv6"].split(";")
    assert intrinsics.value(10) is None
    assert intrinsics.value(-1) is None


def test_intrinsics_default_version_before_registration() -> None:
    intrinsics = Intrinsics(FqdnCache(), os_info=OsInfo("x", "", ""))
    assert intrinsics.value(1) == ("IntegrationServicesVersion", "Unknown version")


# --------------------------------------------------------------------------- FQDN cache


async def test_working_resolver_answer_is_used() -> None:
    asked: list[str] = []

    def resolver(hostname: str) -> str:
        asked.append(hostname)
        return "vm-42.example.test"

    cache = FqdnCache(bound=1.0, resolver=resolver)
    assert cache.value == socket.gethostname()  # before the first resolution
    assert await cache.refresh_once() is True
    assert cache.value == "vm-42.example.test"
    assert asked == [socket.gethostname()]


async def test_failing_resolver_falls_back_to_host_name() -> None:
    def resolver(hostname: str) -> str:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    cache = FqdnCache(bound=1.0, resolver=resolver)
    cache.value = "stale.example.test"
    assert await cache.refresh_once() is False
    assert cache.value == socket.gethostname()
    assert "failure" not in cache.value.lower()


async def test_resolver_failure_after_success_reports_host_name() -> None:
    answers = iter(["first.example.test"])

    def resolver(hostname: str) -> str:
        try:
            return next(answers)
        except StopIteration:
            raise OSError("resolver gone") from None

    cache = FqdnCache(bound=1.0, resolver=resolver)
    assert await cache.refresh_once() is True
    assert cache.value == "first.example.test"
    assert await cache.refresh_once() is False
    assert cache.value == socket.gethostname()


async def test_hanging_resolver_is_bounded(mock_clock: trio.testing.MockClock) -> None:
    """The lookup is given up at `bound` on trio's clock, while it still hangs, and its late
    answer is never reported."""
    in_lookup, release, returned = threading.Event(), threading.Event(), threading.Event()

    def resolver(hostname: str) -> str:
        in_lookup.set()
        try:
            release.wait(30)  # a getaddrinfo that hangs
            return "late.example.test"
        finally:
            returned.set()

    cache = FqdnCache(bound=0.2, resolver=resolver)
    results: list[bool] = []

    async def refresh() -> None:
        results.append(await cache.refresh_once())

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(refresh)
            await trio.to_thread.run_sync(in_lookup.wait, 10)
            mock_clock.jump(0.19)
            await trio.testing.wait_all_tasks_blocked()
            assert results == []  # still waiting, short of its bound
            mock_clock.jump(0.02)
        assert results == [False]
        assert not returned.is_set()  # given up while the lookup hung
        assert cache.value == socket.gethostname()
    finally:
        release.set()
    await trio.to_thread.run_sync(returned.wait, 10)  # the late answer exists now
    await trio.testing.wait_all_tasks_blocked()
    assert cache.value == socket.gethostname()


async def test_run_keeps_retrying_until_resolution_works() -> None:
    calls = 0

    def resolver(hostname: str) -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return "resolved.example.test"

    cache = FqdnCache(bound=1.0, retry=0.01, refresh=60, resolver=resolver)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cache.run)
        with trio.fail_after(1.0):
            while cache.value != "resolved.example.test":
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert calls == 3


async def test_resolver_unicode_error_falls_back_to_host_name() -> None:
    """resolve_fqdn raises UnicodeError, not OSError, for a host name with a label over 63
    characters (Linux allows 64-byte host names; Azure VM names may be 64 characters).
    refresh_once must treat it like any failed lookup instead of letting it end
    FqdnCache.run and with it the daemon's nursery."""
    long_label = "a" * 64  # Linux allows 64-byte host names; DNS labels stop at 63
    with pytest.raises(UnicodeError):
        resolve_fqdn(long_label)  # the real default resolver, no network involved

    cache = FqdnCache(bound=1.0, resolver=lambda hostname: resolve_fqdn(long_label))
    try:
        ok = await cache.refresh_once()
    except UnicodeError as exc:
        raise AssertionError(f"refresh_once let {exc!r} escape instead of falling back") from exc
    assert ok is False
    assert cache.value == socket.gethostname()
