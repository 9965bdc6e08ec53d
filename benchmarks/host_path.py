"""Host-side cost of one Triton-backend ``mira_linear`` call, stage by stage, on a CPU. Not a test.

    python -m benchmarks.host_path            # ~1 min; run under /work/tools/timing when recording
    python -m benchmarks.host_path --cold     # one call per sample, after a 64 MiB cache sweep
    python -m benchmarks.host_path --quick    # smoke run (tests/test_host_path.py): numbers not meaningful

Why: on the H200 host (benchmarks/results/gpu/README.md) an eager Triton call of ``mira_linear``
(bf16, ViT-B qkv, B = 1) costs ~408 us of wall time for ~40 us of kernels: the rest is host time.
No GPU here, so this harness runs the op's whole host path on CPU tensors, *up to the launch*:

* the public function with the backend forced to ``triton`` (routing accepts CPU tensors when
  ``TRITON_INTERPRET=1`` is in the environment at call time; the kernels were imported before it
  was set, so they are real ``JITFunction`` objects, and ``launchers.interpreting()`` was cached
  False, so the plan is the compiled kernels' plan, not the interpreter's);
* every ``kernel[grid](...)`` replaced by a no-op (:func:`stubbed_kernels`), so what is timed is
  ours: the wrapper, the dispatcher and the C++ autograd/check/route, the Python router, the plan,
  the allocations, :class:`~mira_kernels.triton.launchers.Launch` bookkeeping;
* Triton's own per-launch Python (``JITFunction.run``: the generated binder, which specialises
  every argument, and ``compute_cache_key``) timed separately on the same arguments with the
  binder Triton would build for an sm_90 target: an ESTIMATE of its launcher cost that leaves out
  the driver calls (current device and stream), ``launch_metadata`` and the C launcher itself.

What differs from a CUDA call, and is therefore not in the figures: CPU allocations stand in for
the CUDA caching allocator's; ``torch.cuda.device(...)`` around the launches (CUDA only);
``use_pdl`` is False on CPU (one bool, same plan shape); the CUDA branch of routing is timed by
itself with ``torch.cuda`` queries faked (``resolve_cuda``). Every stage is a median over
interleaved rounds of warm calls: the GPU host's calls follow the model's other work with cold
caches and cost more; the ranking of the stages is what carries over.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

from benchmarks import _cli, latency

T, D, D_OUT, R, SLOTS, OFFSETS = 197, 768, 2304, 4, 30, (0, 1536)


def case(batch: int = 1, dtype: torch.dtype = torch.bfloat16, device: str = "cpu") -> tuple:
    """ViT-B/16 qkv inputs (adapters on Q and V), memory in float32 as MIRA's layers keep it."""
    g = torch.Generator().manual_seed(0)
    mem = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    def t(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(dt).to(device)

    x = t(batch, T, D)
    weight, bias = t(D_OUT, D), t(D_OUT)
    query, keys = t(batch, D, dt=mem), t(SLOTS, D, dt=mem)
    bank_a, bank_b = t(SLOTS, 2, R, D, dt=mem), t(SLOTS, 2, D, R, dt=mem)
    return x, weight, bias, query, keys, bank_a, bank_b


# ----------------------------------------------------------------------------------------------
# The fakes: kernels that do not launch, and the CUDA queries of routing.
# ----------------------------------------------------------------------------------------------


class _NoLaunch:
    """Stands in for a ``JITFunction``: ``k[grid](**kwargs)`` does nothing; ``fn`` names it."""

    def __init__(self, jit):
        self.jit = jit
        self.fn = jit.fn
        self.arg_names = jit.arg_names

    def __getitem__(self, grid):
        return _no_op


    @classmethod
    def __class_getitem__(cls, grid):  # the class itself stands in for a CompiledKernel: K[grid](*args)
        return _no_op


def _no_op(*args, **kwargs) -> None:
    return None


@contextlib.contextmanager
def stubbed_kernels():
    """Every kernel of :mod:`mira_kernels.triton.kernels` that a plan launches becomes a no-op."""
    from mira_kernels.triton import kernels

    names = [n for n in dir(kernels) if n.startswith("_mira_") and n.endswith("_kernel")]
    saved = {n: getattr(kernels, n) for n in names}
    try:
        for n, k in saved.items():
            setattr(kernels, n, _NoLaunch(k))
        yield saved
    finally:
        for n, k in saved.items():
            setattr(kernels, n, k)


@contextlib.contextmanager
def triton_routes_cpu():
    """Routing accepts CPU tensors for ``triton`` (the interpreter's rule), with the kernels and the
    plan those of the compiled path: both were read before the variable is set (module doc)."""
    from mira_kernels.triton import kernels, launchers  # noqa: F401 - import the JITFunctions first

    launchers.interpreting()  # cached now, False unless the caller's environment set it
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


@contextlib.contextmanager
def fake_cuda(capability=(9, 0)):
    """``torch.cuda`` answers as on a one-GPU machine of ``capability`` (routing's queries only)."""
    from mira_kernels import backends
    from mira_kernels import triton as mt

    saved = (torch.cuda.is_available, torch.cuda.current_device, torch.cuda.get_device_capability)
    torch.cuda.is_available = lambda: True
    torch.cuda.current_device = lambda: 0
    torch.cuda.get_device_capability = lambda index=None: capability
    mt._capability.cache_clear()
    backends._capability.cache_clear()
    try:
        yield
    finally:
        torch.cuda.is_available, torch.cuda.current_device, torch.cuda.get_device_capability = saved
        mt._capability.cache_clear()
        backends._capability.cache_clear()


# ----------------------------------------------------------------------------------------------
# Triton's launcher, estimated: the binder and cache key of JITFunction.run on the same arguments.
# ----------------------------------------------------------------------------------------------


def triton_binders(launches) -> list[Callable[[], object]] | str:
    """One callable per launch doing what ``JITFunction.run`` does on the host before the C launcher
    (binder + cache key), or why that cannot be built with this Triton."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime import jit
    except ImportError as exc:
        return f"triton internals not importable: {exc}"
    if not hasattr(jit, "create_function_from_signature") or not hasattr(jit, "compute_cache_key"):
        return "this Triton has no create_function_from_signature / compute_cache_key"
    backend = make_backend(GPUTarget("cuda", 90, 32))
    calls = []
    for launch in launches:
        kernel = launch.kernel.jit if isinstance(launch.kernel, _NoLaunch) else launch.kernel
        binder = jit.create_function_from_signature(kernel.signature, kernel.params, backend)
        kwargs = dict(launch.args, **launch.constexprs, num_warps=launch.num_warps, num_stages=launch.num_stages)
        if launch.pdl:
            kwargs["launch_pdl"] = True
        if launch.maxnreg is not None:
            kwargs["maxnreg"] = launch.maxnreg
        key_cache: dict = {}

        def call(binder=binder, kwargs=kwargs, key_cache=key_cache, kernel=kernel):
            kw = dict(kwargs)
            kw["debug"] = kw.get("debug", kernel.debug)
            bound, specialization, options = binder(**kw)
            return jit.compute_cache_key(key_cache, specialization, options)

        call()  # fills the key cache, as a warm JITFunction has
        calls.append(call)
    return calls


# ----------------------------------------------------------------------------------------------
# The stages.
# ----------------------------------------------------------------------------------------------


def stages(batch: int, dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    """name -> callable, each one stage of the host path (or the whole of it: ``op_total``)."""
    import mira_kernels as mk
    from mira_kernels import _extension, backends, ops
    from mira_kernels import triton as mt
    from mira_kernels.triton import launchers

    x, weight, bias, query, keys, bank_a, bank_b = args = case(batch, dtype)
    offsets = list(OFFSETS)
    plan_args = (*args, offsets, "affine", 1.0, 1e-2)
    out = {}

    plan_cache = _plan_cache()

    def op_total():
        with backends.use_backend("triton"):
            return mk.mira_linear(x, weight, bias, query, keys, bank_a, bank_b, slice_offsets=offsets)

    def op_total_uncached():  # the same with the plan cache off (as before it existed)
        plan_cache.DEVICE_TYPES.discard("cpu")
        try:
            return op_total()
        finally:
            plan_cache.DEVICE_TYPES.add("cpu")

    out["op_total"] = op_total
    if plan_cache is not None:
        out["op_uncached"] = op_total_uncached

    def wrapper():  # the public function's own Python before the op (the eager path)
        with backends.use_backend("triton"):
            ops._check_scalars(1.0, 1e-2)
            ops._eager_backend(x)
            ops._check_frozen(weight, bias)

    out["wrapper"] = wrapper

    from mira_kernels import _validation

    def py_checks():  # the Python checks: traced calls and the error path only (eager leaves them to C++)
        _validation.check_mira_linear(x, weight, bias, query, keys, bank_a, bank_b, offsets, "affine", 1.0, 1e-2)

    out["py_checks"] = py_checks

    cuda0 = torch.device("cuda", 0)

    def resolve_cuda():  # routing's CUDA branch (run() fakes torch.cuda's answers: fake_cuda)
        return backends.resolve_backend(cuda0)

    out["resolve_cuda"] = resolve_cuda

    y_done = torch.empty(batch, T, D_OUT, dtype=dtype)

    if _extension.loaded:
        def dispatch():  # C++ autograd + checks + route into the Python router, backend returning at once
            saved = mt.mira_linear
            mt.mira_linear = lambda *a: y_done
            try:
                return torch.ops.mira.mira_linear(*args, offsets, "affine", 1.0, 1e-2, "triton")
            finally:
                mt.mira_linear = saved

        out["dispatch"] = dispatch

    def plan():
        return launchers.plan_linear(*plan_args)

    out["plan"] = plan

    def plan_cached():  # a hit of the plan cache: key, allocations, the launches' arguments refilled
        return plan_cache.plan_linear(*plan_args)

    if plan_cache is not None:
        out["plan_cached"] = plan_cached
    _, plan_launches = launchers.plan_linear(*plan_args)
    n_alloc = _count_allocations(plan_launches, args)

    def alloc():  # the plan's allocations alone, as empty tensors of the same sizes
        for numel, dt in n_alloc:
            torch.empty(numel, dtype=dt)

    out["alloc"] = alloc

    def launch_ours():  # our Python from plan to kernel[grid] (the kernels are no-ops)
        launchers.run_all(plan_launches, x.device)

    out["launch_ours"] = launch_ours
    if plan_cache is not None:
        _, replayed = plan_cache.plan_linear(*plan_args)

        def launch_cached():  # the same for the replayed launches (keyword dicts prepared by the cache)
            launchers.run_all(replayed, x.device)

        out["launch_cached"] = launch_cached
        _, direct = plan_cache.plan_linear(*plan_args)
        for la in direct:  # as if each replay had compiled: a no-op stands in for Triton's CompiledKernel
            kw = la.kwargs
            la.template.compiled[tuple(kw[n].data_ptr() % 16 == 0 for n in la.template.input_names)] = _NoLaunch

        def launch_direct():  # plan_cache.DIRECT_LAUNCH: our part (alignment lookup, positional arguments)
            plan_cache.DIRECT_LAUNCH = True
            try:
                launchers.run_all(direct, x.device)
            finally:
                plan_cache.DIRECT_LAUNCH = False

        out["launch_direct"] = launch_direct

    grad_out = torch.randn(batch, T, D_OUT).to(dtype)
    backward_args = (grad_out, x, weight, query, keys, bank_a, bank_b, offsets, "affine", 1.0, 1e-2,
                     [True, True, True, False, False])

    def plan_backward():  # training: the backward's plan (dx, dquery, dkeys), uncached
        return launchers.plan_linear_backward(*backward_args)

    out["plan_backward"] = plan_backward
    if plan_cache is not None:
        def plan_backward_cached():
            return plan_cache.plan_linear_backward(*backward_args)

        out["plan_bwd_cached"] = plan_backward_cached
    _, backward_launches = launchers.plan_linear_backward(*backward_args)
    for name, launches in (("triton_jit_bwd_est", backward_launches), ("triton_jit_est", plan_launches)):
        binders = triton_binders(launches)
        if not isinstance(binders, str):
            out[name] = _each(binders)
    return out


def _each(calls):
    """One stage that makes every call of ``calls`` in turn."""
    def run():
        for call in calls:
            call()

    return run


def _plan_cache():
    """mira_kernels.triton.plan_cache, or None in a checkout from before it (to time the old code)."""
    try:
        from mira_kernels.triton import plan_cache
    except ImportError:
        return None
    return plan_cache


def _count_allocations(launches, inputs) -> list[tuple[int, torch.dtype]]:
    """Shapes and dtypes of the tensors the plan allocated (arguments whose storage is not an input's)."""
    given = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
    seen, fresh = set(), []
    for launch in launches:
        for value in launch.args.values():
            if isinstance(value, torch.Tensor):
                ptr = value.untyped_storage().data_ptr()
                if ptr not in given and ptr not in seen:
                    seen.add(ptr)
                    fresh.append((value.untyped_storage().nbytes() // value.element_size(), value.dtype))
    return fresh


def measure(fns: dict[str, Callable[[], object]], rounds: int, inner: int) -> dict[str, dict]:
    """Median (and quartiles) over ``rounds`` interleaved rounds of the mean of ``inner`` calls, us."""
    for fn in fns.values():  # warm: first calls load modules and fill caches
        for _ in range(3):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for i in range(rounds):
        for name in order[i % len(order):] + order[: i % len(order)]:  # rotate the order each round
            fn = fns[name]
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - start) / inner * 1e6)
    result = {}
    for name, s in samples.items():
        q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0]] * 3
        result[name] = dict(median=statistics.median(s), q1=q[0], q3=q[2], rounds=len(s))
    return result


