"""Rendering interleaved answers (paper Figures 1, 3-12): JSON lines, Markdown and HTML.

Text segments are decoded with the text tokenizer when one is given (``attach_text``); image
segments become PNG files when an image-tokenizer decoder is configured (any object with
``decode_codes(codes (N, h, w)) -> list[PIL.Image]``, see ``jam_metaseq.image_tokenizer``), and
otherwise are shown as their code grid. ``write_answer_set`` writes the whole set atomically (a
temp dir, fsynced, then renamed into place): a full disk leaves nothing behind.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .answer import Answer, ImageSegment, TextSegment


ANSWER_FILES = ("answers.jsonl", "answers.md", "answers.html")
"""What ``write_answer_set`` writes besides ``images/``, in the order they are renamed into place."""


def _write_durable(path: Path, write: Callable[[Any], None]) -> None:
    """Write through ``write(file)`` and fsync: a full disk surfaces here (also where a file system
    reports it only on flush), before anything is renamed into place."""
    with open(path, "xb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def write_answer_set(answers: Sequence[Answer], *, out_dir: str | os.PathLike, image_decoder: Any = None) -> None:
    """``answers.jsonl``, ``answers.md``, ``answers.html`` and ``images/*.png`` written as one set.

    Everything is first written to a temp dir ``OUT/.answers.tmp-*`` and fsynced; only then is each
    file renamed into place (renames cannot fail for want of space). On any error (a full disk, an
    interrupt) the temp dir is removed, ``OUT`` is removed too when this call created it, and files
    of an earlier set in ``OUT`` stay as they were: never a half-written or 0-byte answer file."""
    out = Path(out_dir)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".answers.tmp-", dir=out))
    try:
        if image_decoder is not None:
            save_images(answers, image_decoder=image_decoder, out_dir=stage)
        for name, text in zip(ANSWER_FILES, (to_jsonl(answers), to_markdown(answers), to_html(answers))):
            _write_durable(stage / name, lambda f, t=text: f.write(t.encode()))
        staged_images = sorted((stage / "images").iterdir()) if (stage / "images").is_dir() else []
        if staged_images:
            (out / "images").mkdir(exist_ok=True)
        for png in staged_images:
            os.replace(png, out / "images" / png.name)
        for name in ANSWER_FILES:
            os.replace(stage / name, out / name)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


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
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    for (i, j, s), img in zip(jobs, images):
        rel = Path("images") / f"answer{i}_image{j}.png"
        path = out_dir / rel
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            _write_durable(tmp, lambda f, im=img: im.save(f, format="PNG"))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
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
