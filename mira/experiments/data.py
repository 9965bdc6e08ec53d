"""Real data that ships inside a package: scikit-learn's ``load_digits`` turned into domains.

``load_digits`` holds 1,797 real 8x8 handwritten digits (10 classes, grey levels 0..16). Every
image is upsampled once to ``IMAGE_SIZE`` x ``IMAGE_SIZE`` (bilinear) and scaled to [0, 1]; a
domain is a fixed, deterministic transform of that image (no randomness at training time, so a
domain means the same pixels in every run):

==========  =====================================================================================
upright     the digit as scanned
rotated     rotated by 90 degrees counter-clockwise (exact, ``torch.rot90``)
inverted    ink and paper swapped: 1 - x
noisy       plus Gaussian noise, sigma 0.35, one fixed draw per image (generator seed 1234), clipped
thick       strokes thickened (3x3 grey dilation = max-pool, stride 1) then blurred (3x3 Gaussian,
            sigma 1)
==========  =====================================================================================

Splits (fixed, stratified by class, ``numpy`` generator seed 0, independent of the run seeds):

- ``pretrain``: 1/3 of the images (599), **upright only**. The frozen backbone is trained on
  these and nothing else; no image of this split is ever used by the experiments.
- ``train`` / ``test``: the other 2/3 split 3:1 (899 / 299). Every domain is the same
  transform applied to the same underlying train (test) images, so a test digit is never seen,
  in any domain, during training, and domains differ only by their transform.

The generic loader :func:`load_image_folder` reads the on-disk layout of PACS / OfficeHome /
DomainNet (``root/<domain>/<class>/<image>``) into the same :class:`Domain` records.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DOMAINS",
    "IMAGE_SIZE",
    "Domain",
    "digits_domains",
    "digits_pretrain",
    "load_image_folder",
    "split_indices",
]

IMAGE_SIZE = 16
DOMAINS = ("upright", "rotated", "inverted", "noisy", "thick")
NUM_CLASSES = 10

_SPLIT_SEED = 0
_NOISE_SEED = 1234
_NOISE_SIGMA = 0.35


@dataclasses.dataclass
class Domain:
    """One domain's images and labels.

    Attributes:
        name: domain name.
        train_x: (n_train, C, H, W) float32 images.
        train_y: (n_train,) int64 labels.
        test_x: (n_test, C, H, W) float32 images.
        test_y: (n_test,) int64 labels.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def split_indices(labels: np.ndarray, fractions: Sequence[float], seed: int = _SPLIT_SEED) -> list[np.ndarray]:
    """Stratified split of ``range(len(labels))`` into parts of the given fractions (sum 1).

    Each class is shuffled with one generator and cut at the same cumulative fractions, so the
    parts are disjoint, cover every index and keep the class balance.
    """
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {fractions}")
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in fractions]
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        cuts = np.round(np.cumsum(fractions) * len(idx)).astype(int)
        start = 0
        for p, stop in enumerate(cuts):
            parts[p].extend(idx[start:stop].tolist())
            start = stop
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _gaussian_kernel3(sigma: float) -> torch.Tensor:
    t = torch.tensor([-1.0, 0.0, 1.0])
    g = torch.exp(-(t**2) / (2 * sigma**2))
    k = torch.outer(g, g)
    return (k / k.sum()).view(1, 1, 3, 3)


