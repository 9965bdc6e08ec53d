"""AdapterMemory and MiraProjection on a plain packed-qkv Linear (no timm): invariants and formulas."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mira_kernels
from mira import AdapterMemory, MemoryConfig, MiraProjection

pytestmark = pytest.mark.filterwarnings("ignore:mira_kernels. no native backend:RuntimeWarning")

D, R = 16, 3  # block width, rank; the packed qkv has 3 * D outputs, MIRA adapts q and v


def make_layer(seed=0, *, dtype=torch.float32, **config):
    torch.manual_seed(seed)
    base = nn.Linear(D, 3 * D, dtype=dtype)
    memory = AdapterMemory(MemoryConfig(**{"d_in": D, "d_k": D, "num_slices": 2, "slice_width": D, "rank": R,
                                           **config}), dtype=dtype)
    return MiraProjection(base, memory, (0, 2 * D), slice_names=("q", "v"), stage="consolidation")


def random_adapters(n, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    bank_a = torch.randn(n, 2, R, D, generator=g, dtype=dtype) / D**0.5
    bank_b = torch.randn(n, 2, D, R, generator=g, dtype=dtype) / R**0.5
    keys = torch.randn(n, D, generator=g, dtype=dtype)
    return bank_a, bank_b, keys


def tokens(batch=4, t=5, seed=2, dtype=torch.float32):
    return torch.randn(batch, t, D, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def handwritten(layer: MiraProjection, x: torch.Tensor) -> torch.Tensor:
    """The method's formula, written out independently of mira_kernels (float64)."""
    memory, c = layer.memory, layer.memory.config
    x = x.double()
    bank_a, bank_b = (t.double() for t in memory.stored_adapters)
    keys = memory.stored_keys.double()
    if c.key_norm == "per_feature":
        keys = keys / keys.norm(dim=0, keepdim=True)
    pooled = x[:, 0] if c.query_token == "cls" else x[:, c.num_prefix_tokens:].mean(1)
    query = memory.query_module.double()(pooled)
    memory.query_module.float()
    scores = (query / query.norm(dim=1, keepdim=True)) @ (keys / keys.norm(dim=1, keepdim=True)).T
    if c.separation == "affine":
        total = scores.sum(1, keepdim=True)
        weights = scores / torch.where(total.abs() >= c.eps, total, c.eps * torch.where(total >= 0, 1.0, -1.0))
    elif c.separation == "softmax":
        weights = scores.softmax(1)
    else:
        weights = torch.relu(scores)
    y = F.linear(x, layer.base_layer.weight.double(), layer.base_layer.bias.double())
    for s, off in enumerate(layer.slice_offsets):
        mixed_a = torch.einsum("bn,nrd->brd", weights, bank_a[:, s])
        mixed_b = torch.einsum("bn,ner->ber", weights, bank_b[:, s])
        y[..., off:off + D] += c.scale * torch.einsum("btd,brd,ber->bte", x, mixed_a, mixed_b)
    return y


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"separation": "softmax"},
        {"separation": "relu", "key_norm": "per_feature"},
        {"query": "mlp", "d_k": 8, "query_hidden": 12, "query_token": "mean", "scale": 0.5},
        {"query": "linear", "d_k": 24, "capacity": 5},
    ],
    ids=["affine", "softmax", "relu-per-feature", "mlp-mean", "linear-capacity"],
)
def test_layer_matches_the_handwritten_method(config):
    layer = make_layer(**config)
    bank_a, bank_b, _ = random_adapters(3)
    keys = torch.randn(3, layer.memory.config.d_k, generator=torch.Generator().manual_seed(5))
    assert layer.memory.append(bank_a, bank_b, keys) == [0, 1, 2]
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), handwritten(layer, x), rtol=1e-5, atol=1e-5)


