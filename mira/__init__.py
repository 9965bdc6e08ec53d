"""MIRA layers for timm Vision Transformers: associative adapter memories, query modules, save/load.

Every adapted layer calls the public op :func:`mira_kernels.mira_linear`, so whichever backend
``mira_kernels`` routes to (reference, cpu, triton, cuda) serves the model.

Public API (names are stable; other packages build on them)::

    mira.attach(model, config=None, *, example_input=None, **options) -> model
        config: a MiraConfig (PEFT style), or its fields as keyword arguments (rank=4,
        slices=("q", "v"), query="identity", separation="affine", blocks=None, capacity=None,
        key_dim=None, query_token="cls", query_hidden=None, key_norm="per_feature",
        key_init="uniform", trainable_bank=False, bank_dtype=None, scale=1.0, eps=..., slice_width=None).
        bank_dtype=torch.bfloat16 stores the adapter banks in 16 bits (half the bytes each forward
        reads; float32 mixing; each stored entry rounded by <= 2^-8 relative). In place:
        each timm ViT block gets ``block.mira_memory`` (AdapterMemory, with its query module; a block
        that is an nn.Sequential, such as a parallel ViT's attention branch, holds it in ``attn``) and
        ``block.attn.qkv`` becomes a MiraProjection wrapping the original Linear. Verified by dry
        runs; the backbone is frozen; the stage is "adaptation". The defaults are the authors'
        retrieval: keys normalised per feature across the stored keys, then cosine
        (key_norm="per_feature"; "unit" = cosine only), new keys U(-1, 1) (key_init="uniform";
        "normal" = Gaussian, as the paper's text says).
    mira.detach(model) -> model                          undo attach
    mira.memories(model) -> list[AdapterMemory]          block order
    mira.named_memories(model) -> list[(name, AdapterMemory)]
    mira.projections(model) -> list[MiraProjection]      block order
    mira.set_stage(model, "adaptation" | "consolidation" | "inference", *, extra_trainable=()) -> model
        adaptation: LoRAs train, memory bypassed; consolidation: keys + query modules (+ bank if
        trainable_bank) train, memory used; inference: nothing trains. Everything else is frozen
        except modules named in extra_trainable (e.g. ("head",)).
    mira.trainable_parameters(model, stage) -> list[Parameter]     what that stage trains
    mira.count_parameters(model) -> dict   backbone / keys / query / bank / lora / added (keys + query
        + bank) / added_bytes / total / trainable
    mira.parameter_summary(model) -> str / mira.print_trainable_parameters(model)   totals and %
    mira.association_matrices(model, images) -> {memory name: (B, num_slots) weights}
    mira.write_adapters(model, keys=None, *, task=None, generator=None, reset=True) -> list[int]
        append each block's current LoRA to its memory (a U(-1, 1) key unless given), re-init LoRA;
        ``task`` names the new slots
    mira.task_slots(model) -> {task: [slots]}; mira.remove_tasks / select_tasks(model, tasks);
        mira.task_slot_weights(model, task) -> fold weights serving one task
    mira.forget_optimizer_state(model, optimizer)   after a memory grew or its slots moved
        (a step with stale state raises)
    mira.save_memories(model, path) / mira.load_memories(model, path)      safetensors, versioned
        (a file saved with key_norm="unit" loads into a model attached with key_norm="unit")
    mira.save_model(model, path, *, modules=None) / mira.load_model(backbone, path) -> model
        memories + head (and a distilled DeiT's head_dist) + attach config in one file; rebuilt on a
        fresh backbone in one call
    mira.config_of(model) -> MiraConfig          the config that attaches the same layers
    mira.import_peft(model, source, *, into="lora" | "memory", module_names=None, drop_unused_rows=False, ...)

    Serving (mira.merge, mira.export):
    mira.merge(model) / mira.unmerge(model)      the live LoRA into / out of the frozen qkv weights
    mira.fold(model, weights) / mira.unfold(model)   a fixed mixture of each memory into / out of them
    mira.mean_retrieval_weights(model, batches) -> {memory name: (N,)}   calibrated fold weights
    mira.unload(model) -> model                  remove MIRA, keep a merged / folded update (plain timm)
    mira.export.export_program(model, x) / .export_aoti(model, x, path) / .load_aoti(path)
    mira.export.export_onnx(model, x, path)      the op decomposed into standard ops (export only)
    mira.export.check_against_float64(model, x, {name: output}) -> Float64Check   judge an export: its
        error against the float64 eager model within 2x eager fp32's own (.failed, .raise_if_failed())

    AdapterMemory: .append(bank_a, bank_b, keys=None, *, names=None) -> slots, .remove(indices or names),
        .clear(), .slot_names, .slots_named(task),
        .num_slots, .capacity, .get_association_matrix(query | tokens=...), .make_query(tokens),
        .stored_keys, .stored_adapters, .forget_optimizer_state(optimizer)
    MiraProjection: .base_layer, .memory, .lora_a (S, r, d_in), .lora_b (S, d_s, r),
        .slice_offsets, .slice_names, .stage, .reset_lora(), .merged_update (a MergedUpdate held in
        the base weight by merge / fold, or None)
    MemoryConfig: one memory's resolved config (every width known), AdapterMemory(config).
    IdentityQuery, LinearQuery, MlpQuery, build_query_module(kind, d_in, d_k, hidden_features=None): the
        query modules (query="identity" | "linear" | "mlp").
    Constants: STAGES, QUERY_MODULES, QUERY_TOKENS, KEY_NORMS, KEY_INITS (the options' choices),
        MEMORY_ATTR (the block attribute holding its memory: "mira_memory"), FORMAT_VERSION (files).

Queries are made from each block's attention input (LN1's output; the CLS token by default):
the wrapped ``attn.qkv`` receives exactly that tensor, which ``attach`` verifies on its dry run,
so no hook carries activations between modules. Attach after loading the backbone's weights
(the wrapped layer's state-dict keys gain ``.base_layer``).

A typical run::

    model = timm.create_model("vit_base_patch16_224")
    mira.attach(model)                                    # adaptation stage, equal to the backbone
    for task in tasks:                                    # train each task's LoRA, then store it
        mira.set_stage(model, "adaptation", extra_trainable=("head",)); train(model, task)
        mira.write_adapters(model)
    mira.set_stage(model, "consolidation", extra_trainable=("head",)); train(model, all_tasks)
    mira.set_stage(model, "inference"); model.eval(); logits = model(images)
"""

