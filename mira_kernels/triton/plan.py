"""The Triton backend's launch plans as :class:`mira_kernels.launch_plan.OpPlan` records (for the GPU model).

``describe(op, *args, sms=None)`` runs the backend's own planner (:mod:`.launchers`) on the given
(``meta``) tensors, so the records list exactly the launches, grids and constexprs a GPU call
makes, then prices each launch from its grid, constexprs and argument shapes with the cost
function of its kernel below: executed FLOPs per unit (padding and per-program recomputation
included), compulsory device-memory bytes, L2 re-reads, and dependent steps per program.
"""

from __future__ import annotations

import math

import torch

from ..launch_plan import KernelLaunch, OpPlan
from . import launchers

_SIZE = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4, torch.float64: 8}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _size(t) -> int:
    return _SIZE[t.dtype]


def _dot_flops(precision: str, dtype: torch.dtype, flops: float) -> dict[str, float]:
    """FLOPs of a tl.dot with ``input_precision`` on operands of ``dtype``, split by unit."""
    if dtype == torch.float64:
        return {"tc_fp64": flops}
    if dtype in (torch.float16, torch.bfloat16):
        return {"tc_bf16" if dtype == torch.bfloat16 else "tc_fp16": flops}
    if precision == "tf32x3":
        return {"tc_tf32": 3 * flops}
    if precision == "tf32":
        return {"tc_tf32": flops}
    return {"fma_fp32": flops}


