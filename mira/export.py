"""Export paths of an attached model: ``torch.export``, AOTInductor, ONNX.

* :func:`export_program`: ``torch.export.export`` with a dynamic batch. The program keeps
  ``mira::mira_linear`` as one node (its fake kernel gives the shapes); running it calls the
  fused kernel of the backend resolved at export time.
* :func:`export_aoti`: AOTInductor (``torch._inductor.aoti_compile_and_package``) of that
  program: a ``.pt2`` package whose compiled code calls the fused op through the dispatcher;
  load it with :func:`load_aoti` in a process where ``mira_kernels`` is imported (that
  registers the op).
* :func:`export_onnx`: ONNX through ``torch.onnx.export(dynamo=True)``, after
  :func:`decompose` has spelled the MIRA ops out in standard ops
  (:mod:`mira_kernels.decompositions`), so any ONNX runtime runs it without this package.

The decomposition is applied to the exported program only: eager calls and ``torch.compile``
keep the fused kernels. Export a model in eval mode and in the stage it will serve in
(``inference``), or folded (:func:`mira.fold`), whose graph is the plain backbone's. An export
under ``torch.autocast`` records the MIRA op with its inputs uncast, as its ATen ops: the program
casts when it runs under autocast (for a 16-bit program, convert the model with ``.to(dtype)``).

:func:`check_against_float64` is how an export is judged (the tests and ``benchmarks/serving.py``
use it): an exported model computes the same function in another operation order (fused
attention, GEMM blocking, the decomposed op), so it cannot equal eager bit for bit, and a fixed
tolerance is either loose for a small model or tight for a deep one. The specification is the
same model run eagerly in float64; an export passes when its error against that is within
``factor`` (2) times eager's own error at the model's dtype, the error any other correct op
order is expected to have (a float64 model is its own reference: its error is estimated from a
float32 run of it).
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch._higher_order_ops.auto_functionalize import auto_functionalized, auto_functionalized_v2

from mira_kernels.decompositions import export_decompositions

__all__ = ["Float64Check", "check_against_float64", "decompose", "export_aoti", "export_onnx", "export_program",
           "load_aoti"]


def _as_tuple(example_inputs) -> tuple:
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def _batched_examples(example_inputs: tuple, dynamic_batch: bool) -> tuple[tuple, tuple | None]:
    """(example inputs, dynamic_shapes): every tensor input gets a dynamic dimension 0."""
    if not dynamic_batch:
        return example_inputs, None
    batch = torch.export.Dim("batch", min=1)
    examples, shapes = [], []
    for arg in example_inputs:
        if isinstance(arg, torch.Tensor) and arg.dim() >= 1:
            if arg.shape[0] == 0:
                # torch.export fails on it deep inside ("Constraints violated (batch)!"): a traced
                # size of 0 is specialised too, and there is no sample to repeat.
                raise ValueError(f"export_program: example_inputs has a batch of 0 samples (input {len(examples)}, "
                                 f"shape {tuple(arg.shape)}); a dynamic batch is traced from at least 1 sample: give "
                                 f"one (the program then serves any batch, 0 included), or pass dynamic_batch=False "
                                 f"for a program of batch 0 only")
            if arg.shape[0] == 1:
                # A traced size of 1 is specialised (broadcasting rules), so trace with 2 samples.
                arg = torch.cat([arg, arg])
            examples.append(arg)
            shapes.append({0: batch})
        else:
            examples.append(arg)
            shapes.append(None)
    return tuple(examples), tuple(shapes)


def _check_directory(caller: str, path: str | os.PathLike) -> None:
    # Before exporting: torch finds a missing directory only when it writes, after the export and compile
    # (tens of seconds for a ViT-B/16).
    directory = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{caller}: {os.fspath(path)}: no directory {directory} to write it in; create it "
                                f"first (os.makedirs), or give another path")


def export_program(model: nn.Module, example_inputs, *, dynamic_batch: bool = True,
                   strict: bool = False) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``model`` (the MIRA op stays one fused node).

    The program holds ``model``'s own tensors, not a copy, so it serves the memory as it is at each
    call: adapters written, removed or loaded later (``mira.write_adapters``, ``remove_tasks``,
    ``load_memories``), in a fixed-capacity memory or a growing one (which keeps its key and bank
    tensors and swaps their data). The same holds for the qkv weights: ``mira.fold`` / ``merge``
    after the export change what the program computes (a program of the live model then adds the
    memory to the folded weight), so export after folding. The files of :func:`export_aoti` and
    :func:`export_onnx` hold a copy of the weights: they serve the adapters stored when they were
    written, whatever is written into the model after.

    Args:
        example_inputs: a tensor or a tuple of positional inputs.
        dynamic_batch: make dimension 0 of every tensor input dynamic (any batch size >= 1).
        strict: passed to ``torch.export.export``.
    """
    examples, shapes = _batched_examples(_as_tuple(example_inputs), dynamic_batch)
    return torch.export.export(model, examples, dynamic_shapes=shapes, strict=strict)


