"""The associative adapter memory of one block.

In Hopfield terms (Millidge et al. 2022, ``z = P . sep(sim(K, q))``): the **stored patterns**
are the keys K (N, d_k), a trainable parameter, and their values P are flattened LoRA adapters,
held as two banks, ``bank_a`` (N, S, r, d_in) and ``bank_b`` (N, S, d_s, r), one factor pair
per adapted output slice. The **state pattern** is the query q (B, d_k), made by the query
module from the block's attention input. The **association matrix** is ``sep(cos(q, K))``
(B, N). The fused op (:func:`mira_kernels.mira_linear`) does the read-out; this module holds
the patterns, makes queries, and grows or shrinks.

Two storage modes:

* growing (``capacity=None``): N is the number of stored adapters; appending changes shapes.
  The ``keys`` Parameter object is kept across an append or remove (its ``.data`` is replaced)
  so an optimiser still refers to it, but per-parameter optimiser state (Adam moments) then has
  the old shape: call :meth:`AdapterMemory.forget_optimizer_state` (or build a new optimiser)
  after growing. The step fails loudly otherwise, naming the cure (:mod:`mira.optim_state`).
  A remove (or clear, select_tasks, load_memories) moves the slots whatever the shapes do: a step
  with moments from before it raises too, until ``forget_optimizer_state`` starts them afresh (for
  optimisers that have stepped in this process; state loaded into an optimiser must be loaded after
  the memory changes, or be dropped with ``forget_optimizer_state``).
* fixed capacity (``capacity=C``): C slots are pre-allocated with a boolean ``active`` mask.
  Stored adapters always occupy slots ``0 .. num_slots-1``. Empty slots have zero keys and zero
  values, so their cosine score is 0 and they add nothing (see ``mira.config`` for why softmax
  is refused). Appending writes in place: no shape changes, no recompilation, no CUDA-graph
  re-capture, and the optimiser state keeps its shape; :meth:`remove` compacts slots, so a step
  with moments from before it raises (:mod:`mira.optim_state`, optimisers that have stepped in this
  process) until ``forget_optimizer_state``. One difference in weights: with exactly one stored
  adapter, affine separation gives it weight 1 (z / z over the C slots the op sees) where a growing
  memory applies the one-slot rule (the raw cosine z); a write that leaves one adapter stored warns.
  From two on, the two memories compute the same model.

What the op sees (:meth:`AdapterMemory.retrieval_tensors`) is derived from the stored tensors:
empty slots masked, keys normalised per feature when ``key_norm="per_feature"``. Where no
autograd graph is needed (eval / inference: grad off, or no source requires grad) the derived
tensors are cached, keyed so that they cannot be stale (save for the writes of the last paragraph):
the identity, storage address, version counter, shape, strides, dtype and device of every source
tensor, the config fields they depend on and a counter that every mutation of the memory bumps.
A ``.data`` swap onto new storage (which does not bump the version counter) changes the storage
address, and the cache holds an alias of the storage it was computed from, so no later tensor can
reuse that address while the entry lives; in-place updates (an optimiser step, ``load_state_dict``,
``copy_`` under ``no_grad``) bump the version (torch's fused optimisers, ``fused=True``, do not bump
it themselves: a step hook of :mod:`mira.optim_state` does).
Not cached, so computed from the sources every time: under ``torch.compile`` (the graph computes
them), during CUDA-graph capture (the replay must recompute them) and whenever a graph is needed.
Cached tensors are never inference tensors (a call under ``torch.inference_mode`` derives them
outside it), so a later forward that records a graph, say for an input's gradient, can save them.
On a GPU the Triton backend runs on, the per-feature normalisation without an autograd graph is one
launch (``mira_kernels.triton.normalize_columns``: fp64 sums, one rounding, 16-bit keys too) instead
of ATen's three (~34 for 16-bit keys), so a captured forward replays one launch per block for it.
A projection's eval forward goes one step further (:class:`mira.layers.MiraProjection`, ``csrc/
eval_plan.cpp``): after its first eval call on CPU it replays that call from C, with these derived
tensors, while the same key holds and every attribute, parameter, buffer, config field and hook
dict the forward reads is the very object it was (:meth:`AdapterMemory._eval_plan_parts`).
One case no key can see, as autograd cannot either: a write to the stored tensors' storage through
another tensor, which has a version counter of its own. Writing *in place through* ``.data`` (for
example ``memory.keys.data.copy_(new)``) is one; a ``.data`` swap back onto storage the memory already
reads, written in place in between, is another: ``torch.nn.utils.vector_to_parameters(theta, params)``
from one vector ``theta`` that is updated in place between calls (an evolution-strategies loop) leaves
the address and the keys' version counter as they were. Write under ``torch.no_grad()`` on the tensor
itself, or call :meth:`AdapterMemory.invalidate_cache` after (the layers' eval plans then step aside too).
"""

from __future__ import annotations

import operator
import os
import sys
import warnings
import weakref
from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize

import mira_kernels
from mira_kernels import _extension
from mira_kernels.ops import PLAN_ABSENT
from mira_kernels.reference import NORM_EPS, normalize

from .config import MemoryConfig
from .optim_state import check_optimizer, note_moved, note_resized, watch
from .query import IdentityQuery, build_query_module, pool_tokens

__all__ = ["AdapterMemory"]

