"""Multi-process runs for the distributed tests: a launcher and the scenarios each rank runs.

:func:`launch` starts ``world_size`` ranks with torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) on loopback, waits for them with a timeout
(killing any left), and returns what each rank's scenario returned. The ranks are forked from one
forkserver that has imported torch, timm and mira once: a fresh interpreter per rank would pay
that import (seconds on a 2-core machine) for every rank of every launch. ``world_size=1`` without
a process group is the one-process reference: the same code, no ``torchrun`` environment.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import socket
import tempfile
import time
import traceback

import timm  # noqa: F401  (imported here so that the forkserver preloads it)
import torch

import mira
from mira import distributed as md
from mira.experiments import parallel
from mira.experiments import protocols as P
from mira.experiments.backbone import BackboneConfig, create_backbone
from mira.experiments.dualgpm import GradientProjectionMemory
from mira.experiments.recipe import preset
from mira.experiments.stages import (
    RecipeConfig,
    Task,
    append_task_adapters,
    attach_memory_model,
    consolidate,
    gpm_update,
    train_adapter_pool,
)

_mp = multiprocessing.get_context("forkserver")
_mp.set_forkserver_preload([__name__])


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(scenario: str, rank: int, world_size: int, port: int, args: dict, out: str) -> None:
    if world_size > 1 or args.get("process_group", True):
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    else:
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            os.environ.pop(var, None)
    torch.set_num_threads(1)
    try:
        result = {"ok": globals()[scenario](args)}
    except BaseException as err:  # noqa: BLE001 (reported to the test, whatever it is)
        result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(),
                  "failed_at": time.monotonic()}
        with contextlib.suppress(Exception):  # a process group whose peer died cannot be destroyed cleanly
            torch.save(result, out)
        os._exit(1)
    finally:
        md.shutdown()
    torch.save(result, out)
    os._exit(0 if "ok" in result else 1)


def launch(scenario: str, world_size: int, args: dict | None = None, *, timeout: float = 240.0,
           grace: float = 20.0, process_group: bool = True) -> list[dict]:
    """Run ``scenario(args)`` on ``world_size`` ranks; returns, in rank order, each rank's
    ``{"ok": result}`` or ``{"error": ..., "traceback": ..., "failed_at": monotonic time}``, or
    ``{"exitcode": ...}`` for a rank that left nothing (``"killed": True`` if it was killed).

    Like torchrun, once a rank has failed the others get ``grace`` seconds to end, then are killed.
    Raises TimeoutError (after killing every rank) when the ranks have not ended within ``timeout``.
    """
    args = dict(args or {}, process_group=process_group)
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        outs = [os.path.join(tmp, f"rank{r}.pt") for r in range(world_size)]
        procs = [_mp.Process(target=_entry, args=(scenario, r, world_size, port, args, outs[r]))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        killed = set()
        while any(p.is_alive() for p in procs):
            now = time.monotonic()
            if any(p.exitcode not in (None, 0) for p in procs):
                deadline = min(deadline, now + grace)
            if now > deadline:
                killed = {r for r, p in enumerate(procs) if p.is_alive()}
                for r in killed:
                    procs[r].kill()
                break
            time.sleep(0.05)
        for p in procs:
            p.join()
        if killed and not any(p.exitcode not in (None, 0) for r, p in enumerate(procs) if r not in killed):
            raise TimeoutError(f"{scenario}: ranks {sorted(killed)} of {world_size} still running after "
                               f"{timeout:.0f} s")
        results = []
        for r, (p, out) in enumerate(zip(procs, outs)):
            result = torch.load(out, weights_only=False) if os.path.exists(out) else {"exitcode": p.exitcode}
            results.append(dict(result, killed=True) if r in killed else result)
        return results


# ------------------------------------------------------------------------------------------------
# The recipe on a tiny ViT and synthetic tasks: both stages, DualGPM, mixup, a growing memory.
# ------------------------------------------------------------------------------------------------

# 26 training images per task and global batch 8: the last batch of each epoch has 2 images, so
# with 3 ranks one rank's share is empty (padding path) and shares are unequal.
CFG = RecipeConfig(adapters_per_task=1, batch_size=8, max_epochs=2, consolidation_epochs=2, gpm_threshold=0.9)
IMPROVED = preset("improved", adapters_per_task=1, batch_size=8, max_epochs=2, consolidation_epochs=2,
                  gpm_threshold=0.9)


def tiny_backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_backbone(BackboneConfig(embed_dim=16, depth=2, num_heads=2, img_size=8, patch_size=4))
    return model.eval().requires_grad_(False)


def tiny_tasks(n_tasks: int = 3, n: int = 26, seed: int = 0) -> list[Task]:
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for t in range(n_tasks):
        y = torch.randint(10, (n,), generator=g)
        x = (torch.rand(n, 1, 8, 8, generator=g) * 0.5 + y.view(-1, 1, 1, 1) / 20 + 0.1 * t).clamp(0, 1)
        tasks.append(Task(f"t{t}", x, y, x[:11], y[:11], tuple(range(10))))
    return tasks


def _mira_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = {k: v.detach().clone() for k, v in md.mira_state_tensors(model).items()}
    state.update({f"head.{k}": v.detach().clone() for k, v in model.head.state_dict().items()})
    return state


def _grow(model: torch.nn.Module, gen: torch.Generator) -> None:
    # Non-zero adapters (B is zero at init), so that the keys get gradients.
    with torch.no_grad():
        for proj in mira.projections(model):
            proj.lora_b.copy_(torch.randn(proj.lora_b.shape, generator=gen))
    mira.write_adapters(model, [torch.randn(1, 16, generator=gen) for _ in mira.memories(model)])


def _growth_steps(device: str) -> dict:
    """The failure of the issue: consolidation, write_adapters, another step, on one wrapper."""
    torch.manual_seed(1)
    model = attach_memory_model(tiny_backbone(), rank=2, head_rows=10).to(device)
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):
        _grow(model, gen)
    mira.set_stage(model, "consolidation", extra_trainable=("head",))
    net = parallel.wrap(model)
    x = torch.rand(7, 1, 8, 8, generator=gen).to(device)
    y = torch.randint(10, (7,), generator=gen).to(device)
    shard = md.ShardedBatches(torch.arange(7), 7).shard(0)
    grads = []
    for step in range(2):
        logits = net(x[shard.indices])
        loss = shard.loss(torch.nn.functional.cross_entropy(logits, y[shard.indices], reduction="none"))
        loss.backward()
        grads.append({f"keys.{i}": m.keys.grad.cpu() for i, m in enumerate(mira.memories(model))})
        grads[-1]["head"] = model.head.weight.grad.cpu()
        model.zero_grad(set_to_none=True)
        del loss, logits  # one process fails after growth while a graph holds the old keys (issue 15's)
        if step == 0:
            _grow(model, gen)  # the memory grows: 2 -> 3 slots
    return {"grads": grads, "builds": getattr(net, "builds", None),
            "slots": [m.num_slots for m in mira.memories(model)]}


def growth(args: dict) -> dict:
    """Only the growing memory, on ``args["device"]`` ("cuda": this rank's GPU, NCCL)."""
    ctx = md.init_distributed(backend=args.get("backend"), timeout_s=60.0)
    parallel.set_strategy(args["strategy"])
    device = str(ctx.device) if args["device"] == "cuda" and ctx.active else args["device"]
    return _growth_steps(device)


def capacity_writes(args: dict) -> dict:
    """A memory of fixed capacity written between steps, each rank drawing other keys: a write changes
    no shape, and the wrapper must still broadcast rank 0's contents (as after a growth)."""
    ctx = md.init_distributed(timeout_s=60.0)
    torch.manual_seed(1)
    model = mira.attach(tiny_backbone(), rank=2, capacity=4)
    model.head = torch.nn.Linear(16, 10, bias=False)
    mira.set_stage(model, "consolidation", extra_trainable=("head",))
    net = md.DistributedModel(model, "ddp")
    gen = torch.Generator().manual_seed(100 + ctx.rank)  # a different draw on every rank
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    for _ in range(2):
        _grow(model, gen)
        mira.set_stage(model, "consolidation", extra_trainable=("head",))
        net(x).square().sum().backward()
        model.zero_grad(set_to_none=True)
    out = {"state": _mira_state(model), "builds": net.builds}

    # Then a stage that trains nothing: a rebuild without DDP, which must still broadcast rank 0's
    # MIRA tensors (it skipped the broadcast, and each rank served the keys it drew).
    _grow(model, gen)
    mira.set_stage(model, "inference")
    with torch.no_grad():
        logits = net(x)
    out["inference"] = {"state": _mira_state(model), "logits": logits, "builds": net.builds}

    # A first build with nothing to train: no DDP, whose init sync would have broadcast rank 0's
    # parameters and buffers, so the wrapper must (each rank's head and keys drawn differently).
    torch.manual_seed(200 + ctx.rank)
    fresh = mira.attach(tiny_backbone(), rank=2, capacity=4)
    fresh.head = torch.nn.Linear(16, 10)
    _grow(fresh, gen)
    mira.set_stage(fresh, "inference")
    fresh_net = md.DistributedModel(fresh, "ddp", verbose=False)
    with torch.no_grad():
        logits = fresh_net(x)
    out["fresh_inference"] = {"state": _mira_state(fresh), "logits": logits, "builds": fresh_net.builds}
    return out


def lora_resets(args: dict) -> dict:
    """reset_lora on every rank, each drawing another A from its own random state: it changes no shape
    and no memory, and the wrapper must still give every rank rank 0's A at its next call."""
    ctx = md.init_distributed(timeout_s=60.0)
    torch.manual_seed(1)
    model = mira.attach(tiny_backbone(), rank=2)
    model.head = torch.nn.Linear(16, 10, bias=False)
    mira.set_stage(model, "adaptation", extra_trainable=("head",))
    net = md.DistributedModel(model, "ddp", verbose=False)
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    net(x).square().sum().backward()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(300 + ctx.rank)  # a different draw on every rank
    for proj in mira.projections(model):
        proj.reset_lora()
    net(x).square().sum().backward()
    lora = {n: t.detach().clone() for n, t in model.named_parameters() if "lora" in n}
    return {"lora": lora, "builds": net.builds}


def recipe(args: dict) -> dict:
    """Adaptation pool, DIL consolidation under DualGPM, a DG fold with mixup, and a growing memory."""
    md.init_distributed(timeout_s=args.get("timeout", 120.0))
    parallel.set_strategy(args["strategy"])
    backbone, tasks = tiny_backbone(), tiny_tasks()
    out: dict = {}

    pool = train_adapter_pool(backbone, tasks[:2], CFG, seed=0, local_labels=False)
    out["pool"] = {"bank_a": pool.bank_a, "bank_b": pool.bank_b, "heads": pool.heads, "info": pool.info}

    # Consolidation of two tasks under DualGPM, step by step, to compare the bases themselves.
    model = attach_memory_model(backbone, rank=CFG.rank, head_rows=10)
    gen = torch.Generator().manual_seed(0)
    gpm = GradientProjectionMemory(CFG.gpm_threshold)
    keys = lambda t: [torch.randn(1, 16, generator=torch.Generator().manual_seed(100 * t + b))  # noqa: E731
                      for b in range(len(mira.memories(model)))]
    append_task_adapters(model, pool, 0, keys(0))
    out["consolidate0"] = consolidate(model, tasks[0].train_x, tasks[0].train_y, CFG, gen)
    out["gpm_ranks0"] = gpm_update(model, gpm, tasks[0].train_x)
    append_task_adapters(model, pool, 1, keys(1))
    out["consolidate1"] = consolidate(model, tasks[1].train_x, tasks[1].train_y, CFG, gen, gpm=gpm)
    out["gpm"] = gpm.state_dict()
    out["consolidated"] = _mira_state(model)

    # The DIL protocol (it evaluates with sharded test sets), as the default preset and as the
    # improved one (shared head, supervised routing penalty, fixed-norm DualGPM), and a DG fold
    # (within-class mixup).
    cfg = P.ProtocolConfig(recipe=CFG)
    dil = P.run_continual("dil", "mira", backbone, tasks[:2], pool, cfg, seed=0, keep_model=True)
    out["dil"] = {"acc": dil["acc"], "consolidation": dil["consolidation"], "gpm_ranks": dil["gpm_ranks"],
                  "probe": dil["probe"], "state": _mira_state(dil["model"])}
    shared_pool = train_adapter_pool(backbone, tasks[:2], IMPROVED, seed=0, local_labels=False)
    improved = P.run_continual("dil", P.Variant("improved", "mira", IMPROVED), backbone, tasks[:2], shared_pool,
                               cfg, seed=0, keep_model=True)
    out["improved"] = {"acc": improved["acc"], "consolidation": improved["consolidation"],
                       "state": _mira_state(improved["model"])}
    dg = P.run_dg_fold("mira", backbone, tasks[:2], 1, pool, cfg, seed=0, keep_model=True)
    out["dg"] = {"held_out_acc": dg["held_out_acc"], "train": dg["train"], "state": _mira_state(dg["model"])}
    out["growth"] = _growth_steps("cpu")
    out["context"] = md.get_context()
    return out



# ------------------------------------------------------------------------------------------------
# Checkpoint and resume: a run killed mid-task, started again on the same checkpoints.
# ------------------------------------------------------------------------------------------------


def resume(args: dict) -> dict:
    """A DIL run of the improved recipe (DualGPM with fixed-norm keys, routing memory) over 3 tasks,
    saving a checkpoint after each.

    ``args["die_at"]``: rank 1 dies (``os._exit``) when the n-th consolidation starts, i.e. mid-task,
    after that task's adapters were appended to the memory.
    """
    ctx = md.init_distributed(timeout_s=60.0)
    parallel.set_strategy(args["strategy"])
    backbone, tasks = tiny_backbone(), tiny_tasks()
    calls = [0]
    real_consolidate = P.consolidate

    def consolidate(*a, **k):
        calls[0] += 1
        if calls[0] == args.get("die_at") and ctx.rank == 1:
            os._exit(3)
        return real_consolidate(*a, **k)

    P.consolidate = consolidate
    with md.explain_collective_failures(ctx, 60.0):
        pool = train_adapter_pool(backbone, tasks, IMPROVED, seed=0, local_labels=False)
        r = P.run_continual("dil", P.Variant("improved", "mira", IMPROVED), backbone, tasks, pool,
                            P.ProtocolConfig(recipe=CFG), seed=0, keep_model=True,
                            checkpoint=os.path.join(args["dir"], "improved.safetensors"))
    return {"acc": r["acc"], "consolidation": r["consolidation"], "gpm_ranks": r["gpm_ranks"], "probe": r["probe"],
            "state": _mira_state(r["model"]), "consolidations_run": calls[0]}


# ------------------------------------------------------------------------------------------------
# A rank that dies or hangs mid-training.
# ------------------------------------------------------------------------------------------------


def lost_rank(args: dict) -> dict:
    """Train under ``args["strategy"]``; at step 3 rank 1 dies (``os._exit``) or hangs (sleeps).

    The survivors must fail with an error, not wait: within seconds for a dead rank (its sockets
    close), within the process group's timeout for a hung one.
    """
    ctx = md.init_distributed(timeout_s=args["timeout"])
    parallel.set_strategy(args["strategy"])
    model = attach_memory_model(tiny_backbone(), rank=2, head_rows=10)
    mira.write_adapters(model, generator=torch.Generator().manual_seed(0))
    mira.set_stage(model, "consolidation", extra_trainable=("head",))
    net = parallel.wrap(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    x, y = torch.rand(8, 1, 8, 8), torch.randint(10, (8,))
    with md.explain_collective_failures(ctx, args["timeout"]):
        steps = _train_until_lost(ctx, net, opt, x, y, args)
    return {"steps": steps}


def _train_until_lost(ctx, net, opt, x, y, args) -> int:
    for step in range(10_000):
        if step == 3 and ctx.rank == 1:
            if args["mode"] == "die":
                torch.save(time.monotonic(), args["marker"])
                os._exit(3)
            torch.save(time.monotonic(), args["marker"])
            time.sleep(3600)
        shard = md.ShardedBatches(torch.arange(8), 8).shard(0)
        loss = shard.loss(torch.nn.functional.cross_entropy(net(x[shard.indices]), y[shard.indices],
                                                            reduction="none"))
        loss.backward()
        opt.step()
        opt.zero_grad()
    return step

