"""Digits domains and the folder loader: fixed transforms, disjoint splits, the on-disk layout."""

import numpy as np
import pytest
import torch

from mira.experiments import data


def test_splits_are_disjoint_stratified_and_cover_everything():
    from sklearn.datasets import load_digits

    y = load_digits().target
    s = data._splits(y)
    pre, tr, te = s["pretrain"], s["train"], s["test"]
    assert len(pre) + len(tr) + len(te) == len(y) == 1797
    assert not (set(pre) & set(tr)) and not (set(pre) & set(te)) and not (set(tr) & set(te))
    for part in (pre, tr, te):
        counts = np.bincount(y[part], minlength=10)
        assert counts.min() >= 0.8 * counts.mean()


def test_domains_are_fixed_transforms_of_the_same_images():
    doms = data.digits_domains()
    assert [d.name for d in doms] == list(data.DOMAINS)
    up = doms[0]
    assert up.train_x.shape == (899, 1, data.IMAGE_SIZE, data.IMAGE_SIZE) and up.test_x.shape[0] == 299
    for d in doms:
        assert torch.equal(d.train_y, up.train_y) and torch.equal(d.test_y, up.test_y)
        assert d.train_x.min() >= 0 and d.train_x.max() <= 1 and torch.isfinite(d.train_x).all()
    by = {d.name: d for d in doms}
    torch.testing.assert_close(by["inverted"].test_x, 1 - up.test_x)
    torch.testing.assert_close(by["rotated"].test_x, torch.rot90(up.test_x, 1, (-2, -1)))
    assert not torch.equal(by["noisy"].train_x, up.train_x)
    # deterministic: building again gives the same pixels
    again = data.digits_domains(["noisy", "thick"])
    assert torch.equal(again[0].train_x, by["noisy"].train_x) and torch.equal(again[1].test_x, by["thick"].test_x)


def test_image_folder_loader(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for dom in ("art", "photo"):
        for cls in ("dog", "horse"):
            (tmp_path / dom / cls).mkdir(parents=True)
            for i in range(5):
                arr = rng.integers(0, 255, (9, 7, 3), dtype=np.uint8)
                Image.fromarray(arr).save(tmp_path / dom / cls / f"{i}.png")
    (tmp_path / "photo" / "horse" / "notes.txt").write_text("not an image")
    doms, classes = data.load_image_folder(tmp_path, image_size=8, test_fraction=0.2)
    assert classes == ["dog", "horse"] and [d.name for d in doms] == ["art", "photo"]
    for d in doms:
        assert d.train_x.shape == (8, 3, 8, 8) and d.test_x.shape == (2, 3, 8, 8)
        assert sorted(d.test_y.tolist()) == [0, 1]
        assert 0 <= d.train_x.min() and d.train_x.max() <= 1
    with pytest.raises(FileNotFoundError):
        data.load_image_folder(tmp_path, domains=["sketch"])
