"""The test servers helper: a missing binary is one clear skip, or a failure in CI."""

from __future__ import annotations

import pytest

from tests.servers import require_binary


def test_a_missing_server_skips_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHOAL_REQUIRE_SERVERS", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-such-server not installed"):
        require_binary("no-such-server")


def test_a_missing_server_fails_when_servers_are_required(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SHOAL_REQUIRE_SERVERS", "1")
    with pytest.raises(pytest.fail.Exception, match="SHOAL_REQUIRE_SERVERS=1"):
        require_binary("no-such-server")


def test_an_installed_server_is_found() -> None:
    assert require_binary("nats-server").endswith("nats-server")
