"""Typed configs for the parent decoder and the three JAM architectures (paper §2.1, §3.1).

One dataclass per architecture, JSON-serialisable, stored in every checkpoint the tools write:
- ``DecoderConfig``: metaseq's ``model_parallel_transformer_lm`` at MP=1 (OPT / CM3leon family), and
  the Llama family (Llama, Qwen2, Gemma) as named fields of the same block: ``norm``, ``positions``,
  ``mlp``, ``kv_heads``, ``attn_head_dim``, ``qkv``, ``qkv_bias``, ``tie_embeddings`` ... (a family is
  configuration plus a key map, not a fork). Every new field defaults to the OPT behaviour and is
  left out of ``to_dict`` at its default, so an OPT config serialises byte for byte as before.
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


NORMS = ("layernorm", "rmsnorm", "rmsnorm_plus_one")
POSITION_KINDS = ("learned", "rotary")
MLPS = ("plain", "gated")
QKV_LAYOUTS = ("fused", "separate")
QK_NORMS = ("none", "layernorm_per_head")
ACTIVATIONS = ("relu", "gelu", "silu", "gelu_tanh")
ROPE_TYPES: dict[str, tuple[str, ...]] = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
"""Rotary scalings this decoder computes (``rope_scaling["rope_type"]``) and the parameters each
needs (HF ``modeling_rope_utils``); ``default`` is no scaling (``rope_scaling`` None)."""


@dataclass
class DecoderConfig:
    """A pre-norm decoder-only transformer with metaseq's state-dict layout (``models/keys.py``)."""

    vocab_size: int
    """Rows of the token embedding (and of the output projection), padded dictionary size included."""
    embed_dim: int
    """Hidden size E."""
    ffn_dim: int
    """FFN inner size F."""
    layers: int
    """Number of decoder layers."""
    heads: int
    """Attention (query) heads; E must be divisible by it unless ``attn_head_dim`` is set."""
    max_positions: int = 2048
    """Longest sequence; the learned position table has ``max_positions + padding_idx + 1`` rows."""
    padding_idx: int = 1
    """Pad id (fairseq Dictionary convention: bos=0, pad=1, eos=2, unk=3)."""
    bias: bool = True
    """Biases in the attention output and FFN projections, and in q/k/v unless ``qkv_bias`` says
    otherwise (False = metaseq ``--disable-bias``)."""
    affine_ln: bool = True
    """Norms with a learned weight (LayerNorm: and bias) (False = metaseq ``--disable-affine-ln``)."""
    activation: Literal["relu", "gelu", "silu", "gelu_tanh"] = "relu"
    """FFN activation (on the gate with ``mlp="gated"``); ``gelu`` is the exact erf form,
    ``gelu_tanh`` its tanh approximation (HF ``gelu_pytorch_tanh``: Gemma)."""
    dropout: float = 0.0
    """Residual / embedding dropout."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    scale_embedding: bool = True
    """Multiply token embeddings by sqrt(E) (False = metaseq ``--no-scale-embedding``)."""
    ln_eps: float = 1e-5
    """Norm epsilon (LayerNorm's, or RMSNorm's: HF ``rms_norm_eps``)."""
    arch: str = ARCH_DECODER
    """Which architecture this config describes: ``decoder``, ``jam_uniform`` or ``jam_width``."""
    init_std: float = 0.02
    """Std of the normal init for freshly initialised weights."""
    # ---- the Llama family (issue 23). Each default is the OPT / metaseq decoder's behaviour, and
    # ``to_dict`` leaves a field out while it has its default (``FAMILY_DEFAULTS``).
    norm: Literal["layernorm", "rmsnorm", "rmsnorm_plus_one"] = "layernorm"
    """Normalisation: ``layernorm`` (OPT), ``rmsnorm`` (Llama, Qwen2: w * x / rms(x)) or
    ``rmsnorm_plus_one`` (Gemma: (1 + w) * x / rms(x), the stored weight starts at 0)."""
    positions: Literal["learned", "rotary"] = "learned"
    """``learned``: metaseq's position table added to the embedding; ``rotary``: RoPE on q and k in
    every attention (HF half-split layout, ``rotate_half``), no position table."""
    rope_theta: float = 10000.0
    """Rotary base (HF ``rope_theta``)."""
    rope_scaling: dict[str, Any] | None = None
    """Rotary frequency scaling: None (HF ``default``), ``{"rope_type": "linear", "factor": f}`` or
    ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"}``; any other type is refused by name."""
    mlp: Literal["plain", "gated"] = "plain"
    """``plain``: fc2(act(fc1(x))) (OPT); ``gated``: fc2(act(fc_gate(x)) * fc1(x)) (Llama's
    down(act(gate(x)) * up(x)))."""
    kv_heads: int | None = None
    """Key/value heads for grouped-query attention (HF ``num_key_value_heads``); None = ``heads``.
    Query head h reads key/value head h // (heads / kv_heads)."""
    attn_head_dim: int | None = None
    """Width of one attention head when it is not E / heads (HF ``head_dim``; Gemma-7B: 256 with 16
    heads and E = 3,072); None = E / heads. ``head_dim`` is the value in use."""
    qkv: Literal["fused", "separate"] = "fused"
    """``fused``: metaseq's one ``qkv_proj`` with rows [K; V; Q]; ``separate``: ``q_proj``, ``k_proj``,
    ``v_proj`` (the HF layout; needed for grouped k/v heads or a head width other than E / heads)."""
    qkv_bias: bool | None = None
    """Biases on q/k/v when they differ from ``bias`` (Qwen2: True with ``bias`` False); None = ``bias``."""
    tie_embeddings: bool = True
    """The output projection is the token embedding (False: a matrix of its own, Llama-2/3, Qwen2-7B)."""
    embed_scale_in_dtype: bool = False
    """Round the sqrt(E) embedding factor to the model's dtype before the multiply (HF Gemma) rather
    than multiply by it in full precision (metaseq). Equal in fp32."""
    # ---- Chameleon (issue 24): defaults again the OPT / Llama behaviour, left out of ``to_dict``.
    qk_norm: Literal["none", "layernorm_per_head"] = "none"
    """``layernorm_per_head`` (Chameleon): each head's query and key (D features) go through a
    LayerNorm with that head's own weight and bias ((H, D) for q, (G, D) for k), after the
    projection and before the rotary; eps 1e-5 (``norms.QK_NORM_EPS``)."""
    swin_norm: bool = False
    """Norms after the sublayers, inside the residual (Chameleon-30B, HF ``swin_norm``):
    x + N(Attn(x)), then x + N(FFN(x)), instead of the pre-norm x + Attn(N(x)), x + FFN(N(x))."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "embed_dim", "ffn_dim", "heads", "max_positions"):  # issue 27 §3: counts
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if isinstance(self.layers, bool) or not isinstance(self.layers, int) or self.layers < 0:
            raise ValueError(f"layers must be a non-negative integer, got {self.layers!r}")
        if self.attn_head_dim is None and self.embed_dim % self.heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by heads {self.heads}")
        for name, allowed in (("activation", ACTIVATIONS), ("norm", NORMS), ("positions", POSITION_KINDS),
                              ("mlp", MLPS), ("qkv", QKV_LAYOUTS), ("qk_norm", QK_NORMS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.heads % self.num_kv_heads:
            raise ValueError(f"kv_heads {self.kv_heads} does not divide heads {self.heads} (grouped-query "
                             "attention needs whole groups)")
        if self.qkv == "fused":
            if self.num_kv_heads != self.heads or self.head_dim * self.heads != self.embed_dim:
                raise ValueError(f"qkv='fused' ([K; V; Q] in one tensor) needs kv_heads == heads and "
                                 f"heads x head_dim == embed_dim; this config has {self.num_kv_heads} k/v heads, "
                                 f"{self.heads} x {self.head_dim} vs {self.embed_dim}: use qkv='separate'")
            if self.qkv_bias is not None and self.qkv_bias != self.bias:
                raise ValueError("qkv='fused' has one bias for q, k and v: qkv_bias must equal bias")
        self.rope_scaling = normalize_rope_scaling(self.rope_scaling)

    @property
    def head_dim(self) -> int:
        """Width D of one attention head."""
        return self.attn_head_dim if self.attn_head_dim is not None else self.embed_dim // self.heads

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads G (``heads`` without grouped-query attention)."""
        return self.kv_heads if self.kv_heads is not None else self.heads

    @property
    def has_qkv_bias(self) -> bool:
        return self.bias if self.qkv_bias is None else self.qkv_bias

    @property
    def learned_positions(self) -> bool:
        return self.positions == "learned"

    @property
    def num_position_rows(self) -> int:
        """metaseq's learned positions: ids start at padding_idx + 1, so max + pad + 1 rows (= max + 2)."""
        return self.max_positions + self.padding_idx + 1

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name, default in FAMILY_DEFAULTS.items():
            if d[name] == default:
                del d[name]  # an OPT config's dict (and the checkpoint bytes holding it) as before
        return {"type": "DecoderConfig", **d}


