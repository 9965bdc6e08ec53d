"""A readable account of what MIRA adds to a model: totals and percentages (PEFT's
``print_trainable_parameters``, with the parts of the memory spelled out)."""

from __future__ import annotations

import torch.nn as nn

from .integration import count_parameters, memories, projections

__all__ = ["parameter_summary", "print_trainable_parameters"]


def _percent(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.4f}" if whole else "-"


def parameter_summary(model: nn.Module) -> str:
    """A table of the backbone and MIRA's parts (elements and % of the backbone), then PEFT's line.

    ``all params`` counts the backbone's parameters (as before attach) and every element MIRA adds,
    the stored adapters included (buffers unless ``trainable_bank``), so the percentage is of the
    served model's size.
    """
    counts = count_parameters(model)
    projs, mems = projections(model), memories(model)
    backbone = counts["backbone"]
    if projs:
        slots = sorted({m.num_slots for m in mems})
        stored = f"{slots[0]}" if len(slots) == 1 else f"{slots[0]}-{slots[-1]}"
        stages = sorted({p.stage for p in projs})
        held = sorted({p.merged_update.kind for p in projs if p.merged_update is not None})
        state = f"stage {'/'.join(stages)}" + (f", {'/'.join(held)} update in the weights" if held else "")
        title = (f"MIRA on {type(model).__name__}: {len(projs)} adapted blocks, {stored} stored adapters per "
                 f"block, {state}")
    else:
        title = f"{type(model).__name__}: no MIRA layers"
    rows = [
        ("backbone", backbone),
        ("  keys", counts["keys"]),
        ("  query modules", counts["query"]),
        ("  stored adapters (bank)", counts["bank"]),
        ("added by MIRA (served)", counts["added"]),
        ("live LoRA (adaptation)", counts["lora"]),
    ]
    lines = [title, f"{'part':<28}{'elements':>14}{'% of backbone':>16}"]
    for name, n in rows:
        lines.append(f"{name:<28}{n:>14,d}{_percent(n, backbone):>16}")
    lines.append(f"{'total':<28}{counts['total']:>14,d}")
    lines.append(f"added size: {counts['added_bytes'] / 2**20:.2f} MiB")
    lines.append(f"trainable params: {counts['trainable']:,d} || all params: {counts['total']:,d} || "
                 f"trainable%: {_percent(counts['trainable'], counts['total'])}")
    return "\n".join(lines)


def print_trainable_parameters(model: nn.Module) -> None:
    """Print :func:`parameter_summary` (the last line is PEFT's ``print_trainable_parameters``)."""
    print(parameter_summary(model))
