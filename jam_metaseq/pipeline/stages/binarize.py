"""Stage ``binarize``: JSONL -> ``jam-data`` memory-mapped blocks (§3.1 Datasets): text, caption,
mixed (continued pretraining), instruct, and the evaluation sets; a budget sweep's grown sets.

The instruct data are converted and fitted to ``tokens_per_sample`` by their format's rule
(``data.instruct.make_transform``) and binarized with the instruct stage's vocabulary
(``context.instruct_vocab``: with the conversation tokens when they are conversations); the
caption data linked beside them for a mixture read the same under it (``VocabManifest.extends``)."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

from jam_metaseq.pipeline.layout import budget_tag
from jam_metaseq.pipeline.stages.context import KINDS, Context, Sources, instruct_vocab, tokenizer_paths


def _link(src: Path, dst: Path) -> None:
    """``dst`` -> ``src`` as a relative symlink (a copy where links are not supported)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(os.path.relpath(src, dst.parent), dst)
    except OSError:
        shutil.copy(src, dst)


def _link_prefix(src_prefix: Path, dst_dir: Path) -> None:
    name = src_prefix.name
    for f in sorted(src_prefix.parent.glob(f"{name}.*")):
        _link(f, dst_dir / f.name)


def _binarize(files: list[Path], prefix: Path, *, ctx: Context, tools: dict, transform: Any = None) -> dict:
    from jam_metaseq.data.binarize import binarize

    prefix.parent.mkdir(parents=True, exist_ok=True)
    index = binarize(files, out_prefix=prefix, vocab=tools["vocab"], text_tokenizer=tools["text"],
                     image_tokenizer=tools["image"], block_size=ctx.plan.data.tokens_per_sample + 1,
                     on_error=ctx.plan.data.on_error, transform=transform, progress=ctx.progress)
    return {k: index[k] for k in ("num_tokens", "num_documents", "num_blocks")}


def _tools(ctx: Context) -> dict:
    from jam_metaseq.data.tokenizers import load_text_tokenizer
    from jam_metaseq.image_tokenizer import load_image_tokenizer
    from jam_metaseq.vocab import VocabManifest

    paths = tokenizer_paths(ctx)
    vocab = VocabManifest.load(paths["vocab"])
    return {"vocab": vocab, "text": load_text_tokenizer(vocab.text_tokenizer),
            "image": load_image_tokenizer(paths["image_tokenizer"], device="cpu") if paths["image_tokenizer"] else None}


def _instruct_transform(ctx: Context, tools: dict) -> Any:
    """The instruct documents' converter and fit rule (None: plain documents, as they are)."""
    from jam_metaseq.data.instruct import make_transform

    d = ctx.plan.data
    return make_transform(d.instruct_format, vocab=tools["vocab"], text_tokenizer=tools["text"],
                          max_tokens=d.tokens_per_sample, max_images=d.instruct.max_images if d.instruct else 3)


def stage_binarize(ctx: Context, src: Sources, toks: dict) -> dict[int | None, dict]:
    """Binarized data; returns {None: base marker, budget: grown marker}."""
    plan, p = ctx.plan, ctx.p
    has_instruct = "instruct" in src.files["train"]

    def build(tmp: Path) -> dict:
        tools = _tools(ctx)
        stats: dict[str, Any] = {}
        for source in KINDS:
            for split in ("train", "valid"):
                stats[f"{split}.{source}"] = _binarize(src.files[split][source], tmp / source / split / source,
                                                       ctx=ctx, tools=tools)
                _link_prefix(tmp / source / split / source, tmp / "mixed" / split)
        if has_instruct:
            itools = {**tools, "vocab": instruct_vocab(ctx, tools["vocab"])}
            transform = _instruct_transform(ctx, itools)
            for split in ("train", "valid"):
                stats[f"{split}.instruct"] = _binarize(src.files[split]["instruct"],
                                                       tmp / "instruct" / split / "instruct", ctx=ctx, tools=itools,
                                                       transform=transform)
                _link_prefix(tmp / "caption" / split / "caption", tmp / "instruct" / split)
            itools["vocab"].save(tmp / "instruct" / "vocab.json")
        for kind in KINDS:
            for name, files in src.eval_sets[kind].items():
                if files != src.files["valid"][kind]:
                    stats[f"eval.{kind}.{name}"] = _binarize(files, tmp / "eval" / kind / name, ctx=ctx, tools=tools)
        for sub in ("text", "caption", "mixed"):
            tools["vocab"].save(tmp / sub / "vocab.json")
        return {"stats": stats}

    material = {"data": src.run, "tokenizers": toks["run"], "tokens_per_sample": plan.data.tokens_per_sample,
                "on_error": plan.data.on_error,
                "instruct": dataclasses.asdict(plan.data.instruct) if plan.data.instruct else None,
                # a key runs recorded before conversations keep
                **({"conversation_tokens": True} if plan.data.conversations else {})}
    out: dict[int | None, dict] = {None: p.unit("binarize", "bin", material, build)}
    for budget, files in src.grown.items():
        tag = budget_tag(budget)

        def build_grown(tmp: Path, files: dict = files) -> dict:
            tools = _tools(ctx)
            stats = {}
            for source in KINDS:
                stats[f"train.{source}"] = _binarize(files[source], tmp / "mixed" / "train" / source, ctx=ctx,
                                                     tools=tools)
                _link_prefix(ctx.path("bin") / source / "valid" / source, tmp / "mixed" / "valid")
            tools["vocab"].save(tmp / "mixed" / "vocab.json")
            return {"stats": stats}

        out[budget] = p.unit("binarize", f"bin-{tag}", {**material, "grown": src.grown_runs[budget],
                                                        "base": out[None]["run"]}, build_grown)
    return out


def run(ctx: Context) -> None:
    ctx.markers["bin"] = stage_binarize(ctx, ctx.sources, ctx.markers["tokenizers"])


__all__ = ["run", "stage_binarize"]