_EVICT = None


def _evict() -> None:
    """Sweeps 64 MiB through the caches, as the op's neighbours (a large GEMM) do on a real host."""
    global _EVICT
    if _EVICT is None:
        _EVICT = torch.ones(16 * 1024 * 1024, dtype=torch.float32)
    _EVICT.add_(1.0)


def measure_cold(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, dict]:
    """Median (and quartiles) over ``rounds`` single calls, each after :func:`_evict`, us."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for i in range(rounds):
        for name in order[i % len(order):] + order[: i % len(order)]:
            fn = fns[name]
            _evict()
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e6)
    result = {}
    for name, s in samples.items():
        q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0]] * 3
        result[name] = dict(median=statistics.median(s), q1=q[0], q3=q[2], rounds=len(s))
    return result


def machine() -> dict:
    import triton

    from benchmarks._pairs import cpu_identity

    ident = cpu_identity()  # the model name, and family / model / stepping, as every CPU record names them
    isa = torch.backends.cpu.get_cpu_capability()
    return dict(cpu=ident["cpu"], family=ident.get("family"), model=ident.get("model"), stepping=ident.get("stepping"),
                cores=os.cpu_count(), isa=isa, load=os.getloadavg(), python=platform.python_version(),
                torch=torch.__version__, triton=triton.__version__)


DESCRIPTIONS = {
    "op_total": "mk.mira_linear under use_backend('triton'), kernels stubbed: everything ours up to the launch",
    "op_uncached": "the same with the plan cache off (every call plans)",
    "wrapper": "public wrapper's Python before the op (_check_scalars, _eager_backend, _check_frozen)",
    "py_checks": "_validation.check_mira_linear (NOT on the eager path: traced calls and errors only)",
    "resolve_cuda": "resolve_backend(cuda:0), torch.cuda queries faked (on CUDA the wrapper runs this branch)",
    "dispatch": "torch.ops.mira.mira_linear: C++ autograd + C++ checks + route to the Python router, no plan",
    "plan": "launchers.plan_linear (configs, grids, Launch records, allocations)",
    "plan_cached": "plan_cache.plan_linear, a hit: key, the plan's allocations, arguments refilled",
    "alloc": "the plan's allocations alone (torch.empty on CPU; CUDA's caching allocator differs)",
    "launch_ours": "run_all: Launch.run bookkeeping up to kernel[grid](...) (no-op kernels)",
    "launch_cached": "run_all over the replayed launches (keyword dicts prepared once)",
    "launch_direct": "run_all with plan_cache.DIRECT_LAUNCH, our part only (Triton's CompiledKernel is a no-op)",
    "plan_backward": "launchers.plan_linear_backward into dx, dquery, dkeys (training), uncached",
    "plan_bwd_cached": "plan_cache.plan_linear_backward, a hit",
    "triton_jit_bwd_est": "ESTIMATE of Triton's JITFunction.run for all the backward's launches",
    "triton_jit_est": "ESTIMATE of Triton's JITFunction.run per call (all launches): binder + cache key",
}


def run(batch: int, dtype: torch.dtype, rounds: int, inner: int, cold: bool = False) -> dict:
    plan_cache = _plan_cache()
    if plan_cache is not None:  # the harness's tensors are CPU tensors standing in for CUDA ones
        plan_cache.DEVICE_TYPES.add("cpu")
        plan_cache.clear()
    try:
        with torch.no_grad(), triton_routes_cpu(), stubbed_kernels(), fake_cuda():
            fns = stages(batch, dtype)
            result = measure_cold(fns, rounds) if cold else measure(fns, rounds, inner)
    finally:
        if plan_cache is not None:
            plan_cache.DEVICE_TYPES.discard("cpu")
            plan_cache.clear()
    return dict(machine=machine(), batch=batch, dtype=str(dtype), rounds=rounds, inner=1 if cold else inner,
                cold=cold, stages=result)


def format_table(record: dict) -> str:
    m = record["machine"]
    lines = [
        f"host path of one Triton mira_linear call, {record['dtype']} ViT-B qkv B={record['batch']}, "
        "HOST ONLY (no GPU, kernels not launched)",
        f"commit {record.get('commit', '?')}, {record.get('timestamp', '?')}",
        f"machine: {m['cpu']} (family {m.get('family')} model {m.get('model')} stepping {m.get('stepping')}), "
        f"{m['cores']} cores, ISA {m['isa']}, load {tuple(round(v, 2) for v in m['load'])}; "
        f"python {m['python']}, torch {m['torch']}, triton {m['triton']}",
        (f"median of {record['rounds']} interleaved single calls, each after a 64 MiB cache sweep (us, [q1, q3])"
         if record.get("cold") else
         f"median of {record['rounds']} interleaved rounds of {record['inner']} warm calls (us, [q1, q3])"),
    ]
    for name, r in record["stages"].items():
        lines.append(f"  {name:15s} {r['median']:8.1f}  [{r['q1']:.1f}, {r['q3']:.1f}]  {DESCRIPTIONS.get(name, '')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_path", description=__doc__.splitlines()[0],
                                     formatter_class=_cli.HelpFormatter)
    parser.add_argument("--batch", type=_cli.positive_int, default=1, help="batch size")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="dtype of x")
    parser.add_argument("--rounds", type=_cli.positive_int, default=60, help="interleaved rounds")
    parser.add_argument("--inner", type=_cli.positive_int, default=20, help="warm calls per round")
    parser.add_argument("--cold", action="store_true", help="one call per sample, after a cache sweep")
    parser.add_argument("--json", help="append the record (one JSON line) to this file")
    parser.add_argument("--label", default="", help="a name for the code measured (e.g. an experiment)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 rounds of 2 calls")
    opts = parser.parse_args(argv)
    if opts.json and (problem := _cli.output_problem(opts.json, folder=False)):
        parser.error(f"--json: {problem}")
    if opts.quick:
        opts.rounds, opts.inner = 3, 2
    record = run(opts.batch, getattr(torch, opts.dtype), opts.rounds, opts.inner, opts.cold)
    record["label"] = opts.label
    record["commit"] = latency.git_commit()  # the label is free text: the record names the code measured
    record["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(format_table(record))
    if opts.json:
        with _cli.whole_or_not_at_all(), open(opts.json, "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(_cli.run_main(main))
