"""The stages of ``jam run`` (paper §2-3), each a function of the pipeline, the plan and the
markers of the stages it reads:

  data        the generator's documents (JSONL + PNG files) or the plan's JSONL files (fingerprinted,
              so a changed file re-runs what depends on it); a budget sweep grows the generator's
              continued-pretraining set with the budget
  tokenizers  the text tokenizer (given or trained), the image tokenizer (given or trained: the small
              VQ of §3.1 "Tokenizers"), the vocabulary manifest (given or built)
  binarize    JSONL -> ``jam-data`` memory-mapped blocks: text, caption, mixed (continued
              pretraining), instruct, and the evaluation sets
  parents     a given checkpoint (recorded, read in place), or trained from the data through the
              host (both from the same initialisation)
  fuse        ``jam-ckpt`` (``checkpoints_tools.ops``): JAM-Uniform (Eq. 1), JAM-Width (Eq. 2-3),
              JAM-Cross (§2.1.3) per variant
  pretrain    continued pretraining of every variant on every budget through the host (§3.1)
  instruct    instruction tuning of chosen variants, one run per mixture (§2.2, Table 5)
  eval        text and image-caption perplexity of every model on every evaluation set

Layout under the output folder: ``data/``, ``data-<budget>/`` (grown sets), ``tokenizers/``, ``bin/``,
``bin-<budget>/``, ``parents/{llm,img}``, ``fused/<variant>``, ``pretrain/<budget>/<variant>``,
``instruct/<variant>/<mixture>``, ``eval/...``, ``report/``, ``generate/``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from jam_metaseq.pipeline.spec import PARENTS, VARIANTS, PlanSpec, ShapeSpec, Variant
from jam_metaseq.pipeline.train import TrainJob, train
from jam_metaseq.pipeline.units import Pipeline, PipelineError, bar, log, read_json, write_json

KINDS = ("text", "caption")
"""Evaluation kinds: text-only documents and image-caption documents."""


def budget_tag(tokens: int) -> str:
    """A budget's folder name: ``192k``, ``3M``, or the exact count."""
    for unit, n in (("M", 1_000_000), ("k", 1_000)):
        if tokens % n == 0:
            return f"{tokens // n}{unit}"
    return str(tokens)


@dataclass
class Context:
    """What every stage needs: the pipeline, the plan, where runs go."""

    p: Pipeline
    plan: PlanSpec
    placement: Any
    """``train.LocalPlacement`` or ``train.SubmititPlacement``."""
    progress: bool = True
    markers: dict[str, Any] = field(default_factory=dict)
    """Stage results shared between stages (``data``, ``tokenizers``, ...)."""
    jobs: dict[str, TrainJob] = field(default_factory=dict)
    """Training jobs by unit (what ``--dry-run`` prints)."""
    given: dict[str, Any] = field(default_factory=dict)
    """Given parents: role -> (config, vocabulary or None), from ``check_plan``."""

    @property
    def dry(self) -> bool:
        return self.p.options.dry_run

    def path(self, rel: str) -> Path:
        return self.p.path(rel)

    def tmp(self, rel: str) -> Path:
        """Where a unit is built before it is renamed into place (``Pipeline.unit``)."""
        final = self.path(rel)
        return final.with_name(f".{final.name}.tmp")

    def train(self, rel: str, job: TrainJob) -> tuple[TrainJob, Any]:
        """Register ``job`` (built in unit ``rel``) and return it with a build function running it."""
        self.jobs[rel] = job

        def build(tmp: Path) -> dict:
            assert tmp == job.save_dir, (tmp, job.save_dir)
            info = train(job, plan=self.plan, placement=self.placement)
            shutil.copy(tokenizer_paths(self)["vocab"], tmp / "vocab.json")
            return info

        return job, build


# ---- data ------------------------------------------------------------------------------------
@dataclass
class Sources:
    """The JSONL files of every source and split, after the data stage."""

    files: dict[str, dict[str, list[Path]]]
    """split -> source -> files (sources: text, caption, instruct)."""
    grown: dict[int, dict[str, list[Path]]]
    """budget -> source -> the training files of that budget's continued pretraining (the generator's
    growth); budgets not listed use ``files["train"]``."""
    eval_sets: dict[str, dict[str, list[Path]]]
    """kind (text / caption) -> set name -> files."""
    run: str
    """Run id of the data unit."""
    grown_runs: dict[int, str] = field(default_factory=dict)


