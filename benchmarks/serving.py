"""What serving a MIRA model costs: stock backbone, live MIRA, folded / merged, and the export paths.

``python -m benchmarks.serving`` builds a timm ViT (default ``vit_base_patch16_224``, fp32,
eval, random weights: latency does not depend on their values) with MIRA in the published
configuration (every block, Q and V slices, r = 4, N = 30 random adapters and keys, identity
query, affine separation, inference stage), exports it once (dynamic batch) by every path,
checks each against eager, then times every path interleaved in one process, per batch size:

* ``stock``: the plain timm model without MIRA (the reference of every ratio: what a user
  pays over the backbone);
* ``live``: the attached model in eager PyTorch, fused CPU kernel (memory retrieval per image);
* ``folded``: after ``mira.fold`` with the mean retrieval weights of a calibration batch, still
  wrapped (each qkv is one extra module call around ``nn.Linear``); ``mira.unload`` then gives
  exactly ``stock``'s graph;
* ``lora`` / ``merged`` (not in the default set): the adaptation stage with a nonzero live LoRA,
  unmerged / after ``mira.merge`` (merged runs the same graph as folded);
* ``export``: the ``torch.export`` program's ``.module()`` (the fused op as one node);
* ``aoti``: the AOTInductor package (``mira.export.export_aoti``), calling the fused op;
* ``onnxruntime``: the ONNX model (the op decomposed into standard ops) in onnxruntime, with as
  many intra-op threads as torch uses.

Statistic: median over rounds of the per-round ratio path / stock (and path / live), with a
bootstrap 95% interval (:mod:`benchmarks._pairs`). Each path's max |difference| from ``live`` is
printed beside it (folded differs by design: the mean weights are not each image's). Results go
to a scratch folder (``build/bench/serving``) unless ``--record`` writes them to
``benchmarks/results/serving.{jsonl,md}``. The record holds the machine (CPU, ISA variant of the
MIRA kernel, threads, load) and the commit. Wrap timing runs in ``/work/tools/quiet`` on shared
machines; the exports (the AOTInductor compile takes minutes on 2 cores) run before the timed
rounds.

Usage::

    python -m benchmarks.serving                              # ViT-B/16, batch 1 and 8
    python -m benchmarks.serving --paths folded export --batch-sizes 1 --budget 20
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import subprocess
import tempfile
import time
from pathlib import Path

import timm
import torch

import mira
from benchmarks import _pairs
from mira.export import export_aoti, export_onnx, export_program, load_aoti

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCRATCH_DIR = Path(__file__).resolve().parent.parent / "build" / "bench" / "serving"
PATHS = ("folded", "lora", "merged", "export", "aoti", "onnxruntime")
DEFAULT_PATHS = ("folded", "export", "aoti", "onnxruntime")
EXPORTED = ("export", "aoti", "onnxruntime")


def log(msg: str) -> None:
    print(f"[serving {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_models(name: str, slots: int, seed: int = 0, **model_kwargs) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(stock backbone, attached copy in the inference stage holding ``slots`` random adapters per block)."""
    torch.manual_seed(seed)
    stock = timm.create_model(name, pretrained=False, **model_kwargs).eval()
    model = copy.deepcopy(stock)
    mira.attach(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for memory in mira.memories(model):
            c = memory.config
            memory.append(torch.randn(slots, c.num_slices, c.rank, c.d_in, generator=g) / c.d_in ** 0.5,
                          torch.randn(slots, c.num_slices, c.slice_width, c.rank, generator=g) * 0.05,
                          generator=g)
    return stock, mira.set_stage(model, "inference")


def _with_live_lora(model: torch.nn.Module) -> torch.nn.Module:
    """A copy in the adaptation stage whose LoRA is nonzero (as after training)."""
    lora = mira.set_stage(copy.deepcopy(model), "adaptation")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in mira.projections(lora):
            p.lora_b.copy_(torch.randn(p.lora_b.shape, generator=g) * 0.05)
    return lora


def max_err(a, b) -> float:
    return float((torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max())


def build_paths(model, which, calibration: torch.Tensor, workdir: Path) -> tuple[dict, dict]:
    """({path: callable(x) -> output}, {build step: seconds}); exports are built once, batch dynamic."""
    runners, build_s = {}, {}
    if "folded" in which:
        t0 = time.perf_counter()
        folded = copy.deepcopy(model)
        mira.fold(folded, mira.mean_retrieval_weights(folded, [calibration], progress=False))
        build_s["fold"] = time.perf_counter() - t0
        runners["folded"] = folded
    if "lora" in which or "merged" in which:
        lora = _with_live_lora(model)
        if "lora" in which:
            runners["lora"] = lora
        if "merged" in which:
            runners["merged"] = mira.merge(copy.deepcopy(lora))
    if any(p in which for p in EXPORTED):
        t0 = time.perf_counter()
        program = export_program(model, calibration)
        build_s["export"] = time.perf_counter() - t0
        if "export" in which:
            runners["export"] = program.module()
        if "aoti" in which:
            log("AOTInductor compile (minutes on a small machine)")
            t0 = time.perf_counter()
            runners["aoti"] = load_aoti(export_aoti(program, calibration, workdir / "model.pt2"))
            build_s["aoti"] = time.perf_counter() - t0
        if "onnxruntime" in which:
            runners["onnxruntime"] = _onnx_runner(program, calibration, workdir / "model.onnx", build_s)
    return runners, build_s


def _onnx_runner(program, example: torch.Tensor, path: Path, build_s: dict):
    import onnxruntime as ort

    t0 = time.perf_counter()
    export_onnx(program, example, path)
    build_s["onnx"] = time.perf_counter() - t0
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.numpy()})[0]


