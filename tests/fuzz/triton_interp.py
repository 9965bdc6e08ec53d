"""The property suite on the Triton backend under the Triton interpreter (CPU tensors).

Not collected by the main run: ``TRITON_INTERPRET`` must be set before the kernels are imported,
so ``tests/test_properties.py`` runs this file in a child process with ``TRITON_INTERPRET=1`` and
``HYPOTHESIS_PROFILE=ci-triton`` (``fuzz-triton`` under ``make fuzz``). By hand:
``TRITON_INTERPRET=1 HYPOTHESIS_PROFILE=ci-triton python -m pytest -q tests/fuzz/triton_interp.py``.

The backend is reached through the public API (``mk.use_backend("triton")``: the router lets it
run on CPU tensors under the interpreter), so these checks follow the kernels as they change.
Shapes are tiny: the interpreter runs one program at a time.
"""

from __future__ import annotations

import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run with TRITON_INTERPRET=1 (tests/test_properties.py does)", allow_module_level=True)

import torch  # noqa: E402
from hypothesis import given, note  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import mira_kernels as mk  # noqa: E402
from tests.fuzz import profiles  # noqa: E402
from tests.fuzz.cases import OpCase, faulty_calls, lay_out, op_cases  # noqa: E402
from tests.fuzz.oracle import check_adapter, check_linear, check_raise_alike, linear_call  # noqa: E402

profiles.load("ci-triton")
SMALL = dict(max_b=2, max_t=4, max_d=8, max_n=3, max_dk=6)


def test_triton_huge_query_float32():
    # The fp32-x forward forms its cosines and norms in fp64 (launchers._wide_forward_scores), so a
    # query of norm ~1e20 (||q||^2 ~1e40, past fp32) scores as the reference does.
    from tests.mira_inputs import make_inputs

    inp = make_inputs(B=2, T=3, d_in=8, d_out=24, N=3, dtype=torch.float32)
    inp.query = inp.query * 1e20
    with mk.use_backend("triton"):
        got = mk.mira_linear(*inp.linear_args(), slice_offsets=inp.slice_offsets)
    want = mk.reference.mira_linear(*inp.to(torch.float64).linear_args(), slice_offsets=inp.slice_offsets)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_triton_huge_query_float16_x():
    # The 16-bit-x forward squares the norms in fp32: ||q||^2 ~1e40 overflowed, and every cosine of the
    # sample came out 0 / inf. Rows whose squares overflow are now rescored scaled (kernels._cosines).
    from tests.mira_inputs import assert_close_to_spec, make_inputs

    inp = make_inputs(B=2, T=3, d_in=8, d_out=24, N=3, dtype=torch.float64).to(torch.float16,
                                                                                memory_dtype=torch.float32)
    inp.query = inp.query * 1e20
    with mk.use_backend("triton"):
        got = mk.mira_linear(*inp.linear_args(), slice_offsets=inp.slice_offsets)
    want = mk.reference.mira_linear(*inp.to(torch.float64).linear_args(), slice_offsets=inp.slice_offsets)
    same = mk.reference.mira_linear(*inp.linear_args(), slice_offsets=inp.slice_offsets)
    assert_close_to_spec(got, want, same, factor=2.0, what="huge query, float16 x")


# (x dtype, memory dtype, a power of two whose square overflows that memory dtype's squares)
OVERFLOWING = [pytest.param(torch.bfloat16, torch.float32, 2.0**66, id="bf16"),
               pytest.param(torch.float16, torch.float32, 2.0**66, id="fp16"),
               pytest.param(torch.float64, torch.float64, 2.0**520, id="fp64")]


