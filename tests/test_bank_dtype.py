"""16-bit bank storage (contract section 4): bank_a / bank_b in bfloat16 or float16 with float32 compute.

Two bounds, each tested against a reference that rounds the operands the same way:

* a stored 16-bit bank is exact data: every backend widens it exactly and mixes in float32, so the
  op's error against the float64 reference *of the stored values* is the float32 op's (2x plain
  PyTorch's own float32 error), and the CPU kernel gives the bits of the same call with a float32
  copy of the banks, on every instruction-set variant;
* rounding float32 adapters into 16-bit storage is the user's choice, with its own bound: each
  entry moves by at most u |a| (u = 2^-8 bfloat16, 2^-11 float16 in its normal range), so the
  adapter's contribution moves by at most (2u + u^2) |scale| (|x| |A|_w^T) |B|_w^T.
"""

from __future__ import annotations

import pytest
import torch

import mira_kernels as mk
from mira_kernels import reference
from tests.mira_inputs import assert_close_to_spec, make_inputs

HAS_CPU = "cpu" in mk.available_backends("cpu")
ISAS = list(torch.ops.mira._cpu_isa_info())[1:] if HAS_CPU else []
BANK_DTYPES = (torch.bfloat16, torch.float16)
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
GRADS = ("dx", "dquery", "dkeys", "dbank_a", "dbank_b")
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="mira_kernels._C was built without the CPU kernel")


def stored(inp64, bank_dtype, x_dtype=torch.float32):
    """(inputs with 16-bit banks at x_dtype, the float64 spec inputs holding the stored bank values)."""
    exact = inp64.to(torch.float64)
    exact.bank_a, exact.bank_b = (b.to(bank_dtype).double() for b in (inp64.bank_a, inp64.bank_b))
    low = exact.to(x_dtype, torch.float32)
    low.bank_a, low.bank_b = low.bank_a.to(bank_dtype), low.bank_b.to(bank_dtype)
    return low, exact


def widened(inp):
    """The same inputs with a float32 copy of the banks."""
    out = inp.to(inp.x.dtype, torch.float32)
    out.query, out.keys = inp.query, inp.keys
    return out


