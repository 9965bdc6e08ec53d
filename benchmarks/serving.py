"""What serving a MIRA model costs: stock backbone, live MIRA, folded / merged, and the export paths.

``python -m benchmarks.serving`` builds a timm ViT (default ``vit_base_patch16_224``, fp32,
eval, random weights: latency does not depend on their values) with MIRA in the published
configuration (every block, Q and V slices, r = 4, N = 30 random adapters keyed by the queries of
random images, identity query, affine separation, inference stage), exports it once (dynamic batch) by every path,
checks each against eager, then times every path interleaved in one process, per batch size:

* ``stock``: the plain timm model without MIRA (the reference of every ratio: what a user
  pays over the backbone);
* ``live``: the attached model in eager PyTorch, fused CPU kernel (memory retrieval per image);
* ``folded``: after ``mira.fold`` with the mean retrieval weights of a calibration batch, still
  wrapped (each qkv is one extra module call around ``nn.Linear``); ``mira.unload`` then gives
  exactly ``stock``'s graph;
* ``merged``: the adaptation stage with a nonzero live LoRA after ``mira.merge`` (the same graph
  as folded; checked against that LoRA model unmerged, ``lora``, which is timed only when asked);
* ``compile``: ``torch.compile`` of the live model (default mode; the fused op stays one call);
* ``export``: the ``torch.export`` program's ``.module()`` (the fused op as one node);
* ``aoti``: the AOTInductor package (``mira.export.export_aoti``), calling the fused op;
* ``onnxruntime``: the ONNX model (the op decomposed into standard ops) in onnxruntime, with as
  many intra-op threads as torch uses.

Correctness first: before any timing, every path's output on ``--judge-batch`` (16) images is
judged against the same model run eagerly in float64 (:func:`mira.export.check_against_float64`):
its error must be within 2x the error of eager fp32 itself (another operation order may not be
worse than PyTorch's own), else the run stops. Folded differs from live by design (mean weights,
not each image's) and is not judged. Why not a fixed tolerance: the error of an fp32 run depends on
the model's conditioning, not only on its depth and width. With untrained U(-1, 1) keys the affine
separation divides by a sum of signed cosines that is small for some images (the sum of |weights|
reached 100 in some blocks of ViT-B), so fp32 rounding in the scores is amplified, differently in
every operation order: eager fp32 was then 6.5e-3 from float64 at B=8 (the stock backbone: 1.9e-6),
onnxruntime 6.7e-3, the decomposed program run by PyTorch 2.5e-3, while the decomposition in float64
matched eager float64 to 2e-11 (so no defect; plain reassociation). Hence the keys here are queries
of images, as trained keys are, and the check is sharp.

Statistic: median over rounds of the per-round ratio path / stock (and path / live), with a
distribution-free 95% interval (:mod:`benchmarks._pairs`); each record names its interval method
(``interval``), and the summary labels every ratio by its own record's method: records without the field
were made before b6536ba and hold percentile-bootstrap intervals. Results go to a scratch folder
(``build/bench/serving``) unless ``--record`` appends them to ``benchmarks/results/serving.{jsonl,md}``:
one jsonl line and one table per batch size, written as soon as that batch size is timed (a run
stopped later keeps them; the lines of one run share its ``timestamp``).
The record holds the machine (CPU, ISA variant of the MIRA kernel, threads, load) and the commit.

The AOTInductor and ONNX files are kept in ``build/bench/serving/cache/<model, slots, torch,
commit>/`` and reused, so a timing run can skip minutes of compiling: build them first with
``--build-only`` (as a heavy job), then time (as a quiet one); a reused file is judged against
float64 like a fresh one. ``torch.compile`` reuses Inductor's own on-disk cache.

Usage::

    python -m benchmarks.serving                              # ViT-B/16, batch 1 and 8, every path
    python -m benchmarks.serving --build-only                 # compile the exports into the cache
    python -m benchmarks.serving --batch-sizes 8 --record     # then time one batch size per run
    python -m benchmarks.serving --paths folded export --batch-sizes 1 --budget 20
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import timm
import torch

import mira
from benchmarks import _cli, _pairs
from mira.export import check_against_float64, export_aoti, export_onnx, export_program, load_aoti

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCRATCH_DIR = Path(__file__).resolve().parent.parent / "build" / "bench" / "serving"
CACHE_DIR = SCRATCH_DIR / "cache"
PATHS = ("folded", "lora", "merged", "compile", "export", "aoti", "onnxruntime")
DEFAULT_PATHS = ("folded", "merged", "compile", "export", "aoti", "onnxruntime")
EXPORTED = ("export", "aoti", "onnxruntime")
# The eager model each path must reproduce (folded is a mean by design: not judged).
# What an exported file bakes in: the code, and the model this file builds.
CODE_DIRS = ("mira", "mira_kernels", "csrc", "benchmarks/serving.py")
JUDGED_AGAINST = {"compile": "live", "export": "live", "aoti": "live", "onnxruntime": "live", "merged": "lora"}
# How the 95% intervals of a record were computed, stored in it: _pairs used a percentile bootstrap until
# b6536ba (the records of 2026-12-03 hold those and no such field), order statistics since.
INTERVAL = "distribution-free"
LEGACY_INTERVAL = "percentile bootstrap"
INTERVAL_LABELS = {INTERVAL: "distribution-free 95% interval", LEGACY_INTERVAL: "95% bootstrap interval"}


def log(msg: str) -> None:
    print(f"[serving {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_models(name: str, slots: int, seed: int = 0, **model_kwargs) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(stock backbone, attached copy in the inference stage holding ``slots`` random adapters per block).

    Each adapter's key is a block's query of one random "task" image, as a trained key sits near its
    task's queries. Keys drawn U(-1, 1) (the untrained init) make the affine separation divide by a
    sum of signed cosines that is near zero for some images, which amplifies fp32 rounding into
    errors of 1e-2 in any operation order and leaves nothing sharp to judge the exports with.
    """
    torch.manual_seed(seed)
    stock = timm.create_model(name, pretrained=False, **model_kwargs).eval()
    model = copy.deepcopy(stock)
    mira.attach(model)
    g = torch.Generator().manual_seed(seed)
    projections = mira.projections(model)
    queries = {}
    hooks = [p.register_forward_pre_hook(lambda mod, args: queries.__setitem__(mod, mod.memory.make_query(args[0])))
             for p in projections]
    task_images = torch.randn(slots, 3, *model.patch_embed.img_size, generator=g)
    with torch.no_grad():
        model(task_images)  # the memories are empty: each block sees the backbone's features
        for h in hooks:
            h.remove()
        for p in projections:
            c = p.memory.config
            p.memory.append(torch.randn(slots, c.num_slices, c.rank, c.d_in, generator=g) / c.d_in ** 0.5,
                            torch.randn(slots, c.num_slices, c.slice_width, c.rank, generator=g) * 0.05,
                            queries[p])
    return stock, mira.set_stage(model, "inference")