def _is_mira_call(node) -> bool:
    """Whether ``node`` calls a MIRA op, directly or as torch.export's functional form of a mutating one."""
    if node.op != "call_function":
        return False
    target = node.target
    if target in (auto_functionalized, auto_functionalized_v2):
        target = node.args[0]
    return isinstance(target, torch._ops.OpOverload) and target.namespace == "mira"


@contextlib.contextmanager
def _inplace_ops_decomposed(table: Mapping):
    """The in-place ops of ``table`` decompose while a program is retraced.

    ``run_decompositions`` applies its table after functionalization, which an in-place custom op
    does not reach: it is wrapped in ``auto_functionalized`` first. A ``CompositeImplicitAutograd``
    Python kernel, which only the retrace's Python dispatcher sees (eager calls keep the fused
    kernel), is applied before, and its in-place ops are functionalized as any.
    """
    key = torch._C.DispatchKey.CompositeImplicitAutograd
    ops = [op for op in table if op._schema.is_mutable and key not in op.py_kernels]
    try:
        for op in ops:
            op.py_impl(key)(table[op])
        yield
    finally:
        for op in ops:
            op.py_kernels.pop(key, None)
            op._dispatch_cache.clear()


def decompose(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """The program with every MIRA op replaced by standard ATen ops (the rest untouched).

    ``mira_linear`` and the in-place ``mira_adapter_`` (which ``torch.export`` holds in its functional
    form, ``auto_functionalized``); ``program`` itself is not changed.
    """
    table = export_decompositions()
    with _inplace_ops_decomposed(table):
        decomposed = program.run_decompositions(table)
        if any(n.target in (auto_functionalized, auto_functionalized_v2) and _is_mira_call(n)
               for n in decomposed.graph.nodes):
            # The functional form back into clones of its inputs and the in-place op (in this new program,
            # not in `program`), which the retrace decomposes.
            from torch._inductor.fx_passes.post_grad import decompose_auto_functionalized

            with decomposed.graph_module._set_replace_hook(decomposed.graph_signature.get_replace_hook()):
                decompose_auto_functionalized(decomposed.graph)
                decomposed.graph.eliminate_dead_code()
            decomposed.graph_module.recompile()
            decomposed = decomposed.run_decompositions(table)
    left = sorted({str(n.args[0] if n.target in (auto_functionalized, auto_functionalized_v2) else n.target)
                   for n in decomposed.graph.nodes if _is_mira_call(n)})
    if left:  # an op this version has no decomposition for: torch.onnx would fail deep inside on it
        raise ValueError(f"decompose: the program calls {', '.join(left)}, which has no decomposition into standard "
                         f"ops; export a model that calls only mira_linear / mira_adapter_ (eval mode)")
    return decomposed


def export_onnx(model: nn.Module | torch.export.ExportedProgram, example_inputs, path: str | os.PathLike | None = None,
                *, dynamic_batch: bool = True, **onnx_kwargs):
    """ONNX export through ``torch.onnx.export(dynamo=True)`` with the MIRA op decomposed.

    Args:
        model: an attached model, or a program from :func:`export_program`.
        path: where to save the ``.onnx`` file (None: not saved).
        onnx_kwargs: passed to ``torch.onnx.export`` (e.g. ``opset_version``).

    Returns:
        The ``torch.onnx.ONNXProgram``; run it with onnxruntime (input names as
        ``program.model.graph.inputs``).
    """
    examples = _as_tuple(example_inputs)
    if path is not None:
        _check_directory("export_onnx", path)
    if not isinstance(model, torch.export.ExportedProgram):
        model = export_program(model, examples, dynamic_batch=dynamic_batch)
    onnx_program = torch.onnx.export(decompose(model), examples, dynamo=True, verbose=False, **onnx_kwargs)
    if path is not None:
        onnx_program.save(os.fspath(path))
    return onnx_program


def export_aoti(model: nn.Module | torch.export.ExportedProgram, example_inputs, path: str | os.PathLike, *,
                dynamic_batch: bool = True, inductor_configs: Mapping | None = None) -> str:
    """Compile ``model`` ahead of time with AOTInductor into the package ``path`` (``.pt2``).

    The package calls the fused MIRA op through the dispatcher (the backend resolved at export
    time is baked in), so the process that loads it must import ``mira_kernels``.

    Returns:
        The package path.
    """
    # torch asserts the suffix only after exporting (and may compile first): a wrong name would cost
    # the whole export, then end in a bare AssertionError.
    if not os.fspath(path).endswith(".pt2"):
        raise ValueError(f"export_aoti: {os.fspath(path)}: an AOTInductor package's name must end in .pt2")
    _check_directory("export_aoti", path)
    if not isinstance(model, torch.export.ExportedProgram):
        model = export_program(model, example_inputs, dynamic_batch=dynamic_batch)
    return torch._inductor.aoti_compile_and_package(model, package_path=os.fspath(path),
                                                    inductor_configs=dict(inductor_configs or {}))


def load_aoti(path: str | os.PathLike):
    """Load a package written by :func:`export_aoti` (a callable taking the example inputs' layout)."""
    import mira_kernels  # noqa: F401  (registers the MIRA ops the package calls)

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_aoti: {path}: no such AOTInductor package (write one with export_aoti)")
    try:
        return torch._inductor.aoti_load_package(path)
    except Exception as err:  # torch raises RuntimeError / zipfile / KeyError variants for foreign files
        raise ValueError(f"load_aoti: {path} cannot be loaded as an AOTInductor package ({type(err).__name__}: "
                         f"{err})") from err


@dataclass(frozen=True)
class Float64Check:
    """Errors (max |difference|) against the float64 eager model, and the bound each must meet."""

    # eager at the model's own dtype: the error of PyTorch's op order (for a float64 model, the reference
    # itself, its float32 run's error x float64's eps / float32's)
    eager_error: float
    errors: dict  # {name: error} of each checked output
    bound: float  # factor * eager_error + floor * max(1, scale)
    scale: float  # max |output| of the float64 model
    factor: float = 2.0

    @property
    def failed(self) -> dict:
        return {name: e for name, e in self.errors.items() if not e <= self.bound}  # NaN fails

    def raise_if_failed(self) -> None:
        if self.failed:
            worst = ", ".join(f"{name} {e:.3e}" for name, e in self.failed.items())
            raise AssertionError(f"error against the float64 eager model above {self.bound:.3e} "
                                 f"({self.factor:g} x eager's own {self.eager_error:.3e} + floor): {worst}")


def _max_error(name: str, got, want: torch.Tensor) -> float:
    got = torch.as_tensor(got)
    # Broadcasting would judge a wrongly shaped output (a (1, 1, B, C) one, one row of B) as if right.
    if tuple(got.shape) != tuple(want.shape):
        raise ValueError(f"check_against_float64: output {name!r} has shape {tuple(got.shape)}; the float64 model's "
                         f"is {tuple(want.shape)}")
    if not want.numel():  # an empty batch: nothing computed, nothing wrong (max() of no element is an error)
        return 0.0
    return float((got.to(torch.float64) - want).abs().max())


def _default_floor(dtype: torch.dtype) -> float:
    # 1e-6 is ~8 units of roundoff of float32. A float64 model's floor is as many of float64's (1.9e-15):
    # float32's passed a float32 run of it. A 16-bit model keeps 1e-6: its eager error (at least the
    # rounding of its outputs) dominates the bound.
    return 1e-6 * min(1.0, torch.finfo(dtype).eps / torch.finfo(torch.float32).eps)


def _cast_floating(examples: tuple, dtype: torch.dtype) -> tuple:
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in examples)


