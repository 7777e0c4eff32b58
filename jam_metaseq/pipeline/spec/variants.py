"""The catalogue of what a plan builds from its two parents (paper §2.1, Tables 1-4): every JAM
variant (``VARIANTS``: uniform, width copy/average, cross every 1/2/4/none with ``paper`` or
``preserve`` initialisation), the parents' roles (``PARENTS``) and the paper's JAM-Cross row."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Variant:
    """One JAM model built from the two parents."""

    key: str
    """Short name used for folders and ``variants``."""
    label: str
    """Row name in the tables."""
    family: str
    """fairseq/metaseq arch family: ``jam_uniform``, ``jam_width`` or ``jam_cross``."""
    init: str = ""
    """``copy``/``average`` (width), ``paper``/``preserve`` (cross)."""
    cross_every: int = 0
    """JAM-Cross: a cross-block pair after every k-th layer (0 = none)."""


def _variants() -> dict[str, Variant]:
    out = {"uniform": Variant("uniform", "JAM-Uniform", "jam_uniform"),
           "width_copy": Variant("width_copy", "JAM-Width (copy)", "jam_width", "copy"),
           "width_average": Variant("width_average", "JAM-Width (average)", "jam_width", "average")}
    for init in ("paper", "preserve"):
        for every in (1, 2, 4, 0):
            key = f"cross{every}_{init}"
            label = f"JAM-Cross ({'every ' + str(every) if every else 'no x-attn'}, {init})"
            out[key] = Variant(key, label, "jam_cross", init, every)
    return out


VARIANTS: dict[str, Variant] = _variants()
"""Every JAM variant of the paper's Tables 1-4 (§2.1): uniform, width copy/average, cross every 1/2/4/none
with ``paper`` or ``preserve`` initialisation."""
PARENTS = {"llm": "LLM parent (text)", "img": "Image-text parent"}
PAPER_CROSS = "cross2_paper"
"""The JAM-Cross row of Tables 1-2: a cross block every 2 layers, as the paper's 19B model."""


__all__ = ["PAPER_CROSS", "PARENTS", "VARIANTS", "Variant"]
