"""Experiments: MIRA's two-stage recipe and the DG / DIL / CIL protocols on real data.

``python -m mira.experiments dil|cil|dg|all [--quick] [--seeds ...]``. Modules: :mod:`.data`
(``load_digits`` domains, generic folder loader), :mod:`.backbone` (the package-trained tiny
ViT), :mod:`.dualgpm` (gradient projection memory), :mod:`.metrics`, :mod:`.stages`
(adaptation / consolidation), :mod:`.protocols` (DG / DIL / CIL and the baselines).
"""