@pytest.mark.parametrize(("dtype", "memory_dtype", "big"), OVERFLOWING)
@pytest.mark.parametrize("which", ["query", "keys", "both"])
def test_triton_overflowing_norms_score_as_the_unscaled_rows(dtype, memory_dtype, big, which):
    # Cosines do not change when a row is scaled by a power of two; the rescored rows are such a
    # scaling, so the output must equal the unscaled call's bit for bit. Valid for bf16 too, which
    # the interpreter cannot judge against the reference (its bf16 tl.dot is wrong).
    from tests.mira_inputs import make_inputs

    inp = make_inputs(B=3, T=2, d_in=8, d_out=24, N=5, dtype=torch.float64).to(dtype, memory_dtype=memory_dtype)
    with mk.use_backend("triton"):
        plain = mk.mira_linear(*inp.linear_args(), slice_offsets=inp.slice_offsets)
        if which in ("query", "both"):
            inp.query = inp.query.clone()
            inp.query[1] *= big  # one sample: the program's other rows stay unscaled
        if which in ("keys", "both"):
            inp.keys = inp.keys.clone()
            inp.keys[2] *= big
        scaled = mk.mira_linear(*inp.linear_args(), slice_offsets=inp.slice_offsets)
    assert torch.isfinite(scaled).all()
    assert torch.equal(scaled, plain)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_inf_query_entry_gives_nan_cosines_as_the_reference(dtype):
    # An inf entry keeps its row's squares inf after the rescoring: the sample's adapter is NaN (the
    # reference's u / |u| = inf / inf), the other samples are untouched.
    from tests.mira_inputs import make_inputs

    inp = make_inputs(B=2, T=2, d_in=8, d_out=24, N=3, dtype=torch.float64).to(dtype, memory_dtype=torch.float32)
    inp.query = inp.query.clone()
    inp.query[0, 3] = float("inf")
    with mk.use_backend("triton"):
        got = mk.mira_linear(*inp.linear_args(), slice_offsets=inp.slice_offsets)
    want = mk.reference.mira_linear(*inp.linear_args(), slice_offsets=inp.slice_offsets)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and bool(torch.isnan(got[0]).any())
    assert torch.isfinite(got[1]).all()


@given(case=op_cases(**SMALL))
def test_triton_linear_matches_the_float64_reference(case):
    note(repr(case))
    check_linear(case, "triton")