def test_growing_and_fixed_capacity_memories_agree_through_append_and_remove():
    grow, fixed = make_layer(), make_layer(capacity=6)
    bank_a, bank_b, keys = random_adapters(4)
    for layer in (grow, fixed):
        layer.memory.append(bank_a[:3], bank_b[:3], keys[:3])
        layer.memory.append(bank_a[3], bank_b[3], keys[3])  # one adapter without the leading dim
    x = tokens()
    ptrs = [t.data_ptr() for t in (fixed.memory.keys, fixed.memory.bank_a, fixed.memory.bank_b)]
    with torch.no_grad():
        torch.testing.assert_close(fixed(x), grow(x), rtol=1e-6, atol=1e-6)
        for layer in (grow, fixed):
            layer.memory.remove([1, -1])
        assert grow.memory.num_slots == fixed.memory.num_slots == 2
        torch.testing.assert_close(grow.memory.stored_keys, keys[[0, 2]])
        torch.testing.assert_close(fixed.memory.stored_keys, keys[[0, 2]])
        torch.testing.assert_close(fixed(x), grow(x), rtol=1e-6, atol=1e-6)
        q = fixed.memory.make_query(x)
        torch.testing.assert_close(fixed.memory.get_association_matrix(q),
                                   grow.memory.get_association_matrix(tokens=x), rtol=1e-6, atol=1e-6)
    # Fixed capacity: shapes and storage never change (no recompilation, no CUDA-graph re-capture).
    assert fixed.memory.keys.shape == (6, D)
    assert [t.data_ptr() for t in (fixed.memory.keys, fixed.memory.bank_a, fixed.memory.bank_b)] == ptrs
    fixed.memory.append(*random_adapters(4, seed=3)[:2])
    with pytest.raises(RuntimeError, match="memory full"):
        fixed.memory.append(*random_adapters(1)[:2])


@pytest.mark.parametrize("separation", ["affine", "relu"])
def test_one_adapter_in_a_fixed_capacity_is_warned_where_affine_weights_differ_from_a_growing_memory(separation):
    # With one stored adapter the op sees C slots, so affine gives z / z = 1 where a growing memory's
    # N = 1 takes the raw cosine: the two models differ (0.38 on a tiny ViT), which was silent (found by
    # probing). The op cannot count stored slots without a device sync: the write warns instead.
    grow, fixed = make_layer(separation=separation), make_layer(capacity=4, separation=separation)
    bank_a, bank_b, keys = random_adapters(2)
    grow.memory.append(bank_a[:1], bank_b[:1], keys[:1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fixed.memory.append(bank_a[:1], bank_b[:1], keys[:1])
        differ = not torch.allclose(fixed(tokens()), grow(tokens()), rtol=1e-5, atol=1e-5)
        fixed.memory.append(bank_a[1:], bank_b[1:], keys[1:])  # two stored: the memories agree, no warning
        grow.memory.append(bank_a[1:], bank_b[1:], keys[1:])
        torch.testing.assert_close(fixed(tokens()), grow(tokens()), rtol=1e-6, atol=1e-6)
        fixed.memory.remove([1])  # one left again
    one_slot = [w for w in caught if "holding one adapter" in str(w.message)]
    assert differ == (separation == "affine")
    assert len(one_slot) == (2 if separation == "affine" else 0)
    assert all(w.filename == __file__ for w in one_slot)  # attributed to the caller's line


def test_make_query_and_the_association_matrix_refuse_what_is_no_attention_input():
    # make_query checked only the token count: (B, d) gave each sample's first feature, a wrong width
    # or integer tokens a tensor that is no query; a list an AttributeError naming nothing.
    memory = make_layer().memory
    for bad in (torch.randn(2, D), torch.randn(2, 5, D + 1), torch.randn(2, 3, 5, D), torch.ones(2, 5, D).long()):
        with pytest.raises(ValueError, match=rf"make_query: tokens must be a floating \(B, T, {D}\)"):
            memory.make_query(bad)
    with pytest.raises(TypeError, match="make_query: tokens must be"):
        memory.make_query([[0.0] * D])
    with pytest.raises(TypeError, match="query must be"):
        memory.get_association_matrix([[0.0] * D])
    assert memory.make_query(tokens()).shape == (tokens().shape[0], D)


def test_association_matrix_is_the_weights_the_forward_uses():
    layer = make_layer(separation="affine", key_norm="per_feature")
    layer.memory.append(*random_adapters(3))
    x = tokens()
    weights = layer.memory.get_association_matrix(tokens=x)
    assert weights.shape == (4, 3)
    torch.testing.assert_close(weights.sum(1), torch.ones(4))  # affine weights sum to one
    keys = F.normalize(layer.memory.stored_keys, dim=0)
    expected = mira_kernels.reference.retrieval_weights(x[:, 0], keys, separation="affine")
    torch.testing.assert_close(weights, expected)
    # The forward mixes the stored adapters with exactly these weights.
    bank_a, bank_b = layer.memory.stored_adapters
    with torch.no_grad():
        y = F.linear(x, layer.base_layer.weight, layer.base_layer.bias)
        for s, off in enumerate(layer.slice_offsets):
            mixed_a = torch.einsum("bn,nrd->brd", weights, bank_a[:, s])
            mixed_b = torch.einsum("bn,ner->ber", weights, bank_b[:, s])
            y[..., off:off + D] += torch.einsum("btd,brd,ber->bte", x, mixed_a, mixed_b)
        torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)


def test_empty_memory_is_the_base_projection():
    for config in ({}, {"capacity": 4}, {"capacity": 4, "separation": "sigmoid", "trainable_bank": True}):
        layer = make_layer(**config)
        x = tokens()
        with torch.no_grad():
            torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=1e-6)