FAMILY_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(DecoderConfig)
    if f.name in ("norm", "positions", "rope_theta", "rope_scaling", "mlp", "kv_heads", "attn_head_dim", "qkv",
                  "qkv_bias", "tie_embeddings", "embed_scale_in_dtype", "qk_norm", "swin_norm")
}
"""The Llama-family and Chameleon fields and their (OPT) defaults: ``to_dict`` writes them only where
they differ."""


def normalize_rope_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    """``rope_scaling`` in one spelling: None for no scaling, else ``rope_type`` plus exactly the
    parameters that type needs, as numbers. Accepts HF's keys (``type`` for ``rope_type``; extra
    keys such as ``rope_theta`` ignored); refuses other types by name."""
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope scaling type {kind!r} is not supported (default, {', '.join(ROPE_TYPES)})")
    missing = [k for k in ROPE_TYPES[kind] if scaling.get(k) is None]
    if missing:
        raise ValueError(f"rope scaling {kind!r} needs {', '.join(missing)}")
    out: dict[str, Any] = {"rope_type": kind}
    for k in ROPE_TYPES[kind]:
        out[k] = int(scaling[k]) if k == "original_max_position_embeddings" else float(scaling[k])
    return out


SHAPE_FIELDS = ("embed_dim", "ffn_dim", "layers", "heads", "kv_heads", "attn_head_dim")
"""The fields in which JAM-Cross's two parents may differ (``CrossConfig.image_parent``); every
other ``DecoderConfig`` field (vocabulary, positions, padding, biases, norm kind, activation,
embedding scale, dropout, init, the Llama-family fields) is shared. ``kv_heads`` and
``attn_head_dim`` (grouped k/v heads, head width) are shape: Gemma-2B and Gemma-7B differ in both."""
BRANCH_FIELDS = ("qk_norm", "swin_norm")
"""The block type a JAM-Cross branch keeps from its own parent besides its shape (issue 24: a
Llama-2 branch without q/k norms beside a Chameleon branch with them): each branch computes its
own block, so its parents may differ in these; JAM-Uniform and JAM-Width mix one block's weights
and refuse parents that differ in them (naming JAM-Cross)."""
TENSOR_FIELDS = ("vocab_size", "max_positions", "bias", "affine_ln", "positions", "mlp", "qkv", "qkv_bias",
                 "tie_embeddings", "qk_norm")
