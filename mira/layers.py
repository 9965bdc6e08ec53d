"""The MIRA projection: a frozen ``nn.Linear`` wrapped (not copied) with adapters on output slices.

PEFT-style wrapping: the original layer is kept as ``base_layer`` and never modified; the
wrapper adds the per-sample update of :func:`mira_kernels.mira_linear` on S output slices (Q
and V of a packed qkv by default). Every stage calls that one op, so every backend of
``mira_kernels`` serves the layer.

Stages (method section 3):

* ``adaptation``: the memory is bypassed; one plain LoRA per slice (``lora_a`` (S, r, d_in)
  kaiming-uniform, ``lora_b`` (S, d_s, r) zero, so the model equals the backbone at init) is
  trained. It runs through the op as a one-slot memory with softmax separation, whose weight
  is exactly 1.
* ``consolidation`` / ``inference``: the memory's adapters, mixed per sample by the
  association matrix, are applied; the live LoRA is ignored (write it into the memory first,
  :func:`mira.write_adapters`).

A projection can also hold a fixed update in its base weight (:mod:`mira.merge`: the live LoRA
merged, or a fixed mixture of the memory folded); it then runs the base layer alone, in every
stage, until the update is taken out again.

Eval calls on CPU are replayed: the first one makes a plan of the call (the fast path's arguments,
the derived keys, the query as a token index or the memory's ``make_query``), and the next ones run
it from C (``csrc/eval_plan.cpp``) before nn.Module's call machinery, after checking that every
object the forward and that machinery would read is unchanged (attributes, parameter, buffer and
hook dicts, config fields, the derived tensors' sources, the backend settings). Anything else (a
change, grad needed, autocast, a mode, another device, torch.compile) takes the forward below.

The query comes from the projection's own input. In a timm attention block that input is
the attention input (LN1's output); :func:`mira.attach` verifies this on a dry run for every
block it adapts, so no hook has to carry activations from one module to another (which would
keep state on modules across calls and complicate ``torch.compile`` and CUDA graphs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

import mira_kernels
from mira_kernels._validation import check_slice_offsets
from mira_kernels.ops import PLAN_ABSENT, eval_linear_cpu, eval_plan

from .config import STAGES
from .memory import AdapterMemory, _is_allocation_failure

__all__ = ["MiraProjection"]

# Whether Dynamo is tracing (it folds the call to True): the forward's first read. Not
# torch.compiler.is_compiling, which also covers non-strict export and TorchScript at two Python
# calls (~6 us with cold caches): there a plan steps aside by itself (fake tensors, dispatch modes).
_is_tracing = getattr(torch.compiler, "is_dynamo_compiling", torch.compiler.is_compiling)
# What nn.Module.__call__ reads to decide whether a call runs anything besides forward (its hook
# dicts, global and per module): a plan that skips that call checks them all still empty.
_MODULE_GLOBALS = torch.nn.modules.module
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")
_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


class MiraProjection(nn.Module):
    """A frozen linear projection plus MIRA adapters on output slices.

    Args:
        base_layer: the frozen ``nn.Linear`` (d_in -> d_out); its parameters are frozen here.
        memory: the block's :class:`AdapterMemory` (owned by the block, referenced here, so a
            state dict holds it once). ``.to()`` / ``.half()`` on the projection alone does not
            reach the memory: convert the module that owns both (as ``model.to`` does after attach).
        slice_offsets: S output offsets of the adapted slices (width ``memory.config.slice_width``).
        slice_names: optional names of the slices (``("q", "v")``), for display and PEFT import.
        stage: initial stage, one of ``adaptation``, ``consolidation``, ``inference``.

    Shapes: forward takes x (B, T, d_in) and returns (B, T, d_out).
    """

    _eval_plan = None  # the default where an instance has none (one unpickled from an older version)
    # How many times reset_lora drew a fresh LoRA: part of mira.distributed's layout, so that under
    # a DistributedModel the next call broadcasts rank 0's draw (each rank draws its own A).
    _lora_resets = 0

    def __init__(
        self,
        base_layer: nn.Linear,
        memory: AdapterMemory,
        slice_offsets: Sequence[int],
        *,
        slice_names: Sequence[str] | None = None,
        stage: str = "adaptation",
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"MiraProjection wraps an nn.Linear, got {type(base_layer).__name__}")
        if not isinstance(memory, AdapterMemory):
            raise TypeError(f"memory must be an AdapterMemory, got {type(memory).__name__}")
        c = memory.config
        if base_layer.in_features != c.d_in:
            raise ValueError(f"the memory expects inputs of width {c.d_in}, the layer has {base_layer.in_features}")
        offsets = check_slice_offsets(slice_offsets, c.slice_width, base_layer.out_features)
        if len(offsets) != c.num_slices:
            raise ValueError(f"got {len(offsets)} slice offsets for a memory of {c.num_slices} slices")
        if slice_names is not None and len(slice_names) != len(offsets):
            raise ValueError(f"slice_names {slice_names!r} do not match {len(offsets)} slices")
        self.base_layer = base_layer
        # Not registered as a child: the block owns the memory (one copy in the state dict).
        object.__setattr__(self, "_memory", memory)
        self.slice_offsets = offsets
        self.slice_names = tuple(slice_names) if slice_names is not None else None
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        try:
            self.lora_a = nn.Parameter(torch.empty(c.num_slices, c.rank, c.d_in, **factory))
            self.lora_b = nn.Parameter(torch.zeros(c.num_slices, c.slice_width, c.rank, **factory))
        except (RuntimeError, MemoryError) as err:
            if not _is_allocation_failure(err):
                raise
            raise MemoryError(f"MiraProjection: a rank-{c.rank} LoRA of {c.num_slices} x ({c.d_in} + {c.slice_width}) "
                              f"elements is more than this device can allocate ({err}); lower rank") from None
        base_layer.requires_grad_(False)  # the backbone is frozen: only once nothing above can fail
        self.stage = "adaptation"
        # A fixed update held in base_layer.weight (mira.merge / mira.fold), or None.
        self.merged_update = None
        # The prepared eval call (_plan_eval), or None; never copied or pickled (__getstate__).
        self._eval_plan = None
        self.set_stage(stage)
        self.reset_lora()

    # The wrapped layer's attributes, for code that inspects ``attn.qkv`` (timm, PEFT).
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def memory(self) -> AdapterMemory:
        return self._memory

    def get_base_layer(self) -> nn.Linear:
        return self.base_layer

    def set_stage(self, stage: str) -> None:
        """Choose the forward path (requires_grad is set by :func:`mira.set_stage`)."""
        self.check_stage(stage)
        self.stage = stage

    def check_stage(self, stage: str) -> None:
        """Raise if :meth:`set_stage` would refuse ``stage`` (an unknown stage, or a held update)."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
        if self.merged_update is not None and stage != self.stage:
            kind = self.merged_update.kind
            undo = "mira.unmerge" if kind == "merged" else "mira.unfold"
            raise RuntimeError(
                f"this projection holds a {kind} update in its weight and runs it in every stage; "
                f"take it out first ({undo}(model)) before switching to the {stage!r} stage"
            )

    @torch.no_grad()
    def reset_lora(self, generator: torch.Generator | None = None) -> None:
        """Fresh adapter: A kaiming-uniform (as ``nn.Linear`` initialises weights), B zero.

        Under :class:`mira.distributed.DistributedModel` the next call of the wrapper gives every rank
        rank 0's A (each rank draws from its own random state unless ``generator`` is seeded alike)."""
        self._set_lora(self._fresh_lora_a(generator))
        self._lora_resets += 1

    def _fresh_lora_a(self, generator: torch.Generator | None) -> torch.Tensor:
        """The A that :meth:`reset_lora` sets (the same draws), drawn without changing anything."""
        if self.lora_a.is_inference() and not torch.is_inference_mode_enabled():
            raise RuntimeError(f"the LoRA of {self.base_layer} was made under torch.inference_mode and cannot be "
                               "reset outside it (attach the model outside inference mode)")
        with torch.no_grad():
            fresh = torch.empty_like(self.lora_a)
            for a in fresh:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        return fresh

    @torch.no_grad()
    def _set_lora(self, lora_a: torch.Tensor) -> None:
        self.lora_a.copy_(lora_a)
        self.lora_b.zero_()

    def _drop_eval_plan(self) -> None:
        # The eval plan holds owning references to the base layer's weight and bias and to the memory's
        # tensors (csrc/eval_plan.cpp), and torch.utils.swap_tensors refuses a tensor referenced anywhere
        # else: under torch.__future__.set_swap_module_params_on_conversion(True), model.double(), .to(dtype)
        # and load_state_dict failed after one eval call. The next eval call makes the plan again.
        self.__dict__["_eval_plan"] = None

    def _apply(self, fn, recurse=True):
        self._drop_eval_plan()  # before the base layer's tensors are converted (swapped)
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        self._drop_eval_plan()  # before this module's and then its base layer's tensors load (swapped)
        # While merged or folded the base weight holds an update that merged_update describes: a
        # loaded weight (with it or without it, no one can tell) would leave that record wrong,
        # the forward running the bare base layer and unmerge subtracting the update again. The
        # base layer's entries are therefore not loaded (set to their current values here, before
        # the base layer's own loader runs), and the load fails with the reason.
        # The last line of defence: mira.merge / mira.fold register a pre-hook on the model they
        # were given and on each module down to this one and its base layer (mira.merge._guard_loads),
        # which refuses the whole call before anything loads. A load reaches here unrefused only
        # without those hooks (merged_update set by hand, a model pickled by an older version), after
        # the modules before this one have loaded, as torch's own load errors come.
        held = self.merged_update
        base_keys = [k for k in state_dict if k.startswith(prefix + "base_layer.")]
        if held is not None and base_keys:
            undo = "mira.unmerge" if held.kind == "merged" else "mira.unfold"
            error_msgs.append(f"{prefix[:-1] or 'the projection'} holds a {held.kind} update in its base weight; "
                              f"its base layer was not loaded: call {undo}(model) first")
            current = self._modules["base_layer"].state_dict(prefix=prefix + "base_layer.")
            for k in base_keys:
                if k in current:
                    state_dict[k] = current[k]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this first: TorchScript cannot type the memory or the op's routing, and
        # failed on internals ("failed to convert Python type 'AdapterMemory'"). Say what works instead.
        raise RuntimeError("MIRA layers cannot be compiled by TorchScript (torch.jit.script); export with "
                           "torch.export (mira.export.export_program / export_aoti / export_onnx) or trace with "
                           "torch.jit.trace")

    def __getstate__(self) -> dict:
        # A plan guards this very object's attributes: a copy makes its own.
        state = self.__dict__.copy()
        state["_eval_plan"] = None
        return state

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # Eval on CPU, after the first call: the call prepared by _plan_eval, which checks in C that
        # nothing it was made from has changed (csrc/eval_plan.cpp), else answers None. Before
        # nn.Module's call machinery, which it may skip: a plan is made only while this module has
        # no hooks, no global module hooks exist and neither forward nor the compiled call is
        # replaced, and it checks that this still holds. After a network's GEMMs, each Python frame
        # costs microseconds: the two of nn.Module.__call__ cost nn.Linear ~10 us per call (Zen 4).
        if not args and not kwargs and not _is_tracing():
            plan = self._eval_plan
            if plan is not None:
                y = plan(x)
                if y is not None:
                    return y
        # Looked up at the call, not bound at import: tools patch nn.Module.__call__ (torch.fx).
        return nn.Module.__call__(self, x, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy):  # else fx fails at the first branch below, naming no cure
            raise TypeError(
                "torch.fx cannot trace into MiraProjection (its forward branches on the stage and the input): "
                "make it a leaf module, e.g. create_feature_extractor(model, ..., tracer_kwargs={'leaf_modules': "
                "[mira.MiraProjection]}); timm's own feature extraction does so already"
            )
        if x.dim() != 3:
            raise ValueError(
                f"MiraProjection expects per-image tokens (B, T, d_in), got shape {tuple(x.shape)}; "
                "spatial or windowed layouts are not supported"
            )
        # The dicts, not attribute access: nn.Module.__getattr__ is a Python call, ~9 us per forward
        # with the interpreter's caches cold, as in a network (a 2-core Zen 3, benchmarks/budget.py).
        base = self._modules["base_layer"]
        if self.merged_update is not None:  # merged / folded: the update is in base.weight
            return base(x)
        if base._forward_pre_hooks or base._forward_hooks or "weight" not in base._parameters:
            # The base layer's own forward has work the fused op would skip (hooks: torch.nn.utils.prune
            # recomputes the weight in one; or no weight parameter at all: parametrize, or a quantized
            # layer, whose weight is a method returning packed integers): run it as it is, and add the
            # adapter on x, as PEFT's LoRA layers do. The op's GEMM is then over a zero weight of x's
            # dtype: correct, not fast.
            zero = x.new_zeros(()).expand(base.out_features, base.in_features)
            return base(x) + self._fused(x, zero, None)
        if type(base) is nn.Linear:  # there the dict is what the attributes return (a subclass may override them)
            params = base._parameters
            return self._fused(x, params["weight"], params["bias"], plan=True)
        return self._fused(x, base.weight, base.bias)

    def _fused(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: bool = False):
        """x weight^T + bias + the adapter, in one op; ``plan``: prepare the eval call on the CPU."""
        base = self._modules["base_layer"]
        c = self._memory.config
        if self.stage == "adaptation":
            # One slot, softmax over one score: weight exactly 1 for every sample (the key a tensor
            # of its own: ones[:1] has no row at batch 0).
            return mira_kernels.mira_linear(
                x, weight, bias, x.new_ones(x.shape[0], 1), x.new_ones(1, 1), self.lora_a.unsqueeze(0),
                self.lora_b.unsqueeze(0), slice_offsets=self.slice_offsets, separation="softmax", scale=c.scale,
                eps=c.eps,
            )
        memory = self._memory
        if not x.shape[1]:  # no token to make a query of: make_query's error (x[:, token] below was a bare IndexError)
            memory.make_query(x)
        keys, bank_a, bank_b = memory.retrieval_tensors()
        if keys.dtype == torch.float64 and bank_a.dtype != torch.float64:
            # 16-bit banks in a float64 model (model.double() keeps bank_dtype): the op computes in
            # float64 with float64 banks, and widening is exact. Per call, a copy: not planned.
            bank_a, bank_b, plan = bank_a.double(), bank_b.double(), False
        # Eval on CPU: the kernel without the dispatcher where it would add nothing, and the CLS
        # query taken from x in C++ (mira_kernels.ops.eval_linear_cpu; None when it cannot).
        token = memory.query_token(x)
        query = token if token is not None else memory.make_query(x)
        y = eval_linear_cpu(x, weight, bias, query, keys, bank_a, bank_b, self.slice_offsets, c.separation, c.scale,
                            c.eps)
        if y is not None:
            if plan:
                self._plan_eval(memory, base, weight, bias, token, keys, bank_a, bank_b)
            return y
        if token is not None:
            query = x[:, token]  # a view, no copy: the op widens a 16-bit query exactly in-kernel
        return mira_kernels.mira_linear(
            x, weight, bias, query, keys, bank_a, bank_b,
            slice_offsets=self.slice_offsets, separation=c.separation, scale=c.scale, eps=c.eps,
        )

    def _plan_eval(self, memory, base, weight, bias, token, keys, bank_a, bank_b) -> None:
        """Prepare the eval call just made (same arguments) for the next calls, unless one is prepared.

        The plan guards every object the forward above read to make the call: this module's
        attributes, the base layer and its parameters, the config fields, and the memory's part
        (:meth:`AdapterMemory._eval_plan_parts`: its tensors, mutation count and query).
        """
        mine = self.__dict__
        plan = mine.get("_eval_plan")
        if plan is not None and not plan.stale:
            return  # it stepped aside for this call only (a setting, x's dtype, grad mode)
        mine["_eval_plan"] = None
        hooks = [mine[name] for name in _MODULE_HOOKS] + [getattr(_MODULE_GLOBALS, name) for name in _GLOBAL_HOOKS]
        if any(hooks) or "forward" in mine or mine.get("_compiled_call_impl") is not None:
            return  # nn.Module.__call__ has work: no plan may skip it
        parts = memory._eval_plan_parts(token) if type(base) is nn.Linear else None
        if parts is None:
            return
        guards, empty, sources, x_dtypes, query_fn = parts
        empty = (*empty, *(base.__dict__[name] for name in ("_forward_hooks", "_forward_pre_hooks")))
        c = memory.config
        guards += [*((mine, name, mine[name]) for name in _MODULE_HOOKS),
                   *((vars(_MODULE_GLOBALS), name, getattr(_MODULE_GLOBALS, name)) for name in _GLOBAL_HOOKS),
                   (mine, "forward", PLAN_ABSENT),
                   (mine, "_compiled_call_impl", mine.get("_compiled_call_impl", PLAN_ABSENT)),
                   (mine, "stage", self.stage), (mine, "merged_update", None),
                   (mine, "slice_offsets", self.slice_offsets), (mine, "_memory", memory),
                   (self._modules, "base_layer", base),
                   (base._parameters, "weight", weight), (base._parameters, "bias", bias),
                   *((c.__dict__, f, c.__dict__.get(f, PLAN_ABSENT)) for f in ("separation", "scale", "eps"))]
        mine["_eval_plan"] = eval_plan(
            weight, bias, token, keys, bank_a, bank_b, self.slice_offsets, c.separation, c.scale, c.eps,
            query_fn=query_fn, guards=guards, empty=(*empty, *hooks), sources=sources, x_dtypes=x_dtypes,
        )
        memory._note_eval_plan(self)  # the memory's own conversions and loads drop the plan (_drop_eval_plan)

    def extra_repr(self) -> str:
        names = f"{self.slice_names}" if self.slice_names else f"offsets={self.slice_offsets}"
        c = self._memory.config
        held = f", {self.merged_update.kind}" if self.merged_update is not None else ""
        return f"slices={names}, width={c.slice_width}, rank={c.rank}, stage={self.stage}{held}"
