"""Typed configs for the parent decoder and the three JAM architectures (paper §2.1, §3.1).

One dataclass per architecture, JSON-serialisable, stored in every checkpoint the tools write:
- ``DecoderConfig``: metaseq's ``model_parallel_transformer_lm`` at MP=1 (OPT / CM3leon family).
  JAM-Uniform has its parent's config; JAM-Width is a ``DecoderConfig`` twice as wide (``width_of``).
- ``CrossConfig``: JAM-Cross, two parent-shaped branches with cross blocks (``cross_of``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal, Union

ARCH_DECODER = "decoder"
ARCH_UNIFORM = "jam_uniform"
ARCH_WIDTH = "jam_width"
ARCH_CROSS = "jam_cross"


@dataclass
class DecoderConfig:
    """A pre-LayerNorm decoder-only transformer with metaseq's state-dict layout."""

    vocab_size: int
    """Rows of the (tied) token embedding, padded dictionary size included."""
    embed_dim: int
    """Hidden size E."""
    ffn_dim: int
    """FFN inner size F."""
    layers: int
    """Number of decoder layers."""
    heads: int
    """Attention heads; E must be divisible by it."""
    max_positions: int = 2048
    """Longest sequence; the learned position table has ``max_positions + padding_idx + 1`` rows."""
    padding_idx: int = 1
    """Pad id (fairseq Dictionary convention: bos=0, pad=1, eos=2, unk=3)."""
    bias: bool = True
    """Biases in the attention and FFN projections (False = metaseq ``--disable-bias``)."""
    affine_ln: bool = True
    """LayerNorm with weight and bias (False = metaseq ``--disable-affine-ln``)."""
    activation: Literal["relu", "gelu"] = "relu"
    """FFN activation."""
    dropout: float = 0.0
    """Residual / embedding dropout."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    scale_embedding: bool = True
    """Multiply token embeddings by sqrt(E) (False = metaseq ``--no-scale-embedding``)."""
    ln_eps: float = 1e-5
    """LayerNorm epsilon."""
    arch: str = ARCH_DECODER
    """Which architecture this config describes: ``decoder``, ``jam_uniform`` or ``jam_width``."""
    init_std: float = 0.02
    """Std of the normal init for freshly initialised weights."""

    def __post_init__(self) -> None:
        if self.embed_dim % self.heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by heads {self.heads}")
        if self.activation not in ("relu", "gelu"):
            raise ValueError(f"activation must be relu or gelu, got {self.activation!r}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.heads

    @property
    def num_position_rows(self) -> int:
        """metaseq's learned positions: ids start at padding_idx + 1, so max + pad + 1 rows (= max + 2)."""
        return self.max_positions + self.padding_idx + 1

    def to_dict(self) -> dict[str, Any]:
        return {"type": "DecoderConfig", **dataclasses.asdict(self)}


@dataclass
class CrossConfig:
    """JAM-Cross: two branches shaped like ``parent`` + bidirectional cross blocks (§2.1.3, Fig. 2)."""

    parent: DecoderConfig
    """Shape of each branch (both parents share it)."""
    cross_every: int = 2
    """A pair of cross blocks after layers 0, k, 2k, ... (k = cross_every); 0 = no cross blocks."""
    cross_init: Literal["paper", "preserve"] = "paper"
    """How new parameters start: ``paper`` (normal init) or ``preserve`` (blocks are identities)."""
    image_vocab_start: int = -1
    """First id of the image-code range in the shared embedding (rows from the image parent)."""
    image_vocab_end: int = -1
    """One past the last image-code id."""
    arch: str = ARCH_CROSS
    """Always ``jam_cross``."""

    def __post_init__(self) -> None:
        if isinstance(self.parent, dict):
            self.parent = config_from_dict(self.parent)
        if self.cross_every < 0:
            raise ValueError(f"cross_every must be >= 0, got {self.cross_every}")
        if self.cross_init not in ("paper", "preserve"):
            raise ValueError(f"cross_init must be paper or preserve, got {self.cross_init!r}")

    @property
    def cross_after(self) -> list[int]:
        """Indices of the branch layers followed by a cross-block pair."""
        if self.cross_every == 0:
            return []
        return list(range(0, self.parent.layers, self.cross_every))

    @property
    def vocab_size(self) -> int:
        return self.parent.vocab_size

    @property
    def embed_dim(self) -> int:
        return self.parent.embed_dim

    @property
    def padding_idx(self) -> int:
        return self.parent.padding_idx

    @property
    def max_positions(self) -> int:
        return self.parent.max_positions

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["parent"] = self.parent.to_dict()
        return {"type": "CrossConfig", **d}


