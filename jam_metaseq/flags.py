"""The host flags of a JAM training command, each declared once next to the field it fills (paper
§2.1, §3.1; docs/ARCHITECTURE.md, "Where is ...": one flag, one row).

``MODEL_FLAGS`` is the table of model flags: one ``Flag`` row per flag, with the config field it
fills, its type, its default and its help. Everything that reads or writes model flags derives
from it: ``add_model_args`` (both hosts' argparse), ``config_from_args`` (flags -> config),
``args_from_config`` (config -> the ``cfg["model"]`` a checkpoint stores, in its order),
``command_line_from_config`` (config -> the flags of a training command: ``jam run``'s,
``jam-launch``'s), ``host_arch``, and ``saved_fields`` / ``FLAG_OF`` / ``FIELD_OF`` (config
inference from a saved ``cfg["model"]``). A new config field with a flag is one new row (with
``when_set=True``, configs that leave the field at its default keep their checkpoint bytes).

Flags describe ONE PARENT (``scope="parent"``: a ``DecoderConfig``, the shape both parents share;
JAM-Width: half the widened model); the arch's family derives the model (``jam_uniform`` = the
parent's shape, Eq. 1; ``jam_width`` = ``width_of(parent)``, Eq. 2-3; ``jam_cross`` =
``cross_of(parent, cross_every)``, Eq. 4-5). ``scope="cross"`` rows fill ``CrossConfig`` fields;
``scope="image"`` rows the image branch of a JAM-Cross between parents of different sizes (unset:
the LLM's shape); ``scope="always"`` rows are switches metaseq's ``model_parallel_transformer_lm``
reads that every JAM model has on. Boolean flags default to ``None`` so that an arch can tell "not
given" from "given".

The ``cm3_multimodal`` task's and the ``cm3`` criterion's flags are here too (``add_task_args``,
``add_criterion_args``, ``saved_cfg_groups``): every flag of ours a host parses, host-free
(argparse only), so the checkpoint tools can write what the hosts read without importing a host.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Mapping

from jam_metaseq.inputs import NON_NEGATIVE_FLOAT, POSITIVE_FLOAT, RATE  # issue 27 §4: finite, in range at parse time
from jam_metaseq.models.config import (
    ACTIVATIONS, ARCH_CROSS, ARCH_UNIFORM, ARCH_WIDTH, CHECKPOINT_KEY, MLPS, NORMS, POSITION_KINDS, QK_NORMS,
    QKV_LAYOUTS, CrossConfig, DecoderConfig, ModelConfig, config_from_dict, cross_of, normalize_rope_scaling,
    parent_of_width, uniform_of, width_of,
)
from jam_metaseq.vocab import check_embedding

FAMILIES = (ARCH_UNIFORM, ARCH_WIDTH, ARCH_CROSS)
"""The JAM families a host registers as archs (``--arch jam_cross`` ...)."""
SCOPES = ("parent", "always", "cross", "image")


@dataclass(frozen=True)
class Flag:
    """One model flag and the config field it fills."""

    dest: str
    """argparse dest, and the name a checkpoint's ``cfg["model"]`` stores the value under."""
    field: str
    """The config field it fills in its ``scope`` (``always`` rows: the feature that is always on)."""
    scope: str
    """``parent`` (``DecoderConfig`` of one parent), ``always`` (a switch every JAM model has on),
    ``cross`` (a ``CrossConfig`` field) or ``image`` (the image branch's ``DecoderConfig``)."""
    type: Any = None
    """argparse type (int, float, str); None = a switch (``store_true``)."""
    help: str = ""
    """``--help`` text."""
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    default: Any = None
    """The value when neither the command line nor the arch's size preset gives one (None: the
    preset's, or unset)."""
    negated: bool = False
    """A switch that is on when the field is False (metaseq's ``--disable-*``)."""
    echo: bool = False
    """A copy metaseq's own models read that no config reads back (stored, never on our command line)."""
    cli: bool = True
    """Defined by ``add_model_args`` (False: the host sets it, e.g. the image range from its dictionary)."""
    when_set: bool = False
    """Stored in ``cfg["model"]`` and put on command lines only when the config's field is not at its
    default: for a field added after checkpoints were first written, so every config that does not
    use it keeps its checkpoint bytes (tests/_ckpt_golden.py). Left unset, the field takes its
    config default."""

    @property
    def option(self) -> str:
        """The command-line spelling: ``--decoder-embed-dim``."""
        return "--" + self.dest.replace("_", "-")

    def to_value(self, field_value: Any) -> Any:
        """The flag's value for a field value."""
        return (not field_value) if self.negated else field_value

    def to_field(self, flag_value: Any) -> Any:
        """The field's value for a flag value."""
        return (not bool(flag_value)) if self.negated else flag_value