def test_triton_cancelling_dkeys_is_judged_against_the_terms_it_sums():
    # Found by make fuzz (near_zero regime, affine, float32, as drawn): d_k = 1, so every k^ - cos q^ is exactly
    # 0 and dkeys cancels to 0, while its terms are |dL/ds| / |k| ~ 1e3 (one key has norm 0.04); Triton's 4.2e-6
    # is rounding of those terms (tests/fuzz/oracle.py, score_grad_terms), not a defect of the separation.
    from tests.fuzz.cases import OpCase
    from tests.fuzz.oracle import score_grad_terms

    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    case = OpCase(
        x=f32([[[1.5409960746765137]]]),
        weight=f32([[-1.0608166456222534], [0.999509334564209], [-0.019964750856161118], [0.21029989421367645],
                    [0.17718935012817383], [-0.8305100798606873], [0.23871806263923645], [0.7335283756256104],
                    [-1.3218817710876465], [1.3148113489151], [-0.6870036721229553], [1.4880743026733398],
                    [-0.4484158158302307], [-0.8910030126571655], [0.6748575568199158], [1.0468653440475464],
                    [0.1542951762676239], [-0.7498915195465088]]),
        bias=None, query=f32([[-0.293428897857666]]),
        keys=f32([[-0.9180999994277954], [-0.04042108729481697], [0.9990000128746033]]),
        bank_a=f32([[[[-0.007537308149039745]], [[-0.9144954681396484]], [[-1.0885837078094482]]],
                    [[[-0.26659631729125977]], [[0.18942345678806305]], [[-0.21902281045913696]]],
                    [[[2.057591199874878]], [[-0.03542188182473183]], [[0.06271883100271225]]]]),
        bank_b=f32([[[-0.5872225761413574, 2.832104206085205, 0.9039973616600037, 0.9478365182876587,
                      -1.041882872581482, 0.9736130237579346],
                     [-0.07441944628953934, 0.8653897047042847, -0.27503490447998047, 0.8865896463394165,
                      1.4857416152954102, -0.007855617441236973],
                     [-0.763663649559021, 1.3249433040618896, 0.05837476998567581, -1.0016690492630005,
                      0.1825319528579712, 0.9509038329124451]],
                    [[-1.7631617784500122, 1.0107316970825195, 0.13100431859493256, -1.3573113679885864,
                      -0.10838763415813446, 0.31513023376464844],
                     [0.44986534118652344, 1.553145408630371, 0.053985949605703354, 1.4744415283203125,
                      1.0134077072143555, 0.8542078733444214],
                     [0.10964498668909073, 0.7026474475860596, 0.8915171027183533, 1.1731555461883545,
                      -0.39490339159965515, 0.4464225769042969]],
                    [[0.5401135683059692, 0.2823370695114136, -0.6454674005508423, 2.57238507270813,
                      -2.024502754211426, -0.6830090880393982],
                     [0.43130216002464294, -0.36562931537628174, -0.5312331914901733, -0.13408449292182922,
                      -0.9885056018829346, 0.7255481481552124],
                     [0.008199118077754974, 0.23696723580360413, -1.5195263624191284, 1.0216186046600342,
                      1.1149190664291382, -0.5559898018836975]]]).unsqueeze(-1),
        slice_offsets=[0, 6, 12], separation="affine", scale=0.4645848452059669, eps=0.01,
        grad_out=f32([[[-0.11720721423625946, 1.5531091690063477, 0.05298834666609764, -1.0985568761825562,
                        1.3130292892456055, 1.2950303554534912, 0.09346980601549149, -0.6487992405891418,
                        -0.6790958642959595, -0.0837794691324234, -0.519446611404419, -1.305429458618164,
                        0.6191589832305908, -0.6891031861305237, -0.4117908775806427, -1.112868309020996,
                        -0.392024964094162, -0.45229673385620117]]]),
        notes={"regime": "near_zero"})
    assert score_grad_terms(case)[1] > 1e2
    check_linear(case, "triton")


@pytest.mark.parametrize("separation", ["affine", "softmax", "relu"])
def test_triton_nan_query_stays_in_its_sample(separation):
    # Found by make fuzz (affine, float32, B = 2, T = 1): query row 0 NaN made sample 1's output NaN too. The
    # expand of a tile that spans samples loaded other samples' h as 0 and summed 0 x sample 0's NaN factor
    # into their rows; relu also dropped the NaN (tl.maximum ignores NaN unless told to propagate it).
    from tests.fuzz.cases import OpCase

    nan = float("nan")
    case = OpCase(x=torch.tensor([[[1.5410]], [[-0.2934]]]), weight=torch.tensor([[-2.1788]]), bias=None,
                  query=torch.tensor([[nan], [-1.0845]]), keys=torch.tensor([[-1.3986]]),
                  bank_a=torch.tensor([[[[0.4033]]]]), bank_b=torch.tensor([[[[0.8380]]]]), slice_offsets=[0],
                  separation=separation, scale=1.0, eps=0.01, grad_out=torch.tensor([[[-0.7193]], [[-0.4033]]]),
                  notes={"regime": "random", "seed": 0, "non_finite": "query[0] = nan"})
    check_linear(case, "triton")
    check_adapter(case, "triton", torch.tensor([[[0.6614]], [[0.2669]]]))


