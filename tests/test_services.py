"""The rule for tests that need a real service: skipped on a developer's machine, failed under CI."""

from __future__ import annotations

import pytest
from services import missing


def test_a_missing_service_skips_on_a_developer_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="mosquitto is not installed"):
        missing("mosquitto")


def test_a_missing_service_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"openssl is not installed: \.ci/run"):
        missing("openssl")

