"""The judge of the property suite: one backend against the float64 reference, through the public API.

* **Numerics.** ``got`` (the backend, on the drawn layouts) against ``want`` (the reference in
  float64 on the same values) must be within ``factor`` x ``own`` (the reference at the case's
  dtype on contiguous copies: PyTorch's own error) plus a floor: 2x for the forward, 3x for
  gradients (docs/kernels.md section 5).
* **Non-finite values.** Propagated, never created: the entries that are inf/NaN in ``got`` are
  exactly those that are inf/NaN in ``want`` (the error bound then applies to the finite rest).
* **Raise alike.** For the same arguments, every backend raises (the same exception type) or
  every backend returns.
"""

from __future__ import annotations

import torch

import mira_kernels as mk
from mira_kernels import reference

from .cases import OpCase

#: Absolute floor of the error bound, relative to max(1, the output's magnitude), per dtype.
FLOOR = {torch.float64: 1e-10, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
GRAD_NAMES = ("dx", "dquery", "dkeys", "dbank_a", "dbank_b")


class Finding(AssertionError):
    """A property does not hold: the message says which, with the numbers."""


def _leaf(t: torch.Tensor) -> torch.Tensor:
    # A detached view keeps the drawn strides (expanded, offset...) and is a leaf that can require grad.
    return t.detach().requires_grad_(True)


def run_linear(case: OpCase, backend: str | None, *, grads: bool = True):
    """(y, [dx, dquery, dkeys, dbank_a, dbank_b]) of the public op under ``backend`` (None: the default)."""
    x, q, k, a, b = (_leaf(t) for t in case.adapter_args())
    with mk.use_backend(backend):
        y = mk.mira_linear(x, case.weight, case.bias, q, k, a, b, **case.kwargs())
        if not grads:
            return y.detach(), None
        g = torch.autograd.grad(y, [x, q, k, a, b], case.grad_out, allow_unused=True)
    return y.detach(), [gi if gi is not None else torch.zeros_like(t) for gi, t in zip(g, (x, q, k, a, b))]


def _spec_tensors(case: OpCase, dtype: torch.dtype | None):
    """Contiguous copies of the case's values: in ``dtype`` (None: the case's own dtypes)."""
    def conv(t):
        if t is None:
            return None
        return (t.to(dtype) if dtype is not None else t).contiguous().detach()
    return [conv(t) for t in case.linear_args()], conv(case.grad_out)


def run_reference(case: OpCase, dtype: torch.dtype | None):
    """The plain reference's forward and autograd gradients on contiguous copies."""
    (x, w, bias, q, k, a, b), grad = _spec_tensors(case, dtype)
    leaves = [t.requires_grad_(True) for t in (x, q, k, a, b)]
    y = reference.mira_linear(x, w, bias, q, k, a, b, **case.kwargs())
    g = torch.autograd.grad(y, leaves, grad, allow_unused=True)
    return y.detach(), [gi if gi is not None else torch.zeros_like(t) for gi, t in zip(g, leaves)]


def _max_err(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    if not bool(mask.any()):
        return 0.0
    return (a.double() - b.double())[mask].abs().max().item()


def adapter_terms(case: OpCase) -> float:
    """The largest |term| the adapter's sums add up: |scale| (|x| . sum_n |w_n||A_n|) . sum_n |w_n||B_n|, float64.

    Why the floor scales with this and not with |output| (found by make fuzz: cpu, float32, affine, N = 2,
    d_k = 1, so w = (+100, -100) at the eps = 0.01 guard, and bank_b expanded so B_1 = B_2): the mixed
    factor sum_n w_n B_n is exactly 0 and the float64 output equals x W^T, while the products the kernel
    adds are ~|w|^2 |A||x||B| ~ 6e3. Any association of those sums in float32 (the kernel's is not the
    reference's; a contiguous bank_b gives the very same 8.2e-5) carries rounding of order u * 6e3
    (u = 6e-8: 3.5e-4), whatever |output| is. That is the standard error bound of a sum of products,
    n u sum |a_i b_i|, not a defect of the layout; the reference at float32 was exact here only by luck
    (its cosines came out exactly +-1). A wrong index or stride still errs by O(|output|) >> FLOOR x this.
    """
    if case.keys.shape[0] == 0 or case.x.numel() == 0:
        return 0.0
    (x, _, _, q, k, a, b), _ = _spec_tensors(case, torch.float64)
    w = reference.retrieval_weights(q, k, separation=case.separation, eps=case.eps).abs()
    mixed_a = torch.einsum("bn,nsrd->bsrd", w, a.abs())
    mixed_b = torch.einsum("bn,nser->bser", w, b.abs())
    terms = abs(case.scale) * torch.einsum("btsr,bser->btse", torch.einsum("btd,bsrd->btsr", x.abs(), mixed_a),
                                           mixed_b)
    terms = terms[torch.isfinite(terms)]
    return terms.max().item() if terms.numel() else 0.0


def factor_grad_terms(case: OpCase) -> dict[str, float]:
    """The largest |term| dx, dbank_a and dbank_b sum, float64: each the gradient of the adapter's
    output with every factor and weight taken by its absolute value, for |grad_out|.

    Why (found by make fuzz: cpu, float32, affine, N = 2, d_k = 1, x = NaN, bank_b expanded): as in
    adapter_terms, w = (+100, -100) at the eps = 0.01 guard makes sum_n w_n B_n exactly 0, so the float64
    dx is G W alone, while dx's adapter part sums G (scale B_b) A_b over products ~|G| |w|^2 |B| |A| ~ 1e2
    (cpu: 5.2e-5 off). adapter_terms could not see it: its terms go through |x|, here NaN, and dx does not.
    """
    if case.keys.shape[0] == 0 or case.x.numel() == 0:
        return {}
    (x, w_, _, q, k, a, b), grad = _spec_tensors(case, torch.float64)
    w = reference.retrieval_weights(q, k, separation=case.separation, eps=case.eps).abs()
    leaves = [t.abs().requires_grad_(True) for t in (x, a, b)]
    xa, aa, ba = leaves
    mixed_a = torch.einsum("bn,nsrd->bsrd", w, aa)
    mixed_b = torch.einsum("bn,nser->bser", w, ba)
    delta = abs(case.scale) * torch.einsum("btsr,bser->btse", torch.einsum("btd,bsrd->btsr", xa, mixed_a), mixed_b)
    full = reference._scatter_slices(delta, case.slice_offsets, w_.shape[0])
    grads = torch.autograd.grad(full, leaves, grad.abs(), allow_unused=True)
    terms = {}
    for name, g in zip(("dx", "dbank_a", "dbank_b"), grads):
        g = g[torch.isfinite(g)] if g is not None else torch.zeros(0)
        terms[name] = g.max().item() if g.numel() else 0.0
    return terms


def score_grad_terms(case: OpCase) -> tuple[float, float]:
    """The largest |term| dquery and dkeys sum, float64: 2 sum_n |dL/ds_bn| / max(|q_b|, 1e-12) and
    2 sum_b |dL/ds_bn| / max(|k_n|, 1e-12) (d cos / dq = (k^ - cos q^) / max(|q|, 1e-12), of norm
    <= 2 / max(|q|, 1e-12); likewise for a key).

    Why (found by make fuzz, three times): where the exact gradient cancels, the float64 reference gives 0
    (or 1e-11) while the summed terms are |dL/ds| / |q| (or / |k|). Keys that point one way (expanded, or
    d_k = 1 with keys of one sign) make dquery cancel (softmax and affine have sum_n dL/ds_n = 0): for a zero
    query under the contract's 1e-12 norm floor the terms are ~1e12 (cpu float64: 5.6e-5 = 5e-17 of them);
    for |q| = 1e-4 ~1e5 (reference float16, dquery computed in float32: 1.2e-2 = 1e-7 of them). With d_k = 1,
    k^ - cos q^ is exactly 0, so dkeys cancels: a key of norm 0.04 gives terms ~1e2 (Triton float32 under
    the interpreter: 4.2e-6 = 5e-9 of them). Rounding of that order is the standard bound n u sum |terms|
    of a sum, however small the sum; a wrong formula still errs by O(terms), far above FLOOR x terms.
    """
    if case.keys.shape[0] == 0 or case.x.numel() == 0:
        return 0.0, 0.0
    (x, w, _, q, k, a, b), grad = _spec_tensors(case, torch.float64)
    scores = reference.cosine_scores(q, k).detach().requires_grad_(True)
    weights = reference.separate(scores, case.separation, case.eps)
    mixed_a, mixed_b = reference.mix_adapters(weights, a, b)
    delta = case.scale * torch.einsum("btsr,bser->btse", torch.einsum("btd,bsrd->btsr", x, mixed_a), mixed_b)
    full = reference._scatter_slices(delta, case.slice_offsets, w.shape[0])
    (ds,) = torch.autograd.grad(full, scores, grad)

    def largest(sums, rows):
        terms = 2 * sums / torch.linalg.vector_norm(rows, dim=-1).clamp_min(reference.NORM_EPS)
        terms = terms[torch.isfinite(terms)]
        return terms.max().item() if terms.numel() else 0.0

    return largest(ds.abs().sum(-1), q), largest(ds.abs().sum(0), k)


def relu_kink_within_rounding(case: OpCase) -> bool:
    """relu separation with a score whose sign the case's compute dtype cannot resolve: |s| (float64) within
    the rounding of the cosine there, 4 (d_k + 2) u sum_i |q^_i k^_i| plus d_k x the smallest normal number.

    Why (found by make fuzz: reference backend, float32, relu, x = NaN, |q| = 1e-37 and |k_n| ~ 1e-37): both
    lie below the contract's 1e-12 norm floor, so q^ = q / 1e-12 and the scores are ~1e-50, which float32
    rounds to 0 while float64 keeps +1e-50. relu's gradient is a select (autograd of torch.relu: a NaN
    gradient stops where s <= 0), so dquery is NaN in float64 and exactly 0 at float32, the select taken on
    either side of a kink the float32 score cannot place. Both are the input's NaN or the mathematics' 0,
    never a value created, so dquery and dkeys may differ from float64 in which entries are non-finite
    there (the finite values are still judged). A dropped NaN away from the kink is still a finding.
    """
    if case.separation != "relu" or case.keys.shape[0] == 0 or case.query.shape[0] == 0:
        return False
    (_, _, _, q, k, _, _), _ = _spec_tensors(case, torch.float64)
    q_unit, k_unit = reference.normalize(q), reference.normalize(k)
    finfo = torch.finfo(reference.compute_dtype(case.x.dtype))
    d_k = q.shape[-1]
    rounding = 4 * (d_k + 2) * finfo.eps * (q_unit.abs() @ k_unit.abs().T) + d_k * finfo.tiny
    return bool(((q_unit @ k_unit.T).abs() <= rounding).any())


def judge(what: str, got: torch.Tensor, want: torch.Tensor, own: torch.Tensor, *, dtype: torch.dtype,
          factor: float, like: torch.Tensor | None = None, degenerate: bool = False,
          zero_times_nan: bool = False, terms: float = 0.0, select_ambiguous: bool = False) -> None:
    """Raises Finding unless ``got`` matches ``want`` as the module docstring says."""
    if like is not None and (got.shape != like.shape or got.dtype != like.dtype):
        raise Finding(f"{what}: shape/dtype {tuple(got.shape)} {got.dtype}, expected {tuple(like.shape)} "
                      f"{like.dtype}")
    got_bad, want_bad = ~torch.isfinite(got), ~torch.isfinite(want)
    # An entry whose float64 value lies beyond (half of) the output dtype's range may overflow there:
    # e.g. a zero query's gradient is grad / 1e-12 by the contract's norm floor, inf in float16.
    may_overflow = want.double().abs() > torch.finfo(got.dtype).max / 2
    # degenerate: scale = 0 or an empty B / T / N, where the float64 reference's NaN can come from an
    # exact zero times NaN (0 * NaN, a sum over no samples back through a NaN key's norm) that the
    # mathematics does not have; there a backend may return the finite value. zero_times_nan: such a
    # case with a non-finite input, where the backend's own order of operations may meet 0 * NaN where
    # the reference's does not (found by make fuzz: the reference backend's hand-written backward gave
    # dkeys NaN for a finite key at T = 0, scale = 0, a NaN key, where autograd gave 0): either is
    # accepted there, as both are the mathematics' 0 or the input's NaN, never a value created.
    created, lost = got_bad & ~want_bad & ~may_overflow, want_bad & ~got_bad
    if degenerate:
        lost = torch.zeros_like(lost)
    if zero_times_nan:
        created = torch.zeros_like(created)
    if select_ambiguous:  # relu_kink_within_rounding: the select may fall either way at the case's dtype
        created, lost = torch.zeros_like(created), torch.zeros_like(lost)
    if bool(created.any()) or bool(lost.any()):
        raise Finding(f"{what}: non-finite entries differ from the float64 reference (created at "
                      f"{created.nonzero()[:3].tolist()}, lost at {lost.nonzero()[:3].tolist()})")
    mask = ~want_bad & ~got_bad & torch.isfinite(own) & ~may_overflow
    err = _max_err(got, want, mask)
    own_err = _max_err(own, want, mask)
    magnitude = want.double()[mask].abs().max().item() if bool(mask.any()) else 0.0
    # terms: the largest |term| summed into the output (adapter_terms), where cancellation makes it >> |output|.
    bound = factor * own_err + FLOOR[dtype] * max(1.0, magnitude, terms)
    if err > bound:
        raise Finding(f"{what}: max-abs error {err:.3e} > {factor} x PyTorch's own {own_err:.3e} + floor = "
                      f"{bound:.3e} (|output| up to {magnitude:.3e})")


def is_degenerate(case: OpCase) -> bool:
    return case.scale == 0 or min(case.x.shape[0], case.x.shape[1], case.keys.shape[0]) == 0


def zero_times_nan(case: OpCase) -> bool:
    """A degenerate case with a non-finite input value (judge's zero_times_nan)."""
    return is_degenerate(case) and "non_finite" in case.notes


def check_linear(case: OpCase, backend: str, *, grads: bool = True) -> None:
    """``backend`` on ``case`` against the float64 reference: forward, and every gradient."""
    got_y, got_g = run_linear(case, backend, grads=grads)
    judge_linear(case, backend, got_y, got_g)


def judge_linear(case: OpCase, label: str, got_y: torch.Tensor, got_g: list[torch.Tensor] | None) -> None:
    """An op's output on ``case`` and, unless ``got_g`` is None, its gradients (dx, dquery, dkeys,
    dbank_a, dbank_b for ``case.grad_out``), against the float64 reference (check_linear's verdict)."""
    dtype = case.x.dtype
    degenerate = is_degenerate(case)
    want_y, want_g = run_reference(case, torch.float64)
    own_y, own_g = run_reference(case, None)
    judge(f"{label} y", got_y, want_y, own_y, dtype=dtype, factor=2.0, like=case.x.new_empty(
        case.x.shape[0], case.x.shape[1], case.weight.shape[0]), degenerate=degenerate,
        zero_times_nan=zero_times_nan(case), terms=adapter_terms(case))
    if got_g is None:
        return
    like = [case.x, case.query, case.keys, case.bank_a, case.bank_b]
    terms = {**dict(zip(("dquery", "dkeys"), score_grad_terms(case))), **factor_grad_terms(case)}
    at_kink = relu_kink_within_rounding(case)
    for name, g, w, o, t in zip(GRAD_NAMES, got_g, want_g, own_g, like):
        judge(f"{label} {name}", g, w, o, dtype=t.dtype, factor=3.0, like=t, degenerate=degenerate,
              zero_times_nan=zero_times_nan(case), terms=terms.get(name, 0.0),
              select_ambiguous=at_kink and name in ("dquery", "dkeys"))


def outcome(fn):
    """('return', value) or ('raise', exception type name, message) of fn()."""
    try:
        return ("return", fn())
    except (ValueError, TypeError, RuntimeError, IndexError) as err:
        return ("raise", type(err).__name__, str(err).splitlines()[0] if str(err) else "")


def check_raise_alike(case: OpCase, backends, call) -> str:
    """Every backend raises the same exception type or every one returns; returns what they did."""
    seen = {b: outcome(lambda b=b: call(case, b)) for b in backends}
    kinds = {b: o[:2] if o[0] == "raise" else ("return",) for b, o in seen.items()}
    if len(set(kinds.values())) != 1:
        detail = "; ".join(f"{b}: {o[0]} {o[1] if o[0] == 'raise' else ''} {o[2] if o[0] == 'raise' else ''}"
                           for b, o in seen.items())
        raise Finding(f"backends disagree on {case!r}: {detail}")
    return next(iter(kinds.values()))[0]


def linear_call(case: OpCase, backend: str):
    with mk.use_backend(backend):
        return mk.mira_linear(*case.linear_args(), **case.kwargs())


def adapter_call(case: OpCase, backend: str, out: torch.Tensor):
    with mk.use_backend(backend):
        return mk.mira_adapter_(out, *case.adapter_args(), **case.kwargs())


def check_adapter(case: OpCase, backend: str, out: torch.Tensor) -> None:
    """mira_adapter_ into ``out`` (may be x itself) against the reference's in-place update, in float64."""
    is_alias = out is case.x
    start = out.detach().clone()
    want = start.double().contiguous()
    (x, _, _, q, k, a, b), _ = _spec_tensors(case, torch.float64)
    reference.mira_adapter_(want, x, q, k, a, b, **case.kwargs())
    own = start.contiguous().clone()
    (xo, _, _, qo, ko, ao, bo), _ = _spec_tensors(case, None)
    reference.mira_adapter_(own, xo, qo, ko, ao, bo, **case.kwargs())
    with torch.no_grad():
        returned = adapter_call(case, backend, out)
    if returned is not out:
        raise Finding(f"{backend} mira_adapter_ returned a tensor other than out")
    judge(f"{backend} adapter{' (out = x)' if is_alias else ''}", out, want, own, dtype=case.x.dtype, factor=2.0,
          like=start, degenerate=is_degenerate(case), zero_times_nan=zero_times_nan(case), terms=adapter_terms(case))