def json_object(text: str) -> dict[str, Any]:
    """argparse type of a flag whose value is a JSON object (``--rope-scaling``)."""
    try:
        value = json.loads(text) if isinstance(text, str) else text
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    try:
        return normalize_rope_scaling(value) or {"rope_type": "default"}
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# In the order checkpoints store them (``args_from_config``): changing the order changes the
# bytes of every checkpoint ``jam-ckpt`` writes. ``dest`` strings are literals (interned), like the
# config's field names, which keeps those bytes as they are.
MODEL_FLAGS: tuple[Flag, ...] = (
    Flag("decoder_embed_dim", "embed_dim", "parent", int, "hidden size of each parent (JAM-Width doubles it)", "E"),
    Flag("decoder_ffn_embed_dim", "ffn_dim", "parent", int, "FFN inner size of each parent", "F"),
    Flag("decoder_layers", "layers", "parent", int, "layers of each parent / branch", "L"),
    Flag("decoder_attention_heads", "heads", "parent", int, "attention heads of each parent", "H"),
    Flag("decoder_input_dim", "embed_dim", "parent", int, echo=True),
    Flag("decoder_output_dim", "embed_dim", "parent", int, echo=True),
    Flag("max_target_positions", "max_positions", "parent", int, "longest sequence (learned positions)", "T"),
    Flag("tokens_per_sample", "max_positions", "parent", int, echo=True),
    Flag("activation_fn", "activation", "parent", str,
         "FFN activation (on the gate of a gated MLP); gelu_tanh is HF's gelu_pytorch_tanh (Gemma)",
         choices=ACTIVATIONS),
    Flag("dropout", "dropout", "parent", RATE, "residual/embedding dropout", "P"),
    Flag("attention_dropout", "attention_dropout", "parent", RATE, "attention-probability dropout", "P"),
    Flag("disable_bias", "bias", "parent", help="no biases in projections (CM3leon)", negated=True),
    Flag("disable_affine_ln", "affine_ln", "parent", help="LayerNorm without weight/bias (CM3leon)", negated=True),
    Flag("no_scale_embedding", "scale_embedding", "parent", help="do not scale embeddings by sqrt(E)", negated=True),
    # The Llama family (Llama, Qwen2, Gemma: issue 23). Stored only when not at the OPT default
    # (when_set), so OPT/CM3leon checkpoints keep their bytes; a family's arch (jam_cross_gemma_7b,
    # jam_width_llama_tiny ...) fills them from its preset, a starting checkpoint's stored config must agree.
    Flag("decoder_norm", "norm", "parent", str, "normalisation: layernorm (OPT), rmsnorm (Llama, Qwen2) or "
         "rmsnorm_plus_one (Gemma: (1 + w) * x / rms(x))", choices=NORMS, when_set=True),
    Flag("ln_eps", "ln_eps", "parent", POSITIVE_FLOAT, "norm epsilon (HF rms_norm_eps)", "EPS", when_set=True),
    Flag("decoder_positions", "positions", "parent", str,
         "learned: metaseq's position table; rotary: RoPE on q and k (HF's half-split layout)",
         choices=POSITION_KINDS, when_set=True),
    Flag("rope_theta", "rope_theta", "parent", POSITIVE_FLOAT, "rotary base (HF rope_theta)", "THETA", when_set=True),
    Flag("rope_scaling", "rope_scaling", "parent", json_object,
         "rotary frequency scaling as JSON: {\"rope_type\": \"linear\", \"factor\": F} or {\"rope_type\": "
         "\"llama3\", \"factor\", \"low_freq_factor\", \"high_freq_factor\", \"original_max_position_embeddings\"}",
         "JSON", when_set=True),
    Flag("decoder_mlp", "mlp", "parent", str, "plain: fc2(act(fc1(x))); gated: fc2(act(fc_gate(x)) * fc1(x)) (Llama)",
         choices=MLPS, when_set=True),
    Flag("decoder_kv_heads", "kv_heads", "parent", int,
         "key/value heads of grouped-query attention (HF num_key_value_heads; default: the attention heads)", "G",
         when_set=True),
    Flag("decoder_head_dim", "attn_head_dim", "parent", int,
         "width of one attention head when it is not E / heads (HF head_dim; Gemma-7B: 256)", "D", when_set=True),
    Flag("decoder_qkv", "qkv", "parent", str,
         "fused: metaseq's one qkv_proj ([K; V; Q]); separate: q_proj, k_proj, v_proj (the Llama family)",
         choices=QKV_LAYOUTS, when_set=True),
    Flag("qkv_bias", "qkv_bias", "parent", help="biases on q/k/v even with --disable-bias (Qwen2)", when_set=True),
    Flag("untie_embeddings", "tie_embeddings", "parent",
         help="an output projection of its own, not the token embedding (Llama-2/3, Qwen2-7B)", negated=True,
         when_set=True),
    Flag("embed_scale_in_dtype", "embed_scale_in_dtype", "parent",
         help="round the sqrt(E) embedding factor to the model's dtype first (HF Gemma)", when_set=True),
    # Chameleon's block (issue 24): per-head q/k LayerNorms, and the 30B model's norms after the sublayers.
    Flag("decoder_qk_norm", "qk_norm", "parent", str,
         "per-head query/key norm after the projections: none, or layernorm_per_head (Chameleon)",
         choices=QK_NORMS, when_set=True),
    Flag("decoder_swin_norm", "swin_norm", "parent",
         help="norms after attention and FFN, inside the residual (Chameleon-30B)", when_set=True),
    Flag("decoder_learned_pos", "learned_positions", "always",
         help="learned positions (always on; accepted for metaseq compatibility)"),
    Flag("share_decoder_input_output_embed", "tied_embeddings", "always",
         help="tie input and output embeddings (always on; accepted for metaseq compatibility)"),
    Flag("decoder_normalize_before", "pre_layernorm", "always", cli=False),
    Flag("cross_every", "cross_every", "cross", int,
         "JAM-Cross: a cross-attention block pair after every K-th layer; 0 = none (Table 4)", "K", default=2),
    Flag("cross_init", "cross_init", "cross", str,
         "JAM-Cross: how new parameters start when the model is built from scratch",
         choices=("paper", "preserve"), default="paper"),
    Flag("image_vocab_start", "image_vocab_start", "cross", int, cli=False),
    Flag("image_vocab_end", "image_vocab_end", "cross", int, cli=False),
    Flag("img_embed_dim", "embed_dim", "image", int,
         "JAM-Cross between parents of different sizes: hidden size of the image branch (default: the LLM's)", "E"),
    Flag("img_ffn_embed_dim", "ffn_dim", "image", int, "JAM-Cross: FFN inner size of the image branch", "F"),
    Flag("img_layers", "layers", "image", int,
         "JAM-Cross: layers of the image branch (cross pairs aligned by proportional depth)", "L"),
    Flag("img_attention_heads", "heads", "image", int, "JAM-Cross: attention heads of the image branch", "H"),
    Flag("img_kv_heads", "kv_heads", "image", int, "JAM-Cross: key/value heads of the image branch (default: the "
         "LLM's, or, with --img-attention-heads, as many as the image branch's heads)", "G", when_set=True),
    Flag("img_head_dim", "attn_head_dim", "image", int, "JAM-Cross: attention head width of the image branch "
         "(default: the LLM's, or, with --img-embed-dim or --img-attention-heads, its width / heads)", "D",
         when_set=True),
    Flag("img_qk_norm", "qk_norm", "image", str,
         "JAM-Cross between parents of two families: the image branch's q/k norm (a Chameleon image parent "
         "beside a Llama LLM: layernorm_per_head)", choices=QK_NORMS, when_set=True),
    Flag("img_swin_norm", "swin_norm", "image", help="JAM-Cross: the image branch has Chameleon-30B's swin norms",
         when_set=True),
)

