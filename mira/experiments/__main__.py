"""``python -m mira.experiments dil|cil|dg|all [--suite S] [--preset P] [--quick] [--record]``: MIRA and controls.

Pre-trains (or loads from cache) the suite's backbone, trains the adapter pools, runs every
variant (MIRA as the preset says, its named options, the improved recipe, and the controls) for
every seed, prints the tables (mean +- std over seeds) and writes ``results.json``,
``results.md`` and ``retrieval_weights.png`` to a scratch folder (``--out``, default
``$MIRA_EXPERIMENTS_CACHE/runs/<suite>[-<preset>][-ablations][-quick]``),
or to ``results/experiments/<suite>/`` with ``--record``
(``<suite>-<preset>/`` for a preset other than ``default``; ``--table ablations`` adds ``-ablations``).

The same command runs data-parallel under ``torchrun`` (``torchrun --nproc-per-node K -m
mira.experiments dil``; ``--strategy ddp|fsdp``): every rank computes its share of each global
batch, rank 0 alone prints, shows progress and writes the files, which record the world size.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import sys
import tempfile
import time
import warnings

import torch

from mira import distributed as md

from . import parallel
from . import protocols as P
from .backbone import cache_path, load_pretrained_backbone
from .recipe import PRESETS, preset
from .report import record_name, summarise, write
from .stages import adapter_cross_accuracy, evaluate, train_adapter_pool
from .suites import SUITES, subsample

# Full runs: the schedules of the default preset; quick: the CI smoke run (every code path, tiny data).
FULL = {"seeds": (0, 1, 2), "cil_adapters_per_task": 2, "joint_epochs": 3, "dg_consolidation_epochs": 1,
        "train": None, "test": None, "probe_max_iter": 300}
# Quick: the linear probe's L-BFGS stops after 60 iterations, not 300 (its fits took ~1/8 of the quick
# run's CPU in a profile; the probe's code path is the same).
QUICK = {"seeds": (0,), "cil_adapters_per_task": 1, "joint_epochs": 1, "dg_consolidation_epochs": 1,
         "train": 100, "test": 50, "probe_max_iter": 60, "recipe": {"max_epochs": 1, "consolidation_epochs": 1}}


# The quick mode's rows: every kind and every option once (the CI budget), not every combination. DIL
# runs them all; CIL only the rows whose CIL code differs (head growth with fresh, adaptation-initialised
# and shared heads, the oracle's per-task memory, the LoRA baselines); DG each way a DG fold is built.
QUICK_ROWS = ("mira", "mira, fixed-norm GPM", "mira, routing replay", "no adapters", "uniform mean", "oracle",
              "random keys", "sequential LoRA", "joint LoRA", "improved", "shared head: oracle")
QUICK_CIL_ROWS = ("mira", "oracle", "sequential LoRA", "joint LoRA", "improved")
QUICK_DG_ROWS = ("mira", "no adapters", "joint LoRA", "improved")
# The ablation table's (DIL and CIL alike: these options change no CIL code): each option it varies once
# (block 0 off, the patch-mean query, the backbone query, relu and affine separation) and a control; its
# 10-epoch rows differ from these in a schedule only. Without them --quick ran none of its rows.
QUICK_ABLATION_ROWS = ("mira, block 0 off", "mira, patch-mean query", "mira, relu, backbone query", "improved, affine",
                       "shared head: oracle")
QUICK_TABLE_ROWS = {"main": {"dil": QUICK_ROWS, "cil": QUICK_CIL_ROWS, "dg": QUICK_DG_ROWS},
                    "ablations": {"dil": QUICK_ABLATION_ROWS, "cil": QUICK_ABLATION_ROWS, "dg": ()}}


def build_variants(base, improved, protocol: str) -> list[P.Variant]:
    """The rows of every table: MIRA (preset), its named options, the improved recipe, the controls."""
    shared = base.replace(adapt_head="shared", head="shared")
    rows = [
        P.Variant("mira", "mira", base),
        P.Variant("mira, fixed-norm GPM", "mira", base.replace(gpm_keys="fixed_norm")),
        P.Variant("mira, routing replay", "mira", base.replace(routing="replay")),
        P.Variant("no adapters", "no_adapters", base),
        P.Variant("uniform mean", "uniform_mean", base),
        P.Variant("oracle", "oracle", base),
        P.Variant("random keys", "random_keys", base),
        P.Variant("sequential LoRA", "seq_lora", base),
        P.Variant("joint LoRA", "joint_lora", base),
        P.Variant("shared head: mira", "mira", shared),
        P.Variant("improved", "mira", improved),
        P.Variant("improved, no routing loss", "mira", improved.replace(routing="none")),
        P.Variant("shared head: no adapters", "no_adapters", improved),
        P.Variant("shared head: uniform mean", "uniform_mean", improved),
        P.Variant("shared head: oracle", "oracle", improved),
    ]
    if protocol == "dg":
        # No sequence of tasks in DG: no oracle (the held-out domain has no adapter), no sequential
        # LoRA, and nothing for DualGPM or routing replay to protect (those rows equal "mira").
        rows = [v for v in rows if v.kind not in ("oracle", "seq_lora")
                and v.name not in ("mira, fixed-norm GPM", "mira, routing replay", "improved, no routing loss")]
    return rows


def ablation_variants(base, improved, protocol: str) -> list[P.Variant]:
    """``--table ablations``: the faithful recipe with one cause of its collapse removed at a time
    (block 0's constant CLS query; affine weights that grow with the slots), then both, and the
    improved recipe with the backbone query and better-trained adapters, beside their controls.
    DIL and CIL only (the causes are measured on DIL's retrieval weights). ``base`` must not route
    (``routing="none"``, as the ``default`` and ``paper`` presets)."""
    if protocol == "dg":
        return []
    if base.routing != "none":
        # "block 0 off" takes routing="none" (recipe.py); setting it for this row too would remove two
        # things at once, where each row of the table removes one from the row "mira" (its README).
        raise ValueError(f"the ablation table varies one cause at a time, and its 'mira, block 0 off' row "
                         f"(first_block='off') cannot keep this recipe's routing penalty "
                         f"(routing={base.routing!r}): use a preset without one "
                         f"({', '.join(n for n, r in PRESETS.items() if r.routing == 'none')})")
    shared = improved  # the controls' recipe (as in the main table): shared head, improved's adapters
    longer = {"max_epochs": 10}
    return [
        P.Variant("mira", "mira", base),
        P.Variant("mira, block 0 off", "mira", base.replace(first_block="off")),
        P.Variant("mira, patch-mean query", "mira", base.replace(query_token="mean")),
        P.Variant("mira, backbone query", "mira", base.replace(query_source="backbone")),
        P.Variant("mira, relu", "mira", base.replace(separation="relu")),
        P.Variant("mira, relu, backbone query", "mira", base.replace(separation="relu", query_source="backbone")),
        P.Variant("no adapters", "no_adapters", base),
        P.Variant("uniform mean", "uniform_mean", base),
        P.Variant("improved", "mira", improved),
        P.Variant("improved, backbone query", "mira", improved.replace(query_source="backbone")),
        P.Variant("improved, backbone query, 10-epoch adapters", "mira",
                  improved.replace(query_source="backbone", **longer)),
        P.Variant("improved, affine", "mira", improved.replace(separation="affine")),
        P.Variant("improved, affine, backbone query", "mira",
                  improved.replace(separation="affine", query_source="backbone")),
        P.Variant("improved, affine, backbone query, 10-epoch adapters", "mira",
                  improved.replace(separation="affine", query_source="backbone", **longer)),
        P.Variant("shared head: no adapters", "no_adapters", shared),
        P.Variant("shared head: uniform mean", "uniform_mean", shared),
        P.Variant("shared head: oracle", "oracle", shared),
        P.Variant("shared head: uniform mean, 10-epoch adapters", "uniform_mean", shared.replace(**longer)),
        P.Variant("shared head: oracle, 10-epoch adapters", "oracle", shared.replace(**longer)),
    ]


TABLES = {"main": build_variants, "ablations": ablation_variants}


@torch.no_grad()
def _cue_blind_agreement(model, tasks) -> float:
    """Conflict suite: the share of (plain, cued) test pairs given the same class (then one is wrong)."""
    from .backbone import normalize

    model.eval()
    a = model(normalize(tasks[0].test_x)).argmax(-1)
    b = model(normalize(tasks[1].test_x)).argmax(-1)
    return float((a == b).float().mean())


def adapter_copies(recipe, cfg: P.ProtocolConfig, cil: bool) -> int:
    """Adapters trained per task: the preset's count; CIL pools at least ``cfg.cil_adapters_per_task``
    (2 for the 2-class tasks of the default preset; the paper preset's 10 where larger: the paper's
    ablation finds the count matters mostly for CIL)."""
    return max(cfg.cil_adapters_per_task, recipe.adapters_per_task) if cil else recipe.adapters_per_task


def _pool_key(recipe, local: bool, copies: int) -> tuple:
    fields = ("adapt_head", "rank", "batch_size", "lr", "weight_decay", "max_epochs", "early_stop_acc", "key_norm",
              "key_init", "query_token")
    return (local, copies) + tuple(getattr(recipe, f) for f in fields)


def rows_to_run(table: str, base, improved, protocols, *, quick: bool = False,
                names=None) -> dict[str, list[P.Variant]]:
    """Each setting's rows: the table's; only those ``names`` if given, else quick mode's subset if ``quick``."""
    rows = {p: TABLES[table](base, improved, p) for p in protocols}
    keep = dict.fromkeys(protocols, names) if names else QUICK_TABLE_ROWS[table] if quick else None
    return rows if keep is None else {p: [v for v in vs if v.name in keep[p]] for p, vs in rows.items()}


def _writable(folder: str) -> None:
    """Create ``folder`` and write and delete a file there: an OSError now, not after a task's training."""
    os.makedirs(folder, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".mira-write-test-")
    os.close(fd)
    os.remove(probe)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mira.experiments", description=__doc__.splitlines()[0])
    parser.add_argument("protocol", choices=("dil", "cil", "dg", "all"),
                        help="the setting to run; all: every setting of the suite (no default: required)")
    parser.add_argument("--suite", choices=tuple(SUITES), default="idigits", help="the domains (default: idigits)")
    parser.add_argument("--preset", choices=tuple(PRESETS), default="default",
                        help="recipe of the 'mira' rows and the controls (default: default)")
    parser.add_argument("--quick", action="store_true",
                        help="CI smoke run: 1 seed, tiny data of the suite's first domains ("
                             + ", ".join(f"{name}: {s.quick_domains}" for name, s in SUITES.items())
                             + "), a subset of the rows covering every kind and option (default: off, the full run)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="seeds to run, each 0 <= seed < 2**32 (torch keeps a seed's low 32 bits) "
                             "(default: 0 1 2; with --quick: 0)")
    parser.add_argument("--table", choices=tuple(TABLES), default="main",
                        help="main: MIRA, its options and the controls; ablations: the causes of the faithful "
                             "recipe's collapse one at a time, DIL and CIL only (default: main)")
    parser.add_argument("--variants", nargs="+", default=None,
                        help="only these rows (names as in the tables) (default: every row of the table; with "
                             "--quick: its quick subset)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output folder (default: $MIRA_EXPERIMENTS_CACHE/runs/<suite>[-<preset>][-ablations]"
                             "[-quick], the cache defaulting to ~/.cache/mira-kernels)")
    parser.add_argument("--record", action="store_true",
                        help="write to results/experiments/<suite>[-<preset>][-ablations]/, the recorded tables; "
                             "full runs only (default: off, see --out)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: shared machines)")
    parser.add_argument("--no-cache", action="store_true",
                        help="pre-train the backbone even if cached (default: load it from the cache)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar (default: shown)")
    parser.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                        help="save each DIL / CIL run after every task and resume finished tasks from here "
                             "(default: none, a killed run starts again)")
    parser.add_argument("--strategy", choices=md.STRATEGIES, default="ddp",
                        help="under torchrun: DistributedDataParallel or FSDP2 (default ddp)")
    parser.add_argument("--dist-timeout", type=float, default=md.DEFAULT_TIMEOUT_S, metavar="S",
                        help="under torchrun: seconds a rank waits for the others before failing "
                             f"(default {md.DEFAULT_TIMEOUT_S:.0f})")
    return parser


def _out_dir(args, suite_name: str) -> str:
    if args.record:
        return os.path.join("results", "experiments", record_name(suite_name, args.preset, args.table))
    return args.out or os.path.join(cache_path(), "runs", record_name(suite_name, args.preset, args.table)
                                    + ("-quick" if args.quick else ""))


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    for option, value in (("--out", args.out), ("--checkpoint-dir", args.checkpoint_dir)):
        if value == "":  # an empty folder name was read as "not given": the run wrote elsewhere
            parser.error(f"{option} must not be empty")
    if args.record and args.out:
        parser.error("--record writes to results/experiments/<suite>[-<preset>][-ablations]/; do not also pass --out")
    if args.record and args.quick:  # the smoke run's tables would replace the full run's recorded ones
        parser.error("--record writes the full run's tables; not with --quick (use --out)")
    # Checked here, as argparse checks its own: otherwise each failed as a traceback once started, some
    # after the backbone's pre-training or a task's training.
    if not 0 < args.dist_timeout <= datetime.timedelta.max.total_seconds():  # inf overflows the group's timedelta
        parser.error(f"--dist-timeout must be > 0 and finite (at most "
                     f"{datetime.timedelta.max.total_seconds():.0f} s), got {args.dist_timeout}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.seeds:
        repeated = sorted({s for s in args.seeds if args.seeds.count(s) > 1})
        if repeated:  # a repeat is the same run again: the mean and std would count it as another seed
            parser.error(f"--seeds repeats {repeated}; each seed is one run of the mean +- std")
        outside = [s for s in args.seeds if not 0 <= s < 2 ** 32]
        if outside:  # torch's CPU generator keeps a seed's low 32 bits: s and s + 2**32 (or -1 and 2**32 - 1)
            # would be one run counted as two seeds
            parser.error(f"--seeds must be >= 0 and < 2**32 (torch keeps a seed's low 32 bits), got {outside}")
    for option, folder in (("--out", args.out), ("--checkpoint-dir", args.checkpoint_dir)):
        if folder:
            parent = os.path.abspath(folder)
            while not os.path.exists(parent):  # the nearest part of the path that exists must be a folder
                parent = os.path.dirname(parent)
            if not os.path.isdir(parent):
                parser.error(f"{option} {folder}: {parent} is a file, not a folder")
    settings = SUITES[args.suite].settings
    if args.protocol != "all" and args.protocol not in settings:
        parser.error(f"suite {args.suite!r} runs {settings} only")
    # The rows, here rather than after the backbone's pre-training (minutes on a clean cache).
    protocols = settings if args.protocol == "all" else (args.protocol,)
    try:
        table = rows_to_run(args.table, preset(args.preset), preset("improved"), protocols)
    except ValueError as err:  # was a traceback: a preset whose recipe a row of the table cannot take
        parser.error(f"--table {args.table} --preset {args.preset}: {err}")
    if args.variants:
        unknown = set(args.variants) - {v.name for vs in table.values() for v in vs}
        if unknown:
            parser.error(f"no rows named {sorted(unknown)} in the {args.table} table of suite {args.suite!r}")
    if not any(rows_to_run(args.table, preset(args.preset), preset("improved"), protocols, quick=args.quick,
                           names=args.variants).values()):
        parser.error(f"the {args.table} table has no rows for {args.protocol}"
                     + (" in quick mode" if any(table.values()) else ""))
    # Last, as they create the folders: every folder the run writes must take a file now, not after the
    # backbone's pre-training or a task's training. Rank 0 alone writes the results and checkpoints;
    # every rank reads and writes the cache.
    rank0 = os.environ.get("RANK", "0") == "0"
    folders = [(f"--out {args.out}", args.out) if rank0 and args.out else None,
               (f"--checkpoint-dir {args.checkpoint_dir}", args.checkpoint_dir) if rank0 and args.checkpoint_dir
               else None,
               (f"MIRA_EXPERIMENTS_CACHE={cache_path()}", cache_path()),
               (f"--record ({_out_dir(args, args.suite)})", _out_dir(args, args.suite)) if rank0 and args.record
               else None]
    for label, folder in filter(None, folders):
        try:
            _writable(folder)
        except OSError as err:
            parser.error(f"{label}: cannot write there ({err.strerror or err})")
    if rank0 and args.checkpoint_dir:
        folders_named_as_files = sorted(name for name in os.listdir(args.checkpoint_dir)
                                        if name.endswith(".safetensors")
                                        and os.path.isdir(os.path.join(args.checkpoint_dir, name)))
        if folders_named_as_files:  # safetensors read one as "No such device (os error 19)", mid-run
            parser.error(f"--checkpoint-dir {args.checkpoint_dir}: {folders_named_as_files[0]} is a folder, "
                         "not a checkpoint file")
        from safetensors import safe_open

        for name in sorted(os.listdir(args.checkpoint_dir)):
            path = os.path.join(args.checkpoint_dir, name)
            if not (name.endswith(".safetensors") and os.path.isfile(path)):
                continue
            try:  # its header only: an unreadable (e.g. empty) file failed as a traceback when its row came
                with safe_open(path, framework="pt"):
                    pass
            except Exception as err:  # safetensors' own error type, or an OSError
                parser.error(f"--checkpoint-dir {args.checkpoint_dir}: {name} is not a readable checkpoint "
                             f"({err}): delete it (its row starts again) or use another folder")
    ctx = md.init_distributed(timeout_s=args.dist_timeout)
    try:
        with md.explain_collective_failures(ctx, args.dist_timeout):
            return _run(args, argv, ctx)
    finally:
        md.shutdown()


def _load_backbone(bb_cfg, args, ctx: md.DistributedContext):
    # Rank 0 pre-trains (or loads) first, so K ranks do not pre-train K times; then every rank
    # takes rank 0's weights, so ranks on hosts without a shared cache still agree bitwise.
    if not ctx.is_main:
        md.barrier(ctx)
    backbone, info = load_pretrained_backbone(bb_cfg, use_cache=not args.no_cache,
                                              progress=not args.no_progress and ctx.is_main)
    if ctx.is_main:
        md.barrier(ctx)
    md.broadcast_tensors_(list(backbone.state_dict().values()), context=ctx)
    return backbone, info


def _launcher(ctx: md.DistributedContext) -> str:
    if not ctx.active:
        return "python -m"
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
    nodes = f"--nnodes {ctx.world_size // per_node} " if per_node != ctx.world_size else ""
    return f"torchrun {nodes}--nproc-per-node {per_node} -m"


def _run(args, argv, ctx: md.DistributedContext) -> dict:
    from tqdm.auto import tqdm

    warnings.filterwarnings("ignore", message=".*falling back to the plain-PyTorch reference.*")
    torch.set_num_threads(args.threads)
    parallel.set_strategy(args.strategy)
    suite = SUITES[args.suite]
    setup = QUICK if args.quick else FULL
    seeds = tuple(args.seeds) if args.seeds else setup["seeds"]
    out_dir = _out_dir(args, suite.name)
    if ctx.is_main:
        os.makedirs(out_dir, exist_ok=True)
    protocols = suite.settings if args.protocol == "all" else (args.protocol,)
    overrides = setup.get("recipe", {})
    base, improved = preset(args.preset, **overrides), preset("improved", **overrides)
    cfg = P.ProtocolConfig(recipe=base, joint_epochs=setup["joint_epochs"],
                           dg_consolidation_epochs=setup["dg_consolidation_epochs"],
                           cil_adapters_per_task=setup["cil_adapters_per_task"], probe_max_iter=setup["probe_max_iter"])
    t_start, cpu_start, load_start = time.perf_counter(), time.process_time(), os.getloadavg()

    bb_cfg = dataclasses.replace(suite.backbone, epochs=min(suite.backbone.epochs, 8)) if args.quick else suite.backbone
    backbone, bb_info = _load_backbone(bb_cfg, args, ctx)
    domains = suite.domains()
    if args.quick:
        domains = [subsample(d, setup["train"], setup["test"]) for d in domains[: suite.quick_domains]]
    dil_t = P.dil_tasks(domains)
    cil_t = P.cil_tasks(domains, cfg.cil_classes_per_task)
    variants = rows_to_run(args.table, base, improved, protocols, quick=args.quick, names=args.variants)  # as main
    protocols = tuple(p for p in protocols if variants[p])  # a table may have no rows for a setting
    order = {p: [v.name for v in vs] for p, vs in variants.items() if p in protocols}

    results: dict = {}
    for proto in protocols:
        results[proto] = {"runs": {}, "domains": [d.name for d in domains]}
        if proto != "dg":
            results[proto]["tasks"] = [t.name for t in (dil_t if proto == "dil" else cil_t)]
    units = sum(len(domains) * len(vs) if p == "dg" else len(vs) for p, vs in variants.items())
    bar = tqdm(total=units * len(seeds), desc=f"{suite.name}", disable=args.no_progress or not ctx.is_main,
               file=sys.stdout)
    timings: dict = {}
    pools_info: dict = {}
    profiles: dict = {}
    slot_tasks: dict = {}

    def timed(key, fn, *fn_args, **fn_kwargs):
        t0 = time.perf_counter()
        r = fn(*fn_args, **fn_kwargs)
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0
        return r

    for seed in seeds:
        pools: dict = {}

        def pool_for(recipe, proto, seed=seed, pools=pools):
            local = proto == "cil"
            copies = adapter_copies(recipe, cfg, local)
            key = _pool_key(recipe, local, copies)
            if key not in pools:
                bar.set_postfix_str(f"seed {seed}: adaptation ({proto}, {recipe.adapt_head} head)")
                tasks = cil_t if local else dil_t
                pools[key] = timed("adaptation", train_adapter_pool, backbone, tasks, recipe, seed,
                                   local_labels=local, adapters_per_task=copies)
                entry = {"seed": seed, "protocol": proto, "adapt_head": recipe.adapt_head,
                         "info": pools[key].info}
                if not local:
                    entry["own_head_cross_accuracy"] = adapter_cross_accuracy(backbone, pools[key], tasks, recipe)
                pools_info.setdefault(f"{proto}/{recipe.adapt_head}", []).append(entry)
            return pools[key]

        for proto in protocols:
            for v in variants[proto]:
                needs_pool = v.kind not in ("seq_lora", "joint_lora")
                pool = pool_for(v.recipe, proto) if needs_pool else None
                bar.set_postfix_str(f"seed {seed}: {proto} {v.name}")
                if proto == "dg":
                    for h in range(len(domains)):
                        r = timed(f"dg/{v.name}", P.run_dg_fold, v, backbone, dil_t, h, pool, cfg, seed)
                        results["dg"]["runs"].setdefault(v.name, []).append(r)
                        bar.update(1)
                    continue
                tasks = dil_t if proto == "dil" else cil_t
                profile = proto == "dil" and seed == seeds[0] and v.name in ("mira", "improved")
                keep = profile or suite.name == "conflict" or (proto == "dil" and v.kind == "mira")
                ckpt = None
                if args.checkpoint_dir:
                    slug = "".join(c if c.isalnum() else "_" for c in v.name)
                    ckpt = os.path.join(args.checkpoint_dir, f"{suite.name}-{args.preset}-seed{seed}-{proto}-{slug}"
                                        f"{'-quick' if args.quick else ''}.safetensors")
                r = timed(f"{proto}/{v.name}", P.run_continual, proto, v, backbone, tasks, pool, cfg, seed,
                          keep_model=keep, checkpoint=ckpt)
                model = r.pop("model", None)
                if suite.name == "conflict" and model is not None and v.kind != "oracle":
                    r["cue_blind_agreement"] = _cue_blind_agreement(model, tasks)
                if profile and model is not None:
                    profiles[v.name] = P.retrieval_profile(model, tasks, seed=seed)
                    slot_tasks[v.name] = pool.slot_task.tolist()
                if proto == "dil" and v.kind == "mira" and model is not None:
                    r["weight_mass"] = P.weight_mass(model, tasks, seed=seed)
                results[proto]["runs"].setdefault(v.name, []).append(r)
                bar.update(1)
    bar.close()
    elapsed, cpu_seconds = time.perf_counter() - t_start, time.process_time() - cpu_start
    (cpu_seconds,) = md.all_reduce_sum([cpu_seconds], ctx)  # every rank's CPU time

    command = f"{_launcher(ctx)} mira.experiments " + " ".join(argv if argv is not None else sys.argv[1:])
    cpu_model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                     platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    doc = {
        "command": command, "suite": suite.name, "preset": args.preset, "table": args.table,
        "mode": "quick" if args.quick else "full",
        "distributed": {"world_size": ctx.world_size, "backend": ctx.backend,
                        "strategy": args.strategy if ctx.active else None},
        "seeds": list(seeds), "elapsed_seconds": elapsed, "cpu_seconds": cpu_seconds, "timings_seconds": timings,
        "machine": {"platform": platform.platform(), "cpu": cpu_model, "cpus": os.cpu_count(),
                    "torch_threads": args.threads, "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
                    "torch": torch.__version__},
        "backbone": bb_info,
        "zero_shot_backbone_head": {t.name: evaluate(backbone, t.test_x, t.test_y) for t in dil_t},
        "recipes": {"base": dataclasses.asdict(base), "improved": dataclasses.asdict(improved)},
        "variants": {p: [{"name": v.name, "kind": v.kind, "recipe": dataclasses.asdict(v.recipe)} for v in vs]
                     for p, vs in variants.items()},
        "protocol": {k: val for k, val in dataclasses.asdict(cfg).items() if k != "recipe"},
        "summary_mean_std": summarise(results), "results": results, "adaptation": pools_info,
        # the profiles are of seeds[0], the first seed given (not the smallest): the plot is titled by it
        "dil_retrieval_profile_seed0": profiles, "dil_retrieval_profile_seed": seeds[0],
        "dil_retrieval_slot_tasks": slot_tasks, "row_order": order,
    }
    if not ctx.is_main:
        return doc
    table = write(doc, out_dir)
    print(table)
    print(f"elapsed {elapsed:.1f} s wall clock, {cpu_seconds:.1f} s CPU ({ctx.world_size} process(es)); "
          f"results in {out_dir}")
    return doc


if __name__ == "__main__":
    main()
