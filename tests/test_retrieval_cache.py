"""The eval-mode cache of what the op sees (AdapterMemory.retrieval_tensors), and the eval fast path.

The cache may never be stale: every test changes the stored tensors in one of the ways a user or
a library does (a ``.data`` swap, ``load_state_dict``, an optimiser step, the memory's own
mutations, ``.to()``) and checks the layer against the same tensors derived afresh.
"""

from __future__ import annotations

import gc
import pickle
import types
import weakref

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import mira.memory as memory_module
import mira.optim_state as optim_state
import mira_kernels
from mira import AdapterMemory, MemoryConfig, MiraProjection
from mira_kernels import ops

pytestmark = pytest.mark.filterwarnings("ignore:mira_kernels. no native backend:RuntimeWarning")

D, R, N = 16, 3, 5
needs_fast_path = pytest.mark.skipif(ops._cpu_eval_linear is None, reason="the CPU extension is not built")


def make_layer(seed=0, *, stage="inference", n=N, **config):
    torch.manual_seed(seed)
    config = {"d_in": D, "d_k": D, "num_slices": 2, "slice_width": D, "rank": R, "key_norm": "per_feature", **config}
    memory = AdapterMemory(MemoryConfig(**config))
    layer = MiraProjection(nn.Linear(D, 3 * D), memory, (0, 2 * D), stage=stage)
    g = torch.Generator().manual_seed(seed + 1)
    if n:
        memory.append(torch.randn(n, 2, R, D, generator=g) / D**0.5, torch.randn(n, 2, D, R, generator=g),
                      torch.randn(n, D, generator=g))
    return layer


def tokens(batch=3, seed=2):
    return torch.randn(batch, 7, D, generator=torch.Generator().manual_seed(seed))


def fresh(memory: AdapterMemory):
    """What the op must see, derived now from the stored tensors (no cache involved)."""
    return memory._derive(memory.keys, memory.bank_a, memory.bank_b, memory.active)


def expected(layer: MiraProjection, x: torch.Tensor) -> torch.Tensor:
    """The public op (same backend as the layer's) on freshly derived tensors."""
    m, c = layer.memory, layer.memory.config
    keys, bank_a, bank_b = fresh(m)
    with torch.no_grad():
        return mira_kernels.mira_linear(x, layer.weight, layer.bias, m.make_query(x), keys, bank_a, bank_b,
                                        slice_offsets=layer.slice_offsets, separation=c.separation, scale=c.scale,
                                        eps=c.eps)


def assert_current(layer, x):
    """The layer's output and the memory's tensors are those of its current state."""
    with torch.no_grad():
        got = layer(x)
        for a, b in zip(layer.memory.retrieval_tensors(), fresh(layer.memory)):
            assert torch.equal(a, b)
        assert torch.equal(got, expected(layer, x))


# ----------------------------------------------------------------------------------------------
# When the cache is used.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [{"key_norm": "per_feature"}, {"key_norm": "unit", "capacity": 8},
                                    {"key_norm": "per_feature", "capacity": 8, "trainable_bank": True,
                                     "separation": "sigmoid"}])
def test_eval_calls_reuse_the_derived_tensors(config):
    layer = make_layer(**config)
    with torch.no_grad():
        first = layer.memory.retrieval_tensors()
        second = layer.memory.retrieval_tensors()
    assert all(a is b for a, b in zip(first, second))
    assert all(torch.equal(a, b) for a, b in zip(first, fresh(layer.memory)))


def test_nothing_is_cached_when_nothing_is_derived():
    layer = make_layer(key_norm="unit")
    m = layer.memory
    with torch.no_grad():
        keys, bank_a, bank_b = m.retrieval_tensors()
    assert keys is m.keys and bank_a is m.bank_a and bank_b is m.bank_b
    assert m._retrieval_cache is None


def test_training_gets_a_graph_not_the_cache():
    layer = make_layer(stage="consolidation")
    layer.memory.keys.requires_grad_(True)
    with torch.no_grad():
        cached = layer.memory.retrieval_tensors()[0]
    keys = layer.memory.retrieval_tensors()[0]
    assert keys is not cached and keys.grad_fn is not None
    layer(tokens()).sum().backward()
    assert layer.memory.keys.grad is not None and layer.memory.keys.grad.abs().sum() > 0


def test_inference_tensors_are_never_cached():
    with torch.inference_mode():
        layer = make_layer()  # inference tensors have no version counter
        x = tokens()
        assert_current(layer, x)
    assert layer.memory._retrieval_cache is None


@pytest.mark.parametrize("config", [{"key_norm": "per_feature"}, {"key_norm": "unit", "capacity": 8},
                                    {"key_norm": "per_feature", "capacity": 8, "trainable_bank": True}])