def _with_live_lora(model: torch.nn.Module) -> torch.nn.Module:
    """A copy in the adaptation stage whose LoRA is nonzero (as after training)."""
    lora = mira.set_stage(copy.deepcopy(model), "adaptation")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in mira.projections(lora):
            p.lora_b.copy_(torch.randn(p.lora_b.shape, generator=g) * 0.05)
    return lora


def cache_dir(args, model_kwargs: dict | None) -> Path:
    """Where this configuration's compiled exports are kept: one folder per model, slots, torch and
    version of the code they bake in (the last commit touching it, "+dirty" when edited since)."""
    kwargs = "-".join(f"{k}{v}" for k, v in sorted((model_kwargs or {}).items()))
    key = f"{args.model}-{kwargs}-n{args.slots}-torch{torch.__version__}-{git_commit(CODE_DIRS)}"
    return args.cache / re.sub(r"[^A-Za-z0-9_.+-]", "_", key)


def _cached(path: Path, build, build_s: dict, step: str) -> Path:
    """Build ``path`` unless a previous run left it (a failed build leaves nothing behind)."""
    if path.is_file():
        log(f"{step}: reusing {path}")
        return path
    t0 = time.perf_counter()
    partial = path.with_name(path.stem + ".partial" + path.suffix)
    try:
        build(partial)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    build_s[step] = time.perf_counter() - t0
    return path


