"""The iDigits-style domains: real data from packages, disjoint fixed splits, the conflict control."""

import numpy as np
import pytest
import torch

from mira.experiments import idigits as I
from mira.experiments import suites


@pytest.fixture(scope="module")
def doms(idigits_cache):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIRA_EXPERIMENTS_CACHE", str(idigits_cache.parent))
        yield I.idigits_domains()


def test_domains_are_rgb_balanced_and_the_backbone_never_sees_their_images(doms):
    assert [d.name for d in doms] == list(I.DOMAINS)
    sizes = {d.name: (len(d.train_x), len(d.test_x)) for d in doms}
    assert sizes == {"mnist": (1000, 500), "digits": (1198, 599), "mnist_m": (1000, 500), "syn": (1000, 500)}
    for d in doms:
        assert d.train_x.shape[1:] == (3, I.IMAGE_SIZE, I.IMAGE_SIZE)
        assert d.train_x.min() >= 0 and d.train_x.max() <= 1 and torch.isfinite(d.train_x).all()
        counts = torch.bincount(d.train_y, minlength=10)
        assert counts.min() >= 0.9 * counts.float().mean()
    # Grey domains are grey; the colour domains are not.
    by = {d.name: d for d in doms}
    assert torch.equal(by["mnist"].train_x[:, 0], by["mnist"].train_x[:, 2])
    for name in ("mnist_m", "syn"):
        assert (by[name].train_x[:, 0] - by[name].train_x[:, 2]).abs().mean() > 0.05
    # MNIST images: pre-training, mnist and mnist_m use disjoint digits.
    parts = I._mnist_splits()
    sets = [set(v.tolist()) for v in parts.values()]
    assert sum(len(s) for s in sets) == len(set().union(*sets)) == 5000
    # The cache returns the same tensors.
    again = I.idigits_domains(("syn",))[0]
    assert torch.equal(again.test_x, by["syn"].test_x)


def test_renders_are_fixed_and_use_many_fonts():
    assert len(I.font_paths()) >= 15
    labels = np.arange(10).repeat(2)
    a, b = I._syn(labels, seed=3), I._syn(labels, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, I._syn(labels, seed=4))
    assert a.shape == (20, 3, I.IMAGE_SIZE, I.IMAGE_SIZE)


def test_conflict_control_pairs_the_same_images_with_rotated_labels(doms):
    plain, cued = suites.conflict_domains()
    assert torch.equal(cued.train_y, (plain.train_y + 5) % 10)
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    assert torch.equal(cued.train_x[inner], plain.train_x[inner])  # only the frame differs
    assert not torch.equal(cued.train_x, plain.train_x)
