"""What the handler-level tests share: the mounted handlers, without a mount."""

from __future__ import annotations

import pytest

from tests.support.handlers import mounted_handlers


@pytest.fixture
async def m(tmp_path, monkeypatch):
    async with mounted_handlers(tmp_path / "pools", monkeypatch) as mounted:
        yield mounted