FLAGS_BY_DEST: dict[str, Flag] = {f.dest: f for f in MODEL_FLAGS}
FIELD_OF: dict[str, tuple[str, str]] = {f.dest: (f.scope, f.field) for f in MODEL_FLAGS}
"""Flag dest -> (scope, config field), for config inference from a saved ``cfg["model"]``."""
FLAG_OF: dict[str, dict[str, str]] = {s: {f.field: f.dest for f in MODEL_FLAGS if f.scope == s and not f.echo}
                                      for s in SCOPES}
"""scope -> config field -> the flag dest that fills it (echoes left out)."""


_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(DecoderConfig)
                             if f.default is not dataclasses.MISSING}
"""``DecoderConfig``'s field defaults (what a ``when_set`` flag left out means)."""


def field_default(field: str) -> Any:
    """``DecoderConfig``'s default of ``field`` (what a ``when_set`` flag left unset means)."""
    return _DEFAULTS.get(field)


def rows(scope: str, *, echo: bool = False) -> tuple[Flag, ...]:
    """The rows of ``scope`` (echoes only with ``echo``)."""
    if scope not in SCOPES:
        raise ValueError(f"unknown flag scope {scope!r}; expected one of {SCOPES}")
    return tuple(f for f in MODEL_FLAGS if f.scope == scope and (echo or not f.echo))