def test_triton_nan_key_stays_in_the_slices():
    # Found by make fuzz (affine, float32, a NaN key, slices [0, 1] of width 1 in d_out = 4): columns 2 and 3,
    # outside every slice, came out NaN: the expand multiplied the NaN h by the zeros loaded for those columns.
    from tests.fuzz.cases import OpCase

    case = OpCase(x=torch.tensor([[[1.5410, -0.2934]]]), weight=torch.tensor([[0.1, 0.2]] * 4), bias=None,
                  query=torch.tensor([[-1.0882]]), keys=torch.tensor([[float("nan")]]),
                  bank_a=torch.tensor([[[[-0.3100, -0.2566]], [[-0.1877, 0.4951]]]]),
                  bank_b=torch.tensor([[[[0.6281]], [[-0.1132]]]]), slice_offsets=[0, 1], separation="affine",
                  scale=2.7, eps=0.01, grad_out=torch.tensor([[[0.6032, -1.5447, -0.1095, 1.0134]]]),
                  notes={"regime": "random", "seed": 0, "non_finite": "keys[0] = nan"})
    check_linear(case, "triton")


def _fp16_overflow_case(x_value: float, bank_a_value: float) -> OpCase:
    # fp16 x, fp32 memory, softmax weights (summing to 1): A_b = bank_a_value and h = d_in x_value A_b,
    # while y = x W^T + h B_b stays far inside fp16's range (B_b = 1e-3).
    g = torch.Generator().manual_seed(0)
    B, T, d, N, dk = 1, 3, 8, 2, 4
    return OpCase(
        x=torch.full((B, T, d), x_value).half(), weight=(torch.randn(d, d, generator=g) * 0.1).half(), bias=None,
        query=torch.randn(B, dk, generator=g), keys=torch.randn(N, dk, generator=g),
        bank_a=torch.full((N, 1, 1, d), bank_a_value), bank_b=torch.full((N, 1, d, 1), 1e-3), slice_offsets=[0],
        separation="softmax", scale=1.0, eps=0.01, grad_out=torch.randn(B, T, d, generator=g).half(),
        notes={"regime": "fp16 overflow of an intermediate"})


@pytest.mark.parametrize("what, x_value, bank_a_value",
                         [("mixed factor 1e5", 0.01, 1e5), ("shrink 7.2e4", 300.0, 30.0)])
def test_triton_fp16_intermediates_do_not_overflow(what, x_value, bank_a_value):
    # Found by the property suite (an fp16 adapter created inf): fp16 factors or h overflowed at 65504
    # where the fp32 reference (contract section 4) stays finite. The fp16 rule keeps them in fp32.
    case = _fp16_overflow_case(x_value, bank_a_value)
    check_linear(case, "triton")
    check_adapter(case, "triton", torch.zeros(1, 3, 8, dtype=torch.float16))


def test_triton_fp16_x_with_fp32_banks_gives_fp32_accurate_bank_gradients():
    # Found by the property suite: x fp16, bank_b fp32, affine weights at the guard (w = -100, 100), so
    # A_b = 90.1; stored in fp16 it lost 2.8e-4 relative, and dbank_b (|2800|) erred by 0.79 where an
    # fp32 gradient is owed ~1e-4. The backward keeps fp32 factors unless every memory tensor is bf16.
    h = torch.float16
    case = OpCase(
        x=torch.tensor([[[0.7705]]], dtype=h), weight=torch.tensor([[-0.1467]], dtype=h), bias=None,
        query=torch.tensor([[-2.1797]], dtype=h), keys=torch.tensor([[0.5684], [-1.0850]], dtype=h),
        bank_a=torch.tensor([-0.6992, 0.2017], dtype=h).view(2, 1, 1, 1),
        bank_b=torch.tensor([0.4190, -0.3596]).view(2, 1, 1, 1), slice_offsets=[0], separation="affine",
        scale=1.0, eps=0.01, grad_out=torch.tensor([[[-0.4033]]], dtype=h), notes={"regime": "random"})
    check_linear(case, "triton")