@pytest.mark.parametrize("key_impl", ["native", "python"], indirect=True)
def test_a_forward_under_inference_mode_leaves_nothing_autograd_cannot_save(config, key_impl):
    # Derived under inference_mode, the cached tensors were inference tensors; a later forward that
    # records a graph (an input that requires grad, as for saliency maps or input attacks, the memory
    # frozen) then got them from the cache and failed: "Inference tensors cannot be saved for backward".
    layer, twin = make_layer(**config), make_layer(**config)
    x = tokens()
    with torch.inference_mode():
        layer(x)
        layer(x)  # the eval plan too, where there is one
    assert layer.memory._retrieval_cache is not None
    assert not any(t.is_inference() for t in layer.memory._retrieval_cache[2])
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    for net, xg in zip((layer, twin), xs):  # twin: never called under inference_mode
        net(xg).square().sum().backward()
    assert torch.equal(xs[0].grad, xs[1].grad)
    with torch.inference_mode():  # and the cache serves inference mode as before
        assert torch.equal(layer(x), twin(x))
    assert_current(layer, x)


def test_a_memory_made_under_inference_mode_takes_adapters_appended_outside_it():
    # Its parameters are inference tensors; ordinary data swapped into them made tensors that said
    # they were ordinary but had no version counter, and the cache's key read it: the process aborted.
    with torch.inference_mode():
        layer = make_layer(n=0)
    layer.memory.append(*(torch.randn(s, generator=torch.Generator().manual_seed(i))
                          for i, s in enumerate([(2, 2, R, D), (2, 2, D, R), (2, D)])))
    assert layer.memory.keys.is_inference()  # the kind it was made as
    x = tokens()
    assert_current(layer, x)
    assert_current(layer, x)  # the eval plan's call
    assert layer.memory._retrieval_cache is None


# ----------------------------------------------------------------------------------------------
# Every way the stored tensors change.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(params=["native", "python"])
def key_impl(request, monkeypatch):
    """The cache's key built by the native call (CPU tensors) or, as without the extension, in Python."""
    if request.param == "python":
        monkeypatch.setattr(memory_module, "_native_stamp", None)
    elif memory_module._native_stamp is None:
        pytest.skip("the CPU extension is not built")
    return request.param


@needs_fast_path
def test_the_native_key_serves_cpu_tensors():
    m = make_layer().memory
    sources = (m.keys, m.active)
    with torch.no_grad():
        stamp = memory_module._cache_stamp(m._mutations, sources)
        assert isinstance(stamp, bytes) and stamp == memory_module._cache_stamp(m._mutations, sources)
        assert stamp != memory_module._cache_stamp(m._mutations + 1, sources)
    m.keys.requires_grad_(True)
    assert memory_module._cache_stamp(m._mutations, sources) is None  # a graph is needed
    with torch.inference_mode():
        assert memory_module._cache_stamp(0, (torch.ones(2), None)) is None  # no version counter


def test_a_data_swap_is_seen(key_impl):
    layer, x = make_layer(), tokens()
    assert_current(layer, x)
    keys = layer.memory.keys
    keys.data = torch.randn_like(keys)  # no version bump, new storage
    assert_current(layer, x)


def test_a_data_swap_to_a_reused_address_is_seen(key_impl):
    # Swap A -> B -> C with A freed before C is made: the allocator may give C A's address (and C's
    # version counter can equal A's). The cache holds A's storage, so C cannot get that address.
    # Tensors are freed by reference counting the moment they are dropped (no gc.collect needed:
    # at ~0.5 s per collection with torch and timm loaded, it made this the slowest test here).
    layer, x = make_layer(), tokens()
    keys = layer.memory.keys
    assert_current(layer, x)
    for seed in range(20):
        keys.data = torch.randn(N, D, generator=torch.Generator().manual_seed(seed))
        keys.data = torch.randn(N, D, generator=torch.Generator().manual_seed(100 + seed))
        assert_current(layer, x)


def test_a_view_swap_of_another_shape_is_seen(key_impl):
    layer, x = make_layer(n=N + 2), tokens()
    assert_current(layer, x)
    m = layer.memory
    m.keys.data, m.bank_a.data, m.bank_b.data = m.keys.data[:N], m.bank_a.data[:N], m.bank_b.data[:N]
    assert_current(layer, x)


def test_a_view_swap_of_other_strides_is_seen(key_impl):
    # Same address, same shape, same version: only the strides tell the keys apart.
    layer, x = make_layer(), tokens()
    assert_current(layer, x)
    keys = layer.memory.keys
    keys.data = keys.data.view(D, N).t()
    assert keys.shape == (N, D) and not keys.is_contiguous()
    assert_current(layer, x)


