"""Query modules g: map the pooled attention input of a block to a query (state pattern).

The pooled token is the CLS token of the block's attention input (the paper) or the mean of
its patch tokens (prefix tokens excluded), see :func:`pool_tokens`. Each module takes
``(B, d_in)`` and returns ``(B, d_k)``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .config import _positive_int

__all__ = ["IdentityQuery", "LinearQuery", "MlpQuery", "build_query_module", "pool_tokens"]


def pool_tokens(x: torch.Tensor, query_token: str, num_prefix_tokens: int) -> torch.Tensor:
    """The token(s) a query is made from.

    Args:
        x: (B, T, d) tokens entering attention.
        query_token: ``"cls"`` takes token 0; ``"mean"`` averages tokens ``num_prefix_tokens:``.
        num_prefix_tokens: CLS / register / distillation tokens placed before the patch tokens.

    Returns:
        (B, d).
    """
    if query_token not in ("cls", "mean"):  # anything else was taken as "mean"
        raise ValueError(f"unknown query_token {query_token!r}; expected one of ('cls', 'mean')")
    if num_prefix_tokens < 0:  # x[:, -1:] would be the last token alone
        raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens!r}")
    if query_token == "cls":
        if x.shape[1] == 0:
            raise ValueError(f"query_token='cls' takes token 0, but the tokens {tuple(x.shape)} hold none")
        return x[:, 0]
    if x.shape[1] <= num_prefix_tokens:  # the mean of no token would be NaN, made from finite inputs
        raise ValueError(f"query_token='mean' averages the tokens after the {num_prefix_tokens} prefix token(s), "
                         f"but the tokens {tuple(x.shape)} hold none")
    return x[:, num_prefix_tokens:].mean(dim=1)


def _widths(in_features, out_features) -> tuple[int, int]:
    """Checked widths: a flag, a str or a negative width would build a module of no real width."""
    return _positive_int("in_features", in_features), _positive_int("out_features", out_features)


def _no_hidden_layer(kind: str, hidden_features, factory: dict) -> None:
    """Refuse what a query module without a hidden layer would ignore (as MiraConfig does): a hidden
    width, and keyword arguments other than the factory's (device, dtype)."""
    if hidden_features is not None:
        raise ValueError(f"hidden_features={hidden_features!r} sets the hidden width of the 'mlp' query module; "
                         f"{kind!r} has no hidden layer (leave hidden_features=None)")
    _factory_only(kind, factory)


def _factory_only(kind: str, factory: dict) -> None:
    unknown = sorted(set(factory) - {"device", "dtype"})
    if unknown:
        raise TypeError(f"the {kind!r} query module got unexpected keyword arguments {unknown}; its keyword arguments "
                        "are hidden_features and the factory arguments device and dtype")


class IdentityQuery(nn.Module):
    """g(t) = t (the paper's continual-learning runs). Needs d_k == d_in."""

    def __init__(self, in_features: int, out_features: int, hidden_features: int | None = None, **factory) -> None:
        super().__init__()
        _no_hidden_layer("identity", hidden_features, factory)
        in_features, out_features = _widths(in_features, out_features)
        if in_features != out_features:
            raise ValueError(f"IdentityQuery needs in_features == out_features, got {in_features} and {out_features}")
        self.in_features = self.out_features = in_features

    def reset_parameters(self) -> None:
        pass

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def extra_repr(self) -> str:
        return f"features={self.in_features}"


class LinearQuery(nn.Linear):
    """g(t) = W t + b."""

    def __init__(self, in_features: int, out_features: int, hidden_features: int | None = None, **factory) -> None:
        _no_hidden_layer("linear", hidden_features, factory)
        super().__init__(*_widths(in_features, out_features), **factory)


class MlpQuery(nn.Module):
    """g(t) = Linear(GELU(Linear(t))), the paper's domain-generalisation query (hidden = d_in)."""

    def __init__(self, in_features: int, out_features: int, hidden_features: int | None = None, **factory) -> None:
        super().__init__()
        _factory_only("mlp", factory)
        in_features, out_features = _widths(in_features, out_features)
        # None is the default width; 0 (which `or` took for the default) is refused
        hidden_features = in_features if hidden_features is None else _positive_int("hidden_features", hidden_features)
        self.fc1 = nn.Linear(in_features, hidden_features, **factory)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features, **factory)

    def reset_parameters(self) -> None:
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(t)))


_QUERY_CLASSES = {"identity": IdentityQuery, "linear": LinearQuery, "mlp": MlpQuery}


def build_query_module(
    kind: str, in_features: int, out_features: int, hidden_features: int | None = None, **factory
) -> nn.Module:
    """The query module named ``kind`` (``identity``, ``linear``, ``mlp``)."""
    if not isinstance(kind, str):  # a list raised "unhashable type"
        raise TypeError(f"kind names a query module (str), one of {tuple(_QUERY_CLASSES)}; got {kind!r}")
    try:
        cls = _QUERY_CLASSES[kind]
    except KeyError:
        raise ValueError(f"unknown query module {kind!r}; expected one of {tuple(_QUERY_CLASSES)}") from None
    return cls(in_features, out_features, hidden_features, **factory)  # each refuses what it would ignore
