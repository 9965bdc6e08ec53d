"""Export paths: the op's decomposition into standard ops, torch.export, ONNX (onnxruntime), AOTInductor."""

from __future__ import annotations

import pytest
import torch

import mira
import mira_kernels
from mira.export import check_against_float64, decompose, export_aoti, export_onnx, export_program, load_aoti
from mira_kernels import reference
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
