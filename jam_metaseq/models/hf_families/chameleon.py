"""HF ``ChameleonForConditionalGeneration``'s decoder <-> ours (issue 24): Chameleon-7B/30B, Anole-7B,
Lumina-mGPT.

Chameleon's decoder is the Llama block (``llama.py``) plus per-head query/key LayerNorms and, for the
30B model, norms after the sublayers, which ``DecoderConfig`` has as ``qk_norm`` and ``swin_norm``.
So this family is Llama's key map plus four tensors per layer and Llama's config translation plus
three fields; only the difference is written here.

Layout facts (checked against ``transformers`` on random weights, ``tests/test_models_chameleon.py``):

- ``model.layers.{i}.self_attn.q_norm.{weight,bias}`` (H, D) and ``k_norm`` (G, D) are our
  ``self_attn.q_norm`` / ``self_attn.k_norm`` as they are (``keys.Q_NORM`` says how they split).
  HF's ``ChameleonLayerNorm`` normalises each head's D features (eps 1e-5, not ``rms_norm_eps``)
  and then applies that head's weight and bias; HF's converter permuted the rows of Meta's
  weights to the half-split rotary order together with q/k, so they load unpermuted.
- ``swin_norm``: ``input_layernorm`` / ``post_attention_layernorm`` are applied to the attention /
  MLP output; the tensors keep the names (our ``self_attn_layer_norm`` / ``final_layer_norm``).
- The head width is always E / H (no ``head_dim`` in the config), the output projection is never
  tied (``lm_head.weight`` is in every file).
- ``model.vqmodel.*`` is the image tokenizer (``ChameleonVQVAE``, encoder only: transformers'
  converter drops the VQ decoder): not a decoder tensor (``HFFamily.other_parts``), read by
  ``jam_metaseq.image_tokenizer.hf_vqvae``.
- HF's forward sets the logits of every image-code id (``vocabulary_map``'s ``IMGIMG*`` entries) to
  the dtype's minimum (the released Chameleon-7B does not draw images); ours are the decoder's
  logits, and which ids may be drawn is decoding's business (the vocabulary manifest's image map).
- ``vocabulary_map`` (token string -> id, all 65,536 entries) is vocabulary, not model: the
  vocabulary manifest carries what it says (``manifest_from_hf``, below); writing, ``vocab_to_hf``
  states a manifest back as the entries transformers reads (``hf_config`` alone writes the map it is
  given, default empty: a model that masks no image ids).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch

from .. import keys
from ..config import DecoderConfig
from . import llama
from .base import HFFamily, check_one_of

MODEL_TYPE = "chameleon"
ARCHITECTURE = "ChameleonForConditionalGeneration"
VQ_PREFIX = "model.vqmodel."
"""The image tokenizer's tensors in an HF Chameleon file (``image_tokenizer.hf_vqvae``)."""

_QK = {f"{keys.LAYERS}.{{}}.{ours}.{kind}": f"model.layers.{{}}.{ours}.{kind}"
       for ours in (keys.Q_NORM, keys.K_NORM) for kind in ("weight", "bias")}
KEY_MAP: dict[str, str | None] = {}
for _k, _v in llama.KEY_MAP.items():  # the q/k norms after o_proj, as in ``keys.LAYER``
    KEY_MAP[_k] = _v
    if _k == f"{keys.LAYERS}.{{}}.self_attn.out_proj.bias":
        KEY_MAP.update(_QK)
"""Llama's key map plus the per-head q/k norms (HF's names under our prefix)."""

DEFAULTS: dict[str, Any] = {
    "vocab_size": 65536, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "hidden_act": "silu", "max_position_embeddings": 4096, "initializer_range": 0.02,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "rope_theta": 10000.0, "attention_bias": False,
    "attention_dropout": 0.0, "mlp_bias": False, "swin_norm": False,
}
"""``ChameleonConfig``'s defaults for the keys a ``config.json`` may leave out."""
_LLAMA_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
               "pad_token_id", "tie_word_embeddings", "rope_parameters", "rope_theta", "rope_scaling",
               "attention_bias", "attention_dropout", "mlp_bias")
"""The keys a Chameleon ``config.json`` shares with Llama's, with Llama's meaning."""


