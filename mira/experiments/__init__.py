"""Experiments: MIRA's two-stage recipe and the DG / DIL / CIL protocols on real data, with controls.

``python -m mira.experiments dil|cil|dg|all [--suite idigits|transforms|conflict] [--preset
default|paper|improved] [--quick] [--seeds ...] [--record]``. Modules: :mod:`.idigits` (the
offline iDigits-style domains), :mod:`.data` (the sklearn-digits transforms, the folder loader),
:mod:`.suites`, :mod:`.backbone` (the package-trained tiny ViTs), :mod:`.recipe` (presets and
named options), :mod:`.training` (the one training loop), :mod:`.stages` (adaptation /
consolidation), :mod:`.dualgpm`, :mod:`.metrics`, :mod:`.protocols` (DG / DIL / CIL, controls).
"""
