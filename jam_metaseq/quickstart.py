"""``jam quickstart``: the whole JAM pipeline in miniature, on data made on the fly (paper §2-3).

Stages (each writes into ``--out DIR`` atomically, with a ``DONE.json`` marker; a re-run skips
every unit whose marker matches its settings and upstream runs):

  data        procedural image-caption set (coloured shapes) and text corpus, split train/valid
              (``quickstart_data``)
  tokenizers  the tiny trainable image tokenizer (VQ, §3.1 "Tokenizers"), a sentencepiece text
              tokenizer, and the vocabulary manifest
  binarize    images -> codes -> JSONL documents -> ``jam-data`` memory-mapped blocks; three data
              directories: text only, image-caption only, and both (continued pretraining)
  parents     a tiny text LLM (text only) and a tiny image-caption model (the CM3leon role),
              trained from the same initialisation through the fairseq host (``fairseq-train
              --task cm3_multimodal --criterion cm3``)
  fuse        ``jam-ckpt`` (``checkpoints_tools.ops``): JAM-Uniform (Eq. 1), JAM-Width copy and
              average (Eq. 2/3), JAM-Cross with a cross block every 1, 2, 4 layers and none
              (§2.1.3, Table 4), each with ``paper`` and ``preserve`` initialisation
  pretrain    continued pretraining of every variant through the fairseq host on the mixed data,
              same token budget (updates x batch x tokens per sample) for all (§2.1, §3.1)
  eval        text PPL ("Wikipedia PPL") and image-caption PPL ("MS-COCO PPL") of every model on
              the validation documents (``jam_metaseq.eval.perplexity``), parents as reference
  report      miniature Tables 1-4, ``results.json`` and ``curves.png`` (validation curves)
  generate    one interleaved answer per prompt from the best JAM-Cross, decoded images, HTML

Table 1 of the paper is zero-shot accuracy on common-sense tasks; that needs real data, so the
miniature Table 1 reports text perplexity instead (and says so).

Library entry: ``run_quickstart(QuickstartConfig(...)) -> dict`` (the results); CLI: ``main(argv)``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from jam_metaseq.errors import JamError, run_cli

STAGES = ("data", "tokenizers", "binarize", "parents", "fuse", "pretrain", "eval", "report", "generate")


class QuickstartError(JamError, RuntimeError):
    """A failure with a one-line cause (the CLI prints it and exits non-zero)."""


# ---- variants --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One JAM model built from the two parents."""

    key: str
    """Short name used for folders and ``--variants``."""
    label: str
    """Row name in the tables."""
    family: str
    """fairseq arch family: ``jam_uniform``, ``jam_width`` or ``jam_cross``."""
    init: str = ""
    """``copy``/``average`` (width), ``paper``/``preserve`` (cross)."""
    cross_every: int = 0
    """JAM-Cross: a cross-block pair after every k-th layer (0 = none)."""


def _variants() -> dict[str, Variant]:
    out = {"uniform": Variant("uniform", "JAM-Uniform", "jam_uniform"),
           "width_copy": Variant("width_copy", "JAM-Width (copy)", "jam_width", "copy"),
           "width_average": Variant("width_average", "JAM-Width (average)", "jam_width", "average")}
    for init in ("paper", "preserve"):
        for every in (1, 2, 4, 0):
            key = f"cross{every}_{init}"
            label = f"JAM-Cross ({'every ' + str(every) if every else 'no x-attn'}, {init})"
            out[key] = Variant(key, label, "jam_cross", init, every)
    return out


VARIANTS: dict[str, Variant] = _variants()
PARENTS = {"llm": "LLM parent (text)", "img": "Image-text parent"}
PAPER_CROSS = "cross2_paper"
"""The JAM-Cross row of Tables 1-2: a cross block every 2 layers, as the paper's 19B model."""


# ---- settings --------------------------------------------------------------------------------
@dataclass
class Plan:
    """Sizes of one run, derived from ``--scale`` and ``--steps`` (``plan_for``)."""

    image_size: int = 32
    """Side of the procedural images in pixels (the tiny VQ: 32 px -> 8x8 codes)."""
    train_images: int = 1200
    """Image-caption documents for training (and the image tokenizer's pool)."""
    valid_images: int = 64
    """Image-caption documents for validation (caption + image only: the "MS-COCO PPL" set)."""
    train_texts: int = 1200
    """Text documents for training."""
    valid_texts: int = 64
    """Text documents for validation (the "Wikipedia PPL" set)."""
    vq_steps: int = 600
    """Training steps of the tiny image tokenizer."""
    text_vocab: int = 256
    """Sentencepiece vocabulary size (an upper bound: the corpus may support fewer)."""
    num_sentinels: int = 4
    """CM3 sentinels in the vocabulary (max masked spans per sequence)."""
    embed_dim: int = 64
    """Hidden size E of each parent (JAM-Width doubles it)."""
    ffn_dim: int = 256
    """FFN inner size of each parent."""
    layers: int = 4
    """Layers of each parent; 4, so that a cross block every 1, 2 and 4 layers differ."""
    heads: int = 4
    """Attention heads of each parent."""
    tokens_per_sample: int = 160
    """Sequence length (= the models' max_positions; two caption documents fit one block)."""
    batch_size: int = 8
    """Sequences per update."""
    parent_updates: int = 500
    """Updates of each parent, from scratch."""
    variant_updates: int = 150
    """Continued-pretraining updates of every JAM variant (the shared token budget)."""
    parent_lr: float = 3e-3
    """Peak learning rate of the parents (linear warm-up over 10%, then linear decay)."""
    variant_lr: float = 1e-3
    """Peak learning rate of continued pretraining."""
    curve_points: int = 6
    """Validation runs per training run (the curves' resolution)."""

    @property
    def tokens_per_update(self) -> int:
        return self.batch_size * self.tokens_per_sample


