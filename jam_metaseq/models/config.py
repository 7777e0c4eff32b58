"""Typed configs for the parent decoder and the three JAM architectures (paper §2.1, §3.1).

One dataclass per architecture, JSON-serialisable, stored in every checkpoint the tools write:
- ``DecoderConfig``: metaseq's ``model_parallel_transformer_lm`` at MP=1 (OPT / CM3leon family).
  JAM-Uniform has its parent's config; JAM-Width is a ``DecoderConfig`` twice as wide (``width_of``).
- ``CrossConfig``: JAM-Cross, two parent-shaped branches with cross blocks (``cross_of``); the
  parents may differ in shape (width, FFN, depth, heads: ``image_parent``).
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


SHAPE_FIELDS = ("embed_dim", "ffn_dim", "layers", "heads")
"""The fields in which JAM-Cross's two parents may differ (``CrossConfig.image_parent``); every
other ``DecoderConfig`` field (vocabulary, positions, padding, biases, LayerNorm kind, activation,
embedding scale, dropout, init) is shared."""
TENSOR_FIELDS = ("vocab_size", "max_positions", "bias", "affine_ln")
"""Besides ``SHAPE_FIELDS``, the fields a checkpoint's tensors show (embedding and position rows,
biases, LayerNorm weights): the parents of every fusion agree in them, whatever their shapes."""
FUNCTION_FIELDS = ("activation", "scale_embedding", "ln_eps", "padding_idx")
"""Fields of the function, not of the tensors, that JAM-Cross's parents must share as well (its
image branch takes the LLM's)."""


def align_layer(i: int, *, shallow: int, deep: int) -> int:
    """Proportional depth: layer ``i`` of a ``shallow``-layer branch ends at depth (i+1)/shallow;
    the ``deep``-layer branch's layer ending at or just before that depth,
    ``(i+1) * deep // shallow - 1``. Strictly increasing, maps the last layer to the last layer,
    and is the identity when the depths are equal."""
    return (i + 1) * deep // shallow - 1