"""Besides ``SHAPE_FIELDS``, the fields a checkpoint's tensors show (embedding and position rows,
biases, norm weights, the gate, separate or fused q/k/v, an untied head, per-head q/k norms): the
parents of every fusion agree in them, whatever their shapes."""
FUNCTION_FIELDS = ("activation", "scale_embedding", "ln_eps", "padding_idx", "norm", "rope_theta", "rope_scaling",
                   "embed_scale_in_dtype", "swin_norm")
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
    which may differ from ``parent`` in ``SHAPE_FIELDS`` (width, FFN, depth, heads) and in its block
    type ``BRANCH_FIELDS`` (Chameleon's q/k norms beside a Llama branch) only.

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
                if f.name not in (*SHAPE_FIELDS, *BRANCH_FIELDS, "arch") and getattr(a, f.name) != getattr(b, f.name):
                    raise ValueError(f"the parents of JAM-Cross must share {f.name}: the LLM has "
                                     f"{getattr(a, f.name)!r}, the image parent {getattr(b, f.name)!r} "
                                     f"(they may differ only in {', '.join((*SHAPE_FIELDS, *BRANCH_FIELDS))})")
            if all(getattr(a, f) == getattr(b, f) for f in (*SHAPE_FIELDS, *BRANCH_FIELDS)):
                self.image_parent = None  # one shape: the symmetric model, whatever the spelling
            else:
                self.image_parent = dataclasses.replace(b, arch=ARCH_DECODER)

    @property
    def symmetric(self) -> bool:
        """Both branches have the LLM's shape and block (the paper's JAM-Cross)."""
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
    def tied_output(self) -> bool:
        """The output projection is the shared token embedding: one embedding (equal widths) and
        parents whose heads are tied to their embeddings (OPT, Gemma; not Llama-3)."""
        return self.shared_embedding and self.parent.tie_embeddings

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


CHECKPOINT_KEY = "jam_config"
"""Where a checkpoint stores its model's config (as ``to_dict()``): a top-level entry of a ``.pt``
(beside ``jam_metaseq.vocab.CHECKPOINT_KEY``), an ``__metadata__`` entry (JSON) of a safetensors
file, ``task_state[CHECKPOINT_KEY]`` of a host-trained checkpoint."""


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
    """JAM-Width (§2.1.2): hidden 2E, FFN 2F, heads 2H and grouped k/v heads 2G (head dim kept,
    so the query heads per k/v head too), same layers and vocab."""
    return dataclasses.replace(
        parent,
        embed_dim=2 * parent.embed_dim,
        ffn_dim=2 * parent.ffn_dim,
        heads=2 * parent.heads,
        kv_heads=None if parent.kv_heads is None else 2 * parent.kv_heads,
        arch=ARCH_WIDTH,
    )


def parent_of_width(cfg: DecoderConfig) -> DecoderConfig:
    """The inverse of ``width_of``: the shape of one parent of the JAM-Width model ``cfg``."""
    if cfg.embed_dim % 2 or cfg.ffn_dim % 2 or cfg.heads % 2 or cfg.num_kv_heads % 2:
        raise ValueError(f"not a JAM-Width shape: embed_dim {cfg.embed_dim}, ffn_dim {cfg.ffn_dim}, heads "
                         f"{cfg.heads} and kv heads {cfg.num_kv_heads} must all be even")
    return dataclasses.replace(
        cfg, embed_dim=cfg.embed_dim // 2, ffn_dim=cfg.ffn_dim // 2, heads=cfg.heads // 2,
        kv_heads=None if cfg.kv_heads is None else cfg.kv_heads // 2, arch=ARCH_DECODER,
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

# The Llama family (issue 23): one block, named fields. The public shapes follow the models' HF
# ``config.json``. ``padding_idx`` must be an id no text produces (it is masked as a key): Gemma's
# pad (0), Qwen2's ``<|endoftext|>`` (its HF pad), for Llama-2 ``<unk>`` (0; byte fallback never
# emits it) and for Llama-3 a reserved special token (128004); an imported parent's vocabulary
# manifest names its own. Tiny presets for tests: width 32, 2 layers, grouped k/v heads, and for
# Gemma a head width (16) independent of E / heads (8).
_LLAMA = dict(norm="rmsnorm", positions="rotary", mlp="gated", activation="silu", qkv="separate", bias=False,
              scale_embedding=False, ln_eps=1e-5, tie_embeddings=False)
_QWEN2 = dict(_LLAMA, qkv_bias=True, ln_eps=1e-6, rope_theta=1e6)
_GEMMA = dict(_LLAMA, norm="rmsnorm_plus_one", activation="gelu_tanh", scale_embedding=True,
              embed_scale_in_dtype=True, ln_eps=1e-6, tie_embeddings=True)
PRESETS.update({
    "llama_tiny": DecoderConfig(vocab_size=128, embed_dim=32, ffn_dim=64, layers=2, heads=4, kv_heads=2,
                                max_positions=64, **_LLAMA),
    "qwen2_tiny": DecoderConfig(vocab_size=128, embed_dim=32, ffn_dim=64, layers=2, heads=4, kv_heads=2,
                                max_positions=64, **dict(_QWEN2, tie_embeddings=True)),
    "gemma_tiny": DecoderConfig(vocab_size=128, embed_dim=32, ffn_dim=64, layers=2, heads=4, kv_heads=1,
                                attn_head_dim=16, max_positions=64, **_GEMMA),
    "llama2_7b": DecoderConfig(vocab_size=32000, embed_dim=4096, ffn_dim=11008, layers=32, heads=32,
                               max_positions=4096, padding_idx=0, **_LLAMA),
    "llama3_8b": DecoderConfig(vocab_size=128256, embed_dim=4096, ffn_dim=14336, layers=32, heads=32, kv_heads=8,
                               max_positions=8192, padding_idx=128004, **dict(_LLAMA, rope_theta=500000.0)),
    "qwen2_0_5b": DecoderConfig(vocab_size=151936, embed_dim=896, ffn_dim=4864, layers=24, heads=14, kv_heads=2,
                                max_positions=32768, padding_idx=151643, **dict(_QWEN2, tie_embeddings=True)),
    "qwen2_7b": DecoderConfig(vocab_size=152064, embed_dim=3584, ffn_dim=18944, layers=28, heads=28, kv_heads=4,
                              max_positions=32768, padding_idx=151643, **_QWEN2),
    "gemma_2b": DecoderConfig(vocab_size=256000, embed_dim=2048, ffn_dim=16384, layers=18, heads=8, kv_heads=1,
                              attn_head_dim=256, max_positions=8192, padding_idx=0, **_GEMMA),
    "gemma_7b": DecoderConfig(vocab_size=256000, embed_dim=3072, ffn_dim=24576, layers=28, heads=16,
                              attn_head_dim=256, max_positions=8192, padding_idx=0, **_GEMMA),
})

# Chameleon (issue 24): the Llama-2 block with per-head q/k LayerNorm (``qk_norm``), and for the 30B
# model the norms after the sublayers (``swin_norm``); FFN = 8E/3 rounded up to 256 (HF's converter:
# 11,008 and 22,016). The 30B model is the paper's "34B": 8 k/v heads give 34.29 B parameters (64
# would give 39.9 B). 65,536 ids, 8,192 of them image codes (docs/FAMILIES.md, "Chameleon and
# different tokenizers"); ``<pad>`` is id 1, as in our manifests. Anole-7B (GAIR) is Chameleon-7B's
# tensors fine-tuned: the same preset.
_CHAMELEON = dict(_LLAMA, qk_norm="layernorm_per_head")
PRESETS.update({
    "chameleon_tiny": DecoderConfig(vocab_size=128, embed_dim=32, ffn_dim=64, layers=2, heads=4, kv_heads=2,
                                    max_positions=64, **_CHAMELEON),
    "chameleon_7b": DecoderConfig(vocab_size=65536, embed_dim=4096, ffn_dim=11008, layers=32, heads=32,
                                  max_positions=4096, padding_idx=1, **_CHAMELEON),
    "chameleon_30b": DecoderConfig(vocab_size=65536, embed_dim=8192, ffn_dim=22016, layers=48, heads=64, kv_heads=8,
                                   max_positions=4096, padding_idx=1, swin_norm=True, **_CHAMELEON),
})


def preset(name: str, **overrides: Any) -> DecoderConfig:
    """A copy of a named preset with fields overridden."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return dataclasses.replace(PRESETS[name], **overrides)
