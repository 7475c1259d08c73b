"""debian/check-depends, the check of a .deb's Depends against the releases kvpfs is for,
run on small packages built here with dpkg-deb: it passes what those releases have and
names the release and relation that they lack."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import skip_unless_ci

ROOT = Path(__file__).resolve().parents[2]
CHECK = ROOT / "debian/check-depends"


@pytest.fixture(autouse=True)
def _dpkg_tools() -> None:
    for tool in ("dpkg-deb", "dpkg"):
        if shutil.which(tool) is None:
            skip_unless_ci(f"{tool} is not installed")


def build_deb(tmp_path: Path, depends: str) -> Path:
    """An empty Architecture: all package whose control file says `Depends: <depends>`."""
    tree = tmp_path / f"pkg{len(list(tmp_path.iterdir()))}"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN/control").write_text(
        "Package: kvpfs-depends-probe\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: kvpfs tests <tests@example.org>\n"
        f"Depends: {depends}\nDescription: probe for check-depends\n")
    deb = tree.with_suffix(".deb")
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(tree), str(deb)],
                   check=True, capture_output=True, timeout=60)
    return deb


def check(deb: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["/usr/bin/python3", str(CHECK), str(deb)], capture_output=True,
                          text=True, timeout=60)


def test_the_dependencies_kvpfs_declares_are_met_on_every_release(tmp_path):
    # What debian/control and dh_python3 put in the package's Depends.
    deb = build_deb(tmp_path, "fuse3, python3-pyfuse3 (>= 3.2.1), python3-trio (>= 0.22),"
                              " python3-outcome, python3:any (>= 3.11~)")
    result = check(deb)
    assert result.returncode == 0, result.stdout + result.stderr
    for release in ("Debian 12 bookworm", "Debian 13 trixie", "Ubuntu 24.04 noble",
                    "Ubuntu 26.04 resolute"):
        assert f"ok   {release}" in result.stdout


def test_a_version_one_release_lacks_fails_and_names_that_release(tmp_path):
    # trio 0.25: newer than Debian 12's 0.22 and Ubuntu 24.04's 0.24, not Debian 13's 0.29.
    result = check(build_deb(tmp_path, "python3-trio (>= 0.25)"))
    assert result.returncode == 1
    assert "Debian 12 bookworm: Depends: python3-trio (>= 0.25) (the release has 0.22.0-0.2)" \
        in result.stderr
    assert "Ubuntu 24.04 noble: Depends: python3-trio (>= 0.25)" in result.stderr
    assert "Debian 13 trixie" not in result.stderr
    assert "Ubuntu 26.04 resolute" not in result.stderr


def test_an_upper_bound_is_compared_as_dpkg_compares(tmp_path):
    # 3.12.3-0ubuntu1 << 3.13 but 3.13.5-1 is not: the tilde and revisions count.
    result = check(build_deb(tmp_path, "python3:any (<< 3.13~)"))
    assert result.returncode == 1
    assert "Debian 13 trixie: Depends: python3:any (<< 3.13~)" in result.stderr
    assert "Ubuntu 24.04 noble" not in result.stderr


def test_a_package_no_release_has_fails_unless_an_alternative_is_met(tmp_path):
    assert check(build_deb(tmp_path, "hyperv-kvp-only-here")).returncode == 1
    result = check(build_deb(tmp_path, "hyperv-kvp-only-here | fuse3"))
    assert result.returncode == 0, result.stderr
