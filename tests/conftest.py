"""Shared test configuration: random seeds, tolerances, Hypothesis profiles.

Random seeds
------------
Tests that draw random data take the ``global_random_seed`` fixture; their
contract is "passes for any seed in 0-99". The seed comes from the
environment variable ``PYFFF_TESTS_GLOBAL_RANDOM_SEED`` (scikit-learn's
scheme):

* unset: the fixed default seed 42;
* ``N``: that seed; ``A-B``: every seed from A to B (inclusive);
  ``N,M,...``: those seeds; ``all``: 0-99; ``any``: one random seed in 0-99
  (printed in the report header).

Hypothesis
----------
Profiles ``ci`` (few examples, the default) and ``dev`` (many), both without
deadline; pick one with ``HYPOTHESIS_PROFILE=dev``.
"""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

SEED_ENV = "PYFFF_TESTS_GLOBAL_RANDOM_SEED"
DEFAULT_SEED = 42

settings.register_profile("ci", max_examples=25, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=500, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _parse_seeds(value):
    """The seeds a ``PYFFF_TESTS_GLOBAL_RANDOM_SEED`` value asks for."""
    value = (value or "").strip().lower()
    if not value:
        return [DEFAULT_SEED]
    if value == "all":
        return list(range(100))
    if value == "any":
        return [random.Random().randrange(100)]
    seeds = []
    for part in value.split(","):
        lo, sep, hi = part.partition("-")
        try:
            seeds.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
        except ValueError:
            raise pytest.UsageError(
                f"{SEED_ENV}={value!r}: expected 'all', 'any', an integer, 'A-B' or a comma-separated list"
            ) from None
    if not seeds or any(not 0 <= s <= 99 for s in seeds):
        raise pytest.UsageError(f"{SEED_ENV}={value!r}: seeds must lie in 0-99")
    return seeds


def pytest_configure(config):
    config._pyfff_seeds = _parse_seeds(os.environ.get(SEED_ENV))


def pytest_report_header(config):
    seeds = config._pyfff_seeds
    shown = f"{seeds[0]}-{seeds[-1]} ({len(seeds)} seeds)" if len(seeds) > 3 else ", ".join(map(str, seeds))
    return [f"global_random_seed: {shown} (set {SEED_ENV}); hypothesis profile: {settings.get_current_profile_name()}"]


def pytest_generate_tests(metafunc):
    if "global_random_seed" in metafunc.fixturenames:
        seeds = metafunc.config._pyfff_seeds
        metafunc.parametrize("global_random_seed", seeds, ids=[f"seed{s}" for s in seeds])


@pytest.fixture(scope="session")
def tolerances():
    """Output tolerance per dtype, ``{np.dtype: {"rtol": ..., "atol": ...}}``."""
    from _fff_testing import TOLERANCES

    return TOLERANCES


@pytest.fixture
def rng(global_random_seed):
    """A NumPy Generator seeded by ``global_random_seed``."""
    return np.random.default_rng(global_random_seed)
