"""mira-kernels: fused MIRA (Memory-Integrated Reconfigurable Adapters) ops for PyTorch.

Public ops (contract: ``docs/contract.md``):

- :func:`mira_linear`: a frozen projection with MIRA's per-sample adapter fused in (autograd).
- :func:`mira_adapter_`: the adapter alone, added in place into an existing output (inference).
- :func:`retrieval_weights`: the (B, N) association matrix, for inspection and query training.

:mod:`mira_kernels.reference` is the plain-PyTorch specification; :mod:`mira_kernels.backends`
chooses which implementation runs (``available_backends``, ``use_backend``, ``MIRA_BACKEND``;
``resolve_backend(device, dtype)`` names the one a call would take; ``BACKENDS`` lists them all).
``check_finite()`` turns on the debug check of inputs (as ``MIRA_CHECK_FINITE=1``); ``build_info()``
says what this installation was built with and what loaded. ``SEPARATIONS`` and ``DEFAULT_EPS``
are the ops' ``separation`` choices and the affine guard's default ``eps``.
"""

from . import reference
from ._config import check_finite
from ._extension import build_info
from .backends import BACKENDS, available_backends, resolve_backend, use_backend
from .ops import mira_adapter_, mira_linear, retrieval_weights
from .reference import DEFAULT_EPS, SEPARATIONS

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "DEFAULT_EPS",
    "SEPARATIONS",
    "available_backends",
    "build_info",
    "check_finite",
    "mira_adapter_",
    "mira_linear",
    "reference",
    "resolve_backend",
    "retrieval_weights",
    "use_backend",
]
