"""One Hugging Face ``transformers`` family seen with our names: ``HFFamily``, a state-dict adapter
that is data (a family is configuration of our one decoder plus a key map; docs/ARCHITECTURE.md).

An ``HFFamily`` holds the family's key map (each of our keys, block keys as ``decoder.layers.{}.``
templates, -> its full HF name, the HF names whose rows concatenate into it, or None), its
``config.json`` both ways, the check that says whether its HF class computes one of our configs,
and the name prefixes by which a bare state dict shows it is this family's. The methods apply the
map in either direction, one tensor at a time; ``checkpoints_tools.readers.hf`` reads HF files
through them and ``checkpoints_tools.io`` writes them.

The output projection is the one key whose map depends on the model: untied, it is ``lm_head.weight``;
tied (``tie_embeddings``: OPT, Gemma, small Qwen2), HF files leave ``lm_head.weight`` out (or carry
a copy of the embedding, never read) and our state dicts list it as the embedding.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from .. import keys
from ..config import DecoderConfig

_LAYER = re.compile(r"\.(\d+)\.")
HF_OUTPUT = "lm_head.weight"
"""The HF output projection (every ``*ForCausalLM``)."""


def template(name: str) -> tuple[str, str | None]:
    """(``name`` with its first ``.{i}.`` as ``.{}.``, the index ``i``); (name, None) outside a block."""
    m = _LAYER.search(name)
    if not m:
        return name, None
    return name[: m.start()] + ".{}." + name[m.end():], m.group(1)


@dataclass(frozen=True)
class HFFamily:
    """The HF <-> ours map of one family (``model_type``)."""

    model_type: str
    """``config.json``'s ``model_type`` (``"llama"``)."""
    architecture: str
    """The ``*ForCausalLM`` class ``architectures`` names."""
    display: str
    """The family's name in messages (``"Llama"``)."""
    key_map: Mapping[str, Any]
    """Our key (template) -> HF name (template, full: ``model.layers.{}.mlp.up_proj.weight``), a
    tuple of HF names whose rows concatenate, in order, into ours, or None: not in HF files (the
    version buffer, read as ``keys.VERSION_VALUE``). In our state-dict order. ``keys.OUTPUT`` maps
    to ``lm_head.weight``, which holds it only when the model's head is untied."""
    prefix: str
    """The base model's prefix (``"model."``): a bare base-model state dict (``LlamaModel``) has
    the names without it; reading accepts both, writing always adds it."""
    markers: tuple[str, ...]
    """Name prefixes that show a bare state dict holds this family's HF names."""
    config_from_hf: Callable[..., DecoderConfig]
    """``(config.json dict, *, source, padding_idx) -> DecoderConfig``; refuses by name what our
    decoder does not compute. ``padding_idx``: the id masked as padding when the file names none."""
    hf_config: Callable[..., dict]
    """``(DecoderConfig, *, dtype) -> config.json dict``, the inverse of ``config_from_hf``."""
    check: Callable[[DecoderConfig], None]
    """Raises ``ValueError`` naming the field when this family's HF class does not compute the model."""
    ties: Callable[[Mapping[str, Any]], bool]
    """Whether a ``config.json`` ties ``lm_head`` to the embedding (the family's default if unset)."""
    hf_only: tuple[str, ...] = ()
    """HF name templates with no counterpart of ours (saved rotary frequencies): dropped on reading."""
    other_parts: tuple[str, ...] = ()
    """Name prefixes of another component the same files carry (Chameleon's VQ model,
    ``model.vqmodel.``): not decoder tensors, left out when the decoder is read; their own reader
    (``image_tokenizer.hf_vqvae``) takes them."""
    vocab_from_hf: Callable[..., Any] | None = None
    """``(config.json dict, *, source, text_tokenizer) -> VocabManifest`` where the family's config states its
    vocabulary (Chameleon's ``vocabulary_map``): the manifest a reader gives when none is beside
    the files. None: the files state none (a ``vocab.json`` or ``--vocab`` names it)."""
    vocab_to_hf: Callable[[Any], dict] | None = None
    """``VocabManifest -> config.json entries`` stating it (Chameleon's ``vocabulary_map``), the
    inverse of ``vocab_from_hf`` for what ``transformers`` reads; None: the files state none."""
    _from_hf: dict = field(init=False, repr=False, compare=False)
    _hf_templates: frozenset = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = set(self.hf_only) | {HF_OUTPUT}
        inverse: dict[str, Any] = {}
        for ours, hf in self.key_map.items():
            for i, h in enumerate(hf if isinstance(hf, tuple) else () if hf is None else (hf,)):
                names.add(h)
                inverse[h] = ours if not isinstance(hf, tuple) else (ours, i, len(hf))
        object.__setattr__(self, "_from_hf", inverse)
        object.__setattr__(self, "_hf_templates", frozenset(names))

    # ---- names ---------------------------------------------------------------------------------
    def hf_names(self, name: str, *, tied: bool) -> tuple[str, ...]:
        """Our tensor ``name`` -> the HF tensors holding it (several: rows concatenated, in order);
        () for what HF files do not hold (the version buffer, a tied output projection)."""
        tpl, layer = template(name)
        if tpl not in self.key_map:
            raise ValueError(f"tensor {name}: no counterpart in the HF {self.display} layout")
        if tpl == keys.OUTPUT and tied:
            return ()
        hf = self.key_map[tpl]
        if hf is None:
            return ()
        return tuple(h.format(layer) if layer is not None else h for h in (hf if isinstance(hf, tuple) else (hf,)))

    def our_name(self, name: str, *, tied: bool) -> str | None:
        """An HF tensor ``name`` (with or without ``prefix``) -> ours; None for what we do not keep
        (a tied ``lm_head.weight``, saved rotary frequencies). A name whose rows are part of one of
        our tensors (OPT's q/k/v in the fused projection) is refused by name."""
        if self.is_other_part(name):
            return None
        tpl, layer = template(name)
        if tpl not in self._hf_templates and self.prefix + tpl in self._hf_templates:
            tpl = self.prefix + tpl
        if tpl in self.hf_only or (tpl == HF_OUTPUT and tied):
            return None
        ours = self._from_hf.get(tpl)
        if ours is None:
            raise ValueError(f"tensor {name}: not a tensor of an HF {self.display} model")
        if isinstance(ours, tuple):
            raise ValueError(f"tensor {name}: rows {ours[1] + 1} of {ours[2]} of our {ours[0]}; read the "
                             "state dict through checkpoints_tools.readers")
        return ours.format(layer) if layer is not None else ours

    def is_other_part(self, name: str) -> bool:
        """An HF tensor of another component of the files (``other_parts``), with or without ``prefix``."""
        return any(name.startswith(p) or (self.prefix + name).startswith(p) for p in self.other_parts)

    def is_hf_name(self, name: str) -> bool:
        """An HF tensor name (with or without ``prefix``) this family knows."""
        tpl = template(name)[0]
        return tpl in self._hf_templates or self.prefix + tpl in self._hf_templates

    def claims(self, names: Sequence[str]) -> bool:
        """``names`` are this family's HF names, not ours (which have ``qkv_proj`` or separate q/k/v
        under ``decoder.layers``, and always our final norm ``decoder.layer_norm``)."""
        ours = (keys.FINAL_NORM[0].name, keys.OUTPUT)
        return any(n.startswith(self.markers) for n in names) and \
            not any(n.endswith(f"{keys.QKV}.weight") or n.endswith(ours) for n in names)

    # ---- tensors -------------------------------------------------------------------------------
    def to_hf_items(self, name: str, tensor: torch.Tensor, *, cfg: DecoderConfig) -> list[tuple[str, torch.Tensor]]:
        """One tensor of ours -> its HF tensors (a fused one split by rows, in the map's order; a
        tied or constant one -> none)."""
        hf = self.hf_names(name, tied=cfg.tie_embeddings)
        if len(hf) > 1:
            return list(zip(hf, torch.chunk(tensor, len(hf), dim=0)))
        return [(hf[0], tensor)] if hf else []

    def hf_shapes(self, shapes: Mapping[str, Sequence[int]], *, cfg: DecoderConfig) -> "OrderedDict[str, tuple[int, ...]]":
        """The HF files' tensors (names, shapes) for a model of our ``shapes``, in write order."""
        out: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        for n, s in shapes.items():
            for hn, t in self.to_hf_items(n, torch.empty(tuple(s), device="meta"), cfg=cfg):
                out[hn] = tuple(t.shape)
        return out

    def to_hf_state(self, state: Mapping[str, torch.Tensor], cfg: DecoderConfig) -> dict[str, torch.Tensor]:
        """Our whole state dict -> HF's (what ``save_pretrained`` writes: no tied ``lm_head``). For
        small models and tests; readers and writers stream ``to_hf_items`` tensor by tensor."""
        out: dict[str, torch.Tensor] = {}
        for k, v in state.items():
            out.update(self.to_hf_items(k, v, cfg=cfg))
        return out

    def from_hf_state(self, state: Mapping[str, torch.Tensor], cfg: DecoderConfig) -> dict[str, torch.Tensor]:
        """An HF state dict -> ours, complete for ``load_state_dict(strict=True)`` (the version
        buffer added, a tied output projection = the embedding, fused rows concatenated)."""
        from ..decoder import fresh_buffer

        out: dict[str, torch.Tensor] = {}
        for k in keys.state_keys(cfg):
            hf = self.hf_names(k, tied=cfg.tie_embeddings)
            if keys.is_version(k):
                out[k] = fresh_buffer(k)
            elif k == keys.OUTPUT and cfg.tie_embeddings:
                out[k] = out[keys.EMBED]
            elif hf:
                got = [state[h] if h in state else state[h.removeprefix(self.prefix)] for h in hf]
                out[k] = got[0] if len(got) == 1 else torch.cat(got, dim=0)
        return out


def check_one_of(cfg: DecoderConfig, what: str, **allowed: tuple[Any, ...]) -> None:
    """``ValueError`` naming the first field of ``cfg`` whose value is not among ``allowed[field]``
    (``what``: the HF class, for the message)."""
    for name, ok in allowed.items():
        if getattr(cfg, name) not in ok:
            raise ValueError(f"{what} has {name}={' or '.join(repr(v) for v in ok)}; this model has "
                             f"{name}={getattr(cfg, name)!r}")