# Where nn.Module keeps the hooks registered on every module (a skipped query-module call must have none).
_MODULE_GLOBALS = torch.nn.modules.module
# memory -> the projections whose eval plans hold its tensors (AdapterMemory._drop_eval_plans), both weakly.
# Not an attribute of the memory: a WeakSet cannot be pickled or copied with it.
_plan_holders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class AdapterMemory(nn.Module):
    """Keys (Parameter), adapter banks (buffers, or Parameters for the trainable-bank ablation)
    and the query module of one block.

    Args:
        config: the resolved :class:`~mira.config.MemoryConfig`.
        device, dtype: factory arguments of every tensor (timm style).

    Attributes:
        keys: (C or N, d_k) stored patterns.
        bank_a: (C or N, S, r, d_in) stored A factors.
        bank_b: (C or N, S, d_s, r) stored B factors.
        active: (C,) bool mask of used slots in fixed-capacity mode, else None.
        query_module: (B, d_in) -> (B, d_k).
    """

    def __init__(self, config: MemoryConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(config, MemoryConfig):
            raise TypeError(f"config must be a MemoryConfig, got {type(config).__name__}")
        watch()  # optimiser steps are recorded from now on (mira.optim_state): a later move of slots sees them
        self.config = config
        factory = {"device": device, "dtype": dtype}
        n = config.capacity or 0
        c = config
        try:
            self.keys = nn.Parameter(torch.zeros(n, c.d_k, **factory))
            bank_factory = {"device": device, "dtype": self._bank_dtype_for(self.keys.dtype)}
            bank_a = torch.zeros(n, c.num_slices, c.rank, c.d_in, **bank_factory)
            bank_b = torch.zeros(n, c.num_slices, c.slice_width, c.rank, **bank_factory)
        except (RuntimeError, MemoryError) as err:
            if not _is_allocation_failure(err):
                raise
            # The allocator's message names neither the option nor what the memory holds.
            raise MemoryError(f"AdapterMemory: cannot allocate its keys ({n}, {c.d_k}) and banks ({n}, "
                              f"{c.num_slices}, {c.rank}, {c.d_in}) / ({n}, {c.num_slices}, {c.slice_width}, {c.rank}) "
                              f"(capacity={c.capacity}, rank={c.rank}, key_dim={c.d_k}): {err}; lower capacity, rank "
                              "or key_dim") from None
        if c.trainable_bank:
            self.bank_a = nn.Parameter(bank_a)
            self.bank_b = nn.Parameter(bank_b)
        else:
            self.register_buffer("bank_a", bank_a)
            self.register_buffer("bank_b", bank_b)
        if c.capacity is not None:
            self.register_buffer("active", torch.zeros(n, dtype=torch.bool, device=device))
        else:
            self.active = None
        self.query_module = build_query_module(c.query, c.d_in, c.d_k, c.query_hidden, **factory)
        # A module-level hook given its module (weakly): a bound method of the memory would make a
        # cycle (memory -> query module -> hook -> memory), which kept a deleted model's tensors alive
        # until the next full garbage collection.
        self.query_module._register_load_state_dict_pre_hook(_query_state_pre_hook, with_module=True)
        self._mutations = 0  # bumped by every mutation of the memory: part of the cache's key
        self._retrieval_cache: tuple | None = None  # (key, sources' aliases, derived tensors)
        # One name (a task) or None per stored slot. Saved by mira.save_memories / save_model; a
        # state dict carries no names, so loading one leaves its slots unnamed.
        self._slot_names: list[str | None] = []

    def __setstate__(self, state) -> None:
        # An unpickled memory (torch.load, copy.deepcopy) is made without __init__: register the step
        # hooks here too, or a process that only loads a model never sees a fused step (mira.optim_state).
        super().__setstate__(state)
        watch()

    # ------------------------------------------------------------------------------------------
    # Sizes and inspection.
    # ------------------------------------------------------------------------------------------

    @property
    def num_slots(self) -> int:
        """Number of stored adapters (reads the mask in fixed-capacity mode: a device sync)."""
        if self.active is None:
            return self.keys.shape[0]
        return int(self.active.sum())

    @property
    def capacity(self) -> int | None:
        return self.config.capacity

    @property
    def stored_keys(self) -> torch.Tensor:
        """(num_slots, d_k) keys of the stored adapters (a view, raw: not normalised)."""
        return self.keys[: self.num_slots]

    @property
    def stored_adapters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(num_slots, S, r, d_in) and (num_slots, S, d_s, r) views of the stored values."""
        n = self.num_slots
        return self.bank_a[:n], self.bank_b[:n]

    @property
    def slot_names(self) -> tuple[str | None, ...]:
        """The name (task) of each stored slot, None where unnamed; slot order."""
        return tuple(self._slot_names)

    def slots_named(self, name: str) -> list[int]:
        """Indices of the slots named ``name`` (several when a task stored several adapters)."""
        return [i for i, n in enumerate(self._slot_names) if n == name]

    def _names_of(self, names, n: int) -> list[str | None]:
        """``n`` checked slot names from None, one str (every slot) or a sequence of n (str or None)."""
        if names is None or isinstance(names, str):
            names = [names] * n
        if not isinstance(names, (list, tuple)):  # (bytes would become a list of ints)
            raise TypeError(f"slot names (task) must be None, a str or a list of them, got {type(names).__name__} "
                            f"{names!r}")
        names = list(names)
        if len(names) != n:
            raise ValueError(f"got {len(names)} slot names for {n} adapters")
        for name in names:
            if name is not None and (not isinstance(name, str) or not name):
                raise TypeError(f"a slot name (task) must be a non-empty str or None, got {name!r}")
        return names

    def make_query(self, tokens: torch.Tensor) -> torch.Tensor:
        """State pattern of each sample: (B, T, d_in) attention input -> (B, d_k).

        Computed in the memory's dtype, with autocast off: the affine separation divides by a sum
        of cosines that can be small, so a 16-bit query error would be amplified into the weights
        (the op likewise keeps scores and mixing in float32 for 16-bit x). The query is (B, d_k),
        so this costs nothing next to the projection.
        """
        # Checked here, not only in get_association_matrix: a (B, d) batch came back as each sample's
        # first feature, (B, 1), a wrong width or integers as a tensor that is no query, without a word.
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"make_query: tokens must be a (B, T, {self.config.d_in}) Tensor, got "
                            f"{type(tokens).__name__}")
        if tokens.dim() != 3 or tokens.shape[-1] != self.config.d_in or not tokens.is_floating_point():
            raise ValueError(f"make_query: tokens must be a floating (B, T, {self.config.d_in}) attention input, "
                             f"got {tuple(tokens.shape)} {tokens.dtype}")
        pooled = pool_tokens(tokens, self.config.query_token, self.config.num_prefix_tokens).to(self.keys.dtype)
        device_type = pooled.device.type
        if torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return self.query_module(pooled)
        return self.query_module(pooled)

    def query_token(self, tokens: torch.Tensor) -> int | None:
        """The index i for which :meth:`make_query` of ``tokens`` is exactly ``tokens[:, i]``, else None.

        That is the paper's query (identity query module, CLS token), which the layer takes from x
        itself (the strided view, or the token index for :func:`mira_kernels.ops.eval_linear_cpu`).
        x may be 16-bit over a float32 memory: widening bf16/fp16 to float32 is exact and the op
        accepts a query in x's 16-bit dtype and widens it in-kernel, so the result is bit for bit
        the float32 query's, without a cast launch per block on GPU (issue 17).
        """
        qm = self._modules["query_module"]
        if (
            type(qm) is IdentityQuery
            and self.config.query_token == "cls"
            and not (qm._forward_hooks or qm._forward_pre_hooks or _MODULE_GLOBALS._global_forward_hooks
                     or _MODULE_GLOBALS._global_forward_pre_hooks)
            and tokens.dtype in _token_query_dtypes(self._parameters["keys"].dtype)
        ):
            return 0
        return None

    def _eval_plan_parts(self, token: int | None) -> tuple | None:
        """The memory's part of a projection's eval plan (:func:`mira_kernels.ops.eval_plan`), or None.

        ``token``: :meth:`query_token`'s answer for the call being planned. Returns ``(guards,
        empty, sources, x_dtypes, query_fn)``: every object :meth:`retrieval_tensors` and (with a
        token) :meth:`query_token` read, to be found unchanged on each call, the sources of the
        derived tensors, and the query: the token (x's dtype in ``x_dtypes``) or ``query_fn(x)``.
        None where :meth:`retrieval_tensors` may not cache (module docstring): then nothing may
        be planned either.
        """
        params, buffers, c = self._parameters, self._buffers, self.config
        keys, active = params["keys"], buffers.get("active")
        bank_a = params["bank_a"] if "bank_a" in params else buffers["bank_a"]
        bank_b = params["bank_b"] if "bank_b" in params else buffers["bank_b"]
        sources = (keys, bank_a, bank_b, active) if active is not None and c.trainable_bank else (keys, active)
        if (_native_stamp is None or _is_compiling() or _is_jit_tracing()
                or not _native_stamp(self._mutations, *sources)):
            return None
        absent = PLAN_ABSENT
        fields = c.__dict__
        guards = [(self.__dict__, "config", c), (self.__dict__, "_mutations", self._mutations),
                  *((fields, f, fields[f]) for f in ("key_norm", "trainable_bank", "query_token")),
                  *((d, name, d.get(name, absent)) for d in (params, buffers)
                    for name in ("keys", "bank_a", "bank_b", "active"))]
        empty: tuple = ()
        x_dtypes: tuple = ()
        query_fn = self.make_query
        if token is not None:  # the reads of query_token
            qm = self._modules["query_module"]
            hooks = (qm._forward_hooks, qm._forward_pre_hooks, _MODULE_GLOBALS._global_forward_hooks,
                     _MODULE_GLOBALS._global_forward_pre_hooks)
            guards += [(self._modules, "query_module", qm),
                       (qm.__dict__, "_forward_hooks", hooks[0]), (qm.__dict__, "_forward_pre_hooks", hooks[1]),
                       (vars(_MODULE_GLOBALS), "_global_forward_hooks", hooks[2]),
                       (vars(_MODULE_GLOBALS), "_global_forward_pre_hooks", hooks[3])]
            empty, x_dtypes, query_fn = hooks, _token_query_dtypes(keys.dtype), None
        return guards, empty, tuple(t for t in sources if t is not None), x_dtypes, query_fn

    def retrieval_keys(self) -> torch.Tensor:
        """The (C or N, d_k) keys the op sees: empty slots zeroed, per-feature normalised if asked.

        The op applies the per-key L2 normalisation of the cosine itself. The per-feature step is
        computed in one place (``_derive``) and cached by :meth:`retrieval_tensors`.
        """
        return self.retrieval_tensors()[0]

    def retrieval_banks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The banks the op sees. Only a trainable bank of fixed capacity needs masking: with
        sigmoid separation an empty slot has weight 0.5 and would otherwise get a gradient."""
        return self.retrieval_tensors()[1:]

    def retrieval_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, bank_a, bank_b) as the op sees them; cached where no graph is needed (module doc)."""
        params, buffers = self._parameters, self._buffers
        # The hit path first, touching as little as it can: after a network's GEMMs every object
        # read costs cache misses: 31.4 -> 23.7 us per call, -7.7 [-8.1, -7.3] (cold caches, 2-core
        # Zen 3, interleaved in one process). Its key is the one built below: with the banks
        # unmasked the sources are (keys, active).
        entry = self._retrieval_cache
        if entry is not None and _native_stamp is not None and not (_is_compiling() or _is_jit_tracing()):
            c = self.config
            active = buffers.get("active")
            if active is None or not c.trainable_bank:
                stamp = _native_stamp(self._mutations, params["keys"], active)
                if stamp and entry[0] == (stamp, c.key_norm, False):
                    # Unmasked banks are not sources: the current ones (a buffer may have been replaced).
                    try:
                        return (entry[2][0], params["bank_a"] if "bank_a" in params else buffers["bank_a"],
                                params["bank_b"] if "bank_b" in params else buffers["bank_b"])
                    except KeyError:
                        self._refuse_parametrized()
                        raise
        if "parametrizations" in self._modules:  # torch.nn.utils.parametrize moved a tensor out of the dicts
            self._refuse_parametrized()
        keys = params["keys"]
        bank_a = params["bank_a"] if "bank_a" in params else buffers["bank_a"]
        bank_b = params["bank_b"] if "bank_b" in params else buffers["bank_b"]
        active = buffers.get("active")
        c = self.config
        mask_banks = active is not None and c.trainable_bank
        if active is None and c.key_norm != "per_feature":
            return keys, bank_a, bank_b  # nothing derived
        sources = (keys, bank_a, bank_b, active) if mask_banks else (keys, active)
        # The CPU hit path inlined (no _cache_stamp frame): after a network's GEMMs each Python
        # frame entered costs microseconds of cold caches (benchmarks/budget.py, "key prep").
        stamp = None
        if _native_stamp is not None and not (_is_compiling() or _is_jit_tracing()):
            stamp = _native_stamp(self._mutations, *sources)
        if stamp is None:  # not plain CPU tensors (or compiling): the general key
            stamp = _cache_stamp(self._mutations, sources)
        if not stamp:  # False or None: not cacheable
            return self._derive(keys, bank_a, bank_b, active)
        key = (stamp, c.key_norm, mask_banks)
        entry = self._retrieval_cache
        if entry is not None and entry[0] == key:
            return entry[2] if mask_banks else (entry[2][0], bank_a, bank_b)
        # Never inference tensors, which autograd refuses to save: a later forward that records a
        # graph (an input that requires grad, the memory frozen) takes them from the cache. No graph
        # is needed here (the key says so), and ordinary tensors serve inference mode the same.
        with torch.inference_mode(False), torch.no_grad():
            derived = self._derive(keys, bank_a, bank_b, active)
        # The aliases keep the sources' storage alive, so no other tensor can take its address.
        self._retrieval_cache = (key, tuple(t.detach() for t in sources if t is not None), derived)
        return derived

    def _refuse_parametrized(self) -> None:
        """Raise a TypeError naming the memory tensor that is parametrized (torch.nn.utils.parametrize), if
        one is: the forward, its cache and the eval plans read the stored tensors themselves, from the
        module's parameter and buffer dicts, where a parametrized tensor no longer is (an internal
        KeyError before; read through the parametrization, the cache and the plans could not see a change
        of what it computes from)."""
        for name in ("keys", "bank_a", "bank_b", "active"):
            if parametrize.is_parametrized(self, name):
                raise TypeError(
                    f"AdapterMemory.{name} is parametrized (torch.nn.utils.parametrize), which a memory's tensors "
                    "cannot be: the op reads the stored tensors themselves. Store the values the parametrization "
                    f"computes instead: torch.nn.utils.parametrize.remove_parametrizations(memory, {name!r}) keeps "
                    "them (leave_parametrized=True), or transform the adapters before storing them (append, "
                    "mira.write_adapters)"
                )

    def _derive(self, keys, bank_a, bank_b, active) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Empty slots are masked with where, not a product: the op's gradient of a zero key is
        # g / eps (eps = 1e-12), inf in float16, and inf * 0 is NaN, which the per-feature norm's
        # backward then spreads to every stored key. where drops the masked rows' gradient instead.
        empty = None if active is None else ~active.unsqueeze(1)
        if empty is not None:
            keys = keys.masked_fill(empty, 0)
            if self.config.trainable_bank:
                mask = active.to(bank_a.dtype).view(-1, 1, 1, 1)
                bank_a, bank_b = bank_a * mask, bank_b * mask
        if self.config.key_norm == "per_feature":
            # Each feature (column) to unit L2 norm across the stored keys; zero rows stay zero.
            if keys.requires_grad and torch.is_grad_enabled():
                keys = _without_rounding_gradient_of_one_key(keys, _unit_columns(keys), active)
                if empty is not None:  # (zeros already: this only cuts the empty rows' gradient)
                    keys = keys.masked_fill(empty, 0)
            else:
                keys = _per_feature_unit(keys)
        return keys, bank_a, bank_b

    def _note_eval_plan(self, projection) -> None:
        """Record that ``projection``'s eval plan holds this memory's tensors (MiraProjection._plan_eval)."""
        _plan_holders.setdefault(self, weakref.WeakSet()).add(projection)

    def _drop_eval_plans(self) -> None:
        """Drop the eval plans that hold this memory's tensors (and the cache), before they are converted or
        loaded: torch.utils.swap_tensors (under torch.__future__.set_swap_module_params_on_conversion(True))
        refuses a tensor that anything else references, and each plan holds owning references to the banks.
        A projection converted with the memory drops its own plan first; this serves the memory converted or
        loaded alone. The next eval call makes the plans again."""
        self._retrieval_cache = None
        for projection in _plan_holders.pop(self, ()):
            projection._drop_eval_plan()

    def invalidate_cache(self) -> None:
        """Drop the cached retrieval tensors (needed only after a write no key sees, module docstring: in
        place through ``.data``, or a ``.data`` swap back onto storage written in place since)."""
        self._mutations += 1
        self._retrieval_cache = None

    def get_association_matrix(
        self, query: torch.Tensor | None = None, *, tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-sample mixing weights over the stored adapters, sep(cos(q, K)).

        Args:
            query: (B, d_k) state patterns, or
            tokens: (B, T, d_in) attention input of the block, from which the query is made.

        Returns:
            (B, num_slots), differentiable; exactly the weights the forward pass uses.
        """
        if (query is None) == (tokens is None):
            raise ValueError("pass exactly one of query (B, d_k) or tokens (B, T, d_in)")
        if query is None:
            if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3 or tokens.shape[-1] != self.config.d_in:
                shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
                raise ValueError(f"tokens must have shape (B, T, {self.config.d_in}), got {shape}")
            query = self.make_query(tokens)
        elif not isinstance(query, torch.Tensor):
            raise TypeError(f"query must be a (B, {self.config.d_k}) Tensor, got {type(query).__name__}")
        if query.dim() != 2 or query.shape[1] != self.config.d_k:
            raise ValueError(f"query must have shape (B, {self.config.d_k}), got {tuple(query.shape)}")
        weights = mira_kernels.retrieval_weights(
            query, self.retrieval_keys(), separation=self.config.separation, eps=self.config.eps
        )
        return weights[:, : self.num_slots]

    # ------------------------------------------------------------------------------------------
    # Growing and shrinking.
    # ------------------------------------------------------------------------------------------

    def _factory(self) -> dict:
        return {"device": self.keys.device, "dtype": self.keys.dtype}

    def _bank_dtype_for(self, dtype: torch.dtype) -> torch.dtype:
        """The banks' storage dtype in a memory whose other tensors have ``dtype`` (config.bank_dtype)."""
        # In a float64 memory the banks keep bank_dtype too: the layer widens them for the op, exactly.
        name = self.config.bank_dtype
        return dtype if name is None else getattr(torch, name)

    def _bank_factory(self) -> dict:
        return {"device": self.keys.device, "dtype": self._bank_dtype_for(self.keys.dtype)}

    def _as_bank(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """``t`` (already checked, detached) in the banks' storage dtype; refuses entries it cannot hold.

        Rounding into 16-bit storage moves each entry by at most 2^-8 (bfloat16) / 2^-11 (float16)
        of itself (contract section 4); float16 cannot hold |entries| above 65504, which would become
        inf (a value created from finite ones), so those are refused, as NaN or inf entries are not.
        """
        stored = t.to(**self._bank_factory())
        if stored.dtype != t.dtype and stored.dtype.itemsize < t.dtype.itemsize:
            if not bool(torch.isfinite(stored).all()) and bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} holds entries beyond {stored.dtype}'s range "
                                 f"(|x| <= {torch.finfo(stored.dtype).max:g}), this memory's bank_dtype; use "
                                 "bank_dtype=torch.bfloat16 (float32's range) or float32")
        return stored

    def _apply(self, fn, recurse=True):
        # model.to(dtype) / .half() / .float() cast every floating tensor; a memory with a chosen
        # bank_dtype keeps its banks in it (moving devices as asked): with 16-bit banks a model-wide
        # cast would otherwise double the bank bytes (.float()) or round them again (.half() of bf16).
        # Trainable banks are parameters: the same rule, keeping the Parameter objects (an optimiser
        # holds them) and their gradients, as nn.Module moves parameters.
        self._drop_eval_plans()
        if self.config.bank_dtype is None:
            return super()._apply(fn, recurse)
        # Held out as None entries, which nn.Module._apply skips: each keeps its place in its dict
        # (state_dict and named_parameters keep their order).
        banks = {}
        for table in (self._buffers, self._parameters):
            for name in ("bank_a", "bank_b"):
                if table.get(name) is not None:
                    banks[name] = (table, table[name])
                    table[name] = None
        try:
            out = super()._apply(fn, recurse)
        finally:
            device = self._parameters["keys"].device
            for name, (table, bank) in banks.items():
                if table is self._buffers:
                    table[name] = bank.to(device=device)
                    continue
                with torch.no_grad():
                    bank.data = bank.data.to(device=device)
                    if bank.grad is not None:
                        bank.grad = bank.grad.to(device=device)
                table[name] = bank
        self._retrieval_cache = None
        return out

    def _as_batch(self, name: str, t: torch.Tensor, tail: tuple[int, ...]) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        if t.dim() == len(tail):
            t = t.unsqueeze(0)
        layout = "(n, " + ", ".join(map(str, tail)) + ")"
        if t.dim() != len(tail) + 1 or tuple(t.shape[1:]) != tail:
            raise ValueError(f"{name} must have shape {layout} (S, r, d_in / S, d_s, r of this memory), "
                             f"got {tuple(t.shape)}")
        _refuse_unstorable(name, t)
        return self._as_bank(name, t.detach())

    def _new_keys(self, keys, n: int, generator: torch.Generator | None) -> torch.Tensor:
        d_k = self.config.d_k
        if keys is None:
            # Drawn on the CPU so a seeded generator gives the same keys on every device.
            if self.config.key_init == "uniform":  # the authors' code: U(-1, 1)
                drawn = torch.rand(n, d_k, generator=generator).mul_(2.0).sub_(1.0)
            else:  # the paper's text: Gaussian
                drawn = torch.randn(n, d_k, generator=generator)
            return drawn.to(**self._factory())
        if not isinstance(keys, torch.Tensor):
            raise TypeError(f"keys must be a Tensor of shape ({n}, {d_k}) or None, got {type(keys).__name__}")
        if keys.dim() == 1:
            keys = keys.unsqueeze(0)
        if keys.dim() != 2 or keys.shape[1] != d_k:
            raise ValueError(f"key width mismatch: this memory's keys have d_k = {d_k}, got keys of shape "
                             f"{tuple(keys.shape)}")
        if keys.shape[0] != n:
            raise ValueError(f"got {keys.shape[0]} keys for {n} adapters")
        _refuse_unstorable("keys", keys)
        zero = [] if keys.is_meta else zero_key_rows(keys)
        if zero:
            raise ValueError(f"keys {zero} are all zeros; a key needs a direction (cosine retrieval)")
        return keys.detach().to(**self._factory())

    def _set_storage(self, keys: torch.Tensor, bank_a: torch.Tensor, bank_b: torch.Tensor) -> None:
        # Growing mode: keep the Parameter objects (an optimiser refers to them), swap their data.
        # The new data is made the kind of tensor the parameters are. Parameters made under
        # torch.inference_mode are inference tensors, and ordinary data swapped into one makes a
        # tensor that says it is ordinary but has no version counter (reading it raises). Any other
        # parameter gets ordinary data even from a change made under inference_mode: inference data
        # would refuse the next stage's requires_grad_ and autograd.
        inference = self.keys.is_inference()
        if any(t.is_inference() != inference for t in (keys, bank_a, bank_b)):
            with torch.inference_mode(inference):
                keys, bank_a, bank_b = (t if t.is_inference() == inference else t.clone()
                                        for t in (keys, bank_a, bank_b))
        self.invalidate_cache()
        if keys.shape != self.keys.shape:
            note_resized(self.keys, self.bank_a, self.bank_b)  # optimiser state of the old shape: a clear error
        self.keys.data = keys
        self.keys.grad = None
        # The banks' objects are kept too, buffers as well as parameters: whatever holds the memory's
        # tensors (an exported program, torch.export's .module()) then reads keys and banks that agree.
        # Rebinding the buffers (as until 2026-12-08) left such a holder with the new keys and the old
        # banks: a change that kept the slot count (remove + write, load_memories) gave a program that
        # ran and answered wrong by about the logits' size (found by probing).
        self.bank_a.data, self.bank_b.data = bank_a, bank_b
        self.bank_a.grad = self.bank_b.grad = None

    @torch.no_grad()
    def append(
        self,
        bank_a: torch.Tensor,
        bank_b: torch.Tensor,
        keys: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        names: str | Sequence[str | None] | None = None,
    ) -> list[int]:
        """Store adapters (values) with their keys.

        Args:
            bank_a: (n, S, r, d_in) or (S, r, d_in) A factors.
            bank_b: (n, S, d_s, r) or (S, d_s, r) B factors.
            keys: (n, d_k) or (d_k,) keys; None draws them from ``generator`` as the config's
                ``key_init`` says (U(-1, 1) by default).
            names: the new slots' name (task): one str for all, a sequence of n, or None.

        Returns:
            The slot indices of the new adapters.

        Refused, with the memory unchanged: tensors that are not real floating point, NaN or inf
        entries, entries a 16-bit ``bank_dtype`` cannot hold, and all-zero keys (no direction to
        retrieve by; the op's gradient of a zero key is g / eps).
        """
        return self._commit_append(*self._prepare_append(bank_a, bank_b, keys, generator=generator, names=names))

    # Mutations come in two steps so that a call touching several memories (write_adapters,
    # import_peft, load_memories) can check every memory before it changes any: _prepare_*
    # checks and converts and changes nothing; _commit_* / _replace_contents cannot fail.

    def _prepare_append(self, bank_a, bank_b, keys=None, *, generator: torch.Generator | None = None, names=None):
        """Checked, converted (bank_a, bank_b, keys, names) of an append; raises without changing anything."""
        c = self.config
        bank_a = self._as_batch("bank_a", bank_a, (c.num_slices, c.rank, c.d_in))
        bank_b = self._as_batch("bank_b", bank_b, (c.num_slices, c.slice_width, c.rank))
        n = bank_a.shape[0]
        if bank_b.shape[0] != n:
            raise ValueError(f"bank_a holds {n} adapters but bank_b holds {bank_b.shape[0]}")
        names = self._names_of(names, n)
        new_keys = self._new_keys(keys, n, generator)
        start = self.num_slots
        if self.active is not None and start + n > c.capacity:
            raise RuntimeError(
                f"memory full: {start} of {c.capacity} slots used, cannot append {n}; "
                "remove slots or attach with a larger capacity"
            )
        return bank_a, bank_b, new_keys, names

    @torch.no_grad()
    def _commit_append(self, bank_a: torch.Tensor, bank_b: torch.Tensor, keys: torch.Tensor,
                       names: Sequence[str | None] | None = None) -> list[int]:
        start, n = self.num_slots, bank_a.shape[0]
        self._slot_names.extend(names if names is not None else [None] * n)
        if self.active is None:
            self._set_storage(
                torch.cat([self.keys.data, keys]),
                torch.cat([self.bank_a.data, bank_a]),
                torch.cat([self.bank_b.data, bank_b]),
            )
        else:
            self.invalidate_cache()
            idx = slice(start, start + n)
            self.keys.data[idx] = keys
            self.bank_a.data[idx] = bank_a
            self.bank_b.data[idx] = bank_b
            self.active[idx] = True
            self._note_one_stored(start + n)
        return list(range(start, start + n))

    def _note_one_stored(self, stored: int) -> None:
        """Warn where a fixed capacity changes the weights a growing memory would give: with one stored
        adapter, affine separation over the op's C slots (the others empty, cosine 0) weights it z / z = 1,
        where a growing memory (N = 1 at the op) takes the one-slot rule, the raw cosine z (contract
        section 3). The op has no count of stored slots, and the forward cannot read one without a
        device sync (nor could a CUDA graph or an exported program follow it), so this is warned at the
        writes, which count on the host. From two stored adapters on, both memories agree exactly."""
        if stored == 1 and self.active is not None and self.config.separation == "affine":
            warnings.warn(
                "a fixed-capacity memory holding one adapter weights it 1 under affine separation (z / z over its "
                f"{self.config.capacity} slots), where a growing memory (capacity=None) weights it by its raw cosine "
                "(the one-slot rule): the two compute different models until a second adapter is stored",
                stacklevel=_stacklevel_outside_mira())

    @torch.no_grad()
    def _replace_contents(self, keys: torch.Tensor, bank_a: torch.Tensor, bank_b: torch.Tensor,
                          names: Sequence[str | None] | None = None) -> None:
        """Hold exactly these (n, ...) adapters, already checked and converted (see _prepare_append)."""
        self._slot_names = list(names) if names is not None else [None] * keys.shape[0]
        self._hold(keys.clone(), bank_a.clone(), bank_b.clone())

    def _hold(self, keys: torch.Tensor, bank_a: torch.Tensor, bank_b: torch.Tensor) -> None:
        """The slots' new contents, (n, ...) tensors this memory may keep: a growing memory takes them as
        its storage; a fixed-capacity one copies them into its first n slots, zeroes the rest and drops
        the gradients (their rows belong to what sat there before: a step would move each slot by the
        gradient of another; a growing memory's new storage has none)."""
        note_moved(self.keys, self.bank_a, self.bank_b)  # an optimiser's moments of them belong elsewhere now
        if self.active is None:
            self._set_storage(keys, bank_a, bank_b)
            return
        n = keys.shape[0]
        self.invalidate_cache()
        for t, new in ((self.keys.data, keys), (self.bank_a.data, bank_a), (self.bank_b.data, bank_b)):
            t[:n] = new
            t[n:].zero_()
        self.keys.grad = None
        if isinstance(self.bank_a, nn.Parameter):
            self.bank_a.grad = self.bank_b.grad = None
        self.active.zero_()
        self.active[:n] = True
        self._note_one_stored(n)

    @torch.no_grad()
    def remove(self, indices: int | str | Iterable[int | str]) -> None:
        """Delete stored adapters, by index, by name (every slot of that task) or by a boolean mask
        (a bool tensor of one entry per slot); later slots move down (indices shift like a list's)."""
        drop = self._slot_indices(indices)
        if not drop:  # nothing to remove: keep the storage and the gradients as they are
            return
        n = self.num_slots
        self._slot_names = [name for i, name in enumerate(self._slot_names) if i not in set(drop)]
        keep = torch.tensor([i for i in range(n) if i not in set(drop)], dtype=torch.long, device=self.keys.device)
        self._hold(self.keys.data[keep], self.bank_a.data[keep], self.bank_b.data[keep])

    def _slot_indices(self, indices) -> list[int]:
        """Sorted, checked slot indices from ints (negative allowed), slot names, or a boolean mask
        over the slots (a bool tensor of num_slots entries); changes nothing."""
        n = self.num_slots
        if isinstance(indices, torch.Tensor) and indices.dtype == torch.bool and indices.dim() == 1:
            if indices.numel() != n:
                raise ValueError(f"a boolean slot mask needs one entry per stored adapter ({n}), got {indices.numel()}")
            return indices.nonzero().flatten().tolist()
        if isinstance(indices, torch.Tensor) and indices.dtype == torch.uint8:
            # A byte tensor is the legacy mask of old PyTorch indexing; read as indices it names slots 0 and 1.
            raise TypeError("slots are given by int index, by name or by a 1-D bool tensor mask, got a uint8 tensor "
                            "(for a mask, use .bool())")
        if (isinstance(indices, str) or isinstance(indices, torch.Tensor) and indices.dim() == 0
                or not isinstance(indices, (Iterable, torch.Tensor))):  # one slot: an int, numpy int, ...
            indices = [indices]
        found: set[int] = set()
        unknown = []
        for item in indices:
            if isinstance(item, str):
                slots = self.slots_named(item)
                if not slots:
                    unknown.append(item)
                found.update(slots)
                continue
            if isinstance(item, bool) or isinstance(item, torch.Tensor) and item.dtype == torch.bool:
                # operator.index(True) is 1: a list of flags would silently name slots 0 and 1
                raise TypeError(f"slots are given by int index, by name or by a 1-D bool tensor mask, got the "
                                f"flag {item!r}")
            try:
                i = operator.index(item)
            except TypeError:
                raise TypeError(f"slots are given by int index or by name, got {item!r}") from None
            i = i + n if i < 0 else i
            if not 0 <= i < n:
                raise IndexError(f"slot index {item} out of range for a memory of {n} stored adapters")
            found.add(i)
        if unknown:
            raise KeyError(f"no slot named {unknown} in this memory; its slots are named {self.slot_names}")
        return sorted(found)

    def clear(self) -> None:
        """Remove every stored adapter."""
        self.remove(range(self.num_slots))

    def forget_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop ``optimizer``'s per-parameter state of this memory's tensors (call after it grows or its
        slots move)."""
        check_optimizer(optimizer, "forget_optimizer_state")
        for p in (self.keys, self.bank_a, self.bank_b):
            optimizer.state.pop(p, None)

    def reset_parameters(self) -> None:
        """Re-initialise the query module (stored patterns are data, not touched)."""
        if hasattr(self.query_module, "reset_parameters"):
            self.query_module.reset_parameters()

    # ------------------------------------------------------------------------------------------
    # State dicts of another size (growing mode).
    # ------------------------------------------------------------------------------------------

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # The memory's part of a state dict loads all or nothing: a growing memory resizes to the
        # incoming slot count only when every incoming tensor of the memory (its query module's
        # included) fits this memory's config, none is of another config, and (a resize keeps
        # nothing of the old slots) none is missing; under strict loading none may be missing at
        # all. Otherwise it reports why and loads none of them, so a failed load_state_dict leaves
        # the memory as it was. torch passes strict=True here whatever the caller asked (it filters
        # missing keys itself afterwards), so the caller's own `strict` is read from its frame: a
        # strict=False load of a checkpoint without the memory, or of its trainable keys alone,
        # loads what it holds (the memory used to refuse those).
        # A load started at the model MIRA was attached to (or above it) was checked before anything
        # loaded (mira.integration._refuse_failing_load): this is for one started below it.
        self._drop_eval_plans()
        refusal = self._load_refusal(state_dict, prefix, _callers_strict())
        if refusal is not None:
            error_msgs.append(refusal)
            self.query_module.__dict__[_REFUSED] = True  # read by the query module's pre-hook, which runs next
            return
        incoming = state_dict.get(prefix + "keys")
        if self.active is None and isinstance(incoming, torch.Tensor) and incoming.shape[0] != self.keys.shape[0]:
            n, c, f, fb = incoming.shape[0], self.config, self._factory(), self._bank_factory()
            # Resize to the incoming slot count; the values are copied by the default loader (into the
            # banks' storage dtype: a float32 state dict into 16-bit banks rounds, contract section 4).
            self._set_storage(
                torch.zeros(n, c.d_k, **f),
                torch.zeros(n, c.num_slices, c.rank, c.d_in, **fb),
                torch.zeros(n, c.num_slices, c.slice_width, c.rank, **fb),
            )
        self.invalidate_cache()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._slot_names = [None] * self.num_slots  # a state dict carries no slot names

    def _load_refusal(self, state_dict, prefix: str, strict: bool) -> str | None:
        """The error of a load of ``state_dict`` (the memory's entries under ``prefix``) that this memory
        refuses, or None when they load: one message for its own loader and the attach root's check."""
        misfits = self._state_misfits(state_dict, prefix, strict)
        if not misfits:
            return None
        return (f"{prefix[:-1] or 'the memory'} ({self.extra_repr()}) was not loaded, nothing of it changed: "
                f"{'; '.join(misfits)}")

    def _state_misfits(self, state_dict, prefix: str, strict: bool) -> list[str]:
        """Why the memory's entries of ``state_dict`` cannot load into it (empty when they can)."""
        c = self.config
        n = self.keys.shape[0]
        incoming = state_dict.get(prefix + "keys")
        if self.active is None and isinstance(incoming, torch.Tensor) and incoming.dim() >= 1:
            n = incoming.shape[0]  # a growing memory takes any slot count
        expected = {"keys": (n, c.d_k), "bank_a": (n, c.num_slices, c.rank, c.d_in),
                    "bank_b": (n, c.num_slices, c.slice_width, c.rank)}
        if self.active is not None:
            expected["active"] = (n,)
        for name, t in self.query_module.state_dict().items():
            expected["query_module." + name] = tuple(t.shape)
        misfits = []
        for name, shape in expected.items():
            t = state_dict.get(prefix + name)
            if isinstance(t, torch.Tensor) and tuple(t.shape) != shape:
                misfits.append(f"{prefix}{name} has shape {tuple(t.shape)}, this memory's is {shape}")
        # Entries this memory does not have come from a memory of another config (another query
        # module): refused whatever `strict` says, as a misfit of shape is.
        unexpected = [k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in expected]
        if unexpected:
            misfits.append(f"entries of another memory config {unexpected[:6]} (this memory: "
                           f"query={c.query!r}, capacity={c.capacity})")
        absent = [prefix + name for name in expected if not isinstance(state_dict.get(prefix + name), torch.Tensor)]
        if absent and len(absent) < len(expected) and strict:
            # torch would load the rest and then raise: the memory half-loaded by a failed call
            misfits.append(f"missing {absent}")
        elif n != self.keys.shape[0] and absent:  # a resize keeps nothing of the old state: it needs all of it
            misfits.append(f"resizing to {n} slots needs every entry of the memory, missing {absent}")
        # A memory stores finite keys and adapters only, as append and the file loaders enforce: a
        # state dict of a run that diverged is refused here too, not loaded into NaN outputs.
        broken = [prefix + name for name in ("keys", "bank_a", "bank_b")
                  if isinstance(t := state_dict.get(prefix + name), torch.Tensor) and t.is_floating_point()
                  and not bool(torch.isfinite(t).all())]
        if broken:
            misfits.append(f"{broken} hold NaN or inf values (did training diverge?); a memory stores finite "
                           "adapters and keys only")
        misfits += self._slot_layout_misfits(state_dict, prefix, n)
        misfits += self._zero_key_misfits(state_dict, prefix, n)
        bank_dtype = self._bank_dtype_for(self.keys.dtype)
        for name in ("bank_a", "bank_b"):
            t = state_dict.get(prefix + name)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != bank_dtype:
                # Finite entries that the banks' storage dtype cannot hold would load as inf (float16).
                if bool((torch.isfinite(t) & ~torch.isfinite(t.to(bank_dtype))).any()):
                    misfits.append(f"{prefix}{name} holds entries beyond {bank_dtype}'s range "
                                   f"(|x| <= {torch.finfo(bank_dtype).max:g}), this memory's bank_dtype")
        return misfits

    def _slot_layout_misfits(self, state_dict, prefix: str, n: int) -> list[str]:
        """A fixed capacity's invariant, which append, remove and num_slots rely on: the stored
        adapters fill slots 0..num_slots-1, and empty slots hold zero keys and adapters (a mask with
        holes let append overwrite a stored adapter; values in empty slots moved non-affine outputs)."""
        active = state_dict.get(prefix + "active")
        if self.active is None or not isinstance(active, torch.Tensor) or tuple(active.shape) != (n,):
            return []  # a growing memory, or a misfit already reported
        if active.dtype != torch.bool:
            return [f"{prefix}active has dtype {active.dtype}; it is a bool mask of the used slots"]
        count = int(active.sum())
        if not bool(active[:count].all()):
            return [f"{prefix}active is {active.int().tolist()}; the used slots must come first (0..num_slots-1)"]
        unused = [prefix + name for name in ("keys", "bank_a", "bank_b")
                  if isinstance(t := state_dict.get(prefix + name, getattr(self, name)), torch.Tensor)
                  and t.shape[:1] == (n,) and bool(t[count:].any())]
        if unused:
            return [f"{unused} hold nonzero values in the empty slots {count}..{n - 1}; empty slots hold zeros"]
        return []

    def _zero_key_misfits(self, state_dict, prefix: str, n: int) -> list[str]:
        """All-zero keys of stored adapters, which append refuses: a zero key has no direction (its cosine
        is 0 for every query) and the op's gradient of it is g / eps (~4e13). Empty slots of a fixed
        capacity hold zero keys by design (the slots ``active`` leaves out after the load): not checked."""
        keys, active = state_dict.get(prefix + "keys"), state_dict.get(prefix + "active")
        keys_in = isinstance(keys, torch.Tensor) and tuple(keys.shape) == (n, self.config.d_k)
        active_in = isinstance(active, torch.Tensor) and tuple(active.shape) == (n,) and active.dtype == torch.bool
        if not (keys_in or self.active is not None and active_in):
            return []  # nothing that decides which keys the stored slots hold is loaded (or a misfit reported)
        if not keys_in:
            if n != self.keys.shape[0]:
                return []
            keys = self.keys.detach()  # a mask alone loaded: the slots it marks used keep these keys
        if keys.is_meta or self.active is not None and (active_in and active.is_meta or self.active.is_meta):
            return []
        if self.active is None:
            stored = torch.ones(n, dtype=torch.bool)
        elif active_in:
            stored = active.cpu()
        elif self.active.shape == (n,):
            stored = self.active.cpu()
        else:
            return []
        # As the memory will hold them: a key that rounds to zero in its dtype has no direction either.
        held = keys.to(self.keys.dtype) if keys.is_floating_point() else keys
        zero = zero_key_rows(held, among=stored)
        if not zero:
            return []
        return [f"{prefix}keys of the stored slots {zero} are all zeros; a stored "
                "adapter's key needs a direction (cosine retrieval), as append requires: give those slots nonzero "
                "keys, or remove them"]

    def _query_state_pre_hook(self, module, state_dict, prefix, *args) -> None:
        # The hook of memories pickled before it became a module-level function (their query module
        # refers to this bound method).
        _query_state_pre_hook(module, state_dict, prefix, *args)

    def extra_repr(self) -> str:
        c = self.config
        size = f"slots={self.keys.shape[0]}" if c.capacity is None else f"capacity={c.capacity}"
        return (f"{size}, d_k={c.d_k}, d_in={c.d_in}, slices={c.num_slices}x{c.slice_width}, rank={c.rank}, "
                f"separation={c.separation}, key_norm={c.key_norm}, key_init={c.key_init}, query_token={c.query_token}"
                + (", trainable_bank=True" if c.trainable_bank else "")
                + (f", bank_dtype={c.bank_dtype}" if c.bank_dtype is not None else ""))



def _is_allocation_failure(err: BaseException) -> bool:
    """Whether ``err`` is PyTorch's refusal to allocate (out of memory, or a size that overflows)."""
    text = str(err)
    return isinstance(err, MemoryError) or "allocate" in text or "overflow" in text or "out of memory" in text


#: Set on a query module whose memory refused its state dict, for _query_state_pre_hook.
_REFUSED = "_mira_memory_refused_state"


def _query_state_pre_hook(module, state_dict, prefix, *args) -> None:
    # After the memory refused its state dict: load the query module's entries as no-ops
    # (its current values), so that it too stays as it was; the memory reported the error.
    if module.__dict__.pop(_REFUSED, False):
        current = module.state_dict()
        for name in [k for k in state_dict if k.startswith(prefix)]:
            local = name[len(prefix):]
            if local in current and state_dict[name].shape == current[local].shape:
                state_dict[name] = current[local]


def _callers_load() -> tuple[nn.Module | None, dict | None, bool]:
    """The module, state dict (torch's copy, which it loads from) and ``strict`` argument of the
    ``nn.Module.load_state_dict`` call this load is part of; ``(None, None, True)`` when called otherwise,
    e.g. ``_load_from_state_dict`` directly (True: the stricter reading). torch passes strict=True to
    every module's loader and hook whatever the caller asked, and tells no module where the call began."""
    frame = sys._getframe(1)
    code = nn.Module.load_state_dict.__code__
    while frame is not None:
        if frame.f_code is code:
            found = frame.f_locals
            return found.get("self"), found.get("state_dict"), bool(found.get("strict", True))
        frame = frame.f_back
    return None, None, True


def _callers_strict() -> bool:
    """The ``strict`` argument of the ``nn.Module.load_state_dict`` call this load is part of (True
    when called otherwise, e.g. ``_load_from_state_dict`` directly: the stricter reading)."""
    return _callers_load()[2]


def zero_key_rows(keys: torch.Tensor, among: torch.Tensor | None = None) -> list[int]:
    """The rows of ``keys`` (N, d_k) that are all zeros (of those ``among``, a (N,) CPU bool mask, marks).
    No memory stores such a key: it has no direction (its cosine is 0 for every query), and the op's
    gradient of it is g / eps (eps = 1e-12, ~4e13), which overflows float16 and throws any optimiser's
    step off. Append, loads of files and state dicts all refuse them by this rule."""
    zero = (keys == 0).all(dim=1)
    if among is not None:
        zero = zero.cpu() & among
    return zero.nonzero().flatten().tolist() if bool(zero.any()) else []


def _stacklevel_outside_mira() -> int:
    """warnings.warn's stacklevel, called from here, that names the first frame outside this package
    and torch's decorators (the user's call, whichever mira function led to the warning)."""
    package = os.path.dirname(__file__)
    frame, level = sys._getframe(2), 2
    while frame is not None and (frame.f_code.co_filename.startswith(package)
                                 or frame.f_code.co_filename.endswith("_contextlib.py")):
        frame, level = frame.f_back, level + 1
    return level


def _refuse_unstorable(name: str, t: torch.Tensor) -> None:
    """Refuse what a memory must not store: non-real values (a complex tensor would be cast to its
    real part, with only a warning), and NaN or inf, which reach every sample's output (affine weights
    are all nonzero) and which load_memories refuses in files: refused on the way in, as on the way back."""
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a real floating-point tensor, got {t.dtype}")
    if not t.is_meta and not bool(torch.isfinite(t).all()):  # (a meta tensor has no values to check)
        raise ValueError(f"{name} holds NaN or inf values; a memory stores finite adapters and keys only")


def _without_rounding_gradient_of_one_key(keys: torch.Tensor, normed: torch.Tensor,
                                          active: torch.Tensor | None) -> torch.Tensor:
    """``normed`` (the per-feature normalised ``keys``) with no gradient where it is constant.

    With one stored key every column holds one nonzero entry, so each normalised entry is
    k / |k| = +-1 whatever the key: the exact gradient is zero. Autograd's is not: it computes
    g / |k| - k (k g) / |k|^3, rounding noise of ~1e-8 |g / k| whose bits depend on the summation
    order (batch split, threads, ranks), and Adam scales any nonzero gradient to lr-sized steps, so
    such keys took random walks that flipped the sign of small entries (one process against two
    ranks: keys apart by 0.4 of their largest entry after two tasks). Entries under ``NORM_EPS``
    (scaled by 1 / eps, not normalised) keep their gradient. The forward is bitwise unchanged.
    """
    if active is None and keys.shape[0] != 1:
        return normed
    constant = keys.abs() > NORM_EPS
    if active is not None:  # a fixed capacity: count the stored keys without a host sync
        constant = constant & (active.sum() == 1)
    return torch.where(constant, normed.detach(), normed)


# The CPU key in one native call (csrc/cpu/fast_path.cpp); None without the extension.
_native_stamp = getattr(getattr(_extension, "_C", None), "_retrieval_stamp", None)
# Bound once (the same function, which Dynamo folds to True when tracing): two attribute reads
# fewer on the hit path.
_is_compiling = torch.compiler.is_compiling
# torch.jit.trace, as compiling: cached derived keys are no graph's tensors, so a trace would record
# them as constants (a traced model then ignored every later change of the keys). The C function
# torch.jit.is_tracing calls; never reached under Dynamo (_is_compiling() comes first).
_is_jit_tracing = torch._C._is_tracing


def _token_query_dtypes(keys_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """The dtypes of x whose token is exactly the query over keys of ``keys_dtype`` (query_token)."""
    if keys_dtype == torch.float32:
        return (torch.float32, torch.bfloat16, torch.float16)
    return (keys_dtype,)


def _per_feature_unit(keys: torch.Tensor) -> torch.Tensor:
    """``F.normalize(keys, dim=0)`` where no autograd graph is needed. On a GPU the Triton backend runs
    on, one launch (``mira_kernels.triton.normalize_columns``: fp64 sums, one rounding, 16-bit keys
    too) instead of ATen's three (norm, clamp, divide; ~34 for 16-bit keys): a CUDA graph replays this on
    every forward (derived keys are not cached under capture), where each small launch costs ~3 us (the
    fourth H200 run, calibrated in benchmarks/results/gpu_model.txt: 36 of a ViT-B/16 forward's launches)."""
    if _fused_key_norm_applies(keys):
        return _fused_normalize_columns(keys)
    return _unit_columns(keys)


def _unit_columns(keys: torch.Tensor) -> torch.Tensor:
    """``F.normalize(keys, dim=0)``, bit for bit, except in a column whose sum of squares overflows
    (finite entries above ~1e19 in float32): F.normalize divides it by inf (zeros, or wrong weights
    beside the other columns), so those columns are normalised as the op normalises its query and keys
    (``reference.normalize``: scaled by their largest entry first). Branch-free (no host sync)."""
    # F.normalize's own steps (norm, clamp, divide: the same bits and gradient), so that its norm
    # serves the overflow test too instead of being computed twice.
    norm = torch.linalg.vector_norm(keys, dim=0, keepdim=True)
    plain = keys / norm.clamp_min(NORM_EPS)
    overflowed = ~torch.isfinite(norm) & torch.isfinite(keys).all(dim=0, keepdim=True)
    return torch.where(overflowed, normalize(keys.mT).mT, plain)


def _fused_key_norm_applies(keys: torch.Tensor) -> bool:
    # Not under torch.compile: Inductor fuses F.normalize itself, and traces no raw Triton launch.
    # Every floating dtype: a 16-bit model's memory is 16-bit (attach makes it in the weight's dtype),
    # and there _unit_columns is ~34 launches on every graph replay (found by a review of the GPU
    # model, 2026-12-07, which had priced a float32 memory); normalize_columns takes one.
    return keys.is_cuda and keys.is_floating_point() and not torch.compiler.is_compiling() and \
        mira_kernels.backends.fused_helpers_available(keys.device)


# Launch signatures of normalize_columns already run outside a CUDA-graph capture in this process.
_warm_key_norms: set = set()


def _fused_normalize_columns(keys: torch.Tensor) -> torch.Tensor:
    """normalize_columns, except inside a CUDA-graph capture for a launch signature not yet run: its first
    launch compiles and loads the kernel, which a capture cannot contain (a capture normally follows an
    eager warm-up, whose first forward derives the keys through here; a capture without one gets ATen's
    three launches, as before)."""
    from mira_kernels import triton as mira_triton  # loads Triton: only on the GPU path

    signature = (keys.device, keys.dtype, tuple(keys.shape), tuple(keys.stride()), keys.data_ptr() % 16)
    if signature not in _warm_key_norms and torch.cuda.is_current_stream_capturing():
        return F.normalize(keys, dim=0, eps=NORM_EPS)
    out = mira_triton.normalize_columns(keys, NORM_EPS)
    _warm_key_norms.add(signature)
    return out


def _cache_stamp(mutations: int, sources) -> object | None:
    """What identifies ``sources`` and the memory's mutation count (the cache's key), or None when
    derived tensors of ``sources`` may not come from a cache (see the module docstring).

    For CPU tensors one native call builds it (a bytes object); its fields are :func:`_stamp`'s.
    In a network this runs after large GEMMs that have evicted the interpreter's caches, where
    the Python key's ~30 attribute reads cost ~70 us per call and the native one a few.
    """
    if torch.compiler.is_compiling() or _is_jit_tracing():
        return None
    if _native_stamp is not None:
        stamp = _native_stamp(mutations, *sources)
        if stamp is not None:  # False: not cacheable; None: not plain CPU tensors, asked below
            return stamp or None
    if not _cacheable(sources):
        return None
    return (mutations, *map(_stamp, sources))


def _cacheable(sources) -> bool:
    """Whether derived tensors of ``sources`` may come from a cache (see the module docstring)."""
    if torch.compiler.is_compiling() or _is_jit_tracing():
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in sources):
        return False
    if not all(t is None or _tracks_version(t) for t in sources):
        return False  # no version counter: an in-place change inside inference_mode is invisible
    keys = sources[0]
    return not (keys.is_cuda and torch.cuda.is_current_stream_capturing())


def _tracks_version(t: torch.Tensor) -> bool:
    """Whether ``t`` has a version counter. Not an inference tensor, nor a parameter made under
    ``torch.inference_mode`` whose data was swapped for an ordinary tensor (it then says it is no
    inference tensor, but reading its version raises)."""
    if t.is_inference():
        return False
    try:
        t._version  # noqa: B018 (the read is the test)
    except RuntimeError:
        return False
    return True


def _stamp(t: torch.Tensor | None) -> tuple:
    """What identifies a tensor's contents, short of reading them (the cache's key)."""
    if t is None:
        return ()
    return (id(t), t.data_ptr(), t._version, t.shape, t.stride(), t.dtype, t.device)
