"""The benchmark suites: which domains, which backbone, which settings, full and quick sizes.

==========  ========================================================================================
idigits     the iDigits-style suite (:mod:`.idigits`): mnist, digits, mnist_m, syn; backbone
            pre-trained on 2,000 other grey MNIST digits, RGB 16 px
transforms  the earlier suite (:mod:`.data`): five fixed transforms of sklearn digits (upright,
            rotated, inverted, noisy, thick); backbone pre-trained on 599 upright digits, grey 16 px
conflict    the synthetic control where uniform mixing must fail: ``plain`` MNIST digits with their
            labels, and ``cued`` = the *same* images with a visible cue (a red frame) and the
            labels rotated by five (y -> (y + 5) mod 10). A model whose prediction does not change
            with the cue is right on at most one image of each (plain, cued) pair: the run
            reports that bound from the measured agreement. DIL only.
==========  ========================================================================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from .backbone import BackboneConfig
from .data import Domain

__all__ = ["SUITES", "Suite", "conflict_domains", "subsample"]


@dataclasses.dataclass(frozen=True)
class Suite:
    name: str
    domains: Callable[[], list[Domain]]
    backbone: BackboneConfig
    settings: tuple[str, ...]
    quick_domains: int = 3


def _idigits() -> list[Domain]:
    from .idigits import idigits_domains

    return idigits_domains()


def _transforms() -> list[Domain]:
    from .data import digits_domains

    return digits_domains()


def _add_frame(x: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    red = torch.tensor([1.0, 0.1, 0.1]).view(3, 1)
    out[:, :, 0, :] = red
    out[:, :, -1, :] = red
    out[:, :, :, 0] = red
    out[:, :, :, -1] = red
    return out


def conflict_domains() -> list[Domain]:
    """``plain`` and ``cued``: the same MNIST images, the cued ones framed and relabelled y -> (y + 5) % 10."""
    from .idigits import idigits_domains

    mnist = idigits_domains(("mnist",))[0]
    cued = Domain("cued", _add_frame(mnist.train_x), (mnist.train_y + 5) % 10, _add_frame(mnist.test_x),
                  (mnist.test_y + 5) % 10)
    return [Domain("plain", mnist.train_x, mnist.train_y, mnist.test_x, mnist.test_y), cued]


_IDIGITS_BACKBONE = BackboneConfig(pretrain_data="idigits", in_chans=3, colour_augment=True, epochs=30)

SUITES: dict[str, Suite] = {
    "idigits": Suite("idigits", _idigits, _IDIGITS_BACKBONE, ("dil", "cil", "dg")),
    "transforms": Suite("transforms", _transforms, BackboneConfig(), ("dil", "cil", "dg")),
    "conflict": Suite("conflict", conflict_domains, _IDIGITS_BACKBONE, ("dil",), quick_domains=2),
}


def subsample(domain: Domain, train: int, test: int) -> Domain:
    """The first ``train`` / ``test`` images of a domain, class-balanced (quick mode)."""
    def pick(y: torch.Tensor, n: int) -> torch.Tensor:
        classes = y.unique()
        per = max(1, n // len(classes))
        return torch.cat([torch.nonzero(y == c).flatten()[:per] for c in classes])

    tr, te = pick(domain.train_y, train), pick(domain.test_y, test)
    return Domain(domain.name, domain.train_x[tr], domain.train_y[tr], domain.test_x[te], domain.test_y[te])
