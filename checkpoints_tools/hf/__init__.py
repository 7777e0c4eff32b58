"""HF transformers families <-> metaseq names: one state-dict adapter per family (STYLE #24).

Each family is one file here holding its key map as data and its ``config.json`` both ways
(``opt.py``), and one entry in ``ADAPTERS``. ``readers/hf.py`` reads an HF checkpoint through its
family's adapter (chosen by ``config.json``'s ``model_type``, or by the tensor names of a bare
state dict); ``io/output_dir.py`` writes the ``hf_{model_type}`` output format through it.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from checkpoints_tools.hf import opt
from checkpoints_tools.hf.adapter import HFAdapter
from checkpoints_tools.safe_load import CheckpointError

ADAPTERS: dict[str, HFAdapter] = {
    opt.MODEL_TYPE: opt.ADAPTER,
}
"""Every HF family the tools read and write, by ``model_type``."""

OUTPUT_FORMATS = {f"hf_{t}": a for t, a in ADAPTERS.items()}
"""``OutputSpec.format`` -> the family it writes (``hf_opt``)."""


def adapter_for_config(hf: Mapping[str, Any], *, source: str) -> HFAdapter:
    """The adapter of an HF ``config.json``'s ``model_type`` (an error naming ``source`` if none)."""
    adapter = ADAPTERS.get(hf.get("model_type"))
    if adapter is None:
        known = " / ".join(repr(t) for t in ADAPTERS)
        raise CheckpointError(f"{source}: model_type {hf.get('model_type')!r}, only {known} is supported")
    return adapter


def adapter_for_names(names: Sequence[str]) -> HFAdapter | None:
    """The family whose HF names ``names`` are (a state dict without its ``config.json``), if any."""
    return next((a for a in ADAPTERS.values() if a.claims(names)), None)


__all__ = ["ADAPTERS", "HFAdapter", "OUTPUT_FORMATS", "adapter_for_config", "adapter_for_names"]
