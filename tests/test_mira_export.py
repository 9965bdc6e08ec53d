"""Export paths: the op's decomposition into standard ops, torch.export, ONNX (onnxruntime), AOTInductor."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import mira
import mira_kernels
from mira.export import check_against_float64, decompose, export_aoti, export_onnx, export_program, load_aoti
from mira_kernels import decompositions, reference
from mira_kernels.decompositions import export_decompositions, mira_linear_decomposed

from .mira_inputs import assert_close_to_spec, make_inputs
from .tiny_models import images, tiny_vit

pytestmark = pytest.mark.filterwarnings("ignore:mira_kernels. no native backend:RuntimeWarning")

needs_extension = pytest.mark.skipif(not mira_kernels.build_info()["extension_loaded"],
                                     reason="the native extension (which registers mira::mira_linear) is not built")


def _spec(inputs, separation="affine", scale=1.0):
    return reference.mira_linear(*inputs.linear_args(), slice_offsets=inputs.slice_offsets, separation=separation,
                                 scale=scale)


def _decomposed(inputs, separation="affine", scale=1.0):
    return mira_linear_decomposed(*inputs.linear_args(), inputs.slice_offsets, separation, scale,
                                  mira_kernels.DEFAULT_EPS, "cpu")


@pytest.mark.parametrize("separation", mira_kernels.SEPARATIONS)
@pytest.mark.parametrize(
    "shape",
    [
        {},                                                        # two slices, bias
        {"N": 0},                                                  # empty memory: the base projection
        {"N": 1},                                                  # affine: the raw cosine
        {"S": 3, "d_out": 40, "offsets": [27, 0, 13], "d_s": 13},  # unordered slices, gaps, a tail
        {"S": 1, "offsets": [24], "bias": False},                  # a slice at the end, no bias
        {"B": 0},
    ],
    ids=["qv", "N0", "N1", "unordered", "tail-no-bias", "B0"],
)
def test_decomposition_matches_the_reference_in_float64(separation, shape):
    inputs = make_inputs(**shape)
    got = _decomposed(inputs, separation, scale=0.7)
    torch.testing.assert_close(got, _spec(inputs, separation, scale=0.7), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("separation", ["affine", "softmax"])
@pytest.mark.parametrize(
    "shape",
    [{}, {"N": 0}, {"S": 3, "d_out": 40, "offsets": [27, 0, 13], "d_s": 13}, {"B": 0}],
    ids=["qv", "N0", "unordered", "B0"],
)
def test_adapter_decomposition_matches_the_reference_in_float64(separation, shape):
    # mira_adapter_ had no decomposition: export_onnx of a model calling it failed deep in torch.onnx.
    inputs = make_inputs(**shape)
    start = F.linear(inputs.x, inputs.weight, inputs.bias)
    start[..., 1] = -0.0  # outside every slice: left exactly as it is (a sum with 0 would make it +0.0)
    got, want = start.clone(), start.clone()
    decompositions.mira_adapter_decomposed(got, *inputs.adapter_args(), inputs.slice_offsets, separation, 0.7,
                                           mira_kernels.DEFAULT_EPS, "cpu")
    reference.mira_adapter_(want, *inputs.adapter_args(), slice_offsets=inputs.slice_offsets, separation=separation,
                            scale=0.7)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    outside = torch.ones(want.shape[-1], dtype=torch.bool)
    for off in inputs.slice_offsets:
        outside[off:off + inputs.bank_b.shape[2]] = False
    assert torch.equal(got[..., outside], start[..., outside]) and torch.equal(got[..., outside].signbit(),
                                                                               start[..., outside].signbit())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("regime", ["random", "near_zero"])
def test_decomposition_precision_follows_the_contract(dtype, regime):
    """16-bit x: memory side in float32 (contract section 4); error within 2x PyTorch's own."""
    inputs64 = make_inputs(T=7, d_in=24, d_out=72, regime=regime)
    memory_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    low = inputs64.to(dtype, memory_dtype)
    got = _decomposed(low)
    assert got.dtype == dtype
    assert_close_to_spec(got, _spec(inputs64), _spec(low), what=f"decomposition {dtype}")


