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


def _retrieve(launch) -> dict:
    a, c = launch.args, launch.constexprs
    b_tiles, split = launch.grid
    B, N, DK, FA, FB = a["B"], a["N"], a["DK"], a["FA"], a["FB"]
    bb, nc, bk, bf = c["BLOCK_B"], c["NC"], c["BLOCK_K"], c["BLOCK_F"]
    ct = a["scores_ptr"].dtype
    chunks = _cdiv(N, nc)
    k_steps = _cdiv(DK, bk)
    programs = b_tiles * split
    # Every program computes its sample tile's scores (all chunks; the multi-chunk path reads them
    # back from its scratch for the mixing), then mixes its share of the bank columns.
    score = 2.0 * bb * chunks * nc * k_steps * bk * programs
    mixing = 2.0 * b_tiles * bb * chunks * nc * (_cdiv(FA, bf) + _cdiv(FB, bf)) * bf
    qs, ks, bs = _size(a["q_ptr"]), _size(a["k_ptr"]), _size(a["bank_a_ptr"])
    fs = _size(a["mixed_a_ptr"])
    keys_bytes = N * DK * ks
    bank_bytes = N * (FA + FB) * bs
    stats = (2 * B * N + B + N) * _SIZE[ct] + B * _size(a["denom_ptr"]) if c["SAVE_STATS"] else 0
    # The affine sums (B,): stored (the backward's replay of the forward's), read (the forward's branch).
    stats += B * _size(a["total_ptr"]) if c.get("SAVE_TOTAL") else 0
    branch = B * _size(a["branch_ptr"]) if c.get("FWD_BRANCH") else 0
    scratch = 0 if c["ONE_CHUNK"] else 2 * programs * bb * N * _SIZE[ct]
    share = _cdiv(_cdiv(FA, bf), split) + _cdiv(_cdiv(FB, bf), split)
    return dict(
        flops=_add(_dot_flops(c["SCORE_PRECISION"], torch.float64 if c.get("WIDE_SCORES") else ct, score),
                   _dot_flops(c["MIX_PRECISION"], ct, mixing)),
        bytes_read=B * DK * qs + keys_bytes + bank_bytes + branch,
        bytes_written=B * (FA + FB) * fs + stats,
        l2_bytes=keys_bytes * (programs - 1) + bank_bytes * (b_tiles - 1) + B * DK * qs * (split - 1) + scratch,
        steps=chunks * _pipelined(k_steps, 2) + share * chunks + (chunks if not c["ONE_CHUNK"] else 0),
        useful_flops=2.0 * B * N * DK + 2.0 * B * N * (FA + FB),
        note=(f"{split} column shares per {bb}-sample tile, each recomputing its tile's scores"
              + ("; cosine sums deferred past the d_k loop: a step here takes ~1/6 of the 3xTF32 loop's sm_90"
                 " instructions, which `steps` does not see" if c["SCORE_PRECISION"] == "fma" else "")),
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


def _gemm(launch) -> dict:
    a, c = launch.args, launch.constexprs
    M, NOUT, K, T, J = a["M"], a["NOUT"], a["K"], a["T"], a["J"]
    bm, bn, bk = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
    groups, tiles, order = c["GROUPS"], c["TILES"], c["ORDER"]
    m_tiles = _cdiv(M, bm)
    k_steps = _cdiv(K, bk)
    x, out = a["x_ptr"], a["out_ptr"]
    live = [n for n in order if n >= 0]
    lora = c["LORA"]

    def adapted(n):
        if lora == 0:
            return False
        if not c["E_SLICED"]:
            return True
        return any(n * bn < off + a["E_WIDTH"] and n * bn + bn > off for off in c["OFFS"])

    n_adapted = sum(adapted(n) for n in live)
    # Programs of a row block: group g visits order[g], order[g + groups], ...; it computes h in the
    # first adapted tile it meets (LORA = 1) and waits for the retrieval there, before that tile's
    # main loop; with h from the shrink launch (LORA = 2) it waits after the main loop, before the
    # expand: a tile is its pipelined K steps plus two (fill and epilogue), as `steps` counts it.
    sequences = [[n for n in order[g::groups] if n >= 0] for g in range(groups)]
    shrinking = sum(1 for seq in sequences if any(adapted(n) for n in seq))
    k_tile = _pipelined(k_steps, launch.num_stages) if (c["HAS_BASE"] or lora == 1) else 0
    inside = k_tile / (k_tile + 2) if lora == 2 else 0.0
    before_wait = [(next(i for i, n in enumerate(seq) if adapted(n)) + inside) / len(seq)
                   for seq in sequences if seq and any(adapted(n) for n in seq)]
    flops: dict[str, float] = {}
    useful = 0.0
    if c["HAS_BASE"]:
        flops = _dot_flops(c["BASE_PRECISION"], x.dtype, 2.0 * m_tiles * bm * len(live) * bn * k_steps * bk)
        useful = 2.0 * M * NOUT * K
    lora_bytes = 0.0
    factor_l2 = 0.0
    if lora:
        j_pad = c["J_PAD"]
        B = _cdiv(M, T)
        op, eop = a["f_ptr"].dtype, a["e_ptr"].dtype  # the shrink's and the expand's operand dtypes
        if lora == 1:
            shrink = 2.0 * m_tiles * shrinking * bm * j_pad * k_steps * bk
            expand = 2.0 * m_tiles * n_adapted * bm * bn * j_pad
        else:
            spt = _samples_per_tile(T, bm, M)
            shrink = 0.0
            # J_STEP columns of h per step, one dot of J_CHUNK (two with SPLIT: 3xTF32 as hi/lo halves).
            dots = _cdiv(J, c["J_STEP"]) * (2 if c["SPLIT"] else 1)
            expand = 2.0 * m_tiles * n_adapted * bm * bn * dots * c["J_CHUNK"] * spt
            lora_bytes += M * J * _size(a["h_ptr"])
        flops = _add(flops, _dot_flops(c["LORA_PRECISION"], op, shrink),
                     _dot_flops(c["EXPAND_PRECISION"], eop, expand))
        factor_bytes = B * J * (a["F_WIDTH"] * _size(a["f_ptr"]) + a["E_WIDTH"] * _size(a["e_ptr"]))
        lora_bytes += factor_bytes
        # Each shrinking program reads its samples' F; each adapted tile its samples' E columns.
        spb = c["SPB"]
        factor_l2 = m_tiles * spb * J * (shrinking * a["F_WIDTH"] * _size(a["f_ptr"])
                                         + n_adapted * bn * _size(a["e_ptr"]))
        useful += 2.0 * M * J * (a["F_WIDTH"] + a["E_WIDTH"])
    x_bytes = M * K * _size(x) if (c["HAS_BASE"] or lora == 1) else 0
    w_bytes = K * NOUT * _size(a["w_ptr"]) if c["HAS_BASE"] else 0
    out_cols = min(len(live) * bn, NOUT) if c["IN_PLACE"] else NOUT
    out_bytes = M * out_cols * _size(out)
    bias = NOUT * _size(a["bias_ptr"]) if c["HAS_BIAS"] else 0
    store_h = M * J * 4 if c["STORE_H"] else 0
    x_passes = m_tiles * (len(live) if c["HAS_BASE"] else shrinking)
    steps_per_tile = _pipelined(k_steps, launch.num_stages) if (c["HAS_BASE"] or lora == 1) else 1
    return dict(
        flops=flops,
        bytes_read=x_bytes + w_bytes + bias + lora_bytes + (out_bytes if c["IN_PLACE"] else 0),
        bytes_written=out_bytes + store_h,
        l2_bytes=(x_bytes * max(x_passes / m_tiles - 1, 0)) + w_bytes * (m_tiles - 1) + max(factor_l2 - lora_bytes, 0),
        steps=tiles * (steps_per_tile + 2),
        useful_flops=useful,
        gemm=(M, NOUT, K),
        tile=(bm, bn, bk),
        tiles_per_program=tiles,
        pdl=launch.pdl,
        wait_fraction=min(before_wait) if (launch.pdl and before_wait) else 0.0,
        leading_programs=m_tiles * c["LEAD_GROUPS"] if launch.pdl else 0,
        note=f"{groups} group(s) x {tiles} tile(s) per row block; shrink "
             + ("folded into the main loop" if lora == 1 else "from its own launch" if lora == 2 else "none"),
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
    b_tiles, split, n_chunks = launch.grid
    B, N, FA, FB = a["B"], a["N"], a["FA"], a["FB"]
    bb, bf, nc = c["BLOCK_B"], c["BLOCK_F"], c["NC"]
    ct = a["partial_ptr"].dtype
    flops = 2.0 * b_tiles * bb * n_chunks * nc * (_cdiv(FA, bf) + _cdiv(FB, bf)) * bf
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
    bb, bk, nc = c["BLOCK_B"], c["BLOCK_K"], c["NC"]
    ct = a["dz_ptr"].dtype
    flops = 2.0 * b_tiles * bb * _cdiv(N, nc) * nc * k_chunks * bk if c["NEED_Q"] else 0.0
    es = _SIZE[ct]
    return dict(
        flops=_dot_flops(c["SCORE_PRECISION"], ct, flops),
        bytes_read=(parts + 2) * B * N * es + (B + N) * es + (B + N) * DK * _size(a["q_ptr"])
        + (B * (_size(a["denom_ptr"]) + _size(a["branch_ptr"])) if c["SEPARATION"] == 0 else 0),
        bytes_written=B * N * es + (B * DK * _size(a["dq_ptr"]) if c["NEED_Q"] else 0),
        l2_bytes=(parts + 2) * B * N * es * (k_chunks - 1),
        steps=2 * _cdiv(N, nc) * (parts + 1) + 2,
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


def _normalize_columns(launch) -> dict:
    # Three passes over each column block (max, squares, divide) in fp64 on FMA units; the keys come
    # from device memory once, the two re-reads from L2.
    a, c = launch.args, launch.constexprs
    N, D = a["N"], a["D"]
    size = _size(a["k_ptr"])
    passes = _cdiv(N, c["BLOCK_N"])
    return dict(flops={"fma_fp64": 4.0 * N * D}, bytes_read=N * D * size, bytes_written=N * D * size,
                l2_bytes=2 * N * D * size, steps=3 * passes, useful_flops=3.0 * N * D)


_COSTS = {
    "_mira_retrieve_kernel": _retrieve,
    "_mira_shrink_fwd_kernel": _shrink,
    "_mira_gemm_kernel": _gemm,
    "_mira_factor_bwd_kernel": _factor_bwd,
    "_mira_dw_bwd_kernel": _dw_bwd,
    "_normalize_columns_kernel": _normalize_columns,
    "_mira_scores_bwd_kernel": _scores_bwd,
    "_mira_keys_bwd_kernel": _keys_bwd,
    "_mira_bank_bwd_kernel": _bank_bwd,
}


def kernel_launch(launch: launchers.Launch) -> KernelLaunch:
    """The model's record of one planned Triton launch."""
    kernel = launch.kernel.fn.__name__
    cost = _COSTS[kernel](launch)
    cost.setdefault("pdl", launch.pdl)
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


def describe_key_normalization(keys: torch.Tensor) -> KernelLaunch:
    """The record of the layers' per-feature key normalisation on a GPU (one launch:
    ``mira_kernels.triton.normalize_columns``, which ``mira.memory._per_feature_unit`` runs there)."""
    from ..reference import NORM_EPS

    _, launch = launchers.plan_normalize_columns(keys, NORM_EPS)
    return kernel_launch(launch)


def describe(op: str, *args, sms: int | None = None) -> OpPlan:
    """:class:`OpPlan` of one Triton op call (arguments as the backend interface; meta tensors).

    ``sms`` is accepted for the protocol and ignored: the Triton grids depend on shapes only, so
    reduction orders (and bits) do not change with the device (``configs.split_for``). Meta
    tensors are planned for a Hopper device (programmatic dependent launch on), the model's target.
    """
    with launchers.planning_for(capability=(9, 0)):
        return _describe(op, *args)


def _describe(op: str, *args) -> OpPlan:
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