@pytest.mark.parametrize("dtype, T", [(torch.float32, 1), (torch.float32, 5), (torch.bfloat16, 33)])
def test_triton_non_finite_query_stays_on_its_own_sample(dtype, T):
    # Found by the property suite (float32, B = 2, T = 1, query[0] = NaN): the GEMM added the samples'
    # expands of a row block in one dot, where a row's zeros in sample 0's columns times sample 0's NaN
    # factor made sample 1 NaN too. bf16 at T = 33 takes the folded shrink (several samples in a block).
    g = torch.Generator().manual_seed(3)
    B, d, N = 3, 8, 3
    q = torch.randn(B, d, generator=g)
    q[0, 1] = float("nan")
    q[2, 0] = float("inf")
    case = OpCase(
        x=torch.randn(B, T, d, generator=g).to(dtype), weight=(torch.randn(2 * d, d, generator=g) / 3).to(dtype),
        bias=None, query=q, keys=torch.randn(N, d, generator=g),
        bank_a=torch.randn(N, 2, 2, d, generator=g), bank_b=torch.randn(N, 2, d, 2, generator=g),
        slice_offsets=[0, d], separation="softmax", scale=0.5, eps=0.01,
        grad_out=torch.randn(B, T, 2 * d, generator=g).to(dtype), notes={"regime": "random", "seed": 3})
    with mk.use_backend("triton"):
        y = mk.mira_linear(*case.linear_args(), **case.kwargs())
    assert bool(torch.isnan(y[0]).all()) and bool(torch.isnan(y[2]).all()) and bool(torch.isfinite(y[1]).all())
    check_linear(case, "triton", grads=dtype != torch.bfloat16)
    check_adapter(case, "triton", torch.zeros(B, T, 2 * d, dtype=dtype))


@pytest.mark.parametrize("dtype, T", [(torch.float32, 1), (torch.bfloat16, 33)])
def test_triton_non_finite_x_leaves_the_columns_outside_the_slices(dtype, T):
    # Found by the property suite (float32 mira_adapter_, x = NaN, d_out = 2, one slice of width 1):
    # the expand's NaN h times the zero factor of column 1 (outside the slice, in the same tile) made
    # out[..., 1] NaN, which the reference never touches. Here the K columns of a qkv-like layout
    # (slices Q and V) share a tile with Q and V; bf16 at T = 33 takes the folded shrink.
    g = torch.Generator().manual_seed(5)
    B, d, N = 3, 8, 3
    x = torch.randn(B, T, d, generator=g)
    x[1, 0, 2] = float("nan")
    x[2, T - 1, 0] = float("inf")
    case = OpCase(
        x=x.to(dtype), weight=(torch.randn(3 * d, d, generator=g) / 3).to(dtype), bias=None,
        query=torch.randn(B, d, generator=g), keys=torch.randn(N, d, generator=g),
        bank_a=torch.randn(N, 2, 2, d, generator=g), bank_b=torch.randn(N, 2, d, 2, generator=g),
        slice_offsets=[0, 2 * d], separation="softmax", scale=0.5, eps=0.01,
        grad_out=torch.randn(B, T, 3 * d, generator=g).to(dtype), notes={"regime": "random", "seed": 5})
    out = torch.zeros(B, T, 3 * d, dtype=dtype)
    with torch.no_grad(), mk.use_backend("triton"):
        mk.mira_adapter_(out, *case.adapter_args(), **case.kwargs())
    assert torch.equal(out[..., d:2 * d], torch.zeros_like(out[..., d:2 * d]))
    assert bool(torch.isnan(out[1, 0, :d]).all()) and bool(torch.isfinite(out[0]).all())
    check_adapter(case, "triton", torch.zeros(B, T, 3 * d, dtype=dtype))
    check_linear(case, "triton", grads=dtype != torch.bfloat16)


