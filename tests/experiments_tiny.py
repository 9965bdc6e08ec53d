"""``python -m mira.experiments`` with one more suite, ``tiny``, for tests that launch the command
line (e.g. under torchrun): 2 domains of the transforms suite (sklearn digits, no download), a
3-epoch 2-block backbone. Nothing else differs from the command:
``python -m tests.experiments_tiny dil --suite tiny --quick ...`` runs its ``main``."""

from __future__ import annotations

import contextlib

from mira.experiments import __main__ as cli
from mira.experiments.backbone import BackboneConfig
from mira.experiments.suites import Suite

TINY = Suite("tiny", lambda: cli.SUITES["transforms"].domains()[:2],
             BackboneConfig(embed_dim=32, depth=2, num_heads=2, epochs=3), ("dil", "cil", "dg"), quick_domains=2)


@contextlib.contextmanager
def tiny_suite():
    """``--suite tiny`` is accepted while inside."""
    cli.SUITES["tiny"] = TINY
    try:
        yield
    finally:
        del cli.SUITES["tiny"]


def main(argv=None) -> dict:
    with tiny_suite():
        return cli.main(argv)


if __name__ == "__main__":
    main()