def same(a, b):
    """Bit for bit, NaN where NaN (a NaN's payload may differ between widening instructions)."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def forward(inp, **kw):
    return mk.mira_linear(*inp.linear_args(), slice_offsets=inp.slice_offsets, **kw)


def backward(fn, grad, inp, **kw):
    return fn(grad, inp.x, inp.weight, inp.query, inp.keys, inp.bank_a, inp.bank_b,
              slice_offsets=inp.slice_offsets, **kw)


def spec(inp, **kw):
    return reference.mira_linear(*inp.linear_args(), slice_offsets=inp.slice_offsets, **kw)


@pytest.fixture(params=ISAS or ["none"])
def isa(request, monkeypatch):
    if not HAS_CPU:
        pytest.skip("no CPU kernel")
    monkeypatch.setenv("MIRA_CPU_ISA", request.param)
    return request.param


@needs_cpu
@pytest.mark.parametrize("bank_dtype", BANK_DTYPES)
@pytest.mark.parametrize("separation", ["affine", "softmax"])
def test_cpu_kernel_reads_16bit_banks_exactly(isa, bank_dtype, separation):
    # Odd widths: the vector loads and the scalar tails of the widening both run.
    inp64 = make_inputs(B=3, T=19, d_in=37, d_out=99, N=7, S=2, r=3, d_s=29, offsets=[61, 0], seed=2)
    low, exact = stored(inp64, bank_dtype)
    y = forward(low, separation=separation, scale=0.7)
    assert y.dtype == torch.float32
    assert torch.equal(y, forward(widened(low), separation=separation, scale=0.7))
    own = spec(widened(low), separation=separation, scale=0.7)
    assert_close_to_spec(y, spec(exact, separation=separation, scale=0.7), own, factor=2.0, floor=2e-6,
                         what=f"y, {bank_dtype} banks, {isa}")
    out = torch.randn(*y.shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = mk.mira_adapter_(out.clone(), low.x, low.query, low.keys, low.bank_a, low.bank_b,
                               slice_offsets=low.slice_offsets, separation=separation, scale=0.7)
        want = mk.mira_adapter_(out.clone(), low.x, low.query, low.keys, low.bank_a.float(), low.bank_b.float(),
                                slice_offsets=low.slice_offsets, separation=separation, scale=0.7)
    assert torch.equal(got, want)


@needs_cpu
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bank_dtype", BANK_DTYPES)
def test_16bit_x_with_16bit_banks(x_dtype, bank_dtype):
    # 16-bit x with 16-bit banks (its own dtype or the other one): float32 mixing of the widened banks.
    low, _ = stored(make_inputs(B=2, T=9, d_in=24, d_out=72, N=5, S=2, r=2, seed=3), bank_dtype, x_dtype)
    y = forward(low)
    assert y.dtype == x_dtype
    assert torch.equal(y, forward(widened(low)))


@needs_cpu
@pytest.mark.parametrize("bank_dtype", BANK_DTYPES)
def test_gradients_have_the_banks_dtype_and_fp32_accuracy(bank_dtype):
    # dbank: float32 sums rounded once to the bank's dtype (section 4: a gradient has its input's
    # dtype); the other gradients are the float32 call's. Judged against the float64 spec of the
    # stored values, 3x plain PyTorch's error at the same dtypes (whose dbank is rounded alike).
    low, exact = stored(make_inputs(B=2, T=11, d_in=20, d_out=60, N=4, S=2, r=3, seed=4), bank_dtype)
    grad64 = torch.randn(2, 11, 60, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = torch.ops.mira._cpu_mira_linear_backward(
        grad64.float(), low.x, low.weight, low.query, low.keys, low.bank_a, low.bank_b, low.slice_offsets, "affine",
        1.0, mk.DEFAULT_EPS, [True] * 5)
    want = backward(reference.mira_linear_backward, grad64, exact)
    own = backward(reference.mira_linear_backward, grad64.float(), low)
    via_fp32 = torch.ops.mira._cpu_mira_linear_backward(
        grad64.float(), low.x, low.weight, low.query, low.keys, low.bank_a.float(), low.bank_b.float(),
        low.slice_offsets, "affine", 1.0, mk.DEFAULT_EPS, [True] * 5)
    for name, g, w, o, f32 in zip(GRADS, got, want, own, via_fp32):
        expected = bank_dtype if name.startswith("dbank") else torch.float32
        assert g.dtype == expected, name
        assert torch.equal(g, f32.to(expected)), name  # the float32 call's gradient, rounded once
        floor = 2 * UNIT_ROUNDOFF[bank_dtype] if name.startswith("dbank") else 2e-6
        assert_close_to_spec(g, w, o, factor=3.0, floor=floor, what=f"{name}, {bank_dtype} banks")


@pytest.mark.parametrize("bank_dtype", BANK_DTYPES)
def test_autograd_through_the_public_op(bank_dtype):
    # The public op's autograd (CPU kernel, or the reference where it is not built) against autograd
    # of the reference: same dtypes, same values to fp32 rounding.
    low, _ = stored(make_inputs(B=2, T=5, d_in=12, d_out=36, N=3, S=2, r=2, seed=5), bank_dtype)
    low.requires_grad_("x", "query", "keys", "bank_a", "bank_b")
    leaves = (low.x, low.query, low.keys, low.bank_a, low.bank_b)
    got = torch.autograd.grad(forward(low).square().sum(), leaves)
    want = torch.autograd.grad(spec(low).square().sum(), leaves)
    for name, g, w in zip(GRADS, got, want):
        assert g.dtype == w.dtype, name
        torch.testing.assert_close(g.float(), w.float(), rtol=4 * UNIT_ROUNDOFF[bank_dtype], atol=1e-4, msg=name)


@pytest.mark.parametrize("bank_dtype", BANK_DTYPES)
def test_storage_rounding_bound(bank_dtype):
    # What storing float32 adapters in 16 bits costs (the user's choice, a bound stated for users):
    # per entry |a16 - a| <= u |a| + eta (eta: half the format's smallest subnormal, 2^-25 for
    # float16, which flushes |a| < 2^-14 to its coarse subnormals; 2^-134 for bfloat16), so with
    # dA = u |A|_w + eta sum_n |w_n| (B likewise) the adapter's contribution moves by at most
    # |scale| ((|x| (|A|_w + dA)^T) (|B|_w + dB)^T - (|x| |A|_w^T) |B|_w^T), about (2u + u^2) of its
    # absolute size. Checked in float64 (only the storage rounding is measured), from float32
    # adapters (what a model holds). The bound must hold; on random data it is reached to ~5% (the
    # entries' rounding errors partly cancel in the sums), so it is asserted not loose by 50x.
    u, eta = UNIT_ROUNDOFF[bank_dtype], {torch.bfloat16: 2.0**-134, torch.float16: 2.0**-25}[bank_dtype]
    inp = make_inputs(B=3, T=8, d_in=32, d_out=96, N=6, S=2, r=4, seed=6)
    inp.bank_a, inp.bank_b = (b.float().double() for b in (inp.bank_a, inp.bank_b))
    for bank in (inp.bank_a, inp.bank_b):
        assert ((bank.to(bank_dtype).double() - bank).abs() <= u * bank.abs() + eta).all()
    _, exact = stored(inp, bank_dtype)
    scale = 0.7
    moved = (spec(exact, scale=scale) - spec(inp, scale=scale)).abs()
    w = reference.retrieval_weights(inp.query, inp.keys).abs()  # (B, N)
    abs_a = torch.einsum("bn,nsrd->bsrd", w, inp.bank_a.abs())
    abs_b = torch.einsum("bn,nser->bser", w, inp.bank_b.abs())
    slack = eta * w.sum(1).view(-1, 1, 1, 1)
    da, db = u * abs_a + slack, u * abs_b + slack

    def contribution(a, b):
        return scale * torch.einsum("btsr,bser->btse", torch.einsum("btd,bsrd->btsr", inp.x.abs(), a), b)

    per_slice = contribution(abs_a + da, abs_b + db) - contribution(abs_a, abs_b)
    bound = torch.zeros_like(moved)
    for s, off in enumerate(inp.slice_offsets):
        bound[..., off:off + per_slice.shape[-1]] = per_slice[:, :, s]
    assert (moved <= bound * (1 + 1e-9)).all()
    assert (moved / bound.clamp_min(1e-300)).max() > 0.02


@needs_cpu
@pytest.mark.parametrize("bank_dtype", BANK_DTYPES)
def test_non_finite_and_extreme_bank_values(isa, bank_dtype):
    # NaN / inf stored in a bank propagate where the float32 call puts them; float16 subnormals and
    # the extremes of each format are widened exactly (bitwise the float32 copy's result).
    low, _ = stored(make_inputs(B=2, T=6, d_in=21, d_out=63, N=4, S=3, r=2, seed=7), bank_dtype)
    info = torch.finfo(bank_dtype)
    flat = low.bank_a.view(-1)
    flat[:6] = torch.tensor([info.max, -info.max, info.tiny, info.smallest_normal / 8, -info.smallest_normal / 4, 0.0],
                            dtype=bank_dtype)
    same(forward(low), forward(widened(low)))
    low.bank_b.view(-1)[3] = float("nan")
    low.bank_a.view(-1)[40] = float("inf")
    y, want = forward(low), forward(widened(low))
    assert torch.equal(y.isnan(), want.isnan()) and torch.equal(y.isinf(), want.isinf())
    fin = torch.isfinite(want)
    assert torch.equal(y[fin], want[fin]) and (~fin).any()


@needs_cpu
def test_strided_expanded_and_offset_banks():
    # Any strides: the kernel reads a contiguous copy of a strided 16-bit bank (in its dtype).
    low, _ = stored(make_inputs(B=2, T=7, d_in=16, d_out=48, N=3, S=2, r=2, seed=8), torch.bfloat16)
    want = forward(low)
    big_a = torch.zeros(low.bank_a.shape[0] + 1, *low.bank_a.shape[1:-1], 2 * low.bank_a.shape[-1],
                        dtype=torch.bfloat16)
    big_a[1:, ..., ::2] = low.bank_a
    strided = widened(low)
    strided.bank_a, strided.bank_b = big_a[1:, ..., ::2], low.bank_b.transpose(2, 3).contiguous().transpose(2, 3)
    assert not strided.bank_a.is_contiguous() and not strided.bank_b.is_contiguous()
    assert torch.equal(forward(strided), want)
    one = widened(low)
    one.bank_a = low.bank_a[:1].expand_as(low.bank_a)
    one.bank_b = low.bank_b
    exp_copy = widened(low)
    exp_copy.bank_a, exp_copy.bank_b = low.bank_a[:1].expand_as(low.bank_a).contiguous(), low.bank_b
    assert torch.equal(forward(one), forward(exp_copy))


@needs_cpu
def test_eval_fast_path_compile_and_opcheck_with_bf16_banks():
    from mira_kernels.ops import eval_linear_cpu

    low, _ = stored(make_inputs(B=2, T=5, d_in=12, d_out=36, N=3, S=2, r=2, seed=9), torch.bfloat16)
    args = (*low.linear_args(), list(low.slice_offsets), "affine", 1.0, mk.DEFAULT_EPS)
    with torch.no_grad():
        want = forward(low)
        assert torch.equal(eval_linear_cpu(*args), want)
        compiled = torch.compile(lambda *a: mk.mira_linear(*a, slice_offsets=low.slice_offsets), fullgraph=True,
                                 backend="eager")
        assert torch.equal(compiled(*low.linear_args()), want)
    torch.library.opcheck(torch.ops.mira.mira_linear.default, args)


# ----------------------------------------------------------------------------------------------
# The memory option: mira.attach(..., bank_dtype=torch.bfloat16).
# ----------------------------------------------------------------------------------------------


def filled(bank_dtype=None, **attach):
    """A tiny attached ViT whose memories hold 3 adapters with entries of a few magnitudes."""
    import mira
    from tests.tiny_models import tiny_vit

    model = mira.attach(tiny_vit(), bank_dtype=bank_dtype, **attach)
    g = torch.Generator().manual_seed(3)
    for m in mira.memories(model):
        c = m.config
        m.append(torch.randn(3, c.num_slices, c.rank, c.d_in, generator=g) / 8,
                 torch.randn(3, c.num_slices, c.slice_width, c.rank, generator=g) * 0.3, generator=g)
    return mira.set_stage(model, "inference")


@pytest.mark.parametrize("bank_dtype", BANK_DTYPES)
def test_attach_stores_banks_in_bank_dtype_and_computes_the_rounded_model(bank_dtype):
    # The only difference from float32 banks is the storage rounding: a float32-bank model holding
    # the rounded values gives the same output, bit for bit.
    import mira
    from tests.tiny_models import images

    low, full = filled(bank_dtype), filled()
    for m_low, m_full in zip(mira.memories(low), mira.memories(full)):
        assert m_low.bank_a.dtype == m_low.bank_b.dtype == bank_dtype and m_low.keys.dtype == torch.float32
        assert m_low.config.bank_dtype == str(bank_dtype).removeprefix("torch.")
        with torch.no_grad():
            m_full.bank_a.copy_(m_low.bank_a)
            m_full.bank_b.copy_(m_low.bank_b)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(low(x), full(x), rtol=0, atol=0)
    summary = mira.count_parameters(low)
    assert summary["added_bytes"] < mira.count_parameters(full)["added_bytes"]


def test_the_bank_rounding_study_computes_what_bfloat16_storage_computes():
    # mira.experiments.bank_rounding rounds a float32-bank model's banks in place: its outputs are
    # then those of the same model attached with bank_dtype=bfloat16, bit for bit, and a second
    # rounding changes nothing; its comparison counts the predictions that change.
    from types import SimpleNamespace

    import mira
    from mira.experiments import bank_rounding
    from mira.experiments.backbone import normalize
    from tests.tiny_models import images

    low, full = filled(torch.bfloat16), filled()
    assert bank_rounding.round_banks_(full) > 0 and bank_rounding.round_banks_(full) == 0
    x = images(batch=6).sigmoid()  # images in [0, 1], as the study's tasks hold them
    with torch.no_grad():
        torch.testing.assert_close(full(normalize(x)), low(normalize(x)), rtol=0, atol=0)
    model = filled()
    with torch.no_grad():
        labels = model(normalize(x)).argmax(1)
    task = SimpleNamespace(name="t", test_x=x, test_y=labels)
    result = bank_rounding.compare(model, [task])
    row = result["tasks"][0]
    assert result["dtype"] == "bfloat16" and result["bank_entries_changed"] > 0
    assert row["n"] == 6 and row["acc_f32"] == 1.0
    assert row["acc_rounded"] == 1.0 - row["flipped"] / 6 and 0 < row["max_rel_logit_change"] < 0.1
    assert all(m.bank_a.dtype == torch.float32 for m in mira.memories(model))  # rounded in place, not cast
    # float16 rounds the same float32 banks 8x finer: the logits move less
    finer = bank_rounding.compare(filled(), [task], torch.float16)
    assert finer["dtype"] == "float16" and finer["bank_entries_changed"] > 0
    assert 0 < finer["tasks"][0]["max_rel_logit_change"] < row["max_rel_logit_change"]


def test_bank_dtype_is_validated():
    from mira.config import MemoryConfig, MiraConfig

    assert MiraConfig(bank_dtype=torch.bfloat16).bank_dtype == "bfloat16"
    assert MiraConfig(bank_dtype="torch.float16").bank_dtype == "float16"
    for bad in ("int8", torch.float64, 16, True):
        with pytest.raises(ValueError, match="unknown bank_dtype"):
            MiraConfig(bank_dtype=bad)
    with pytest.raises(ValueError, match="trainable_bank=True cannot use bank_dtype='bfloat16'"):
        MiraConfig(bank_dtype=torch.bfloat16, trainable_bank=True)
    with pytest.raises(ValueError, match="trainable_bank"):
        MemoryConfig(d_in=8, d_k=8, num_slices=1, slice_width=8, bank_dtype="float16", trainable_bank=True)
    assert MiraConfig(bank_dtype=torch.float32, trainable_bank=True).bank_dtype == "float32"


@pytest.mark.parametrize("bank_dtype", [torch.bfloat16, torch.float16])
def test_a_float64_model_widens_16_bit_banks_exactly(bank_dtype):
    # model.double() keeps bank_dtype (as every cast does); the forward used to refuse the 16-bit
    # banks there. Widening is exact: the float64 model computes with the stored values.
    import mira
    from tests.tiny_models import images, tiny_vit

    model, x = filled(bank_dtype), images(2, seed=1)
    want_model = filled(None).double()
    for ours, theirs in zip(mira.memories(model), mira.memories(want_model), strict=True):
        with torch.no_grad():  # the reference holds the very values the 16-bit banks store
            theirs.bank_a.copy_(ours.bank_a.double())
            theirs.bank_b.copy_(ours.bank_b.double())
    model.double()
    assert {m.bank_a.dtype for m in mira.memories(model)} == {bank_dtype}
    with torch.no_grad():
        torch.testing.assert_close(model(x.double()), want_model(x.double()), rtol=1e-12, atol=1e-12)
    model.float()
    assert {m.keys.dtype for m in mira.memories(model)} == {torch.float32}
    assert {m.bank_a.dtype for m in mira.memories(model)} == {bank_dtype}
    doubled = mira.attach(tiny_vit().double(), bank_dtype=bank_dtype)  # attached in float64 alike
    assert {m.bank_a.dtype for m in mira.memories(doubled)} == {bank_dtype}


def test_model_casts_keep_the_chosen_bank_dtype():
    # model.float() / .to(dtype) / .half() cast floating tensors: the banks stay in bank_dtype.
    import mira

    model = filled(torch.bfloat16)
    before = [m.bank_a.clone() for m in mira.memories(model)]
    model.float()
    model.to(torch.float32)
    model.half()
    for m, b in zip(mira.memories(model), before):
        assert m.keys.dtype == torch.float16 and m.bank_a.dtype == m.bank_b.dtype == torch.bfloat16
        assert torch.equal(m.bank_a, b)
    plain = filled()
    plain.half()
    assert all(m.bank_a.dtype == torch.float16 for m in mira.memories(plain))  # default: the model's dtype


def test_float16_banks_refuse_entries_beyond_their_range():
    import mira

    model = filled(torch.float16)
    memory = mira.memories(model)[0]
    c = memory.config
    state = {k: v.clone() for k, v in memory.state_dict().items()}
    big = torch.zeros(1, c.num_slices, c.rank, c.d_in)
    big[0, 0, 0, 0] = 1e5
    with pytest.raises(ValueError, match="bank_a holds entries beyond torch.float16's range"):
        memory.append(big, torch.zeros(1, c.num_slices, c.slice_width, c.rank))
    assert all(torch.equal(v, memory.state_dict()[k]) for k, v in state.items())  # nothing changed


def test_save_and_load_keep_or_convert_the_bank_dtype(tmp_path):
    import json

    from safetensors import safe_open

    import mira
    from tests.tiny_models import images, tiny_vit

    source = filled(torch.bfloat16)
    path = tmp_path / "bf16.safetensors"
    mira.save_model(source, path)
    with safe_open(str(path), framework="pt") as f:
        name = next(k for k in f.keys() if k.endswith(".bank_a"))
        assert f.get_tensor(name).dtype == torch.bfloat16  # safetensors keeps the dtype
        meta = f.metadata()
    assert json.loads(meta["attach_config"])["bank_dtype"] == "bfloat16"
    assert meta["format_version"] == str(mira.io.FORMAT_VERSION) == "2"
    x = images()
    with torch.no_grad():
        want = source(x)
        loaded = mira.load_model(tiny_vit(), path)  # attached with the saved bank_dtype
        assert all(m.bank_a.dtype == torch.bfloat16 for m in mira.memories(loaded))
        torch.testing.assert_close(loaded(x), want, rtol=0, atol=0)
        # Into a float32-bank model: widened exactly, same output.
        wide = mira.attach(tiny_vit())
        mira.load_memories(wide, path)
        assert all(m.bank_a.dtype == torch.float32 for m in mira.memories(wide))
        torch.testing.assert_close(mira.set_stage(wide, "inference")(x), want, rtol=0, atol=0)
    # float32 banks into a bfloat16-bank model: rounded to the model's storage (the stated choice).
    plain = filled()
    mira.save_memories(plain, tmp_path / "fp32.safetensors")
    with safe_open(str(tmp_path / "fp32.safetensors"), framework="pt") as f:
        assert "bank_dtype" not in f.metadata()["memories"]  # default configs stay readable by older versions
    narrow = mira.attach(tiny_vit(), bank_dtype=torch.bfloat16)
    mira.load_memories(narrow, tmp_path / "fp32.safetensors")
    for m, p in zip(mira.memories(narrow), mira.memories(plain)):
        assert m.bank_a.dtype == torch.bfloat16 and torch.equal(m.bank_a, p.bank_a.bfloat16())
    # A state dict too (torch's copy_ rounds into the buffer).
    again = mira.attach(tiny_vit(), bank_dtype=torch.bfloat16)
    again.load_state_dict(plain.state_dict())
    for m, p in zip(mira.memories(again), mira.memories(plain)):
        assert m.bank_b.dtype == torch.bfloat16 and torch.equal(m.bank_b, p.bank_b.bfloat16())