def _fingerprint(paths: list[Path]) -> list[list]:
    out = []
    for p in paths:
        st = p.stat()
        out.append([str(p), st.st_size, st.st_mtime_ns])
    return out


def _write_generated(tmp: Path, *, plan: PlanSpec, split: str, n_text: int, n_img: int, n_instruct: int,
                     seed: int, follow_up: float, progress: bool, image_dir: str) -> dict[str, int]:
    """The generator's documents of one split: ``{split}.{text,caption,instruct}.jsonl`` + PNGs."""
    from jam_metaseq import quickstart_data as qd

    g = plan.data.builtin
    qd.write_jsonl(tmp / f"{split}.text.jsonl", qd.text_documents(n_text, seed=seed))
    images = tmp / image_dir
    images.mkdir(parents=True, exist_ok=True)
    docs = []
    samples = qd.caption_samples(n_img, size=g.image_size, seed=seed, follow_up=follow_up)
    with bar(len(samples), f"data: {split} images", enabled=progress, unit="img") as pbar:
        for i, s in enumerate(samples):
            rel = f"{image_dir}/{i:06d}.png"
            s.image.save(tmp / rel)
            docs.append(qd.caption_document(caption=s.caption, image=rel, follow_up=s.follow_up))
            pbar.update(1)
    qd.write_jsonl(tmp / f"{split}.caption.jsonl", docs)
    counts = {"text": n_text, "caption": n_img}
    if n_instruct:
        idocs = []
        for i, s in enumerate(qd.instruct_samples(n_instruct, size=g.image_size, seed=seed + 77)):
            rel = f"{image_dir}/instruct-{i:06d}.png"
            s.image.save(tmp / rel)
            idocs.append(qd.instruct_document(s, image=rel))
        qd.write_jsonl(tmp / f"{split}.instruct.jsonl", idocs)
        counts["instruct"] = n_instruct
    return counts


def stage_data(ctx: Context) -> Sources:
    plan, p = ctx.plan, ctx.p
    d, g = plan.data, plan.data.builtin
    if g is not None:
        def build(tmp: Path) -> dict:
            counts = {}
            for split, nt, ni, nn, seed, fu in (
                    ("train", g.train_texts, g.train_images, g.train_instruct, plan.seed, g.follow_up),
                    ("valid", g.valid_texts, g.valid_images, g.valid_instruct, plan.seed + 1000, 0.0)):
                counts[split] = _write_generated(tmp, plan=plan, split=split, n_text=nt, n_img=ni, n_instruct=nn,
                                                 seed=seed, follow_up=fu, progress=ctx.progress,
                                                 image_dir=f"images/{split}")
            return {"counts": counts}

        gen = {k: v for k, v in dataclasses.asdict(g).items() if k != "grow_with_budget"}
        m = p.unit("data", "data", {"seed": plan.seed, "generator": gen}, build)
        base = p.path("data")
        files = {split: {s: [base / f"{split}.{s}.jsonl"] for s in ("text", "caption")
                         + (("instruct",) if g.train_instruct else ())} for split in ("train", "valid")}
        grown, grown_runs = {}, {}
        if g.grow_with_budget:
            for budget in plan.budgets:
                factor = budget / plan.reference_budget
                extra_t, extra_i = (int(round(n * (factor - 1))) for n in (g.train_texts, g.train_images))
                if extra_t < 1 and extra_i < 1:
                    continue
                tag = budget_tag(budget)
                seed = (plan.seed * 1_000_003 + budget) % 2**31

                def build_more(tmp: Path, extra_t: int = max(1, extra_t), extra_i: int = max(1, extra_i),
                               seed: int = seed) -> dict:
                    return {"counts": _write_generated(tmp, plan=plan, split="train", n_text=extra_t, n_img=extra_i,
                                                       n_instruct=0, seed=seed, follow_up=g.follow_up,
                                                       progress=ctx.progress, image_dir="images")}

                gm = p.unit("data", f"data-{tag}", {"seed": seed, "generator": gen, "extra": [extra_t, extra_i]},
                            build_more)
                grown[budget] = {s: files["train"][s] + [p.path(f"data-{tag}") / f"train.{s}.jsonl"]
                                 for s in ("text", "caption")}
                grown_runs[budget] = gm["run"]
    else:
        files = {"train": {"text": d.text.train, "caption": d.caption.train},
                 "valid": {"text": d.text.valid, "caption": d.caption.valid}}
        if d.instruct is not None:
            files["train"]["instruct"] = d.instruct.train
            files["valid"]["instruct"] = d.instruct.valid
        grown, grown_runs = {}, {}
        every = sorted({f for split in files.values() for fs in split.values() for f in fs}
                       | {f for kind in ("text", "caption") for fs in (getattr(plan.eval, kind) or {}).values()
                          for f in fs})

        def record(tmp: Path) -> dict:
            write_json(tmp / "sources.json", {"files": {s: {k: [str(f) for f in v] for k, v in x.items()}
                                                       for s, x in files.items()}})
            return {}

        m = p.unit("data", "data", {"files": _fingerprint(every)}, record)
    eval_sets = {kind: dict(getattr(plan.eval, kind) or {"valid": files["valid"][kind]}) for kind in KINDS}
    return Sources(files=files, grown=grown, eval_sets=eval_sets, run=m["run"], grown_runs=grown_runs)


