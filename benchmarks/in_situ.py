"""What each MIRA projection costs where it really runs, inside the network: a diagnostic of the
module-level figure.

``make bench``'s module-level figure times one projection over its stock ``nn.Linear`` with the
caches evicted before each call (``benchmarks.budget.ColdCache``), a model of the state a projection
meets in a network. This tool checks that model against the network itself. It times interleaved
forwards of three variants that share the backbone's weights: the stock backbone, the backbone on
MIRA's op with an empty memory (the op's base path), and the MIRA model. Every block's qkv call is
wrapped in a timer, and on the CPU backend the op's phase clock is read after each call. It prints:

- the whole forward, the qkv calls (all blocks, in place) and everything else, each as the median
  per-round difference over the backbone's forward, with its 95% interval; the same for the model on
  the empty-memory op (the control: wrappers and op, no adapter), and everything else of the MIRA
  model over that control's (what the adapter costs the layers around it);
- MIRA's qkv calls over the empty-memory op's, in us per block, and that difference split by the op's
  phases (entry, retrieval, mixing, seeding pass, GEMM);
- each op variant's time per call outside the op's phases: the projection's Python call, the eval
  plan's checks, the binding's argument handling and the result's return (absolute: ``nn.Linear``'s
  own call path, which no clock splits, is not subtracted).

``python -m benchmarks.in_situ [--batch 1] [--rounds 200] [--threads 2] [--json PATH]``
Writes nothing unless ``--json`` is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import random
import statistics
import sys
import time
from collections.abc import Sequence

import torch
from torch import nn

from benchmarks import _cli, _pairs, latency

__all__ = ["PHASES", "measure", "main"]

PHASES = ("entry", "retrieval", "mixing", "seeding", "gemm")  # torch.ops.mira._cpu_last_phases()' order
VARIANTS = ("backbone", "empty", "fused")  # stock; MIRA's op, empty memory; MIRA
# The other layers of a block timed with `layers=True` (those a block has), and the attention as a whole
# ("attn"), from which the attention between qkv and proj is derived ("attn, between qkv and proj").
# (attn.proj before attn: once attn is wrapped, its proj is no longer reached by the path.)
LAYERS = ("norm1", "attn.proj", "attn", "norm2", "mlp.fc1", "mlp.act", "mlp.fc2")


class _TimedCall(nn.Module):
    """Wraps a block's qkv: the wall time of each call, and the op's phases when it has them."""

    def __init__(self, inner: nn.Module, times: list, phases: list | None) -> None:
        super().__init__()
        self.inner = inner
        self.times = times
        self.phases = phases

    def forward(self, *args, **kwargs):
        t0 = time.perf_counter()
        y = self.inner(*args, **kwargs)
        self.times.append(time.perf_counter() - t0)
        if self.phases is not None:
            self.phases.append(list(torch.ops.mira._cpu_last_phases()))
        return y


def _interval(values: list[float], scale: float = 1.0) -> dict:
    med, lo, hi = _pairs.median_ci(values)
    return {"median": med * scale, "lo": lo * scale, "hi": hi * scale}


#: Fewest rounds with a 95% interval (of order statistics around the median: _pairs.median_ci); fewer
#: print [-inf, +inf].
MIN_ROUNDS = 6


def measure(batch: int = 1, rounds: int = 200, *, model: nn.Module | None = None, seed: int = 0,
            variants: latency.Variants | None = None, budget_s: float | None = None, layers: bool = False) -> dict:
    """Interleaved forwards at ``batch``: ``rounds`` of them, or as many as ``budget_s`` seconds allow
    (at least MIN_ROUNDS). ``variants``: the models of a ``benchmarks.latency`` run, measured in place and left
    as they were (the empty-memory op is then timed only if that run built it); otherwise they are
    built here, ``model`` (a timm ViT) replacing the benchmark's (tests pass a tiny one). ``layers``:
    also time every block's other layers (``LAYERS``), to see which of them the adapter slows down
    (their timers then add the same small cost to every variant's forward). Returns the record that
    :func:`report` prints."""
    if rounds < MIN_ROUNDS:
        raise ValueError(f"in_situ: rounds must be at least {MIN_ROUNDS} for a 95% interval, got {rounds}")
    if variants is None:
        cfg = dataclasses.replace(latency.parse_args([]), gemm_backbone=True, seed=seed)
        variants = latency.build_variants(cfg, model=model)
    models = {"backbone": variants.backbone, "empty": variants.gemm_backbone, "fused": variants.mira}
    names = tuple(name for name in VARIANTS if models[name] is not None)
    phase_clock = variants.backend == "cpu" and hasattr(torch.ops.mira, "_cpu_last_phases")
    calls: dict[str, list] = {name: [] for name in names}
    # Every variant reads the phase clock after each qkv call, the backbone too (its readout unused):
    # a cold readout costs microseconds, which only MIRA's forwards used to carry.
    phases: dict[str, list | None] = {name: ([] if phase_clock else None) for name in names}
    wrapped = []  # (parent module, attribute, the module there before): put back afterwards
    layer_calls: dict[str, dict[str, list]] = {name: {} for name in names}
    per_layer: dict[str, dict[str, list]] = {name: {} for name in names}
    x = latency.images(variants, batch, seed)
    total: dict[str, list] = {name: [] for name in names}
    qkv: dict[str, list] = {name: [] for name in names}
    per_call: dict[str, list] = {name: [] for name in names if phases[name] is not None and name != "backbone"}
    outside: dict[str, list] = {name: [] for name in per_call}  # per round: median of call - its phases
    order = random.Random(seed)
    gc_was_enabled = gc.isenabled()
    if phase_clock:
        torch.ops.mira._cpu_phase_clock(True)
    try:
        for name in names:
            for block in models[name].blocks:
                wrapped.append((block.attn, "qkv", block.attn.qkv))
                block.attn.qkv = _TimedCall(block.attn.qkv, calls[name], phases[name])
                for path in LAYERS if layers else ():
                    parent_path, _, attr = path.rpartition(".")
                    try:
                        parent = block.get_submodule(parent_path) if parent_path else block
                    except AttributeError:  # a block without that part (e.g. no `mlp`)
                        continue
                    if not isinstance(getattr(parent, attr, None), nn.Module):
                        continue
                    wrapped.append((parent, attr, getattr(parent, attr)))
                    setattr(parent, attr, _TimedCall(getattr(parent, attr), layer_calls[name].setdefault(path, []),
                                                     None))
        gc.disable()  # as benchmarks._pairs does: no collection lands in one variant's forward
        with torch.inference_mode():
            for name in names:  # warm-up: plans, allocator, lazy initialisation
                models[name](x)
                models[name](x)
            start = time.perf_counter()
            done = 0
            while done < MIN_ROUNDS or (budget_s is None and done < rounds) or (
                    budget_s is not None and time.perf_counter() - start < budget_s):
                for name in order.sample(names, len(names)):
                    calls[name].clear()
                    if phases[name] is not None:
                        phases[name].clear()
                    t0 = time.perf_counter()
                    models[name](x)
                    total[name].append(time.perf_counter() - t0)
                    qkv[name].append(sum(calls[name]))
                    for path, times in layer_calls[name].items():
                        per_layer[name].setdefault(path, []).append(sum(times))
                        times.clear()
                    if name in per_call:
                        per_call[name].append([statistics.median(p[i] for p in phases[name])
                                               for i in range(len(PHASES))])
                        outside[name].append(statistics.median(t - sum(p) for t, p in zip(calls[name],
                                                                                          phases[name])))
                done += 1
    finally:
        for parent, attr, inner in reversed(wrapped):
            setattr(parent, attr, inner)
        if phase_clock:
            torch.ops.mira._cpu_phase_clock(False)
        if gc_was_enabled:
            gc.enable()
    n_blocks = variants.n_blocks
    base = total["backbone"]
    rest = {name: [t - q for t, q in zip(total[name], qkv[name])] for name in names}  # a forward but its qkv calls

    def share(num: list, den: list) -> dict:
        """Per-round num - den over the backbone's forward, percent."""
        return _interval([(a - b) / c for a, b, c in zip(num, den, base)], 100)

    over = {
        "whole forward": share(total["fused"], base),
        "qkv calls, in place": share(qkv["fused"], qkv["backbone"]),
        "everything else": share(rest["fused"], rest["backbone"]),
    }
    record: dict = {
        "batch": batch, "rounds": len(base), "blocks": n_blocks, "backend": variants.backend,
        "backbone_ms": statistics.median(base) * 1e3,
        "qkv_ms_per_forward": {name: statistics.median(qkv[name]) * 1e3 for name in names},
        "over_backbone_percent": over,
        "fused_over_stock_us_per_block": _interval([(a - b) / n_blocks for a, b in zip(qkv["fused"], qkv["backbone"])],
                                                   1e6),
    }
    if "empty" in names:
        over["empty-memory op's qkv calls"] = share(qkv["empty"], qkv["backbone"])
        # The control for "everything else": the same model and wrappers with MIRA's op but no adapter.
        # What MIRA's adapter does to the rest of the forward (its bank reads evicting what the next
        # layers would have found in cache, say) shows as the fused model's share over this one's.
        over["empty-memory op's forward"] = share(total["empty"], base)
        over["empty-memory op's everything else"] = share(rest["empty"], rest["backbone"])
        over["everything else, MIRA over empty-memory op"] = share(rest["fused"], rest["empty"])
        record["fused_over_empty_us_per_block"] = _interval([(a - b) / n_blocks for a, b in
                                                             zip(qkv["fused"], qkv["empty"])], 1e6)
    if layers and "empty" in names:
        rows = dict(per_layer["fused"]), dict(per_layer["empty"])
        for r, name in zip(rows, ("fused", "empty")):  # the attention between qkv and proj
            if "attn" in r and "attn.proj" in r:
                r["attn, between qkv and proj"] = [a - q - p for a, q, p in
                                                   zip(r.pop("attn"), qkv[name], r["attn.proj"])]
        record["layers_fused_over_empty_us_per_block"] = {
            path: _interval([(a - b) / n_blocks for a, b in zip(rows[0][path], rows[1][path])], 1e6)
            for path in rows[0] if path in rows[1]}
    if per_call:
        record["phases_us_per_call"] = {
            name: {p: statistics.median(r[i] for r in per_call[name]) * 1e6 for i, p in enumerate(PHASES)}
            for name in per_call}
    if per_call:
        # The call outside the op's phases (the phase clock starts in the kernel's entry and stops
        # after its GEMM): the layer's Python, the eval plan's checks, the binding, the return.
        record["outside_phases_us_per_call"] = {name: _interval(outside[name], 1e6) for name in outside}
    if "empty" in per_call:
        record["phase_difference_us_per_call"] = {
            p: _interval([a[i] - b[i] for a, b in zip(per_call["fused"], per_call["empty"])], 1e6)
            for i, p in enumerate(PHASES)}
    return record


def report(record: dict, machine: dict, commit: str, when: str) -> str:
    lines = [f"MIRA in the running network (benchmarks.in_situ): commit {commit}, {when}",
             f"machine: {_pairs.cpu_line(machine)}, {machine['torch_threads']} threads, "
             f"load {machine.get('load_average_1m', float('nan')):.1f}",
             f"batch {record['batch']}, {record['rounds']} interleaved rounds of "
             + " / ".join(record["qkv_ms_per_forward"]) + "; "
             f"backbone median {record['backbone_ms']:.1f} ms; qkv per forward: "
             + ", ".join(f"{k} {v:.2f} ms" for k, v in record["qkv_ms_per_forward"].items()),
             "over the backbone's forward (median per-round difference [95% CI]):"]
    for label, iv in record["over_backbone_percent"].items():
        lines.append(f"  {label:<44} {iv['median']:+.3f}% [{iv['lo']:+.3f}, {iv['hi']:+.3f}]")
    iv = record["fused_over_stock_us_per_block"]
    lines.append(f"MIRA's qkv over the stock nn.Linear's: {iv['median']:.1f} us per block "
                 f"[{iv['lo']:.1f}, {iv['hi']:.1f}]")
    if "fused_over_empty_us_per_block" in record:
        iv = record["fused_over_empty_us_per_block"]
        lines.append(f"MIRA's qkv over the empty-memory op's: {iv['median']:.1f} us per block "
                     f"[{iv['lo']:.1f}, {iv['hi']:.1f}]")
    if "phase_difference_us_per_call" in record:
        lines.append("  by the op's phases (MIRA - empty-memory op, median per call, us):")
        for p, d in record["phase_difference_us_per_call"].items():
            lines.append(f"    {p:<10} {d['median']:+8.1f} [{d['lo']:+.1f}, {d['hi']:+.1f}]   "
                         f"(MIRA {record['phases_us_per_call']['fused'][p]:.1f}, "
                         f"empty {record['phases_us_per_call']['empty'][p]:.1f})")
    if "outside_phases_us_per_call" in record:
        lines.append("  outside the op's phases (the layer's Python, the eval plan's checks, the binding, the "
                     "return; median per call, us): "
                     + ", ".join(f"{'MIRA' if name == 'fused' else 'empty-memory op'} {iv['median']:.1f} "
                                 f"[{iv['lo']:.1f}, {iv['hi']:.1f}]"
                                 for name, iv in record["outside_phases_us_per_call"].items()))
    if "layers_fused_over_empty_us_per_block" in record:
        lines.append("the other layers, MIRA model over the empty-memory op's (median per round, us per block):")
        for path, d in record["layers_fused_over_empty_us_per_block"].items():
            lines.append(f"    {path:<28} {d['median']:+8.1f} [{d['lo']:+.1f}, {d['hi']:+.1f}]")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.in_situ", description=__doc__.split("\n\n")[0],
                                     formatter_class=_cli.HelpFormatter)
    parser.add_argument("--batch", type=_cli.positive_int, default=1, help="batch size")
    parser.add_argument("--rounds", type=int, default=200, help="interleaved rounds (each runs all three variants)")
    parser.add_argument("--threads", type=_cli.non_negative_int, default=2,
                        help="torch threads (0: torch's own choice)")
    parser.add_argument("--layers", action="store_true",
                        help="also time every block's other layers (which of them the adapter slows down)")
    parser.add_argument("--json", default=None, help="also write the record here")
    args = parser.parse_args(argv)
    if args.json and (problem := _cli.output_problem(args.json, folder=False)):
        parser.error(f"--json: {problem}")
    if args.rounds < MIN_ROUNDS:
        parser.error(f"--rounds: at least {MIN_ROUNDS} rounds make a 95% interval, got {args.rounds}")
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = _pairs.machine_info()  # before the rounds: its load average is the machine's, not theirs
    record = measure(args.batch, args.rounds, layers=args.layers)
    commit = latency.git_commit()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    print(report(record, machine, commit, when))
    if args.json:
        with _cli.whole_or_not_at_all(), open(args.json, "w") as f:
            f.write(_pairs.record_json({"commit": commit, "time": when, "machine": machine, **record}, indent=1))
    return record


if __name__ == "__main__":
    sys.exit(_cli.run_main(main))
