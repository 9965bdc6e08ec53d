"""Shared fixtures."""

import os

import pytest


@pytest.fixture(scope="session")
def idigits_cache(tmp_path_factory):
    """A cache folder holding the built iDigits-style domains (built once per session, ~3 s of CPU:
    MNIST's CSV, the photo blends, the font renders). Tests copy the file into their own cache."""
    from mira.experiments import idigits

    root = tmp_path_factory.mktemp("idigits-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIRA_EXPERIMENTS_CACHE", str(root))
        idigits.idigits_domains()
    (path,) = [p for p in os.listdir(root) if p.startswith("idigits_")]
    return root / path