def _apply_domain(name: str, x: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
    """The fixed transform of domain ``name`` on (n, 1, H, W) images in [0, 1].

    ``image_ids`` (n,) are the indices into ``load_digits``; the noise of an image depends only
    on its id, so a given digit gets the same noise in every split and every run.
    """
    if name == "upright":
        return x.clone()
    if name == "rotated":
        return torch.rot90(x, k=1, dims=(-2, -1)).contiguous()
    if name == "inverted":
        return 1.0 - x
    if name == "noisy":
        gen = torch.Generator().manual_seed(_NOISE_SEED)
        noise_all = torch.randn(1797, *x.shape[1:], generator=gen) * _NOISE_SIGMA
        return (x + noise_all[image_ids]).clamp(0.0, 1.0)
    if name == "thick":
        thick = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return F.conv2d(F.pad(thick, (1, 1, 1, 1), mode="replicate"), _gaussian_kernel3(1.0))
    raise ValueError(f"unknown domain {name!r}; expected one of {DOMAINS}")


def _digits_images() -> tuple[torch.Tensor, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return x.clamp(0.0, 1.0), bunch.target.astype(np.int64)


def _splits(labels: np.ndarray) -> dict[str, np.ndarray]:
    pre, rest = split_indices(labels, (1 / 3, 2 / 3))
    tr_local, te_local = split_indices(labels[rest], (0.75, 0.25), seed=_SPLIT_SEED + 1)
    return {"pretrain": pre, "train": rest[tr_local], "test": rest[te_local]}


def digits_pretrain() -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone's pre-training split: upright images (599, 1, H, W) and labels (599,)."""
    x, y = _digits_images()
    idx = _splits(y)["pretrain"]
    return x[idx], torch.from_numpy(y[idx])


def digits_domains(names: Sequence[str] = DOMAINS) -> list[Domain]:
    """The experiment domains built from the train/test split (disjoint from ``pretrain``)."""
    x, y = _digits_images()
    splits = _splits(y)
    out = []
    for name in names:
        parts = {}
        for part in ("train", "test"):
            idx = splits[part]
            ids = torch.from_numpy(idx)
            parts[part] = (_apply_domain(name, x[ids], ids), torch.from_numpy(y[idx]))
        out.append(Domain(name, parts["train"][0], parts["train"][1], parts["test"][0], parts["test"][1]))
    return out


_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def load_image_folder(
    root: str | os.PathLike,
    *,
    domains: Sequence[str] | None = None,
    image_size: int = 224,
    test_fraction: float = 0.2,
    channels: int = 3,
    seed: int = _SPLIT_SEED,
) -> tuple[list[Domain], list[str]]:
    """Load ``root/<domain>/<class>/<image>`` (PACS, OfficeHome, DomainNet layout) as domains.

    Classes are the union of the class folder names over all domains, sorted, so a label means
    the same class in every domain. Each domain is split stratified into train/test by
    ``test_fraction`` (the benchmarks ship no fixed split for every domain). Images are resized
    to ``image_size`` (bilinear) and scaled to [0, 1]; nothing else is done to them.

    Returns:
        (domains, class_names).
    """
    from PIL import Image

    root = os.fspath(root)
    names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if domains is not None:
        missing = set(domains) - set(names)
        if missing:
            raise FileNotFoundError(f"domains {sorted(missing)} not found under {root}")
        names = list(domains)
    classes = sorted({c for d in names for c in os.listdir(os.path.join(root, d))
                      if os.path.isdir(os.path.join(root, d, c))})
    if not classes:
        raise FileNotFoundError(f"no class folders under {root}/<domain>/")
    mode = "RGB" if channels == 3 else "L"
    out = []
    for d in names:
        images, labels = [], []
        for label, c in enumerate(classes):
            folder = os.path.join(root, d, c)
            if not os.path.isdir(folder):
                continue
            for f in sorted(os.listdir(folder)):
                if not f.lower().endswith(_IMAGE_EXTENSIONS):
                    continue
                with Image.open(os.path.join(folder, f)) as im:
                    arr = np.asarray(im.convert(mode).resize((image_size, image_size), Image.BILINEAR))
                images.append(torch.from_numpy(arr.copy()).float().div_(255.0).reshape(image_size, image_size, -1))
                labels.append(label)
        if not images:
            raise FileNotFoundError(f"no images under {root}/{d}")
        x = torch.stack(images).permute(0, 3, 1, 2).contiguous()
        y_np = np.asarray(labels, dtype=np.int64)
        tr, te = split_indices(y_np, (1 - test_fraction, test_fraction), seed=seed)
        y = torch.from_numpy(y_np)
        out.append(Domain(d, x[tr], y[tr], x[te], y[te]))
    return out, classes
