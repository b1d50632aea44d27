"""Hypothesis settings of the property tests: no example database and caches in the system
temporary directory (nothing is left in the repository), bounded examples and a deadline
per example; the seed of a failing run is printed, as hypothesis does by default.

HYPOTHESIS_PROFILE=properties-long runs ten times as many examples (a longer hunt).
"""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir

# Hypothesis also keeps caches (the unicode character map) in its home directory, which is
# ./.hypothesis by default: keep them out of the repository.
set_hypothesis_home_dir(str(Path(tempfile.gettempdir()) / "medstream-hypothesis"))

settings.register_profile(
    "properties",
    database=None,
    derandomize=False,
    deadline=timedelta(seconds=2),
    # Socket-level properties share one server per test function on purpose (started once,
    # it must keep serving every example), and inputs are large by design.
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
settings.register_profile(
    "properties-long", parent=settings.get_profile("properties"), max_examples=1000
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "properties"))


@pytest.fixture(scope="session", autouse=True)
def _terminology_loaded() -> None:
    """Load the shipped terminology before any example runs (it takes seconds, once)."""
    from tests.properties.pipeline import terminology

    terminology()
