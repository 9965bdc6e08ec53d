"""Shared fixtures."""

import os
import shutil

import pytest


@pytest.fixture(scope="session")
def idigits_cache(tmp_path_factory):
    """A cache folder holding the built iDigits-style domains (built once per session: MNIST's CSV,
    the photo blends and the font renders take 10-30 s). Tests copy the file into their own cache."""
    from mira.experiments import idigits

    root = tmp_path_factory.mktemp("idigits-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIRA_EXPERIMENTS_CACHE", str(root))
        idigits.idigits_domains()
    (path,) = [p for p in os.listdir(root) if p.startswith("idigits_")]
    return root / path


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch, idigits_cache):
    """An empty experiments cache (so the backbone is pre-trained, as in CI) holding only the domains."""
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(idigits_cache, cache / idigits_cache.name)
    monkeypatch.setenv("MIRA_EXPERIMENTS_CACHE", str(cache))
    return cache