def add_model_args(parser: argparse.ArgumentParser | Any) -> None:
    """The JAM model flags (defaults None: the arch fills what is not given)."""
    for f in MODEL_FLAGS:
        if not f.cli or f.echo:
            continue
        if f.type is None:
            parser.add_argument(f.option, action="store_true", default=None, help=f.help)
        else:
            kw: dict[str, Any] = {"type": f.type, "help": f.help}
            if f.choices:
                kw["choices"] = f.choices
            if f.metavar:
                kw["metavar"] = f.metavar
            parser.add_argument(f.option, **kw)


def saved_fields(args: Any, scope: str) -> dict[str, Any]:
    """The config fields of ``scope`` that saved model args hold (an ``argparse.Namespace`` or a
    mapping, e.g. a checkpoint's ``cfg["model"]``): ``{field: value}`` for every flag of the scope
    that is set (not None), negated switches turned back. Echoes are left out."""
    get = args.get if isinstance(args, Mapping) else (lambda k: getattr(args, k, None))
    out: dict[str, Any] = {}
    for f in rows(scope):
        v = get(f.dest)
        if v is not None:
            out[f.field] = f.to_field(v)
    return out


def config_from_args(args: argparse.Namespace, *, vocab_size: int, padding_idx: int = 1,
                     image_range: tuple[int, int] = (-1, -1)) -> ModelConfig:
    """Build the model config from filled args (after the host's arch function,
    ``hosts.args.apply_arch_defaults``, set ``jam_family`` and every flag the user did not give).

    A stored ``args.jam_config`` (a checkpoint's own args) wins over the flags: it is what the
    weights were trained with.
    """
    stored = getattr(args, CHECKPOINT_KEY, None)
    if stored:
        cfg = config_from_dict(dict(stored))
        check_embedding(vocab_size, cfg.vocab_size, what="checkpoint")  # the dictionary: the manifest's ids
        return cfg
    family = getattr(args, "jam_family", None)
    if family not in FAMILIES:
        raise ValueError(f"args carry no JAM family (got {family!r}); was the arch function applied?")
    if not getattr(args, "share_decoder_input_output_embed", True):
        raise ValueError("JAM models always tie input and output embeddings")
    missing = [f.option for f in rows("parent") if not f.when_set and getattr(args, f.dest, None) is None]
    if missing:
        raise ValueError(f"model flags not set: {', '.join(missing)}")
    parent = DecoderConfig(vocab_size=vocab_size, padding_idx=padding_idx, **saved_fields(args, "parent"))
    image = saved_fields(args, "image")
    if image and family != ARCH_CROSS:
        given = next(f.option for f in rows("image") if f.field in image)
        raise ValueError(f"{given}: the image-branch shape flags (--img-*) are JAM-Cross flags; the arch is {family}")
    if family == ARCH_UNIFORM:
        return uniform_of(parent)
    if family == ARCH_WIDTH:
        return width_of(parent)
    if image:  # the image branch's own heads / width: its grouping and head width are its own too
        image = {**({"kv_heads": None} if "heads" in image else {}),
                 **({"attn_head_dim": None} if "heads" in image or "embed_dim" in image else {}), **image}
    return cross_of(parent, int(args.cross_every), cross_init=args.cross_init,
                    image_vocab_start=image_range[0], image_vocab_end=image_range[1],
                    image_parent=dataclasses.replace(parent, **image) if image else None)


