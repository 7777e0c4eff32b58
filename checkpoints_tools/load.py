"""Load any checkpoint the tools read into a core model; inspect and verify outputs.

``load_model`` is the one checkpoint loader of the project: the generator, the evaluator, the
lm-eval adapter, ``jam run`` / the quickstart and the hosts' starting-checkpoint check all call it.
It accepts a ``jam-ckpt`` output directory (any layout), a single file, model-parallel parts or
FSDP shards, an HF directory (OPT, Llama, Qwen2, Gemma), or a fairseq/metaseq-trained checkpoint (whose ``cfg["model"]``
carries ``jam_config``), finds the config and vocabulary manifest in or beside it (or takes
given ones), and returns ``(model, cfg, vocab)`` with the weights loaded ``strict=True``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from checkpoints_tools.io.hashed_file import sha256_file
from checkpoints_tools.readers import Reader, arch_of, open_checkpoint
from checkpoints_tools.safe_load import CheckpointError
from jam_metaseq.errors import JamError
from jam_metaseq.inputs import InputError, loads_json, read_json, safe_component
from jam_metaseq.models import keys
from jam_metaseq.models.config import CrossConfig, DecoderConfig, ModelConfig, config_from_dict
from jam_metaseq.vocab import VocabManifest


def _build_empty(cfg: ModelConfig, *, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The model without spending time on random init (meta build, then empty storage of
    ``dtype`` on ``device``; the meta device keeps it storage-free)."""
    from jam_metaseq.models import build_model

    with torch.device("meta"):
        model = build_model(cfg).to(dtype)
    if device.type == "meta":
        return model
    model.to_empty(device=device)
    dec = getattr(model, "decoder", None)
    tied = cfg.tied_output if isinstance(cfg, CrossConfig) else cfg.tie_embeddings
    if tied and dec is not None and hasattr(dec, "output_projection") and hasattr(dec, "embed_tokens"):
        dec.output_projection.weight = dec.embed_tokens.weight  # to_empty unties shared params
    return model


def _key_map(reader: Reader, expected: list[str]) -> dict[str, str]:
    """expected name -> checkpoint name; tolerates a host wrapper prefix (e.g. ``decoder.decoder.``)."""
    names = reader.names()
    if all(n in reader for n in expected):
        return {n: n for n in expected}
    anchor = keys.OUTPUT  # every model has one (tied or, in an asymmetric JAM-Cross, its own)
    hits = [n for n in names if n.endswith(anchor)]
    if len(hits) == 1:
        prefix = hits[0][: -len(anchor)]
        mapped = {n: prefix + n for n in expected}
        if all(v in reader for v in mapped.values()):
            return mapped
    missing = [n for n in expected if n not in reader]
    raise CheckpointError(f"{reader.path}: checkpoint lacks {len(missing)} tensor(s) of the model, e.g. {missing[:3]}")


def _given_config(config: ModelConfig | str | os.PathLike) -> ModelConfig:
    if isinstance(config, (DecoderConfig, CrossConfig)):
        return config
    d = read_json(config, what="model config")
    try:
        return config_from_dict(d)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{config}: bad model config ({e})") from None