# ---- tokenizers ------------------------------------------------------------------------------------
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


def _image_paths(paths: list[Path], *, limit: int) -> list[Path]:
    """Image files named by ``{"image": path}`` segments (relative to each file's folder)."""
    from jam_metaseq.data.documents import DocumentError, document_parts, parse_jsonl_line

    out: list[Path] = []
    for path in paths:
        with open(path, "rb") as f:
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


def tokenizer_paths(ctx: Context) -> dict[str, Path]:
    """The manifest and image tokenizer of the run (after the tokenizers stage)."""
    m = ctx.markers["tokenizers"]
    image = m.get("image_tokenizer")
    return {"vocab": ctx.path("tokenizers") / "vocab.json",
            "image_tokenizer": Path(image) if image else ctx.path("tokenizers") / "vq"}


def stage_tokenizers(ctx: Context, src: Sources) -> dict:
    plan, p = ctx.plan, ctx.p
    d = plan.data
    final = p.path("tokenizers")
    fp = []
    for given in (d.vocab, d.image_tokenizer.path):
        if given is not None:
            fp.append(_fingerprint(sorted(Path(given).glob("*")) if Path(given).is_dir() else [Path(given)]))
    # given parents that carry their manifest (jam-ckpt / jam run outputs) fix the vocabulary
    parent_vocab = next((v for _, v in ctx.given.values() if v is not None), None) if d.vocab is None else None
    tt = d.text_tokenizer
    if tt.path not in (None, "bytes"):
        fp.append(_fingerprint([Path(tt.path.split(":", 1)[-1] if tt.path.startswith(("spm:", "bpe:")) else tt.path)]))

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

            images = _image_paths(src.files["train"]["caption"], limit=d.image_tokenizer.max_images)
            if not images:
                raise PipelineError("data.image_tokenizer: no {\"image\": path} segment in the caption training "
                                    "files to train an image tokenizer on; give data.image_tokenizer.path")
            log(f"tokenizers: image tokenizer on {len(images)} images, {d.image_tokenizer.steps} steps")
            vq = train_tiny_tokenizer([str(x) for x in images], out_path=tmp / "vq", steps=d.image_tokenizer.steps,
                                      seed=plan.seed, progress=ctx.progress, pool_size=len(images))
        grid = tuple(int(x) for x in vq.grid)
        if given_vocab is not None:
            problems = []
            if given_vocab.image_codes != int(vq.n_codes) or tuple(given_vocab.image_grid) != grid:
                problems.append(f"image tokenizer has {vq.n_codes} codes on a {grid} grid, the manifest "
                                f"{given_vocab.image_codes} on {tuple(given_vocab.image_grid)}")
            if text_size > given_vocab.text_size:
                problems.append(f"text tokenizer has {text_size} ids, the manifest's text range {given_vocab.text_size}")
            if problems:
                raise PipelineError(f"data.vocab {d.vocab}: " + "; ".join(problems))
            vocab = dataclasses.replace(given_vocab, text_tokenizer=spec)
        else:
            vocab = VocabManifest(text_size=text_size, image_codes=int(vq.n_codes), num_sentinels=d.num_sentinels,
                                  image_tokens_per_image=grid[0] * grid[1], image_grid=grid, text_tokenizer=spec)
        vocab.save(tmp / "vocab.json")
        return {**info, "text_size": text_size, "image_codes": int(vq.n_codes), "grid": list(grid),
                "vocab_size": vocab.size}

    material = {"data": src.run, "text": dataclasses.asdict(tt), "image": dataclasses.asdict(d.image_tokenizer),
                "vocab": str(d.vocab) if d.vocab else None, "given": fp,
                "parent_vocab": parent_vocab.to_dict() if parent_vocab is not None else None, "sentinels": d.num_sentinels,
                "seed": plan.seed}
    m = p.unit("tokenizers", "tokenizers", material, build)
    ctx.markers["tokenizers"] = m
    return m


