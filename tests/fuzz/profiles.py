"""Hypothesis profiles of the property suite, chosen with ``--hypothesis-profile`` (pytest) or the
``HYPOTHESIS_PROFILE`` environment variable (the Triton child process inherits it).

``ci``       bounded and derandomised: the same examples on every run, a fixed cost (what
             ``make test`` runs; tests/test_properties.py says how long it takes).
``fuzz``     random and long (``make fuzz``): many examples per property, examples that fail are
             kept in ``.hypothesis/`` (git-ignored) and replayed first on the next run.
``fuzz-triton``  the same for the Triton interpreter child, which is ~100x slower per example.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings
from hypothesis.database import DirectoryBasedExampleDatabase

_SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

settings.register_profile(
    "ci", max_examples=60, derandomize=True, deadline=None, database=None, print_blob=True,
    suppress_health_check=_SLOW, phases=[Phase.explicit, Phase.generate, Phase.target, Phase.shrink],
)
settings.register_profile(
    "fuzz", max_examples=4000, deadline=None, print_blob=True, suppress_health_check=_SLOW,
    database=DirectoryBasedExampleDatabase(os.path.join(_ROOT, ".hypothesis", "examples")),
)
settings.register_profile("fuzz-triton", parent=settings.get_profile("fuzz"), max_examples=300)
settings.register_profile("ci-triton", parent=settings.get_profile("ci"), max_examples=12)


def load(default: str = "ci") -> str:
    """Load the profile named by HYPOTHESIS_PROFILE (else ``default``) and return its name."""
    name = os.environ.get("HYPOTHESIS_PROFILE", default)
    settings.load_profile(name)
    return name