def load_model(path: str | os.PathLike | Reader, *, config: ModelConfig | str | os.PathLike | None = None,
               vocab: VocabManifest | str | os.PathLike | None = None, require_vocab: bool = False,
               dtype: torch.dtype | None = None, device: str | torch.device = "cpu", trust_pickle: bool = False,
               heads: int | None = None, replica_mismatch: str = "error",
               ) -> tuple[nn.Module, ModelConfig, VocabManifest | None]:
    """(model in eval mode, its config, its vocab manifest or None) from any supported checkpoint:
    the one loader of ``jam-generate``, ``jam-eval``, the lm-eval adapter, ``jam run`` / the
    quickstart and the hosts' starting-checkpoint check.

    - ``path``: anything ``open_checkpoint`` reads (a jam-ckpt output directory in any layout, a
      single ``.pt`` / ``.safetensors`` file, model-parallel parts, FSDP shards, an HF directory
      of a family in ``jam_metaseq.models.hf_families``, a fairseq/metaseq-trained checkpoint), or a ``Reader`` already open. Pickles are read by
      ``safe_load.safe_torch_load`` only; ``trust_pickle`` is the ``--trust-pickle`` flag
      (``jam_metaseq.errors.add_trust_pickle_flag``).
    - ``config``: a ``ModelConfig`` or a JSON file of ``config_to_json`` that replaces the
      checkpoint's own (``Reader.config``: the stored ``jam_config``, a trained checkpoint's task
      state or ``cfg["model"]``, the jam-ckpt manifest, a ``config.json`` of ours beside the
      file, else inferred from the shapes; ``heads`` when the shapes cannot tell).
    - ``vocab``: a manifest or its JSON file that replaces the checkpoint's (``Reader.vocab``:
      stored in it, or a ``vocab.json`` beside it);
      the one used must match the embedding (a mismatch stops with both sizes);
      ``require_vocab``: finding none is an error naming the checkpoint.
    - ``dtype``: None keeps the stored parameter dtype; ``device``: where the weights go
      (``"meta"``: no tensor data is read, only every name and shape checked against the model).
    - ``replica_mismatch``: see ``readers.REPLICA_MISMATCH``.

    Errors are ``CheckpointError`` naming the file (and the tensor or setting).
    """
    if isinstance(path, Reader):  # already open (its own trust_pickle / replica_mismatch)
        reader, path = path, path.path
    else:
        path = Path(path)
        reader = open_checkpoint(path, trust_pickle=trust_pickle, replica_mismatch=replica_mismatch)
    manifest = reader.vocab(vocab)
    over: dict[str, Any] = {"heads": heads} if heads else {}
    if manifest is not None:
        over["padding_idx"] = manifest.pad  # the vocabulary's pad (an HF Llama names none)
    cfg = _given_config(config) if config is not None else reader.config(**over)
    if manifest is None and require_vocab:
        raise CheckpointError(f"{path}: no vocabulary manifest (none stored in the checkpoint, no vocab.json "
                              "beside it); pass --vocab")
    device = torch.device(device)
    model = _build_empty(cfg, device=device, dtype=dtype or reader.param_dtype)
    expected = model.state_dict()
    kmap = _key_map(reader, list(expected))
    extra = set(reader.names()) - set(kmap.values())
    if extra:
        raise CheckpointError(f"{reader.path}: tensors the model does not have: {sorted(extra)[:3]}")
    if manifest is not None:  # before the shapes: a vocabulary that does not fit is the cause to name
        try:
            manifest.check_embedding(int(reader.info(kmap[keys.OUTPUT]).shape[0]), what=f"checkpoint {path}")
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    for n, t in expected.items():
        got = tuple(reader.info(kmap[n]).shape)
        if got != tuple(t.shape):
            raise CheckpointError(f"{reader.path}: {kmap[n]} has shape {got} but the model "
                                  f"({arch_of(cfg)}) expects {tuple(t.shape)}")
    if device.type != "meta":
        model.load_state_dict({n: reader.get(kmap[n]) for n in expected}, strict=True)
    model.eval()
    return model, cfg, manifest


def inspect_checkpoint(path: str | os.PathLike, *, trust_pickle: bool = False, heads: int | None = None) -> dict[str, Any]:
    """Architecture, parameter count, layout, dtype and vocab of a checkpoint (reads no tensor data)."""
    r = open_checkpoint(path, trust_pickle=trust_pickle)
    info: dict[str, Any] = {"path": str(r.path), "format": r.format, "mp": r.mp, "fsdp_shards": r.fsdp,
                            "files": [str(f) for f in r.files], "tensors": len(r.names()),
                            "parameters": r.num_params(), "bytes": sum(r.info(n).nbytes for n in r.names())}
    try:
        info["dtype"] = str(r.param_dtype).replace("torch.", "")
    except CheckpointError as e:
        info["dtype"] = f"mixed ({e})"
    try:
        cfg = r.config(**({"heads": heads} if heads else {}))
        info["arch"] = arch_of(cfg)
        info["config"] = cfg.to_dict()
    except CheckpointError as e:
        info["arch"] = None
        info["config_error"] = str(e)
    v = None
    try:
        v = r.vocab()
    except ValueError as e:
        info["vocab_error"] = str(e)
    info["vocab"] = None if v is None else {"size": v.size, "text": [v.text_start, v.text_end],
                                            "image": [v.image_start, v.image_end]}
    emb = next((k for k in (keys.EMBED, keys.BRANCH_EMBED["llm"]) if k in r), None)  # asymmetric JAM-Cross: per branch
    info["embedding_rows"] = r.info(emb).shape[0] if emb is not None else None
    mpath = (r.path if r.path.is_dir() else r.path.parent) / "manifest.json"
    info["manifest"] = str(mpath) if mpath.is_file() else None
    return info