# ---- binarize --------------------------------------------------------------------------------------
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
            "image": load_image_tokenizer(paths["image_tokenizer"], device="cpu")}


def _instruct_transform(ctx: Context, tools: dict) -> Any:
    from jam_metaseq.data.instruct import make_transform

    spec = ctx.plan.data.instruct
    if spec is None:
        return None
    return make_transform(spec.format, vocab=tools["vocab"], text_tokenizer=tools["text"],
                          max_tokens=ctx.plan.data.tokens_per_sample, max_images=spec.max_images)


def eval_prefix(ctx: Context, src: Sources, kind: str, name: str) -> Path:
    """The binarized prefix of an evaluation set (the validation split's when it is the same files)."""
    if src.eval_sets[kind][name] == src.files["valid"][kind]:
        return ctx.path("bin") / kind / "valid" / kind
    return ctx.path("bin") / "eval" / kind / name


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
            transform = _instruct_transform(ctx, tools)
            for split in ("train", "valid"):
                stats[f"{split}.instruct"] = _binarize(src.files[split]["instruct"],
                                                       tmp / "instruct" / split / "instruct", ctx=ctx, tools=tools,
                                                       transform=transform)
                _link_prefix(tmp / "caption" / split / "caption", tmp / "instruct" / split)
        for kind in KINDS:
            for name, files in src.eval_sets[kind].items():
                if files != src.files["valid"][kind]:
                    stats[f"eval.{kind}.{name}"] = _binarize(files, tmp / "eval" / kind / name, ctx=ctx, tools=tools)
        for sub in ("text", "caption", "mixed") + (("instruct",) if has_instruct else ()):
            tools["vocab"].save(tmp / sub / "vocab.json")
        return {"stats": stats}

    material = {"data": src.run, "tokenizers": toks["run"], "tokens_per_sample": plan.data.tokens_per_sample,
                "on_error": plan.data.on_error,
                "instruct": dataclasses.asdict(plan.data.instruct) if plan.data.instruct else None}
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


def pretrain_data(ctx: Context, budget: int) -> Path:
    grown = ctx.markers["bin"].get(budget)
    return ctx.path(f"bin-{budget_tag(budget)}" if grown is not None else "bin") / "mixed"


# ---- models ----------------------------------------------------------------------------------------
def parent_config(ctx: Context, role: str = "llm") -> Any:
    """Parent ``role``'s ``DecoderConfig`` (a given parent's, else the plan's shape for it:
    ``model``, or ``image_model`` for the image parent). Parents of one shape: either role's."""
    from jam_metaseq.models.config import DecoderConfig, config_from_dict

    roles = [role] + ([] if ctx.plan.asymmetric else [r for r in PARENTS if r != role])
    for r in roles:
        if r in ctx.given:
            return ctx.given[r][0]
        m = ctx.markers.get("parents", {}).get(r, {})
        if m.get("config"):
            return config_from_dict(m["config"])
    s: ShapeSpec = ctx.plan.image_shape if role == "img" else ctx.plan.shape
    vocab_size = ctx.markers["tokenizers"].get("vocab_size", 0) or 8
    return DecoderConfig(vocab_size=vocab_size, embed_dim=s.embed_dim, ffn_dim=s.ffn_dim, layers=s.layers,
                         heads=s.heads, max_positions=ctx.plan.data.tokens_per_sample, bias=s.bias,
                         affine_ln=s.affine_ln, activation=s.activation)


def variant_config(ctx: Context, v: Variant, *, role: str = "llm") -> Any:
    """The model a variant trains: the family's config of the (``role``) parent's shape; JAM-Cross
    with the image parent's shape for its image branch (``config.SHAPE_FIELDS``: what the host's
    ``--img-*`` flags carry)."""
    from jam_metaseq.models.config import SHAPE_FIELDS, cross_of, uniform_of, width_of

    parent = parent_config(ctx, role)
    if v.family == "jam_uniform":
        return uniform_of(parent)
    if v.family == "jam_width":
        return width_of(parent)
    img = parent_config(ctx, "img")
    return cross_of(parent, v.cross_every, cross_init=v.init,
                    image_parent=dataclasses.replace(parent, **{f: getattr(img, f) for f in SHAPE_FIELDS}))