def build_paths(model, which, calibration: torch.Tensor, workdir: Path) -> tuple[dict, dict, dict]:
    """({path: callable(x) -> output}, {reference name: eager model}, {build step: seconds}).

    Exports are built once with a dynamic batch; AOTInductor and ONNX files are reused from
    ``workdir`` when present.
    """
    runners, references, build_s = {}, {}, {}
    if "folded" in which:
        t0 = time.perf_counter()
        folded = copy.deepcopy(model)
        mira.fold(folded, mira.mean_retrieval_weights(folded, [calibration], progress=False))
        build_s["fold"] = time.perf_counter() - t0
        runners["folded"] = folded
    if "lora" in which or "merged" in which:
        lora = references["lora"] = _with_live_lora(model)
        if "lora" in which:
            runners["lora"] = lora
        if "merged" in which:
            runners["merged"] = mira.merge(copy.deepcopy(lora))
    if "compile" in which:
        runners["compile"] = torch.compile(model, dynamic=False)  # one static graph per batch size, as served
    if any(p in which for p in EXPORTED):
        workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        program = export_program(model, calibration)
        build_s["export"] = time.perf_counter() - t0
        if "export" in which:
            runners["export"] = program.module()
        if "aoti" in which:
            log("AOTInductor package (a compile takes minutes on a small machine)")
            package = _cached(workdir / "model.pt2", lambda p: export_aoti(program, calibration, p), build_s, "aoti")
            runners["aoti"] = load_aoti(package)
        if "onnxruntime" in which:
            onnx = _cached(workdir / "model.onnx", lambda p: export_onnx(program, calibration, p), build_s, "onnx")
            runners["onnxruntime"] = _onnx_runner(onnx)
    return runners, references, build_s


def _onnx_runner(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.numpy()})[0]