def block_queries(model, image):
    """Each memory's query of one image, (d_k,) per block: the key a trained adapter would have."""
    queries = {}
    hooks = [p.register_forward_pre_hook(lambda mod, args: queries.__setitem__(mod, mod.memory.make_query(args[0])[0]))
             for p in mira.projections(model)]
    try:
        model(image)
    finally:
        for h in hooks:
            h.remove()
    return [queries[p] for p in mira.projections(model)]


def served_model(depth=2, **attach_args):
    """An attached tiny ViT in the inference stage with 3 stored adapters per block, keyed by the
    queries of 3 images. (Untrained U(-1, 1) keys can make the affine separation's sum of cosines
    near zero for some images, amplifying fp32 rounding in every op order; the float64 check of an
    export is only as sharp as the model is well conditioned.)"""
    model = mira.attach(tiny_vit(depth=depth), **attach_args)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i in range(3):
            for p in mira.projections(model):
                p.lora_b.copy_(torch.randn(p.lora_b.shape, generator=g) * 0.2)
            mira.write_adapters(model, block_queries(model, images(1, seed=100 + i)), generator=g)
    return mira.set_stage(model, "inference")


# Exports are judged on this many images: an fp32 run's error is dominated by its worst-conditioned
# image, so over a few images which op order errs more is chance; over dozens it is stable
# (mira.export.check_against_float64). A batch of 1 checks the dynamic batch (the floor covers it).
JUDGE_BATCHES = (1, 32)


def _mira_nodes(program):
    return [n for n in program.graph.nodes if n.op == "call_function" and str(n.target).startswith("mira.")]


@pytest.fixture(scope="module")
def exported():
    """(served model, its torch.export program): exported once for the torch.export and ONNX tests.
    One block: an export's cost (above all ONNX's) grows with the graph, and a second identical
    block tests nothing more (the AOTInductor test and the serving benchmark's slow test export two)."""
    model = served_model(depth=1, capacity=5)
    return model, export_program(model, images(1))  # a batch of 1 is traced as 2, with a dynamic batch


@needs_extension
def test_torch_export_keeps_the_fused_op_and_the_decomposition_removes_it(exported):
    model, program = exported
    assert len(_mira_nodes(program)) == len(mira.projections(model)) == 1
    decomposed = decompose(program)
    assert not _mira_nodes(decomposed)
    with torch.no_grad():
        for batch in JUDGE_BATCHES:
            x = images(batch, seed=batch)
            torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=0)  # the same kernel
            check_against_float64(model, x, {"decomposed": decomposed.module()(x)}).raise_if_failed()
    # The decomposition is for export only: eager calls and torch.compile still use the fused kernel.
    assert torch.ops.mira.mira_linear.default in export_decompositions()
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("mira::mira_linear", "CompositeImplicitAutograd")