def config_from_hf(hf: Mapping[str, Any], *, source: str = "config.json",
                   padding_idx: int | None = None) -> DecoderConfig:
    """An HF Chameleon ``config.json`` -> ``DecoderConfig`` (``padding_idx``: as in
    ``llama.config_from_hf``)."""
    if hf.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{source}: model_type {hf.get('model_type')!r} is not {MODEL_TYPE!r}")
    d = {**DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
    if d.get("head_dim") not in (None, int(d["hidden_size"]) // int(d["num_attention_heads"])):
        raise ValueError(f"{source}: head_dim {d['head_dim']} is not hidden_size / num_attention_heads "
                         "(HF Chameleon has no head width of its own)")
    as_llama = {"model_type": "llama", **{k: d[k] for k in _LLAMA_KEYS if k in d}}
    cfg = llama.config_from_hf(as_llama, sp=llama.SPELLING, source=source, padding_idx=padding_idx)
    return dataclasses.replace(cfg, qk_norm="layernorm_per_head", swin_norm=bool(d["swin_norm"]))


def check(cfg: DecoderConfig) -> None:
    """``ValueError`` naming the field when HF's Chameleon class does not compute ``cfg``."""
    what = f"HF {ARCHITECTURE}"
    check_one_of(cfg, what, qk_norm=("layernorm_per_head",), tie_embeddings=(False,))
    if cfg.head_dim * cfg.heads != cfg.embed_dim:
        raise ValueError(f"{what}'s head width is embed_dim / heads; this model has {cfg.heads} heads of "
                         f"{cfg.head_dim} with embed_dim {cfg.embed_dim}")
    llama.check(dataclasses.replace(cfg, qk_norm="none", swin_norm=False), sp=llama.SPELLING)


def hf_config(cfg: DecoderConfig, *, dtype: torch.dtype | None = None, vocabulary_map: Mapping[str, int] | None = None,
              vq_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``DecoderConfig`` -> a Chameleon ``config.json`` (inverse of ``config_from_hf``).
    ``vocabulary_map``: token string -> id (``ChameleonModel`` reads its ``<image>`` and ``IMGIMG*``
    entries; default empty); ``vq_config``: the image tokenizer's (``image_tokenizer.hf_vqvae.hf_vq_config``;
    None: transformers' default)."""
    check(cfg)
    base = llama.hf_config(dataclasses.replace(cfg, qk_norm="none", swin_norm=False), sp=llama.SPELLING, dtype=dtype)
    out = {k: v for k, v in base.items() if k != "head_dim"}
    out.update(architectures=[ARCHITECTURE], model_type=MODEL_TYPE, swin_norm=cfg.swin_norm, model_parallel_size=1,
               vocabulary_map=dict(vocabulary_map or {}))
    if vq_config is not None:
        out["vq_config"] = dict(vq_config)
    return out



# ---- vocabulary ----------------------------------------------------------------------------------
IMAGE_PREFIX = "IMGIMG"
"""``vocabulary_map`` entries of image codes: ``IMGIMG`` + the code's digits as letters A-J + one char."""
SPECIAL_NAMES = {"bos": "<s>", "pad": "<pad>", "eos": "</s>", "unk": "<unk>", "boi": "<racm3:break>",
                 "eoi": "<eoss>"}
"""The entries naming Chameleon's specials and image frame (Meta's ``VocabInfo``, HF's processor)."""


def image_code_of(name: str) -> int:
    """An ``IMGIMG*`` entry's VQ code (``IMGIMGBAZ`` = 10: A-J are digits 0-9; the last char is
    dropped), as Meta's ``VocabTranslation`` and HF's ``ChameleonImageVocabularyMapping`` read it."""
    digits = "".join(str(ord(c) - ord("A")) if "A" <= c <= "J" else c for c in name[len(IMAGE_PREFIX):-1])
    if not digits.isdigit():
        raise ValueError(f"vocabulary_map entry {name!r} is not an image code (IMGIMG + letters A-J + one char)")
    return int(digits)


def manifest_from_hf(hf: Mapping[str, Any], *, first_sentinel: str = "<reserved08800>", num_sentinels: int = 16,
                     image_grid: tuple[int, int] | None = None, text_tokenizer: str | None = None,
                     source: str = "config.json"):
    """The vocabulary manifest of a Chameleon parent, read from its ``config.json``'s
    ``vocabulary_map`` (never hard-coded ids): every id kept as its tokenizer has it, the image codes
    as an explicit code -> id map, ``<racm3:break>`` opening an image (our ``<break>``) and
    ``<eoss>`` closing it (``eoi``), and ``num_sentinels`` consecutive reserved ids from
    ``first_sentinel`` as the CM3 sentinels followed by one more as CM3's end-of-span (Chameleon's
    own ``<eoss>`` is its end-of-image). ``image_grid``: default the VQ model's (``vq_config``:
    resolution / 2^(levels - 1) per side; 32 x 32 for the released files). Errors name the missing entry."""
    from ...vocab import TokenIds, VocabManifest

    vm = hf.get("vocabulary_map")
    if not isinstance(vm, Mapping) or not vm:
        raise ValueError(f"{source}: no vocabulary_map (a Chameleon config.json carries its tokenizer's token -> id)")

    def id_of(name: str) -> int:
        if name not in vm:
            raise ValueError(f"{source}: vocabulary_map has no {name!r}")
        return int(vm[name])

    codes = {image_code_of(n): int(i) for n, i in vm.items() if n.startswith(IMAGE_PREFIX)}
    if sorted(codes) != list(range(len(codes))) or not codes:
        raise ValueError(f"{source}: vocabulary_map's {len(codes)} {IMAGE_PREFIX} entries are not codes 0 .. n-1")
    ids = {k: id_of(v) for k, v in SPECIAL_NAMES.items()}
    by_id = {int(i): n for n, i in vm.items()}
    s0 = id_of(first_sentinel)
    run = [by_id.get(s0 + k) for k in range(num_sentinels + 1)]
    if any(n is None or not n.startswith("<reserved") for n in run):
        bad = next(s0 + k for k, n in enumerate(run) if n is None or not n.startswith("<reserved"))
        raise ValueError(f"{source}: id {bad} ({by_id.get(bad)!r}) after {first_sentinel} is not a reserved token: "
                         f"the {num_sentinels} CM3 sentinels and end-of-span need consecutive reserved ids")
    size = int(hf.get("vocab_size") or len(vm))
    if image_grid is None:
        vq = hf.get("vq_config") or {}
        side = int(vq.get("resolution", 512)) // 2 ** (len(vq.get("channel_multiplier", [1, 1, 2, 2, 4])) - 1)
        image_grid = (side, side)
    tok = TokenIds(size=size, bos=ids["bos"], pad=ids["pad"], eos=ids["eos"], unk=ids["unk"], text=(0, size),
                   image=(0, 0), image_map=tuple(codes[c] for c in range(len(codes))), break_id=ids["boi"],
                   eoi=ids["eoi"], sentinels=(s0, s0 + num_sentinels), eoss=s0 + num_sentinels)
    return VocabManifest.imported(tok, image_tokens_per_image=image_grid[0] * image_grid[1], image_grid=image_grid,
                                  text_tokenizer=text_tokenizer)



def image_code_name(code: int) -> str:
    """The ``vocabulary_map`` entry of VQ code ``code`` (inverse of ``image_code_of``): ``IMGIMG``,
    the digits as letters A-J, ``Z``."""
    return IMAGE_PREFIX + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def vocab_to_hf(vocab) -> dict[str, Any]:
    """``config.json`` entries stating a Chameleon-format manifest (an image closed by its own id):
    a ``vocabulary_map`` with the entries ``transformers`` and ``manifest_from_hf`` read (the image
    codes, the specials, the image frame, the sentinels and ``<eoss>`` as ``<reserved{id - 4}>``,
    the released files' naming); the text pieces' names are the tokenizer's, not the manifest's.
    {} for any other manifest."""
    x = vocab.explicit_ids
    if x is None or x.eoi is None:
        return {}
    vm = {image_code_name(c): int(vocab.image_id(c)) for c in range(vocab.image_codes)}
    vm.update({n: getattr(vocab, k) for k, n in SPECIAL_NAMES.items()})
    vm.update({f"<reserved{i - 4:05d}>": i for i in (*vocab.sentinel_range, vocab.eoss)})
    return {"vocabulary_map": vm}


FAMILY = HFFamily(
    model_type=MODEL_TYPE, architecture=ARCHITECTURE, display="Chameleon", key_map=KEY_MAP, prefix="model.",
    markers=("model.layers.0.self_attn.q_norm", "layers.0.self_attn.q_norm"),
    config_from_hf=config_from_hf, hf_config=hf_config, check=check, ties=lambda hf: False,
    hf_only=llama.HF_ONLY, other_parts=(VQ_PREFIX,), vocab_from_hf=manifest_from_hf, vocab_to_hf=vocab_to_hf,
)