def test_adaptation_stage_is_a_plain_lora_with_weight_one():
    layer = make_layer()
    layer.set_stage("adaptation")
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=1e-6)  # B = 0 at init
        nn.init.normal_(layer.lora_b)
        expected = layer.base_layer(x)
        for s, off in enumerate(layer.slice_offsets):
            expected[..., off:off + D] += x @ layer.lora_a[s].T @ layer.lora_b[s].T
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        assert layer.memory.num_slots == 0  # the memory was bypassed


def test_gradients_reach_keys_query_and_a_trainable_bank_only_for_used_slots():
    layer = make_layer(query="linear", capacity=4, separation="sigmoid", trainable_bank=True)
    layer.memory.append(*random_adapters(2))
    layer(tokens()).square().sum().backward()
    m = layer.memory
    assert m.keys.grad[:2].abs().sum() > 0 and m.query_module.weight.grad.abs().sum() > 0
    assert m.bank_a.grad[:2].abs().sum() > 0 and m.bank_b.grad[:2].abs().sum() > 0
    # Empty slots (sigmoid gives them weight 0.5) must learn nothing.
    assert m.keys.grad[2:].abs().sum() == 0 and m.bank_a.grad[2:].abs().sum() == 0
    assert m.bank_b.grad[2:].abs().sum() == 0


def test_growing_memory_keeps_its_parameter_for_the_optimizer():
    layer = make_layer()
    layer.memory.append(*random_adapters(2))
    keys = layer.memory.keys
    opt = torch.optim.AdamW([keys], lr=1e-2)
    layer(tokens()).sum().backward()
    opt.step()
    layer.memory.append(*random_adapters(1, seed=9))
    assert layer.memory.keys is keys and keys.shape == (3, D) and keys.grad is None
    layer.memory.forget_optimizer_state(opt)
    opt.zero_grad()
    layer(tokens()).sum().backward()
    opt.step()  # would fail on Adam moments of the old shape without forget_optimizer_state
    assert opt.state[keys]["exp_avg"].shape == (3, D)


@pytest.mark.parametrize("capacity", [None, 4])
@pytest.mark.parametrize("change", ["append", "remove", "clear", "load_state_dict"])
def test_a_memory_changed_under_inference_mode_can_still_be_trained(change, capacity):
    # Under torch.inference_mode a growing memory's new storage was made of inference tensors, which
    # its parameters then held: the next stage's requires_grad_ failed ("Setting requires_grad=True
    # on inference tensor outside InferenceMode is not allowed"), and so did any backward through them.
    layer, twin = make_layer(capacity=capacity), make_layer(capacity=capacity)
    for m in (layer, twin):
        m.memory.append(*random_adapters(3))
    source = make_layer(seed=5, capacity=capacity)
    source.memory.append(*random_adapters(2, seed=4))
    changes = {"append": lambda m: m.memory.append(*random_adapters(1, seed=9)),
               "remove": lambda m: m.memory.remove([1]), "clear": lambda m: m.memory.clear(),
               "load_state_dict": lambda m: m.memory.load_state_dict(source.memory.state_dict())}
    with torch.inference_mode():
        changes[change](layer)
    changes[change](twin)
    memory = layer.memory
    assert not any(t.is_inference() for t in (memory.keys, memory.bank_a, memory.bank_b))
    for m in (layer, twin):
        m.set_stage("consolidation")
        m.memory.keys.requires_grad_(True)
        m(tokens()).square().sum().backward()
    assert torch.equal(layer.memory.keys.grad, twin.memory.keys.grad)


