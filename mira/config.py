"""Configuration of MIRA layers, in one place: dataclasses validated in ``__post_init__``.

:class:`MiraConfig` holds what a user chooses in :func:`mira.attach`; :class:`MemoryConfig`
is the fully resolved description of one block's memory (widths included). The latter is what
:func:`mira.save_memories` writes next to the tensors, so a file says what it holds.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mira_kernels import DEFAULT_EPS, SEPARATIONS
from mira_kernels._validation import _is_bool, check_eps, check_scale

__all__ = [
    "QUERY_MODULES",
    "QUERY_TOKENS",
    "KEY_NORMS",
    "KEY_INITS",
    "STAGES",
    "SLICE_NAMES",
    "BANK_DTYPES",
    "MiraConfig",
    "MemoryConfig",
]

#: Query modules g: identity (CL runs of the paper), linear, MLP Linear-GELU-Linear (DG runs).
QUERY_MODULES = ("identity", "linear", "mlp")
#: Which token(s) of the attention input feed the query: the CLS token, or the mean of the
#: patch tokens (prefix tokens such as CLS, registers and distillation excluded).
QUERY_TOKENS = ("cls", "mean")
#: ``per_feature`` (default, the authors' code): the (N, d_k) key matrix is L2-normalised per
#: feature (each column across the N keys) before the cosine. ``unit``: cosine similarity only.
#: They are different retrievals (per block the adapter change differs by 90-150%, method.md §1).
KEY_NORMS = ("per_feature", "unit")
#: How a key is drawn when an adapter is stored without one: ``uniform`` (default, the authors'
#: code) draws every element from U(-1, 1); ``normal`` from N(0, 1) (what the paper's text says).
KEY_INITS = ("uniform", "normal")
#: Training stages (method section 3).
STAGES = ("adaptation", "consolidation", "inference")
#: Named output slices of a packed qkv projection, in the order timm packs them.
SLICE_NAMES = ("q", "k", "v")
#: Storage dtypes of the adapter banks (``bank_dtype``; None: the model's dtype). 16-bit banks
#: halve the bytes every forward reads from memory, with float32 mixing (contract section 4).
BANK_DTYPES = ("bfloat16", "float16", "float32")


def _bank_dtype(value) -> str | None:
    """``bank_dtype`` as its name: None, a torch dtype or its name (``"bfloat16"``, ``"torch.bfloat16"``)."""
    if value is None:
        return None
    name = str(value).removeprefix("torch.") if isinstance(value, (str, torch.dtype)) else None
    if name not in BANK_DTYPES:
        raise ValueError(f"unknown bank_dtype {value!r}; expected None (the model's dtype) or one of "
                         f"{tuple('torch.' + n for n in BANK_DTYPES)}")
    return name


def _positive_int(name: str, value, *, allow_none: bool = False, allow_zero: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    try:
        as_int = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}") from None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if as_int < 0 or (as_int == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else ">= 1"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return as_int


def _choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {tuple(choices)}")
    return value


def _check_separation_capacity(separation: str, capacity: int | None) -> None:
    # Empty slots of a fixed-capacity memory have zero keys, hence cosine 0 and weight sep(0).
    # That weight is 0 for affine, relu, tanh and identity and is harmless for sigmoid (the
    # empty slot's values are zero), but softmax would give empty slots exp(0) mass and shrink
    # every real weight; the op takes no score mask, so refuse rather than compute wrong weights.
    if capacity is not None and separation == "softmax":
        raise ValueError(
            "separation='softmax' cannot be used with a fixed capacity: empty slots would take "
            "softmax mass (the op has no score mask); use capacity=None (a growing memory)"
        )


def _check_memory_fields(cfg) -> None:
    """Checks (and normalises in place) the fields MiraConfig and MemoryConfig share."""
    _choice("query", cfg.query, QUERY_MODULES)
    _choice("query_token", cfg.query_token, QUERY_TOKENS)
    cfg.query_hidden = _positive_int("query_hidden", cfg.query_hidden, allow_none=True)
    if cfg.query_hidden is not None and cfg.query != "mlp":  # else a width that silently does nothing
        raise ValueError(f"query_hidden={cfg.query_hidden!r} sets the hidden width of the 'mlp' query module; "
                         f"query={cfg.query!r} has no hidden layer (leave query_hidden=None)")
    _choice("separation", cfg.separation, SEPARATIONS)
    _choice("key_norm", cfg.key_norm, KEY_NORMS)
    _choice("key_init", cfg.key_init, KEY_INITS)
    cfg.capacity = _positive_int("capacity", cfg.capacity, allow_none=True)
    _check_separation_capacity(cfg.separation, cfg.capacity)
    if not isinstance(cfg.trainable_bank, bool):  # bool("false") is True
        raise TypeError(f"trainable_bank must be True or False, got {cfg.trainable_bank!r}")
    cfg.bank_dtype = _bank_dtype(cfg.bank_dtype)
    if cfg.trainable_bank and cfg.bank_dtype in ("bfloat16", "float16"):
        raise ValueError(
            f"trainable_bank=True cannot use bank_dtype={cfg.bank_dtype!r}: an optimiser step on 16-bit storage "
            "drops every update smaller than 2^-8 (bfloat16) or 2^-11 (float16) of the entry; keep the bank frozen "
            "or store it in float32"
        )
    # The ops' own rules for the two scalars (numpy scalars too; a bool is not a scale), then
    # stored as floats.
    check_scale(cfg.scale)
    check_eps(cfg.eps)
    cfg.scale, cfg.eps = float(cfg.scale), float(cfg.eps)


@dataclass
class MiraConfig:
    """What :func:`mira.attach` inserts into each block.

    Attributes:
        rank: LoRA rank r of every stored adapter (>= 1).
        slices: output slices of the projection that get adapters: names of a packed qkv
            (``"q"``, ``"k"``, ``"v"``) or integer column offsets (then ``slice_width`` is needed).
        slice_width: width d_s of integer slices; names use ``out_features // 3``.
        query: query module, one of :data:`QUERY_MODULES`.
        query_token: ``"cls"`` (default, the paper) or ``"mean"`` of the patch tokens.
        query_hidden: hidden width of the MLP query module (default: the block width); only with ``query="mlp"``.
        key_dim: key width d_k (default: the block width; ``"identity"`` needs exactly that).
        separation: one of ``mira_kernels.SEPARATIONS``; ``"affine"`` is the paper's default.
        key_norm: ``"per_feature"`` (default, the authors' retrieval) or ``"unit"`` (cosine
            only); see :data:`KEY_NORMS`.
        key_init: distribution of the keys drawn for adapters stored without one:
            ``"uniform"`` U(-1, 1) (default, the authors' code) or ``"normal"`` N(0, 1).
        capacity: None for a memory that grows on append; an int pre-allocates that many slots
            with an active mask, so growth changes no shape (no recompilation, no CUDA-graph
            re-capture). With one stored adapter and affine separation its weight is then 1, not
            the raw cosine of a growing memory's one-slot rule (warned at the write).
        trainable_bank: make the stored adapters trainable in consolidation (an ablation).
        bank_dtype: storage dtype of the adapter banks: None (default: the model's dtype),
            ``torch.bfloat16`` / ``"bfloat16"``, ``torch.float16`` or ``torch.float32``. 16-bit banks
            halve the bytes every forward reads (at batch 1 they come from DRAM and set the floor
            of MIRA's overhead); the op widens them exactly and mixes in float32, so the only error
            is the rounding of each stored entry, at most 2^-8 (bfloat16) / 2^-11 (float16)
            relative, which moves the adapter's contribution by at most ~2x that relative (contract
            section 4). float16 holds |entries| <= 65504 only: larger ones are refused on append.
            In a float64 model (``model.double()`` keeps bank_dtype) the layers widen them to
            float64 for the op, exactly. Not with ``trainable_bank`` (an optimiser step on 16-bit
            storage loses small updates).
        scale: multiplies every adapter's contribution (the paper uses 1, no alpha/r).
        eps: guard of the affine denominator (see ``mira_kernels.DEFAULT_EPS``).
        blocks: indices of the blocks to adapt (negative allowed); None for every block.
    """

    rank: int = 4
    slices: tuple = ("q", "v")
    slice_width: int | None = None
    query: str = "identity"
    query_token: str = "cls"
    query_hidden: int | None = None
    key_dim: int | None = None
    separation: str = "affine"
    key_norm: str = "per_feature"
    key_init: str = "uniform"
    capacity: int | None = None
    trainable_bank: bool = False
    bank_dtype: str | None = None
    scale: float = 1.0
    eps: float = DEFAULT_EPS
    blocks: tuple | None = None

    def __post_init__(self) -> None:
        self.rank = _positive_int("rank", self.rank)
        if isinstance(self.slices, (str, int)):
            self.slices = (self.slices,)
        if isinstance(self.slices, (set, frozenset, dict)):
            # a set's order depends on the process's string hashing: q and v would swap between runs
            raise TypeError(f"slices must be ordered (a tuple or list), got {self.slices!r}")
        self.slices = tuple(self.slices)
        if not self.slices:
            raise ValueError("slices must name at least one output slice, e.g. ('q', 'v')")
        for s in self.slices:
            if isinstance(s, str):
                _choice("slice", s, SLICE_NAMES)
            else:
                _positive_int("slice offset", s, allow_zero=True)
        if len(set(self.slices)) != len(self.slices):
            raise ValueError(f"slices must be distinct, got {self.slices!r}")
        if any(isinstance(s, str) for s in self.slices) and any(not isinstance(s, str) for s in self.slices):
            raise ValueError(f"slices must be all names or all integer offsets, got {self.slices!r}")
        self.slice_width = _positive_int("slice_width", self.slice_width, allow_none=True)
        if self.slice_width is None and not isinstance(self.slices[0], str):
            raise ValueError("integer slice offsets need slice_width (the width d_s of each slice)")
        self.key_dim = _positive_int("key_dim", self.key_dim, allow_none=True)
        _check_memory_fields(self)
        if self.blocks is not None:
            bad = TypeError(f"blocks must be block indices (ints) or None, got {self.blocks!r}")
            if _is_bool(self.blocks):  # operator.index(True) is 1: blocks=True would adapt block 1
                raise bad
            if hasattr(type(self.blocks), "__index__") and getattr(self.blocks, "ndim", 0) == 0:
                # one index: an int, a numpy int, a 0-d integer tensor (a 1-D one is a sequence of them)
                self.blocks = (self.blocks,)
            if isinstance(self.blocks, (str, bytes)):
                raise bad
            try:
                self.blocks = tuple(self.blocks)  # once: a generator is read here, not by the checks below
                if any(_is_bool(b) for b in self.blocks):
                    raise bad
                self.blocks = tuple(operator.index(b) for b in self.blocks)
            except TypeError:  # not iterable, or an entry that is not an index (0.5): name the option
                raise bad from None
            if len(set(self.blocks)) != len(self.blocks):
                raise ValueError(f"blocks must be distinct, got {self.blocks!r}")


@dataclass
class MemoryConfig:
    """Resolved description of one block's memory (every width known).

    Attributes:
        d_in: width of the projection's input (the block width).
        d_k: key width.
        num_slices: S, the number of adapted output slices.
        slice_width: d_s, the width of each slice.
        rank, query, query_token, query_hidden, separation, key_norm, key_init, capacity,
        trainable_bank, bank_dtype, scale, eps: as :class:`MiraConfig` (``bank_dtype`` held as
        its name, e.g. ``"bfloat16"``, so that the config is JSON).
        num_prefix_tokens: tokens before the patch tokens (CLS, registers, distillation),
            excluded from the ``"mean"`` query.
    """

    d_in: int
    d_k: int
    num_slices: int
    slice_width: int
    rank: int = 4
    query: str = "identity"
    query_token: str = "cls"
    query_hidden: int | None = None
    separation: str = "affine"
    key_norm: str = "per_feature"
    key_init: str = "uniform"
    capacity: int | None = None
    trainable_bank: bool = False
    bank_dtype: str | None = None
    scale: float = 1.0
    eps: float = DEFAULT_EPS
    num_prefix_tokens: int = 1

    def __post_init__(self) -> None:
        self.d_in = _positive_int("d_in", self.d_in)
        self.d_k = _positive_int("key_dim", self.d_k)
        self.num_slices = _positive_int("num_slices", self.num_slices)
        self.slice_width = _positive_int("slice_width", self.slice_width)
        self.rank = _positive_int("rank", self.rank)
        _check_memory_fields(self)
        self.num_prefix_tokens = _positive_int("num_prefix_tokens", self.num_prefix_tokens, allow_zero=True)
        if self.query == "identity" and self.d_k != self.d_in:
            raise ValueError(
                f"query='identity' passes the token through unchanged, so key_dim must equal the block "
                f"width {self.d_in}, got key_dim={self.d_k}; use query='linear' or 'mlp' for another key width"
            )
        if self.query_token == "cls" and self.num_prefix_tokens < 1:
            raise ValueError(
                "query_token='cls' needs a CLS (prefix) token but the model has none; use query_token='mean'"
            )

    @property
    def hidden_width(self) -> int | None:
        """The MLP query module's hidden width as built (``query_hidden=None`` means the block width);
        None without an MLP query."""
        if self.query != "mlp":
            return None
        return self.d_in if self.query_hidden is None else self.query_hidden

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> MemoryConfig:
        if not isinstance(data, dict):
            raise TypeError(f"a memory config is a dict of its fields, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown memory config fields {sorted(unknown)} (written by a newer version?)")
        return cls(**data)
