"""DualGPM: gradient projection memory for the continual settings (DIL, CIL).

Gradient Projection Memory (Saha et al., 2021) keeps, per projected module, an orthonormal
basis ``U`` (d, k) of the input activations the module saw on past tasks. A linear map ``W``
(out, d) whose gradient ``G`` is replaced by ``G - G U U^T`` changes only in directions
orthogonal to every stored input, so its outputs on past inputs stay (to the energy threshold)
what they were. The "dual" part (Liang & Li, 2023) stores whichever is smaller: the basis of
the protected space or of its orthogonal complement ``C`` (then the projection is ``G C C^T``);
both give the same projector, the dual form just keeps memory and cost at ``min(k, d - k)``.

Growth (after each task, from one batch of activations ``R`` (n, d)): the part of ``R``'s energy
the basis already captures is ``||R||^2 - ||R_res||^2`` with ``R_res = R (I - U U^T)``; the
top singular directions of ``R_res`` are added, fewest first, until the captured fraction
reaches ``threshold`` (0.7 in the MIRA recipe).

What is projected in MIRA (method.md section 3): the keys of each block (a key's gradient lies
in the span of the queries that scored it, so the keys' "input activations" are that block's
queries), the query modules' linear layers, and the head. A bias is treated as the weight of a
constant-1 input, so ``[W b]`` is projected against activations augmented with a ones column.
"""

from __future__ import annotations

import numbers

import torch

__all__ = ["GradientProjectionMemory", "ProjectedParameter"]


class _Basis:
    """Orthonormal basis of a protected subspace of R^d, stored in primal or dual form."""

    def __init__(self, dim: int):
        self.dim = dim
        self.dual = False  # False: `mat` spans the protected space; True: its complement
        self.mat = torch.zeros(dim, 0, dtype=torch.float64)

    @property
    def rank(self) -> int:
        return self.dim - self.mat.shape[1] if self.dual else self.mat.shape[1]

    def protected(self) -> torch.Tensor:
        """(d, k) orthonormal basis of the protected space (computed from the complement if dual)."""
        if not self.dual:
            return self.mat
        # complement of the complement: the left singular vectors past the stored columns
        full = torch.linalg.svd(self.mat, full_matrices=True)[0]
        return full[:, self.mat.shape[1]:]

    def residual(self, r: torch.Tensor) -> torch.Tensor:
        """Component of the rows of r (n, d) orthogonal to the protected space."""
        if self.dual:
            return (r @ self.mat) @ self.mat.T
        return r - (r @ self.mat) @ self.mat.T

    def add(self, new: torch.Tensor) -> None:
        """Add orthonormal directions ``new`` (d, m), orthogonal to the protected space."""
        if self.dual:
            # new lies inside span(C): keep the part of span(C) orthogonal to new.
            m = self.mat.T @ new  # (c, m), orthonormal columns
            u = torch.linalg.svd(m, full_matrices=True)[0]
            self.mat = self.mat @ u[:, new.shape[1]:]
        else:
            # QR re-orthonormalises: rounding must not let the basis drift from orthonormal.
            self.mat = torch.linalg.qr(torch.cat([self.mat, new], dim=1))[0]
        if not self.dual and self.mat.shape[1] > self.dim // 2:
            self.mat = torch.linalg.svd(self.mat, full_matrices=True)[0][:, self.mat.shape[1]:]
            self.dual = True


