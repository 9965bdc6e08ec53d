"""The frozen backbone: a tiny timm ViT that this package pre-trains itself.

No pretrained weights can be downloaded on the machines this runs on, so the backbone is
trained here, once, with plain supervised cross-entropy and +-1 pixel random shifts, on one of
two pre-training sets (:data:`PRETRAIN_DATA`), disjoint from every experiment image:

* ``digits`` (transforms suite): the ``pretrain`` split of :mod:`mira.experiments.data`, 599
  upright sklearn digits. It never sees rotated, inverted, noisy or thickened digits.
* ``idigits`` (iDigits-style suite): 2,000 grey MNIST digits (:mod:`.idigits`), half of each
  batch with random ink and paper colours (``colour_augment``: measured, without it the frozen
  RGB patch embedding, trained on R = G = B only, left the MNIST-M / SynDigits adapters at 44% /
  22% train accuracy). It never sees sklearn digits, photos behind digits, or rendered fonts,
  nor any experiment image; its classifier head is the
  shared head that adapters can be trained against (``adapt_head="shared"``), the role CLIP's
  text head plays in the paper.

The checkpoint is cached outside the repo (``$MIRA_EXPERIMENTS_CACHE`` or
``~/.cache/mira-kernels``), keyed by the configuration, so repeated local runs skip
pre-training; CI starts clean and pays for it (seconds).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import torch
import torch.nn.functional as F

from mira_kernels import _config

from .data import IMAGE_SIZE, digits_pretrain

__all__ = ["BackboneConfig", "cache_dir", "create_backbone", "load_pretrained_backbone", "features"]


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
    """Architecture and pre-training schedule of the digits ViT (timm ``VisionTransformer``)."""

    pretrain_data: str = "digits"
    in_chans: int = 1
    img_size: int = IMAGE_SIZE
    patch_size: int = 4
    embed_dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 2.0
    colour_augment: bool = False
    epochs: int = 60
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    seed: int = 0

    def __post_init__(self):
        if self.img_size % self.patch_size:
            raise ValueError("img_size must be a multiple of patch_size")
        if self.embed_dim % self.num_heads:
            raise ValueError("embed_dim must be a multiple of num_heads")
        if self.pretrain_data not in PRETRAIN_DATA:
            raise ValueError(f"unknown pretrain_data {self.pretrain_data!r}; expected one of {PRETRAIN_DATA}")

    def key(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


#: Pre-training sets: ``digits`` (599 upright sklearn digits, the transforms suite) and
#: ``idigits`` (2,000 grey MNIST digits, the iDigits-style suite).
PRETRAIN_DATA = ("digits", "idigits")


def pretrain_images(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if name == "idigits":
        from .idigits import idigits_pretrain

        return idigits_pretrain()
    return digits_pretrain()


def cache_path() -> str:
    """The cache folder ``MIRA_EXPERIMENTS_CACHE`` names (default ``~/.cache/mira-kernels``), not created."""
    # expanduser: "~/..." from an env file or a container reaches here unexpanded by any shell
    return os.path.expanduser(_config.read("MIRA_EXPERIMENTS_CACHE") or os.path.join("~", ".cache", "mira-kernels"))


def cache_dir() -> str:
    path = cache_path()
    os.makedirs(path, exist_ok=True)
    return path


def create_backbone(cfg: BackboneConfig, num_classes: int = 10) -> torch.nn.Module:
    """A randomly initialised timm ViT with a CLS token."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        num_classes=num_classes,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        qkv_bias=True,
        class_token=True,
        global_pool="token",
    )


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> the backbone's input range [-1, 1]."""
    return x * 2.0 - 1.0


def features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) images in [0, 1] -> (B, embed_dim) pre-logits (final-norm CLS token)."""
    return model.forward_head(model.forward_features(normalize(x)), pre_logits=True)


def _random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    # One shift per batch is enough augmentation for 599 images and costs nothing.
    dx, dy = (torch.randint(-max_shift, max_shift + 1, (2,), generator=gen)).tolist()
    padded = F.pad(x, (max_shift,) * 4)
    h, w = x.shape[-2:]
    return padded[..., max_shift + dy : max_shift + dy + h, max_shift + dx : max_shift + dx + w]


def _random_colours(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Half of a grey batch recoloured: ink and paper each a random RGB colour (at least 0.35 apart
    on average), so a frozen RGB patch embedding is not blind to colour. Digit shapes, photos,
    fonts and every test image stay unseen."""
    n = len(x)
    ink = x[:, :1]
    bg, fg = torch.rand(n, 3, 1, 1, generator=gen), torch.rand(n, 3, 1, 1, generator=gen)
    weak = (fg - bg).abs().mean(dim=(1, 2, 3)) < 0.35
    fg[weak] = 1.0 - bg[weak]
    coloured = bg * (1 - ink) + fg * ink
    keep = (torch.rand(n, 1, 1, 1, generator=gen) < 0.5).float()
    return keep * x + (1 - keep) * coloured


def pretrain_backbone(cfg: BackboneConfig, progress: bool = False) -> tuple[torch.nn.Module, dict]:
    """Train the backbone on the pretrain split; returns (model in eval mode, info dict)."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = create_backbone(cfg)
    x, y = pretrain_images(cfg.pretrain_data)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = (len(x) + cfg.batch_size - 1) // cfg.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    t0 = time.perf_counter()
    it = range(cfg.epochs)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="pretrain backbone", leave=False)
    model.train()
    for _ in it:
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            xb = _random_shift(x[idx], gen)
            if cfg.colour_augment:
                xb = _random_colours(xb, gen)
            loss = F.cross_entropy(model(normalize(xb)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        train_acc = (model(normalize(x)).argmax(-1) == y).float().mean().item()
    info = {"pretrain_seconds": time.perf_counter() - t0, "pretrain_train_acc": train_acc, "cached": False}
    return model, info


def load_pretrained_backbone(cfg: BackboneConfig | None = None, *, use_cache: bool = True,
                             progress: bool = False) -> tuple[torch.nn.Module, dict]:
    """The frozen, pre-trained backbone (from cache when present) and an info dict.

    The returned model is in eval mode with ``requires_grad=False`` everywhere; its own
    classifier head is kept (tasks use their own heads on :func:`features`).
    """
    cfg = cfg or BackboneConfig()
    path = os.path.join(cache_dir(), f"digits_vit_{cfg.key()}.pt")
    model = None
    info: dict = {}
    if use_cache and os.path.exists(path):
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            model = create_backbone(cfg)
            model.load_state_dict(blob["state_dict"])
            info = dict(blob["info"], cached=True)
        except Exception:  # a truncated or stale file: train again rather than fail
            model = None
    if model is None:
        model, info = pretrain_backbone(cfg, progress=progress)
        if use_cache:
            tmp = f"{path}.{os.getpid()}.tmp"
            torch.save({"state_dict": model.state_dict(), "info": info, "config": dataclasses.asdict(cfg)}, tmp)
            os.replace(tmp, path)  # atomic: concurrent runs never read a half-written file
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    info["config"] = dataclasses.asdict(cfg)
    info["cache_path"] = path
    return model, info