def test_onnx_export_runs_in_onnxruntime_and_matches_pytorch(exported, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model, program = exported
    path = tmp_path / "mira_vit.onnx"
    export_onnx(program, images(2), path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    for batch in JUDGE_BATCHES:  # the batch is dynamic
        x = images(batch, seed=batch)
        (got,) = session.run(None, {name: x.numpy()})
        check_against_float64(model, x, {"onnxruntime": got}).raise_if_failed()


@pytest.mark.slow
@needs_extension
def test_aoti_package_of_an_attached_vit_loads_and_matches_eager(tmp_path):
    """AOTInductor compiles through the op's fake kernel; the package calls the fused kernel."""
    model = served_model()
    path = export_aoti(model, images(2), tmp_path / "mira_vit.pt2")
    runner = load_aoti(path)
    for batch in JUDGE_BATCHES:
        x = images(batch, seed=batch)
        check_against_float64(model, x, {"aoti": runner(x)}).raise_if_failed()


@torch.no_grad()
def test_the_float64_check_passes_eager_itself_and_fails_a_wrong_output_without_changing_the_model():
    model = served_model()
    x = images(2)
    out = model(x)
    check = check_against_float64(model, x, {"eager": out, "perturbed": out + 1e-3, "nan": out * float("nan")})
    assert 0 < check.eager_error < 1e-5 and check.errors["eager"] == check.eager_error
    assert check.bound == 2 * check.eager_error + 1e-6 * max(1.0, check.scale)
    assert set(check.failed) == {"perturbed", "nan"}
    with pytest.raises(AssertionError, match="perturbed .* nan"):
        check.raise_if_failed()
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the float64 run was on a copy
    torch.testing.assert_close(model(x), out, rtol=0, atol=0)


@torch.no_grad()
def test_the_float64_check_of_a_float64_model_fails_lost_precision_and_passes_its_exports():
    # A float64 model is its own float64 reference (eager error 0), so the bound was the floor alone,
    # 1e-6 x max(1, |y|) as for float32: it passed a float32 run of the model (error 3.9e-7) and every
    # logit off by 1e-7 relative.
    model = served_model(depth=1, scale=0.7).double()
    decomposed = decompose(export_program(model, images(1).double()))
    for batch in JUDGE_BATCHES:
        x = images(batch, seed=batch).double()
        exact = model(x)
        lost = {"float32 run": copy.deepcopy(model).float()(x.float()), "1e-7 relative": exact * (1 + 1e-7)}
        check = check_against_float64(model, x, {"decomposed": decomposed.module()(x), **lost})
        assert set(check.failed) == set(lost), check
        assert 0 < check.eager_error < 1e-13 and check.bound < 1e-12 * max(1.0, check.scale)


class _Float64Op(torch.nn.Module):
    """The op alone in float64 (onnxruntime has no float64 Conv for a whole ViT on CPU)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        shapes = {"weight": (40, 16), "keys": (3, 8), "bank_a": (3, 2, 3, 16), "bank_b": (3, 2, 10, 3)}
        for name, shape in shapes.items():
            self.register_buffer(name, torch.randn(shape, generator=g, dtype=torch.float64))

    def forward(self, x, query):
        return mira_kernels.mira_linear(x, self.weight, None, query, self.keys, self.bank_a, self.bank_b,
                                        slice_offsets=[25, 3], scale=0.7)


@needs_extension
def test_a_float64_onnx_export_keeps_float64_constants(tmp_path):
    # torch.onnx writes Python float scalars as float32 constants: scale (0.7 -> 0.699999988), eps and the
    # norm floor were rounded, and the float64 graph was 1.8e-7 off (relative) instead of ~1e-14.
    ort = pytest.importorskip("onnxruntime")
    op = _Float64Op()
    g = torch.Generator().manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    export_onnx(op, (randn(2, 5, 16), randn(2, 8)), tmp_path / "op64.onnx")
    session = ort.InferenceSession(str(tmp_path / "op64.onnx"), providers=["CPUExecutionProvider"])
    x, query = randn(6, 5, 16), randn(6, 8)
    (got,) = session.run(None, {"x": x.numpy(), "query": query.numpy()})
    want = reference.mira_linear(x, op.weight, None, query, op.keys, op.bank_a, op.bank_b, slice_offsets=[25, 3],
                                 scale=0.7)
    relative = float(((torch.from_numpy(got) - want).abs() / want.abs().clamp_min(1)).max())
    assert relative < 1e-13, f"float64 ONNX graph off by {relative:.1e} (relative) from the float64 reference"
    with torch.no_grad():
        check_against_float64(op, (x, query), {"onnxruntime": got}).raise_if_failed()


@needs_extension
def test_a_program_exported_under_autocast_runs_with_and_without_it(exported):
    # The op's autocast casts were made in Python and traced into the program: run without autocast, its
    # bfloat16 output failed the next float32 Linear ("mat1 and mat2 must have the same dtype"), where the
    # plain backbone exported the same way runs in float32. Now the op casts at dispatch level, as ATen's.
    model, _ = exported
    with torch.autocast("cpu", dtype=torch.bfloat16):
        program = export_program(model, images(1))
    assert len(_mira_nodes(program)) == 1
    assert not [n for n in program.graph.nodes if n.op == "call_function" and "to" in str(n.target).split(".")]
    x = images(3, seed=5)
    with torch.no_grad():
        got = program.module()(x)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, model(x), rtol=0, atol=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, want = program.module()(x), model(x)
        assert got.dtype == want.dtype == torch.bfloat16
        torch.testing.assert_close(got, want, rtol=0, atol=0)


class _Adapted(torch.nn.Module):
    """A projection plus the in-place mira_adapter_ on its output (returned twice: through a view too)."""

    def __init__(self):
        super().__init__()
        inputs = make_inputs(d_in=16, d_out=40, N=3, offsets=[25, 3], d_s=10, dtype=torch.float32)
        for name in ("weight", "keys", "bank_a", "bank_b"):
            self.register_buffer(name, getattr(inputs, name))

    def forward(self, x, query):
        out = F.linear(x, self.weight)
        head = out[:, :1]
        mira_kernels.mira_adapter_(out, x, query, self.keys, self.bank_a, self.bank_b, slice_offsets=[25, 3],
                                   scale=0.7)
        return out, head * 2


def _adapted_spec(model, x, query, dtype):
    """_Adapted's outputs computed by the reference in ``dtype``."""
    out = F.linear(x.to(dtype), model.weight.to(dtype))
    reference.mira_adapter_(out, x.to(dtype), query.to(dtype), model.keys.to(dtype), model.bank_a.to(dtype),
                            model.bank_b.to(dtype), slice_offsets=[25, 3], scale=0.7)
    return out, out[:, :1] * 2


@needs_extension
def test_decompose_and_onnx_spell_out_the_inplace_adapter(tmp_path):
    # decompose() left mira_adapter_ (held as auto_functionalized) in the program, and export_onnx failed
    # deep inside torch.onnx with a KeyError on it.
    model = _Adapted()
    g = torch.Generator().manual_seed(2)
    example = (torch.randn(2, 5, 16, generator=g), torch.randn(2, 16, generator=g))
    program = export_program(model, example)
    before = [str(n.target) for n in program.graph.nodes]
    decomposed = decompose(program)
    assert not [n for n in decomposed.graph.nodes if n.op == "call_function" and "mira" in f"{n.target}{n.args}"]
    assert [str(n.target) for n in program.graph.nodes] == before  # the program itself is unchanged
    x, query = torch.randn(4, 5, 16, generator=g), torch.randn(4, 16, generator=g)
    spec, own = _adapted_spec(model, x, query, torch.float64), _adapted_spec(model, x, query, torch.float32)
    with torch.no_grad():
        for got, want in zip(program.module()(x, query), model(x, query)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        for name, got, want64, want32 in zip(("out", "head"), decomposed.module()(x, query), spec, own):
            assert_close_to_spec(got, want64, want32, what=f"decomposed {name}")
    ort = pytest.importorskip("onnxruntime")
    export_onnx(program, example, tmp_path / "adapted.onnx")
    session = ort.InferenceSession(str(tmp_path / "adapted.onnx"), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"x": x.numpy(), "query": query.numpy()})
    for name, got, want64, want32 in zip(("out", "head"), outputs, spec, own):
        assert_close_to_spec(torch.from_numpy(got), want64, want32, what=f"onnxruntime {name}")


def test_exports_refuse_a_missing_directory_before_exporting(tmp_path, monkeypatch):
    # torch found it only when writing the file, after the whole export and compile (10 s for the tiny ViT,
    # 40-100 s for a ViT-B/16).
    def export_first(*args, **kwargs):
        raise AssertionError("exported or compiled before checking the path's directory")

    monkeypatch.setattr(mira.export, "export_program", export_first)
    monkeypatch.setattr(mira.export, "decompose", export_first)
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", export_first)
    monkeypatch.setattr(torch.onnx, "export", export_first)
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match=r"export_aoti: .*m\.pt2: no directory .*missing"):
        export_aoti(torch.nn.Linear(2, 2), torch.zeros(1, 2), missing / "m.pt2")
    with pytest.raises(FileNotFoundError, match=r"export_onnx: .*m\.onnx: no directory .*missing"):
        export_onnx(torch.nn.Linear(2, 2), torch.zeros(1, 2), missing / "m.onnx")
    assert not any(tmp_path.iterdir())


def test_load_aoti_refuses_missing_and_foreign_files_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such AOTInductor package"):
        load_aoti(tmp_path / "missing.pt2")
    foreign = tmp_path / "foreign.pt2"
    foreign.write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match="cannot be loaded as an AOTInductor package"):
        load_aoti(foreign)