def plan_for(*, scale: int = 1, steps: float = 1.0) -> Plan:
    """Model width, data size and training length for ``scale`` (x width, x data) and ``steps``
    (x every training stage)."""
    if scale < 1:
        raise ValueError(f"--scale must be >= 1, got {scale}")
    if not steps > 0:
        raise ValueError(f"--steps must be > 0, got {steps}")
    p = Plan()

    def n(x: int, lo: int = 2) -> int:
        return max(lo, int(round(x * steps)))

    return dataclasses.replace(
        p, train_images=p.train_images * scale, valid_images=p.valid_images * scale,
        train_texts=p.train_texts * scale, valid_texts=p.valid_texts * scale,
        embed_dim=p.embed_dim * scale, ffn_dim=p.ffn_dim * scale, heads=p.heads * scale,
        vq_steps=n(p.vq_steps), parent_updates=n(p.parent_updates), variant_updates=n(p.variant_updates),
        batch_size=p.batch_size * (2 if scale > 1 else 1))


@dataclass
class QuickstartConfig:
    """Everything ``jam quickstart`` is asked to do."""

    out: Path = Path("runs/quickstart")
    """Output directory (created)."""
    steps: float = 1.0
    """Multiplier of every training stage's length (tokenizer, parents, continued pretraining)."""
    scale: int = 1
    """Multiplier of model width and data size."""
    device: str = "cpu"
    """torch device for training, evaluation and generation (``cpu``, ``cuda``, ``cuda:1``)."""
    seed: int = 0
    """Seed of the data, the initialisations, the training order and the sampling."""
    stages: tuple[str, ...] = STAGES
    """Stages to run; the others' outputs must exist already."""
    variants: tuple[str, ...] = tuple(VARIANTS)
    """JAM variants to build, train and evaluate."""
    force: bool = False
    """Re-run the selected stages even when finished."""
    threads: int = 0
    """CPU threads per process (0 = all cores shared among ``jobs``)."""
    jobs: int = 0
    """Training runs at once (0 = 2 on a CPU with >= 2 cores, else 1; always 1 on an accelerator)."""
    prompts: tuple[str, ...] = ("a red circle on a white background", "a picture of a blue square on a black background")
    """Prompts of the generated answers."""
    progress: bool = True
    """Progress bars on stderr."""

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise ValueError(f"unknown stage(s) {bad}; stages are {', '.join(STAGES)}")
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad:
            raise ValueError(f"unknown variant(s) {bad}; variants are {', '.join(VARIANTS)}")
        if not self.variants:
            raise ValueError("at least one variant is needed")
        if self.threads < 0:
            raise ValueError(f"--threads must be >= 0, got {self.threads}")
        if self.jobs < 0:
            raise ValueError(f"--jobs must be >= 0, got {self.jobs}")
        if self.jobs == 0:
            self.jobs = 2 if self.device == "cpu" and (os.cpu_count() or 1) >= 2 else 1

    @property
    def threads_per_job(self) -> int:
        """Intra-op threads of each process (0 = leave torch's default)."""
        if self.threads:
            return self.threads
        return max(1, (os.cpu_count() or 1) // self.jobs) if self.jobs > 1 else 0
        if not self.prompts:
            raise ValueError("at least one prompt is needed")


# ---- small utilities -------------------------------------------------------------------------
def _log(msg: str) -> None:
    print(f"[quickstart] {msg}", file=sys.stderr, flush=True)


def _bar(total: int | None, desc: str, *, enabled: bool, unit: str = "it"):
    from tqdm import tqdm

    slot = getattr(_SLOT, "value", 0)
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, disable=not enabled,
                leave=slot == 0, position=slot)


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


_SLOT = threading.local()
"""Which progress-bar line the current worker thread owns (parallel training runs)."""


def _repo_paths() -> tuple[Path, Path]:
    """(the jam_metaseq package folder = fairseq ``--user-dir``, the folder above it)."""
    pkg = Path(__file__).resolve().parent
    return pkg, pkg.parent


