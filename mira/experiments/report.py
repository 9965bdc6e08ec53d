"""Tables, plots, and merging runs of single seeds (``python -m mira.experiments.report``).

Seeds are independent, so a table can be made by separate processes, one per seed, and merged::

    python -m mira.experiments all --seeds 0 --out /tmp/s0   # ... and 1, 2
    python -m mira.experiments.report --record /tmp/s0 /tmp/s1 /tmp/s2

The merged ``results.json`` keeps every run and each part's command, machine and timings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from .metrics import mean_std

__all__ = ["merge", "plot_profiles", "tables"]


def _fmt(values, pct=True) -> str:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "-"
    m, s = mean_std(values)
    k = 100.0 if pct else 1.0
    return f"{m * k:.1f} ± {s * k:.1f}"


def _seed_label(name: str, seeds: int, most: int, notes=()) -> str:
    """A row's name, with its seed count where it ran on fewer seeds than the table's fullest row."""
    notes = ([f"{seeds} seed{'s' * (seeds != 1)}"] if seeds != most else []) + list(notes)
    return f"{name} ({'; '.join(notes)})" if notes else name


def tables(results: dict, order: dict, seeds: int = 0) -> str:
    """The markdown tables: DIL / CIL (avg acc, forgetting, probe) and DG (per held-out domain), mean +- std.

    A row run on fewer (distinct) seeds than the table's fullest row, or than ``seeds`` (the seeds the
    header above the tables states), shows its count. DG: each domain's cell is over the seeds that ran
    that fold; the mean column over the seeds that ran every fold (the mean of each such seed's folds),
    and a row with seeds missing folds names them."""
    lines = []
    for proto in ("dil", "cil"):
        if proto not in results:
            continue
        conflict = any("cue_blind_agreement" in r for rs in results[proto]["runs"].values() for r in rs)
        head = (f"| {proto.upper()} variant | avg acc (%) | forgetting (pts) | linear probe (%) |"
                + (" cue-blind pairs (%) |" if conflict else ""))
        lines += [head, "|---|---|---|---|" + ("---|" if conflict else "")]
        # the header's count too: a merge of a DIL part of seed 0 and a CIL part of seed 1 said "2 seed(s)"
        # above rows of one seed each, unlabelled, their "± 0.0" read as no spread
        most = max([len(rs) for rs in results[proto]["runs"].values()] + [seeds])
        for name in order[proto]:
            runs = results[proto]["runs"].get(name, [])
            cells = [_fmt([r["avg_acc"] for r in runs]), _fmt([r["forgetting"] for r in runs]),
                     _fmt([r.get("probe") for r in runs])]
            if conflict:
                cells.append(_fmt([r.get("cue_blind_agreement") for r in runs]))
            lines.append(f"| {_seed_label(name, len(runs), most)} | " + " | ".join(cells) + " |")
        lines.append("")
    if "dg" in results:
        names = results["dg"]["domains"]
        lines += ["| DG variant | " + " | ".join(names) + " | mean |", "|" + "---|" * (len(names) + 2)]
        most = max([len(_dg_folds(rs)) for rs in results["dg"]["runs"].values()] + [seeds])
        for v in order["dg"]:
            runs = results["dg"]["runs"].get(v, [])
            cells = [_fmt([r["held_out_acc"] for r in runs if r["held_out"] == n]) for n in names]
            folds = _dg_folds(runs)
            means, incomplete = _dg_seed_means(folds, names)
            cells.append(_fmt(means))
            notes = ([f"seed{'s' * (len(incomplete) != 1)} {', '.join(map(str, incomplete))} missing folds, "
                      "not in the mean"] if incomplete else [])
            lines.append(f"| {_seed_label(v, len(folds), most, notes)} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _dg_folds(runs: list) -> dict:
    """{seed: {held-out domain: accuracy}} of a DG row's runs."""
    folds: dict = {}
    for r in runs:
        folds.setdefault(r["seed"], {})[r["held_out"]] = r["held_out_acc"]
    return folds


def _dg_seed_means(folds: dict, names) -> tuple[list, list]:
    """(the mean over folds of each seed that ran every fold in ``names``, the seeds that did not)."""
    complete = [s for s in sorted(folds) if all(n in folds[s] for n in names)]
    return ([sum(folds[s][n] for n in names) / len(names) for s in complete],
            [s for s in sorted(folds) if s not in complete])


def plot_profiles(profiles: dict, domain_names, slot_task, path: str, seed: int) -> None:
    """Heat maps of the mean retrieval weights per block (rows: test domain; columns: stored adapters)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(profiles)
    blocks = len(next(iter(profiles.values())))
    fig, axes = plt.subplots(blocks, len(variants), figsize=(4.2 * len(variants), 2.0 * blocks + 0.6), squeeze=False)
    for c, v in enumerate(variants):
        for b in range(blocks):
            w = torch.tensor(profiles[v][b])
            ax = axes[b][c]
            lim = max(float(w.abs().max()), 1e-6)
            im = ax.imshow(w.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
            ax.set_yticks(range(len(domain_names)), domain_names, fontsize=7)
            ax.set_xticks(range(w.shape[1]), [f"{domain_names[t][:3]}" for t in slot_task[v]], fontsize=6,
                          rotation=90)
            ax.set_title(f"{v}: block {b}", fontsize=8)
            fig.colorbar(im, ax=ax, fraction=0.04)
    fig.suptitle("DIL, after the last task: mean retrieval weight of each stored adapter (columns, labelled by\n"
                 f"the domain it was trained on) for the test images of each domain (rows), seed {seed}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)



def merge(parts: list[str], out_dir: str, command: str) -> dict:
    """Merge the ``results.json`` of runs (same suite, preset, table and mode) into ``out_dir``.

    Parts may hold different rows (e.g. every row for seed 0, the promising ones for seeds 1 and 2)
    and the same seed for different rows; a (setting, row, seed) run in two parts is refused. The
    row order and the rows' records (``variants``) are the union of the parts'; a row run on fewer seeds
    than others shows its count. The retrieval profiles are one part's, with the seed they are of.
    """
    docs = [_read_part(p) for p in parts]
    for d in docs:  # runs written before the row order and slot labels were recorded
        d.setdefault("row_order", {p: [v["name"] for v in vs] for p, vs in d["variants"].items()})
    first = docs[0]
    for d in docs[1:]:
        for key in ("suite", "preset", "table", "mode"):
            if d.get(key) != first.get(key):
                raise ValueError(f"cannot merge runs of different {key}: {first.get(key)!r} and {d.get(key)!r}")
    seen: set = set()
    for d in docs:
        for proto, block in d["results"].items():
            for name, runs in block["runs"].items():
                for r in runs:
                    key = (proto, name, r["seed"], r.get("held_out"))  # DG: one run per held-out domain
                    if key in seen:
                        raise ValueError(f"the runs share seeds: {proto} {name!r} seed {r['seed']} is in two parts")
                    seen.add(key)
    docs.sort(key=lambda d: min(d["seeds"]))
    merged = dict(docs[0])
    # every part's rows, by name (the first part's record of a row where two have it)
    merged["variants"] = {}
    for d in docs:
        for proto, vs in d.get("variants", {}).items():
            known = {v["name"] for v in merged["variants"].setdefault(proto, [])}
            merged["variants"][proto] += [v for v in vs if v["name"] not in known]
    # the retrieval profiles of one part (the first that has any), with the seed they are of
    with_profiles = [d for d in docs if d.get("dil_retrieval_profile_seed0")]
    if with_profiles:
        src = with_profiles[0]
        merged["dil_retrieval_profile_seed0"] = src["dil_retrieval_profile_seed0"]
        merged["dil_retrieval_slot_tasks"] = src.get("dil_retrieval_slot_tasks", {})
        merged["dil_retrieval_profile_seed"] = _profile_seed(src)
    merged["command"] = command
    merged["parts"] = [{k: d[k] for k in ("command", "seeds", "elapsed_seconds", "cpu_seconds", "timings_seconds",
                                           "machine")} for d in docs]
    merged["seeds"] = sorted({s for d in docs for s in d["seeds"]})
    merged["cpu_seconds"] = sum(d["cpu_seconds"] for d in docs)
    merged["elapsed_seconds"] = max(d["elapsed_seconds"] for d in docs)
    order: dict = {}
    for d in sorted(docs, key=lambda d: -sum(map(len, d["row_order"].values()))):
        for proto, names in d["row_order"].items():
            order.setdefault(proto, [])
            order[proto] += [n for n in names if n not in order[proto]]
    merged["row_order"] = order
    results: dict = {}
    for d in docs:
        for proto, block in d["results"].items():
            target = results.setdefault(proto, {k: v for k, v in block.items() if k != "runs"} | {"runs": {}})
            for name, runs in block["runs"].items():
                target["runs"].setdefault(name, []).extend(runs)
    merged["results"] = results
    merged["adaptation"] = {}
    for d in docs:
        for key, entries in d["adaptation"].items():
            merged["adaptation"].setdefault(key, []).extend(entries)
    merged["summary_mean_std"] = summarise(results)
    write(merged, out_dir)
    return merged


def _read_part(part: str) -> dict:
    """The ``results.json`` of the output folder ``part``; a ValueError naming the file if it does not parse."""
    path = os.path.join(part, "results.json")
    with open(path) as f:
        try:
            return json.load(f)
        except ValueError as err:  # JSON or UTF-8: said only "Expecting ',' delimiter: line 20 column 1"
            raise ValueError(f"{path} does not parse as JSON ({err}): is it whole? Give the folder of a "
                             "finished run") from err


def record_name(suite: str, preset: str, table: str = "main") -> str:
    """The folder of a suite's results under results/experiments: the suite's name for the default preset
    (the tables every README row cites), ``<suite>-<preset>`` for any other, so runs of one never overwrite
    the other's; ``-<table>`` appended for a table other than ``main`` (e.g. ``idigits-ablations``)."""
    name = suite if preset == "default" else f"{suite}-{preset}"
    return name if table == "main" else f"{name}-{table}"


def summarise(results: dict) -> dict:
    summary: dict = {}
    for proto, block in results.items():
        summary[proto] = {}
        for name, runs in block["runs"].items():
            if proto == "dg":
                summary[proto][name] = {n: mean_std([r["held_out_acc"] for r in runs if r["held_out"] == n])
                                        for n in block["domains"]}
            else:
                summary[proto][name] = {
                    "avg_acc": mean_std([r["avg_acc"] for r in runs]),
                    "forgetting": mean_std([r["forgetting"] for r in runs if r["forgetting"] is not None]),
                }
    return summary


def write(doc: dict, out_dir: str) -> str:
    """Write ``results.json``, ``results.md`` (and the retrieval plot if profiled); returns the tables."""
    os.makedirs(out_dir, exist_ok=True)
    table = tables(doc["results"], doc["row_order"], len(doc["seeds"]))
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(doc, f, indent=1)
    m = doc["machine"]
    load = m["loadavg_start"][0]
    dist = doc.get("distributed") or {}
    ranks = (f"{dist['world_size']} rank(s) ({dist['strategy']}, {dist['backend']}), " if dist.get("backend")
             else "")
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(f"`{doc['command']}`: suite {doc['suite']}, preset {doc['preset']}, {len(doc['seeds'])} seed(s) "
                f"{doc['seeds']}, mean ± std over seeds; {doc['elapsed_seconds']:.0f} s wall clock "
                f"({doc['cpu_seconds']:.0f} s of CPU time; load average {load:.1f} at start) on {m['cpu']}, "
                f"{m['cpus']} CPUs, {ranks}{m['torch_threads']} torch thread(s) per process.\n\n{table}\n")
    profiles = doc.get("dil_retrieval_profile_seed0")
    plot = os.path.join(out_dir, "retrieval_weights.png")
    if not profiles and os.path.exists(plot):  # a reused folder: another run's plot beside these tables
        os.remove(plot)
    if profiles:
        tasks = doc["results"]["dil"]["tasks"]
        slot_tasks = doc.get("dil_retrieval_slot_tasks") or {
            v: [j * len(tasks) // len(p[0][0]) for j in range(len(p[0][0]))] for v, p in profiles.items()}
        plot_profiles(profiles, tasks, slot_tasks, plot, _profile_seed(doc))
    return table


def _profile_seed(doc: dict) -> int:
    """The seed whose model the retrieval profiles are of: recorded since; before, the command's first seed."""
    return doc.get("dil_retrieval_profile_seed", doc["seeds"][0])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mira.experiments.report", description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="+", help="output folders (each with its results.json) of runs of single seeds")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="folder of the merged results (no default: give --out or --record)")
    parser.add_argument("--record", action="store_true",
                        help="write to results/experiments/<suite>[-<preset>][-<table>]/, the recorded tables; "
                             "full runs only, no --quick part (default: off)")
    return parser


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out == "":
        parser.error("--out must not be empty")
    if args.record == (args.out is not None):
        parser.error("give exactly one of --out DIR or --record")
    missing = [p for p in args.parts if not os.path.isfile(os.path.join(p, "results.json"))]
    if missing:  # was a FileNotFoundError traceback
        parser.error(f"no results.json in {', '.join(missing)}: give output folders of python -m mira.experiments")
    try:
        docs = [_read_part(p) for p in args.parts]
    except ValueError as err:  # a truncated results.json: was a traceback for the first part
        parser.error(str(err))
    quick = [p for p, d in zip(args.parts, docs) if d.get("mode") == "quick"]
    if args.record and quick:  # as python -m mira.experiments --record --quick: the smoke run's tables (and no
        # retrieval plot) would replace the full run's recorded ones
        parser.error(f"--record writes the full run's tables; {', '.join(quick)} "
                     f"{'holds a quick run' if len(quick) == 1 else 'hold quick runs'} (use --out)")
    first = docs[0]
    out = os.path.join("results", "experiments", record_name(first["suite"], first["preset"],
                                                              first.get("table", "main"))) if args.record \
        else args.out
    command = "python -m mira.experiments.report " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        merged = merge(args.parts, out, command)
    except ValueError as err:  # parts of different runs, or sharing seeds
        parser.error(str(err))
    print(tables(merged["results"], merged["row_order"], len(merged["seeds"])))
    print(f"merged {len(args.parts)} runs (seeds {merged['seeds']}) into {out}")


if __name__ == "__main__":
    main()
