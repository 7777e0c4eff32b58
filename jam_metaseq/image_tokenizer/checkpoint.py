"""Read and write VQGAN tokenizer checkpoints in the taming-transformers layout (paper §3.1).

Users bring their own tokenizer: the public Chameleon tokenizer ships ``vqgan.ckpt`` (a Lightning
checkpoint whose ``state_dict`` holds taming ``VQModel`` keys plus the training loss's
``loss.*`` discriminator/LPIPS weights) and ``vqgan.yaml`` (``model.params`` = ``embed_dim``,
``n_embed``, ``ddconfig``). Our model's module names are taming's, so the key map is the identity
plus a list of prefixes to drop; anything else that does not match is an error that lists the
missing, unexpected and mis-shaped keys. No hub downloads: paths only.

The tiny tokenizer this package trains is saved the same way (``DIR/vqgan.ckpt`` +
``DIR/vqgan.yaml``), with our extra fields (GroupNorm groups) under the YAML's ``jam_metaseq`` key,
so one reader serves both, and ``save_taming_checkpoint`` is the inverse of ``load_vqgan``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

from jam_metaseq.errors import JamError
from jam_metaseq.inputs import loads_yaml

from .config import VQGANConfig
from .model import VQGAN

CKPT_NAME = "vqgan.ckpt"
YAML_NAME = "vqgan.yaml"
# Checkpoint keys that are training-only state of the taming Lightning module, never model weights.
IGNORED_PREFIXES: tuple[str, ...] = ("loss.",)
# Fields outside taming's model.params that we store under the YAML's ``jam_metaseq`` key.
_EXTRA_FIELDS = ("norm_groups", "norm_eps", "commitment_beta")
_TAMING_TARGET = "taming.models.vqgan.VQModel"


class CheckpointMismatchError(JamError, ValueError):
    """A state dict does not fit the model built from its config."""


def _yaml():
    try:
        import yaml
    except ImportError as e:  # pragma: no cover - PyYAML ships with the project's dependencies
        raise ImportError("reading/writing vqgan.yaml needs PyYAML (pip install pyyaml)") from e
    return yaml


def _atomic_write(path: Path, write: Any) -> None:
    """Write via ``write(tmp_path)`` into a temp file beside ``path``, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def resolve_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """A directory, a ``.ckpt``/``.pt`` or a ``.yaml`` path -> (checkpoint, yaml) paths.

    A directory holds ``vqgan.ckpt`` + ``vqgan.yaml``; a checkpoint file pairs with the YAML of the
    same stem, else with ``vqgan.yaml`` beside it (and the other way round).
    """
    p = Path(path)
    if p.is_dir():
        ckpt, yml = p / CKPT_NAME, p / YAML_NAME
    elif p.suffix in (".yaml", ".yml"):
        yml = p
        ckpt = next((c for c in (p.with_suffix(".ckpt"), p.with_suffix(".pt"), p.parent / CKPT_NAME) if c.exists()),
                    p.with_suffix(".ckpt"))
    else:
        ckpt = p
        yml = next((y for y in (p.with_suffix(".yaml"), p.with_suffix(".yml"), p.parent / YAML_NAME) if y.exists()),
                   p.with_suffix(".yaml"))
    for f in (ckpt, yml):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: no such tokenizer file (given {path})")
    return ckpt, yml


def read_config(yaml_path: str | os.PathLike) -> VQGANConfig:
    """``vqgan.yaml`` (taming ``model.params``, or the params mapping itself) -> ``VQGANConfig``."""
    yaml_path = Path(yaml_path)
    _yaml()  # PyYAML's install advice
    try:
        text = yaml_path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{yaml_path}: not UTF-8 text (byte offset {e.start})") from None
    doc = loads_yaml(text, where=str(yaml_path))  # nesting and alias expansion bounded
    if not isinstance(doc, dict):
        raise ValueError(f"{yaml_path}: expected a YAML mapping")
    params = doc.get("model", {}).get("params", doc) if isinstance(doc.get("model"), dict) else doc
    extra = doc.get("jam_metaseq") or {}
    overrides = {k: extra[k] for k in _EXTRA_FIELDS if k in extra}
    try:
        return VQGANConfig.from_taming_params(params, **overrides)
    except ValueError as e:
        raise ValueError(f"{yaml_path}: {e}") from None


def config_yaml(cfg: VQGANConfig) -> dict[str, Any]:
    """The YAML document ``save_taming_checkpoint`` writes (inverse of ``read_config``)."""
    return {
        "model": {"target": _TAMING_TARGET, "params": cfg.to_taming_params()},
        "jam_metaseq": {k: getattr(cfg, k) for k in _EXTRA_FIELDS},
    }