def _add(*parts: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for p in parts:
        for k, v in p.items():
            out[k] = out.get(k, 0.0) + v
    return out


def _pipelined(iterations: int, stages: int) -> int:
    # A software-pipelined loop keeps `stages - 1` loads in flight: its dependent chain is about
    # iterations / (stages - 1) memory latencies plus the prologue.
    stages = max(stages, 2)
    return max(1, math.ceil(iterations / (stages - 1)) + stages - 1)


def _samples_per_tile(T: int, block_m: int, M: int) -> float:
    # Row tiles ignore sample boundaries: a tile of block_m rows touches 1 + (block_m - 1) / T
    # samples on average (at most the rows it has), each one masked dot.
    return min(1.0 + (block_m - 1) / max(T, 1), float(min(block_m, M)))


# ----------------------------------------------------------------------------------------------
# Cost of each kernel (the one function per kernel the model relies on).
# ----------------------------------------------------------------------------------------------


def _mix_fwd(launch) -> dict:
    a, c = launch.args, launch.constexprs
    b_tiles, split = launch.grid
    B, N, DK, FA, FB = a["B"], a["N"], a["DK"], a["FA"], a["FB"]
    bb, n_pad, bk, bf = c["BLOCK_B"], c["N_PAD"], c["BLOCK_K"], c["BLOCK_F"]
    ct = a["mixed_a_ptr"].dtype
    k_steps = _cdiv(DK, bk)
    score = 2.0 * bb * n_pad * k_steps * bk * b_tiles * split  # every program recomputes its tile's scores
    mixing = 2.0 * b_tiles * bb * n_pad * (_cdiv(FA, bf) + _cdiv(FB, bf)) * bf
    qs, ks, bs = _size(a["q_ptr"]), _size(a["k_ptr"]), _size(a["bank_a_ptr"])
    keys_bytes = N * DK * ks
    bank_bytes = N * (FA + FB) * bs
    stats = (2 * B * N + B + N) * _SIZE[ct] if c["SAVE_STATS"] else 0
    chunks = _cdiv(_cdiv(FA, bf), split) + _cdiv(_cdiv(FB, bf), split)
    return dict(
        flops=_add(_dot_flops(c["SCORE_PRECISION"], ct, score), _dot_flops(c["LORA_PRECISION"], ct, mixing)),
        bytes_read=B * DK * qs + keys_bytes + bank_bytes,
        bytes_written=B * (FA + FB) * _SIZE[ct] + stats,
        l2_bytes=keys_bytes * (b_tiles * split - 1) + bank_bytes * (b_tiles - 1) + B * DK * qs * (split - 1),
        steps=k_steps + chunks,
        useful_flops=2.0 * B * N * DK + 2.0 * B * N * (FA + FB),
        note=f"scores recomputed by each of {split} column-share programs per {bb}-sample tile",
    )


def _shrink(launch) -> dict:
    a, c = launch.args, launch.constexprs
    m_tiles, slices = launch.grid
    M, T, K, J = a["M"], a["T"], a["K"], a["J"]
    bm, bk, j_pad = c["BLOCK_M"], c["BLOCK_K"], c["J_PAD"]
    ct = a["out_ptr"].dtype
    spt = _samples_per_tile(T, bm, M)
    k_steps = _cdiv(K, bk)
    flops = 2.0 * m_tiles * slices * bm * j_pad * k_steps * bk * spt
    B = _cdiv(M, T) if T else 0
    factor_bytes = B * slices * J * K * _SIZE[a["f_ptr"].dtype]
    return dict(
        flops=_dot_flops(c["LORA_PRECISION"], ct, flops),
        bytes_read=M * slices * K * _size(a["in_ptr"]) + factor_bytes,
        bytes_written=M * slices * J * _SIZE[ct],
        l2_bytes=factor_bytes * max(0.0, m_tiles * spt / max(B, 1) - 1),
        steps=_pipelined(k_steps * math.ceil(spt), 2),
        useful_flops=2.0 * M * slices * J * K,
    )


def _linear_fwd(launch) -> dict:
    a, c = launch.args, launch.constexprs
    M, NOUT, K, T, J, SW = a["M"], a["NOUT"], a["K"], a["T"], a["J"], a["SLICE_W"]
    bm, bn, bk = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
    m_tiles, n_tiles = _cdiv(M, bm), _cdiv(NOUT, bn)
    x, w, out = a["x_ptr"], a["w_ptr"], a["out_ptr"]
    k_steps = _cdiv(K, bk)
    base = 2.0 * m_tiles * bm * n_tiles * bn * k_steps * bk
    flops = _dot_flops(c["BASE_PRECISION"], x.dtype, base)
    useful = 2.0 * M * NOUT * K
    lora_bytes = 0.0
    extra_steps = 0
    if c["HAS_LORA"]:
        S, offs = c["S"], c["OFFS"]
        adapted_tiles = sum(1 for n in range(n_tiles) for off in offs if n * bn < off + SW and n * bn + bn > off)
        spt = _samples_per_tile(T, bm, M)
        chunks = _cdiv(J, c["J_CHUNK"])
        expand = 2.0 * m_tiles * adapted_tiles * bm * bn * chunks * c["J_CHUNK"] * spt
        flops = _add(flops, _dot_flops(c["LORA_PRECISION"], a["h_ptr"].dtype, expand))
        useful += 2.0 * M * S * SW * J
        B = _cdiv(M, T)
        lora_bytes = M * S * J * _size(a["h_ptr"]) + B * S * J * SW * _size(a["e_ptr"])
        extra_steps = chunks * math.ceil(spt) * S
    in_bytes = M * K * _size(x) + K * NOUT * _size(w)
    bias = NOUT * _size(out) if c["HAS_BIAS"] else 0
    return dict(
        flops=flops,
        bytes_read=in_bytes + bias + lora_bytes,
        bytes_written=M * NOUT * _size(out),
        l2_bytes=M * K * _size(x) * (n_tiles - 1) + K * NOUT * _size(w) * (m_tiles - 1),
        steps=_pipelined(k_steps, launch.num_stages) + extra_steps,
        useful_flops=useful,
        gemm=(M, NOUT, K),
    )


def _adapter_fwd(launch) -> dict:
    a, c = launch.args, launch.constexprs
    m_tiles, cols = launch.grid
    M, T, J, SW = a["M"], a["T"], a["J"], a["SLICE_W"]
    S, bm, bn = c["S"], c["BLOCK_M"], c["BLOCK_N"]
    spt = _samples_per_tile(T, bm, M)
    chunks = _cdiv(J, c["J_CHUNK"])
    flops = 2.0 * m_tiles * cols * bm * bn * chunks * c["J_CHUNK"] * spt
    B = _cdiv(M, T)
    out = a["out_ptr"]
    return dict(
        flops=_dot_flops(c["LORA_PRECISION"], a["h_ptr"].dtype, flops),
        bytes_read=M * S * J * _size(a["h_ptr"]) + B * S * J * SW * _size(a["e_ptr"]) + M * S * SW * _size(out),
        bytes_written=M * S * SW * _size(out),
        steps=chunks * math.ceil(spt) + 2,
        useful_flops=2.0 * M * S * SW * J,
    )


def _factor_bwd(launch) -> dict:
    a, c = launch.args, launch.constexprs
    B, slices, f_tiles = launch.grid
    T, FD, J = a["T"], a["FD"], a["J"]
    bt, bf, j_pad = c["BLOCK_T"], c["BLOCK_F"], c["J_PAD"]
    ct = a["out_ptr"].dtype
    t_steps = _cdiv(T, bt)
    flops = 2.0 * B * slices * f_tiles * bf * j_pad * t_steps * bt
    l_bytes = B * T * slices * FD * _size(a["l_ptr"])
    r_bytes = B * T * slices * J * _size(a["r_ptr"])
    return dict(
        flops=_dot_flops(c["LORA_PRECISION"], ct, flops),
        bytes_read=l_bytes + r_bytes,
        bytes_written=B * slices * FD * J * _SIZE[ct],
        l2_bytes=r_bytes * (f_tiles - 1),
        steps=_pipelined(t_steps, launch.num_stages),
        useful_flops=2.0 * B * T * slices * FD * J,
    )


def _dw_bwd(launch) -> dict:
    a, c = launch.args, launch.constexprs
    b_tiles, split = launch.grid
    B, N, FA, FB = a["B"], a["N"], a["FA"], a["FB"]
    bb, bf, n_pad = c["BLOCK_B"], c["BLOCK_F"], c["N_PAD"]
    ct = a["partial_ptr"].dtype
    flops = 2.0 * b_tiles * bb * n_pad * (_cdiv(FA, bf) + _cdiv(FB, bf)) * bf
    bank_bytes = N * (FA + FB) * _size(a["bank_a_ptr"])
    return dict(
        flops=_dot_flops(c["LORA_PRECISION"], ct, flops),
        bytes_read=B * (FA + FB) * _SIZE[ct] + bank_bytes,
        bytes_written=split * B * N * _SIZE[ct],
        l2_bytes=bank_bytes * (b_tiles - 1),
        steps=_cdiv(_cdiv(FA, bf), split) + _cdiv(_cdiv(FB, bf), split),
        useful_flops=2.0 * B * N * (FA + FB),
    )


def _scores_bwd(launch) -> dict:
    a, c = launch.args, launch.constexprs
    b_tiles, k_chunks = launch.grid
    B, N, DK, parts = a["B"], a["N"], a["DK"], a["n_partials"]
    bb, bk, n_pad = c["BLOCK_B"], c["BLOCK_K"], c["N_PAD"]
    ct = a["dz_ptr"].dtype
    flops = 2.0 * b_tiles * bb * n_pad * k_chunks * bk if c["NEED_Q"] else 0.0
    es = _SIZE[ct]
    return dict(
        flops=_dot_flops(c["SCORE_PRECISION"], ct, flops),
        bytes_read=(parts + 2) * B * N * es + (B + N) * es + (B + N) * DK * _size(a["q_ptr"]),
        bytes_written=B * N * es + (B * DK * _size(a["dq_ptr"]) if c["NEED_Q"] else 0),
        l2_bytes=(parts + 2) * B * N * es * (k_chunks - 1),
        steps=parts + 3,
        useful_flops=2.0 * B * N * DK,
    )


def _keys_bwd(launch) -> dict:
    a, c = launch.args, launch.constexprs
    n_tiles, k_chunks = launch.grid
    B, N, DK = a["B"], a["N"], a["DK"]
    bn, bb, bk = c["BLOCK_N"], c["BLOCK_B"], c["BLOCK_K"]
    ct = a["dz_ptr"].dtype
    b_steps = _cdiv(B, bb)
    flops = 2.0 * n_tiles * bn * k_chunks * bk * b_steps * bb
    es = _SIZE[ct]
    return dict(
        flops=_dot_flops(c["SCORE_PRECISION"], ct, flops),
        bytes_read=2 * B * N * es + B * DK * _size(a["q_ptr"]) + N * DK * _size(a["k_ptr"]) + (B + N) * es,
        bytes_written=N * DK * _size(a["dk_ptr"]),
        l2_bytes=2 * B * N * es * (k_chunks - 1) + B * DK * _size(a["q_ptr"]) * (n_tiles - 1),
        steps=_pipelined(b_steps, launch.num_stages) + 1,
        useful_flops=2.0 * B * N * DK,
    )


def _bank_bwd(launch) -> dict:
    a, c = launch.args, launch.constexprs
    n_tiles, split = launch.grid
    B, N, F = a["B"], a["N"], a["F"]
    bn, bb, bf = c["BLOCK_N"], c["BLOCK_B"], c["BLOCK_F"]
    ct = a["w_ptr"].dtype
    b_steps = _cdiv(B, bb)
    f_chunks = _cdiv(F, bf)
    flops = 2.0 * n_tiles * bn * f_chunks * bf * b_steps * bb
    return dict(
        flops=_dot_flops(c["LORA_PRECISION"], ct, flops),
        bytes_read=B * F * _SIZE[ct] + B * N * _SIZE[ct],
        bytes_written=N * F * _size(a["out_ptr"]),
        l2_bytes=B * F * _SIZE[ct] * (n_tiles - 1),
        steps=_cdiv(f_chunks, split) * b_steps,
        useful_flops=2.0 * B * N * F,
    )


_COSTS = {
    "_mira_mix_fwd_kernel": _mix_fwd,
    "_mira_shrink_fwd_kernel": _shrink,
    "_mira_linear_fwd_kernel": _linear_fwd,
    "_mira_adapter_fwd_kernel": _adapter_fwd,
    "_mira_factor_bwd_kernel": _factor_bwd,
    "_mira_dw_bwd_kernel": _dw_bwd,
    "_mira_scores_bwd_kernel": _scores_bwd,
    "_mira_keys_bwd_kernel": _keys_bwd,
    "_mira_bank_bwd_kernel": _bank_bwd,
}


def kernel_launch(launch: launchers.Launch) -> KernelLaunch:
    """The model's record of one planned Triton launch."""
    kernel = launch.kernel.fn.__name__
    cost = _COSTS[kernel](launch)
    return KernelLaunch(name=launch.name, kernel=kernel, grid=tuple(launch.grid), threads=32 * launch.num_warps,
                        **cost)


def _root(t: torch.Tensor) -> torch.Tensor:
    return t._base if t._base is not None else t


def allocations(plan: list[launchers.Launch], inputs) -> int:
    """Device tensors the planner allocated: distinct tensor arguments of the launches whose
    storage is not one of the caller's tensors (outputs, workspaces, contiguous copies)."""
    given = {id(_root(t)) for t in inputs if isinstance(t, torch.Tensor)}
    fresh = set()
    for launch in plan:
        for value in launch.args.values():
            if isinstance(value, torch.Tensor) and id(_root(value)) not in given:
                fresh.add(id(_root(value)))
    return len(fresh)


def describe(op: str, *args, sms: int | None = None) -> OpPlan:
    """:class:`OpPlan` of one Triton op call (arguments as the backend interface; meta tensors).

    ``sms`` is accepted for the protocol and ignored: the Triton grids depend on shapes only, so
    reduction orders (and bits) do not change with the device (``configs.split_for``).
    """
    if op == "mira_linear":
        _, plan = launchers.plan_linear(*args)
    elif op == "mira_linear_backward":
        _, plan = launchers.plan_linear_backward(*args)
    elif op == "mira_adapter_":
        _, plan = launchers.plan_adapter_(*args)
    else:
        raise ValueError(f"unknown op {op!r}")
    launches = tuple(kernel_launch(launch) for launch in plan if all(g > 0 for g in launch.grid))
    return OpPlan(backend="triton", op=op, launches=launches, allocations=allocations(plan, args))