def variant_flags(ctx: Context, v: Variant, *, role: str = "llm") -> tuple[str, list[str]]:
    """(arch, model flags) of a variant's training command: the family's ``_tiny`` arch (its
    preset has every switch off, so the flags decide every field) and
    ``flags.command_line_from_config``."""
    from jam_metaseq.flags import command_line_from_config

    return f"{v.family}_tiny", command_line_from_config(variant_config(ctx, v, role=role))


def parent_checkpoint(ctx: Context, role: str) -> Path:
    spec = getattr(ctx.plan.parents, role)
    return Path(spec.checkpoint) if not spec.trained else ctx.path(f"parents/{role}") / "checkpoint_last.pt"


def stage_parents(ctx: Context, bin_: dict) -> dict[str, dict]:
    plan, p = ctx.plan, ctx.p
    out: dict[str, dict] = {}
    ctx.markers["parents"] = out
    given = {role: getattr(plan.parents, role) for role in PARENTS if not getattr(plan.parents, role).trained}
    for role, spec in given.items():
        def record(tmp: Path, spec: Any = spec, role: str = role) -> dict:
            from checkpoints_tools.readers import open_checkpoint

            r = open_checkpoint(spec.checkpoint)
            cfg = r.config(**({"heads": spec.heads} if spec.heads else {}))
            return {"checkpoint": str(Path(spec.checkpoint).resolve()), "given": True, "config": cfg.to_dict(),
                    "params": r.num_params(), "curve": [], "updates": 0, "token_budget": 0}

        files = _checkpoint_files(spec.checkpoint)
        out[role] = p.unit("parents", f"parents/{role}", {"checkpoint": _fingerprint(files), "heads": spec.heads},
                           record)
    items = []
    for role, source in (("llm", "text"), ("img", "caption")):
        if role in given:
            continue
        t = plan.parents.train
        tpu = t.batch_size * plan.data.tokens_per_sample
        rel = f"parents/{role}"
        # Same --seed for both: the two parents share their initialisation (as two models
        # fine-tuned from one base would), which is what makes weight averaging meaningful.
        arch, flags = variant_flags(ctx, VARIANTS["uniform"], role=role)
        job, run = ctx.train(rel, TrainJob(
            desc=f"parents: {role} ({source})", data=ctx.path("bin") / source, save_dir=ctx.tmp(rel), arch=arch,
            model_flags=flags, optim=t, updates=t.budget_tokens // tpu, tokens_per_sample=plan.data.tokens_per_sample,
            seed=plan.seed + 1))

        def build(tmp: Path, run: Any = run) -> dict:
            return {**run(tmp), "checkpoint": "checkpoint_last.pt"}

        material = {"bin": bin_[None]["run"], "train": dataclasses.asdict(t), "shape": flags,
                    "seed": plan.seed, "host": plan.host, "precision": plan.precision}
        items.append((rel, material, build))
    for (rel, _, _), m in zip(items, p.units("parents", items, resumable=True)):
        out[rel.split("/")[1]] = m
    return out


def _checkpoint_files(path: Path) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        return sorted(f for f in path.iterdir() if f.is_file())
    if path.is_file():
        return [path]
    stem = path.name[:-3] if path.name.endswith(".pt") else path.name
    return sorted(path.parent.glob(f"{stem}-*.pt"))


# ---- fuse ------------------------------------------------------------------------------------------
def stage_fuse(ctx: Context) -> dict[str, dict]:
    plan, p = ctx.plan, ctx.p
    out = {}
    llm, img = parent_checkpoint(ctx, "llm"), parent_checkpoint(ctx, "img")
    vocab = tokenizer_paths(ctx)["vocab"]
    heads = plan.parents.llm.heads or plan.parents.img.heads
    for key in plan.variants:
        v = VARIANTS[key]

        def build(tmp: Path, v: Variant = v) -> dict:
            from checkpoints_tools import ops
            from checkpoints_tools.writers import OutputSpec

            target = tmp / "ckpt"
            opts = ops.CommonOptions(spec=OutputSpec(out_dir=target), vocab=str(vocab), hash_sources=False,
                                     progress=ctx.progress, command=["jam run", "fuse", v.key])
            if v.family == "jam_uniform":
                ops.merge([llm, img], opts=opts, weights=[0.5, 0.5], heads=heads)
            elif v.family == "jam_width":
                ops.widen(llm, img, opts=opts, init=v.init, heads=heads)
            else:
                ops.cross(llm, img, opts=opts, cross_every=v.cross_every, init=v.init, seed=plan.seed, heads=heads)
            pts = sorted(target.glob("*.pt"))
            if len(pts) != 1:
                raise PipelineError(f"{target}: jam-ckpt wrote {len(pts)} .pt files, expected 1")
            return {"checkpoint": f"ckpt/{pts[0].name}"}

        parents = [ctx.markers["parents"][r]["run"] for r in PARENTS]
        out[key] = p.unit("fuse", f"fused/{key}", {"parents": parents, "variant": dataclasses.asdict(v),
                                                   "seed": plan.seed}, build)
    ctx.markers["fused"] = out
    return out