from . import export
from .config import KEY_INITS, KEY_NORMS, QUERY_MODULES, QUERY_TOKENS, STAGES, MemoryConfig, MiraConfig
from .integration import (
    MEMORY_ATTR,
    association_matrices,
    attach,
    config_of,
    count_parameters,
    detach,
    memories,
    named_memories,
    projections,
    set_stage,
    trainable_parameters,
    write_adapters,
)
from .io import FORMAT_VERSION, import_peft, load_memories, load_model, save_memories, save_model
from .layers import MiraProjection
from .memory import AdapterMemory
from .merge import MergedUpdate, fold, mean_retrieval_weights, merge, unfold, unload, unmerge
from .optim_state import forget_optimizer_state
from .query import IdentityQuery, LinearQuery, MlpQuery, build_query_module
from .summary import parameter_summary, print_trainable_parameters
from .tasks import remove_tasks, select_tasks, task_slot_weights, task_slots

__all__ = [
    "FORMAT_VERSION",
    "KEY_INITS",
    "KEY_NORMS",
    "MEMORY_ATTR",
    "QUERY_MODULES",
    "QUERY_TOKENS",
    "STAGES",
    "AdapterMemory",
    "IdentityQuery",
    "LinearQuery",
    "MemoryConfig",
    "MergedUpdate",
    "MiraConfig",
    "MiraProjection",
    "MlpQuery",
    "association_matrices",
    "attach",
    "build_query_module",
    "config_of",
    "count_parameters",
    "detach",
    "export",
    "fold",
    "forget_optimizer_state",
    "import_peft",
    "load_memories",
    "load_model",
    "mean_retrieval_weights",
    "memories",
    "merge",
    "named_memories",
    "parameter_summary",
    "print_trainable_parameters",
    "projections",
    "remove_tasks",
    "save_memories",
    "save_model",
    "select_tasks",
    "set_stage",
    "task_slot_weights",
    "task_slots",
    "trainable_parameters",
    "unfold",
    "unload",
    "unmerge",
    "write_adapters",
]