def check_exports(errors: dict, scale: float) -> None:
    """Exported paths must match eager to fp32 rounding of another op order; fail before timing."""
    bound = 1e-4 * max(1.0, scale)
    for path in EXPORTED:
        if path in errors and errors[path] > bound:
            raise AssertionError(f"{path} differs from eager by {errors[path]:.3e} > {bound:.3e}")


def run(args, model_kwargs: dict | None = None) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    stock, model = build_models(args.model, args.slots, **(model_kwargs or {}))
    img = model.patch_embed.img_size
    inputs = {b: torch.randn(b, 3, *img, generator=torch.Generator().manual_seed(b)) for b in args.batch_sizes}
    calibration = inputs[max(inputs)] if max(inputs) > 1 else torch.cat([inputs[max(inputs)]] * 2)
    results = []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        log(f"{args.model}: building {args.paths}")
        runners, build_s = build_paths(model, args.paths, calibration, Path(tmp))
        runners = {"stock": stock, "live": model, **runners}
        for batch, x in inputs.items():
            live_out = model(x)
            errors = {name: max_err(run_(x), live_out) for name, run_ in runners.items() if name != "live"}
            check_exports(errors, float(live_out.abs().max()))
            calls = {name: (lambda r=run_, x=x: r(x)) for name, run_ in runners.items()}
            log(f"batch {batch}: timing {list(calls)} interleaved (budget {args.budget:.0f} s)")
            timed = _pairs.time_interleaved(calls, watch=[(n, "stock") for n in calls if n != "stock"],
                                            target_width=args.width, budget_s=args.budget,
                                            min_rounds=args.min_rounds, check_every=5)
            results.append({
                "batch": batch, "max_abs_diff_vs_live": errors,
                "median_ms": {n: 1e3 * timed.median(n)["seconds"] for n in calls},
                "ratio_vs_stock": {n: timed.ratio(n, "stock") for n in calls if n != "stock"},
                "ratio_vs_live": {n: timed.ratio(n, "live") for n in calls if n != "live"},
                "rounds": timed.rounds, "stopped_by": timed.stopped_by,
            })
    return {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(), "machine": _pairs.machine_info(),
        "config": {"model": args.model, "model_kwargs": model_kwargs or {}, "slots": args.slots,
                   "threads": torch.get_num_threads(), "paths": list(args.paths), "dtype": "float32"},
        "build_s": build_s, "results": results,
    }


def git_commit() -> str:
    """Short commit of this tree, with "+dirty" when tracked files differ from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=root).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=root).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def format_table(record: dict) -> str:
    m, c = record["machine"], record["config"]
    lines = [
        f"MIRA serving: {c['model']}, N = {c['slots']} slots per block, {c['dtype']}, {c['threads']} torch threads, "
        f"commit {record['commit']}",
        f"machine: {m['cpu']} ({m['logical_cpus']} logical CPUs; MIRA CPU kernel ISA: "
        f"{m.get('mira_cpu_isa', 'n/a')}); torch {m['torch']}; load {m.get('load_average_1m', float('nan')):.1f}",
        "",
        f"{'batch':>5}  {'path':<12} {'median ms':>10}  {'vs stock (95% CI)':<26} {'vs live':>8} "
        f"{'max|diff| vs live':>18}",
    ]
    for res in record["results"]:
        for name, ms in res["median_ms"].items():
            r = res["ratio_vs_stock"].get(name)
            ratio = "1 (reference)" if r is None else f"{r['ratio']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}]"
            live = res["ratio_vs_live"].get(name)
            live_text = "1" if live is None else f"{live['ratio']:.3f}"
            err = res["max_abs_diff_vs_live"].get(name)
            err_text = "" if err is None else f"{err:.2e}"
            lines.append(f"{res['batch']:>5}  {name:<12} {ms:>10.2f}  {ratio:<26} {live_text:>8} {err_text:>18}")
        lines.append(f"{'':>5}  rounds {res['rounds']} (stopped by {res['stopped_by']})")
    builds = ", ".join(f"{k} {v:.1f} s" for k, v in record["build_s"].items())
    lines += [f"build times: {builds or 'none'}",
              "folded: mean retrieval weights of a calibration batch, so it differs from live by design; "
              "stock: no MIRA at all"]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--slots", type=int, default=30)
    p.add_argument("--paths", nargs="+", default=list(DEFAULT_PATHS), choices=PATHS)
    p.add_argument("--budget", type=float, default=45.0, help="seconds of timed rounds per batch size")
    p.add_argument("--width", type=float, default=0.02, help="stop when every ratio's 95%% CI is this narrow")
    p.add_argument("--min-rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--record", action="store_true", help="append to benchmarks/results/ (default: a scratch folder)")
    p.add_argument("--out", type=Path, default=None, help="output folder (overrides the default and --record)")
    return p


def main(argv=None, model_kwargs: dict | None = None) -> int:
    args = parser().parse_args(argv)
    if any(b < 1 for b in args.batch_sizes) or args.slots < 1:
        raise SystemExit("batch sizes and --slots must be >= 1")
    record = run(args, model_kwargs)
    table = format_table(record)
    print(table)
    out = args.out or (RESULTS_DIR if args.record else SCRATCH_DIR)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "serving.jsonl", "a") as f:
        f.write(json.dumps(record, default=float) + "\n")
    (out / "serving.md").write_text("```\n" + table + "\n```\n")
    log(f"wrote {out / 'serving.jsonl'} and serving.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
