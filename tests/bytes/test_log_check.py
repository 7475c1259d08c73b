"""The suite's log check itself: an error kvpfs logs fails the test unless the test expects it."""

from __future__ import annotations

from pathlib import Path

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"

TESTS = '''
import logging
import pytest

log = logging.getLogger("kvpfs.fuse.operations")

def test_quiet():
    log.warning("refused value for guest/k: too long")  # warnings are normal refusals

def test_unexpected():
    log.error("pool file error, answered E_FAIL")

@pytest.mark.log_errors(r"answered E_FAIL")
def test_expected():
    log.error("pool file error, answered E_FAIL")

def test_traceback():
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.warning("handled", exc_info=True)
'''


def test_errors_and_tracebacks_fail_unless_expected(pytester):
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_logs=TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=4, errors=2)
    result.stdout.fnmatch_lines(["*test_unexpected - Failed: kvpfs logged errors*",
                                 "*test_traceback - Failed: kvpfs logged errors*"])
