"""The state-dict key schema of every model here (paper §2.1), as data: the name of every tensor
and how it splits across model-parallel ranks. The one place these are written; the models'
module names produce exactly these keys (``tests/test_models_keys.py``), and the checkpoint tools
(readers, writers, ``checkpoints_tools.layout``), the fusion code and the metaseq host read them
from here.

Keys are metaseq's ``model_parallel_transformer_lm`` names (docs/METASEQ.md), so the ``model``
dict of a metaseq checkpoint loads with ``strict=True``; JAM-Cross adds the names of the authors'
prototype. A model is top-level tensors plus *containers* of repeated blocks, whose keys are
``{container}.{i}.{name in the block}``:

- parent decoder, JAM-Uniform, JAM-Width: ``decoder.version`` (a constant buffer),
  ``decoder.embed_tokens.weight``, ``decoder.embed_positions.weight``, ``LAYERS`` x L
  (``LAYER`` blocks), ``decoder.layer_norm.{weight,bias}``, ``decoder.output_projection.weight``
  (tied to the embedding).
- JAM-Cross: the same embedding (branches of different widths: one per branch,
  ``BRANCH_EMBED``, and an untied output projection), one position table per branch (``BRANCH_POSITIONS``), both
  branches' ``LAYER`` blocks (``BRANCH_LAYERS``), the cross blocks (``CROSS_LAYERS``, ``CROSS``
  blocks, one per direction after every ``cross_every``-th layer), ``FEATURE_PROJECTION``, the
  final LayerNorm and the tied output projection.

Biases exist only with ``cfg.bias`` (q/k/v: ``cfg.has_qkv_bias``), norm weights only with
``cfg.affine_ln`` and norm biases only for an affine LayerNorm (``Entry.needs``). The Llama family
(``DecoderConfig.qkv="separate"`` / ``mlp="gated"`` / ``positions="rotary"``) has separate
``self_attn.{q,k,v}_proj`` instead of ``qkv_proj`` (``Q_PROJ`` says why), a gate ``fc_gate`` beside
``fc1``/``fc2``, RMSNorms under the ``*layer_norm`` names and no position table; with
``tie_embeddings=False`` the output projection is its own tensor. HF's names for them:
``jam_metaseq/models/hf_families.py``. Chameleon (``qk_norm``) adds per-head ``self_attn.q_norm`` /
``self_attn.k_norm`` weights and biases (``Q_NORM`` says how they split and start).

Model-parallel rules (Megatron, as metaseq splits): ``replicated`` (every rank holds it),
``vocab`` (rows split: vocab-parallel embedding and output projection), ``column`` (output rows
split), ``row`` (input columns split, dim 1; the output is all-reduced, so its bias is whole), and
``qkv`` (the fused [K; V; Q] projection: rank r holds [K_r; V_r; Q_r]). ``checkpoints_tools.layout``
applies them. The Llama family's tensors: separate q/k/v and the gate ``column`` (q by query heads,
k/v by k/v heads, so M ranks need M | kv_heads: ``layout.check_mp(kv_heads=...)``), down (``fc2``)
and o ``row``, RMSNorm weights ``replicated``, an untied output projection ``vocab``. Fresh
init (``init_rule``): norm weights 1 (Gemma's 0), biases 0, matrices N(0, init_std).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Literal, Union

Rule = Literal["replicated", "vocab", "column", "row", "qkv"]
RULES: tuple[Rule, ...] = ("replicated", "vocab", "column", "row", "qkv")


@dataclass(frozen=True)
class Entry:
    """One tensor: its key (top level) or its name inside a block, its model-parallel rule, and
    the config properties it needs (``NEEDS``; all must hold; empty: always present)."""

    name: str
    rule: Rule = "replicated"
    needs: tuple[str, ...] = ()


NEEDS = {
    "bias": lambda c: c.bias,
    "qkv_bias": lambda c: c.has_qkv_bias,
    "affine_ln": lambda c: c.affine_ln,
    "norm_bias": lambda c: c.affine_ln and c.norm == "layernorm",
    "fused_qkv": lambda c: c.qkv == "fused",
    "separate_qkv": lambda c: c.qkv == "separate",
    "gated": lambda c: c.mlp == "gated",
    "learned_positions": lambda c: c.learned_positions,
    "qk_norm": lambda c: c.qk_norm != "none",
}
"""What an ``Entry.needs`` may name: a property of a ``DecoderConfig`` (the block's branch)."""


def _linear(name: str, rule: Rule, bias_rule: Rule, *, needs: tuple[str, ...] = (),
            bias: str = "bias") -> tuple[Entry, Entry]:
    return Entry(f"{name}.weight", rule, needs), Entry(f"{name}.bias", bias_rule, (*needs, bias))


def _norm(name: str) -> tuple[Entry, Entry]:
    """A norm's weight (LayerNorm or RMSNorm, when affine) and bias (affine LayerNorm only)."""
    return Entry(f"{name}.weight", needs=("affine_ln",)), Entry(f"{name}.bias", needs=("norm_bias",))


# ---- blocks (names inside one block; the models register them in this order) --------------------
QKV = "self_attn.qkv_proj"
"""The fused self-attention projection, (3E, E) rows in [K; V; Q] order (metaseq's)."""
Q_PROJ, K_PROJ, V_PROJ = "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"
"""Separate self-attention projections (``qkv="separate"``, the Llama family; OPT's older
model-parallel files): q (H D, E), k and v (G D, E) with G grouped k/v heads.

Why separate and not fused for the Llama family: with grouped k/v heads the three blocks have
different heights (H D vs G D), so [K; V; Q] is no longer three equal thirds and the ``qkv`` split
(each third cut in M) would need the group sizes; kept apart, each is a plain ``column`` tensor
whose M row blocks are whole heads, and rank r's query heads [rH/M, (r+1)H/M) read exactly its
k/v heads [rG/M, (r+1)G/M) (query head h reads k/v head h // (H/G)), so a rank needs no other
rank's keys. It is also the HF layout, tensor for tensor: reading or writing a 7B HF checkpoint
streams one tensor at a time with no concatenation, and JAM-Width widens each as a plain matrix."""
Q_NORM, K_NORM = "self_attn.q_norm", "self_attn.k_norm"
"""Chameleon's per-head query / key LayerNorms (``qk_norm="layernorm_per_head"``, HF's names):
weight and bias of shape (H, D) for q and (G, D) for k, one row per head.

Model parallelism: rule ``column`` (rows = heads), the split of the q/k projections they follow:
the rank holding query heads [rH/M, (r+1)H/M) and k/v heads [rG/M, (r+1)G/M) holds exactly those
rows (the statistics are per head, so no rank needs another's). Meta's original MP=M files hold one
(D,) vector per rank, which HF's converter repeats over that rank's heads: the same split read back.
JAM-Width stacks the parents' rows, [llm heads; img heads], as it orders the widened heads.
Fresh init: weight 1, bias 0 (torch's LayerNorm), whatever ``norm`` the rest of the block uses."""
FC_GATE, FC1, FC2 = "fc_gate", "fc1", "fc2"
"""The FFN's (F, E) and (E, F) projections, in decoder layers and cross blocks alike; a gated
MLP (``mlp="gated"``) adds ``fc_gate`` (F, E): fc2(act(fc_gate(x)) * fc1(x)), i.e. HF's
gate_proj = ``fc_gate``, up_proj = ``fc1``, down_proj = ``fc2``. Up and down keep metaseq's
names and so every rule that holds for them (column / row split, Eq. 2-3 widening, the
``preserve`` zeros of a cross block's fc2); the gate is split and widened like fc1."""

_FFN: tuple[Entry, ...] = (
    *_linear(FC_GATE, "column", "column", needs=("gated",)),
    *_linear(FC1, "column", "column"),
    *_linear(FC2, "row", "replicated"),
    *_norm("final_layer_norm"),
)

LAYER: tuple[Entry, ...] = (
    *_linear(QKV, "qkv", "qkv", needs=("fused_qkv",)),
    *_linear(Q_PROJ, "column", "column", needs=("separate_qkv",), bias="qkv_bias"),
    *_linear(K_PROJ, "column", "column", needs=("separate_qkv",), bias="qkv_bias"),
    *_linear(V_PROJ, "column", "column", needs=("separate_qkv",), bias="qkv_bias"),
    *_linear("self_attn.out_proj", "row", "replicated"),
    *_linear(Q_NORM, "column", "column", needs=("qk_norm",), bias="qk_norm"),
    *_linear(K_NORM, "column", "column", needs=("qk_norm",), bias="qk_norm"),
    *_norm("self_attn_layer_norm"),
    *_FFN,
)
"""A decoder layer: self-attention (fused [K; V; Q] or separate q/k/v; Chameleon's per-head q/k
norms), its norm, the FFN (gated or not) and its norm. The norms keep metaseq's ``*layer_norm``
names whatever their kind."""

CROSS: tuple[Entry, ...] = (
    *_linear("cross_attn.q_proj", "column", "column", bias="qkv_bias"),
    *_linear("cross_attn.k_proj", "column", "column", bias="qkv_bias"),
    *_linear("cross_attn.v_proj", "column", "column", bias="qkv_bias"),
    *_linear("cross_attn.out_proj", "row", "replicated"),
    *_norm("cross_attn_layer_norm"),
    *_FFN,
)
"""A JAM-Cross cross block: cross-attention (separate q/k/v, the branch's heads, k/v heads and
head width), its norm, its own FFN (the branch's kind)."""

LEGACY_LAYER: tuple[Entry, ...] = LAYER[2:8]
"""Unfused self-attention (``Q_PROJ``, ``K_PROJ``, ``V_PROJ``): also OPT's older metaseq
model-parallel parts, which resharding splits by the same rule."""

CROSS_PRESERVE_ZEROS = ("cross_attn.out_proj.weight", "cross_attn.out_proj.bias", f"{FC2}.weight", f"{FC2}.bias")
"""``cross_init="preserve"``: the cross-block tensors that start at zero, so a block starts as the
identity (its residual branches add nothing) and each branch computes exactly its parent."""

# ---- containers and top-level tensors -----------------------------------------------------------
BRANCHES = ("llm", "img")
"""JAM-Cross's two sides: the LLM branch and the image-text branch (the image parent's)."""
KEY_SUFFIX = {"llm": "llm", "img": "cm3"}
"""How each side is spelled inside key names: the image side is ``cm3`` there, the JAM authors'
prototype's name, kept so that checkpoints interchange (``decoder.layers_cm3.*``)."""

LAYERS = "decoder.layers"
BRANCH_LAYERS = {side: f"decoder.layers_{KEY_SUFFIX[side]}" for side in BRANCHES}
CROSS_LAYERS = {side: f"decoder.x_attn_layers_{KEY_SUFFIX[side]}" for side in BRANCHES}
"""``CROSS_LAYERS[side]``: queries from ``side``, keys and values from the other branch."""
CONTAINERS = (LAYERS, *BRANCH_LAYERS.values(), *CROSS_LAYERS.values())

VERSION = "decoder.version"
VERSION_VALUE = 3.0
"""The value of metaseq's ``decoder.version`` buffer."""
_VERSION_LEAF = VERSION.rsplit(".", 1)[1]
EMBED = "decoder.embed_tokens.weight"
POSITIONS = "decoder.embed_positions.weight"
BRANCH_POSITIONS = {side: f"decoder.embed_positions_{KEY_SUFFIX[side]}.weight" for side in BRANCHES}
BRANCH_EMBED = {side: f"decoder.embed_tokens_{KEY_SUFFIX[side]}.weight" for side in BRANCHES}
"""Asymmetric JAM-Cross with branches of different widths: each branch's own input embedding
(V, E_side), vocab-parallel like ``EMBED``; the output projection is then a tensor of its own."""
FINAL_NORM = _norm("decoder.layer_norm")
OUTPUT = "decoder.output_projection.weight"
TIED = (EMBED, OUTPUT)
"""(embedding, output projection): one tensor unless the config unties them
(``tie_embeddings=False``: Llama-2/3, Qwen2-7B) or JAM-Cross's branches differ in width."""
FEATURE_PROJECTION = "decoder.feature_projection.weight"
"""JAM-Cross: (E, 2E) on ``cat([x_img, x_llm])`` (asymmetric: (W, E_img + E_llm), W the output
width); small next to the branches, so replicated."""

TOP: dict[str, Entry] = {e.name: e for e in (
    Entry(VERSION), Entry(EMBED, "vocab"), *(Entry(e, "vocab") for e in BRANCH_EMBED.values()),
    Entry(POSITIONS, needs=("learned_positions",)),
    *(Entry(p, needs=("learned_positions",)) for p in BRANCH_POSITIONS.values()),
    Entry(FEATURE_PROJECTION), *FINAL_NORM, Entry(OUTPUT, "vocab"),
)}
"""Every top-level tensor of any model here."""

_IN_BLOCK: dict[str, Entry] = {}
for _e in LAYER + CROSS + LEGACY_LAYER:
    if _IN_BLOCK.setdefault(_e.name, _e) != _e:  # fc1, fc2, final_layer_norm are in both blocks
        raise AssertionError(f"{_e.name}: two rules in the key schema")
_BLOCK_KEY = re.compile(r"^(" + "|".join(re.escape(c) for c in CONTAINERS) + r")\.(\d+)\.(.+)$")


# ---- one model's keys ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    """``count`` blocks of ``entries`` in ``container`` (keys ``{container}.{i}.{name}``)."""

    container: str
    entries: tuple[Entry, ...]
    count: int


Item = Union[Entry, Block]


def structure(cfg) -> list[Item]:
    """The tensors of the model ``cfg`` describes (``DecoderConfig`` / ``CrossConfig``), in
    state-dict order."""
    from .config import CrossConfig

    embed: list[Item] = [TOP[EMBED]]
    if isinstance(cfg, CrossConfig):
        p, n = cfg.parent, len(cfg.cross_after)
        if not cfg.shared_embedding:  # branches of different widths: one input embedding each
            embed = [TOP[BRANCH_EMBED[s]] for s in BRANCHES]
        body: list[tuple[Item, object]] = [(TOP[BRANCH_POSITIONS[s]], cfg.branch(s)) for s in BRANCHES]
        body += [(Block(BRANCH_LAYERS[s], LAYER, cfg.branch(s).layers), cfg.branch(s)) for s in BRANCHES]
        body += [(Block(CROSS_LAYERS[s], CROSS, n), cfg.branch(s)) for s in BRANCHES]
        body += [(TOP[FEATURE_PROJECTION], p)]
    else:
        p = cfg
        body = [(TOP[POSITIONS], p), (Block(LAYERS, LAYER, p.layers), p)]
    items = [(TOP[VERSION], p), *((e, p) for e in embed), *body, *((e, p) for e in FINAL_NORM), (TOP[OUTPUT], p)]

    def kept(e: Entry, c) -> bool:  # c: the DecoderConfig of the branch holding e
        return all(NEEDS[n](c) for n in e.needs)

    return [Block(i.container, tuple(e for e in i.entries if kept(e, c)), i.count) if isinstance(i, Block) else i
            for i, c in items if isinstance(i, Block) or kept(i, c)]


def templates(cfg) -> list[tuple[str, Rule]]:
    """(key template, rule) of every tensor of ``cfg``: block keys as
    ``"decoder.layers.{i}.self_attn.qkv_proj.weight"``, in state-dict order."""
    out: list[tuple[str, Rule]] = []
    for item in structure(cfg):
        if isinstance(item, Block):
            out += [(f"{item.container}.{{i}}.{e.name}", e.rule) for e in item.entries]
        else:
            out.append((item.name, item.rule))
    return out


def state_keys(cfg) -> list[str]:
    """Every state-dict key of the model ``cfg`` describes, in ``state_dict()`` order."""
    out: list[str] = []
    for item in structure(cfg):
        if isinstance(item, Block):
            out += [f"{item.container}.{i}.{e.name}" for i in range(item.count) for e in item.entries]
        else:
            out.append(item.name)
    return out


# ---- any key -------------------------------------------------------------------------------------
def block_of(key: str) -> tuple[str, int, str] | None:
    """``(container, index, name in the block)`` of a block's key; None for a top-level key."""
    m = _BLOCK_KEY.match(key)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


def is_version(key: str) -> bool:
    """A version counter (``VERSION``, or any ``*.version`` buffer a host left): the one tensor of a
    checkpoint that is not a floating-point parameter."""
    return key == _VERSION_LEAF or key.endswith("." + _VERSION_LEAF)


def rule_for(key: str) -> Rule:
    """The model-parallel rule of a key; a key the schema does not know is replicated."""
    b = block_of(key)
    e = _IN_BLOCK.get(b[2]) if b else TOP.get(key)
    return e.rule if e is not None else "replicated"


def is_cross_new(key: str) -> bool:
    """A JAM-Cross tensor no parent has (cross blocks and the feature projection): fusion starts
    it fresh."""
    b = block_of(key)
    return key == FEATURE_PROJECTION or (b is not None and b[0] in CROSS_LAYERS.values())


def branch_source(key: str) -> tuple[str, str] | None:
    """JAM-Cross key -> (branch, the parent's key it is copied from) for branch layers, position
    tables and (asymmetric) branch embeddings; None for any other key."""
    b = block_of(key)
    for side in BRANCHES:
        if key == BRANCH_POSITIONS[side]:
            return side, POSITIONS
        if key == BRANCH_EMBED[side]:
            return side, EMBED
        if b is not None and b[0] == BRANCH_LAYERS[side]:
            return side, f"{LAYERS}.{b[1]}.{b[2]}"
    return None


def block_indices(keys: Iterable[str], container: str) -> set[int]:
    """The block indices of ``container`` among ``keys``."""
    return {b[1] for b in map(block_of, keys) if b is not None and b[0] == container}


_QK_NORMS = tuple(f"{n}.{kind}" for n in (Q_NORM, K_NORM) for kind in ("weight", "bias"))


def is_qk_norm(key: str) -> bool:
    """A per-head q/k norm's weight or bias (``Q_NORM``, ``K_NORM``)."""
    return key.endswith(_QK_NORMS)


def is_norm(key: str) -> bool:
    """A normalisation's tensor (LayerNorm or RMSNorm: the ``*layer_norm`` names; Chameleon's
    per-head q/k norms)."""
    return "layer_norm" in key or is_qk_norm(key)


def config_of(key: str, cfg):
    """The ``DecoderConfig`` that shapes tensor ``key`` of the model ``cfg``: a JAM-Cross image-side
    block's or position table's is the image branch's, every other key's the parent's (LLM)."""
    from .config import CrossConfig

    if not isinstance(cfg, CrossConfig):
        return cfg
    b = block_of(key)
    img = (BRANCH_LAYERS["img"], CROSS_LAYERS["img"])
    if (b is not None and b[0] in img) or key in (BRANCH_POSITIONS["img"], BRANCH_EMBED["img"]):
        return cfg.img
    return cfg.parent


Init = Literal["normal", "zeros", "ones", "eye_halves"]


def init_rule(key: str, cfg) -> Init:
    """How a fresh tensor ``key`` of the model ``cfg`` starts: ``zeros`` (biases), ``ones``
    (norm weights; ``zeros`` for Gemma's ``rmsnorm_plus_one``, whose scale is 1 + w; Chameleon's
    q/k norms are LayerNorms: ``ones``), ``normal``
    (N(0, init_std): matrices and embeddings); with JAM-Cross's
    ``cross_init="preserve"`` the cross blocks' ``CROSS_PRESERVE_ZEROS`` are ``zeros`` and the
    feature projection is ``eye_halves``, [I/2, I/2] (asymmetric: [P_img/2, P_llm/2], P_s the
    (W, E_s) rectangular identity), so the new parts start as the identity."""
    if key.endswith("bias"):
        return "zeros"
    if is_qk_norm(key):
        return "ones"  # a LayerNorm whatever the block's ``norm``
    if is_norm(key):
        return "zeros" if config_of(key, cfg).norm == "rmsnorm_plus_one" else "ones"
    if getattr(cfg, "cross_init", None) == "preserve" and is_cross_new(key):
        if key == FEATURE_PROJECTION:
            return "eye_halves"
        b = block_of(key)
        if b is not None and b[2] in CROSS_PRESERVE_ZEROS:
            return "zeros"
    return "normal"