def read_manifest(path: Path) -> dict[str, Any]:
    """A jam-ckpt ``manifest.json``, checked for what ``verify`` relies on: a JSON object whose
    ``files`` maps plain file names (in the manifest's directory) to their ``bytes`` and
    ``sha256``. Errors name the manifest."""
    try:
        m = loads_json(path.read_bytes(), where=str(path), allow_nan=True)  # older outputs may hold NaN
    except InputError as e:
        raise CheckpointError(f"{path}: corrupt manifest ({e.detail})") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt manifest ({e})") from None
    if not isinstance(m, dict) or not isinstance(m.get("files"), dict) or not m["files"]:
        raise CheckpointError(f"{path}: corrupt manifest (no \"files\" table)")
    for name, rec in m["files"].items():
        try:
            safe_component(name, what="file name")
        except JamError as e:
            raise CheckpointError(f"{path}: corrupt manifest ({e}: not a plain file name)") from None
        if not (isinstance(rec, dict) and isinstance(rec.get("bytes"), int) and not isinstance(rec["bytes"], bool)
                and isinstance(rec.get("sha256"), str) and len(rec["sha256"]) == 64):
            raise CheckpointError(f"{path}: corrupt manifest (entry of {name} needs \"bytes\" and a sha256)")
    tensors = m.get("tensors", {})
    if not isinstance(tensors, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("shape"), list) and isinstance(v.get("dtype"), str)
            for v in tensors.values()):
        raise CheckpointError(f"{path}: corrupt manifest (\"tensors\" needs a shape and dtype per tensor)")
    return m


def verify_checkpoint(path: str | os.PathLike, *, forward: bool = True, max_forward_params: int = 50_000_000,
                      trust_pickle: bool = False, seed: int = 0, require_manifest: bool = True,
                      replica_mismatch: str = "error") -> dict[str, Any]:
    """Check a ``jam-ckpt`` output: every file its manifest lists has the recorded size and
    sha256, the checkpoint opens (headers and zip records validated) with the tensors, shapes
    and dtypes the manifest lists, and a forward pass on a few tokens gives finite logits when
    the model is small. ``require_manifest``: a directory without ``manifest.json`` is not a
    complete jam-ckpt output (an error); False checks any checkpoint, without hashes. Raises
    ``CheckpointError`` on the first failure."""
    path = Path(path)
    root = path if path.is_dir() else path.parent
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    report: dict[str, Any] = {"path": str(path), "files_checked": 0, "forward": None}
    mpath = root / "manifest.json"
    manifest = None
    if mpath.is_file():
        manifest = read_manifest(mpath)
        for name, rec in manifest["files"].items():
            f = root / name
            if not f.is_file():
                raise CheckpointError(f"{f}: listed in {mpath} but missing")
            if f.stat().st_size != rec["bytes"]:
                raise CheckpointError(f"{f}: {f.stat().st_size} bytes, manifest says {rec['bytes']} (truncated?)")
            got = sha256_file(f)
            if got != rec["sha256"]:
                raise CheckpointError(f"{f}: sha256 {got[:12]}... does not match the manifest ({rec['sha256'][:12]}...)")
            report["files_checked"] += 1
    elif require_manifest:
        raise CheckpointError(f"{root}: not a complete jam-ckpt output (no manifest.json: an interrupted write, "
                              "or another tool's checkpoint; --no-manifest checks it without hashes)")
    else:
        report["manifest"] = None
    r = open_checkpoint(path, trust_pickle=trust_pickle, replica_mismatch=replica_mismatch)
    if manifest is not None and manifest.get("tensors") and not r.format.startswith("hf_"):  # HF: its own names
        want = manifest["tensors"]
        if set(want) != set(r.names()):
            odd = sorted(set(want) ^ set(r.names()))[:3]
            raise CheckpointError(f"{r.path}: tensors differ from those {mpath} lists, e.g. {odd}")
        for n, rec in want.items():
            info = r.info(n)
            got = {"shape": list(info.shape), "dtype": str(info.dtype).replace("torch.", "")}
            if got != {"shape": rec["shape"], "dtype": rec["dtype"]}:
                raise CheckpointError(f"{r.path}: tensor {n} is {got['dtype']} {got['shape']}, {mpath} lists "
                                      f"{rec['dtype']} {rec['shape']}")
    n = r.num_params()
    report["parameters"] = n
    if forward and n <= max_forward_params:
        model, cfg, vocab = load_model(path, dtype=torch.float32, trust_pickle=trust_pickle,
                                       replica_mismatch=replica_mismatch)
        g = torch.Generator().manual_seed(seed)
        lo = 4 if cfg.vocab_size > 8 else 0
        tokens = torch.randint(lo, cfg.vocab_size, (2, 8), generator=g)
        with torch.no_grad():
            logits = model(tokens)
        if tuple(logits.shape) != (2, 8, cfg.vocab_size):
            raise CheckpointError(f"{path}: forward gave logits {tuple(logits.shape)}, expected (2, 8, {cfg.vocab_size})")
        if not torch.isfinite(logits).all():
            raise CheckpointError(f"{path}: forward pass gave non-finite logits")
        report["forward"] = {"tokens": [2, 8], "logits_abs_mean": float(logits.abs().mean())}
    return report