def test_state_dict_round_trip_resizes_a_growing_memory():
    src = make_layer(query="mlp", query_hidden=8)
    src.memory.append(*random_adapters(3))
    dst = make_layer(seed=7, query="mlp", query_hidden=8)
    dst.load_state_dict(src.state_dict())  # the base layer and LoRA; the block owns the memory
    dst.memory.load_state_dict(src.memory.state_dict())
    assert dst.memory.num_slots == 3
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_memory_errors_are_clear():
    layer = make_layer()
    bank_a, bank_b, keys = random_adapters(2)
    with pytest.raises(ValueError, match="key width mismatch"):
        layer.memory.append(bank_a, bank_b, torch.randn(2, D + 1))
    with pytest.raises(ValueError, match="bank_a must have shape"):
        layer.memory.append(bank_a[:, :1], bank_b, keys)
    with pytest.raises(IndexError, match="out of range"):
        layer.memory.remove(5)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        MemoryConfig(d_in=D, d_k=D, num_slices=2, slice_width=D, rank=0)
    with pytest.raises(ValueError, match="softmax"):
        MemoryConfig(d_in=D, d_k=D, num_slices=2, slice_width=D, separation="softmax", capacity=4)
    with pytest.raises(ValueError, match="key_dim must equal"):
        MemoryConfig(d_in=D, d_k=8, num_slices=2, slice_width=D)
    memory = AdapterMemory(MemoryConfig(d_in=D, d_k=D, num_slices=2, slice_width=D))
    with pytest.raises(ValueError, match="outside the projection"):
        MiraProjection(nn.Linear(D, 3 * D), memory, (0, 2 * D + 1))
    with pytest.raises(ValueError, match="overlap"):
        MiraProjection(nn.Linear(D, 3 * D), memory, (0, D - 1))
    with pytest.raises(ValueError, match="per-image tokens"):
        make_layer()(torch.randn(2, 3, 3, D))


class _Block(nn.Module):
    """Owns the memory as a timm block does, so functional_call can substitute its tensors."""

    def __init__(self, layer):
        super().__init__()
        self.proj, self.memory = layer, layer.memory

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize(
    "device,backend",
    [
        ("cpu", "cpu"),
        pytest.param("cuda", "triton", marks=pytest.mark.gpu),
        pytest.param("cuda", "cuda", marks=pytest.mark.gpu),
    ],
)
def test_fused_backend_equals_reference_backend(device, backend):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if backend not in mira_kernels.available_backends(device):
        pytest.skip(f"backend {backend!r} is not available for {device} tensors on this machine")
    layer = make_layer(query="mlp", d_k=8)
    _Block(layer).to(device)  # the projection only references its memory; the owner moves both
    # Seeded keys (not the global RNG): an affine sum that lands near the guard gives gradients
    # ~1e5 whose float32 rounding a fixed tolerance cannot take.
    layer.memory.append(*random_adapters(3)[:2], generator=torch.Generator().manual_seed(0))
    x = tokens().to(device).requires_grad_(True)
    results = []
    for name in ("reference", backend):
        layer.zero_grad()
        layer.memory.zero_grad()
        x.grad = None
        with mira_kernels.use_backend(name):
            y = layer(x)
        y.square().sum().backward()
        results.append((y.detach(), x.grad, layer.memory.keys.grad, layer.memory.query_module.fc1.weight.grad))
    for ref, fused in zip(*results):
        torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-4)