@torch.no_grad()
def test_the_float64_check_of_an_empty_batch_is_exact_and_a_wrongly_shaped_output_is_refused():
    # Every export path serves an empty batch; the check crashed on it (max() of no element). A wrongly
    # shaped output was broadcast against the float64 one (a (1, 1, 1, C) output of one image passed).
    model = mira.set_stage(mira.attach(tiny_vit(depth=1)), "inference")
    empty = images(0)
    check = check_against_float64(model, empty, {"export": model(empty)})
    assert check.eager_error == 0.0 and check.errors == {"export": 0.0} and check.scale == 0.0 and not check.failed
    one, three = images(1), images(3)
    out_one, out_three = model(one), model(three)
    for x, wrong in ((one, out_one[None, None]), (three, out_three[:1]), (three, out_three.flatten().numpy())):
        with pytest.raises(ValueError, match=r"output 'export' has shape .* the float64 model's is"):
            check_against_float64(model, x, {"export": wrong})


def test_export_program_refuses_an_empty_example_batch_clearly(exported):
    # torch.export failed deep inside on it ("Constraints violated (batch)!"); a program traced from one
    # sample or more serves an empty batch.
    model, program = exported
    with pytest.raises(ValueError, match=r"example_inputs has a batch of 0 samples.*at least 1 sample"):
        export_program(model, images(0))
    with torch.no_grad():
        assert program.module()(images(0)).shape == model(images(0)).shape == (0, model.num_classes)