@dataclass
class CrossConfig:
    """JAM-Cross: two parent-shaped branches + bidirectional cross blocks (§2.1.3, Fig. 2).

    Symmetric (``image_parent`` None, the paper's case): both branches are shaped like ``parent``.
    Asymmetric (the paper's stated future work): the image branch is shaped like ``image_parent``,
    which may differ from ``parent`` in ``SHAPE_FIELDS`` (width, FFN, depth, heads) only.

    - Cross blocks are rectangular (Eq. 4): the block of side s takes its query from its own
      width E_s and projects keys and values from the other branch's width E_o to E_s (``k_proj``,
      ``v_proj``: (E_s, E_o)); heads, head dim, FFN and output are side s's.
    - Layer alignment (``cross_pairs``): ``cross_every`` counts layers of the shallower branch
      (layers 0, k, 2k, ...); its layer i pairs with the deeper branch's ``align_layer(i)``
      (proportional depth). Each pair of cross blocks reads both branches' outputs of its pair.
    - Embeddings: with equal widths, one shared token embedding tied to the output projection
      (the symmetric model's keys). With different widths, each branch has its own input
      embedding, its parent's whole table (so each branch reads every token as its parent did),
      and a separate output projection of width ``output_dim`` = the wider branch's width: the
      feature projection maps cat([x_img, x_llm]) (E_img + E_llm) to it, so neither branch's
      output is squeezed below its own width, and each parent's head rows (text rows from the
      LLM, image rows from the image parent) fit into it unchanged, zero-padded.
    """

    parent: DecoderConfig
    """Shape of the LLM branch (and of both branches when ``image_parent`` is None)."""
    cross_every: int = 2
    """A pair of cross blocks after layers 0, k, 2k, ... of the shallower branch (k = cross_every);
    0 = no cross blocks."""
    cross_init: Literal["paper", "preserve"] = "paper"
    """How new parameters start: ``paper`` (normal init) or ``preserve`` (blocks are identities)."""
    image_vocab_start: int = -1
    """First id of the image-code range in the shared embedding (rows from the image parent)."""
    image_vocab_end: int = -1
    """One past the last image-code id."""
    arch: str = ARCH_CROSS
    """Always ``jam_cross``."""
    image_parent: DecoderConfig | None = None
    """Shape of the image branch when it differs from ``parent`` (None: the same shape)."""

    def __post_init__(self) -> None:
        if isinstance(self.parent, dict):
            self.parent = config_from_dict(self.parent)
        if isinstance(self.image_parent, dict):
            self.image_parent = config_from_dict(self.image_parent)
        if self.cross_every < 0:
            raise ValueError(f"cross_every must be >= 0, got {self.cross_every}")
        if self.cross_init not in ("paper", "preserve"):
            raise ValueError(f"cross_init must be paper or preserve, got {self.cross_init!r}")
        if self.image_parent is not None:
            a, b = self.parent, self.image_parent
            for f in dataclasses.fields(DecoderConfig):
                if f.name not in SHAPE_FIELDS and f.name != "arch" and getattr(a, f.name) != getattr(b, f.name):
                    raise ValueError(f"the parents of JAM-Cross must share {f.name}: the LLM has "
                                     f"{getattr(a, f.name)!r}, the image parent {getattr(b, f.name)!r} "
                                     f"(they may differ only in {', '.join(SHAPE_FIELDS)})")
            if all(getattr(a, f) == getattr(b, f) for f in SHAPE_FIELDS):
                self.image_parent = None  # one shape: the symmetric model, whatever the spelling
            else:
                self.image_parent = dataclasses.replace(b, arch=ARCH_DECODER)

    @property
    def symmetric(self) -> bool:
        """Both branches have the LLM's shape (the paper's JAM-Cross)."""
        return self.image_parent is None

    @property
    def llm(self) -> DecoderConfig:
        """The LLM branch's shape."""
        return self.parent

    @property
    def img(self) -> DecoderConfig:
        """The image branch's shape."""
        return self.parent if self.image_parent is None else self.image_parent

    def branch(self, side: str) -> DecoderConfig:
        """The shape of branch ``side`` (``llm`` or ``img``, the key schema's sides)."""
        if side not in ("llm", "img"):
            raise ValueError(f"no branch {side!r}; expected llm or img")
        return self.llm if side == "llm" else self.img

    @property
    def shared_embedding(self) -> bool:
        """One token embedding for both branches, tied to the output projection (equal widths)."""
        return self.llm.embed_dim == self.img.embed_dim

    @property
    def output_dim(self) -> int:
        """Width of the feature projection's output, the final LayerNorm and the output
        projection: the wider branch's (both branches' when equal)."""
        return max(self.llm.embed_dim, self.img.embed_dim)

    @property
    def cross_pairs(self) -> list[tuple[int, int]]:
        """(LLM layer, image layer) after which each cross-block pair sits, in order: layers 0, k,
        2k, ... of the shallower branch, each with its ``align_layer`` in the deeper one."""
        if self.cross_every == 0:
            return []
        L_llm, L_img = self.llm.layers, self.img.layers
        shallow, deep = min(L_llm, L_img), max(L_llm, L_img)
        out = []
        for i in range(0, shallow, self.cross_every):
            j = align_layer(i, shallow=shallow, deep=deep)
            out.append((i, j) if L_llm <= L_img else (j, i))
        return out

    @property
    def cross_after(self) -> list[int]:
        """Indices of the shallower branch's layers followed by a cross-block pair (both
        branches' when the depths are equal)."""
        if self.cross_every == 0:
            return []
        return list(range(0, min(self.llm.layers, self.img.layers), self.cross_every))

    @property
    def vocab_size(self) -> int:
        return self.parent.vocab_size

    @property
    def embed_dim(self) -> int:
        """The output width (``output_dim``; the parent's width when the branches are alike)."""
        return self.output_dim

    @property
    def padding_idx(self) -> int:
        return self.parent.padding_idx

    @property
    def max_positions(self) -> int:
        return self.parent.max_positions

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["parent"] = self.parent.to_dict()
        if self.image_parent is None:
            del d["image_parent"]  # the symmetric model's dict (and bytes) as before
        else:
            d["image_parent"] = self.image_parent.to_dict()
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
        if d.get("image_parent") is not None:
            d["image_parent"] = config_from_dict(d["image_parent"])
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
    image_parent: DecoderConfig | None = None,
) -> CrossConfig:
    """JAM-Cross (§2.1.3) built from an LLM shaped like ``parent`` and an image parent shaped
    like ``image_parent`` (None: like ``parent``)."""
    return CrossConfig(
        parent=dataclasses.replace(parent, arch=ARCH_DECODER),
        image_parent=image_parent,
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