def test_layer_gradcheck_float64_through_query_mask_and_per_feature_norm():
    layer = make_layer(dtype=torch.float64, query="mlp", d_k=4, query_hidden=5, capacity=4, key_norm="per_feature",
                       trainable_bank=True)
    bank_a, bank_b, _ = random_adapters(3, dtype=torch.float64)
    layer.memory.append(bank_a, bank_b, torch.randn(3, 4, dtype=torch.float64))
    block = _Block(layer)
    x = tokens(batch=2, t=3, dtype=torch.float64).requires_grad_(True)
    names = ("memory.keys", "memory.query_module.fc1.weight", "memory.bank_a", "memory.bank_b")
    params = [block.get_parameter(n).detach().clone().requires_grad_(True) for n in names]

    def run(x, *tensors):
        with mira_kernels.use_backend("reference"):
            return torch.func.functional_call(block, dict(zip(names, tensors)), (x,))

    assert torch.autograd.gradcheck(run, (x, *params), eps=1e-6, atol=1e-5, fast_mode=True)


def test_autocast_bfloat16_keeps_the_query_in_float32_and_matches_the_reference_precision():
    layer = make_layer(query="linear")
    layer.memory.append(*random_adapters(3)[:2])
    x = tokens(batch=3, t=7)
    exact = handwritten(layer, x)
    with torch.no_grad():
        query = layer.memory.make_query(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            # The query feeds an affine separation that can amplify its error: kept in float32.
            assert torch.equal(layer.memory.make_query(x), query)
            got = layer(x)
            with mira_kernels.use_backend("reference"):
                yardstick = layer(x)  # plain PyTorch, same dtype rules
    assert got.dtype == yardstick.dtype == torch.bfloat16
    error = (got.double() - exact).abs().max().item()
    assert error <= 2 * (yardstick.double() - exact).abs().max().item() + 1e-2


@pytest.mark.parametrize("capacity", [None, 4])
def test_one_stored_key_under_per_feature_norm_gets_exactly_zero_gradient(capacity):
    # Each normalised column of one key is k / |k| = +-1 whatever the key: the exact gradient is zero,
    # and the rounding noise autograd would compute (~1e-8) is what Adam turns into lr-sized steps.
    layer = make_layer(key_norm="per_feature", capacity=capacity)
    bank_a, bank_b, keys = random_adapters(1)
    layer.memory.append(bank_a, bank_b, keys)
    layer(tokens()).square().sum().backward()
    assert layer.memory.keys.grad.eq(0).all()
    assert torch.equal(layer.memory.retrieval_keys().detach()[0], keys[0].sign())  # the forward: unchanged
    # Two keys: a real gradient everywhere.
    layer.memory.keys.grad = None
    layer.memory.append(*random_adapters(1, seed=5))
    layer(tokens()).square().sum().backward()
    assert layer.memory.keys.grad[: layer.memory.num_slots].abs().amin() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad", [False, True])
def test_16bit_x_over_a_float32_memory_takes_the_cls_view_bit_for_bit(dtype, grad):
    # Issue 17: the layer passes x[:, 0] (a strided view, no cast launch) and the op widens it
    # exactly, so output and gradients equal those of the explicit float32 query.
    layer = make_layer(separation="affine", key_norm="per_feature")
    bank_a, bank_b, keys = random_adapters(3)
    layer.memory.append(bank_a, bank_b, keys)
    layer.base_layer.to(dtype)
    layer.train(grad)  # eval without grad: the C++ fast path with the token index
    x = tokens(dtype=dtype).requires_grad_(grad)
    assert layer.memory.query_token(x) == 0
    with torch.set_grad_enabled(grad):
        got = layer(x)
        k, a, b = layer.memory.retrieval_tensors()
        w = layer.base_layer
        x2 = x.detach().requires_grad_(grad)
        want = mira_kernels.mira_linear(x2, w.weight, w.bias, x2[:, 0].float(), k, a, b,
                                        slice_offsets=layer.slice_offsets, separation="affine",
                                        scale=layer.memory.config.scale, eps=layer.memory.config.eps)
    assert got.dtype == dtype and torch.equal(got, want)
    if grad:
        got.float().square().sum().backward()
        want.float().square().sum().backward()
        assert torch.equal(x.grad, x2.grad)


def test_per_feature_key_norm_runs_the_one_launch_kernel_only_where_no_graph_is_needed(monkeypatch):
    # On a GPU the layer normalises its keys with mira_kernels.triton.normalize_columns (one launch, not
    # ATen's three) where no autograd graph is needed; with one, F.normalize (its gradient is needed).
    # Without a GPU the dispatch is checked with the predicate forced and the kernel replaced by a spy.
    import mira.memory as mm

    layer = make_layer(key_norm="per_feature")
    bank_a, bank_b, keys = random_adapters(4)
    layer.memory.append(bank_a, bank_b, keys)
    memory = layer.memory
    want = F.normalize(memory.stored_keys.detach(), dim=0, eps=mm.NORM_EPS)
    assert not mm._fused_key_norm_applies(memory.keys)  # CPU keys: ATen
    assert torch.equal(memory.retrieval_tensors()[0], want)  # (grad on, keys trainable: not cached)
    calls = []

    def spy(k):
        calls.append(k.shape)
        return F.normalize(k, dim=0, eps=mm.NORM_EPS)

    monkeypatch.setattr(mm, "_fused_key_norm_applies", lambda k: True)
    monkeypatch.setattr(mm, "_fused_normalize_columns", spy)
    derived = memory.retrieval_tensors()[0]  # keys require grad, grad enabled: the autograd path
    assert not calls and derived.requires_grad
    with torch.no_grad():
        memory.invalidate_cache()
        assert torch.equal(memory.retrieval_tensors()[0], want)
    assert calls == [tuple(memory.keys.shape)]


def test_the_fused_helpers_run_only_on_a_cuda_device_the_triton_backend_can_use():
    assert not mira_kernels.backends.fused_helpers_available("cpu")
    with mira_kernels.use_backend("reference"):
        assert not mira_kernels.backends.fused_helpers_available("cuda")  # the user asked for ATen ops
    if not torch.cuda.is_available():
        assert not mira_kernels.backends.fused_helpers_available("cuda")


def test_a_graph_capture_never_contains_the_key_norm_kernels_first_launch(monkeypatch):
    # A first launch compiles and loads the Triton kernel, which a CUDA-graph capture cannot contain:
    # inside a capture an unseen launch signature gets F.normalize; once run outside, the kernel.
    import mira.memory as mm
    from mira_kernels import triton as mira_triton

    calls = []
    monkeypatch.setattr(mira_triton, "normalize_columns", lambda k, eps: calls.append(k.shape) or k.clone())
    monkeypatch.setattr(mm, "_warm_key_norms", set())
    keys = torch.randn(5, D)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert torch.equal(mm._fused_normalize_columns(keys), F.normalize(keys, dim=0, eps=mm.NORM_EPS))
    assert not calls
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    mm._fused_normalize_columns(keys)  # the eager warm-up
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    mm._fused_normalize_columns(keys)
    assert calls == [keys.shape, keys.shape]
    mm._fused_normalize_columns(torch.randn(6, D))  # another signature: not warm, F.normalize
    assert len(calls) == 2


@pytest.mark.parametrize("key_norm", ["per_feature", "unit"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_a_float16_memory_with_empty_slots_gets_finite_key_gradients(key_norm, backend):
    # The op's gradient of an empty slot's zero key is g / 1e-12: inf in float16. The empty slots
    # were masked by a product, and inf * 0 gave NaN, which the per-feature norm spread to every key.
    layer = make_layer(dtype=torch.float16, capacity=4, key_norm=key_norm)
    layer.memory.append(*(t.half() for t in random_adapters(2)))
    x = tokens(dtype=torch.float16)
    with mira_kernels.use_backend(backend):
        layer(x).float().square().mean().backward()
    grad = layer.memory.keys.grad
    assert torch.isfinite(grad).all()
    assert grad[:2].abs().sum() > 0 and not grad[2:].any()  # stored keys learn; empty slots get exact zeros


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64, torch.bool])
def test_append_refuses_tensors_that_are_not_real_floats_and_keys_without_a_direction(dtype):
    # A complex bank was cast to its real part with only a warning, so a NaN real part got past the
    # finiteness check; integer and bool tensors were taken as numbers.
    layer = make_layer(capacity=4)
    bank_a, bank_b, keys = random_adapters(2)
    layer.memory.append(bank_a, bank_b, keys)
    before = {k: v.clone() for k, v in layer.memory.state_dict().items()}
    for args, name in (((bank_a.to(dtype), bank_b, keys), "bank_a"), ((bank_a, bank_b.to(dtype), keys), "bank_b"),
                       ((bank_a, bank_b, keys.to(dtype)), "keys")):
        with pytest.raises(TypeError, match=f"{name} must be a real floating-point tensor, got {dtype}"):
            layer.memory.append(*args)
    zero = keys.clone()
    zero[1] = 0
    with pytest.raises(ValueError, match=r"keys \[1\] are all zeros; a key needs a direction"):
        layer.memory.append(bank_a, bank_b, zero)
    assert all(torch.equal(v, before[k]) for k, v in layer.memory.state_dict().items())


def test_load_state_dict_refuses_a_slot_layout_a_fixed_capacity_cannot_hold():
    # A mask with holes loaded: num_slots counted 2 of [T, F, T, F], and the next append wrote over
    # the adapter in slot 2. Values in slots marked empty loaded too and moved the outputs.
    layer = make_layer(capacity=4, separation="relu")
    layer.memory.append(*random_adapters(2))
    good = {k: v.clone() for k, v in layer.memory.state_dict().items()}
    holes = {**good, "active": torch.tensor([True, False, True, False]), "keys": good["keys"][[0, 2, 1, 3]],
             "bank_a": good["bank_a"][[0, 2, 1, 3]], "bank_b": good["bank_b"][[0, 2, 1, 3]]}
    stray = {**good, "bank_b": good["bank_b"].clone().index_fill_(0, torch.tensor([3]), 0.5)}
    as_ints = {**good, "active": good["active"].int()}
    for state, cause in ((holes, r"active is \[1, 0, 1, 0\]; the used slots must come first"),
                         (stray, r"\['bank_b'\] hold nonzero values in the empty slots 2..3"),
                         (as_ints, "active has dtype torch.int32; it is a bool mask")):
        with pytest.raises(RuntimeError, match=cause):
            layer.memory.load_state_dict(state)
        assert all(torch.equal(v, good[k]) for k, v in layer.memory.state_dict().items())
    layer.memory.load_state_dict({**good, "active": torch.tensor([True, True, True, False]),
                                  "keys": good["keys"].index_fill(0, torch.tensor([2]), 1.0)})
    assert layer.memory.num_slots == 3


@pytest.mark.parametrize("capacity", [None, 3])
def test_a_trainable_bank_keeps_its_bank_dtype_through_a_model_wide_cast(capacity):
    # bank_dtype was kept for frozen banks (buffers) only: .half() made trainable banks float16
    # parameters (the pairing MiraConfig refuses), and a growing memory's next append made them float32 again.
    layer = make_layer(capacity=capacity, trainable_bank=True, bank_dtype="float32")
    layer.memory.append(*random_adapters(2))
    bank = layer.memory.bank_a
    order = [name for name, _ in layer.memory.named_parameters()], list(layer.memory.state_dict())
    layer.memory.half()  # (the block owns the memory: a model-wide cast reaches it as this does)
    assert layer.memory.bank_a is bank and bank.dtype == torch.float32 and layer.memory.keys.dtype == torch.float16
    assert ([name for name, _ in layer.memory.named_parameters()], list(layer.memory.state_dict())) == order
    layer.memory.append(*(t.half() for t in random_adapters(1)))
    assert layer.memory.bank_a.dtype == layer.memory.bank_b.dtype == torch.float32


def test_a_deleted_memory_is_freed_at_once_not_at_the_next_garbage_collection():
    # Its query module's load-state-dict hook was a bound method of the memory: a reference cycle,
    # so a deleted model's keys and banks (GPU memory included) waited for a full collection.
    import gc
    import weakref

    layer = make_layer(capacity=4, query="linear", d_k=8)
    layer.memory.append(*(t[:, :8] if t.dim() == 2 else t for t in random_adapters(2)))
    watched = [weakref.ref(t) for t in (layer.memory.keys, layer.memory.bank_a, layer.memory.query_module.weight)]
    layer.memory.load_state_dict(layer.memory.state_dict())  # the hook has run
    enabled = gc.isenabled()
    gc.disable()
    try:
        del layer
        assert [ref() is None for ref in watched] == [True] * 3
    finally:
        if enabled:
            gc.enable()