def host_arch(cfg: ModelConfig) -> str:
    """The ``--arch`` family of ``cfg``: ``jam_cross`` / ``jam_width`` / ``jam_uniform``, or
    ``transformer_lm`` for a plain parent decoder."""
    if isinstance(cfg, CrossConfig):
        return ARCH_CROSS
    if not isinstance(cfg, DecoderConfig):
        raise TypeError(f"not a model config: {type(cfg).__name__}")
    # the module's own (interned) names, not the config's copy: pickled into checkpoints, equal
    # strings that are one object are stored once, so the object decides the file's bytes
    return next((fam for fam in FAMILIES if fam == cfg.arch), "transformer_lm")


def _one_parent(cfg: ModelConfig) -> DecoderConfig:
    """The parent shape whose flags rebuild ``cfg`` (JAM-Width: ``parent_of_width``, k/v heads halved too)."""
    if isinstance(cfg, CrossConfig):
        return cfg.parent
    if host_arch(cfg) == ARCH_WIDTH:
        return parent_of_width(cfg)
    return cfg


def args_from_config(cfg: ModelConfig) -> dict[str, Any]:
    """Inverse of ``config_from_args``: every model flag (dest names) of ``cfg``, in the order
    checkpoints store them (``MODEL_FLAGS``'s). The flags describe one parent (JAM-Width: half
    the widened dims); ``jam_family`` is the family that rebuilds ``cfg`` (a plain parent:
    ``jam_uniform``, whose model is the parent's); JAM-Cross adds its ``cross`` rows, and its
    ``image`` rows only when the branches differ."""
    arch = host_arch(cfg)
    parent = _one_parent(cfg)
    out: dict[str, Any] = {f.dest: f.to_value(getattr(parent, f.field)) for f in rows("parent", echo=True)
                           if not (f.when_set and getattr(parent, f.field) == _DEFAULTS.get(f.field))}
    out.update({f.dest: True for f in rows("always")})
    out["jam_family"] = arch if arch in FAMILIES else ARCH_UNIFORM
    if isinstance(cfg, CrossConfig):
        out.update({f.dest: getattr(cfg, f.field) for f in rows("cross")})
        if not cfg.symmetric:
            out.update({f.dest: getattr(cfg.img, f.field) for f in rows("image")
                        if not (f.when_set and getattr(cfg.img, f.field) == _DEFAULTS.get(f.field))})
    return out


def cross_args(args: dict[str, Any]) -> dict[str, Any]:
    """Pop and return the ``cross`` rows of ``args_from_config``'s dict (checkpoints store them
    last, after the host's own fields)."""
    return {f.dest: args.pop(f.dest) for f in rows("cross") if f.dest in args}


def command_line_from_config(cfg: ModelConfig) -> list[str]:
    """The model flags of a training command that rebuilds ``cfg`` (``args_from_config`` as
    ``--flag value`` words): only the flags ``add_model_args`` defines, so the echoes a checkpoint
    stores for metaseq's own models (``decoder_input_dim``, ``tokens_per_sample`` ...), the
    switches metaseq needs and ``jam_family`` (the arch says it) are left out. Each flag once."""
    words: list[str] = []
    for dest, value in args_from_config(cfg).items():
        f = FLAGS_BY_DEST.get(dest)
        if f is None or not f.cli or f.echo:
            continue
        if f.type is None:
            words += [f.option] if value else []
        else:
            words += [f.option, json.dumps(value, sort_keys=True) if isinstance(value, dict) else str(value)]
    return words


