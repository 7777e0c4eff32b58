"""The image tokenizer inside an HF Chameleon checkpoint (``model.vqmodel.*``, HF's ``ChameleonVQVAE``)
<-> our ``VQGAN`` (issue 24).

HF's module names are taming's (``encoder.down.{l}.block.{b}.norm1``, ``quantize.embedding``,
``quant_conv``, ``post_quant_conv``), which ours are too (``model.py``), so the key map is the
``model.vqmodel.`` prefix and nothing else; the config is ``ChameleonVQVAEConfig``'s names for
taming's ``ddconfig`` fields (``hf_vq_config`` / ``config_from_hf``, inverses).

What differs, precisely (``tests/test_models_chameleon.py`` checks the rest on a tiny random config:
our encoder's latents and codes equal ``ChameleonVQVAE.encode``'s):

- **No decoder in HF files.** transformers' converter drops the VQ decoder ("we dont do image
  generation yet") and ``ChameleonVQVAE`` has none, so an HF Chameleon / Anole file can *encode*
  images but not draw them. ``vqgan_from_hf`` takes the decoder from a second state dict: Meta's
  ``tokenizer/vqgan.ckpt`` (taming layout, also readable whole by ``load_image_tokenizer``); a file
  that does carry ``model.vqmodel.decoder.*`` tensors is read as it is.
- GroupNorm has 32 groups and eps 1e-6 in HF (taming's), ``attn_type`` must be ``vanilla`` (HF
  drops the middle attention otherwise; ours always has it), no ``double_latent``, and HF never
  builds ``conv_shortcut`` (ours: ``nin_shortcut``, as HF's).
- HF's ``encode`` returns codes flattened (B * h * w,) in row-major grid order; ours (B, h, w).
  Turning codes into Chameleon's BPE ids is the vocabulary's job (``vocabulary_map``; docs/FAMILIES.md).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from jam_metaseq.errors import JamError

from .checkpoint import check_state_dict
from .config import VQGANConfig
from .model import VQGAN

from jam_metaseq.models.hf_families.chameleon import VQ_PREFIX as PREFIX  # noqa: E402  (one home: the family's)
_FIELDS = (  # (ours, HF ChameleonVQVAEConfig)
    ("resolution", "resolution"), ("base_channels", "base_channels"), ("channel_multipliers", "channel_multiplier"),
    ("num_res_blocks", "num_res_blocks"), ("attn_resolutions", "attn_resolutions"), ("z_channels", "latent_channels"),
    ("double_z", "double_latent"), ("n_codes", "num_embeddings"), ("code_dim", "embed_dim"),
    ("in_channels", "in_channels"),
)
HF_DEFAULTS: dict[str, Any] = {
    "embed_dim": 256, "num_embeddings": 8192, "double_latent": False, "latent_channels": 256, "resolution": 512,
    "in_channels": 3, "base_channels": 128, "channel_multiplier": [1, 1, 2, 2, 4], "num_res_blocks": 2,
    "attn_resolutions": None, "dropout": 0.0, "attn_type": "vanilla",
}
"""``ChameleonVQVAEConfig``'s defaults (Chameleon's 512 px, f = 16 tokenizer: ``PRESETS["chameleon_512"]``)."""


class MissingDecoderError(JamError, ValueError):
    """An HF Chameleon file carries the VQ encoder only, and no decoder was given."""


def config_from_hf(vq: Mapping[str, Any], *, source: str = "config.json: vq_config") -> VQGANConfig:
    """HF ``vq_config`` -> ``VQGANConfig`` (GroupNorm: 32 groups, eps 1e-6, as HF fixes them)."""
    d = {**HF_DEFAULTS, **{k: v for k, v in vq.items() if v is not None or k == "attn_resolutions"}}
    if d.get("attn_type", "vanilla") != "vanilla":
        raise ValueError(f"{source}: attn_type {d['attn_type']!r} is not supported (only 'vanilla' attention)")
    if int(d.get("out_channels", d["in_channels"])) != int(d["in_channels"]):
        raise ValueError(f"{source}: out_channels {d['out_channels']} != in_channels {d['in_channels']}")
    kw = {ours: d[hf] for ours, hf in _FIELDS}
    kw["attn_resolutions"] = tuple(kw["attn_resolutions"] or ())
    try:
        return VQGANConfig(**kw, norm_groups=32, norm_eps=1e-6)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def hf_vq_config(cfg: VQGANConfig) -> dict[str, Any]:
    """``VQGANConfig`` -> HF ``vq_config`` (inverse of ``config_from_hf``)."""
    if cfg.norm_groups != 32 or cfg.norm_eps != 1e-6:
        raise ValueError(f"HF ChameleonVQVAE uses GroupNorm(32, eps=1e-6); this tokenizer has norm_groups="
                         f"{cfg.norm_groups}, norm_eps={cfg.norm_eps}")
    out: dict[str, Any] = {hf: getattr(cfg, ours) for ours, hf in _FIELDS}
    out["channel_multiplier"] = list(cfg.channel_multipliers)
    out["attn_resolutions"] = list(cfg.attn_resolutions)
    out.update(dropout=0.0, attn_type="vanilla", model_type="chameleon_vqgan")
    return out


def from_hf_state(state: Mapping[str, torch.Tensor], *, prefix: str = PREFIX) -> dict[str, torch.Tensor]:
    """The image tokenizer's tensors of an HF Chameleon state dict, under our (taming) names."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def to_hf_state(state: Mapping[str, torch.Tensor], *, prefix: str = PREFIX,
                decoder: bool = False) -> dict[str, torch.Tensor]:
    """Our ``VQGAN`` state dict -> HF's ``model.vqmodel.*`` tensors (without the decoder, as HF's
    files have them, unless ``decoder``)."""
    return {prefix + k: v for k, v in state.items() if decoder or not k.startswith("decoder.")}


def vqgan_from_hf(vq_config: Mapping[str, Any], state: Mapping[str, torch.Tensor], *,
                  decoder_state: Mapping[str, torch.Tensor] | None = None, source: str = "HF Chameleon file") -> VQGAN:
    """Our ``VQGAN`` from an HF Chameleon ``vq_config`` and state dict (``model.vqmodel.*`` names,
    or already without the prefix); the decoder's tensors from ``decoder_state`` (a taming state
    dict, e.g. Meta's ``tokenizer/vqgan.ckpt``: only its ``decoder.*`` are read) when the file has
    none. Strict: missing, unexpected or mis-shaped tensors are an error naming them."""
    model = VQGAN(config_from_hf(vq_config))
    ours = from_hf_state(state) if any(k.startswith(PREFIX) for k in state) else dict(state)
    if not any(k.startswith("decoder.") for k in ours):
        if decoder_state is None:
            raise MissingDecoderError(f"{source}: the VQ model has no decoder (transformers' converter drops it), "
                                      "so it cannot draw images; give the decoder from Meta's tokenizer/vqgan.ckpt")
        ours.update({k: v for k, v in decoder_state.items() if k.startswith("decoder.")})
    model.load_state_dict(check_state_dict(model, ours, source=source), strict=True)
    return model.eval()