def test_load_state_dict_is_seen():
    layer, other, x = make_layer(seed=0), make_layer(seed=5), tokens()
    assert_current(layer, x)
    layer.memory.load_state_dict(other.memory.state_dict())
    assert_current(layer, x)
    assert torch.equal(layer.memory.keys, other.memory.keys)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adam-foreach", "sgd-fused", "adam-fused"])
def test_an_optimizer_step_is_seen(optimizer, key_impl):
    # Fused kernels (fused=True) write the parameters without bumping their version counters, which
    # both the cache and the eval plan key on: eval after such a step replayed the old keys (0.7 off
    # in the tiny ViT) until mira.optim_state's step post-hook bumped them.
    layer, x = make_layer(stage="consolidation"), tokens()
    keys = layer.memory.keys
    keys.requires_grad_(True)
    opt = {"sgd": lambda: torch.optim.SGD([keys], lr=0.5),
           "adam": lambda: torch.optim.Adam([keys], lr=0.1, foreach=False),
           "adam-foreach": lambda: torch.optim.Adam([keys], lr=0.1, foreach=True),
           "sgd-fused": lambda: torch.optim.SGD([keys], lr=0.5, fused=True),
           "adam-fused": lambda: torch.optim.Adam([keys], lr=0.1, fused=True)}[optimizer]()
    for _ in range(3):
        assert_current(layer, x)  # eval between steps fills the cache
        opt.zero_grad()
        layer(x).square().sum().backward()
        opt.step()
    assert_current(layer, x)


def test_a_compiled_fused_step_is_seen():
    # Traced by Dynamo, the step hook's bump was lost: it runs eagerly (torch.compiler.disable).
    layer, x = make_layer(stage="consolidation"), tokens()
    keys = layer.memory.keys.requires_grad_(True)
    opt = torch.optim.SGD([keys], lr=0.5, fused=True)
    step = torch.compile(opt.step)
    assert_current(layer, x)
    layer(x).square().sum().backward()
    step()
    assert_current(layer, x)


def test_a_fused_step_is_seen_in_a_process_that_only_unpickled_the_memory():
    # Such a process makes no memory, whose __init__ registers mira.optim_state's step hooks.
    data = pickle.dumps(make_layer(stage="consolidation"))
    for name in ("_hook", "_post_hook"):
        getattr(optim_state, name).remove()
        setattr(optim_state, name, None)
    try:
        layer, x = pickle.loads(data), tokens()
        keys = layer.memory.keys.requires_grad_(True)
        opt = torch.optim.SGD([keys], lr=0.5, fused=True)
        assert_current(layer, x)
        layer(x).square().sum().backward()
        opt.step()
        assert_current(layer, x)
    finally:
        optim_state.watch()


def test_in_place_updates_under_no_grad_are_seen(key_impl):
    layer, x = make_layer(), tokens()
    assert_current(layer, x)
    with torch.no_grad():
        layer.memory.keys.mul_(-1.5)
    assert_current(layer, x)
    with torch.no_grad():
        layer.memory.bank_a.add_(0.1)  # a bank is read by the op directly, never from the cache
    assert_current(layer, x)


@pytest.mark.parametrize("capacity", [None, 8])
def test_append_remove_and_clear_are_seen(capacity):
    layer, x = make_layer(capacity=capacity, separation="affine"), tokens()
    m = layer.memory
    assert_current(layer, x)
    g = torch.Generator().manual_seed(9)
    m.append(torch.randn(2, 2, R, D, generator=g), torch.randn(2, 2, D, R, generator=g), torch.randn(2, D, generator=g))
    assert_current(layer, x)
    m.remove([0, 3])
    assert_current(layer, x)
    m.clear()
    assert_current(layer, x)


def test_a_config_change_is_seen():
    layer, x = make_layer(), tokens()
    assert_current(layer, x)
    layer.memory.config.key_norm = "unit"
    assert_current(layer, x)
    layer.memory.config.key_norm = "per_feature"
    assert_current(layer, x)


def test_to_another_dtype_is_seen():
    layer, x = make_layer(), tokens()
    assert_current(layer, x)
    layer.memory.double()
    layer.double()
    with torch.no_grad():
        got = layer(x.double())
    assert got.dtype == torch.float64 and layer.memory.retrieval_tensors()[0].dtype == torch.float64
    torch.testing.assert_close(got, expected(layer, x.double()))


