"""The version is written once (kvpfs/__init__.py) and every place that shows it agrees.

pyproject.toml takes it from there (dynamic), `kvpfs --version` prints it, the installed
metadata carries it, and debian/changelog's newest entry and NEWS.md's newest section
must name the same version: a release bumps all of them, or this fails.
"""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import kvpfs
from tests.conftest import skip_unless_ci

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_takes_the_version_from_the_package_and_writes_none_of_its_own():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"]
    assert "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "kvpfs.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", kvpfs.__version__)


def test_kvpfs_version_prints_the_package_version():
    result = subprocess.run([sys.executable, "-m", "kvpfs", "--version"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == f"kvpfs {kvpfs.__version__}"


def test_the_installed_metadata_carries_the_package_version():
    # An install older than the last bump fails here: `./dev.sh setup` reinstalls.
    assert importlib.metadata.version("kvpfs") == kvpfs.__version__


def test_debian_changelog_names_the_package_version():
    if shutil.which("dpkg-parsechangelog") is None:
        skip_unless_ci("dpkg-parsechangelog (dpkg-dev) is not installed")
    version = subprocess.run(
        ["dpkg-parsechangelog", "-l", str(ROOT / "debian/changelog"), "-S", "Version"],
        capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    upstream = version.split(":", 1)[-1].rsplit("-", 1)[0] if "-" in version else version
    assert upstream == kvpfs.__version__, (version, kvpfs.__version__)


def test_news_has_a_section_for_the_package_version_first():
    headings = re.findall(r"^## (\S+)", (ROOT / "NEWS.md").read_text(), flags=re.MULTILINE)
    assert headings, "NEWS.md has no '## <version>' section"
    assert headings[0] == kvpfs.__version__, headings
    assert len(headings) == len(set(headings)), headings