ModelConfig = Union[DecoderConfig, CrossConfig]


def config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """Inverse of ``to_dict`` (also accepts a dict without ``type``: a ``DecoderConfig``)."""
    d = dict(d)
    kind = d.pop("type", "DecoderConfig")
    if kind == "DecoderConfig":
        return DecoderConfig(**d)
    if kind == "CrossConfig":
        d["parent"] = config_from_dict(d["parent"])
        return CrossConfig(**d)
    raise ValueError(f"unknown config type {kind!r}")


def config_to_json(cfg: ModelConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)


def config_from_json(text: str) -> ModelConfig:
    return config_from_dict(json.loads(text))


def width_of(parent: DecoderConfig) -> DecoderConfig:
    """JAM-Width (§2.1.2): hidden 2E, FFN 2F, heads 2H (head dim kept), same layers and vocab."""
    return dataclasses.replace(
        parent,
        embed_dim=2 * parent.embed_dim,
        ffn_dim=2 * parent.ffn_dim,
        heads=2 * parent.heads,
        arch=ARCH_WIDTH,
    )


def uniform_of(parent: DecoderConfig) -> DecoderConfig:
    """JAM-Uniform (Eq. 1): the parent's architecture."""
    return dataclasses.replace(parent, arch=ARCH_UNIFORM)


def cross_of(
    parent: DecoderConfig,
    cross_every: int = 2,
    *,
    cross_init: str = "paper",
    image_vocab_start: int = -1,
    image_vocab_end: int = -1,
) -> CrossConfig:
    """JAM-Cross (§2.1.3) built from two parents shaped like ``parent``."""
    return CrossConfig(
        parent=dataclasses.replace(parent, arch=ARCH_DECODER),
        cross_every=cross_every,
        cross_init=cross_init,  # type: ignore[arg-type]
        image_vocab_start=image_vocab_start,
        image_vocab_end=image_vocab_end,
    )


# Named parent presets. OPT shapes follow the public OPT family (HF ``OPTConfig``: relu, biases,
# affine LayerNorm, no embedding scale); cm3leon_7b is the paper's 7B parent (§3.1).
PRESETS: dict[str, DecoderConfig] = {
    "tiny": DecoderConfig(
        vocab_size=128, embed_dim=32, ffn_dim=64, layers=2, heads=4, max_positions=64
    ),
    "opt_125m": DecoderConfig(
        vocab_size=50272, embed_dim=768, ffn_dim=3072, layers=12, heads=12,
        max_positions=2048, scale_embedding=False,
    ),
    "opt_1_3b": DecoderConfig(
        vocab_size=50272, embed_dim=2048, ffn_dim=8192, layers=24, heads=32,
        max_positions=2048, scale_embedding=False,
    ),
    "opt_6_7b": DecoderConfig(
        vocab_size=50272, embed_dim=4096, ffn_dim=16384, layers=32, heads=32,
        max_positions=2048, scale_embedding=False,
    ),
    "cm3leon_7b": DecoderConfig(
        vocab_size=65536, embed_dim=4096, ffn_dim=16384, layers=32, heads=32,
        max_positions=4096, bias=False, affine_ln=False, dropout=0.0, attention_dropout=0.0,
    ),
}


def preset(name: str, **overrides: Any) -> DecoderConfig:
    """A copy of a named preset with fields overridden."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return dataclasses.replace(PRESETS[name], **overrides)
