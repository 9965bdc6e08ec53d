"""Ahead-of-time lowering of the MIRA Triton kernels for NVIDIA targets, without a GPU.

The launch plans of :mod:`.launchers` are built with ``meta`` tensors of the benchmark shapes
(ViT-B/16 qkv with adapters on Q and V), so exactly the kernels, constexprs, warps and stages a
GPU run would use are compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda",
arch, 32))``. Each cubin's registers, stack/local memory (spills) and static shared memory are
read with the ``cuobjdump`` shipped in the Triton wheel; dynamic shared memory comes from the
compiled metadata; the PTX is searched for the matrix instructions (``mma.sync`` / ``wgmma``).

Run ``python -m mira_kernels.triton.lowering`` to print the table (``--quick`` for the subset
``make test-slow`` compiles, ``--ci`` for the few launches ``make test`` compiles). Do not set
``TRITON_INTERPRET`` in this process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import reference
from . import configs, launchers

#: Dynamic shared memory one block may use (opt-in maximum), bytes.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

_DTYPE_NAMES = {
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
    torch.int32: "i32", torch.int64: "i64",
}

#: ViT-B/16 qkv projection with adapters on Q and V.
VIT_B = dict(T=197, d=768, d_out=2304, offsets=(0, 1536), d_k=768)


@dataclass(frozen=True)
class Case:
    """One benchmark configuration of the op."""

    op: str  # "linear", "linear_backward", "adapter_", "key_norm" (the layers' key normalisation)
    dtype: torch.dtype
    batch: int
    rank: int
    slots: int
    separation: str = "affine"
    #: fp32 dot precision: "tf32" (tensor cores, torch.backends.cuda.matmul.allow_tf32) or "ieee".
    fp32_precision: str = "tf32"
    #: Planned under ``configs.overriding(tma=True)``: the GEMM's main loop on TMA descriptors.
    tma: bool = False
    #: Planned under ``configs.overriding(persistent=True)``: the GEMM launched persistent.
    persistent: bool = False
    #: The memory (keys, banks) in x's dtype, as mira.attach makes it for a 16-bit model; else a
    #: 16-bit x runs over a float32 memory (bank_dtype aside, a memory built by hand).
    memory_as_x: bool = False

    @property
    def label(self) -> str:
        dtype = _DTYPE_NAMES[self.dtype]
        if self.dtype == torch.float32:
            dtype += f"/{self.fp32_precision}"
        return (f"{self.op} {dtype} B={self.batch} r={self.rank} N={self.slots}" + (" tma" if self.tma else "")
                + (" persistent" if self.persistent else "") + (" memory=x" if self.memory_as_x else ""))


@dataclass
class Lowered:
    kernel: str
    arch: int
    case: str
    constexprs: str
    num_warps: int
    num_stages: int
    registers: int
    stack: int
    local: int
    static_shared: int
    dynamic_shared: int
    mma: bool
    wgmma: bool
    mma_kinds: tuple[str, ...]
    #: What the kernel is meant to run its dots on: "wgmma" (the projection GEMM on sm_90),
    #: "mma.sync" (the GEMM on sm_80), "tensor cores" (mma.sync or wgmma), or "fma" (no requirement).
    intended: str = "fma"
    #: Whether the PTX loads through TMA (cp.async.bulk.tensor): the GEMM planned with ``tma``.
    tma: bool = False

    @property
    def meets_intent(self) -> bool:
        if self.intended == "wgmma":
            return self.wgmma
        if self.intended == "mma.sync":
            return self.mma
        if self.intended == "tensor cores":
            return self.mma or self.wgmma
        return True

    @property
    def spills(self) -> bool:
        return self.stack > 0 or self.local > 0

    @property
    def shared(self) -> int:
        return self.static_shared + self.dynamic_shared


_OPS = ("linear", "linear_backward", "adapter_")


def benchmark_cases() -> list[Case]:
    """Every benchmark configuration: fp16, bf16, fp32 (TF32 and IEEE), B in {1, 8, 64, 256},
    (r, N) in {(4, 30), (16, 30), (64, 256), (128, 30)}, the three ops."""
    cases = []
    for dtype, precision in ((torch.float16, "tf32"), (torch.bfloat16, "tf32"), (torch.float32, "tf32"),
                             (torch.float32, "ieee")):
        for batch in (1, 8, 64, 256):
            for rank, slots in ((4, 30), (16, 30), (64, 256), (128, 30)):
                cases.extend(Case(op, dtype, batch, rank, slots, fp32_precision=precision) for op in _OPS)
    # ViT-B/16's configuration over the bf16 memory a bf16 model has (mira.attach makes it in x's dtype).
    cases += [Case(op, torch.bfloat16, batch, 4, 30, memory_as_x=True) for batch in (1, 8, 64, 256) for op in _OPS]
    return cases


def test_cases() -> list[Case]:
    """The subset the tests compile (CI time): every kernel for 16-bit, fp32/TF32 and fp32/IEEE,
    the three M buckets of the GEMM table, the rank and slot extremes (J_PAD 16/64/256, N_PAD 32/256)."""
    cases = [Case(op, dtype, 256, 4, 30) for op in _OPS for dtype in (torch.float16, torch.bfloat16)]
    cases += [Case(op, torch.bfloat16, 1, 64, 256) for op in ("linear", "linear_backward")]
    cases += [Case("linear", torch.bfloat16, 8, 16, 30)]
    cases += [Case(op, torch.float32, 64, 4, 30) for op in _OPS]
    cases += [Case(op, torch.float32, 1, 64, 256, fp32_precision="ieee") for op in _OPS]
    # S*r = 256 > 128: the widest adapter the row kernels hold in registers.
    cases += [Case(op, dtype, 8, 128, 30, fp32_precision=p) for op in ("linear", "linear_backward")
              for dtype, p in ((torch.bfloat16, "tf32"), (torch.float32, "tf32"), (torch.float32, "ieee"))]
    cases += [Case(op, dtype, batch, 4, 30, memory_as_x=True) for op in _OPS
              for dtype in (torch.bfloat16, torch.float16) for batch in (1, 8, 64)]
    cases += [Case("key_norm", dtype, 1, 4, n) for dtype in (torch.float32, torch.float64, torch.bfloat16,
                                                             torch.float16) for n in (30, 256)]
    return cases


def ci_cases() -> list[tuple[Case, tuple[int, ...]]]:
    """The few launches CI compiles (each compile takes seconds; CI's share is minutes): every kernel
    once for sm_90 (the ViT-B/16 bf16 backward at B = 8 plans them all), the forward at B = 64
    (retrieval and the GEMM with the shrink folded in, 253 registers on sm_90) and at B = 1 (the
    small-batch retrieval) for both targets, and for sm_90 the fp16 forward at B = 1 (its shrink
    launch chained beside the GEMM by PDL), the forward at B = 256 (programs of many column tiles) and
    the forward's GEMM with its TMA main loop, one item per program and persistent.
    ``test_cases`` (``make test-slow``) and ``benchmark_cases`` (``python -m mira_kernels.triton.lowering``)
    compile the rest."""
    return [(Case("linear", torch.bfloat16, 64, 4, 30), (80, 90)),
            (Case("linear", torch.bfloat16, 1, 4, 30), (80, 90)),  # the small-batch retrieval (deferred FMA sums)
            (Case("linear_backward", torch.bfloat16, 8, 4, 30), (90,)),
            (Case("key_norm", torch.float32, 1, 4, 30), (80, 90)),
            (Case("key_norm", torch.bfloat16, 1, 4, 30), (90,)),  # the 16-bit keys a bf16 model's memory has
            # A bf16 model's memory is bf16 (mira.attach): its forward and backward (where the dx GEMM
            # had spilled 40-56 bytes on sm_90 at B = 1 and 8, unseen by the float32-memory cases).
            (Case("linear", torch.bfloat16, 64, 4, 30, memory_as_x=True), (90,)),
            (Case("linear_backward", torch.bfloat16, 8, 4, 30, memory_as_x=True), (90,)),
            (Case("linear_backward", torch.bfloat16, 1, 4, 30, memory_as_x=True), (90,)),
            (Case("linear", torch.float16, 1, 4, 30), (90,)),  # shrink and GEMM chained (USE_PDL, LORA = 2)
            # B = 256: the wide tile's programs would walk every column tile (configs.one_tile_fits).
            (Case("linear", torch.bfloat16, 256, 4, 30), (90,)),
            # The GEMM's TMA main loop, also launched persistent (opt-ins make gpu-check times): sm_90 only.
            (Case("linear", torch.bfloat16, 64, 4, 30, tma=True), (90,)),
            (Case("linear", torch.bfloat16, 64, 4, 30, tma=True, persistent=True), (90,))]


def plan_case(case: Case, shape: dict | None = None) -> list[launchers.Launch]:
    """The launches of one configuration, planned on ``meta`` tensors (nothing is allocated), for the
    ViT-B/16 qkv projection unless ``shape`` (keys of :data:`VIT_B`) says otherwise."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = case.fp32_precision == "tf32"
    try:
        opt_ins = {k: True for k in ("tma", "persistent") if getattr(case, k)}
        with configs.overriding(**opt_ins) if opt_ins else contextlib.nullcontext():
            return _plan_case(case, shape or VIT_B)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _plan_case(case: Case, shape: dict) -> list[launchers.Launch]:
    T, d, d_out, offsets, d_k = (shape[k] for k in ("T", "d", "d_out", "offsets", "d_k"))
    meta = dict(device="meta")
    mem_dtype = torch.float32 if case.dtype in (torch.float16, torch.bfloat16) and not case.memory_as_x else case.dtype
    x = torch.empty(case.batch, T, d, dtype=case.dtype, **meta)
    weight = torch.empty(d_out, d, dtype=case.dtype, **meta)
    bias = torch.empty(d_out, dtype=case.dtype, **meta)
    # The query as the layers pass it: a 16-bit x over a float32 memory gives the CLS view x[:, 0]
    # itself (no cast); the fp64 cosines of the backward failed to lower only with such a query.
    query = x[:, 0] if case.dtype in (torch.float16, torch.bfloat16) and d_k == d else torch.empty(
        case.batch, d_k, dtype=mem_dtype, **meta)
    keys = torch.empty(case.slots, d_k, dtype=mem_dtype, **meta)
    bank_a = torch.empty(case.slots, len(offsets), case.rank, d, dtype=mem_dtype, **meta)
    bank_b = torch.empty(case.slots, len(offsets), d, case.rank, dtype=mem_dtype, **meta)
    common = (query, keys, bank_a, bank_b, list(offsets), case.separation, 1.0, 1e-2)
    if case.op == "key_norm":  # the layers' per-feature key normalisation (mira.memory._per_feature_unit),
        # of keys in the case's dtype: a 16-bit model's memory is 16-bit (mira.attach)
        keys = torch.empty(case.slots, d_k, dtype=case.dtype, **meta)
        return [launchers.plan_normalize_columns(keys, reference.NORM_EPS)[1]]
    if case.op == "linear":
        _, plan = launchers.plan_linear(x, weight, bias, *common)
    elif case.op == "adapter_":
        out = torch.empty(case.batch, T, d_out, dtype=case.dtype, **meta)
        _, plan = launchers.plan_adapter_(out, x, *common)
    else:
        grad = torch.empty(case.batch, T, d_out, dtype=case.dtype, **meta)
        _, plan = launchers.plan_linear_backward(grad, x, weight, *common, [True] * 5)
    return plan


def _signature(launch: launchers.Launch):
    fn = launch.kernel
    names = fn.arg_names
    signature, attrs = {}, {}
    for i, name in enumerate(names):
        if name in launch.constexprs:
            signature[name] = "constexpr"
            continue
        value = launch.args[name]
        if _is_descriptor(value):
            from triton.runtime.jit import mangle_type

            signature[name] = mangle_type(value)
            continue
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _DTYPE_NAMES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned, as the JIT sees
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0 and value != 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{launch.name}: cannot type argument {name}={value!r}")
    return signature, attrs


def _is_descriptor(value) -> bool:
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return False
    return isinstance(value, TensorDescriptor)


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def resource_usage(cubin: bytes) -> dict[str, int]:
    """{"REG", "STACK", "SHARED", "LOCAL": count} of a cubin, read with the cuobjdump in the Triton wheel."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], check=True, capture_output=True,
                              text=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    if "REG" not in found:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{text}")
    return {k: int(v) for k, v in found.items()}


_cache: dict = {}


#: Per-sample (B,) statistics, read and written by row only: the affine sums and denominators, fp64 in
#: the backward of every fp32 compute dtype, say nothing of the dtype of a kernel's dots.
_ROW_STATS = frozenset({"total_ptr", "branch_ptr", "denom_ptr"})


def _intended(launch: launchers.Launch, signature: dict, arch: int) -> str:
    """Which matrix instructions a launch is meant to lower to (see :attr:`Lowered.intended`)."""
    c = launch.constexprs
    if launch.name == "normalize_columns":
        return "fma"  # elementwise sums and divisions: no matrix product
    if any(kind == "*fp64" for name, kind in signature.items() if name not in _ROW_STATS):
        return "mma.sync"  # DMMA (m8n8k4 f64) on both targets
    if launch.name.startswith("gemm"):
        tensor_core = signature["x_ptr"] in ("*fp16", "*bf16") or c["BASE_PRECISION"] == "tf32"
        if not tensor_core:
            return "fma"
        return "wgmma" if arch >= 90 else "mma.sync"
    if c.get("LORA_PRECISION") in ("tf32", "tf32x3") or c.get("MIX_PRECISION") in ("tf32", "tf32x3"):
        return "tensor cores"
    return "fma"  # IEEE fp32 dots, and the keys gradient (ieee by design, O(B N d_k)): FMA units


def _options(launch: launchers.Launch) -> dict:
    """The compile options a GPU launch of ``launch`` passes (Launch.run)."""
    options = dict(num_warps=launch.num_warps, num_stages=launch.num_stages)
    if launch.maxnreg is not None:
        options["maxnreg"] = launch.maxnreg
    return options


def compile_launch(launch: launchers.Launch, arch: int, case: str = "") -> Lowered:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = _signature(launch)
    key = (launch.kernel.fn.__name__, arch, tuple(sorted(signature.items())), tuple(sorted(attrs)),
           tuple(sorted((k, repr(v)) for k, v in launch.constexprs.items())), launch.num_warps, launch.num_stages,
           launch.maxnreg)
    if key in _cache:
        return _cache[key]
    src = ASTSource(fn=launch.kernel, signature=signature, constexprs=dict(launch.constexprs), attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=_options(launch))
    ptx = compiled.asm["ptx"]
    usage = resource_usage(compiled.asm["cubin"])
    kinds = tuple(sorted(set(re.findall(r"\b((?:mma\.sync|wgmma\.mma_async\.sync)\.aligned\.[\w.]+)", ptx))))
    intended = _intended(launch, signature, arch)
    shown = {k: v for k, v in launch.constexprs.items()
             if k.startswith(("BLOCK", "NC", "J_PAD", "SPB", "GROUPS", "TILES", "LORA", "NUM", "USE_PDL"))
             or (k in ("TMA", "PERSISTENT") and v)}
    result = Lowered(
        kernel=launch.kernel.fn.__name__, arch=arch, case=case,
        constexprs=" ".join(f"{k}={v}" for k, v in shown.items()),
        num_warps=launch.num_warps, num_stages=launch.num_stages,
        registers=usage["REG"], stack=usage.get("STACK", 0), local=usage.get("LOCAL", 0),
        static_shared=usage.get("SHARED", 0), dynamic_shared=int(compiled.metadata.shared),
        mma="mma.sync" in ptx, wgmma="wgmma.mma_async" in ptx, mma_kinds=kinds, intended=intended,
        tma="cp.async.bulk.tensor" in ptx,
    )
    _cache[key] = result
    return result


def ttir(launch: launchers.Launch, arch: int = 90) -> str:
    """The Triton IR (after Triton's own passes, before the GPU-specific ones) of one launch."""
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    signature, attrs = _signature(launch)
    src = ASTSource(fn=launch.kernel, signature=signature, constexprs=dict(launch.constexprs), attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    options = backend.parse_options(_options(launch))
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = src.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                         context)
    stages: dict = {}
    backend.add_stages(stages, options, src.language)
    return str(stages["ttir"](module, {}))


_DEF = re.compile(r"^\s*(%[\w.#]+)(?::\d+)?\s*=\s*([\w.]+)\s*(.*)$")
_VALUE = re.compile(r"%[\w.#]+")


def narrow_address_products(ir_text: str, pointers: set[str]) -> list[str]:
    """Address arithmetic on the pointer arguments ``pointers`` that multiplies by a run-time
    stride in 32 bits.

    For every ``tt.addptr`` whose base derives from one of those arguments, the offset is
    followed down through sums and shape ops to its products; a product on i32 values neither of
    whose operands is a compile-time constant (an index times a run-time stride or width) is
    reported. Triton types Python ints below 2^31 as i32, so ``rows * stride`` wraps once the
    product passes 2^31 unless an operand is widened to i64 first (``arith.extsi``, where the
    walk stops). Index arithmetic below the first product (``pid * BLOCK_M + arange``) is not an
    address and is not inspected; an index times a compile-time width (``pid_n * BLOCK_N``, a
    column index) is taken as an index, so a row index times a constexpr row width is not caught.
    """
    defs: dict[str, tuple[str, list[str], str]] = {}
    for line in ir_text.splitlines():
        m = _DEF.match(line)
        if m:
            name, op, rest = m.groups()
            body = rest.split(" loc(")[0]
            operands_part, _, types = body.partition(" : ")
            defs[name] = (op, _VALUE.findall(operands_part), types)
    shape_ops = ("tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape", "tt.trans")

    def root(value: str, depth: int = 0) -> str:
        op, operands, _ = defs.get(value, ("", [], ""))
        if depth > 200 or not operands or op not in (*shape_ops, "tt.addptr"):
            return value
        return root(operands[0], depth + 1)

    def constant(value: str, depth: int = 0) -> bool:
        op, operands, _ = defs.get(value, ("", [], ""))
        if op == "arith.constant":
            return True
        if depth > 200 or not operands or not (op.startswith("arith.") or op in shape_ops):
            return False
        return all(constant(o, depth + 1) for o in operands)

    problems: set[str] = set()

    def walk(value: str, what: str, depth: int = 0) -> None:
        op, operands, types = defs.get(value, ("", [], ""))
        if depth > 200 or op in ("arith.extsi", "arith.extui"):
            return
        if op == "arith.muli":
            if not any(constant(o) for o in operands) and re.search(r"(?:\b|x)i32\b", types):
                problems.add(f"{what}: {value} = arith.muli {', '.join(operands)} : {types.strip()}")
            return
        if op in ("arith.addi", "arith.subi", "arith.select", *shape_ops):
            for o in operands:
                walk(o, what, depth + 1)

    for op, operands, _ in defs.values():
        if op == "tt.addptr" and len(operands) >= 2:
            arg = root(operands[0]).lstrip("%")
            if arg in pointers:
                walk(operands[1], arg)
    return sorted(problems)


#: A shape at which every per-token tensor (x, the output, its gradient) has more than 2^31
#: elements: ViT-L/16 at 384 px (T = 577, d = 1024, qkv 1024 -> 3072) with B = 4096.
HUGE = dict(batch=4096, T=577, d=1024, d_out=3072, offsets=(0, 2048), d_k=1024)

#: Shapes at which the per-sample factors, the mixed A_b (B, S, r, d_in) and B_b (B, S, d_s, r) and
#: their gradients, have 2^32 elements (HUGE's have 2^25): "wide" (r = 256: every adapter product in
#: its own launch, the shrinks, the per-sample reductions dA_b / dB_b, the bank gradients) and
#: "folded" (r = 4 and 64 tokens a sample: the bf16 GEMMs fold the shrink into their main loop).
HUGE_FACTORS = {
    "wide": dict(batch=8192, rank=256, T=4, d=1024, d_out=3072, offsets=(0, 2048), d_k=1024),
    "folded": dict(batch=2**19, rank=4, T=64, d=1024, d_out=3072, offsets=(0, 2048), d_k=1024),
}


def narrow_addressing(op: str, arch: int = 90, dtype: torch.dtype = torch.bfloat16, huge: dict | None = None,
                      checked: list | None = None) -> list[str]:
    """32-bit address products (:func:`narrow_address_products`) in the launches of ``op`` planned
    at ``huge`` (:data:`HUGE` unless given; a ``rank`` key sets r, else 4), on every pointer
    argument whose tensor has 2^31 elements or more (16-bit x: the shrink folded into the GEMM where
    the adapter is narrow; fp32 x: the separate shrink launch). ``checked`` (a list) receives
    "launch: pointer" for every pointer searched, so a caller can tell what the check covered."""
    huge = HUGE if huge is None else huge
    case = Case(op, dtype, huge["batch"], huge.get("rank", 4), 30)
    problems = []
    for launch in plan_case(case, shape={k: huge[k] for k in VIT_B}):
        large = {name for name, value in launch.args.items()
                 if isinstance(value, torch.Tensor) and value.numel() >= 2**31}
        if large:
            if checked is not None:
                checked += [f"{launch.name}: {name}" for name in sorted(large)]
            problems += [f"{launch.name}: {p}" for p in narrow_address_products(ttir(launch, arch), large)]
    return problems


def lower_cases(cases, archs=(80, 90)) -> list[Lowered]:
    """Compile every distinct launch of ``cases`` for every arch (duplicates compiled once)."""
    results, seen = [], set()
    for case in cases:
        for arch in archs:
            # Planned as for a device of that generation (Hopper: programmatic dependent launch).
            with launchers.planning_for(capability=divmod(arch, 10)):
                plan = plan_case(case)
            for launch in plan:
                lowered = compile_launch(launch, arch, case.label)
                if id(lowered) not in seen:  # compile_launch returns the cached object for a repeat
                    seen.add(id(lowered))
                    results.append(lowered)
    return results


def format_table(results: list[Lowered]) -> str:
    header = (f"{'kernel':<26} {'sm':>3} {'first case':<40} {'tiles':<52} {'w/s':>5} {'regs':>4} {'spill':>5} "
              f"{'smem B':>7}  {'intended':<12} matrix instr found")
    lines = [header, "-" * len(header)]
    for r in sorted(results, key=lambda r: (r.kernel, r.arch, r.case)):
        instr = ",".join(r.mma_kinds)
        lines.append(
            f"{r.kernel:<26} {r.arch:>3} {r.case:<40} {r.constexprs:<52} {r.num_warps}/{r.num_stages:<3} "
            f"{r.registers:>4} {r.stack + r.local:>5} {r.shared:>7}  {r.intended:<12} {_short(instr)}"
        )
    return "\n".join(lines)


def format_summary(results: list[Lowered]) -> str:
    """One line per kernel and target: how many variants, register range, worst spill, shared
    memory range, and the matrix instructions found."""
    groups: dict[tuple[str, int], list[Lowered]] = {}
    for r in results:
        groups.setdefault((r.kernel, r.arch), []).append(r)
    header = (f"{'kernel':<26} {'sm':>3} {'variants':>8} {'regs min-max':>13} {'spill B max':>11} "
              f"{'smem B min-max':>16}  matrix instructions")
    lines = [header, "-" * len(header)]
    for (kernel, arch), rows in sorted(groups.items()):
        kinds = ",".join(sorted({k for r in rows for k in r.mma_kinds}))
        regs = [r.registers for r in rows]
        smem = [r.shared for r in rows]
        spill = max(r.stack + r.local for r in rows)
        lines.append(f"{kernel:<26} {arch:>3} {len(rows):>8} {min(regs):>6}-{max(regs):<6} {spill:>11} "
                     f"{min(smem):>7}-{max(smem):<8}  {_short(kinds)}")
    return "\n".join(lines)


def _short(instr: str) -> str:
    """mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 -> mma m16n8k16 f16 (operand type)."""
    if not instr:
        return "-"
    out = []
    for kind in instr.split(","):
        parts = kind.split(".")
        shape = next((p for p in parts if re.fullmatch(r"m\d+n\d+k\d+", p)), "?")
        types = parts[parts.index(shape) + 1:]
        operand = next((t for t in types if t in ("f16", "bf16", "tf32", "f64")), "?")
        out.append(f"{'wgmma' if parts[0] == 'wgmma' else 'mma'} {shape} {operand}")
    return "; ".join(sorted(set(out)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the subset `make test-slow` compiles")
    parser.add_argument("--ci", action="store_true", help="only the few launches `make test` compiles")
    parser.add_argument("--arch", type=int, action="append", help="80 and/or 90 (default both)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: lowering needs the compiled kernels")
    import triton

    archs = tuple(args.arch or (80, 90))
    if args.ci:
        compiled = [r for case, case_archs in ci_cases()
                    for r in lower_cases([case], tuple(a for a in case_archs if a in archs))]
        results = list({id(r): r for r in compiled}.values())  # a launch two cases share, once
    else:
        results = lower_cases(test_cases() if args.quick else benchmark_cases(), archs)
    print(f"# MIRA Triton kernels lowered ahead of time (triton {triton.__version__}, no GPU): one row per distinct")
    print("# compiled kernel; 'first case' is the first configuration that launches it. spill = STACK + LOCAL")
    print("# bytes, smem = static + dynamic shared memory (bytes), regs per thread, w/s = warps/stages.")
    print(format_table(results))
    print()
    print(format_summary(results))
    bad = [r for r in results if r.spills or r.shared > SMEM_LIMIT[r.arch] or not r.meets_intent]
    print(f"# {len(results)} kernels; {len(bad)} with spills, shared memory over the target's limit, or without "
          "the intended matrix instructions")
    if args.json:
        rows = [dict(asdict(r), spills=r.spills, shared=r.shared, meets_intent=r.meets_intent,
                     smem_limit=SMEM_LIMIT[r.arch]) for r in results]
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
