"""Hypothesis strategies for MIRA op inputs.

A drawn :class:`OpCase` holds every argument of ``mira_linear`` / ``mira_adapter_``: shapes
(including B = 0, T = 0, N = 0, d_k unlike d_in), dtypes (16-bit x with a float32 or 16-bit memory
side, per tensor), a slice layout (any order, gaps, touching), separation, scale, eps, and values
in several regimes (query/keys aligned with one slot, a near-zero affine sum, huge and tiny query
and key magnitudes, non-finite entries). Every tensor argument is then laid out at random:
contiguous, transposed, strided, expanded (stride 0) or at a storage offset. Values are drawn
from a seeded generator, so a case replays exactly from hypothesis' choices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st

from mira_kernels import SEPARATIONS

from ..mira_inputs import OpInputs

HALF = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
LAYOUTS = ("contiguous", "transposed", "strided", "expanded", "offset")
# Value regimes of query and keys: one slot aligned with each query, an affine sum near zero, norms
# whose squares overflow or underflow, a zero query.
REGIMES = ("random", "one_slot", "near_zero", "huge", "tiny", "zero_query")
MEMORY = ("query", "keys", "bank_a", "bank_b")
#: Largest magnitude of a query / key that each dtype holds with room (scores stay exact).
HUGE = {torch.float64: 1e300, torch.float32: 1e37, torch.bfloat16: 1e37, torch.float16: 6e4}
TINY = {torch.float64: 1e-300, torch.float32: 1e-37, torch.bfloat16: 1e-37, torch.float16: 1e-4}


@dataclass
class OpCase(OpInputs):
    """A drawn case: :class:`OpInputs`' tensors and slices, plus the op's scalar arguments."""

    separation: str
    scale: float
    eps: float
    grad_out: torch.Tensor
    notes: dict = field(default_factory=dict)

    def kwargs(self):
        return dict(slice_offsets=self.slice_offsets, separation=self.separation, scale=self.scale, eps=self.eps)

    @property
    def finite(self) -> bool:
        return all(t is None or bool(torch.isfinite(t).all()) for t in self.linear_args())

    def __repr__(self) -> str:  # what hypothesis prints for a failing example
        shapes = {n: tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                  for n, t in zip(("x", "weight", "bias", "query", "keys", "bank_a", "bank_b"), self.linear_args())
                  if t is not None}
        return (f"OpCase(dtype={getattr(self.x, 'dtype', None)}, shapes={shapes}, offsets={self.slice_offsets}, "
                f"separation={self.separation!r}, scale={self.scale!r}, eps={self.eps!r}, notes={self.notes})")


def lay_out(t: torch.Tensor, layout: str, dim: int = 0) -> torch.Tensor:
    """The values of ``t`` (or, for ``expanded``, of its first entry along ``dim``) in another layout."""
    if t.dim() == 0 or t.numel() == 0 or layout == "contiguous":
        return t.contiguous()
    if layout == "transposed":
        order = list(range(t.dim()))[::-1]
        return t.permute(order).contiguous().permute(order)
    if layout == "strided":
        buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype)
        view = buf[..., 1::2]
        view.copy_(t)
        return view
    if layout == "expanded":
        return t.narrow(dim, 0, 1).expand(t.shape)
    if layout == "offset":
        buf = torch.zeros(t.numel() + 5, dtype=t.dtype)
        view = buf[5:].view(t.shape)
        view.copy_(t)
        return view
    raise ValueError(layout)


@st.composite
def slice_layouts(draw, max_s: int = 3, max_ds: int = 8):
    """(d_s, offsets, d_out): S slices of width d_s in any order, with gaps (0 = touching)."""
    s = draw(st.integers(1, max_s))
    d_s = draw(st.integers(1, max_ds))
    order = draw(st.permutations(range(s)))
    gaps = draw(st.lists(st.integers(0, 3), min_size=s + 1, max_size=s + 1))
    offsets = [0] * s
    cur = gaps[0]
    for i, slot in enumerate(order):
        offsets[slot] = cur
        cur += d_s + gaps[i + 1]
    return d_s, offsets, cur


def _near_zero_keys(g, query, n, d_k):
    # Keys whose cosines with query[0] sum to ~1e-4: inside the affine guard.
    unit = query[0] / query[0].norm().clamp_min(1e-300)
    base = torch.randn(n - 1, d_k, generator=g, dtype=torch.float64)
    cos = (base / base.norm(dim=1, keepdim=True).clamp_min(1e-300)) @ unit
    target = (-(cos.sum() - 1e-4)).clamp(-0.999, 0.999)
    ortho = torch.randn(d_k, generator=g, dtype=torch.float64)
    ortho = ortho - (ortho @ unit) * unit
    ortho = ortho / ortho.norm().clamp_min(1e-300)
    return torch.cat([base, (target * unit + (1 - target**2).sqrt() * ortho)[None]])


@st.composite
def op_cases(draw, *, max_b=4, max_t=6, max_d=12, max_n=5, max_dk=8, dtypes=DTYPES, hostile=True,
             layouts=LAYOUTS, separations=SEPARATIONS, huge=True, regimes=None, min_size=0, non_finite=True):
    """A valid op call. ``hostile``: also extreme and non-finite values (``huge``: query / key
    magnitudes whose squared norm overflows float32). ``regimes``: only these value regimes;
    ``min_size``: the least B, T and N; ``non_finite``: may put a NaN or inf in one tensor."""
    dtype = draw(st.sampled_from(dtypes))
    mem_dtypes = {n: (draw(st.sampled_from([dtype, torch.float32])) if dtype in HALF else dtype) for n in MEMORY}
    b = draw(st.integers(min_size, max_b))
    t = draw(st.integers(min_size, max_t))
    d_in = draw(st.integers(1, max_d))
    d_k = draw(st.integers(1, max_dk))
    n = draw(st.integers(min_size, max_n))
    r = draw(st.integers(1, 4))
    d_s, offsets, d_out = draw(slice_layouts())
    s = len(offsets)
    separation = draw(st.sampled_from(separations))
    scale = draw(st.one_of(st.floats(-3, 3, allow_nan=False), st.sampled_from([0.0, 1.0, 1e-3, 50.0])))
    eps = draw(st.sampled_from([1e-2, 1e-4, 0.3, 1.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    # Magnitudes that keep every output representable in 16 bits (the contract lets x W^T overflow).
    mag = 1.0 if dtype != torch.float16 else 0.5
    x = randn(b, t, d_in) * mag
    weight = randn(d_out, d_in) * mag / math.sqrt(d_in)
    bias = randn(d_out) if draw(st.booleans()) else None
    query, keys = randn(b, d_k), randn(n, d_k)
    if regimes is None:
        regimes = list(REGIMES) if hostile else ["random", "one_slot", "near_zero"]
    if not huge:
        regimes = [r for r in regimes if r != "huge"]
    regime = draw(st.sampled_from(regimes))
    if regime == "one_slot" and n > 0 and b > 0:
        query = keys[torch.arange(b) % n] * 3.0
    elif regime == "near_zero" and n >= 2 and b > 0:
        query = query[:1].repeat(b, 1)
        keys = _near_zero_keys(g, query, n, d_k)
    elif regime in ("huge", "tiny"):
        which = draw(st.sampled_from(["query", "keys", "both"]))
        # The smallest of the memory dtypes bounds what the magnitude may be.
        mdt = min((mem_dtypes["query"], mem_dtypes["keys"]), key=lambda d: torch.finfo(d).max)
        factor = HUGE[mdt] if regime == "huge" else TINY[mdt]
        if which in ("query", "both") and query.numel():
            query = query / query.abs().amax().clamp_min(1e-300) * factor
        if which in ("keys", "both") and keys.numel():
            keys = keys / keys.abs().amax().clamp_min(1e-300) * factor
    elif regime == "zero_query":
        query = query * 0
    bank_a = randn(n, s, r, d_in) * mag / math.sqrt(d_in)
    bank_b = randn(n, s, d_s, r) * mag / math.sqrt(r)
    grad_out = randn(b, t, d_out)

    values = dict(x=x, weight=weight, bias=bias, query=query, keys=keys, bank_a=bank_a, bank_b=bank_b)
    notes = {"regime": regime, "seed": seed}
    if hostile and non_finite and draw(st.integers(0, 3)) == 0:  # a non-finite entry in one tensor
        name = draw(st.sampled_from([k for k, v in values.items() if v is not None and v.numel() > 0] or ["x"]))
        target = values[name]
        if target is not None and target.numel() > 0:
            index = draw(st.integers(0, target.numel() - 1))
            value = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
            target.view(-1)[index] = value
            notes["non_finite"] = f"{name}[{index}] = {value}"

    laid = {}
    for name, v in values.items():
        if v is None:
            laid[name] = None
            continue
        v = v.to(dtype if name in ("x", "weight", "bias") else mem_dtypes[name])
        layout = draw(st.sampled_from(layouts))
        dim = draw(st.integers(0, v.dim() - 1)) if v.dim() else 0
        laid[name] = lay_out(v, layout, dim)
        if layout != "contiguous":
            notes[name] = layout if layout != "expanded" else f"expanded({dim})"
    return OpCase(**laid, slice_offsets=offsets, separation=separation, scale=scale, eps=eps,
                  grad_out=lay_out(grad_out.to(dtype), draw(st.sampled_from(layouts))), notes=notes)


# ----------------------------------------------------------------------------------------------
# Invalid calls: one fault in an otherwise valid case (both backends must raise alike).
# ----------------------------------------------------------------------------------------------

FAULTS = ("rank", "size", "dtype", "int_dtype", "offset_range", "offset_overlap", "offset_huge", "offset_count",
          "eps", "eps_type", "scale", "scale_type", "separation", "tensor_type")


@st.composite
def faulty_calls(draw, faults=FAULTS, **kw):
    """(case, fault): ``case`` with one argument broken as ``fault`` (one of ``faults``) says; "none"
    where the fault does not apply to the case (an overlap needs two slices)."""
    case = draw(op_cases(hostile=False, **kw))
    fault = draw(st.sampled_from(faults))
    names = ["x", "weight", "query", "keys", "bank_a", "bank_b"] + (["bias"] if case.bias is not None else [])
    name = draw(st.sampled_from(names))
    t = getattr(case, name)
    if fault == "rank":
        setattr(case, name, t.unsqueeze(0))
    elif fault == "size":
        dim = draw(st.integers(0, t.dim() - 1))
        grown = torch.cat([t, t.narrow(dim, 0, 1)], dim) if t.shape[dim] > 0 else torch.zeros(
            *[(2 if i == dim else n) for i, n in enumerate(t.shape)], dtype=t.dtype)
        setattr(case, name, grown)
    elif fault == "dtype":
        other = torch.float64 if t.dtype != torch.float64 else torch.float32
        setattr(case, name, t.to(other))
    elif fault == "int_dtype":
        setattr(case, name, t.to(torch.int32))
    elif fault == "offset_range":  # the slice starts before 0 or ends past d_out
        i = draw(st.integers(0, len(case.slice_offsets) - 1))
        d_out, d_s = case.weight.shape[0], case.bank_b.shape[2]
        case.slice_offsets[i] = draw(st.sampled_from([-1, d_out - d_s + 1, d_out + 10]))
    elif fault == "offset_overlap" and len(case.slice_offsets) >= 2:
        case.slice_offsets[1] = case.slice_offsets[0]
    elif fault == "offset_huge":
        i = draw(st.integers(0, len(case.slice_offsets) - 1))
        case.slice_offsets[i] = draw(st.sampled_from([2**63 - 1, 2**63 - 4, 2**62, -(2**63)]))
    elif fault == "offset_count":
        case.slice_offsets = case.slice_offsets + [0]
    elif fault == "eps":
        case.eps = draw(st.sampled_from([0.0, -1.0, math.inf, math.nan]))
    elif fault == "eps_type":
        case.eps = draw(st.sampled_from(["0.5", None, torch.tensor(0.5)]))
    elif fault == "scale":
        case.scale = draw(st.sampled_from([math.inf, -math.inf, math.nan]))
    elif fault == "scale_type":
        case.scale = draw(st.sampled_from(["2", True, 1j]))
    elif fault == "separation":
        case.separation = draw(st.sampled_from(["cosine", "Affine", "", "relu "]))
    elif fault == "tensor_type":
        setattr(case, name, t.tolist())
    else:
        fault = "none"
    case.notes["fault"] = f"{fault} ({name})"
    return case, fault
