"""PNG plots of the latency records (``latency.jsonl`` in a results folder).

``python -m benchmarks.plots [results_dir]`` redraws them (default: ``.bench/``; ``--record``:
``benchmarks/results/``), and when ``sweep_ops.json`` from ``benchmarks/test_sweep_ops.py`` is
there, writes its summary ``sweep_ops.md``;
``benchmarks.latency`` calls :func:`write_plots` after every run it writes. Figures:

- ``latency_overhead_vs_batch.png``: the latest record with the most batch sizes (a run with
  ``--batch-sizes 1 2 4 8 16 32`` draws the full curve). Left: what a user pays at module level,
  with the floor, the target and the decomposed (op-level) diagnostic; right: the end-to-end
  figure with the module-level one. Each panel's range holds every error bar (none is clipped).
- ``latency_overhead_vs_slots.png`` / ``latency_overhead_vs_rank.png``: the latest run that swept
  that axis (``--sweep-slots`` / ``--sweep-ranks``), op-level decomposed overheads.

Every figure carries the record's commit, date, CPU and the ISA the CPU kernel chose.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from benchmarks import _cli

__all__ = ["load_records", "sweep_summary", "write_plots"]

# Styles: each series its own colour, marker and line; targets and floors black/green lines.
STYLE = {
    "module": {"color": "tab:blue", "marker": "o", "linestyle": "-", "label": "module level (what a user pays)"},
    "e2e": {"color": "tab:orange", "marker": "^", "linestyle": "--", "label": "end to end"},
    "decomposed": {"color": "tab:purple", "marker": "s", "linestyle": ":", "label": "decomposed (diagnostic)"},
    "eager": {"color": "tab:red", "marker": "D", "linestyle": "-.", "label": "paper-style eager, decomposed"},
    "floor": {"color": "black", "marker": "x", "linestyle": "--", "label": "floor (extra MACs or bank bytes)"},
    "target": {"color": "tab:green", "marker": "_", "linestyle": "-", "markersize": 18, "linewidth": 2,
               "label": "target"},
}


def load_records(results_dir: str | Path) -> list[dict]:
    """Every record of ``latency.jsonl``, oldest first (unreadable lines are skipped)."""
    path = Path(results_dir) / "latency.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _stamp(record: dict) -> str:
    from benchmarks._pairs import cpu_line

    return f"commit {record.get('commit', '?')}, {record.get('timestamp', '?')}\n{cpu_line(record.get('machine', {}))}"


def _number(value) -> float:
    """A record's number: null (how records write a non-finite one, ``_pairs.record_json``) is NaN."""
    return math.nan if value is None else float(value)


def _bars(ax, xs, series: list[dict], style: dict) -> list[float]:
    """Error bars of (percent, lo, hi) points; returns every value drawn, for the axis range."""
    vals = [d["percent"] for d in series]
    # A point from fewer than 6 rounds has no 95% interval (unbounded, benchmarks._pairs.median_ci; null in
    # the record): drawn without a bar, and left out of the axis range.
    bounded = [math.isfinite(_number(d["lo"])) and math.isfinite(_number(d["hi"])) for d in series]
    lo = [d["percent"] - d["lo"] if b else 0.0 for d, b in zip(series, bounded)]
    hi = [d["hi"] - d["percent"] if b else 0.0 for d, b in zip(series, bounded)]
    ax.errorbar(xs, vals, yerr=[lo, hi], capsize=4, **style)
    return vals + [d[end] for d, b in zip(series, bounded) if b for end in ("lo", "hi")]


def _fit(ax, values: list[float]) -> None:
    lo, hi = min(values + [0.0]), max(values + [0.0])
    pad = 0.08 * (hi - lo) + 0.02
    ax.set_ylim(lo - pad, hi + pad)  # every bar inside: nothing clipped


