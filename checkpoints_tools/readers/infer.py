"""Which model a checkpoint holds: its stored config (``resolve_config``), else one inferred from
its tensor shapes and the host args it carries (``infer_config``; attention heads and a few
other fields cannot be told from shapes).
"""

from __future__ import annotations

import dataclasses
from argparse import Namespace
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from checkpoints_tools.safe_load import CheckpointError
from jam_metaseq import flags as jam_flags
from jam_metaseq.errors import JamError
from jam_metaseq.inputs import agree, read_json
from jam_metaseq.models import keys
from jam_metaseq.models.config import CHECKPOINT_KEY as CONFIG_KEY
from jam_metaseq.models.config import (
    ARCH_CROSS, CrossConfig, DecoderConfig, ModelConfig, config_from_dict,
)

if TYPE_CHECKING:
    from checkpoints_tools.readers.base import Reader

STORED_FIELDS = ("heads", "activation", "scale_embedding", "dropout", "attention_dropout")
"""The parent's config fields a checkpoint's host args hold that its shapes cannot tell."""


def host_fields(ns: Namespace | None) -> dict[str, Any]:
    """The config fields shapes cannot tell, as a checkpoint's host args (``cfg["model"]`` or
    ``args``) hold them: ``STORED_FIELDS`` of the parent, ``img_heads`` (the image branch's heads,
    asymmetric JAM-Cross) and the JAM-Cross fields, each present only when its flag is set. The one
    place the readers read host flags; their names come from the flag table (``jam_metaseq.flags``)."""
    if ns is None:
        return {}
    parent = jam_flags.saved_fields(ns, "parent")
    out: dict[str, Any] = {fld: v for fld, v in parent.items() if fld in STORED_FIELDS}
    image = jam_flags.saved_fields(ns, "image")
    if "heads" in image:
        out["img_heads"] = image["heads"]
    out.update(jam_flags.saved_fields(ns, "cross"))
    return out


def resolve_config(reader: "Reader", **overrides: Any) -> ModelConfig:
    """``reader``'s model config: stored (its ``jam_config``, a trained checkpoint's task state, the
    jam-ckpt manifest beside it, ``cfg["model"].jam_config``, a ``config.json`` of ours beside it),
    else inferred from its shapes and host args (``infer_config``)."""
    stored = stored_config(reader)
    if stored is not None:
        return check_config(stored, reader, overrides=overrides, claimed_by="its stored config")
    ns = _host_args(reader)
    return check_config(infer_config(reader.shapes(), ns, source=str(reader.path), **overrides), reader,
                        overrides=overrides, claimed_by="its recorded model args")


def _host_args(reader: "Reader") -> Namespace | None:
    ns = None
    cfg_dict = reader.meta.get("cfg")
    if isinstance(cfg_dict, dict):
        ns = cfg_dict.get("model")
    if ns is None:
        ns = reader.meta.get("args")
    if isinstance(ns, dict):
        ns = Namespace(**ns)
    return ns


def stored_config(reader: "Reader") -> ModelConfig | None:
    """The config ``reader``'s checkpoint stores (see ``resolve_config``), None if it stores none."""
    d = reader.meta.get(CONFIG_KEY)
    task_state = reader.meta.get("task_state")
    if d is None and isinstance(task_state, dict):
        d = task_state.get(CONFIG_KEY)
    if d is None and reader.path.is_dir() and (reader.path / "manifest.json").is_file():
        d = read_json(reader.path / "manifest.json", what="jam-ckpt manifest", allow_nan=True).get("config")
    if d is not None:
        return config_from_dict(d)
    ns = _host_args(reader)
    stored = getattr(ns, CONFIG_KEY, None) if ns is not None else None
    if stored:
        return config_from_dict(dict(stored))
    beside = _config_beside(reader)
    return None if beside is None else config_from_dict(beside)


def check_config(cfg: ModelConfig, reader: "Reader", *, overrides: Mapping[str, Any], claimed_by: str) -> ModelConfig:
    """What the tensors prove wins (issue 27 §3; ``jam_metaseq.inputs.agree``): ``cfg`` (a stored
    or recorded config, the HF ``config.json``, the GGUF metadata) must have the layers and the
    embedding its tensors have, and ``--heads`` / ``--img-heads`` must equal the heads the
    checkpoint records (``overrides["heads_flag"]``: the flag that gave ``heads``, for the message). Checked from the tensor names and shapes alone, before any work: a config
    claiming 10^9 layers is one line, not a model built layer by layer."""
    source = str(reader.path)
    shapes = reader.shapes()
    branches = [(keys.BRANCH_LAYERS["llm"], cfg.llm, ""), (keys.BRANCH_LAYERS["img"], cfg.img, " (image branch)")] \
        if isinstance(cfg, CrossConfig) else [(keys.LAYERS, cfg, "")]
    for lay, c, label in branches:
        present = 1 + max(keys.block_indices(shapes, lay), default=-1)
        agree(what=f"layers{label}", given=c.layers, given_by=f"{claimed_by}", proven=present,
              proven_by=f"{source}'s tensors")
    if isinstance(cfg, DecoderConfig) and keys.EMBED in shapes:
        rows, width = shapes[keys.EMBED][:2]
        agree(what="embedding rows (vocab_size)", given=cfg.vocab_size, given_by=claimed_by, proven=int(rows),
              proven_by=f"{source}'s {keys.EMBED}")
        agree(what="hidden size (embed_dim)", given=cfg.embed_dim, given_by=claimed_by, proven=int(width),
              proven_by=f"{source}'s {keys.EMBED}")
    heads = {"heads": (cfg.llm if isinstance(cfg, CrossConfig) else cfg).heads,
             "img_heads": (cfg.img if isinstance(cfg, CrossConfig) else cfg).heads}
    for name, flag in (("heads", overrides.get("heads_flag") or "--heads"), ("img_heads", "--img-heads")):
        agree(what="attention heads", given=overrides.get(name), given_by=flag, proven=heads[name],
              proven_by=f"{source} ({claimed_by})")
    return cfg


