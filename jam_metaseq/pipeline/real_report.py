"""The summary of ``jam quickstart --real`` (issue 28 items 3 and 5), after the plan's own report:

- **Table 1's role on real text**: perplexity and bits per byte of SmolLM2 (the LLM parent) and of
  each JAM-Cross variant at the start (right after fusion) and after continued pretraining, on the
  held-out documents of ``data.shipped_text`` (each document scored alone from position 0, the
  evaluation rule of ``eval.context``). Bits per byte = the summed negative log-likelihood of every
  scored token (the end-of-document token included) in bits over the documents' UTF-8 bytes; every
  model reads the same tokens, so its ranking is the perplexity's.
- **Table 2's role**: caption perplexity of the image parent and of each variant, start and after.
- **Drawing score** (``eval.drawing``): each pretrained variant draws a picture for the first
  ``DRAW_PROMPTS`` held-out captions; the share whose background, colour and shape match.
- **Text answers** (item 5): SmolLM2 and each pretrained variant continue ``TEXT_PROMPTS`` (same
  sampling, same seed), to read side by side.

Written to ``OUT/report/real.json`` and ``OUT/report/real.txt``; answers' pictures under
``OUT/report/real/``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from jam_metaseq.pipeline.units import log, write_json

DRAW_PROMPTS = 8
TEXT_PROMPTS = ("The Python interpreter reads a program from",
                "The capital of France is")
TEXT_TOKENS = 40


def text_bytes(path: Path) -> int:
    """UTF-8 bytes of the text segments of a JSONL document file."""
    n = 0
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            n += sum(len(s["text"].encode("utf-8")) for s in json.loads(line)["segments"] if "text" in s)
    return n


def bits_per_byte(ppl: float, tokens: int, nbytes: int) -> float:
    """Summed NLL of ``tokens`` tokens at perplexity ``ppl``, in bits, per byte."""
    return math.log(ppl) * tokens / math.log(2) / nbytes


def _table(title: str, header: list[str], rows: list[list[Any]]) -> str:
    from jam_metaseq.pipeline.report import _table as table

    return table(title, header, rows)


def _draw(ckpt: Path, vocab: Path, image_tokenizer: Path, *, plan: Any, out_dir: Path, progress: bool) -> dict:
    from jam_metaseq import quickstart_data as qd
    from jam_metaseq.eval.drawing import score_pictures, train_shape_classifier
    from jam_metaseq.generation.engine import GenerationConfig
    from jam_metaseq.generation.run import PromptSpec, generate_answers
    from jam_metaseq.generation.sampling import SamplingConfig
    from jam_metaseq.image_tokenizer import load_image_tokenizer

    from jam_metaseq.pipeline.real import VALID_SEED_OFFSET

    samples = qd.caption_samples(DRAW_PROMPTS, size=32, seed=plan.seed + VALID_SEED_OFFSET, follow_up=0.0)
    sampling = SamplingConfig(temperature=1.0, top_p=0.9)
    cfg = GenerationConfig(max_new_tokens=64 + 4, min_images=1, max_images=1, guidance_scale=3.5, seed=plan.seed,
                           text=sampling, image=sampling, force_image_first=True)
    answers = generate_answers(checkpoint=ckpt, prompts=[PromptSpec(text=s.caption) for s in samples], config=cfg,
                               vocab_path=vocab, image_tokenizer=str(image_tokenizer), out_dir=out_dir,
                               device=plan.device, progress=progress)
    vq = load_image_tokenizer(str(image_tokenizer), device="cpu")
    import numpy as np

    pictures = []
    for a in answers:
        drawn = [s for s in a.images if s.complete]
        pictures.append(vq.decode_codes(np.asarray([drawn[0].codes]))[0] if drawn else None)
    score = score_pictures(pictures, samples, classifier=train_shape_classifier(size=32))
    score["prompts"] = [s.caption for s in samples]
    return score


def _say(ckpt: Path, vocab: Path, *, plan: Any, progress: bool) -> list[str]:
    from jam_metaseq.generation.engine import GenerationConfig
    from jam_metaseq.generation.run import PromptSpec, generate_answers
    from jam_metaseq.generation.sampling import SamplingConfig

    sampling = SamplingConfig(temperature=0.7, top_p=0.9, repetition_penalty=1.1)
    cfg = GenerationConfig(max_new_tokens=TEXT_TOKENS, min_images=0, max_images=0, seed=plan.seed, text=sampling,
                           image=sampling)
    answers = generate_answers(checkpoint=ckpt, prompts=[PromptSpec(text=t) for t in TEXT_PROMPTS], config=cfg,
                               vocab_path=vocab, device=plan.device, progress=progress)
    from jam_metaseq.generation.answer import TextSegment

    return ["".join(s.text or "" for s in a.segments if isinstance(s, TextSegment)).strip() for a in answers]


def real_report(plan: Any, out: dict, *, progress: bool = True) -> dict:
    """Build, write and return the summary (module docstring) from ``run_plan``'s result ``out``."""
    from jam_metaseq.pipeline.layout import budget_tag
    from jam_metaseq.pipeline.spec import VARIANTS
    results = out["results"]
    root = Path(out["paths"]["results"]).parent.parent
    rows = {r["key"]: r for r in results["rows"]}
    nbytes = text_bytes(plan.data.text.valid[0])
    tokens = next(iter(rows["parent_llm"]["sets"]["text"].values()))["tokens"]

    def t1(label: str, params: int, ppl: float) -> list[Any]:
        return [label, f"{params / 1e6:.1f}M", ppl, bits_per_byte(ppl, tokens, nbytes)]

    table1 = [t1("SmolLM2-135M-Instruct (LLM parent)", rows["parent_llm"]["params"], rows["parent_llm"]["text_ppl"])]
    table2 = [["Image-text parent (trained here)", f"{rows['parent_img']['params'] / 1e6:.1f}M",
               rows["parent_img"]["caption_ppl"]]]
    for key in plan.variants:
        r, label = rows[key], VARIANTS[key].label
        table1.append(t1(f"{label}, start", r["params"], r["start"]["text_ppl"]))
        table1.append(t1(f"{label}, after {r['updates']} updates", r["params"], r["text_ppl"]))
        table2.append([f"{label}, start", f"{r['params'] / 1e6:.1f}M", r["start"]["caption_ppl"]])
        table2.append([f"{label}, after {r['updates']} updates", f"{r['params'] / 1e6:.1f}M", r["caption_ppl"]])
    top = plan.budgets[-1]
    vocab = root / "tokenizers" / "vocab.json"
    image_tok = root / "tokenizers" / "vq"
    drawing, answers = {}, {}
    report_dir = root / "report" / "real"
    report_dir.mkdir(parents=True, exist_ok=True)
    llm_ckpt = Path(plan.parents.llm.checkpoint)
    log("real: text answers of SmolLM2")
    answers["parent_llm"] = _say(llm_ckpt, vocab, plan=plan, progress=progress)
    for key in plan.variants:
        ckpt = root / "pretrain" / budget_tag(top) / key / "checkpoint_last.pt"
        log(f"real: pictures and text answers of {key}")
        drawing[key] = {k: v for k, v in _draw(ckpt, vocab, image_tok, plan=plan, out_dir=report_dir / key,
                                               progress=progress).items()}
        answers[key] = _say(ckpt, vocab, plan=plan, progress=progress)
    table3 = [[VARIANTS[k].label, d["n"], d["background"], d["colour"], d["shape"], d["all"]]
              for k, d in drawing.items()]
    text = "\n\n".join([
        _table(f"Table 1 (real text): held-out {nbytes:,} bytes of Python's pydoc_data topics "
               f"({tokens:,} tokens)", ["Model", "Size", "Text PPL", "Bits/byte"], table1),
        _table("Table 2 (captions): held-out caption+image documents", ["Model", "Size", "Caption PPL"], table2),
        _table(f"Drawing score: {DRAW_PROMPTS} held-out captions, one picture each (CFG 3.5)",
               ["Model", "n", "Background", "Colour", "Shape", "All"], table3),
        "Text answers (temperature 0.7, top-p 0.9, seed %d):\n" % plan.seed + "\n".join(
            f"  [{k}] {p!r} -> {a!r}" for k, outs in answers.items() for p, a in zip(TEXT_PROMPTS, outs)),
    ])
    summary = {"text_bytes": nbytes, "text_tokens": tokens, "table1": table1, "table2": table2,
               "drawing": drawing, "answers": {k: dict(zip(TEXT_PROMPTS, v)) for k, v in answers.items()},
               "text": text}
    write_json(root / "report" / "real.json", summary)
    tmp = root / "report" / ".real.txt.tmp"
    tmp.write_text(text + "\n")
    os.replace(tmp, root / "report" / "real.txt")
    return summary


__all__ = ["DRAW_PROMPTS", "TEXT_PROMPTS", "bits_per_byte", "real_report", "text_bytes"]
