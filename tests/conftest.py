"""Shared fixtures."""

import os

import pytest


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Torch's thread count is the process's: a command line run in process (``mira.experiments``'
    ``--threads``, default 1; the benchmarks' mains) sets it for every later test of the session, which
    then ran the CPU kernels on one thread whatever the machine. Restored after each test."""
    import torch

    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture
def without_extension(monkeypatch):
    """The package as on a machine where mira_kernels._C did not build: the public functions run the
    reference after the Python checks, which are then the only ones (elsewhere the op's C++ checks back
    them up, so a Python check that stopped working went unseen)."""
    from mira_kernels import _extension, backends

    monkeypatch.setattr(_extension, "loaded", False)
    monkeypatch.setattr(_extension, "has_kernel", lambda op, key: False)
    monkeypatch.setattr(backends, "_warned_fallback", set())
    with pytest.warns(RuntimeWarning, match="no native backend"):
        backends.resolve_backend("cpu")  # the fallback's one warning, here rather than in the test


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


@pytest.fixture(scope="module")
def backbone():
    """The recipe tests' tiny frozen ViT (16 wide, 2 blocks, 8x8 images): seconds, not minutes, per stage."""
    import torch

    from mira.experiments.backbone import BackboneConfig, create_backbone

    torch.manual_seed(0)
    model = create_backbone(BackboneConfig(embed_dim=16, depth=2, num_heads=2, img_size=8, patch_size=4))
    model.eval().requires_grad_(False)
    return model