def fused_checkpoint(ctx: Context, key: str) -> Path:
    return ctx.path(f"fused/{key}") / ctx.markers["fused"][key].get("checkpoint", "ckpt/checkpoint.pt")


# ---- continued pretraining -------------------------------------------------------------------------
def stage_pretrain(ctx: Context) -> dict[int, dict[str, dict]]:
    plan, p = ctx.plan, ctx.p
    o = plan.pretrain
    tpu = o.batch_size * plan.data.tokens_per_sample
    out: dict[int, dict[str, dict]] = {}
    n = len(plan.variants) * len(plan.budgets)
    optim = {k: val for k, val in dataclasses.asdict(o).items() if k != "budget_tokens"}
    items = []
    for budget in plan.budgets:
        tag = budget_tag(budget)
        data_run = (ctx.markers["bin"].get(budget) or ctx.markers["bin"][None])["run"]
        for key in plan.variants:
            v = VARIANTS[key]
            rel = f"pretrain/{tag}/{key}"
            arch, flags = variant_flags(ctx, v)
            job, run = ctx.train(rel, TrainJob(
                desc=f"pretrain {len(items) + 1}/{n}: {v.label} ({tag} tokens)", data=pretrain_data(ctx, budget),
                save_dir=ctx.tmp(rel), arch=arch, model_flags=flags, optim=o, updates=budget // tpu,
                tokens_per_sample=plan.data.tokens_per_sample, seed=plan.seed + 1,
                restore=fused_checkpoint(ctx, key), mixture=o.mixture))

            def build(tmp: Path, run: Any = run, budget: int = budget) -> dict:
                return {**run(tmp), "budget": budget}

            items.append((rel, {"fused": ctx.markers["fused"][key]["run"], "data": data_run, "optim": optim,
                                "budget": budget, "shape": flags, "seed": plan.seed, "host": plan.host,
                                "precision": plan.precision}, build))
    markers = p.units("pretrain", items, resumable=True)
    for (rel, material, _), m in zip(items, markers):
        out.setdefault(material["budget"], {})[rel.rsplit("/", 1)[1]] = m
    ctx.markers["pretrain"] = out
    return out


def pretrained_checkpoint(ctx: Context, budget: int, key: str) -> Path:
    return ctx.path(f"pretrain/{budget_tag(budget)}/{key}") / "checkpoint_last.pt"


# ---- instruct tuning -------------------------------------------------------------------------------
def mixture_name(mixture: dict[str, float]) -> str:
    return "+".join(k if w == 1 else f"{k}{w:g}" for k, w in mixture.items())


def stage_instruct(ctx: Context) -> dict[str, dict]:
    plan, p = ctx.plan, ctx.p
    o = plan.instruct
    tpu = o.batch_size * plan.data.tokens_per_sample
    top = plan.budgets[-1]
    optim = {k: val for k, val in dataclasses.asdict(o).items() if k not in ("variants", "mixtures")}
    items = []
    for key in o.variants:
        v = VARIANTS[key]
        arch, flags = variant_flags(ctx, v)
        for mix in o.mixtures:
            name = mixture_name(mix)
            rel = f"instruct/{key}/{name}"
            job, run = ctx.train(rel, TrainJob(
                desc=f"instruct: {v.label} ({name})", data=ctx.path("bin") / "instruct", save_dir=ctx.tmp(rel),
                arch=arch, model_flags=flags, optim=o, updates=o.budget_tokens // tpu,
                tokens_per_sample=plan.data.tokens_per_sample, seed=plan.seed + 1,
                restore=pretrained_checkpoint(ctx, top, key), mixture=mix, instruction=True))

            def build(tmp: Path, run: Any = run, key: str = key, mix: dict = mix) -> dict:
                return {**run(tmp), "variant": key, "mixture": mix}

            items.append((rel, {"start": ctx.markers["pretrain"][top][key]["run"],
                                "bin": ctx.markers["bin"][None]["run"], "optim": optim, "mixture": mix,
                                "shape": flags, "seed": plan.seed, "host": plan.host}, build))
    markers = p.units("instruct", items, resumable=True)
    out = {rel.split("/", 1)[1]: m for (rel, _, _), m in zip(items, markers)}
    ctx.markers["instruct"] = out
    return out