# ---- the unit runner: atomic outputs with done markers ----------------------------------------
class Pipeline:
    """Runs units (a folder under ``out``) at most once per invocation, skipping finished ones."""

    def __init__(self, cfg: QuickstartConfig) -> None:
        self.cfg = cfg
        self.out = cfg.out
        self.markers: dict[str, dict] = {}
        self.ran: list[str] = []
        self.skipped: list[str] = []

    def path(self, rel: str) -> Path:
        return self.out / rel

    def unit(self, stage: str, rel: str, material: dict, build: Callable[[Path], dict | None]) -> dict:
        """Run ``build(tmp_dir)`` unless ``out/rel`` holds a marker with the same key; publish
        ``tmp_dir`` as ``out/rel`` (rename) with ``DONE.json``. Returns the marker."""
        if rel in self.markers:
            return self.markers[rel]
        final = self.path(rel)
        key = hashlib.sha256(json.dumps({"stage": stage, "rel": rel, **material}, sort_keys=True,
                                        default=_json_default).encode()).hexdigest()[:16]
        done = final / "DONE.json"
        old = _read_json(done) if done.is_file() else None
        selected = stage in self.cfg.stages
        if old is not None and old.get("key") == key and not (self.cfg.force and selected):
            _log(f"skip {rel} (done)")
            self.skipped.append(rel)
            self.markers[rel] = old
            return old
        if not selected:
            why = "not run yet" if old is None else "out of date (its settings or inputs changed)"
            raise QuickstartError(f"{final}: stage '{stage}' output is {why}; add it to --stages")
        _log(f"run  {rel}")
        tmp = final.with_name(f".{final.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        t0 = time.time()
        info = build(tmp) or {}
        marker = {"key": key, "run": uuid.uuid4().hex[:12], "stage": stage, "seconds": round(time.time() - t0, 2),
                  "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **info}
        _write_json(tmp / "DONE.json", marker)
        if final.exists():
            trash = final.with_name(f".{final.name}.old")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        self.ran.append(rel)
        self.markers[rel] = marker
        return marker

    def units(self, stage: str, items: Sequence[tuple[str, dict, Callable[[Path], dict | None]]]) -> list[dict]:
        """``unit`` for each (rel, material, build), ``cfg.jobs`` at a time; markers in item order."""
        if self.cfg.jobs <= 1 or len(items) <= 1:
            return [self.unit(stage, *it) for it in items]
        from concurrent.futures import ThreadPoolExecutor
        from queue import Queue

        slots: Queue[int] = Queue()
        for i in range(self.cfg.jobs):
            slots.put(i)

        def one(rel: str, material: dict, build: Callable[[Path], dict | None]) -> dict:
            slot = slots.get()
            _SLOT.value = slot
            try:
                return self.unit(stage, rel, material, build)
            finally:
                _SLOT.value = 0
                slots.put(slot)

        with ThreadPoolExecutor(self.cfg.jobs) as ex:
            futures = [ex.submit(one, *it) for it in items]
            return [f.result() for f in futures]


# ---- stage 1: data -------------------------------------------------------------------------------
def stage_data(p: Pipeline, plan: Plan) -> dict:
    from jam_metaseq import quickstart_data as qd

    cfg = p.cfg

    def build(tmp: Path) -> dict:
        import numpy as np

        counts = {}
        for split, n_txt, n_img, seed in (("train", plan.train_texts, plan.train_images, cfg.seed),
                                          ("valid", plan.valid_texts, plan.valid_images, cfg.seed + 1000)):
            docs = qd.text_documents(n_txt, seed=seed)
            qd.write_jsonl(tmp / f"{split}.text.jsonl", docs)
            samples = qd.caption_samples(n_img, size=plan.image_size, seed=seed,
                                         follow_up=0.3 if split == "train" else 0.0)
            with _bar(len(samples), f"data: {split} images", enabled=cfg.progress, unit="img") as bar:
                pixels = []
                for s in samples:
                    pixels.append(np.asarray(s.image, dtype=np.uint8))
                    bar.update(1)
            np.save(tmp / f"{split}.images.npy", np.stack(pixels))  # (N, H, W, 3) uint8
            qd.write_jsonl(tmp / f"{split}.captions.jsonl",
                           [{"caption": s.caption, "follow_up": s.follow_up, "shape": s.shape,
                             "colour": s.colour, "background": s.background} for s in samples])
            counts[split] = {"text_documents": n_txt, "images": n_img}
        return {"counts": counts}

    return p.unit("data", "data", {"seed": cfg.seed, "plan": [plan.image_size, plan.train_images, plan.valid_images,
                                                               plan.train_texts, plan.valid_texts]}, build)


def _images(path: Path) -> list:
    import numpy as np
    from PIL import Image

    return [Image.fromarray(a) for a in np.load(path)]


# ---- stage 2: tokenizers -----------------------------------------------------------------------
def stage_tokenizers(p: Pipeline, plan: Plan, data: dict) -> dict:
    from jam_metaseq import quickstart_data as qd

    cfg = p.cfg
    final = p.path("tokenizers")

    def build(tmp: Path) -> dict:
        from jam_metaseq.data.tokenizers import train_sentencepiece
        from jam_metaseq.vocab import VocabManifest

        d = p.path("data")
        texts = [s["text"] for doc in qd.read_jsonl(d / "train.text.jsonl") for s in doc["segments"]]
        caps = qd.read_jsonl(d / "train.captions.jsonl")
        texts += [c["caption"] for c in caps] + [c["follow_up"] for c in caps if c["follow_up"]]
        _log(f"tokenizers: sentencepiece on {len(texts)} lines")
        model = train_sentencepiece(texts, out_prefix=tmp / "spm", vocab_size=plan.text_vocab)
        from jam_metaseq.data.tokenizers import load_text_tokenizer

        text_size = load_text_tokenizer(model).vocab_size
        vq = train_image_tokenizer(images=_images(d / "train.images.npy"), out_dir=tmp / "vq",
                                   steps=plan.vq_steps, seed=cfg.seed, progress=cfg.progress)
        grid = tuple(int(g) for g in vq.grid)
        vocab = VocabManifest(text_size=text_size, image_codes=int(vq.n_codes), num_sentinels=plan.num_sentinels,
                              image_tokens_per_image=grid[0] * grid[1], image_grid=grid,
                              text_tokenizer=f"spm:{(final / 'spm.model').resolve()}")
        vocab.save(tmp / "vocab.json")
        return {"text_size": text_size, "image_codes": int(vq.n_codes), "grid": list(grid), "vocab_size": vocab.size}

    return p.unit("tokenizers", "tokenizers", {"data": data["run"], "vq_steps": plan.vq_steps,
                                              "text_vocab": plan.text_vocab, "sentinels": plan.num_sentinels,
                                              "seed": cfg.seed}, build)


def train_image_tokenizer(*, images: list, out_dir: Path, steps: int, seed: int, progress: bool):
    """Train the tiny VQ tokenizer (``jam_metaseq.image_tokenizer``) on ``images``, save it in
    ``out_dir`` and return it (CPU: a few hundred steps of a small convolutional VQGAN)."""
    try:
        from jam_metaseq.image_tokenizer import train_tiny_tokenizer
    except ImportError as e:
        raise QuickstartError(f"the image tokenizer is not available in this build ({e})") from None
    # tiny preset: 32 px images -> 8x8 codes from a codebook of 64 (saved as vqgan.ckpt + vqgan.yaml)
    return train_tiny_tokenizer(images, out_path=out_dir, steps=steps, seed=seed, progress=progress)


def image_tokenizer_path(p: Pipeline) -> Path:
    return p.path("tokenizers") / "vq"


# ---- stage 3: binarize ---------------------------------------------------------------------------
def stage_binarize(p: Pipeline, plan: Plan, data: dict, toks: dict) -> dict:
    from jam_metaseq import quickstart_data as qd

    cfg = p.cfg

    def build(tmp: Path) -> dict:
        import numpy as np

        from jam_metaseq.data.binarize import binarize
        from jam_metaseq.data.tokenizers import load_text_tokenizer
        from jam_metaseq.image_tokenizer import load_image_tokenizer
        from jam_metaseq.vocab import VocabManifest

        d, t = p.path("data"), p.path("tokenizers")
        vocab = VocabManifest.load(t / "vocab.json")
        text_tok = load_text_tokenizer(t / "spm.model")
        vq = load_image_tokenizer(image_tokenizer_path(p), device="cpu")
        stats: dict[str, Any] = {}
        for split in ("train", "valid"):
            images = _images(d / f"{split}.images.npy")
            caps = qd.read_jsonl(d / f"{split}.captions.jsonl")
            codes = []
            with _bar(len(images), f"binarize: encode {split} images", enabled=cfg.progress, unit="img") as bar:
                for i in range(0, len(images), 64):
                    codes.append(np.asarray(vq.encode_images(images[i : i + 64])))
                    bar.update(len(images[i : i + 64]))
            codes_all = np.concatenate(codes)  # (N, h, w)
            docs = [qd.caption_document(caption=c["caption"], codes=k, follow_up=c["follow_up"])
                    for c, k in zip(caps, codes_all)]
            qd.write_jsonl(tmp / "jsonl" / f"{split}.caption.jsonl", docs)
            shutil.copy(d / f"{split}.text.jsonl", tmp / "jsonl" / f"{split}.text.jsonl")
            for source in ("text", "caption"):
                index = binarize(tmp / "jsonl" / f"{split}.{source}.jsonl", out_prefix=tmp / source / split / source,
                                 vocab=vocab, text_tokenizer=text_tok, block_size=plan.tokens_per_sample + 1,
                                 progress=cfg.progress)
                stats[f"{split}.{source}"] = {k: index[k] for k in ("num_tokens", "num_documents", "num_blocks")}
        # the mixed directory (continued pretraining) links both sources
        for split in ("train", "valid"):
            for source in ("text", "caption"):
                dst = tmp / "mixed" / split
                dst.mkdir(parents=True, exist_ok=True)
                for f in (tmp / source / split).iterdir():
                    try:
                        os.symlink(Path("..") / ".." / source / split / f.name, dst / f.name)
                    except OSError:  # no symlinks on this file system
                        shutil.copy(f, dst / f.name)
        for sub in ("text", "caption", "mixed"):
            vocab.save(tmp / sub / "vocab.json")
        return {"stats": stats}

    return p.unit("binarize", "bin", {"data": data["run"], "tokenizers": toks["run"],
                                      "tokens_per_sample": plan.tokens_per_sample}, build)


# ---- fairseq runs --------------------------------------------------------------------------------
def _parent_flags(plan: Plan) -> list[str]:
    return ["--decoder-embed-dim", str(plan.embed_dim), "--decoder-ffn-embed-dim", str(plan.ffn_dim),
            "--decoder-layers", str(plan.layers), "--decoder-attention-heads", str(plan.heads),
            "--max-target-positions", str(plan.tokens_per_sample), "--dropout", "0", "--attention-dropout", "0"]


def _fairseq_env(cfg: QuickstartConfig) -> dict[str, str]:
    pkg, root = _repo_paths()
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if cfg.threads_per_job:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(cfg.threads_per_job)
    if cfg.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif cfg.device.startswith("cuda:"):
        env["CUDA_VISIBLE_DEVICES"] = cfg.device.split(":", 1)[1]
    return env


def _fairseq_command(tool: str) -> list[str]:
    exe = Path(sys.executable).parent / f"fairseq-{tool}"
    if exe.is_file():
        return [str(exe)]
    return [sys.executable, "-m", f"fairseq_cli.{tool}"]


def parse_fairseq_log(line: str) -> tuple[str, dict] | None:
    """A fairseq ``--log-format json`` line -> ("train_inner" | "valid" | "train", record) or None."""
    for tag in ("train_inner", "valid", "train"):
        mark = f"| {tag} | "
        if mark in line:
            try:
                rec = json.loads(line.split(mark, 1)[1])
            except json.JSONDecodeError:
                return None
            return tag, rec
    return None


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def run_fairseq_train(*, cfg: QuickstartConfig, plan: Plan, data: Path, save_dir: Path, arch: list[str],
                      updates: int, lr: float, restore: Path | None, desc: str) -> dict:
    """One ``fairseq-train`` run (a subprocess); returns its validation curve and final train loss.
    The full log is kept in ``save_dir/train.log``."""
    pkg, _ = _repo_paths()
    warmup = max(1, updates // 10)
    every = max(1, updates // plan.curve_points)
    cmd = [*_fairseq_command("train"), str(data), "--user-dir", str(pkg), "--task", "cm3_multimodal",
           "--criterion", "cm3", *arch, "--tokens-per-sample", str(plan.tokens_per_sample),
           "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--clip-norm", "1.0", "--lr", str(lr),
           "--lr-scheduler", "polynomial_decay", "--warmup-updates", str(warmup), "--total-num-update", str(updates),
           "--max-update", str(updates), "--batch-size", str(plan.batch_size),
           "--max-tokens", str(plan.batch_size * plan.tokens_per_sample), "--batch-size-valid", "16",
           "--num-workers", "0", "--seed", str(cfg.seed + 1), "--log-format", "json",
           "--log-interval", str(max(1, min(10, updates // 20))),
           "--validate-interval", "1000000", "--validate-interval-updates", str(every),
           "--save-interval", "1000000", "--no-epoch-checkpoints", "--no-save-optimizer-state",
           "--save-dir", str(save_dir)]
    if restore is not None:
        cmd += ["--restore-file", str(restore), "--reset-optimizer", "--reset-dataloader", "--reset-meters",
                "--reset-lr-scheduler"]
    if cfg.device == "cpu":
        cmd += ["--cpu"]
    save_dir.mkdir(parents=True, exist_ok=True)
    log_path = save_dir / "train.log"
    curve: list[dict] = []
    last_loss = float("nan")
    with open(log_path, "w") as log, _bar(updates, desc, enabled=cfg.progress, unit="upd") as bar:
        log.write(" ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=_fairseq_env(cfg), bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            parsed = parse_fairseq_log(line)
            if parsed is None:
                continue
            tag, rec = parsed
            if tag == "train_inner":
                n = int(_num(rec.get("num_updates", 0)))
                bar.update(max(0, n - bar.n))
                last_loss = _num(rec.get("loss"))
                bar.set_postfix(loss=f"{last_loss:.3f}")
            elif tag == "valid":
                point = {"update": int(_num(rec.get("valid_num_updates", bar.n)))}
                for k in ("ppl", "text_ppl", "image_ppl", "loss"):
                    if f"valid_{k}" in rec:
                        point[k] = _num(rec[f"valid_{k}"])
                curve.append(point)
        rc = proc.wait()
    if rc != 0:
        tail = [ln.strip() for ln in log_path.read_text().splitlines() if ln.strip()][-1:]
        raise QuickstartError(f"fairseq-train failed (exit {rc}) for {desc}; see {log_path}: {tail[0] if tail else ''}")
    for extra in save_dir.glob("checkpoint*.pt"):
        if extra.name != "checkpoint_last.pt":
            extra.unlink()
    if not (save_dir / "checkpoint_last.pt").is_file():
        raise QuickstartError(f"fairseq-train wrote no checkpoint_last.pt in {save_dir}; see {log_path}")
    return {"curve": curve, "final_train_loss": last_loss, "updates": updates,
            "token_budget": updates * plan.tokens_per_update}


# ---- stage 4: parents ----------------------------------------------------------------------------
def stage_parents(p: Pipeline, plan: Plan, bin_: dict) -> dict[str, dict]:
    cfg = p.cfg
    items = []
    for role, source in (("llm", "text"), ("img", "caption")):
        def build(tmp: Path, role: str = role, source: str = source) -> dict:
            # Same --seed for both: the two parents share their initialisation (as two models
            # fine-tuned from one base would), which is what makes weight averaging meaningful.
            info = run_fairseq_train(cfg=cfg, plan=plan, data=p.path("bin") / source, save_dir=tmp,
                                     arch=["--arch", "jam_uniform_tiny", *_parent_flags(plan)],
                                     updates=plan.parent_updates, lr=plan.parent_lr, restore=None,
                                     desc=f"parents: {role} ({source})")
            shutil.copy(p.path("bin") / "mixed" / "vocab.json", tmp / "vocab.json")
            return info

        items.append((f"parents/{role}", {"bin": bin_["run"], "plan": _train_plan(plan, "parent"), "seed": cfg.seed},
                      build))
    return dict(zip(PARENTS, p.units("parents", items)))


def _train_plan(plan: Plan, which: str) -> dict:
    base = {"model": [plan.embed_dim, plan.ffn_dim, plan.layers, plan.heads, plan.tokens_per_sample],
            "batch": plan.batch_size, "points": plan.curve_points}
    if which == "parent":
        return {**base, "updates": plan.parent_updates, "lr": plan.parent_lr}
    return {**base, "updates": plan.variant_updates, "lr": plan.variant_lr}


# ---- stage 5: fuse (jam-ckpt) --------------------------------------------------------------------
def stage_fuse(p: Pipeline, parents: dict[str, dict]) -> dict[str, dict]:
    cfg = p.cfg
    out = {}
    llm = p.path("parents/llm") / "checkpoint_last.pt"
    img = p.path("parents/img") / "checkpoint_last.pt"
    vocab = p.path("bin") / "mixed" / "vocab.json"
    for key in cfg.variants:
        v = VARIANTS[key]

        def build(tmp: Path, v: Variant = v) -> dict:
            from checkpoints_tools import ops
            from checkpoints_tools.writers import OutputSpec

            target = tmp / "ckpt"
            opts = ops.CommonOptions(spec=OutputSpec(out_dir=target), vocab=str(vocab), hash_sources=False,
                                     progress=cfg.progress, command=["jam quickstart", "fuse", v.key])
            if v.family == "jam_uniform":
                ops.merge([llm, img], opts=opts, weights=[0.5, 0.5])
            elif v.family == "jam_width":
                ops.widen(llm, img, opts=opts, init=v.init)
            else:
                ops.cross(llm, img, opts=opts, cross_every=v.cross_every, init=v.init, seed=cfg.seed)
            pts = sorted(target.glob("*.pt"))
            if len(pts) != 1:
                raise QuickstartError(f"{target}: jam-ckpt wrote {len(pts)} .pt files, expected 1")
            return {"checkpoint": f"ckpt/{pts[0].name}"}

        out[key] = p.unit("fuse", f"fused/{key}", {"parents": [parents["llm"]["run"], parents["img"]["run"]],
                                                   "variant": dataclasses.asdict(v), "seed": cfg.seed}, build)
    return out


# ---- stage 6: continued pretraining --------------------------------------------------------------
def _variant_arch(v: Variant, plan: Plan) -> list[str]:
    arch = ["--arch", f"{v.family}_tiny", *_parent_flags(plan)]
    if v.family == "jam_cross":
        arch += ["--cross-every", str(v.cross_every), "--cross-init", v.init]
    return arch


def stage_pretrain(p: Pipeline, plan: Plan, fused: dict[str, dict]) -> dict[str, dict]:
    cfg = p.cfg
    items = []
    for i, key in enumerate(cfg.variants):
        v = VARIANTS[key]

        def build(tmp: Path, v: Variant = v, i: int = i) -> dict:
            start = p.path(f"fused/{v.key}") / fused[v.key]["checkpoint"]
            info = run_fairseq_train(cfg=cfg, plan=plan, data=p.path("bin") / "mixed", save_dir=tmp,
                                     arch=_variant_arch(v, plan), updates=plan.variant_updates, lr=plan.variant_lr,
                                     restore=start, desc=f"pretrain {i + 1}/{len(cfg.variants)}: {v.label}")
            shutil.copy(p.path("bin") / "mixed" / "vocab.json", tmp / "vocab.json")
            return info

        items.append((f"pretrain/{key}", {"fused": fused[key]["run"], "plan": _train_plan(plan, "variant"),
                                          "seed": cfg.seed}, build))
    return dict(zip(cfg.variants, p.units("pretrain", items)))


# ---- stage 7: evaluation -------------------------------------------------------------------------
def _eval_targets(p: Pipeline, parents: dict, fused: dict, trained: dict) -> list[tuple[str, Path, str]]:
    """(name, checkpoint, upstream run id) of every model to evaluate."""
    rows = [(f"parent_{r}", p.path(f"parents/{r}") / "checkpoint_last.pt", parents[r]["run"]) for r in PARENTS]
    for key in p.cfg.variants:
        rows.append((f"start_{key}", p.path(f"fused/{key}") / fused[key]["checkpoint"], fused[key]["run"]))
        rows.append((key, p.path(f"pretrain/{key}") / "checkpoint_last.pt", trained[key]["run"]))
    return rows


def evaluate_checkpoint(*, checkpoint: Path, data_dir: Path, vocab_path: Path, plan: Plan, device: str,
                        progress: bool) -> dict:
    """Text PPL and image-caption PPL of one checkpoint on the validation documents."""
    import torch

    from jam_metaseq.data.tokenizers import load_text_tokenizer
    from jam_metaseq.eval.io import load_checkpoint, read_sequences
    from jam_metaseq.eval.ppl import perplexity
    from jam_metaseq.models import count_parameters
    from jam_metaseq.vocab import VocabManifest

    vocab = VocabManifest.load(vocab_path)
    model, mcfg, _ = load_checkpoint(checkpoint, vocab=vocab_path)
    model = model.to(device)
    tok = load_text_tokenizer(vocab.text_tokenizer)
    out: dict[str, Any] = {"arch": getattr(mcfg, "arch", type(mcfg).__name__), "params": count_parameters(mcfg)}
    with torch.no_grad():
        for kind in ("text", "caption"):
            seqs, _ = read_sequences(data_dir / f"valid.{kind}.jsonl", vocab=vocab, text_tokenizer=tok)
            r = perplexity(model, seqs, vocab=vocab, batch_size=16, max_len=plan.tokens_per_sample, device=device,
                           progress=progress)
            out[kind] = {"ppl": r["ppl"], "tokens": r["tokens"], "text_ppl": r["text"]["ppl"],
                         "image_ppl": r["image"]["ppl"]}
    return out


def stage_eval(p: Pipeline, plan: Plan, bin_: dict, parents: dict, fused: dict, trained: dict) -> dict[str, dict]:
    cfg = p.cfg
    results = {}
    for name, ckpt, run in _eval_targets(p, parents, fused, trained):
        def build(tmp: Path, name: str = name, ckpt: Path = ckpt) -> dict:
            r = evaluate_checkpoint(checkpoint=ckpt, data_dir=p.path("bin") / "jsonl",
                                    vocab_path=p.path("bin") / "mixed" / "vocab.json", plan=plan,
                                    device=cfg.device, progress=cfg.progress)
            _write_json(tmp / "result.json", r)
            return {"result": r}

        results[name] = p.unit("eval", f"eval/{name}", {"model": run, "bin": bin_["run"]}, build)["result"]
    return results


# ---- stage 8: report -----------------------------------------------------------------------------
def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.2f}"
    return str(x)


def _table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]], note: str = "") -> str:
    cells = [[str(h) for h in header]] + [[_fmt(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = "  ".join
    out = [title, line(h.ljust(w[i]) if i == 0 else h.rjust(w[i]) for i, h in enumerate(cells[0])),
           line("-" * x for x in w)]
    out += [line(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) for r in cells[1:]]
    if note:
        out.append(note)
    return "\n".join(out)


def _size(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.0f}K"


def build_results(p: Pipeline, plan: Plan, evals: dict[str, dict], parents: dict, trained: dict) -> dict:
    """The results document: one row per model (parents first), curves, and the four tables."""
    rows = []
    for r, label in PARENTS.items():
        e = evals[f"parent_{r}"]
        rows.append({"key": f"parent_{r}", "model": label, "role": "parent", "params": e["params"],
                     "text_ppl": e["text"]["ppl"], "caption_ppl": e["caption"]["ppl"],
                     "caption_image_ppl": e["caption"]["image_ppl"], "curve": parents[r]["curve"],
                     "updates": parents[r]["updates"], "token_budget": parents[r]["token_budget"]})
    for key in p.cfg.variants:
        v, e, s = VARIANTS[key], evals[key], evals[f"start_{key}"]
        rows.append({"key": key, "model": v.label, "role": "jam", "family": v.family, "init": v.init,
                     "cross_every": v.cross_every if v.family == "jam_cross" else None, "params": e["params"],
                     "text_ppl": e["text"]["ppl"], "caption_ppl": e["caption"]["ppl"],
                     "caption_image_ppl": e["caption"]["image_ppl"],
                     "start": {"text_ppl": s["text"]["ppl"], "caption_ppl": s["caption"]["ppl"]},
                     "curve": trained[key]["curve"], "updates": trained[key]["updates"],
                     "token_budget": trained[key]["token_budget"]})
    by = {r["key"]: r for r in rows}

    def pick(keys: Sequence[str]) -> list[dict]:
        return [by[k] for k in keys if k in by]

    cross_main = PAPER_CROSS if PAPER_CROSS in by else next((k for k in p.cfg.variants if k.startswith("cross")), None)
    t1 = [[r["model"], _size(r["params"]), r["text_ppl"]]
          for r in pick(["parent_llm", "uniform", "width_copy"] + ([cross_main] if cross_main else []))]
    t2 = [[r["model"], _size(r["params"]), r["caption_ppl"]]
          for r in pick(["parent_img", "uniform", "width_copy"] + ([cross_main] if cross_main else []))]
    t3 = [[r["init"].capitalize(), r["text_ppl"], r["caption_ppl"]] for r in pick(["width_copy", "width_average"])]
    t4 = [["X" if r["cross_every"] == 0 else str(r["cross_every"]), r["init"], _size(r["params"]), r["text_ppl"],
           r["caption_ppl"]]
          for init in ("paper", "preserve") for r in pick([f"cross{k}_{init}" for k in (0, 1, 2, 4)])]
    tables = {
        "table1": {"title": "Table 1 (miniature): text modality; validation text PPL (lower is better)",
                   "header": ["Model", "Size", "Text PPL"], "rows": t1,
                   "note": "The paper reports zero-shot accuracy on PIQA, ARC, StoryCloze, Winograd(e); those "
                           "need real data, so this miniature reports text perplexity instead."},
        "table2": {"title": "Table 2 (miniature): image-text modality; validation image-caption PPL",
                   "header": ["Model", "Size", "Caption PPL"], "rows": t2,
                   "note": "Caption PPL = perplexity of whole caption+image documents (the MS-COCO PPL role)."},
        "table3": {"title": "Table 3 (miniature): JAM-Width initialisation", "header": ["Init.", "Text PPL",
                                                                                        "Caption PPL"], "rows": t3},
        "table4": {"title": "Table 4 (miniature): JAM-Cross cross-attention frequency (X = none)",
                   "header": ["C-Attn", "Init", "Size", "Text PPL", "Caption PPL"], "rows": t4},
    }
    allrows = [[r["model"], _size(r["params"]),
                r.get("start", {}).get("text_ppl"), r["text_ppl"],
                r.get("start", {}).get("caption_ppl"), r["caption_ppl"]] for r in rows]
    tables["all"] = {"title": "All models: validation PPL at the start of continued pretraining (fused) and after",
                     "header": ["Model", "Size", "Text@start", "Text", "Caption@start", "Caption"], "rows": allrows,
                     "note": f"Same budget for every JAM model: {plan.variant_updates} updates x {plan.batch_size} "
                             f"x {plan.tokens_per_sample} tokens = {plan.variant_updates * plan.tokens_per_update:,} "
                             "tokens; parents are the reference rows (no continued pretraining)."}
    return {"settings": {"steps": p.cfg.steps, "scale": p.cfg.scale, "seed": p.cfg.seed, "device": p.cfg.device,
                         "variants": list(p.cfg.variants)},
            "plan": dataclasses.asdict(plan), "rows": rows, "tables": tables}


def render_tables(results: dict) -> str:
    return "\n\n".join(_table(t["title"], t["header"], t["rows"], t.get("note", ""))
                       for t in results["tables"].values() if t["rows"])


def plot_curves(results: dict, path: Path) -> None:
    """Validation PPL against updates: parents, then every JAM variant (text and image tokens)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    panels = [("parents (from scratch)", "parent", None), ("continued pretraining: text-token PPL", "jam", "text_ppl"),
              ("continued pretraining: image-token PPL", "jam", "image_ppl")]
    colours = plt.get_cmap("tab20").colors
    for ax, (title, role, metric) in zip(axes, panels):
        for i, r in enumerate(results["rows"]):
            if r["role"] != role or not r["curve"]:
                continue
            metrics = [metric] if metric else (["text_ppl"] if r["key"] == "parent_llm" else ["text_ppl", "image_ppl"])
            for m in metrics:
                pts = [(c["update"], c[m]) for c in r["curve"] if m in c and math.isfinite(c[m])]
                if pts:
                    style = "--" if r.get("init") in ("preserve", "average") else "-"
                    label = r["model"] + ("" if metric else f" {m.split('_')[0]}")
                    ax.plot([x for x, _ in pts], [y for _, y in pts], style, marker="o", ms=3, label=label,
                            color=colours[(2 * i + (m == "image_ppl" and not metric)) % len(colours)])
        ax.set_title(title)
        ax.set_xlabel("update")
        ax.set_ylabel("validation PPL")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def stage_report(p: Pipeline, plan: Plan, evals: dict, parents: dict, trained: dict) -> dict:
    runs = sorted(m["run"] for rel, m in p.markers.items() if rel.startswith(("eval/", "pretrain/", "parents/")))

    def build(tmp: Path) -> dict:
        results = build_results(p, plan, evals, parents, trained)
        _write_json(tmp / "results.json", results)
        (tmp / "tables.txt").write_text(render_tables(results) + "\n")
        plot_curves(results, tmp / "curves.png")
        return {}

    return p.unit("report", "report", {"runs": runs, "variants": list(p.cfg.variants)}, build)


# ---- stage 9: generation -------------------------------------------------------------------------
def best_cross(results: dict) -> dict:
    """The JAM-Cross row with the lowest geometric mean of text and caption PPL (any JAM row if no
    JAM-Cross was trained)."""
    jam = [r for r in results["rows"] if r["role"] == "jam"]
    pool = [r for r in jam if r.get("family") == "jam_cross"] or jam
    return min(pool, key=lambda r: math.log(r["text_ppl"]) + math.log(r["caption_ppl"]))


def stage_generate(p: Pipeline, plan: Plan, report: dict) -> dict:
    cfg = p.cfg

    def build(tmp: Path) -> dict:
        from jam_metaseq.generation.engine import GenerationConfig
        from jam_metaseq.generation.run import PromptSpec, generate_answers
        from jam_metaseq.generation.sampling import SamplingConfig
        from jam_metaseq.vocab import VocabManifest

        results = _read_json(p.path("report") / "results.json")
        best = best_cross(results)
        vocab = VocabManifest.load(p.path("bin") / "mixed" / "vocab.json")
        gen = GenerationConfig(max_new_tokens=vocab.image_tokens_per_image + 40, min_images=1, max_images=1,
                               guidance_scale=3.5, seed=cfg.seed,
                               text=SamplingConfig(temperature=1.0, top_p=0.9),
                               image=SamplingConfig(temperature=1.0, top_p=0.9))
        answers = generate_answers(checkpoint=p.path(f"pretrain/{best['key']}") / "checkpoint_last.pt",
                                   prompts=[PromptSpec(text=t) for t in cfg.prompts], config=gen,
                                   vocab_path=p.path("bin") / "mixed" / "vocab.json",
                                   image_tokenizer=str(image_tokenizer_path(p)), out_dir=tmp, device=cfg.device,
                                   progress=cfg.progress)
        return {"model": best["key"], "label": best["model"], "answers": len(answers),
                "images": sum(1 for a in answers for s in a.images if getattr(s, "png", None))}

    return p.unit("generate", "generate", {"report": report["run"], "prompts": list(cfg.prompts), "seed": cfg.seed},
                  build)


# ---- the pipeline --------------------------------------------------------------------------------
def run_quickstart(cfg: QuickstartConfig) -> dict:
    """Run (or resume) every stage; returns ``{"results": ..., "paths": ..., "ran": ..., "skipped": ...}``."""
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    plan = plan_for(scale=cfg.scale, steps=cfg.steps)
    cfg.out.mkdir(parents=True, exist_ok=True)
    p = Pipeline(cfg)
    t0 = time.time()
    # Stages after the last selected one are not run; earlier unselected ones must be finished.
    last = max(STAGES.index(s) for s in cfg.stages)

    def wanted(stage: str) -> bool:
        return STAGES.index(stage) <= last

    results: dict[str, Any] = {}
    data = stage_data(p, plan)
    toks = stage_tokenizers(p, plan, data) if wanted("tokenizers") else None
    bin_ = stage_binarize(p, plan, data, toks) if wanted("binarize") else None
    parents = stage_parents(p, plan, bin_) if wanted("parents") else None
    fused = stage_fuse(p, parents) if wanted("fuse") else None
    trained = stage_pretrain(p, plan, fused) if wanted("pretrain") else None
    evals = stage_eval(p, plan, bin_, parents, fused, trained) if wanted("eval") else None
    report = stage_report(p, plan, evals, parents, trained) if wanted("report") else None
    if report is not None:
        results = _read_json(p.path("report") / "results.json")
    if wanted("generate"):
        gen = stage_generate(p, plan, report)
        results["generation"] = {k: gen.get(k) for k in ("model", "label", "answers", "images")}
    paths = {"results": p.path("report") / "results.json", "tables": p.path("report") / "tables.txt",
             "curves": p.path("report") / "curves.png", "html": p.path("generate") / "answers.html",
             "checkpoints": p.path("pretrain")}
    _log(f"finished in {time.time() - t0:.0f} s ({len(p.ran)} units run, {len(p.skipped)} skipped)")
    return {"results": results, "paths": paths, "ran": p.ran, "skipped": p.skipped}


# ---- CLI -----------------------------------------------------------------------------------------
def _csv(choices: Sequence[str], what: str) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(s.strip() for s in text.split(",") if s.strip())
        bad = [s for s in items if s not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad) or '(none)'}; choose from {', '.join(choices)}")
        return items

    return parse


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="jam quickstart", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The JAM pipeline in miniature on data made on the fly: train a tiny text LLM and a tiny "
                    "image-caption model, fuse them as JAM-Uniform / JAM-Width / JAM-Cross with jam-ckpt, continue "
                    "pretraining each through fairseq with the same token budget, evaluate, print miniature "
                    "Tables 1-4, plot validation curves and write an HTML page with a generated interleaved answer.",
        epilog="Stages: " + ", ".join(STAGES) + ".\nVariants: " + ", ".join(VARIANTS) + ".\n"
               "Outputs: OUT/report/{results.json,tables.txt,curves.png}, OUT/generate/answers.html, "
               "checkpoints in OUT/parents, OUT/fused, OUT/pretrain.\n"
               "A re-run skips every finished unit whose settings and inputs are unchanged.")
    ap.add_argument("--out", type=Path, default=Path("runs/quickstart"), metavar="DIR",
                    help="output directory (default: runs/quickstart)")
    ap.add_argument("--steps", type=float, default=1.0, metavar="X",
                    help="multiply the length of every training stage by X (default 1; 0.1 for a smoke test)")
    ap.add_argument("--scale", type=int, default=1, metavar="N",
                    help="multiply model width and data size by N (default 1; use with --device cuda)")
    ap.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda or cuda:N")
    ap.add_argument("--seed", type=int, default=0, help="seed of data, initialisations, training and sampling (default 0)")
    ap.add_argument("--stages", type=_csv(STAGES, "stage"), default=STAGES, metavar="S[,S...]",
                    help="run only these stages (the others' outputs must exist); default: all")
    ap.add_argument("--variants", type=_csv(tuple(VARIANTS), "variant"), default=tuple(VARIANTS), metavar="V[,V...]",
                    help="JAM variants to build and train (default: all 11)")
    ap.add_argument("--force", action="store_true", help="re-run the selected stages even when finished")
    ap.add_argument("--jobs", type=int, default=0, metavar="J",
                    help="training runs at once (default 0 = 2 on a CPU with >= 2 cores, 1 on an accelerator)")
    ap.add_argument("--threads", type=int, default=0, metavar="T",
                    help="CPU threads per process (default 0 = the cores divided among --jobs)")
    ap.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                    help="prompt of a generated answer (repeatable; default: two shape captions)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    return ap


def _run(args: argparse.Namespace) -> int:
    cfg = QuickstartConfig(out=args.out, steps=args.steps, scale=args.scale, device=args.device, seed=args.seed,
                           stages=args.stages, variants=args.variants, force=args.force, threads=args.threads,
                           jobs=args.jobs,
                           progress=not args.no_progress,
                           **({"prompts": tuple(args.prompt)} if args.prompt else {}))
    plan_for(scale=cfg.scale, steps=cfg.steps)  # validates --scale/--steps before any work
    out = run_quickstart(cfg)
    if out["results"].get("tables"):
        print(render_tables(out["results"]))
    g = out["results"].get("generation")
    if g:
        print(f"\ngenerated answers: {g.get('label')} ({g.get('images')} decoded images)")
    for k, v in out["paths"].items():
        if Path(v).exists():
            print(f"{k:<12}{v}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    return run_cli("jam quickstart", lambda: _run(args),
                   interrupted="finished stages are kept: run the same command again to resume")


if __name__ == "__main__":
    sys.exit(main())