def max_err(a, b) -> float:
    return float((torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max())


def judge(runners: dict, references: dict, x: torch.Tensor) -> dict:
    """Each judged path against its eager model in float64; raises before any timing if one fails.

    Returns {path: {"error", "bound", "eager_error"}} (errors against float64).
    """
    verdicts = {}
    for ref_name in sorted({JUDGED_AGAINST[p] for p in runners if p in JUDGED_AGAINST}):
        outputs = {p: runners[p](x) for p in runners if JUDGED_AGAINST.get(p) == ref_name}
        check = check_against_float64(references[ref_name], x, outputs)
        for p, e in check.errors.items():
            verdicts[p] = {"error": e, "bound": check.bound, "eager_error": check.eager_error}
            log(f"{p}: error vs float64 {e:.2e} (eager {ref_name} fp32's own {check.eager_error:.2e}, "
                f"bound {check.bound:.2e})")
        check.raise_if_failed()
    return verdicts


def run(args, model_kwargs: dict | None = None, on_batch=None) -> dict:
    """Build, judge and time; returns the record of the whole run.

    ``on_batch(record)`` is called after each batch size with a record holding that batch size's
    result alone, so a caller can keep what was measured even if a later batch size never ends.
    """
    if args.threads:
        torch.set_num_threads(args.threads)
    stock, model = build_models(args.model, args.slots, **(model_kwargs or {}))
    img = model.patch_embed.img_size
    inputs = {b: torch.randn(b, 3, *img, generator=torch.Generator().manual_seed(b)) for b in args.batch_sizes}
    # The calibration (and export example) batch does not depend on which batch sizes are timed.
    calibration = torch.randn(8, 3, *img, generator=torch.Generator().manual_seed(8))
    # Judged on one batch of many images: the error of an fp32 run is dominated by its worst-conditioned
    # image (the affine separation divides by a sum of signed cosines), so a max over a few images is
    # noise; over a dozen or more it is a stable statistic. The exports have a dynamic batch: one
    # judgement covers every batch size.
    judge_x = torch.randn(args.judge_batch, 3, *img, generator=torch.Generator().manual_seed(1000))
    results = []
    header = {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(), "machine": _pairs.machine_info(), "interval": INTERVAL,
        "config": {"model": args.model, "model_kwargs": model_kwargs or {}, "slots": args.slots,
                   "threads": torch.get_num_threads(), "paths": list(args.paths), "dtype": "float32",
                   "judge_batch": args.judge_batch},
    }
    with torch.no_grad():
        log(f"{args.model}: building {args.paths}")
        runners, references, build_s = build_paths(model, args.paths, calibration, cache_dir(args, model_kwargs))
        if "compile" in runners:  # compile (or reuse Inductor's cache) for every shape it will see, untimed
            t0 = time.perf_counter()
            for x in (judge_x, *inputs.values()):
                runners["compile"](x)
            build_s["compile"] = time.perf_counter() - t0
        references = {"live": model, **references}
        runners = {"stock": stock, "live": model, **runners}
        t0 = time.perf_counter()
        verdicts = judge(runners, references, judge_x)
        log(f"judged against float64 on {args.judge_batch} images in {time.perf_counter() - t0:.0f} s")
        if args.build_only:
            return {"build_s": build_s}
        for batch, x in inputs.items():
            live_out = model(x)
            errors = {name: max_err(run_(x), live_out) for name, run_ in runners.items() if name != "live"}
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
            if on_batch is not None:
                on_batch({**header, "build_s": build_s, "vs_float64": verdicts, "results": results[-1:]})
    return {**header, "build_s": build_s, "vs_float64": verdicts, "results": results}


def git_commit(paths: tuple[str, ...] = ()) -> str:
    """Short commit of this tree (of the last change to ``paths`` when given), with "+dirty" when
    tracked files (under ``paths``) differ from it. The recorded results are not part of the tree a
    figure was measured on, so a run right after a recorded one is not called dirty."""
    root = Path(__file__).resolve().parent.parent
    where = list(paths) or [".", f":(exclude){RESULTS_DIR.relative_to(root)}"]
    try:
        head = subprocess.run(["git", "log", "-1", "--format=%h", "HEAD", "--", *paths], capture_output=True,
                              text=True, check=True, cwd=root).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", *where], cwd=root).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def _ratio_text(r: dict) -> str:
    """A ratio with its 95% interval; one from fewer than 6 rounds has none (unbounded in the run, null in
    serving.jsonl: ``_pairs.record_json``)."""
    lo, hi = (math.nan if v is None else v for v in (r["lo"], r["hi"]))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{r['ratio']:.3f} [no interval: {r['pairs']} rounds]"
    return f"{r['ratio']:.3f} [{lo:.3f}, {hi:.3f}]"


def format_table(record: dict) -> str:
    m, c = record["machine"], record["config"]
    lines = [
        f"MIRA serving: {c['model']}, N = {c['slots']} slots per block, {c['dtype']}, {c['threads']} torch threads, "
        f"commit {record['commit']}",
        f"machine: {_pairs.cpu_line(m)}; {m['logical_cpus']} logical CPUs; torch {m['torch']}; "
        f"load {m.get('load_average_1m', float('nan')):.1f}; {record['timestamp']}",
        "",
        f"{'batch':>5}  {'path':<12} {'median ms':>10}  {'vs stock (95% CI)':<26} {'vs live':>8} "
        f"{'max|diff| vs live':>18}  {'error vs float64 (bound)':<24}",
    ]
    for res in record["results"]:
        for name, ms in res["median_ms"].items():
            r = res["ratio_vs_stock"].get(name)
            ratio = "1 (reference)" if r is None else _ratio_text(r)
            live = res["ratio_vs_live"].get(name)
            live_text = "1" if live is None else f"{live['ratio']:.3f}"
            err = res["max_abs_diff_vs_live"].get(name)
            err_text = "" if err is None else f"{err:.2e}"
            v = record.get("vs_float64", {}).get(name)
            f64_text = "" if v is None else f"{v['error']:.2e} ({v['bound']:.2e})"
            lines.append(f"{res['batch']:>5}  {name:<12} {ms:>10.2f}  {ratio:<26} {live_text:>8} {err_text:>18}  "
                         f"{f64_text}")
        lines.append(f"{'':>5}  rounds {res['rounds']} (stopped by {res['stopped_by']})")
    builds = ", ".join(f"{k} {v:.1f} s" for k, v in record["build_s"].items())
    lines += [f"build times: {builds or 'none'}",
              "folded: mean retrieval weights of a calibration batch, so it differs from live by design; "
              "stock: no MIRA at all",
              f"error vs float64 (on {record['config']['judge_batch']} images): bound = 2 x the error of the eager "
              "fp32 model (live; lora for merged) against its float64 run, + 1e-6 x max(1, |output|)"]
    return "\n".join(lines)


SUMMARY_ORDER = ("stock", "live", "folded", "lora", "merged", "compile", "export", "aoti", "onnxruntime")
WHAT_RUNS = {
    "stock": "timm ViT without MIRA",
    "live": "attached model, eager PyTorch (fused CPU kernel)",
    "folded": "mira.fold (mean retrieval weights), still wrapped",
    "lora": "adaptation stage, live LoRA unmerged",
    "merged": "mira.merge of the live LoRA",
    "compile": "torch.compile of the live model",
    "export": "torch.export program .module()",
    "aoti": "AOTInductor package (mira.export.export_aoti)",
    "onnxruntime": "ONNX (op decomposed) in onnxruntime",
}


def _same_setup(a: dict, b: dict) -> bool:
    """Whether two records timed the same model on the same machine (so their rows share a table)."""
    same_config = all(a["config"].get(k) == b["config"].get(k)
                      for k in ("model", "model_kwargs", "slots", "threads", "dtype"))
    return same_config and all(a["machine"].get(k) == b["machine"].get(k) for k in ("cpu", "family", "model_id"))


def _interval_of(record: dict) -> str:
    """The interval method of a record's ratios (a record without the field predates it: bootstrap)."""
    return record.get("interval", LEGACY_INTERVAL)


def summary_markdown(records: list[dict]) -> str:
    """One markdown table of every path at every batch size, from the newest record timing it (the
    records of the newest run's setup only: model, slots, threads, dtype, CPU).

    Each ratio comes from one process (the path and its reference timed interleaved); a path and
    its reference are never compared across runs. The intervals are labelled by their records' method:
    in the header when every cell shares one, else in each ratio cell and each run's line."""
    records = [r for r in records if r.get("results")]
    if not records:
        return ""
    newest = records[-1]
    records = [r for r in records if _same_setup(r, newest)]
    cells: dict = {}  # (path, batch) -> (record, result)
    for record in records:  # later records replace earlier ones
        for res in record["results"]:
            for name in res["median_ms"]:
                cells[(name, res["batch"])] = (record, res)
    batches = sorted({b for _, b in cells})
    names = [n for n in SUMMARY_ORDER if any((n, b) in cells for b in batches)]
    methods = sorted({_interval_of(record) for record, _ in cells.values()})
    mixed = len(methods) > 1
    if mixed:
        interval_text = "95% interval of the method its run names (next to each ratio and in the list of runs)"
    else:
        method = methods[0] if methods else _interval_of(newest)
        interval_text = INTERVAL_LABELS.get(method, f"95% {method} interval")
    m, c = newest["machine"], newest["config"]
    kwargs = ", ".join(f"{k}={v}" for k, v in c["model_kwargs"].items())
    lines = [
        f"### Serving paths: {c['model']}{f' ({kwargs})' if kwargs else ''}, N = {c['slots']} slots per block, "
        f"{c['dtype']}, {c['threads']} torch threads",
        "",
        f"Machine: {_pairs.cpu_line(m)}; {m['logical_cpus']} logical CPUs; torch {m['torch']}.",
        "Works: the path's output on the judged images is within the bound of the float64 eager model "
        "(2x eager fp32's own error + 1e-6 x max(1, |output|)); folded differs by design (mean weights) and "
        f"is not judged. Ratios: median over interleaved rounds of the per-round ratio, {interval_text}, "
        "path and reference timed in one process.",
        "",
        "| path | what runs | works: error vs float64 (bound) | "
        + " | ".join(f"B={b} ms | B={b} vs live | B={b} vs stock" for b in batches) + " |",
        "|---|---|---|" + "---:|---:|---:|" * len(batches),
    ]

    used = []  # the runs that fill cells, numbered in the order they ran
    for record in records:
        if any(cell[0] is record for cell in cells.values()):
            used.append(record)
    run_no = {id(record): k for k, record in enumerate(used, 1)}

    def ratio_text(r, record):
        if r is None:
            return ""
        return _ratio_text(r) + (f" ({_interval_of(record)})" if mixed else "")

    for name in names:
        verdicts = [rec["vs_float64"][name] for rec, _ in (cells[(name, b)] for b in batches if (name, b) in cells)
                    if name in rec.get("vs_float64", {})]
        if name in ("stock", "live", "lora"):
            works = "reference" if name != "stock" else "no MIRA"
        elif name == "folded":
            works = "not judged (a mean by design)"
        elif verdicts:
            worst = max(verdicts, key=lambda v: v["error"] / v["bound"])
            works = f"yes: {worst['error']:.2e} ({worst['bound']:.2e})"
        else:
            works = "not judged"
        row = [name, WHAT_RUNS.get(name, ""), works]
        for b in batches:
            if (name, b) not in cells:
                row += ["not timed"] * 3
                continue
            record, res = cells[(name, b)]
            row += [f"{res['median_ms'][name]:.1f} (run {run_no[id(record)]})",
                    "1" if name == "live" else ratio_text(res["ratio_vs_live"].get(name), record),
                    "1" if name == "stock" else ratio_text(res["ratio_vs_stock"].get(name), record)]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Runs (each cell comes from the newest run timing that path at that batch size; milliseconds "
              "from different runs saw different machine states, so compare the ratios):", ""]
    for k, record in enumerate(used, 1):
        for res in record["results"]:
            lines.append(f"{k}. {record['timestamp']}, commit {record['commit']}, batch {res['batch']}: "
                         f"{', '.join(res['median_ms'])}; {res['rounds']} rounds (stopped by {res['stopped_by']}), "
                         f"load {record['machine'].get('load_average_1m', float('nan')):.1f}"
                         + (f"; {_interval_of(record)} intervals" if mixed else ""))
    return "\n".join(lines) + "\n"


def write_summary(out: Path) -> str:
    """Rewrite ``out/serving_summary.md`` from every record in ``out/serving.jsonl``; returns its text."""
    source = out / "serving.jsonl"
    if not source.is_file():
        raise SystemExit(f"no {source} to summarize (run the benchmark first)")
    records = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    text = summary_markdown(records)
    (out / "serving_summary.md").write_text(text)
    return text


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.split("\n")[0],
                                formatter_class=_cli.HelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224", help="timm model name (random weights)")
    p.add_argument("--batch-sizes", type=_cli.positive_int, nargs="+", default=[1, 8],
                   help="batch sizes, timed one after another (each is written as soon as it is timed)")
    p.add_argument("--slots", type=_cli.positive_int, default=30, help="stored adapters per block (N)")
    p.add_argument("--paths", nargs="+", default=list(DEFAULT_PATHS), choices=PATHS,
                   help="paths timed besides stock and live")
    p.add_argument("--budget", type=_cli.non_negative_float, default=45.0,
                   help="seconds of timed rounds per batch size")
    p.add_argument("--width", type=_cli.positive_float, default=0.02,
                   help="stop when every ratio's 95%% CI is this narrow")
    p.add_argument("--min-rounds", type=_cli.positive_int, default=10,
                   help="timed rounds at least, whatever the budget")
    p.add_argument("--judge-batch", type=_cli.positive_int, default=16,
                   help="images in the float64 check of every path")
    p.add_argument("--threads", type=_cli.non_negative_int, default=0, help="torch threads (0: torch's own choice)")
    p.add_argument("--record", action="store_true",
                   help=f"append to {RESULTS_DIR.relative_to(RESULTS_DIR.parent.parent)}/ instead of {SCRATCH_DIR}")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (None: the scratch folder, or benchmarks/results/ with --record)")
    p.add_argument("--cache", type=Path, default=CACHE_DIR, help="folder of reusable AOTInductor / ONNX files")
    p.add_argument("--build-only", action="store_true", help="build the exports into --cache, time nothing")
    p.add_argument("--summarize", action="store_true",
                   help="only rewrite serving_summary.md from the output folder's serving.jsonl")
    return p


def main(argv=None, model_kwargs: dict | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    out = args.out or (RESULTS_DIR if args.record else SCRATCH_DIR)
    if not args.summarize and (problem := _cli.timm_model_problem(args.model)):  # not after the exports' build
        p.error(f"--model: {problem}")
    if problem := _cli.repeated_problem("--batch-sizes", args.batch_sizes):
        p.error(problem)
    # Before the run, not when its first batch size is written (after the exports are built and judged).
    for flag, folder in (("--out", out), ("--cache", None if args.summarize else args.cache)):
        if folder is not None and (problem := _cli.output_problem(folder, folder=True)):
            p.error(f"{flag}: {problem}")
    if args.summarize:
        if not (out / "serving.jsonl").is_file():
            p.error(f"--summarize: no {out / 'serving.jsonl'} to summarize (run the benchmark first, or name its "
                    "folder with --out)")
        print(write_summary(out), end="")
        return 0

    def write(record: dict) -> None:  # one jsonl line and one table per batch size, as soon as it is timed
        table = format_table(record)
        print(table, flush=True)
        out.mkdir(parents=True, exist_ok=True)
        with _cli.whole_or_not_at_all():  # no half line in the history a Ctrl-C would leave
            with open(out / "serving.jsonl", "a") as f:
                f.write(_pairs.record_json(record) + "\n")
            with open(out / "serving.md", "a") as f:
                f.write("```\n" + table + "\n```\n\n")
            write_summary(out)
        log(f"wrote batch {record['results'][0]['batch']} to {out / 'serving.jsonl'}, serving.md and "
            "serving_summary.md")

    record = run(args, model_kwargs, on_batch=None if args.build_only else write)
    if args.build_only:
        log(f"built {record['build_s'] or 'nothing new'} in {cache_dir(args, model_kwargs)}")
    return 0


if __name__ == "__main__":
    sys.exit(_cli.run_main(main))