# ---- evaluation ------------------------------------------------------------------------------------
def evaluation_sets(results: dict[str, dict], sets: dict[str, dict[str, str]]) -> dict:
    """``{"params", "arch", "sets": {kind: {name: {ppl, text_ppl, image_ppl, tokens}}}}`` from
    ``eval.ppl.evaluate_ppl_files``'s ``{file: result}`` of one checkpoint on ``sets[kind][name]``."""
    first = next(iter(results.values()))
    out: dict[str, Any] = {"arch": first["arch"], "params": first["params"], "sets": {}}
    for kind, named in sets.items():
        for name, prefix in named.items():
            r = results[str(prefix)]
            out["sets"].setdefault(kind, {})[name] = {"ppl": r["ppl"], "tokens": r["tokens"],
                                                      "text_ppl": r["text"]["ppl"], "image_ppl": r["image"]["ppl"]}
    return out


def eval_targets(ctx: Context) -> list[tuple[str, Path, str]]:
    """(name, checkpoint, upstream run id) of every model to evaluate."""
    plan = ctx.plan
    rows = [(f"parent_{r}", parent_checkpoint(ctx, r), ctx.markers["parents"][r]["run"]) for r in PARENTS]
    for key in plan.variants:
        rows.append((f"start/{key}", fused_checkpoint(ctx, key), ctx.markers["fused"][key]["run"]))
    for budget in plan.budgets:
        for key in plan.variants:
            rows.append((f"{budget_tag(budget)}/{key}", pretrained_checkpoint(ctx, budget, key),
                         ctx.markers["pretrain"][budget][key]["run"]))
    for name, m in (ctx.markers.get("instruct") or {}).items():
        rows.append((f"instruct/{name}", ctx.path(f"instruct/{name}") / "checkpoint_last.pt", m["run"]))
    return rows


def stage_eval(ctx: Context, src: Sources) -> dict[str, dict]:
    plan, p = ctx.plan, ctx.p
    sets = {kind: {name: str(eval_prefix(ctx, src, kind, name)) for name in src.eval_sets[kind]} for kind in KINDS}
    vocab = str(tokenizer_paths(ctx)["vocab"])
    results = {}
    for name, ckpt, run in eval_targets(ctx):
        def build(tmp: Path, ckpt: Path = ckpt, name: str = name) -> dict:
            from jam_metaseq.eval.ppl import evaluate_ppl_files

            files = ctx.placement.call(
                evaluate_ppl_files, checkpoint=str(ckpt), data=sorted({f for n in sets.values() for f in n.values()}),
                vocab=vocab, max_len=plan.data.tokens_per_sample, batch_size=plan.eval.batch_size,
                use_loss_mask=True, device=plan.device, progress=ctx.progress, desc=f"eval {name}")
            r = evaluation_sets(files, sets)
            write_json(tmp / "result.json", r)
            return {"result": r}

        # "prefix": None is the evaluation rule's key (eval.context: nothing before a document) as
        # runs have recorded it since the rule was adopted; a change of the rule changes it
        m = p.unit("eval", f"eval/{name}", {"model": run, "bin": ctx.markers["bin"][None]["run"], "sets": sets,
                                            "batch": plan.eval.batch_size, "prefix": None}, build)
        results[name] = m.get("result")
    ctx.markers["eval"] = results
    return results