@torch.no_grad()
def check_against_float64(model: nn.Module, example_inputs, outputs: Mapping, *, factor: float = 2.0,
                          floor: float | None = None) -> Float64Check:
    """Judge ``outputs`` (``{name: output for example_inputs}``, tensors or numpy arrays) against
    ``model`` run eagerly in float64 on the same inputs.

    Each output's max-abs error must be at most ``factor`` x the error of ``model`` itself (eager,
    its own dtype) + ``floor`` x max(1, |float64 output|) (a few units in the last place: a
    margin for a model so shallow that eager's error is near zero). ``floor`` defaults to 1e-6
    (~8 units of roundoff of float32) for a float32 or 16-bit model, and to as many units of
    float64's (1.9e-15) for a float64 model. A float64 model is its own reference, so its eager
    error is estimated: the error of a float32 copy of it, scaled by float64's eps / float32's (the
    model's conditioning times the unit roundoff); so an export that lost float64 precision (a
    float32 constant or cast) fails. A copy of ``model`` is cast to float64; ``model`` is not
    changed. An output must have the float64 output's shape (``ValueError`` otherwise); the
    outputs of an empty batch have error 0.
    """
    examples = _as_tuple(example_inputs)
    own = model(*examples)
    # 16-bit banks stay 16-bit through .to(): the float64 layers widen them exactly, as the kernels do.
    reference = copy.deepcopy(model).to(torch.float64)
    want = reference(*_cast_floating(examples, torch.float64)).to(torch.float64)
    if own.dtype == torch.float64:
        single = copy.deepcopy(model).to(torch.float32)(*_cast_floating(examples, torch.float32))
        ulps = torch.finfo(torch.float64).eps / torch.finfo(torch.float32).eps
        eager_error = _max_error("eager", single, want) * ulps
    else:
        eager_error = _max_error("eager", own, want)
    if floor is None:
        floor = _default_floor(own.dtype)
    scale = float(want.abs().max()) if want.numel() else 0.0
    bound = factor * eager_error + floor * max(1.0, scale)
    errors = {name: _max_error(name, out, want) for name, out in outputs.items()}
    return Float64Check(eager_error, errors, bound, scale, factor)
