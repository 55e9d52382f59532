"""The chaos suite's knobs: its seed (printed, and fixed with CHAOS_SEED) and its size (CHAOS_LONG=1)."""

from __future__ import annotations

import os
import random

import pytest

from tests.chaos.profile import CURRENT, SEED_ENV, Profile


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "chaos: breaks the broker, the workers or Stripe on purpose (tests/chaos)")


@pytest.fixture
def chaos_seed(request: pytest.FixtureRequest) -> int:
    """This test's seed: CHAOS_SEED if set, else a fresh one; printed so that a failure can be rerun."""
    fixed = os.environ.get(SEED_ENV)
    seed = int(fixed) if fixed else random.SystemRandom().randrange(2**31)
    print(f"\n{request.node.nodeid}: {SEED_ENV}={seed}")
    return seed


@pytest.fixture
def profile() -> Profile:
    return CURRENT
