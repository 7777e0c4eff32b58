"""Stage ``tokenizers``: the text tokenizer (given or trained), the image tokenizer (given or
trained: the small VQ of §3.1 "Tokenizers"), the vocabulary manifest (given or built)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, Iterator

from jam_metaseq.pipeline.check import caption_image_paths
from jam_metaseq.pipeline.stages.context import Context, Sources, fingerprint
from jam_metaseq.pipeline.units import PipelineError, log


def _texts(paths: list[Path], *, limit: int, on_error: str) -> Iterator[str]:
    """Text segments (prompts included) of JSONL documents, at most ``limit``."""
    from jam_metaseq.data.documents import DocumentError, document_parts, parse_jsonl_line

    n = 0
    for path in paths:
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    prompt, segs = document_parts(parse_jsonl_line(line))
                except DocumentError as e:
                    if on_error == "fail":
                        raise e.at(f"{path}:{lineno}") from None
                    continue
                for s in (prompt or []) + segs:
                    if isinstance(s, dict) and isinstance(s.get("text"), str) and s["text"]:
                        yield s["text"]
                        n += 1
                        if n >= limit:
                            return


def stage_tokenizers(ctx: Context, src: Sources) -> dict:
    plan, p = ctx.plan, ctx.p
    d = plan.data
    final = p.path("tokenizers")
    fp = []
    for given in (d.vocab, d.image_tokenizer.path):
        if given is not None:
            fp.append(fingerprint(sorted(Path(given).glob("*")) if Path(given).is_dir() else [Path(given)]))
    # given parents that carry their manifest (jam-ckpt / jam run outputs) fix the vocabulary
    parent_vocab = next((v for _, v in ctx.given.values() if v is not None), None) if d.vocab is None else None
    tt = d.text_tokenizer
    if tt.path not in (None, "bytes"):
        fp.append(fingerprint([Path(tt.path.split(":", 1)[-1] if tt.path.startswith(("spm:", "bpe:")) else tt.path)]))

    def build(tmp: Path) -> dict:
        from jam_metaseq.data.tokenizers import load_text_tokenizer, train_bpe, train_sentencepiece
        from jam_metaseq.vocab import VocabManifest

        given_vocab = VocabManifest.load(d.vocab) if d.vocab is not None else parent_vocab
        # text tokenizer: given, named by the given manifest, or trained
        spec = tt.path or (given_vocab.text_tokenizer if given_vocab is not None else None)
        if spec and spec != "bytes":
            raw = spec.split(":", 1)[1] if spec.startswith(("spm:", "bpe:")) else spec
            kind = "bpe" if spec.startswith("bpe:") or raw.endswith(".json") else "spm"
            name = "text.json" if kind == "bpe" else "text.model"
            load_text_tokenizer(spec)  # fails here, naming the file, if unreadable
            shutil.copy(raw, tmp / name)
            spec = f"{kind}:{final / name}"
        elif not spec:
            train_files = src.files["train"]["text"] + src.files["train"]["caption"] + \
                src.files["train"].get("instruct", [])
            texts = list(_texts(train_files, limit=tt.sample_lines, on_error=d.on_error))
            if not texts:
                raise PipelineError("data: the training files hold no text to train a tokenizer on")
            log(f"tokenizers: {tt.kind} on {len(texts)} text segments")
            if tt.kind == "sentencepiece":
                train_sentencepiece(texts, out_prefix=tmp / "spm", vocab_size=tt.vocab_size)
                spec = f"spm:{final / 'spm.model'}"
            else:
                train_bpe(texts, out_path=tmp / "bpe.json", vocab_size=tt.vocab_size)
                spec = f"bpe:{final / 'bpe.json'}"
        text_size = load_text_tokenizer(spec.replace(str(final), str(tmp))).vocab_size
        # image tokenizer: given or trained
        info: dict[str, Any] = {}
        if d.image_tokenizer.path is not None:
            from jam_metaseq.image_tokenizer import load_image_tokenizer

            vq = load_image_tokenizer(d.image_tokenizer.path, device="cpu")
            info["image_tokenizer"] = str(d.image_tokenizer.path)
        else:
            from jam_metaseq.image_tokenizer import train_tiny_tokenizer

            images = caption_image_paths(src.files["train"]["caption"], limit=d.image_tokenizer.max_images)
            if not images and given_vocab is None:
                raise PipelineError("data.image_tokenizer: no {\"image\": path} segment in the caption training "
                                    "files to train an image tokenizer on; give data.image_tokenizer.path (or "
                                    "data.vocab when their images are image_tokens)")
            if images:
                log(f"tokenizers: image tokenizer on {len(images)} images, {d.image_tokenizer.steps} steps")
                vq = train_tiny_tokenizer([str(x) for x in images], out_path=tmp / "vq", steps=d.image_tokenizer.steps,
                                          seed=plan.seed, progress=ctx.progress, pool_size=len(images))
            else:  # images given as VQ codes of the given manifest: nothing to encode, no pictures drawn
                vq = None
                info["no_image_tokenizer"] = True
                log("tokenizers: no image tokenizer: the caption data holds image_tokens of the given manifest "
                    "(training and evaluation need none; the generate stage writes code grids, no pictures)")
        grid = tuple(int(x) for x in vq.grid) if vq is not None else tuple(given_vocab.image_grid)
        n_codes = int(vq.n_codes) if vq is not None else given_vocab.image_codes
        if given_vocab is not None:
            problems = []
            if given_vocab.image_codes != n_codes or tuple(given_vocab.image_grid) != grid:
                problems.append(f"image tokenizer has {n_codes} codes on a {grid} grid, the manifest "
                                f"{given_vocab.image_codes} on {tuple(given_vocab.image_grid)}")
            if text_size > given_vocab.text_size:
                problems.append(f"text tokenizer has {text_size} ids, the manifest's text range {given_vocab.text_size}")
            if problems:
                raise PipelineError(f"data.vocab {d.vocab}: " + "; ".join(problems))
            vocab = dataclasses.replace(given_vocab, text_tokenizer=spec)
        else:
            vocab = VocabManifest(text_size=text_size, image_codes=n_codes, num_sentinels=d.num_sentinels,
                                  image_tokens_per_image=grid[0] * grid[1], image_grid=grid, text_tokenizer=spec)
        vocab.save(tmp / "vocab.json")
        return {**info, "text_size": text_size, "image_codes": n_codes, "grid": list(grid),
                "vocab_size": vocab.size}

    material = {"data": src.run, "text": dataclasses.asdict(tt), "image": dataclasses.asdict(d.image_tokenizer),
                "vocab": str(d.vocab) if d.vocab else None, "given": fp,
                "parent_vocab": parent_vocab.to_dict() if parent_vocab is not None else None, "sentinels": d.num_sentinels,
                "seed": plan.seed}
    m = p.unit("tokenizers", "tokenizers", material, build)
    ctx.markers["tokenizers"] = m
    return m


def run(ctx: Context) -> None:
    stage_tokenizers(ctx, ctx.sources)


__all__ = ["run", "stage_tokenizers"]
