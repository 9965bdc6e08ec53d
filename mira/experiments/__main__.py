"""``python -m mira.experiments dil|cil|dg|all [--quick] [--seeds 0 1 2] [--out DIR]``.

Pre-trains (or loads from cache) the digits ViT, trains the adapter pools, runs every variant of
the chosen protocols for every seed, prints the tables (mean +- std over seeds) and writes
``<out>/results.json``, ``<out>/results.md`` and ``<out>/retrieval_weights.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
import warnings

import torch

from . import protocols as P
from .backbone import BackboneConfig, load_pretrained_backbone
from .data import DOMAINS, digits_domains
from .metrics import mean_std
from .stages import RecipeConfig, adapter_cross_accuracy, train_adapter_pool

FULL = {
    "seeds": (0, 1, 2),
    "domains": DOMAINS,
    "recipe": RecipeConfig(adapters_per_task=1, max_epochs=4, consolidation_epochs=3),
    "cil_adapters_per_task": 2,
    "joint_epochs": 2,
    "dg_consolidation_epochs": 1,
    "backbone": BackboneConfig(),
}
QUICK = {
    "seeds": (0,),
    "domains": ("upright", "rotated", "inverted"),
    "recipe": RecipeConfig(adapters_per_task=1, max_epochs=2, consolidation_epochs=1),
    "cil_adapters_per_task": 1,
    "joint_epochs": 1,
    "dg_consolidation_epochs": 1,
    "backbone": BackboneConfig(epochs=30),
}


def _fmt(values, pct=True) -> str:
    m, s = mean_std(values)
    if m != m:  # nan
        return "-"
    k = 100.0 if pct else 1.0
    return f"{m * k:.1f} ± {s * k:.1f}"


def _tables(results: dict) -> str:
    lines = []
    if "dil" in results or "cil" in results:
        settings = [s for s in ("dil", "cil") if s in results]
        head = "| variant | " + " | ".join(f"{s.upper()} avg acc (%) | {s.upper()} forgetting (pts)"
                                          for s in settings) + " |"
        lines += [head, "|" + "---|" * (1 + 2 * len(settings))]
        for v in P.CL_VARIANTS:
            cells = []
            for s in settings:
                runs = results[s]["runs"].get(v, [])
                cells.append(_fmt([r["avg_acc"] for r in runs]))
                cells.append(_fmt([r["forgetting"] for r in runs if r["forgetting"] is not None]))
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        lines.append("")
    if "dg" in results:
        names = results["dg"]["domains"]
        lines += ["| DG variant | " + " | ".join(f"{n}" for n in names) + " | mean |", "|" + "---|" * (len(names) + 2)]
        for v in P.DG_VARIANTS:
            runs = results["dg"]["runs"].get(v, [])
            cells = [_fmt([r["held_out_acc"] for r in runs if r["held_out"] == n]) for n in names]
            per_seed = {}
            for r in runs:
                per_seed.setdefault(r["seed"], []).append(r["held_out_acc"])
            cells.append(_fmt([sum(a) / len(a) for a in per_seed.values()]))
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _plot(profiles: dict, domain_names, slot_task, path: str, seed: int) -> None:
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
            ax.set_xticks(range(w.shape[1]), [f"{domain_names[t][:3]}" for t in slot_task], fontsize=6, rotation=90)
            ax.set_title(f"{v}: block {b}", fontsize=8)
            fig.colorbar(im, ax=ax, fraction=0.04)
    fig.suptitle("DIL, after the last task: mean retrieval weight of each stored adapter (columns, labelled by\n"
                 "the domain it was trained on) for the test images of each domain (rows), seed "
                 f"{seed}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _strip(run: dict) -> dict:
    return {k: v for k, v in run.items() if k != "model"}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m mira.experiments", description=__doc__.splitlines()[0])
    parser.add_argument("protocol", choices=("dil", "cil", "dg", "all"))
    parser.add_argument("--quick", action="store_true", help="CI smoke run (1 seed, 3 domains, short schedules)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--out", default=None, help="output directory (default results/experiments[/quick])")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: shared machines)")
    parser.add_argument("--no-cache", action="store_true", help="pre-train the backbone even if cached")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from tqdm.auto import tqdm

    warnings.filterwarnings("ignore", message=".*falling back to the plain-PyTorch reference.*")
    torch.set_num_threads(args.threads)
    setup = QUICK if args.quick else FULL
    seeds = tuple(args.seeds) if args.seeds else setup["seeds"]
    out_dir = args.out or os.path.join("results", "experiments", "quick" if args.quick else "")
    os.makedirs(out_dir, exist_ok=True)
    protocols = ("dil", "cil", "dg") if args.protocol == "all" else (args.protocol,)
    cfg = P.ProtocolConfig(recipe=setup["recipe"], joint_epochs=setup["joint_epochs"],
                           dg_consolidation_epochs=setup["dg_consolidation_epochs"],
                           cil_adapters_per_task=setup["cil_adapters_per_task"])
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    load_start = os.getloadavg()

    backbone, bb_info = load_pretrained_backbone(setup["backbone"], use_cache=not args.no_cache,
                                                 progress=not args.no_progress)
    domains = digits_domains(setup["domains"])
    dil_t = P.dil_tasks(domains)
    cil_t = P.cil_tasks(domains, cfg.cil_classes_per_task)

    results: dict = {}
    for proto in protocols:
        results[proto] = {"runs": {}, "domains": [d.name for d in domains]}
        if proto != "dg":
            results[proto]["tasks"] = [t.name for t in (dil_t if proto == "dil" else cil_t)]
    pools_info: dict = {}
    profiles: dict = {}
    geometry: dict = {}
    slot_task = None

    units = 0
    for proto in protocols:
        tasks = cil_t if proto == "cil" else dil_t
        if proto == "dg":
            units += len(domains) * len(P.DG_VARIANTS)
        else:
            units += len(tasks) * (len(P.CL_VARIANTS) - 1) + 1
    need_dom_pool = any(p in protocols for p in ("dil", "dg"))
    units += (len(dil_t) * cfg.recipe.adapters_per_task if need_dom_pool else 0)
    units += len(cil_t) * cfg.cil_adapters_per_task if "cil" in protocols else 0
    bar = tqdm(total=units * len(seeds), desc="experiments", disable=args.no_progress, file=sys.stdout)
    timings: dict = {}

    def timed(key, fn, *fn_args, **fn_kwargs):
        t0 = time.perf_counter()
        r = fn(*fn_args, **fn_kwargs)
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0
        return r

    for seed in seeds:
        dom_pool = cil_pool = None
        if need_dom_pool:
            bar.set_postfix_str(f"seed {seed}: adaptation, domains")
            dom_pool = timed("adaptation", train_adapter_pool, backbone, dil_t, cfg.recipe, seed,
                             local_labels=False, progress=bar)
            pools_info.setdefault("domains", []).append({
                "seed": seed, "info": dom_pool.info,
                "own_head_cross_accuracy": adapter_cross_accuracy(backbone, dom_pool, dil_t, cfg.recipe.rank)})
        if "cil" in protocols:
            bar.set_postfix_str(f"seed {seed}: adaptation, class tasks")
            cil_pool = timed("adaptation", train_adapter_pool, backbone, cil_t, cfg.recipe, seed, local_labels=True,
                             progress=bar, adapters_per_task=cfg.cil_adapters_per_task)
            pools_info.setdefault("cil", []).append({"seed": seed, "info": cil_pool.info})
        for proto in protocols:
            if proto == "dg":
                for v in P.DG_VARIANTS:
                    for h in range(len(domains)):
                        bar.set_postfix_str(f"seed {seed}: dg {v} held-out {domains[h].name}")
                        r = timed(f"dg/{v}", P.run_dg_fold, v, backbone, dil_t, h, dom_pool, cfg, seed)
                        results["dg"]["runs"].setdefault(v, []).append(_strip(r))
                        bar.update(1)
                continue
            tasks, pool = (dil_t, dom_pool) if proto == "dil" else (cil_t, cil_pool)
            for v in P.CL_VARIANTS:
                bar.set_postfix_str(f"seed {seed}: {proto} {v}")
                keep = proto == "dil" and seed == seeds[0] and v in ("mira", "random_keys")
                r = timed(f"{proto}/{v}", P.run_continual, proto, v, backbone, tasks, pool, cfg, seed,
                          step=lambda: bar.update(1), keep_model=keep)
                if keep:
                    profiles[v] = P.retrieval_profile(r["model"], tasks)
                    geometry[v] = P.query_geometry(r["model"], tasks)
                    slot_task = pool.slot_task.tolist()
                results[proto]["runs"].setdefault(v, []).append(_strip(r))
    bar.close()
    elapsed = time.perf_counter() - t_start
    cpu_seconds = time.process_time() - cpu_start

    table = _tables(results)
    summary = {}
    for proto in protocols:
        summary[proto] = {}
        for v, runs in results[proto]["runs"].items():
            if proto == "dg":
                summary[proto][v] = {n_: mean_std([r["held_out_acc"] for r in runs if r["held_out"] == n_])
                                     for n_ in results["dg"]["domains"]}
            else:
                summary[proto][v] = {
                    "avg_acc": mean_std([r["avg_acc"] for r in runs]),
                    "forgetting": mean_std([r["forgetting"] for r in runs if r["forgetting"] is not None]),
                }
    command = "python -m mira.experiments " + " ".join(argv if argv is not None else sys.argv[1:])
    doc = {
        "command": command,
        "mode": "quick" if args.quick else "full",
        "seeds": list(seeds),
        "elapsed_seconds": elapsed,
        "cpu_seconds": cpu_seconds,
        "timings_seconds": timings,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": args.threads,
                    "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "torch": torch.__version__},
        "backbone": bb_info,
        "recipe": dataclasses.asdict(cfg.recipe),
        "protocol": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "recipe"},
        "summary_mean_std": summary,
        "results": results,
        "adaptation": pools_info,
        "dil_retrieval_profile_seed0": profiles,
        "dil_query_geometry_seed0": geometry,
    }
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(doc, f, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(f"`{command}`: {len(seeds)} seed(s) {list(seeds)}, mean ± std over seeds, {elapsed:.0f} s "
                f"wall clock ({cpu_seconds:.0f} s of CPU time; load average {load_start[0]:.1f} at start) "
                f"on {os.cpu_count()} CPUs, {args.threads} torch thread(s).\n\n{table}\n")
    if profiles:
        _plot(profiles, [t.name for t in dil_t], slot_task, os.path.join(out_dir, "retrieval_weights.png"), seeds[0])
    print(table)
    print(f"elapsed {elapsed:.1f} s wall clock, {cpu_seconds:.1f} s CPU; results in {out_dir}")
    return doc


if __name__ == "__main__":
    main()