# ---- report and answers ------------------------------------------------------------------------------
def stage_report(ctx: Context) -> dict:
    from jam_metaseq.pipeline import report as rp

    p = ctx.p
    runs = sorted(m["run"] for rel, m in p.markers.items() if rel.startswith(("eval/", "pretrain/", "parents/",
                                                                              "instruct/")))

    def build(tmp: Path) -> dict:
        data_tokens = {}
        for b in ctx.plan.budgets:
            stats = (ctx.markers["bin"].get(b) or ctx.markers["bin"][None]).get("stats", {})
            data_tokens[b] = {src: stats.get(f"train.{src}", {}).get("num_tokens") for src in KINDS}
        results = rp.build_results(plan=ctx.plan, evals=ctx.markers["eval"], parents=ctx.markers["parents"],
                                   pretrain=ctx.markers["pretrain"], instruct=ctx.markers.get("instruct"),
                                   data_tokens=data_tokens)
        write_json(tmp / "results.json", results)
        (tmp / "tables.txt").write_text(rp.render_tables(results) + "\n")
        rp.plot_curves(results, tmp / "curves.png")
        if len(ctx.plan.budgets) > 1:
            rp.plot_sweep(results, tmp / "sweep.png")
        return {}

    m = p.unit("report", "report", {"runs": runs, "variants": ctx.plan.variants, "budgets": ctx.plan.budgets}, build)
    ctx.markers["report"] = m
    return m


def generate_answers_job(**kw: Any) -> list:
    """``generation.run.generate_answers`` (module-level, so a SLURM job can run it)."""
    from jam_metaseq.generation.run import generate_answers

    return generate_answers(**kw)


def stage_generate(ctx: Context) -> dict | None:
    """Answers from the chosen model (``report.best_model``); keyed by that model's run, so a change
    that leaves the choice alone (one more budget below the largest) does not regenerate them."""
    from jam_metaseq.pipeline.report import best_model

    plan, p = ctx.plan, ctx.p
    g = plan.generate
    if not g.prompts:
        return None
    if ctx.dry:
        choice, ckpt, run = g.model, None, "dry"
    else:
        best = best_model(read_json(ctx.path("report") / "results.json"), choice=g.model)
        if best.get("instruct"):
            choice, run = best["key"], ctx.markers["instruct"][best["key"]]["run"]
            ckpt = ctx.path(f"instruct/{best['key']}") / "checkpoint_last.pt"
        else:
            choice, run = best["key"], ctx.markers["pretrain"][plan.budgets[-1]][best["key"]]["run"]
            ckpt = pretrained_checkpoint(ctx, plan.budgets[-1], best["key"])
        label = best["model"]

    def build(tmp: Path) -> dict:
        from jam_metaseq.generation.engine import GenerationConfig
        from jam_metaseq.generation.run import PromptSpec
        from jam_metaseq.generation.sampling import SamplingConfig
        from jam_metaseq.vocab import VocabManifest

        from jam_metaseq.data.tokenizers import load_text_tokenizer

        paths = tokenizer_paths(ctx)
        vocab = VocabManifest.load(paths["vocab"])
        positions = parent_config(ctx).max_positions
        tok = load_text_tokenizer(vocab.text_tokenizer)
        for text in g.prompts:
            n = len(tok.encode(text)) + 1
            if n + vocab.image_tokens_per_image + 2 > positions:
                log(f"generate: no room for an image after {text!r}: {n} prompt tokens + "
                    f"{vocab.image_tokens_per_image + 2} image tokens > the model's {positions} positions")
        sampling = SamplingConfig(temperature=g.temperature, top_p=g.top_p)
        gen = GenerationConfig(max_new_tokens=vocab.image_tokens_per_image + g.max_text_tokens, min_images=1,
                               max_images=1, guidance_scale=g.guidance_scale, seed=plan.seed, text=sampling,
                               image=sampling)
        answers = ctx.placement.call(
            generate_answers_job, checkpoint=ckpt, prompts=[PromptSpec(text=t) for t in g.prompts], config=gen,
            vocab_path=paths["vocab"], image_tokenizer=str(paths["image_tokenizer"]), out_dir=tmp,
            device=plan.device, progress=ctx.progress, desc="generate")
        return {"model": choice, "label": label, "answers": len(answers),
                "images": sum(1 for a in answers for s in a.images if getattr(s, "png", None))}

    return p.unit("generate", "generate", {"model": choice, "model_run": run, "generate": dataclasses.asdict(g),
                                           "tokenizers": ctx.markers["tokenizers"]["run"], "seed": plan.seed}, build)


__all__ = ["Context", "KINDS", "Sources", "budget_tag", "eval_prefix", "eval_targets", "evaluation_sets",
           "fused_checkpoint", "mixture_name", "parent_checkpoint", "parent_config",
           "pretrain_data", "pretrained_checkpoint", "stage_binarize", "stage_data", "stage_eval", "stage_fuse",
           "stage_generate", "stage_instruct", "stage_parents", "stage_pretrain", "stage_report", "stage_tokenizers", "tokenizer_paths",
           "variant_config", "variant_flags"]
