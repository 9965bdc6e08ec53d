"""The GPU performance model (benchmarks/gpu_model.py): labelled, sourced, built from the launch plans.

A smoke test kept cheap for CI (two batch sizes, bf16, meta tensors only; ~1 s here): it checks the
report is labelled as a model, every assumption names its source, the MIRA variants' launches are
the backends' planned launches (not hard-coded), the accounting is consistent, and a measured
gpu-check record is printed beside the model.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import replace

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

gm = pytest.importorskip("benchmarks.gpu_model")


@pytest.fixture(scope="module")
def mach():
    return gm.Machine()


def test_report_is_labelled_and_sourced(mach):
    text = gm.report(mach, dtypes=(torch.bfloat16,), batches=(1, 8))
    assert text.startswith("MODEL, NOT A MEASUREMENT")
    for key in gm.SOURCES:
        assert f"  {key} = " in text, key
    # Every Machine field that prices something names where its value comes from.
    assert set(gm.SOURCES) == {f for f in gm.Machine.__dataclass_fields__ if f != "name"}
    for B in (1, 8):
        for variant in gm.VARIANTS:
            assert f"{B:>4} {variant:<11}" in text, (B, variant)
        assert f"-- B={B}: plain cuBLAS qkv" in text


@pytest.mark.parametrize("B", [1, 64])
def test_mira_launches_come_from_the_plans(mach, B):
    from mira_kernels import launch_plan

    plan = launch_plan.describe("triton", "mira_linear", *gm.mira_args("mira_linear", B, torch.bfloat16), sms=132)
    ops = gm.qkv_ops("triton", B, torch.bfloat16, mach)
    mira_op = next(op for op in ops if op.name.startswith("mira_linear"))
    assert [k.name for k in mira_op.launches] == [k.name for k in plan.launches] == ["retrieve", "gemm"]
    assert all(a == b for a, b in zip(mira_op.launches, plan.launches))
    # End to end, each of the 12 blocks swaps the plain cuBLAS qkv launch for the op's planned
    # launches and the layer's extras: the key normalisation (mira.memory._per_feature_unit on a GPU:
    # normalize_columns, also for the 16-bit keys attach makes; F.normalize's three for the runs
    # recorded so far) and no query cast (a 16-bit x passes its CLS view x[:, 0] as the query).
    plain = gm.model_ops("plain", B, torch.bfloat16, mach)
    for path, kernels in (("fused", ["_normalize_columns_kernel"]),
                          ("f_normalize", ["linalg_vector_norm", "clamp_min", "div"])):
        m = replace(mach, key_norm_bf16=path).for_dtype(torch.bfloat16)
        ops = gm.qkv_ops("triton", B, torch.bfloat16, m)
        key_norm = next(op for op in ops if op.name == "key norm")
        assert [k.kernel for k in key_norm.launches] == kernels
        mira = gm.model_ops("triton", B, torch.bfloat16, m)
        per_block = sum(len(op.launches) for op in ops)
        assert per_block == len(plan.launches) + len(kernels)
        assert sum(len(op.launches) for op in mira) == sum(len(op.launches) for op in plain) + 12 * (per_block - 1)


def test_accounting_is_consistent(mach):
    for dtype in (torch.bfloat16, torch.float32):
        for B in (1, 64):
            plain = gm.time_ops(gm.model_ops("plain", B, dtype, mach), mach)
            floor = gm.floor_us(B, dtype, mach)
            assert floor > 0
            for variant in ("triton", "vllm-style", "unfused"):
                t = gm.time_ops(gm.model_ops(variant, B, dtype, mach), mach)
                # Nothing runs faster than the plain model it contains, nor beats the floor.
                assert t.graph > plain.graph + floor * 1e-6, (variant, dtype, B)
                # Eager: the slower of host and device, whose launches are the graph's but the
                # graph-only ones (the key norm a replay recomputes, cached in eager inference).
                assert t.eager == max(t.device, t.host) and t.device <= t.graph
    # A launch with programmatic dependent launch overlaps its producer: the pair costs less than
    # the two in sequence, and no less than either alone.
    ops = gm.qkv_ops("triton", 8, torch.bfloat16, mach)
    launches = next(op for op in ops if op.name.startswith("mira_linear")).launches
    assert launches[-1].pdl
    total, priced = gm.sequence_time(list(launches), mach)
    serial = sum(p.us for p in priced) * 1e-6 + mach.graph_gap
    assert max(p.us for p in priced) * 1e-6 <= total < serial


def test_leading_programs_hide_the_retrieval_behind_whole_waves(mach):
    # bf16 ViT-B/16 qkv at B = 64: one 128 x 256 tile per program, 9 column tiles of which 3 (the K
    # slice) carry no adapter. Those programs are launched first for every row block (LEAD_GROUPS),
    # filling whole waves of the 132 SMs before any program waits for the retrieval, which PDL runs
    # beside them, on the SMs its own 64 programs leave free. In row-block order (the launch order
    # until 2026-12-07) adapted programs sit in the first wave and wait at once: the pair costs the sum.
    ops = gm.qkv_ops("triton", 64, torch.bfloat16, mach)
    retrieve, gemm = next(op for op in ops if op.name.startswith("mira_linear")).launches
    assert gemm.pdl and gemm.wait_fraction == 0.0 and gemm.leading_programs == gemm.programs // 3
    assert gemm.leading_programs >= 2 * mach.sms
    assert gm.wait_fraction(gemm, mach) == pytest.approx((gemm.leading_programs // mach.sms)
                                                         / -(-gemm.programs // mach.sms))
    total, priced = gm.sequence_time([retrieve, gemm], mach)
    r, g = (p.us * 1e-6 for p in priced)
    # The GEMM's work before its first wait goes on beside the retrieval at the share of the SMs the
    # retrieval's programs leave it, then at full speed: the retrieval is hidden in part.
    held = min(1.0, retrieve.programs / mach.sms)
    assert total == pytest.approx(g + r * held)
    row_block_order, _ = gm.sequence_time([retrieve, replace(gemm, leading_programs=0)], mach)
    assert row_block_order == pytest.approx(r + g) and g < total < row_block_order


def test_a_chain_of_dependent_launches_overlaps_as_a_whole(mach):
    # fp16 ViT-B/16 qkv at B = 1 (its shrink has its own launch): retrieval, the shrink (PDL, waits for
    # the retrieval at once) and the GEMM (PDL, waits before its expand). All three start together; the
    # GEMM ends after the longer of its main loop and the retrieval + shrink chain. Pricing pairs alone
    # (the model until 2026-12-07) let the GEMM overlap only the shrink.
    ops = gm.qkv_ops("triton", 1, torch.float16, mach)
    launches = next(op for op in ops if op.name.startswith("mira_linear")).launches
    assert [k.name for k in launches] == ["retrieve", "shrink", "gemm"]
    total, priced = gm.sequence_time(list(launches), mach)
    r, s, g = (p.us * 1e-6 for p in priced)
    w = gm.wait_fraction(launches[2], mach)
    assert gm.wait_fraction(launches[1], mach) == 0.0 and 0.75 < w < 1.0
    # The GEMM's main loop runs beside the chain on the SMs the shrink's programs leave free, its
    # expand after the shrink has ended (at r + s, the shrink having waited for the retrieval).
    held = launches[1].programs / mach.sms
    free = (r + s) * (1 - held)
    reached = w * g / (1 - held) if w * g <= free else (r + s) + (w * g - free)
    assert total == pytest.approx(max(reached, r + s) + (1 - w) * g)
    assert max(g, r + s) <= total < r + s + g


def test_a_launch_behind_a_producer_that_fills_the_device_waits_it_out(mach):
    # A PDL launch that waits at once behind a producer whose programs hold every SM gets no room
    # beside it: the pair costs the two in sequence (and is priced, not divided by zero).
    ops = gm.qkv_ops("triton", 64, torch.bfloat16, mach)
    retrieve, gemm = next(op for op in ops if op.name.startswith("mira_linear")).launches
    full = replace(retrieve, grid=(mach.sms, 2))
    dependent = replace(gemm, wait_fraction=0.0, leading_programs=0)
    total, priced = gm.sequence_time([full, dependent], mach)
    assert total == pytest.approx((priced[0].us + priced[1].us) * 1e-6)


def test_measured_record_printed_beside_the_model(mach):
    doc = {"schema": "mira-gpu-check/1", "started": "2026-12-01T00:00:00Z",
           "environment": {"gpu": {"name": "NVIDIA H200"}},
           "phases": {"op": {"measurements": [
               {"mode": "forward", "ok": True, "dtype": "bfloat16", "batch": 8, "kind": "mira", "backend": "triton",
                "variant": "triton", "graph_us": {"median": 17.5}, "eager_us": {"median": 60.0},
                "kernels": [{"name": "_mira_gemm_kernel", "us": 15.0, "calls": 1}]}]}}}
    lines = gm.measured_tables(doc, mach)
    row = next(line for line in lines if "B=8" in line)
    assert "measured      17.5" in row and "measured      60.0" in row
    assert any("_mira_gemm_kernel" in line and "model" in line and "15.00" in line for line in lines)


def test_a_recorded_gpu_check_run_is_read_cell_by_cell(mach):
    # The schema names dtypes as torch does ("bfloat16"): a reader keyed on "bf16" printed nothing
    # for the first real runs. Every timed forward cell of the Triton backend gets its row.
    import json
    from pathlib import Path

    path = next(Path(__file__).resolve().parents[2].glob("benchmarks/results/gpu/*ede8e19*/gpu_check.json"))
    doc = json.loads(path.read_text())
    lines = gm.measured_tables(doc, mach)
    timed = {(m["dtype"], m["batch"]) for m in doc["phases"]["op"]["measurements"]
             if m["mode"] == "forward" and m["ok"] and m.get("backend") == "triton"}
    assert len(timed) == 8
    for dtype, batch in timed:
        assert any(line.startswith("  op    mira[triton]") and dtype in line and f"B={batch} " in line
                   for line in lines), (dtype, batch)


def _fourth_run():
    import json
    from pathlib import Path

    path = next(Path(__file__).resolve().parents[2].glob("benchmarks/results/gpu/*9c67b4a*/gpu_check.json"))
    return json.loads(path.read_text())


def test_fp32_gemms_are_priced_on_cuda_cores(mach):
    # PyTorch runs fp32 matmuls without TF32 by default (every gpu-check run records allow_tf32 False):
    # the a-priori model priced them on TF32 tensor cores at the bf16 rate, ~10x under the measured
    # stock fp32 forward on the H200.
    assert gm._linear("qkv", 1576, 2304, 768, 4).flops.keys() == {"fma_fp32"}
    fp32 = gm.price(gm._linear("qkv", 50432, 2304, 768, 4), mach).us
    bf16 = gm.price(gm._linear("qkv", 50432, 2304, 768, 2), mach).us
    assert fp32 > 8 * bf16  # the CUDA-core fp32 rate is ~1/15 of the bf16 tensor-core rate
    t = gm.modelled("plain", 256, torch.float32, mach)
    assert 0.8 < t.graph * 1e6 / 195148.0 < 1.25  # the fourth H200 run's stock fp32 B=256, a priori


def test_calibration_fits_each_constant_to_its_cell_and_holds_the_rest_out(mach):
    doc = _fourth_run()
    cal, notes = gm.calibrate(mach, doc)
    cells = gm.measured_cells(doc)
    assert len(notes) == len(gm.CALIBRATION) and all("fitted to" in n for n in notes), notes
    # The fourth run's layers normalised their keys with F.normalize's three ops; the model prices today's code.
    assert (cal.key_norm_bf16, cal.key_norm_fp32) == ("fused", "fused")
    ran = gm.as_run(cal, doc)
    assert (ran.key_norm_bf16, ran.key_norm_fp32) == ("f_normalize", "f_normalize")
    for name, variant, dtype, B, mode, _ in gm.CALIBRATION:
        assert getattr(cal, name) != getattr(mach, name), name
        t = gm.modelled(variant, B, dtype, gm.as_run(cal, doc))  # the cell as that run ran it
        got = (t.graph if mode == "graph" else t.eager) * 1e6
        assert got == pytest.approx(cells[(variant, dtype, B)][mode], rel=1e-3), name
    lines = gm.measured_tables(doc, cal, calibrated=True)
    marked = [line for line in lines if re.search(r"x *[0-9.]+ fit( |$)", line)]
    assert len(marked) == len({(v, d, b) for _, v, d, b, _, _ in gm.CALIBRATION})
    summary = next(line for line in lines if "cells not fitted" in line)
    modelled = [key for key in cells if key[0] in gm.VARIANTS or key[0] == "unfused"]  # not the reference backend
    assert f"over the {2 * len(modelled) - len(gm.CALIBRATION)} " in summary  # graph + eager per cell, minus the fitted
    # A run without the cell a constant needs leaves it at its a-priori value, and says so.
    missing = {"phases": {"model": {"measurements": []}}}
    same, notes = gm.calibrate(mach, missing)
    assert same == mach and all("not fitted" in n for n in notes)


def test_calibration_says_when_the_run_was_on_another_chip(mach):
    # The constants are an H200's; a lent machine may be an H100 (SXM 132 SMs, PCIe 114).
    doc = _fourth_run()
    assert gm.other_device(mach, doc) is None  # the fourth run was on the H200
    for name, sms in (("NVIDIA H100 PCIe", 114), ("NVIDIA H100 80GB HBM3", 132), ("NVIDIA H200", 114)):
        other = {**doc, "environment": {**doc["environment"], "gpu": {**doc["environment"]["gpu"],
                                                                       "name": name, "sms": sms}}}
        _, notes = gm.calibrate(mach, other)
        assert notes[0].startswith(f"the run's GPU is {name} ({sms} SMs)"), notes[0]
        assert len(notes) == len(gm.CALIBRATION) + 1


def test_sensitivity_rows_lift_the_assumptions_in_turn():
    # Calibrated to the fourth run: the first row is the end-to-end table's Triton overhead; the
    # fused GEMM at cuBLAS's mainloop rate can only be faster.
    cal, _ = gm.calibrate(gm.Machine(), _fourth_run())
    text = gm.report(cal, dtypes=(torch.bfloat16,), batches=(8, 256))
    lines = text.splitlines()
    start = lines.index(next(x for x in lines if x.startswith("== What the Triton forward's excess")))
    cells = [re.fullmatch(r"(.*?) +([+-][0-9.]+)% +([+-][0-9.]+)%", line).groups()
             for line in lines[start + 2:start + 2 + len(gm.WHAT_IF)]]
    rows = {label: [float(a), float(b)] for label, a, b in cells}
    assert list(rows) == [label for label, _ in gm.WHAT_IF]
    for B, got in zip((8, 256), rows["as modelled"]):
        table = next(x for x in lines if x.startswith(f"{B:>4} {'triton':<11}"))
        assert f"{got:+7.2f}%" in table
    modelled, cublas_rate = rows["as modelled"], rows[gm.WHAT_IF[1][0]]
    assert all(c < m for c, m in zip(cublas_rate, modelled))
    assert lines[start + 2 + len(gm.WHAT_IF)].split()[-4:] == ["<=", "1.0%", "<=", "0.4%"]  # the targets row


# ----------------------------------------------------------------------------------------------
# What the layers and the measured baseline run (a review of the model, 2026-12-07).
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bank_dtype", [None, "float32"])
def test_op_arguments_are_the_memory_attach_makes(bank_dtype):
    # mira.attach makes the memory in the qkv weight's dtype (banks in bank_dtype where set), and the
    # layer passes x's CLS view as the query: the model priced a float32 memory for a bf16 model.
    import mira
    from tests.tiny_models import tiny_vit

    model = tiny_vit().to(torch.bfloat16)
    mira.attach(model, bank_dtype=bank_dtype)
    memory = mira.memories(model)[0]
    x, _, _, query, keys, bank_a, bank_b, *_ = gm.mira_args("mira_linear", 8, torch.bfloat16,
                                                            *([bank_dtype] if bank_dtype else []))
    assert (keys.dtype, bank_a.dtype, bank_b.dtype) == (memory.keys.dtype, memory.bank_a.dtype, memory.bank_b.dtype)
    assert keys.dtype == torch.bfloat16 and bank_a.dtype == (torch.float32 if bank_dtype else torch.bfloat16)
    assert query._base is x and query.shape == (8, gm.D) and query.stride() == (gm.T * gm.D, 1)


def test_the_cuda_backend_converts_a_16_bit_memory_and_the_model_prices_it(mach):
    # The CUDA backend computes the retrieval in float32: given the bf16 memory (and query) a bf16 model
    # has, its plan lists four conversion launches, which the model now charges.
    ops = gm.qkv_ops("cuda", 1, torch.bfloat16, mach)
    op = next(op for op in ops if op.name.startswith("mira_linear"))
    names = [k.name for k in op.launches]
    assert {"query_to_compute", "keys_to_compute", "bank_a_to_compute", "bank_b_to_compute"} <= set(names), names
    plain = gm.model_ops("plain", 1, torch.bfloat16, mach)
    cuda = gm.model_ops("cuda", 1, torch.bfloat16, mach)
    assert sum(len(o.launches) for o in cuda) == sum(len(o.launches) for o in plain) + 12 * (len(names) + 1 - 1)


def test_key_norm_launches_follow_the_keys_dtype_and_the_recorded_path(mach):
    # normalize_columns stores 16-bit keys' result itself, compiled: one launch, as for float32 keys
    # (under the interpreter bfloat16 goes through float32 and a cast, which the GPU model never plans).
    # The fourth H200 run ran F.normalize's three, on bf16 keys there.
    def key_norm(dtype, m=mach):
        return next(op for op in gm.qkv_ops("triton", 8, dtype, m.for_dtype(dtype)) if op.name == "key norm").launches

    fused = key_norm(torch.bfloat16)
    assert [k.kernel for k in fused] == ["_normalize_columns_kernel"]
    assert [k.kernel for k in key_norm(torch.float32)] == ["_normalize_columns_kernel"]
    ran = key_norm(torch.bfloat16, gm.as_run(mach, _fourth_run()))
    assert [k.bytes_read for k in ran][:1] == [gm.SLOTS * gm.D * 2]  # F.normalize's norm, of bf16 keys
    assert [k.kernel for k in ran] == ["linalg_vector_norm", "clamp_min", "div"]
    # Without Triton the layers take mira.memory._unit_columns: its ATen ops, traced (~35 launches).
    aten = gm.key_norm_launches("aten", torch.bfloat16)
    assert len(aten) > 30 and [k.kernel for k in aten[:3]] == ["linalg_vector_norm", "clamp_min", "div"]
    # A record names the path per dtype (gpu_check since 2026-12-07).
    doc = {"phases": {"model": {"layer": {"key_norm_by_dtype": {"bfloat16": "fused", "float32": "aten"}}}}}
    rec = gm.as_run(mach, doc)
    assert (rec.key_norm_bf16, rec.key_norm_fp32) == ("fused", "aten")


def test_key_norm_is_charged_at_graph_replays_only(mach):
    # Eager inference takes the derived keys from the memory's cache: an eager forward pays no key norm,
    # neither launches nor host time, whatever its path; a CUDA graph replays it.
    # Today's path (fused) against the fourth run's (F.normalize: one launch more, and ATen's host time).
    timings = {"now": gm.modelled("triton", 1, torch.bfloat16, mach),
               "run": gm.modelled("triton", 1, torch.bfloat16, gm.as_run(mach, _fourth_run()))}
    assert timings["run"].eager == timings["now"].eager and timings["run"].host == timings["now"].host
    assert timings["run"].graph > timings["now"].graph
    aten = gm.modelled("triton", 1, torch.bfloat16, replace(mach, key_norm_bf16="aten"))
    assert aten.eager == timings["now"].eager and aten.graph > timings["run"].graph
    text = gm.report(mach, dtypes=(torch.bfloat16,), batches=(1,))
    assert "graph columns only" in text and "3 ATen ops a block" not in text


def _non_view_ops(fn, *args) -> list[str]:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not any(r.alias_info is not None for r in func._schema.returns):
                self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Count() as count:
        fn(*args)
    return count.ops


def test_unfused_is_the_measured_eager_baseline(mach):
    # make gpu-check's 'eager' cells time benchmarks.eager_mira.EagerMiraLinear with the keys already
    # normalised: its 31 ATen ops per call (on CPU tensors here), the full-width cat, scale and add
    # included, and no key normalisation of the layer's (the model had 18 hand-written launches, thin
    # slice adds, and the layer's key norm in front).
    from benchmarks.eager_mira import EagerMiraLinear

    B, dtype = 8, torch.bfloat16
    base = torch.nn.Linear(gm.D, 3 * gm.D).to(dtype)
    layer = EagerMiraLinear(base, torch.randn(gm.SLOTS, gm.D).to(dtype), torch.randn(gm.SLOTS, 2, gm.R, gm.D).to(dtype),
                            torch.randn(gm.SLOTS, 2, gm.D, gm.R).to(dtype), list(gm.OFFSETS))
    ops = _non_view_ops(layer, torch.randn(B, gm.T, gm.D).to(dtype))
    assert len(ops) == 31
    qkv = gm.qkv_ops("unfused", B, dtype, mach)
    assert [op.name for op in qkv] == ["unfused"]
    launches = qkv[0].launches
    assert [k.kernel for k in launches] == ops
    full = B * gm.T * 3 * gm.D * 2
    assert [k.bytes_written for k in launches[-3:]] == [full, full, full]  # cat, scale, add at full width
    assert launches[-1].bytes_read == 2 * full
    assert qkv[0].host == len(ops) * mach.host_aten_op


def test_final_norm_covers_every_token(mach):
    # timm's VisionTransformer normalises all B x 197 tokens before pooling the CLS row.
    B = 64
    final_norm = gm.model_ops("plain", B, torch.bfloat16, mach)[-1].launches[0]
    assert final_norm.kernel == "layer_norm"
    assert final_norm.bytes_written == B * gm.T * gm.D * 2 and final_norm.total_flops == 8.0 * B * gm.T * gm.D


def test_per_kernel_rows_match_explicit_patterns_and_sum_per_class(mach):
    # A model launch named 'y' matched every profiler name containing a 'y' (Add, Cat, Fill, ...).
    names = {
        "add": "void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add<c10::BFloat16>, "
               "std::array<char*, 3ul> >(int, at::native::CUDAFunctor_add<c10::BFloat16>, std::array<char*, 3ul>)",
        "cat": "void at::native::(anonymous namespace)::CatArrayBatchedCopy_vectorized<at::native::(anonymous "
               "namespace)::OpaqueType<2u>, unsigned int, 3, 128, 1, 16, 16>(...)",
        "fill_bf16": "void at::native::vectorized_elementwise_kernel<8, at::native::FillFunctor<c10::BFloat16>, "
                     "std::array<char*, 1ul> >(int, at::native::FillFunctor<c10::BFloat16>, std::array<char*, 1ul>)",
        "fill_fp32": "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, "
                     "std::array<char*, 1ul> >(int, at::native::FillFunctor<float>, std::array<char*, 1ul>)",
        "gemm": "nvjet_sm90_tst_192x192_64x4_1x2_h_bz_coopB_bias_TNN",
        "retrieve": "void mira_cuda::mira_retrieve_kernel<float>(mira_cuda::MemoryArgs<float>)",
    }
    kernels = [{"name": names["add"], "us": 4.0, "calls": 1}, {"name": names["cat"], "us": 3.0, "calls": 1},
               {"name": names["fill_bf16"], "us": 1.0, "calls": 1}, {"name": names["fill_fp32"], "us": 0.5, "calls": 2},
               {"name": names["gemm"], "us": 20.0, "calls": 1}, {"name": names["retrieve"], "us": 9.0, "calls": 1}]
    doc = {"schema": "mira-gpu-check/1", "phases": {"op": {"measurements": [
        {"mode": "forward", "ok": True, "dtype": "bfloat16", "batch": 8, "kind": "eager", "variant": "eager",
         "graph_us": {"median": 100.0}, "eager_us": {"median": 400.0}, "kernels": kernels}]}}}
    lines = gm.measured_tables(doc, mach)
    priced = gm.time_ops(gm.qkv_ops("unfused", 8, torch.bfloat16, mach), mach).priced

    def model_us(*ops):
        return sum(p.us for p in priced if p.launch.kernel in ops)

    rows = {}
    for line in lines:
        got = re.fullmatch(r" {6}(.+?) +measured +(?:-|([0-9.]+) us x([0-9.]+)) +model +(?:-|([0-9.]+) us x([0-9]+))",
                           line)
        if got:
            label, us, calls, mine, n = got.groups()
            rows[label] = (us and (float(us), float(calls)), mine and (float(mine), int(n)))
    assert rows["cat"] == ((3.0, 1.0), (pytest.approx(model_us("cat"), abs=0.01), 1))
    assert rows["add"] == ((4.0, 1.0), (pytest.approx(model_us("add"), abs=0.01), 1))
    # new_zeros and the two scalar_tensor fills of the affine guard's sign: one class, summed both sides.
    assert rows["fill"] == ((1.5, 3.0), (pytest.approx(model_us("new_zeros", "scalar_tensor"), abs=0.01), 3))
    assert rows["cuBLAS GEMMs"] == ((20.0, 1.0), (pytest.approx(model_us("bmm", "addmm"), abs=0.01), 10))
    assert rows["mira_retrieve_kernel"] == ((9.0, 1.0), None)  # measured, not in this variant's model
    assert rows["div"][0] is None and rows["div"][1][1] == 3  # modelled, not in this (made-up) measurement


def test_recorded_figures_do_not_depend_on_the_machine_printing_them(monkeypatch, capsys):
    # The host planning time was timed on whatever machine printed the report and fed the calibrated
    # eager constants: two recordings of the same code differed. It is a stated constant now.
    def timed(*_args, **_kwargs):
        raise AssertionError("timed the host planning without --measure-host-planning")

    monkeypatch.setattr(gm, "measure_host_planning", timed)
    gm.main(["--batches", "1"])
    first = capsys.readouterr().out
    gm.main(["--batches", "1"])
    assert capsys.readouterr().out == first
    assert gm.Machine().host_planning > 0 and f"host_planning = {gm.Machine().host_planning:.4g}: " in first


def test_a_gemm_epilogue_stores_the_output_dtype(mach):
    # The fused GEMM's epilogue was priced with 2-byte outputs whatever x's dtype: fp32 stores 4.
    gemm = gm.plan_records("triton", "mira_linear", 64, torch.float32).launch("gemm")
    m, n, _ = gemm.gemm
    as_16_bit = replace(gemm, bytes_written=gemm.bytes_written - 2 * m * n)  # the same record, 2-byte outputs
    assert gm.price(gemm, mach).us > gm.price(as_16_bit, mach).us
    assert (gm._out_bytes(gemm), gm._out_bytes(as_16_bit)) == (4, 2)


def test_little_law_source_agrees_with_the_latency_it_names(mach):
    # The source said a ~0.5 us round trip (and ~34 SMs) where dram_latency is 0.3 us.
    source = gm.SOURCES["sm_inflight"]
    latency = float(re.search(r"([0-9.]+) us", source).group(1))
    assert latency * 1e-6 == pytest.approx(mach.dram_latency)
    sms = int(re.search(r"~([0-9]+) SMs", source).group(1))
    assert sms == round(mach.hbm_bw / (mach.sm_inflight / mach.dram_latency))


def test_the_calibrated_header_points_to_the_held_out_cells_only_where_they_are_printed(mach):
    # --calibrate alone said "see 'Model vs measurement'", a section only --measured prints.
    doc = _fourth_run()
    alone = gm.report(mach, dtypes=(torch.bfloat16,), batches=(1,), calibration=("run.json", [], doc))
    assert "== Model vs measurement" not in alone and "see 'Model vs measurement'" not in alone
    assert "held out and judges the model: --measured run.json prints how the model does on them" in alone
    both = gm.report(mach, dtypes=(torch.bfloat16,), batches=(1,), measured=doc, calibration=("run.json", [], doc))
    assert "see 'Model vs measurement'" in both and "== Model vs measurement" in both


@pytest.mark.parametrize("argv,message", [
    (["--calibrate", "LIST"], "--calibrate LIST: not a gpu_check.json"),  # was an AttributeError traceback
    (["--measured", "LIST"], "--measured LIST: not a gpu_check.json"),
    (["--measured", "OBJECT"], "--measured OBJECT: not a gpu_check.json"),
    (["--before", "LIST"], "--before LIST: not a --dump-plans output"),  # silently ignored
    (["--batches", "8", "1", "8"], "--batches repeats 8"),  # printed every B=8 row twice
])
def test_inputs_that_are_not_what_the_model_reads_are_usage_errors(argv, message, tmp_path, monkeypatch, capsys):
    files = {"LIST": tmp_path / "list.json", "OBJECT": tmp_path / "object.json"}
    files["LIST"].write_text("[1, 2]")
    files["OBJECT"].write_text('{"results": []}')
    monkeypatch.setattr(gm, "report", lambda *a, **k: pytest.fail("the model ran"))
    with pytest.raises(SystemExit) as exc:
        gm.main([str(files[a]) if a in files else a for a in argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    for name, path in files.items():
        message = message.replace(name, str(path))
    assert message in err and "Traceback" not in err
