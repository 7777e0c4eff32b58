"""Rendering interleaved answers (paper Figures 1, 3-12): JSON lines, Markdown and HTML.

Text segments are decoded with the text tokenizer when one is given (``attach_text``); image
segments become PNG files when an image-tokenizer decoder is configured (any object with
``decode_codes(codes (N, h, w)) -> list[PIL.Image]``, see ``jam_metaseq.image_tokenizer``), and
otherwise are shown as their code grid. Every file is written atomically (temp + rename).
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .answer import Answer, ImageSegment, TextSegment


def write_atomic(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def attach_text(answers: Sequence[Answer], *, tokenizer: Any) -> None:
    """Fill ``TextSegment.text`` (and ``Answer.prompt`` when missing) with ``tokenizer.decode``."""
    for a in answers:
        for s in a.segments:
            if isinstance(s, TextSegment):
                s.text = tokenizer.decode(s.ids)


def save_images(answers: Sequence[Answer], *, image_decoder: Any, out_dir: Path) -> None:
    """Decode every complete image to ``out_dir/images/answer{i}_image{j}.png`` and record the path
    (relative to ``out_dir``) in the segment."""
    jobs = [(i, j, s) for i, a in enumerate(answers) for j, s in enumerate(a.images) if s.complete]
    if not jobs:
        return
    codes = np.asarray([s.codes for _, _, s in jobs], dtype=np.int64)  # (N, h, w)
    images = image_decoder.decode_codes(codes)
    for (i, j, s), img in zip(jobs, images):
        rel = Path("images") / f"answer{i}_image{j}.png"
        path = out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        img.save(tmp, format="PNG")
        os.replace(tmp, path)
        s.png = rel.as_posix()


def to_jsonl(answers: Sequence[Answer]) -> str:
    return "".join(json.dumps(a.to_dict()) + "\n" for a in answers)


def _grid_text(s: ImageSegment) -> str:
    return "\n".join(" ".join(f"{c:4d}" for c in row) for row in s.codes)


def _text_of(s: TextSegment) -> str:
    return s.text if s.text is not None else "[text ids: " + " ".join(map(str, s.ids)) + "]"


def to_markdown(answers: Sequence[Answer]) -> str:
    out: list[str] = []
    for i, a in enumerate(answers):
        out.append(f"## Answer {i + 1}" + (f": {a.prompt}" if a.prompt else ""))
        out.append(f"*seed {a.seed}, {len(a.ids)} tokens, finished by {a.finish_reason}*\n")
        for j, s in enumerate(a.segments):
            if isinstance(s, TextSegment):
                out.append(_text_of(s) + "\n")
            elif s.png is not None:
                out.append(f"![image {j + 1}]({s.png})\n")
            else:
                note = "" if s.complete else " (incomplete)"
                out.append(f"Image code grid{note}:\n\n```\n{_grid_text(s)}\n```\n")
    return "\n".join(out)


_HTML_HEAD = """<!doctype html>
<html><head><meta charset="utf-8"><title>JAM answers</title>
<style>body{font-family:sans-serif;max-width:52em;margin:2em auto}
.meta{color:#666;font-size:90%}img{max-width:256px;image-rendering:pixelated;display:block;margin:1em 0}
table.grid{border-collapse:collapse;font:11px monospace;margin:1em 0}table.grid td{padding:1px 3px;border:1px solid #ddd}
</style></head><body>
"""


def to_html(answers: Sequence[Answer]) -> str:
    out = [_HTML_HEAD]
    for i, a in enumerate(answers):
        title = f"Answer {i + 1}" + (f": {a.prompt}" if a.prompt else "")
        out.append(f"<h2>{html.escape(title)}</h2>")
        out.append(f'<p class="meta">seed {a.seed}, {len(a.ids)} tokens, finished by {a.finish_reason}</p>')
        for s in a.segments:
            if isinstance(s, TextSegment):
                out.append(f"<p>{html.escape(_text_of(s))}</p>")
            elif s.png is not None:
                out.append(f'<img src="{html.escape(s.png)}" alt="generated image">')
            else:
                rows = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in s.codes)
                out.append(f'<table class="grid" title="image code grid">{rows}</table>')
    out.append("</body></html>\n")
    return "\n".join(out)
