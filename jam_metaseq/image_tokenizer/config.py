"""Typed config of the VQGAN-family image tokenizer (paper §3.1 "Tokenizers").

JAM uses the Make-A-Scene VQ-VAE: a 256x256 image becomes a 32x32 grid = 1024 codes from a codebook
of 8192. The network family is taming-transformers' ``VQModel`` (also Chameleon's ``vqgan.ckpt``):
a convolutional encoder with per-level channel multipliers, residual blocks and optional attention,
a nearest-neighbour vector quantizer, and a mirrored decoder.

``VQGANConfig`` holds exactly the fields of taming's ``model.params`` (``ddconfig`` + ``n_embed`` +
``embed_dim``), under readable names; ``from_taming_params`` / ``to_taming_params`` translate both
ways (the HF ``ChameleonVQVAEConfig`` names are noted per field). ``PRESETS`` always holds ``tiny``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

@dataclass
class VQGANConfig:
    """Shapes of one VQGAN tokenizer; ``grid`` and ``downsample`` are derived."""

    resolution: int = 256
    """Side of the square input image in pixels (taming ``resolution``)."""
    base_channels: int = 128
    """Channels of the first level (taming ``ch``; HF ``base_channels``)."""
    channel_multipliers: tuple[int, ...] = (1, 1, 2, 4)
    """Per-level multipliers of ``base_channels``; each level but the last halves the side
    (taming ``ch_mult``; HF ``channel_multiplier``)."""
    num_res_blocks: int = 2
    """Residual blocks per encoder level; the decoder has one more per level."""
    attn_resolutions: tuple[int, ...] = ()
    """Feature-map sides at which an attention block follows each residual block. The middle
    block always has one attention layer (taming layout)."""
    z_channels: int = 256
    """Channels of the encoder output / decoder input (taming ``z_channels``; HF ``latent_channels``)."""
    double_z: bool = False
    """Encoder emits 2 * z_channels (VAE-style; always False for VQ models)."""
    n_codes: int = 8192
    """Codebook size (taming ``n_embed``; HF ``num_embeddings``)."""
    code_dim: int = 256
    """Dimension of each code vector (taming ``embed_dim``)."""
    in_channels: int = 3
    """Image channels."""
    norm_groups: int = 32
    """GroupNorm groups (taming fixes 32; smaller only for tiny test models)."""
    norm_eps: float = 1e-6
    """GroupNorm epsilon (taming 1e-6)."""
    commitment_beta: float = 0.25
    """Commitment weight of the VQ loss: ||sg[e]-z||^2 * beta (training only)."""

    def __post_init__(self) -> None:
        self.channel_multipliers = tuple(int(m) for m in self.channel_multipliers)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        if not self.channel_multipliers:
            raise ValueError("channel_multipliers must not be empty")
        if self.resolution % self.downsample:
            raise ValueError(
                f"resolution {self.resolution} is not divisible by the downsampling factor "
                f"{self.downsample} (2 ** (len(channel_multipliers) - 1))"
            )
        for c in self.level_channels + (self.z_channels,):
            if c % self.norm_groups:
                raise ValueError(f"{c} channels are not divisible by norm_groups={self.norm_groups}")
        if self.n_codes < 2 or self.code_dim < 1:
            raise ValueError("n_codes must be >= 2 and code_dim >= 1")

    @property
    def downsample(self) -> int:
        """Pixels per code along one side."""
        return 2 ** (len(self.channel_multipliers) - 1)

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of the code grid of one image."""
        side = self.resolution // self.downsample
        return (side, side)

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_multipliers)

    # ---- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channel_multipliers"] = list(self.channel_multipliers)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VQGANConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown VQGANConfig keys: {unknown}")
        return cls(**d)

    @classmethod
    def from_taming_params(cls, params: dict[str, Any], **overrides: Any) -> "VQGANConfig":
        """taming/Chameleon ``model.params`` (``ddconfig``, ``n_embed``, ``embed_dim``) -> config."""
        try:
            dd = params["ddconfig"]
            kw: dict[str, Any] = dict(
                resolution=int(dd["resolution"]),
                base_channels=int(dd["ch"]),
                channel_multipliers=tuple(dd["ch_mult"]),
                num_res_blocks=int(dd["num_res_blocks"]),
                attn_resolutions=tuple(dd.get("attn_resolutions") or ()),
                z_channels=int(dd["z_channels"]),
                double_z=bool(dd.get("double_z", False)),
                in_channels=int(dd.get("in_channels", 3)),
                n_codes=int(params["n_embed"]),
                code_dim=int(params["embed_dim"]),
            )
        except KeyError as e:
            raise ValueError(f"taming params lack key {e.args[0]!r}") from None
        if dd.get("attn_type", "vanilla") != "vanilla":
            raise ValueError(f"attn_type {dd['attn_type']!r} is not supported (only 'vanilla' attention)")
        if int(dd.get("out_ch", kw["in_channels"])) != kw["in_channels"]:
            raise ValueError(f"out_ch {dd['out_ch']} != in_channels {kw['in_channels']} is not supported")
        kw.update(overrides)
        return cls(**kw)

    def to_taming_params(self) -> dict[str, Any]:
        """Inverse of ``from_taming_params`` (norm_groups/eps are taming's fixed 32/1e-6)."""
        return {
            "embed_dim": self.code_dim,
            "n_embed": self.n_codes,
            "ddconfig": {
                "double_z": self.double_z,
                "z_channels": self.z_channels,
                "resolution": self.resolution,
                "in_channels": self.in_channels,
                "out_ch": self.in_channels,
                "ch": self.base_channels,
                "ch_mult": list(self.channel_multipliers),
                "num_res_blocks": self.num_res_blocks,
                "attn_resolutions": list(self.attn_resolutions),
                "dropout": 0.0,
            },
        }


PRESETS: dict[str, VQGANConfig] = {
    # Make-A-Scene / JAM: 256 px -> 32x32 codes, 8192 codes (f = 8).
    "make_a_scene_256": VQGANConfig(),
    # Chameleon's public tokenizer (vqgan.yaml): 512 px -> 32x32 codes, f = 16.
    "chameleon_512": VQGANConfig(
        resolution=512, channel_multipliers=(1, 1, 2, 2, 4), n_codes=8192, code_dim=256
    ),
    # Tests and the embedded quickstart: 32 px -> 8x8 codes, 64 codes; trains on CPU in minutes.
    "tiny": VQGANConfig(
        resolution=32,
        base_channels=16,
        channel_multipliers=(1, 2, 2),
        num_res_blocks=1,
        attn_resolutions=(),
        z_channels=16,
        n_codes=64,
        code_dim=8,
        norm_groups=8,
    ),
}


def preset(name: str, **overrides: Any) -> VQGANConfig:
    """A copy of ``PRESETS[name]`` with ``overrides`` applied."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


__all__ = ["VQGANConfig", "PRESETS", "preset"]
