"""Hugging Face ``transformers`` families <-> our models: the one registry of HF key maps and config
translations (a family is configuration of our one decoder plus a key map; docs/ARCHITECTURE.md).

One file per family, each holding its ``HFFamily`` (``base.py``: the key map as data, its
``config.json`` both ways, the check that its HF class computes a model of ours), and one entry in
``FAMILIES``:

- ``opt.py``: ``OPTForCausalLM`` (metaseq's own block: fused [K; V; Q], learned positions).
- ``llama.py``: ``LlamaForCausalLM``, and the block ``qwen2.py`` (``Qwen2ForCausalLM``) and
  ``gemma.py`` (``GemmaForCausalLM``) share with it: one key map, per-family spellings.
- ``chameleon.py``: ``ChameleonForConditionalGeneration``'s decoder (issue 24): Llama's map plus the
  per-head q/k norms, Llama's config plus ``qk_norm`` / ``swin_norm``; its VQ model
  (``model.vqmodel.*``) is another part of the files, read by ``image_tokenizer.hf_vqvae``.

Everything that reads or writes HF names goes through here: the model tests, the checkpoint
readers (``checkpoints_tools.readers.hf``) and writers (``checkpoints_tools.io``, ``jam-ckpt convert
--to hf``). The functions below are the stable interface (each direction has its inverse):
``family_of`` (an HF ``config.json`` -> its family), ``family_for`` (a config of ours -> the family
whose class computes it), ``config_from_hf`` / ``hf_config``, ``hf_name`` / ``our_name`` (one tensor),
``to_hf_state`` / ``from_hf_state`` (whole state dicts, for tests and small models).

Adding a family is one file here and one entry in ``FAMILIES``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ..config import CrossConfig, DecoderConfig, ModelConfig
from . import chameleon, gemma, llama, opt, qwen2
from .base import HF_OUTPUT, HFFamily, template

FAMILIES: dict[str, HFFamily] = {f.model_type: f for f in (opt.FAMILY, chameleon.FAMILY, llama.FAMILY, qwen2.FAMILY,
                                                              gemma.FAMILY)}
"""Every HF family we read and write, by ``config.json``'s ``model_type`` (Chameleon before Llama:
its tensor names are Llama's plus the q/k norms, ``family_by_names`` asks it first)."""


def family_of(hf: Mapping[str, Any], *, source: str = "config.json") -> HFFamily:
    """The family of an HF ``config.json`` (by ``model_type``)."""
    kind = hf.get("model_type")
    if kind not in FAMILIES:
        raise ValueError(f"{source}: model_type {kind!r} is not a model family we read ({', '.join(FAMILIES)})")
    return FAMILIES[kind]


def family_by_names(names: Sequence[str]) -> HFFamily | None:
    """The family whose HF tensor names ``names`` are (a state dict without its ``config.json``), if
    any. The Llama-style families share one layout: their names say ``llama``."""
    return next((f for f in FAMILIES.values() if f.claims(names)), None)


def family_for(cfg: ModelConfig) -> HFFamily:
    """The HF family whose class computes the model ``cfg`` (a JAM-Uniform or JAM-Width model of a
    family's parents is a plain, wider model of that family), or an error naming the fields."""
    if isinstance(cfg, CrossConfig):
        raise ValueError("JAM-Cross has no Hugging Face class: write it in our layout (jam-ckpt convert --to "
                         "metaseq, or --format safetensors); JAM-Uniform and JAM-Width convert --to hf")
    why = []
    for fam in FAMILIES.values():
        try:
            fam.check(cfg)
            return fam
        except ValueError as e:
            why.append(str(e))
    raise ValueError(f"no HF class computes this model ({'; '.join(why)})")


def config_from_hf(hf: Mapping[str, Any], *, source: str = "config.json", padding_idx: int | None = None
                   ) -> DecoderConfig:
    """An HF ``config.json`` of any family here -> ``DecoderConfig``. ``padding_idx``: the id masked as
    padding when the file names none (HF Llama names none: the vocabulary manifest's pad)."""
    return family_of(hf, source=source).config_from_hf(hf, source=source, padding_idx=padding_idx)


def hf_config(cfg: DecoderConfig, *, family: str | None = None, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """``DecoderConfig`` -> its family's ``config.json`` (inverse of ``config_from_hf``; ``family``:
    default ``family_for(cfg)``; a family whose class does not compute ``cfg`` is refused by name)."""
    want = family_for(cfg)
    if family is not None and family != want.model_type:
        if family not in FAMILIES:
            raise ValueError(f"unknown HF family {family!r} ({', '.join(FAMILIES)})")
        raise ValueError(f"this model is a {want.model_type} model, not {family} "
                         f"(norm={cfg.norm!r}, bias={cfg.bias}, qkv_bias={cfg.has_qkv_bias})")
    return want.hf_config(cfg, dtype=dtype)


def hf_name(name: str, cfg: DecoderConfig) -> str | None:
    """Our tensor ``name`` -> its HF name (``family_for(cfg)``'s); None for what an HF file does not
    hold (the version buffer, a tied output projection). A tensor several HF tensors make up (OPT's
    fused q/k/v) is refused: ``HFFamily.to_hf_items`` splits it."""
    hf = family_for(cfg).hf_names(name, tied=cfg.tie_embeddings)
    if len(hf) > 1:
        raise ValueError(f"tensor {name}: rows of {len(hf)} HF tensors ({', '.join(hf)})")
    return hf[0] if hf else None


def our_name(name: str, cfg: DecoderConfig) -> str | None:
    """An HF tensor ``name`` of ``family_for(cfg)`` -> ours; None for what we do not keep (a tied
    ``lm_head.weight``, saved rotary frequencies)."""
    return family_for(cfg).our_name(name, tied=cfg.tie_embeddings)


def to_hf_state(state: Mapping[str, torch.Tensor], cfg: DecoderConfig) -> dict[str, torch.Tensor]:
    """Our whole state dict -> HF's (what ``save_pretrained`` writes: no tied ``lm_head``)."""
    return family_for(cfg).to_hf_state(state, cfg)


def from_hf_state(state: Mapping[str, torch.Tensor], cfg: DecoderConfig) -> dict[str, torch.Tensor]:
    """An HF state dict -> ours, complete for ``load_state_dict(strict=True)``."""
    return family_for(cfg).from_hf_state(state, cfg)


__all__ = ["FAMILIES", "HF_OUTPUT", "HFFamily", "config_from_hf", "family_by_names", "family_for", "family_of",
           "from_hf_state", "hf_config", "hf_name", "our_name", "template", "to_hf_state"]