def test_writes_through_data_need_invalidate_cache():
    # Documented: a write *through* .data bypasses version counters (as it bypasses autograd).
    layer, x = make_layer(), tokens()
    assert_current(layer, x)
    layer.memory.keys.data.mul_(2.0).add_(1.0)
    layer.memory.invalidate_cache()
    assert_current(layer, x)


def test_the_cache_holds_one_generation_only():
    layer, x = make_layer(), tokens()
    m = layer.memory
    refs = []
    for seed in range(10):
        m.keys.data = torch.randn(N, D, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            layer(x)
            refs.append(weakref.ref(m.retrieval_tensors()[0]))
    gc.collect()
    alive = [r for r in refs if r() is not None]
    with torch.no_grad():
        assert len(alive) == 1 and alive[0]() is m.retrieval_tensors()[0]
    key, sources, derived = m._retrieval_cache
    assert [s.data_ptr() for s in sources] == [m.keys.data_ptr()]  # the current storage, no older one


# ----------------------------------------------------------------------------------------------
# torch.compile and CUDA graphs compute from the sources.
# ----------------------------------------------------------------------------------------------


def test_compiled_layer_follows_in_place_changes():
    layer, x = make_layer(), tokens()
    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), expected(layer, x), rtol=1e-5, atol=1e-5)
        layer.memory.keys.mul_(-2.0).add_(0.5)
        torch.testing.assert_close(compiled(x), expected(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replay_follows_in_place_changes():
    layer, x = make_layer(), tokens()
    layer.cuda()
    layer.memory.cuda()  # not a child of the layer (the block owns it): moved on its own
    x = x.cuda()
    with torch.no_grad():
        layer(x)  # fills the cache before capture: the graph must not read it
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            layer(x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(x)
        layer.memory.keys.mul_(-2.0).add_(0.5)
        graph.replay()
        torch.testing.assert_close(out, expected(layer, x), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# The eval fast path: the same bits as the op, and it steps aside whenever the op has work to do.
# ----------------------------------------------------------------------------------------------


def _through_the_op(layer, x, monkeypatch):
    monkeypatch.setattr("mira.layers.eval_linear_cpu", lambda *args: None)
    layer._eval_plan = None  # a prepared call would take it past the op
    try:
        with torch.no_grad():
            return layer(x)
    finally:
        monkeypatch.undo()


@needs_fast_path
@pytest.mark.parametrize("config", [{}, {"query": "linear"}, {"query_token": "mean"}, {"capacity": 8},
                                    {"key_norm": "unit", "separation": "softmax"}])
def test_fast_path_gives_the_op_bits(config, monkeypatch):
    layer, x = make_layer(**config), tokens()
    calls = []
    real = ops._cpu_eval_linear
    monkeypatch.setattr(ops, "_cpu_eval_linear", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        got = layer(x)
    assert calls and got is not None
    assert torch.equal(got, _through_the_op(layer, x, monkeypatch))


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@needs_fast_path
def test_fast_path_steps_aside(monkeypatch):
    layer, x = make_layer(), tokens()
    w, b, c = layer.weight, layer.bias, layer.memory.config
    keys, bank_a, bank_b = layer.memory.retrieval_tensors()
    args = (w, b, 0, keys, bank_a, bank_b, layer.slice_offsets, c.separation, c.scale, c.eps)
    with torch.no_grad():
        assert ops.eval_linear_cpu(x, *args) is not None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert ops.eval_linear_cpu(x, *args) is None
        with _Recorder() as rec:
            assert ops.eval_linear_cpu(x, *args) is None
            layer(x)
        assert any("mira.mira_linear" in op for op in rec.ops)  # the mode saw the op
        with mira_kernels.use_backend("reference"):
            assert ops.eval_linear_cpu(x, *args) is None
        with mira_kernels.check_finite():
            assert ops.eval_linear_cpu(x, *args) is None
        assert ops.eval_linear_cpu(x[..., :-1], *args) is None  # a bad shape: the op raises for it
        with pytest.raises(ValueError, match="x"):
            layer(x[..., :-1])
    # Grad enabled with an input that requires grad: autograd must record the op.
    xg = x.clone().requires_grad_(True)
    assert ops.eval_linear_cpu(xg, *args) is None
    layer(xg).sum().backward()
    assert xg.grad is not None
    # A tensor subclass with its own __torch_function__ goes to the op.

    class Tagged(torch.Tensor):
        pass

    assert ops.eval_linear_cpu(x.as_subclass(Tagged), *args) is None


@needs_fast_path
@pytest.mark.parametrize("layout", ["contiguous", "strided", "offset", "expanded"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_fast_path_token_query_is_the_token_row_in_any_layout(layout, mode):
    # The fast path takes the query x[:, token] as an alias of x's storage made without the
    # dispatcher (csrc/cpu/fast_path.cpp, token_rows): the same bits as the row passed as a tensor and
    # as the op, for every token and any strides or storage offset of x, and x itself untouched.
    layer, base = make_layer(), tokens()
    w, b, c = layer.weight, layer.bias, layer.memory.config
    keys, bank_a, bank_b = layer.memory.retrieval_tensors()
    rest = (keys, bank_a, bank_b, layer.slice_offsets, c.separation, c.scale, c.eps)
    if layout == "strided":  # (B, T, D) with a gap between features and tokens
        x = torch.zeros(base.shape[0], base.shape[1], 2 * D)[..., ::2]
        x.copy_(base)
    elif layout == "offset":
        x = torch.cat([torch.zeros(5 * D), base.flatten()])[5 * D:].view_as(base)
    elif layout == "expanded":  # every sample the same tokens: stride 0 over the batch
        x = base[:1].expand(base.shape)
    else:
        x = base
    version = x._version
    with torch.inference_mode() if mode == "inference_mode" else torch.no_grad():
        for token in (0, x.shape[1] - 1):
            got = ops.eval_linear_cpu(x, w, b, token, *rest)
            row = ops.eval_linear_cpu(x, w, b, x[:, token], *rest)
            op = mira_kernels.mira_linear(x, w, b, x[:, token].contiguous(), *rest[:3], slice_offsets=rest[3],
                                          separation=rest[4], scale=rest[5], eps=rest[6])
            assert got is not None and row is not None
            assert torch.equal(got, row) and torch.equal(got, op)
    assert x._version == version and not x.requires_grad


@needs_fast_path
def test_fast_path_without_no_grad_in_eval():
    # model.eval() without no_grad: nothing requires grad in the inference stage, so no graph.
    layer, x = make_layer(), tokens()
    layer.requires_grad_(False)
    layer.memory.requires_grad_(False)  # what mira.set_stage(model, "inference") does
    y = layer(x)
    assert y.grad_fn is None
    assert torch.equal(y, expected(layer, x))


def test_a_hooked_query_module_is_called():
    # The fast path takes the CLS token itself only when calling the identity query module would
    # change nothing; a hook on it (or on every module) must still run.
    layer, x = make_layer(), tokens()
    seen = []
    handle = layer.memory.query_module.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    with torch.no_grad():
        assert layer.memory.query_token(x) is None
        layer(x)
    handle.remove()
    assert seen == [(3, D)]
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, args, out: seen.append(type(m)))
    try:
        with torch.no_grad():
            assert layer.memory.query_token(x) is None
    finally:
        handle.remove()
    assert layer.memory.query_token(x) == 0
    assert layer.memory.query_token(x.double()) is None  # make_query would cast


# ----------------------------------------------------------------------------------------------
# The eval plan (csrc/eval_plan.cpp): after the first eval call on CPU, the layer replays that call
# while everything it was made from is unchanged. Every change a user or library makes must be
# seen: the tests above call the layer after each change (through the plan from the second call on);
# these cover what only the plan guards.
# ----------------------------------------------------------------------------------------------

needs_plan = pytest.mark.skipif(ops._EvalPlan is None, reason="the CPU extension is not built")


def planned(layer, x):
    """The layer with a fresh plan for x (two eval calls), and the plan."""
    with torch.no_grad():
        layer(x)
        layer(x)
    plan = layer._eval_plan
    assert plan is not None and not plan.stale
    return plan


def plan_only(monkeypatch):
    """From here on, any call that leaves the plan fails (the layer's own path is cut off)."""
    def refuse(*args):
        raise AssertionError("the layer's own path ran")

    monkeypatch.setattr("mira.layers.eval_linear_cpu", refuse)
    monkeypatch.setattr("mira.layers.mira_kernels", types.SimpleNamespace(mira_linear=refuse))


@needs_plan
@pytest.mark.parametrize("config", [{}, {"query": "linear"}, {"query_token": "mean"}, {"capacity": 8},
                                    {"capacity": 8, "trainable_bank": True, "separation": "sigmoid"},
                                    {"key_norm": "unit", "separation": "softmax"}])
def test_the_plan_replays_the_fast_paths_bits(config, monkeypatch):
    layer, x = make_layer(**config), tokens()
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)  # strided
    planned(layer, x)
    want, want_t = _through_the_op(layer, x, monkeypatch), _through_the_op(layer, xt, monkeypatch)
    planned(layer, x)
    other = expected(layer, x[:, 1:])
    plan_only(monkeypatch)
    with torch.no_grad():
        assert torch.equal(layer(x), want)
        assert torch.equal(layer(x[:, 1:]), other)  # another x: the plan's x is the call's
        assert torch.equal(layer(xt), want_t)
    assert not layer._eval_plan.stale


@needs_plan
def test_a_16_bit_x_over_a_float32_memory_uses_the_token():
    layer, x = make_layer(), tokens()
    layer.base_layer.bfloat16()
    xb = x.bfloat16()
    plan = planned(layer, xb)
    with torch.no_grad():
        assert torch.equal(layer(xb), expected(layer, xb))
        with pytest.raises(TypeError, match="dtype"):
            layer(x.double())  # not the token's dtype: the plan steps aside, the op's rules decide
    assert layer._eval_plan is plan and not plan.stale


def _swap_stage(layer):
    layer.set_stage("consolidation")
    layer.set_stage("inference")


@needs_plan
@pytest.mark.parametrize("change", [
    "stage", "weight_parameter", "weight_data", "bias_none", "base_layer", "slice_offsets", "scale", "eps",
    "separation", "keys_parameter", "bank_buffer", "bank_data", "query_module", "memory",
])
def test_the_plan_sees_every_attribute_the_forward_reads(change):
    layer, x = make_layer(), tokens()
    plan = planned(layer, x)
    g = torch.Generator().manual_seed(7)
    m, base = layer.memory, layer.base_layer
    with torch.no_grad():
        if change == "stage":
            layer.stage = "adaptation"  # plain assignment, not set_stage
        elif change == "weight_parameter":
            base.weight = nn.Parameter(torch.randn(3 * D, D, generator=g), requires_grad=False)
        elif change == "weight_data":
            base.weight.data = torch.randn(3 * D, D, generator=g)
        elif change == "bias_none":
            base.bias = None
        elif change == "base_layer":
            layer.base_layer = nn.Linear(D, 3 * D)
            layer.base_layer.requires_grad_(False)
        elif change == "slice_offsets":
            layer.slice_offsets = (D, 2 * D)
        elif change == "scale":
            m.config.scale = 0.5
        elif change == "eps":
            m.config.eps = 0.25
        elif change == "separation":
            m.config.separation = "relu"
        elif change == "keys_parameter":
            m.keys = nn.Parameter(torch.randn(N, D, generator=g), requires_grad=False)
        elif change == "bank_buffer":
            m.bank_a = torch.randn(N, 2, R, D, generator=g)
        elif change == "bank_data":
            m.bank_b.data = torch.randn(N, 2, D, R, generator=g)
        elif change == "query_module":
            m.query_module = nn.Linear(D, D)
        elif change == "memory":
            other = make_layer(seed=4).memory
            object.__setattr__(layer, "_memory", other)
        got = layer(x)
    if change == "stage":
        assert plan.stale and not gc.get_referents(plan)  # adaptation: never planned; the stale plan holds nothing
        return
    assert torch.equal(got, expected(layer, x))
    # Live arguments (the weight, an unmasked bank: their .data is read at the call) need no new
    # plan; everything else makes one.
    assert plan.stale != (change in ("weight_data", "bank_data"))


@needs_plan
def test_a_hook_added_after_planning_runs():
    layer, x = make_layer(), tokens()
    planned(layer, x)
    seen = []
    handle = layer.memory.query_module.register_forward_hook(lambda m, args, out: seen.append(1))
    with torch.no_grad():
        layer(x)
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda m, args: seen.append(2))
    try:
        with torch.no_grad():
            layer(x)
    finally:
        handle.remove()
    assert seen[0] == 1 and 2 in seen
    with torch.no_grad():
        assert torch.equal(layer(x), expected(layer, x))


@needs_plan
@pytest.mark.parametrize("where", ["forward_hook", "forward_pre_hook", "global_forward_hook", "forward_patched"])
def test_the_plan_never_skips_what_module_call_runs(where):
    # The plan runs before nn.Module.__call__: it must step aside for anything that call would run.
    layer, x = make_layer(), tokens()
    plan = planned(layer, x)
    seen = []
    handle = None
    if where == "forward_hook":
        handle = layer.register_forward_hook(lambda m, args, out: seen.append(1))
    elif where == "forward_pre_hook":
        handle = layer.register_forward_pre_hook(lambda m, args: seen.append(1))
    elif where == "global_forward_hook":
        handle = torch.nn.modules.module.register_module_forward_hook(lambda m, args, out: seen.append(1))
    else:
        real = layer.forward
        layer.forward = lambda x: seen.append(1) or real(x)
    try:
        with torch.no_grad():
            got = layer(x)
            layer(x)
    finally:
        if handle is not None:
            handle.remove()
    assert plan.stale and len(seen) >= 2
    assert torch.equal(got, expected(layer, x))


@needs_plan
def test_jit_trace_records_the_op():
    layer, x = make_layer(), tokens()
    layer.requires_grad_(False)
    layer.memory.requires_grad_(False)
    planned(layer, x)
    with torch.no_grad(), pytest.warns(FutureWarning):
        traced = torch.jit.trace(layer, x, check_trace=False)
    assert "mira::mira_linear" in [n.kind() for n in traced.graph.nodes()]


@needs_plan
@pytest.mark.filterwarnings("ignore:Converting a tensor to a Python boolean:torch.jit.TracerWarning")
def test_a_jit_trace_follows_the_keys_it_was_traced_from():
    # The trace took the cached normalised keys, which no graph produced, as constants: its own
    # check failed on a fresh layer, and a warm layer traced to a module that ignored later key changes.
    fresh, layer, x = make_layer(), make_layer(), tokens()
    for module in (fresh, fresh.memory, layer, layer.memory):
        module.requires_grad_(False)
    with torch.no_grad(), pytest.warns(FutureWarning):
        torch.jit.trace(fresh, x)  # the default check compares two traces
        planned(layer, x)
        traced = torch.jit.trace(layer, x, check_trace=False)
        layer.memory.keys.mul_(torch.linspace(-1, 2, layer.memory.keys.shape[1]))
        torch.testing.assert_close(traced(x), expected(layer, x))


@needs_plan
def test_the_plan_steps_aside_where_the_op_has_work(monkeypatch):
    layer, x = make_layer(), tokens()
    plan = planned(layer, x)
    with torch.no_grad():
        with _Recorder() as rec:
            layer(x)
        assert any("mira.mira_linear" in op for op in rec.ops)
        with mira_kernels.use_backend("reference"):
            torch.testing.assert_close(layer(x), expected(layer, x))
        with mira_kernels.check_finite(), pytest.raises(ValueError, match="inf|NaN|finite"):
            layer(torch.full_like(x, float("nan")))
        with pytest.raises(ValueError, match="x"):
            layer(x[..., :-1])  # a failed call changes nothing
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(x).dtype == torch.bfloat16
    # Grad on and a source requires grad: autograd records the op.
    layer.memory.keys.requires_grad_(True)
    layer(x).sum().backward()
    assert layer.memory.keys.grad is not None
    assert layer._eval_plan is plan and not plan.stale  # it stepped aside for those calls only
    # A variable of the op's routing set: no plan while it is (the environment is guarded).
    monkeypatch.setenv("MIRA_CHECK_FINITE", "1")
    with torch.no_grad(), pytest.raises(ValueError, match="inf|NaN|finite"):
        layer(torch.full_like(x, float("nan")))
    with torch.no_grad():
        layer(x)
    assert plan.stale and layer._eval_plan.stale
    monkeypatch.delenv("MIRA_CHECK_FINITE")
    planned(layer, x)
    want = expected(layer, x)
    plan_only(monkeypatch)
    with torch.no_grad():
        assert torch.equal(layer(x), want)


@needs_plan
def test_the_plan_holds_one_generation_and_dies_with_the_layer():
    layer, x = make_layer(), tokens()
    m = layer.memory
    plans = []
    for seed in range(10):
        m.keys.data = torch.randn(N, D, generator=torch.Generator().manual_seed(seed))
        plans.append(weakref.ref(planned(layer, x)))
    gc.collect()
    assert [p() for p in plans if p() is not None] == [layer._eval_plan]  # one plan alive, the current one
    held = [t for t in gc.get_referents(layer._eval_plan) if isinstance(t, torch.Tensor)]
    held += [t for r in gc.get_referents(layer._eval_plan) if isinstance(r, tuple) for t in r
             if isinstance(t, torch.Tensor)]
    with torch.no_grad():
        current = (*m.parameters(), *m.buffers(), *layer.parameters(), *m.retrieval_tensors())
    stale_storage = [t for t in held if t.untyped_storage().data_ptr() not in
                     {p.untyped_storage().data_ptr() for p in current}]
    assert not stale_storage  # no older storage kept alive
    ref = weakref.ref(layer)
    plan_ref = weakref.ref(layer._eval_plan)
    del layer, held, m, current
    gc.collect()
    assert ref() is None and plan_ref() is None  # the plan <-> module cycle is collected


@needs_plan
def test_copies_make_their_own_plan(tmp_path):
    import copy

    layer, x = make_layer(), tokens()
    planned(layer, x)
    clone = copy.deepcopy(layer)
    assert clone._eval_plan is None
    shallow = copy.copy(layer)
    assert shallow._eval_plan is None
    torch.save(layer, tmp_path / "layer.pt")
    loaded = torch.load(tmp_path / "layer.pt", weights_only=False)
    assert loaded._eval_plan is None
    with torch.no_grad():
        clone.memory.config.scale = 3.0  # the deep copy's own config
        assert torch.equal(clone(x), expected(clone, x))
        assert torch.equal(layer(x), expected(layer, x))
        assert torch.equal(loaded(x), expected(loaded, x))


@needs_plan
def test_compile_after_eager_calls_traces_the_layer():
    layer, x = make_layer(), tokens()
    planned(layer, x)
    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), expected(layer, x), rtol=1e-5, atol=1e-5)
        layer.memory.keys.mul_(-2.0)
        torch.testing.assert_close(compiled(x), expected(layer, x), rtol=1e-5, atol=1e-5)
    # In place (Module.compile): the compiled call replaces nn.Module's, which a plan must not skip.
    planned(layer, x)
    layer.compile(fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected(layer, x), rtol=1e-5, atol=1e-5)
    assert layer._compiled_call_impl is not None and layer._eval_plan.stale


@needs_plan
def test_a_plan_made_stale_during_its_own_call_finishes_that_call():
    # The query module's Python code runs inside the plan's call (query="linear"): if it changes
    # what the plan guards, the plan lets go of its objects while the call still uses them.
    layer, x = make_layer(query="linear"), tokens()
    plan = planned(layer, x)
    want = expected(layer, x)
    fired = []

    def hook(module, args, out):
        if not fired:
            fired.append(1)
            layer.memory.config.scale = 1.0 * layer.memory.config.scale  # a new float object: stale
            assert plan.check(x) is False and plan.stale
            gc.collect()
        return out

    handle = layer.memory.query_module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            assert torch.equal(layer(x), want)  # this call, with the objects it started with
            assert torch.equal(layer(x), want)  # the next: a fresh plan (the hook keeps the query module's path)
    finally:
        handle.remove()
    assert fired


@needs_plan
def test_hostile_inputs_through_the_plan(monkeypatch):
    layer, x = make_layer(), tokens()
    cases = {
        "expanded": x[:1].expand(3, -1, -1),
        "offset": torch.randn(2 * x.numel() + 5)[5:5 + x.numel()].view_as(x),
        "strided": torch.randn(3, 7, 2 * D)[..., ::2],
        "nan_inf": x.clone().index_fill_(2, torch.tensor([0]), float("nan")).index_fill_(2, torch.tensor([1]),
                                                                                          float("inf")),
    }
    want = {name: _through_the_op(layer, xi, monkeypatch) for name, xi in cases.items()}
    planned(layer, x)
    plan_only(monkeypatch)
    with torch.no_grad():
        for name, xi in cases.items():
            torch.testing.assert_close(layer(xi), want[name], rtol=0, atol=0, equal_nan=True, msg=name)
    assert not layer._eval_plan.stale
    monkeypatch.undo()
    with torch.no_grad():
        with pytest.raises((TypeError, AttributeError)):
            layer([[1.0] * D])  # not a tensor: the plan steps aside, the layer's own error (as without a plan)
        with pytest.raises(ValueError, match="per-image tokens"):
            layer(x[0])
    with pytest.raises(TypeError):
        layer._eval_plan(x, x)
    with pytest.raises(TypeError):
        layer._eval_plan.check()


@needs_plan
def test_a_plan_refuses_bad_construction():
    plan_type, absent = ops._EvalPlan, ops.PLAN_ABSENT
    fn, args = ops._cpu_eval_linear, (None,) * 11
    ok = dict(fn=fn, args=args, query_fn=None, guards=(), empty=(), unset=(), sources=(), x_dtypes=(), absent=absent)

    def make(**changes):
        return plan_type(*{**ok, **changes}.values())

    make()  # the baseline is valid
    with pytest.raises(TypeError):
        make(args=(None,) * 3)
    with pytest.raises(TypeError):
        make(fn=3)
    with pytest.raises(TypeError):
        make(guards=((1, "a", None),))  # not a dict
    with pytest.raises(TypeError):
        make(empty=([],))
    with pytest.raises(TypeError):
        make(unset=(3,))
    with pytest.raises(TypeError):
        make(sources=("not a tensor",))
    with pytest.raises(TypeError):
        make(x_dtypes=("float32",))
    with torch.inference_mode():
        t = torch.ones(2)
    with pytest.raises(ValueError):
        make(sources=(t,))  # no version counter
    with pytest.raises(TypeError):
        plan_type(fn, args)  # too few arguments
    with pytest.raises(TypeError):
        plan_type(*ok.values(), extra=1)
    plan = make()
    with pytest.raises(RuntimeError):
        plan.__init__(*ok.values())  # once