def read_state_dict(ckpt_path: str | os.PathLike, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a taming/Lightning checkpoint (its ``state_dict``) or of a bare state dict.

    Loads through the checkpoint tools' allow-listed loader (``safe_torch_load``) unless
    ``trust_pickle``: Lightning checkpoints can pickle arbitrary objects (hyper-parameters), which
    only a trusted file may execute. Truncated or foreign files are refused naming the file.
    """
    from checkpoints_tools.safe_load import safe_torch_load

    ckpt_path = Path(ckpt_path)
    obj = safe_torch_load(ckpt_path, trust_pickle=trust_pickle)
    sd = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{ckpt_path}: not a state dict (nor a checkpoint with a 'state_dict' of tensors)")
    return dict(sd)


def _summarise(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(
    model: torch.nn.Module,
    sd: Mapping[str, torch.Tensor],
    *,
    ignore_prefixes: tuple[str, ...] = IGNORED_PREFIXES,
    source: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """``sd`` without ignored keys, after checking it has exactly the model's keys and shapes.

    Raises ``CheckpointMismatchError`` listing missing, unexpected and mis-shaped keys.
    """
    kept = {k: v for k, v in sd.items() if not k.startswith(ignore_prefixes)}
    want = model.state_dict()
    missing = sorted(set(want) - set(kept))
    unexpected = sorted(set(kept) - set(want))
    misshaped = sorted(
        f"{k} {tuple(kept[k].shape)} != {tuple(want[k].shape)}"
        for k in set(want) & set(kept)
        if tuple(kept[k].shape) != tuple(want[k].shape)
    )
    if missing or unexpected or misshaped:
        parts = [f"{source} does not match the tokenizer config"]
        if missing:
            parts.append(f"missing {len(missing)} keys: {_summarise(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys: {_summarise(unexpected)}")
        if misshaped:
            parts.append(f"{len(misshaped)} shape mismatches: {_summarise(misshaped)}")
        raise CheckpointMismatchError("; ".join(parts))
    return kept


def load_vqgan(
    ckpt_path: str | os.PathLike,
    yaml_path: str | os.PathLike | None = None,
    *,
    trust_pickle: bool = False,
) -> VQGAN:
    """Build the model from the YAML and load the checkpoint's weights strictly (eval mode, CPU)."""
    if yaml_path is None:
        ckpt_path, yaml_path = resolve_paths(ckpt_path)
    cfg = read_config(yaml_path)
    model = VQGAN(cfg)
    sd = check_state_dict(model, read_state_dict(ckpt_path, trust_pickle=trust_pickle), source=str(ckpt_path))
    model.load_state_dict(sd, strict=True)
    return model.eval()


def save_taming_checkpoint(
    model: VQGAN,
    *,
    ckpt_path: str | os.PathLike,
    yaml_path: str | os.PathLike,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write ``{"state_dict": ...}`` (taming keys, CPU tensors) and the matching YAML, atomically.

    ``metadata`` (JSON-like values) is stored beside the state dict, e.g. training steps and seed.
    """
    sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload: dict[str, Any] = {"state_dict": sd}
    if metadata:
        payload["jam_metaseq"] = dict(metadata)
    doc = config_yaml(model.config)
    _atomic_write(Path(ckpt_path), lambda tmp: torch.save(payload, tmp))

    def write_yaml(tmp: str) -> None:
        with open(tmp, "w") as f:
            _yaml().safe_dump(doc, f, sort_keys=False)

    _atomic_write(Path(yaml_path), write_yaml)


def save_dir(model: VQGAN, out_dir: str | os.PathLike, *, metadata: Mapping[str, Any] | None = None) -> Path:
    """Save as ``out_dir/vqgan.ckpt`` + ``out_dir/vqgan.yaml``; returns ``out_dir``."""
    out = Path(out_dir)
    save_taming_checkpoint(model, ckpt_path=out / CKPT_NAME, yaml_path=out / YAML_NAME, metadata=metadata)
    return out


__all__ = [
    "CKPT_NAME",
    "YAML_NAME",
    "IGNORED_PREFIXES",
    "CheckpointMismatchError",
    "resolve_paths",
    "read_config",
    "config_yaml",
    "read_state_dict",
    "check_state_dict",
    "load_vqgan",
    "save_taming_checkpoint",
    "save_dir",
]