# ---- the cm3_multimodal task and the cm3 criterion ------------------------------------------------
TASK_NAME = "cm3_multimodal"
"""The task's name in both hosts' registries (``--task``)."""
CRITERION_NAME = "cm3"
"""The criterion's name in both hosts' registries (``--criterion``)."""


def add_task_args(parser: Any) -> None:
    """The cm3_multimodal task flags (``jam_metaseq.task.options.TaskOptions`` fields)."""
    a = parser.add_argument
    a("data", help="data directory: DATA/{split}/{source}.json binarized sources (+ optional vocab.json)")
    a("--tokens-per-sample", type=int, default=2048, help="model input length (default %(default)s)")
    a("--mixture", default=None,
      help="training source weights NAME=W,NAME=W (token-balanced; default: all sources equally)")
    a("--cm3-mode", default="poisson", choices=("poisson", "fixed", "fim"), help="CM3 span-count rule")
    a("--cm3-lambda", type=NON_NEGATIVE_FLOAT, default=1.0, help="Poisson rate of the number of CM3 spans")
    a("--cm3-min-spans", type=int, default=0, help="lower clamp of the span count (0 allows plain LM)")
    a("--cm3-max-spans", type=int, default=None, help="upper clamp (default: the vocabulary's sentinels)")
    a("--cm3-cross-documents", action="store_true", help="let spans cross <eos> inside a packed block")
    a("--cm3-on-valid", action="store_true", help="CM3-transform validation items too")
    a("--instruction", action="store_true",
      help="instruction mode: loss only on tokens the data's loss mask keeps (responses)")
    a("--epoch-items", type=int, default=0, help="training items per epoch (0 = all blocks)")
    a("--retrieval-bank", default=None,
      help="memory bank (jam-retrieval build) whose documents are prefixed to items; a source's blocks "
           "get neighbours from DATA/{split}/{source}.neighbours.npy (jam-retrieval neighbours BANK "
           "--dataset DATA/{split}/{source}); sources without one get no prefix")
    a("--retrieval-k", type=int, default=2, help="retrieved documents per item at most (default %(default)s)")
    a("--retrieval-weight", type=NON_NEGATIVE_FLOAT, default=0.0,
      help="loss weight of retrieved prefix tokens (RA-CM3 used 0.1; default %(default)s)")


def add_criterion_args(parser: Any) -> None:
    """The cm3 criterion flags."""
    parser.add_argument("--sentinel-weight", type=NON_NEGATIVE_FLOAT, default=1.0,
                        help="loss weight of predicting CM3 sentinels (CM3 used 0; default %(default)s)")


def saved_cfg_groups(*, seed: int = 1) -> dict[str, Any]:
    """The ``cfg`` groups besides ``model`` that a host's evaluation CLI (``metaseq-validate`` /
    ``fairseq-validate --path``) rebuilds the task and criterion from, for checkpoints written
    outside a trainer (``jam-ckpt``): ``task`` and ``criterion`` Namespaces holding every
    ``cm3_multimodal`` / ``cm3`` flag at its default (the hosts set DATA and the flags given on the
    command line over them), and an ``optimization`` group like a trainer's (no updates yet)."""
    p = argparse.ArgumentParser(add_help=False)
    add_task_args(p)
    add_criterion_args(p)
    flags = vars(p.parse_args([""]))  # DATA: the evaluation CLI's positional argument replaces it
    names = {"task": TASK_NAME, "criterion": CRITERION_NAME, "seed": seed}
    return {
        "task": argparse.Namespace(**names, **flags, _name=TASK_NAME),
        "criterion": argparse.Namespace(**names, **flags, _name=CRITERION_NAME),
        "optimization": {"_name": None, "max_epoch": 0, "max_update": 0, "clip_norm": 0.0,
                         "update_freq": [1], "lr": [0.0]},
    }


__all__ = [
    "CRITERION_NAME", "FAMILIES", "FIELD_OF", "FLAGS_BY_DEST", "FLAG_OF", "Flag", "MODEL_FLAGS", "SCOPES",
    "TASK_NAME", "add_criterion_args", "add_model_args", "add_task_args", "args_from_config",
    "command_line_from_config", "config_from_args", "cross_args", "field_default", "host_arch", "json_object",
    "rows", "saved_cfg_groups",
    "saved_fields",
]
