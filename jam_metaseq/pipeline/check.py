"""Checks of a plan against the files and checkpoints it names, before any work (``jam run``).

Structural rules (types, ranges, unknown fields) are the schema's (``pipeline.spec``); this module
looks at the world: every named file exists (and the first documents of each JSONL file parse),
the parents are decoders of one shape that matches the plan's ``model``, cover the sequence length
and fit the vocabulary, every budget is a whole number of updates, the host and placement can run
(metaseq needs GPUs; SLURM needs submitit). All problems are reported at once, each naming its
field (and its line in the plan file). Checkpoints are opened lazily: no tensor data is read.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

from jam_metaseq.pipeline.spec import PARENTS, OptimSpec, PlanError, PlanSpec, ShapeSpec

SHAPE_FIELDS = tuple(f.name for f in dataclasses.fields(ShapeSpec))
"""What a plan's ``model`` / ``image_model`` says (``ShapeSpec``'s fields, which are ``DecoderConfig``'s
of the same names): a given parent checkpoint must match it there."""
DOCS_CHECKED = 20
"""Documents of each JSONL file parsed up front (binarization checks the rest, naming file:line)."""


class _Problems:
    def __init__(self, lines: Mapping[tuple, int]) -> None:
        self.lines = lines
        self.items: list[str] = []

    def add(self, loc: tuple, msg: str) -> None:
        from jam_metaseq.pipeline.spec.schema import _where, field_name

        self.items.append(f"{_where(loc, self.lines)}{field_name(loc)}: {msg}")


def _loc(dotted: str) -> tuple:
    out: list[Any] = []
    for part in dotted.split("."):
        name, _, idx = part.partition("[")
        out.append(name)
        if idx:
            out.append(int(idx.rstrip("]")))
    return tuple(out)


def _check_jsonl(path: Path, loc: tuple, probs: _Problems) -> None:
    from jam_metaseq.data.documents import SEGMENT_KEYS, DocumentError, document_parts, parse_jsonl_line

    if not path.is_file():
        probs.add(loc, f"no such file: {path}" if not path.exists() else f"not a file: {path}")
        return
    seen = 0
    try:
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                seen += 1
                try:
                    prompt, segs = document_parts(parse_jsonl_line(line))
                    for i, s in enumerate((prompt or []) + segs):
                        if not isinstance(s, dict) or len(s) != 1 or next(iter(s)) not in SEGMENT_KEYS:
                            raise DocumentError(f"segment {i}: expected exactly one of {list(SEGMENT_KEYS)}",
                                                reason="bad_segment")
                        if "image" in s and isinstance(s["image"], str) and not (path.parent / s["image"]).is_file():
                            raise DocumentError(f"segment {i}: image file not found: {path.parent / s['image']}",
                                                reason="image_missing")
                except DocumentError as e:
                    probs.add(loc, f"{path}:{lineno}: {e.detail}")
                    return
                if seen >= DOCS_CHECKED:
                    break
    except OSError as e:
        probs.add(loc, f"{path}: {e.strerror or e}")
        return
    if seen == 0:
        probs.add(loc, f"{path}: no documents (the file is empty)")


def caption_image_paths(paths: list[Path], *, limit: int) -> list[Path]:
    """Image files named by ``{"image": path}`` segments of JSONL documents (relative to each file's
    folder), at most ``limit``; bad lines are left to the readers that report them. None found in a
    user's caption files means their images are already VQ codes (``image_tokens``): no image
    tokenizer is needed to train and evaluate (issue 27), only to draw pictures."""
    from jam_metaseq.data.documents import DocumentError, document_parts, parse_jsonl_line

    out: list[Path] = []
    for path in paths:
        try:
            f = open(path, "rb")
        except OSError:
            continue
        with f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    prompt, segs = document_parts(parse_jsonl_line(line))
                except DocumentError:
                    continue
                for s in (prompt or []) + segs:
                    if isinstance(s, dict) and isinstance(s.get("image"), str):
                        out.append(path.parent / s["image"])
                        if len(out) >= limit:
                            return out
    return out


def _check_budget(tokens: int, optim: OptimSpec, tps: int, loc: tuple, probs: _Problems) -> None:
    per = optim.batch_size * tps
    if tokens % per:
        lo, hi = (tokens // per) * per, (tokens // per + 1) * per
        near = f"{lo:,} or {hi:,}" if lo else f"{hi:,}"
        probs.add(loc, f"{tokens:,} tokens is not a whole number of updates of {optim.batch_size} x {tps} = "
                       f"{per:,} tokens (batch_size x data.tokens_per_sample); nearest: {near}")


def _parent_configs(plan: PlanSpec, probs: _Problems) -> dict[str, Any]:
    from checkpoints_tools.readers import open_checkpoint
    from jam_metaseq.models.config import CrossConfig

    out = {}
    for role in PARENTS:
        spec = getattr(plan.parents, role)
        if spec.trained:
            continue
        loc = ("parents", role, "checkpoint")
        try:
            r = open_checkpoint(spec.checkpoint)
            cfg = r.config(**({"heads": spec.heads} if spec.heads else {}))
        except (ValueError, OSError) as e:  # CheckpointError is a ValueError
            probs.add(loc, str(e).splitlines()[0])
            continue
        if isinstance(cfg, CrossConfig) or getattr(cfg, "arch", "") == "jam_width":
            probs.add(loc, f"{spec.checkpoint} is a fused JAM model ({type(cfg).__name__}); a parent is a plain decoder")
            continue
        vocab = None
        try:
            vocab = r.vocab()
        except ValueError:
            pass
        out[role] = (cfg, vocab)
    return out


def _shape_of(cfg: Any) -> dict:
    return {f: getattr(cfg, f) for f in SHAPE_FIELDS}


def check_plan(plan: PlanSpec, *, source: str = "plan", lines: Mapping[tuple, int] | None = None,
               executables: bool = True) -> dict[str, Any]:
    """Raise ``PlanError`` listing every problem; returns what the checks learnt (the given
    parents' configs and vocabularies)."""
    probs = _Problems(lines or {})
    d = plan.data
    tps = d.tokens_per_sample
    # ---- files
    for src in ("text", "caption", "instruct"):
        files = getattr(d, src)
        if files is None:
            continue
        for split in ("train", "valid"):
            for i, f in enumerate(getattr(files, split)):
                _check_jsonl(Path(f), ("data", src, split, i), probs)
    for kind in ("text", "caption"):
        for name, files in (getattr(plan.eval, kind) or {}).items():
            for i, f in enumerate(files):
                _check_jsonl(Path(f), ("eval", kind, name, i), probs)
    if d.vocab is not None and not Path(d.vocab).is_file():
        probs.add(("data", "vocab"), f"no such file: {d.vocab}")
    tt = d.text_tokenizer.path
    if tt is not None and tt != "bytes":
        raw = Path(tt.split(":", 1)[1] if tt.startswith(("spm:", "bpe:")) else tt)
        if not raw.is_file():
            probs.add(("data", "text_tokenizer", "path"), f"no such file: {raw}")
    it = d.image_tokenizer.path
    if it is not None:
        missing = [n for n in ("vqgan.ckpt", "vqgan.yaml") if not (Path(it) / n).is_file()]
        if missing:
            probs.add(("data", "image_tokenizer", "path"), f"{it}: no {' / '.join(missing)} (a VQGAN folder holds "
                                                            "vqgan.ckpt and vqgan.yaml)")
    # ---- images as VQ codes (a user's caption files without one {"image": path} segment)
    codes_only = it is None and d.caption is not None and not probs.items and \
        not caption_image_paths([Path(f) for f in d.caption.train], limit=1)
    # ---- parents
    for role in PARENTS:
        spec = getattr(plan.parents, role)
        if not spec.trained and not Path(spec.checkpoint).exists() and not list(
                Path(spec.checkpoint).parent.glob(Path(spec.checkpoint).name.removesuffix(".pt") + "-*.pt")):
            probs.add(("parents", role, "checkpoint"), f"no such checkpoint: {spec.checkpoint}")
    given = _parent_configs(plan, probs) if not probs.items else {}
    if given:
        shapes = {role: _shape_of(cfg) for role, (cfg, _) in given.items()}
        if len(shapes) == 2 and shapes["llm"] != shapes["img"] and plan.image_model is None:
            diff = {k: (shapes["llm"][k], shapes["img"][k]) for k in SHAPE_FIELDS if shapes["llm"][k] != shapes["img"][k]}
            probs.add(("parents",), "the parents differ in shape (llm, img): " +
                      ", ".join(f"{k} {a} vs {b}" for k, (a, b) in diff.items()) + "; fusion needs one shape "
                      "(JAM-Cross of parents of different sizes: give model and image_model)")
        if plan.model is not None:
            wants = {"llm": plan.model, "img": plan.image_shape}
            for role, shape in shapes.items():
                want = {f: getattr(wants[role], f) for f in SHAPE_FIELDS}
                diff = [f"{k} {shape[k]} (plan: {want[k]})" for k in SHAPE_FIELDS if shape[k] != want[k]]
                if diff:
                    which = "image_model" if role == "img" and plan.image_model is not None else "model"
                    probs.add(("parents", role, "checkpoint"), f"shape does not match the plan's {which}: {', '.join(diff)}")
        for role, (cfg, vocab) in given.items():
            if cfg.max_positions < tps:
                probs.add(("data", "tokens_per_sample"),
                          f"{tps} exceeds the {role} parent's {cfg.max_positions} positions")
            if d.vocab is not None and Path(d.vocab).is_file():
                from jam_metaseq.vocab import VocabManifest

                try:
                    VocabManifest.load(d.vocab).check_embedding(cfg.vocab_size, what=f"{role} parent")
                except (ValueError, OSError) as e:
                    probs.add(("data", "vocab"), str(e).splitlines()[0])
            elif vocab is None and d.text_tokenizer.path is None:
                probs.add(("data", "vocab"), f"the {role} parent carries no vocabulary: give data.vocab (or "
                                             "data.text_tokenizer.path) from its training")
            elif vocab is not None:
                try:
                    vocab.check_embedding(cfg.vocab_size, what=f"{role} parent")
                except ValueError as e:
                    probs.add(("parents", role, "checkpoint"), str(e))
        if d.text_tokenizer.path is None and d.vocab is None and not all(v is not None for _, v in given.values()):
            probs.add(("data", "text_tokenizer", "path"), "a given parent needs the tokenizer it was trained with "
                                                          "(a trained tokenizer would not match its embedding)")
        if d.image_tokenizer.path is None and codes_only is False and "img" in given:
            probs.add(("data", "image_tokenizer", "path"), "a given parent needs the image tokenizer it was trained "
                                                           "with (a trained one would not match its image codes)")
    # ---- image codes without an image tokenizer: the manifest they belong to must be given (what
    # the tokenizers stage would refuse, refused here first)
    if codes_only and d.vocab is None and not (given and all(v is not None for _, v in given.values())):
        probs.add(("data", "image_tokenizer", "path"), "the caption training files hold no {\"image\": path} "
                  "segment to train an image tokenizer on (image_tokens?): give data.vocab, the manifest their "
                  "codes belong to, or data.image_tokenizer.path")
    # ---- budgets
    if any(getattr(plan.parents, r).trained for r in PARENTS):
        _check_budget(plan.parents.train.budget_tokens, plan.parents.train, tps, ("parents", "train", "budget_tokens"),
                      probs)
    for i, b in enumerate(plan.pretrain.budget_tokens):
        loc = ("pretrain", "budget_tokens") + ((i,) if len(plan.pretrain.budget_tokens) > 1 else ())
        _check_budget(b, plan.pretrain, tps, loc, probs)
    if plan.data.has_instruct:
        _check_budget(plan.instruct.budget_tokens, plan.instruct, tps, ("instruct", "budget_tokens"), probs)
    # ---- host and placement
    gpus = plan.run.slurm.gpus if plan.run.where == "slurm" else (0 if plan.device == "cpu" else 1)
    if plan.host == "metaseq" and gpus == 0:
        probs.add(("host",), "metaseq cannot train on a CPU (its fully sharded data parallel needs GPUs); use "
                             "host: fairseq, or a GPU device" + (" and run.slurm.gpus >= 1" if plan.run.where == "slurm"
                                                                else ""))
    if plan.run.where == "slurm":
        if plan.device == "cpu" and plan.run.slurm.gpus:
            probs.add(("run", "slurm", "gpus"), "GPU jobs with device cpu; set device: cuda (or gpus: 0)")
        for name, optim in (("pretrain", plan.pretrain), ("parents.train", plan.parents.train),
                            ("instruct", plan.instruct)):
            if plan.run.slurm.gpus and optim.batch_size % plan.run.slurm.gpus:
                probs.add(_loc(name) + ("batch_size",), f"{optim.batch_size} sequences do not divide over "
                                                        f"run.slurm.gpus = {plan.run.slurm.gpus}")
        if executables:
            try:
                import submitit  # noqa: F401
            except ImportError:
                probs.add(("run", "where"), "slurm needs submitit: pip install 'jam_metaseq[launch]'")
    if executables:
        import importlib.util

        if plan.host == "fairseq" and importlib.util.find_spec("fairseq") is None:
            probs.add(("host",), "fairseq is not installed: pip install 'jam_metaseq[fairseq]'")
        if plan.host == "metaseq" and importlib.util.find_spec("metaseq") is None:
            probs.add(("host",), "metaseq is not installed here (it is not on PyPI: install it from its "
                                 "repository, facebookresearch/metaseq)")
    if probs.items:
        raise PlanError(probs.items, source=source)
    return {"parents": given}


__all__ = ["caption_image_paths", "check_plan"]
