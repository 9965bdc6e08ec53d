"""What storing the adapter banks in 16 bits does to a trained MIRA model's predictions.

``python -m mira.experiments.bank_rounding [--seeds 0 1 2] [--variants mira improved] [--dtypes
bfloat16 float16]`` trains the iDigits DIL protocol's MIRA rows as ``python -m mira.experiments dil``
does (same backbone, tasks, adaptation pools and recipes), then evaluates every task's test set with
the final model: with its float32 banks, and once per 16-bit dtype with the banks rounded once to it
(what ``mira.attach(..., bank_dtype=...)`` stores: the kernels widen 16-bit entries exactly, so a
float32 copy of the rounded values computes the same). Prints, per variant, seed and dtype, the
accuracy of each, how many test predictions change, and the largest logit change relative to the
largest logit. This is the evidence a decision on 16-bit banks at inference needs beyond the
contract's error bound (docs/contract.md section 4); it writes nothing unless ``--json PATH``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import mira

from . import protocols as P
from .__main__ import FULL, adapter_copies, build_variants
from .backbone import load_pretrained_backbone, normalize
from .recipe import preset
from .stages import train_adapter_pool
from .suites import SUITES


@torch.no_grad()
def _logits(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    model.eval()
    return torch.cat([model(normalize(x[i:i + batch_size])) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def round_banks_(model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Round every memory's banks to ``dtype`` and back, in place; returns the entries that changed."""
    changed = 0
    for memory in mira.memories(model):
        for bank in (memory.bank_a, memory.bank_b):
            rounded = bank.to(dtype).to(bank.dtype)
            changed += int((rounded != bank).sum())
            bank.copy_(rounded)
    return changed


def compare(model: torch.nn.Module, tasks, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Per task: accuracy with the model's banks, then with them rounded to ``dtype`` (the model is
    left rounded)."""
    before = [_logits(model, t.test_x) for t in tasks]
    changed = round_banks_(model, dtype)
    after = [_logits(model, t.test_x) for t in tasks]
    rows = []
    for t, a, b in zip(tasks, before, after, strict=True):
        rows.append({"task": t.name, "n": len(t.test_y),
                     "acc_f32": (a.argmax(1) == t.test_y).float().mean().item(),
                     "acc_rounded": (b.argmax(1) == t.test_y).float().mean().item(),
                     "flipped": int((a.argmax(1) != b.argmax(1)).sum()),
                     "max_rel_logit_change": ((a - b).abs().max() / a.abs().max()).item()})
    return {"dtype": str(dtype).removeprefix("torch."), "bank_entries_changed": changed, "tasks": rows}


@torch.no_grad()
def _banks(model: torch.nn.Module) -> list[torch.Tensor]:
    return [bank.clone() for memory in mira.memories(model) for bank in (memory.bank_a, memory.bank_b)]


@torch.no_grad()
def _restore_banks(model: torch.nn.Module, saved: list[torch.Tensor]) -> None:
    banks = [bank for memory in mira.memories(model) for bank in (memory.bank_a, memory.bank_b)]
    for bank, kept in zip(banks, saved, strict=True):
        bank.copy_(kept)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m mira.experiments.bank_rounding",
                                     description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(FULL["seeds"]), help="training seeds")
    parser.add_argument("--variants", nargs="+", default=["mira", "improved"],
                        help="DIL rows of the main table (MIRA kinds only)")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"], choices=["bfloat16", "float16"],
                        help="16-bit storage dtypes to round the banks to, each from the float32 banks")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="also write the record here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    suite = SUITES["idigits"]
    base, improved = preset("default"), preset("improved")
    cfg = P.ProtocolConfig(recipe=base, joint_epochs=FULL["joint_epochs"],
                           dg_consolidation_epochs=FULL["dg_consolidation_epochs"],
                           cil_adapters_per_task=FULL["cil_adapters_per_task"], probe_max_iter=FULL["probe_max_iter"])
    rows = {v.name: v for v in build_variants(base, improved, "dil")}
    unknown = [name for name in args.variants if name not in rows or rows[name].kind != "mira"]
    if unknown:
        parser.error(f"not MIRA rows of the DIL table: {unknown}")
    backbone, _ = load_pretrained_backbone(suite.backbone, use_cache=True, progress=False)
    tasks = P.dil_tasks(suite.domains())
    record = {"command": "python -m mira.experiments.bank_rounding " + " ".join(sys.argv[1:] if argv is None else argv),
              "runs": []}
    for seed in args.seeds:
        pools = {}
        for name in args.variants:
            v = rows[name]
            key = (v.recipe.adapt_head, adapter_copies(v.recipe, cfg, False))
            if key not in pools:
                pools[key] = train_adapter_pool(backbone, tasks, v.recipe, seed, local_labels=False,
                                                adapters_per_task=key[1])
            t0 = time.perf_counter()
            model = P.run_continual("dil", v, backbone, tasks, pools[key], cfg, seed, keep_model=True).pop("model")
            saved = _banks(model)
            for dtype_name in args.dtypes:
                _restore_banks(model, saved)
                result = compare(model, tasks, getattr(torch, dtype_name))
                result.update(variant=name, seed=seed, seconds=time.perf_counter() - t0)
                record["runs"].append(result)
                n = sum(r["n"] for r in result["tasks"])
                acc = [sum(r[k] * r["n"] for r in result["tasks"]) / n for k in ("acc_f32", "acc_rounded")]
                flipped = sum(r["flipped"] for r in result["tasks"])
                worst = max(r["max_rel_logit_change"] for r in result["tasks"])
                print(f"{name:<10} seed {seed}: accuracy {100 * acc[0]:.2f}% (float32 banks) -> {100 * acc[1]:.2f}% "
                      f"({dtype_name}), {flipped} of {n} test predictions changed, largest logit change "
                      f"{worst:.2e} of the largest logit", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return record


if __name__ == "__main__":
    main()
