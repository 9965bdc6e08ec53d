"""PNG plots of the latency records (``benchmarks/results/latency.jsonl``).

``python -m benchmarks.plots [results_dir]`` redraws them (and, when ``sweep_ops.json`` from
``benchmarks/test_sweep_ops.py`` is there, writes its summary ``sweep_ops.md``);
``benchmarks.latency`` calls :func:`write_plots` after every run. Three figures:

- ``latency_overhead_vs_batch.png``: the latest run's batch sizes;
- ``latency_overhead_vs_slots.png`` / ``latency_overhead_vs_rank.png``: the latest run that swept
  that axis (``--sweep-slots`` / ``--sweep-ranks``), op-level decomposed overheads.

Each has two panels: MIRA fused (decomposed, with its 95% interval; the whole projection module;
the end-to-end ratio where there is one; the arithmetic floor and the 0.4% target), and the same
beside the paper-style eager baseline, whose overhead is an order of magnitude larger.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["load_records", "sweep_summary", "write_plots"]

TARGET_PERCENT = 0.4


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


def _series(points: Sequence[dict], key: str) -> tuple[list, list, list]:
    """(values, lower errors, upper errors) of overhead[key] over points that have it."""
    vals, lo, hi = [], [], []
    for p in points:
        d = p["overhead"].get(key)
        vals.append(d["percent"] if d else float("nan"))
        lo.append(d["percent"] - d["lo"] if d else 0.0)
        hi.append(d["hi"] - d["percent"] if d else 0.0)
    return vals, lo, hi


def _draw(path: Path, xs: list, points: list[dict], floors: list[float], xlabel: str, title: str,
          e2e: list[dict] | None = None, log_x: bool = False) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, with_eager in zip(axes, (False, True)):
        v, lo, hi = _series(points, "decomposed")
        ax.errorbar(xs, v, yerr=[lo, hi], marker="o", capsize=4,
                    label="MIRA fused, decomposed (adapter + call + query)")
        if any("module" in p["overhead"] for p in points):
            v, lo, hi = _series(points, "module")
            ax.errorbar(xs, v, yerr=[lo, hi], marker="s", capsize=4, alpha=0.8,
                        label="MIRA projection module over nn.Linear")
        if not with_eager:
            # Zoom on what resolves the small effect; the end-to-end bars may run off this range.
            keys = [k for k in ("decomposed", "module") if any(k in p["overhead"] for p in points)]
            spans = [p["overhead"][k][e] for p in points for k in keys if k in p["overhead"] for e in ("lo", "hi")]
            spans += list(floors) + [TARGET_PERCENT, 0.0]
            lo, hi = min(spans), max(spans)
            pad = 0.15 * (hi - lo) + 0.05
            ax.set_ylim(lo - pad, hi + pad)
        if e2e and not with_eager:
            ax.errorbar(xs, [e["percent"] for e in e2e], yerr=[[e["percent"] - e["lo"] for e in e2e],
                        [e["hi"] - e["percent"] for e in e2e]], marker="^", capsize=4, linestyle=":", alpha=0.7,
                        label="MIRA fused, end to end (noisy; bars may be clipped)")
        if with_eager:
            v, lo, hi = _series(points, "eager")
            ax.errorbar(xs, v, yerr=[lo, hi], marker="D", capsize=4, color="tab:red",
                        label="paper-style eager, decomposed")
        ax.plot(xs, floors, "k--", label="arithmetic floor (extra MACs / backbone MACs)")
        ax.axhline(TARGET_PERCENT, color="tab:green", linestyle=":", label="target 0.4%")
        ax.axhline(0.0, color="grey", linewidth=0.5)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("overhead over the frozen backbone (%)")
        if log_x:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(("with the eager baseline" if with_eager else "MIRA fused") + f" - {title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _machine(record: dict) -> str:
    m = record.get("machine", {})
    return f"{m.get('cpu', '?')}, {m.get('torch_threads', '?')} threads, torch {m.get('torch', '?')}"


def write_plots(results_dir: str | Path) -> list[Path]:
    """Draws the figures the records allow; returns the paths written."""
    results_dir = Path(results_dir)
    records = load_records(results_dir)
    written: list[Path] = []
    with_results = [r for r in records if r.get("results")]
    if with_results:
        rec = with_results[-1]
        res = sorted(rec["results"], key=lambda r: r["batch"])
        e2e = []
        for r in res:
            v = r["end_to_end"]["variants"]["fused"]
            ratio = v.get("vs_gemm_backbone", v["vs_backbone"])
            e2e.append({"percent": 100 * (ratio["ratio"] - 1), "lo": 100 * (ratio["lo"] - 1),
                        "hi": 100 * (ratio["hi"] - 1)})
        c = rec["config"]
        written.append(_draw(
            results_dir / "latency_overhead_vs_batch.png", [r["batch"] for r in res], res,
            [rec["floor"]["percent"]] * len(res), "batch size",
            f"{c['model']}, r={c['rank']}, N={c['slots']}\n{_machine(rec)}", e2e=e2e, log_x=True,
        ))
    for axis, xlabel in (("slots", "memory slots N"), ("rank", "rank r")):
        swept = [r for r in records if any(p["axis"] == axis for p in r.get("sweep", []))]
        if not swept:
            continue
        rec = swept[-1]
        pts = sorted((p for p in rec["sweep"] if p["axis"] == axis), key=lambda p: p["value"])
        other = f"r={pts[0]['rank']}" if axis == "slots" else f"N={pts[0]['slots']}"
        written.append(_draw(
            results_dir / f"latency_overhead_vs_{axis}.png", [p["value"] for p in pts], pts,
            [p["floor"]["percent"] for p in pts], xlabel,
            f"{rec['config']['model']}, batch {pts[0]['batch']}, {other}\n{_machine(rec)}", log_x=True,
        ))
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


if __name__ == "__main__":
    results = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results")
    for p in write_plots(results):
        print(p)
    sweep_json = results / "sweep_ops.json"
    if sweep_json.exists():
        (results / "sweep_ops.md").write_text(sweep_summary(sweep_json))
        print(results / "sweep_ops.md")
