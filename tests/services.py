"""Real services some tests drive (an MQTT broker, openssl, a headless browser).

On a developer's machine a missing one skips its tests, with the package that brings it. Under CI
(`CI` set), where .ci/run installs every one, a missing service fails the test instead: a skip there
would hide the very thing the test exists to check."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def needs(available: bool, what: str) -> pytest.MarkDecorator:
    """A marker for tests that need `what`; conftest's runtest hook skips or fails them."""
    return pytest.mark.needs_service(what, available)


def missing(what: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"{what} is not installed: .ci/run should have installed it", pytrace=False)
    pytest.skip(f"{what} is not installed")
