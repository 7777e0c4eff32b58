"""One HF transformers family seen with metaseq's names: a state-dict adapter (STYLE #24).

An ``HFAdapter`` is data: the key map (each metaseq key, block keys as ``decoder.layers.{}.``
templates, -> its HF name, the HF names whose rows concatenate into it, or None), which metaseq
key an HF file leaves out as tied to another, the family's config both ways, and the name
prefixes by which a state dict shows it is this family's. The methods apply the map in either
direction; ``readers/hf.py`` reads HF files through it and ``io/output_dir.py`` writes them.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from checkpoints_tools.safe_load import CheckpointError
from jam_metaseq.models import keys
from jam_metaseq.models.config import DecoderConfig, ModelConfig

_LAYER = re.compile(r"\.(\d+)\.")


def template(name: str) -> tuple[str, str | None]:
    """(``name`` with its first ``.{i}.`` as ``.{}.``, the index ``i``); (name, None) outside a block."""
    m = _LAYER.search(name)
    if not m:
        return name, None
    return name[: m.start()] + ".{}." + name[m.end():], m.group(1)


@dataclass(frozen=True)
class HFAdapter:
    """The HF <-> metaseq map of one family (``model_type``)."""

    model_type: str
    """``config.json``'s ``model_type`` (``"opt"``); the output format ``hf_{model_type}``."""
    display: str
    """The family's name in messages (``"OPT"``)."""
    prefix: str
    """The base-model prefix HF adds to the key map's names (``"model."``): optional when reading,
    always written."""
    root: str
    """What every prefixed name starts with after ``prefix`` (``"decoder."``): tells whether a
    state dict uses the prefix."""
    layers: str
    """The HF container of the decoder layers (``"decoder.layers"``)."""
    key_map: Mapping[str, Any]
    """metaseq key (template) -> HF name (template), a tuple of HF names whose rows concatenate, in
    order, into the metaseq tensor, or None: not in HF files (a version buffer, read as
    ``keys.VERSION_VALUE``; a tied tensor, see ``tied``). In metaseq's state-dict order."""
    tied: Mapping[str, str]
    """metaseq key -> the metaseq key it is stored as in HF files (the output projection is the
    embedding)."""
    hf_tied: tuple[str, ...]
    """HF names that are such an alias (``lm_head.weight``): known, never read."""
    markers: tuple[str, ...]
    """Name prefixes that show a state dict holds this family's HF names."""
    config_from_hf: Callable[..., DecoderConfig]
    """``(config.json dict, *, source) -> DecoderConfig``; refuses what metaseq's decoder cannot express."""
    hf_config: Callable[..., dict]
    """``(ModelConfig, *, dtype) -> config.json dict``, the inverse of ``config_from_hf``."""
    _hf_templates: frozenset = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = set(self.hf_tied)
        for hf in self.key_map.values():
            names.update(hf if isinstance(hf, tuple) else () if hf is None else (hf,))
        object.__setattr__(self, "_hf_templates", frozenset(names))

    def is_hf_name(self, name: str) -> bool:
        """An HF tensor name (without ``prefix``) that has a metaseq equivalent."""
        return name in self.hf_tied or template(name)[0] in self._hf_templates

    def claims(self, names: Sequence[str]) -> bool:
        """``names`` are this family's HF names (not metaseq's fused ones, nor ours of another
        family, e.g. a Llama block's ``fc_gate``, whose unprefixed names share OPT's markers)."""
        return any(n.startswith(self.markers) for n in names) and \
            not any(n.endswith(f"{keys.QKV}.weight") or n.endswith(f".{keys.FC_GATE}.weight") for n in names)

    def to_hf_items(self, name: str, tensor: torch.Tensor, *, cfg: ModelConfig) -> list[tuple[str, torch.Tensor]]:
        """One metaseq tensor -> its HF tensors, prefixed (a fused tensor split by rows, in the
        map's order; a tied or constant one -> none). ``cfg``: the model (families whose map
        depends on it, e.g. rotary heads)."""
        tpl, layer = template(name)
        if tpl not in self.key_map:
            raise CheckpointError(f"tensor {name}: no HF {self.display} equivalent")
        hf = self.key_map[tpl]
        if hf is None:
            return []
        if isinstance(hf, tuple):
            parts = torch.chunk(tensor, len(hf), dim=0)
            return [(self.prefix + h.format(layer), t) for h, t in zip(hf, parts)]
        return [(self.prefix + (hf.format(layer) if layer is not None else hf), tensor)]

    def hf_shapes(self, shapes: Mapping[str, Sequence[int]], *, cfg: ModelConfig) -> "OrderedDict[str, tuple[int, ...]]":
        """The HF file's tensors (names, shapes) for a model of metaseq ``shapes``, in write order."""
        out: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        for n, s in shapes.items():
            for hn, t in self.to_hf_items(n, torch.empty(tuple(s), device="meta"), cfg=cfg):
                out[hn] = tuple(t.shape)
        return out