def _config_beside(reader: "Reader") -> dict[str, Any] | None:
    """A ``config.json`` of ours (``config_to_json``: it names its ``type``) in the checkpoint's
    directory or beside its file; an HF ``config.json`` is not one (``readers.hf`` reads those)."""
    side = (reader.path if reader.path.is_dir() else reader.path.parent) / "config.json"
    if not side.is_file():
        return None
    try:
        d = read_json(side, what="model config", expect=None)
    except (OSError, UnicodeDecodeError, ValueError, JamError) as e:
        raise CheckpointError(f"{side}: not a JSON model config ({getattr(e, 'detail', e)})") from None
    return d if isinstance(d, dict) and d.get("type") in ("DecoderConfig", "CrossConfig") else None


def infer_config(shapes: Mapping[str, Sequence[int]], ns: Namespace | None = None, *,
                 source: str = "checkpoint", **overrides: Any) -> ModelConfig:
    """A config from state-dict shapes plus metaseq/fairseq model args (heads come from args or
    ``overrides``; shapes cannot tell them)."""
    flags = host_fields(ns)
    cross = bool(keys.block_indices(shapes, keys.BRANCH_LAYERS["llm"]))
    lay = keys.BRANCH_LAYERS["llm"] if cross else keys.LAYERS
    emb_key = keys.BRANCH_EMBED["llm"] if cross and keys.BRANCH_EMBED["llm"] in shapes else keys.EMBED
    if emb_key not in shapes:
        raise CheckpointError(f"{source}: no {keys.EMBED}: not a decoder checkpoint")
    vocab, embed = shapes[emb_key]
    layers = 1 + max(keys.block_indices(shapes, lay), default=-1)
    fc1 = shapes.get(f"{lay}.0.{keys.FC1}.weight")
    if fc1 is None:
        raise CheckpointError(f"{source}: no {lay}.0.{keys.FC1}.weight")
    pos_key = keys.BRANCH_POSITIONS["llm"] if cross else keys.POSITIONS
    if cross and pos_key not in shapes:
        pos_key = keys.BRANCH_POSITIONS["img"]
    padding_idx = int(overrides.get("padding_idx", 1))
    heads = flags.get("heads") or overrides.get("heads")  # recorded heads win (check_config: a flag must agree)
    if not heads:
        raise CheckpointError(f"{source}: the number of attention heads is not stored; pass --heads")
    act = overrides.get("activation") or flags.get("activation", "relu")
    parent = DecoderConfig(
        vocab_size=int(vocab), embed_dim=int(embed), ffn_dim=int(fc1[0]), layers=layers, heads=int(heads),
        max_positions=int(shapes[pos_key][0]) - padding_idx - 1 if pos_key in shapes else 2048,
        padding_idx=padding_idx,
        bias=f"{lay}.0.{keys.FC1}.bias" in shapes,
        affine_ln=keys.FINAL_NORM[0].name in shapes,
        activation=act if act in ("relu", "gelu") else "relu",
        scale_embedding=bool(overrides.get("scale_embedding", flags.get("scale_embedding", True))),
        dropout=float(flags.get("dropout", 0.0) or 0.0),
        attention_dropout=float(flags.get("attention_dropout", 0.0) or 0.0),
    )
    if not cross:
        return parent
    # the image branch: its own shape when the parents differed in size (asymmetric JAM-Cross)
    img_lay = keys.BRANCH_LAYERS["img"]
    img_fc1 = shapes.get(f"{img_lay}.0.{keys.FC1}.weight", fc1)
    img_layers = 1 + max(keys.block_indices(shapes, img_lay), default=layers - 1)
    img_shape = {"embed_dim": int(img_fc1[1]), "ffn_dim": int(img_fc1[0]), "layers": img_layers}
    image_parent = None
    img_heads = flags.get("img_heads") or overrides.get("img_heads")
    if any(img_shape[f] != getattr(parent, f) for f in img_shape) or img_heads:
        if not img_heads:  # shapes cannot tell heads, and the LLM's may divide the width by chance
            raise CheckpointError(f"{source}: the image branch ({img_shape['layers']} layers, width "
                                  f"{img_shape['embed_dim']}) differs from the LLM's and its attention heads "
                                  "are not stored (args.img_attention_heads)")
        image_parent = dataclasses.replace(parent, **img_shape, heads=int(img_heads))
    every = overrides.get("cross_every") or flags.get("cross_every")
    if every is None:
        pairs = len(keys.block_indices(shapes, keys.CROSS_LAYERS["llm"]))
        shallow = min(layers, img_layers)
        every = 0 if pairs == 0 else (shallow if pairs == 1 else -(-shallow // pairs))
    return CrossConfig(parent=parent, cross_every=int(every), image_parent=image_parent,
                       image_vocab_start=int(flags.get("image_vocab_start", -1)),
                       image_vocab_end=int(flags.get("image_vocab_end", -1)))


def arch_of(cfg: ModelConfig) -> str:
    """The model's arch name (``jam_cross`` for a ``CrossConfig``, else the config's ``arch``)."""
    return ARCH_CROSS if isinstance(cfg, CrossConfig) else cfg.arch