class GradientProjectionMemory:
    """Per-name bases of past input activations and the projection of gradients against them.

    Args:
        threshold: fraction of an activation batch's energy the basis must capture (0 < t <= 1).
        enabled: when False, :meth:`update` and :meth:`project_` do nothing (the switch).
    """

    def __init__(self, threshold: float = 0.7, enabled: bool = True):
        # bool is an int: threshold=True would silently mean 1.0 (protect everything)
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
            raise TypeError(f"threshold must be a real number in (0, 1], got {threshold!r} "
                            f"({type(threshold).__name__}); pass e.g. threshold=0.7")
        if not 0.0 < threshold <= 1.0:  # NaN fails this too
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.enabled = enabled
        self._bases: dict[str, _Basis] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._bases

    def rank(self, name: str) -> int:
        return self._bases[name].rank if name in self._bases else 0

    def basis(self, name: str) -> torch.Tensor:
        """(d, k) orthonormal float64 basis of the protected input space of ``name``."""
        return self._bases[name].protected()

    def is_dual(self, name: str) -> bool:
        return self._bases[name].dual

    def state_dict(self) -> dict:
        """Every basis (float64, as stored: primal or dual), for checkpoints and for broadcasting
        one rank's bases to the others."""
        # The memory layout is part of the state: LAPACK returns column-major bases, and a product
        # with a row-major copy rounds differently; "strides" lets a reload (from a format that
        # stores row-major, such as safetensors) continue bit for bit.
        bases = {name: {"dim": b.dim, "dual": b.dual, "mat": b.mat.clone(), "strides": list(b.mat.stride())}
                 for name, b in self._bases.items()}
        return {"threshold": self.threshold, "enabled": self.enabled, "bases": bases}

    def load_state_dict(self, state: dict) -> None:
        """Replace every basis by those of ``state`` (from :meth:`state_dict`)."""
        bases = {}
        for name, b in state["bases"].items():
            basis = _Basis(int(b["dim"]))
            basis.dual = bool(b["dual"])
            mat = b["mat"].to("cpu", torch.float64)
            strides = tuple(b.get("strides", mat.stride()))
            basis.mat = torch.empty_strided(mat.shape, strides, dtype=torch.float64).copy_(mat)
            bases[name] = basis
        self.threshold, self.enabled, self._bases = float(state["threshold"]), bool(state["enabled"]), bases

    @torch.no_grad()
    def update(self, name: str, activations: torch.Tensor) -> int:
        """Grow the basis of ``name`` from activations (n, d); returns how many directions were added.

        An empty batch (no rows) adds nothing and creates no basis. Non-finite activations are
        refused (ValueError); a refused call changes nothing.
        """
        if not self.enabled:
            return 0
        eps = torch.finfo(activations.dtype if activations.dtype.is_floating_point else torch.float64).eps
        r = activations.detach().reshape(-1, activations.shape[-1]).to("cpu", torch.float64)
        # Every check comes before the basis is registered, so a refused call leaves no basis behind
        # (an inf used to read as "nothing to add", a NaN as a LAPACK error, both after registering).
        if not bool(torch.isfinite(r).all()):
            raise ValueError(f"{name}: activations hold non-finite values (NaN or inf); GPM can only "
                             "protect finite inputs: find where the forward overflows")
        basis = self._bases[name] if name in self._bases else _Basis(r.shape[1])
        if basis.dim != r.shape[1]:
            raise ValueError(f"{name}: activations have dim {r.shape[1]}, basis has {basis.dim}")
        if r.shape[0] == 0:  # no rows: nothing to protect, and no dimension to pin a new basis to
            return 0
        total = r.square().sum()
        if not bool(torch.isfinite(total)):
            raise ValueError(f"{name}: the activations' energy (sum of squares) overflows float64; "
                             "scale them down (the captured fraction does not depend on scale)")
        self._bases[name] = basis
        if total <= 0:
            return 0
        res = basis.residual(r)
        captured = total - res.square().sum()
        if captured >= self.threshold * total:
            return 0
        _, s, vh = torch.linalg.svd(res, full_matrices=False)
        need = self.threshold * total - captured
        k = int(torch.searchsorted(torch.cumsum(s.square(), 0), need).item()) + 1
        # Directions below the activations' own rounding are noise, not inputs: the cutoff is absolute
        # (the batch's norm times its dtype's eps times max(n, d)), not relative to the residual's largest
        # singular value, which is itself rounding noise once the basis holds the batch (at threshold
        # 1.0 a float32 batch of rank 3 otherwise protected every direction of R^d).
        cutoff = total.sqrt() * eps * max(r.shape)
        k = min(k, int((s > cutoff).sum().item()))
        if k == 0:
            return 0
        before = basis.rank
        basis.add(vh[:k].T.contiguous())
        return basis.rank - before  # what was added, should re-orthonormalisation have merged a column

    @torch.no_grad()
    def project_(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """In place: grad (..., d) <- its component orthogonal to the protected space of ``name``."""
        if not self.enabled or name not in self._bases or self._bases[name].rank == 0:
            return grad
        basis = self._bases[name]
        mat = basis.mat.to(grad.device, grad.dtype)
        # reshape copies a gradient whose layout has no (-1, d) view (non-contiguous): the result is
        # written back into ``grad`` itself, whatever its layout.
        flat = grad.reshape(-1, grad.shape[-1])
        proj = (flat @ mat) @ mat.T
        grad.copy_((proj if basis.dual else flat - proj).view(grad.shape))
        return grad


class ProjectedParameter:
    """Binds a weight (out, d) and optional bias (out,) to a basis name for :meth:`project`.

    With a bias, the protected space lives in R^{d+1} (inputs augmented with a constant 1), so
    :meth:`augment` must be applied to the activations given to :meth:`GradientProjectionMemory.update`.
    """

    def __init__(self, name: str, weight: torch.nn.Parameter, bias: torch.nn.Parameter | None = None):
        self.name, self.weight, self.bias = name, weight, bias

    def augment(self, activations: torch.Tensor) -> torch.Tensor:
        a = activations.reshape(-1, activations.shape[-1])
        if self.bias is None:
            return a
        return torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)

    @torch.no_grad()
    def project(self, gpm: GradientProjectionMemory) -> None:
        if self.weight.grad is None:
            return
        if self.bias is None:
            gpm.project_(self.name, self.weight.grad)
            return
        bias_grad = self.bias.grad if self.bias.grad is not None else torch.zeros_like(self.bias)
        joint = torch.cat([self.weight.grad, bias_grad.unsqueeze(-1)], dim=-1)
        gpm.project_(self.name, joint)
        self.weight.grad.copy_(joint[..., :-1])
        if self.bias.grad is not None:
            self.bias.grad.copy_(joint[..., -1])