@pytest.mark.parametrize("dtype, T", [(torch.float32, 1), (torch.bfloat16, 33)])
def test_triton_non_finite_factor_of_one_slice_leaves_the_other_slice(dtype, T):
    # Found by the property suite (float32 mira_adapter_, S = 2 slices of width 1, bank_a[0] slice 0 = NaN):
    # slice 0's NaN h times slice 0's zero factor in slice 1's column made column 1 NaN; the reference's
    # slice 1 only sees slice 1's (finite) shrink.
    g = torch.Generator().manual_seed(7)
    B, d, N = 3, 8, 2
    bank_a = torch.randn(N, 2, 2, d, generator=g)
    bank_a[0, 0, 1, 3] = float("nan")
    case = OpCase(
        x=torch.randn(B, T, d, generator=g).to(dtype), weight=(torch.randn(3 * d, d, generator=g) / 3).to(dtype),
        bias=None, query=torch.randn(B, d, generator=g), keys=torch.randn(N, d, generator=g), bank_a=bank_a,
        bank_b=torch.randn(N, 2, d, 2, generator=g), slice_offsets=[0, 2 * d], separation="softmax", scale=0.5,
        eps=0.01, grad_out=torch.randn(B, T, 3 * d, generator=g).to(dtype), notes={"regime": "random", "seed": 7})
    out = torch.zeros(B, T, 3 * d, dtype=dtype)
    with torch.no_grad(), mk.use_backend("triton"):
        mk.mira_adapter_(out, *case.adapter_args(), **case.kwargs())
    assert bool(torch.isnan(out[..., :d]).all()) and bool(torch.isfinite(out[..., d:]).all())
    check_adapter(case, "triton", torch.zeros(B, T, 3 * d, dtype=dtype))
    check_linear(case, "triton", grads=False)


@given(case=op_cases(**SMALL), alias=st.booleans(),
       layout=st.sampled_from(["contiguous", "transposed", "offset"]))
def test_triton_adapter_matches_the_float64_reference(case, alias, layout):
    note(repr(case))
    if alias and case.x.shape[2] == case.weight.shape[0]:
        case.x = case.x.clone()
        out = case.x
    else:
        g = torch.Generator().manual_seed(case.notes["seed"] + 1)
        out = lay_out(torch.randn(case.x.shape[0], case.x.shape[1], case.weight.shape[0], generator=g,
                                  dtype=torch.float64).to(case.x.dtype), layout)
    check_adapter(case, "triton", out)


@given(drawn=faulty_calls(**SMALL))
def test_triton_raises_like_the_reference(drawn):
    case, _ = drawn
    note(repr(case))
    check_raise_alike(case, ["reference", "triton"], linear_call)


def test_triton_rejects_overlapping_out_and_takes_out_is_x():
    # The overlapping-memory rule (contract section 6) on the Triton dispatch path: the public op's
    # kernel runs the shared check before it hands the call to the Triton backend.
    from tests.test_hostile_ops import OVERLAP_CASES, _adapter_inputs

    for what, out, x, bank_a in OVERLAP_CASES:
        inp = _adapter_inputs()
        inp.x = x
        if bank_a is not None:
            inp.bank_a = bank_a
        before = out.clone()
        with mk.use_backend("triton"), pytest.raises(ValueError, match="overlap"):
            mk.mira_adapter_(out, *inp.adapter_args(), slice_offsets=inp.slice_offsets)
        with pytest.raises(ValueError, match="overlap"):
            torch.ops.mira.mira_adapter_(out, *inp.adapter_args(), inp.slice_offsets, "affine", 1.0, 0.01, "triton")
        assert torch.equal(out, before), what
    inp = _adapter_inputs()
    want = inp.x.clone()
    mk.reference.mira_adapter_(want, inp.x.clone(), *inp.adapter_args()[1:], slice_offsets=inp.slice_offsets)
    x = inp.x.clone()
    with mk.use_backend("triton"):
        mk.mira_adapter_(x, x, *inp.adapter_args()[1:], slice_offsets=inp.slice_offsets)
    torch.testing.assert_close(x, want, rtol=1e-5, atol=1e-5)