def _axes(ax, xs, xlabel: str) -> None:
    import matplotlib.ticker

    ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.axhline(0.0, color="grey", linewidth=0.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("overhead over the frozen backbone (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _figure(path: Path, record: dict, title: str, draw) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    draw(axes)
    fig.suptitle(title, fontsize=10)
    fig.text(0.01, 0.01, _stamp(record), fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _batch_figure(path: Path, rec: dict) -> Path:
    from benchmarks.latency import target_for

    res = sorted(rec["results"], key=lambda r: r["batch"])
    xs = [r["batch"] for r in res]
    floors = [_number(r["floor"].get("percent")) for r in res]  # none measured on CUDA
    targets = [target_for(r["batch"], f)["percent"] for r, f in zip(res, floors)]
    c = rec["config"]

    def draw(axes) -> None:
        left, right = axes
        drawn = _bars(left, xs, [r["module"] for r in res], STYLE["module"])
        drawn += _bars(left, xs, [r["overhead"]["decomposed"] for r in res], STYLE["decomposed"])
        left.plot(xs, floors, **STYLE["floor"])
        left.plot(xs, targets, **{**STYLE["target"], "linestyle": "none"})
        _fit(left, drawn + [f for f in floors if f == f] + targets)
        left.set_title("what a user pays, module level", fontsize=9)
        _axes(left, xs, "batch size")
        drawn = _bars(right, xs, [r["end_to_end_headline"] for r in res], STYLE["e2e"])
        drawn += _bars(right, xs, [r["module"] for r in res], STYLE["module"])
        right.plot(xs, targets, **{**STYLE["target"], "linestyle": "none"})
        _fit(right, drawn + targets)
        right.set_title("end to end (noisier; intervals at full width)", fontsize=9)
        _axes(right, xs, "batch size")

    title = (f"MIRA on {c['model']} {c['dtype']}, r={c['rank']} N={c['slots']} {'/'.join(c['slices'])}, "
             f"{rec['n_blocks']} blocks: overhead vs batch size")
    return _figure(path, rec, title, draw)


def _sweep_figure(path: Path, rec: dict, axis: str, xlabel: str) -> Path:
    pts = sorted((p for p in rec["sweep"] if p["axis"] == axis), key=lambda p: p["value"])
    xs = [p["value"] for p in pts]
    floors = [p["floor"]["percent"] for p in pts]

    def draw(axes) -> None:
        left, right = axes
        drawn = _bars(left, xs, [p["overhead"]["decomposed"] for p in pts], STYLE["decomposed"])
        left.plot(xs, floors, **{**STYLE["floor"], "label": "arithmetic floor (extra MACs)"})
        _fit(left, drawn + floors)
        left.set_title("MIRA fused, decomposed (op level)", fontsize=9)
        _axes(left, xs, xlabel)
        drawn = _bars(right, xs, [p["overhead"]["eager"] for p in pts], STYLE["eager"])
        drawn += _bars(right, xs, [p["overhead"]["decomposed"] for p in pts], STYLE["decomposed"])
        _fit(right, drawn)
        right.set_title("beside the paper-style eager baseline", fontsize=9)
        _axes(right, xs, xlabel)

    other = f"r={pts[0]['rank']}" if axis == "slots" else f"N={pts[0]['slots']}"
    title = f"MIRA on {rec['config']['model']}, batch {pts[0]['batch']}, {other}: overhead vs {xlabel}"
    return _figure(path, rec, title, draw)


def write_plots(results_dir: str | Path) -> list[Path]:
    """Draws the figures the records allow; returns the paths written."""
    results_dir = Path(results_dir)
    records = [r for r in load_records(results_dir) if r.get("results") and "module" in r["results"][0]]
    written: list[Path] = []
    if records:
        most = max(len(r["results"]) for r in records)
        rec = [r for r in records if len(r["results"]) == most][-1]
        written.append(_batch_figure(results_dir / "latency_overhead_vs_batch.png", rec))
    for axis, xlabel in (("slots", "memory slots N"), ("rank", "rank r")):
        swept = [r for r in records if any(p["axis"] == axis for p in r.get("sweep", []))]
        if swept:
            written.append(_sweep_figure(results_dir / f"latency_overhead_vs_{axis}.png", swept[-1], axis, xlabel))
    return written


def sweep_summary(json_path: str | Path) -> str:
    """A markdown table of a pytest-benchmark JSON from ``benchmarks/test_sweep_ops.py``.

    One row per sweep point (group), one column block per implementation: median latency, the
    ratio to ``nn.Linear`` in the same group (medians of separate runs, not interleaved pairs),
    throughput and peak memory.
    """
    data = json.loads(Path(json_path).read_text())
    groups: dict[str, dict[str, dict]] = {}
    for b in data["benchmarks"]:
        groups.setdefault(b["group"], {})[b["extra_info"]["impl"]] = b
    impls = ["linear", "fused", "reference", "compiled_reference"]
    m = data.get("machine_info", {})
    lines = [
        "# Op-level sweep (pytest-benchmark), ViT-B/16 qkv shapes: T=197, 768 -> 2304, Q/V slices",
        "",
        f"Run {data.get('datetime', '?')}, commit {data.get('commit_info', {}).get('id', '?')[:10]}; "
        f"{m.get('cpu', {}).get('brand_raw', m.get('processor', '?'))}; python {m.get('python_version', '?')}.",
        "Latency = median of pytest-benchmark rounds; `x lin` = that median over `nn.Linear`'s in the same group",
        "(separate runs, not interleaved pairs: the headline overheads are in latency.txt); img/s from the median;",
        "peak = memory one call adds (CPU: resident-set high-water mark growth after malloc_trim, min of 3 calls).",
        "",
        "| point | " + " | ".join(f"{i}: ms, x lin, img/s, peak MB" for i in impls) + " |",
        "|---|" + "---|" * len(impls),
    ]

    def order(name: str) -> tuple:
        g = next(iter(groups[name].values()))["extra_info"]
        return (g["dtype"], g["rank"], g["slots"], g["batch"])

    for name in sorted(groups, key=order):
        row = groups[name]
        lin = row.get("linear", {}).get("stats", {}).get("median")
        cells = []
        for impl in impls:
            b = row.get(impl)
            if b is None:
                cells.append("-")
                continue
            med = b["stats"]["median"]
            peak = b["extra_info"].get("peak_memory_bytes")
            peak_s = f"{peak / 2**20:.1f}" if peak is not None else "n/a"
            ratio = f"{med / lin:.3f}" if lin else "-"
            cells.append(f"{1e3 * med:.2f}, {ratio}, {b['extra_info']['images_per_s']:.1f}, {peak_s}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from benchmarks.latency import RESULTS_DIR, SCRATCH_DIR

    parser = argparse.ArgumentParser(prog="python -m benchmarks.plots", description=__doc__.splitlines()[0],
                                     formatter_class=_cli.HelpFormatter)
    parser.add_argument("results_dir", nargs="?", default=None,
                        help="folder holding latency.jsonl (and sweep_ops.json); the plots are written there "
                             "(default: .bench/, where benchmarks.latency writes; benchmarks/results/ with "
                             "--record)")
    parser.add_argument("--record", action="store_true",
                        help="redraw the plots in benchmarks/results/ (tracked files)")
    args = parser.parse_args(argv)
    # Like every benchmark, it changes tracked files only when told to (it redrew benchmarks/results/ by default).
    results = Path(args.results_dir or (RESULTS_DIR if args.record else SCRATCH_DIR))
    sweep_json = results / "sweep_ops.json"
    if not (results / "latency.jsonl").is_file() and not sweep_json.is_file():
        parser.error(f"no latency.jsonl or sweep_ops.json in {results}: nothing to draw")
    if problem := _cli.output_problem(results, folder=True):
        parser.error(problem)
    for p in write_plots(results):
        print(p)
    if sweep_json.exists():
        (results / "sweep_ops.md").write_text(sweep_summary(sweep_json))
        print(results / "sweep_ops.md")
    return 0


if __name__ == "__main__":
    sys.exit(_cli.run_main(main))