def test_export_aoti_refuses_a_path_without_pt2_before_compiling(tmp_path, monkeypatch):
    def compile_first(*args, **kwargs):
        raise AssertionError("export_aoti exported or compiled before checking its path")

    monkeypatch.setattr(mira.export, "export_program", compile_first)
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compile_first)
    with pytest.raises(ValueError, match=r"model\.bin.*\.pt2"):
        export_aoti(torch.nn.Linear(2, 2), torch.zeros(1, 2), tmp_path / "model.bin")
    assert not any(tmp_path.iterdir())


@needs_extension
@pytest.mark.parametrize("bank_dtype", [None, torch.bfloat16])
def test_a_program_follows_a_growing_memory_through_every_change(bank_dtype):
    # The program holds the model's tensors. A growing memory used to rebind its bank buffers while
    # keeping its keys' object: after remove + write (the slot count unchanged) the program ran on
    # the new keys with the old banks and answered wrong by about the logits' size (0.58 here).
    model = served_model(depth=1, **({"bank_dtype": bank_dtype} if bank_dtype else {}))
    program = export_program(model, images(2))
    g = torch.Generator().manual_seed(1)
    x = images(3, seed=7)

    def write(task):
        with torch.no_grad():
            for p in mira.projections(model):
                p.lora_b.copy_(torch.randn(p.lora_b.shape, generator=g) * 0.2)
            mira.set_stage(model, "adaptation")
            mira.write_adapters(model, task=task, generator=g)
            mira.set_stage(model, "inference")

    changes = {"grow": lambda: write("a"), "remove + write": lambda: (mira.remove_tasks(model, "a"), write("b")),
               "shrink": lambda: mira.remove_tasks(model, "b")}
    for what, change in changes.items():
        before = program.module()(x)
        change()
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=0, msg=what)
            assert not torch.equal(program.module()(x), before), what  # the change changed the output
