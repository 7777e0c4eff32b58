"""The schema of a ``jam run`` plan (paper §2-3): what to train, fuse, evaluate and report, as typed
dataclasses with one docstring per field, and its structural validation (pydantic: unknown fields,
types, ranges, cross-field rules) in ``parse_plan``, every error naming its field
(``data.text.train[0]``) and, when the plan came from a file, its line.

A plan names the data (the user's JSONL files or the built-in generator), the tokenizers (given or
trained), the two parents (checkpoints in any layout ``jam-ckpt`` reads, or trained from the data
with a shape), the JAM variants (``spec.variants``), the continued-pretraining budget in tokens
(one value or a sweep), the optimisation settings, the evaluation sets, the host trainer, the
device and where to run. Reading and writing YAML is ``spec.yaml_io``; checks that look at files and
checkpoints are ``pipeline.check``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic.dataclasses import dataclass

from jam_metaseq.errors import JamError
from jam_metaseq.inputs import safe_component
from jam_metaseq.pipeline.spec.variants import PAPER_CROSS, VARIANTS


class PlanError(JamError, ValueError):
    """A plan that cannot run; the message names every field at fault (and its line)."""

    def __init__(self, problems: Sequence[str], *, source: str = "plan") -> None:
        self.problems = list(problems)
        self.source = source
        if len(self.problems) == 1:
            msg = f"{source}: {self.problems[0]}"
        else:
            msg = f"{source}: {len(self.problems)} problems: " + "; ".join(self.problems)
        super().__init__(msg + " (nothing was run)")


SOURCES = ("text", "caption", "instruct")
CONVERSATION_FORMATS = ("conversation", "lima")
"""Instruct formats read as conversations (LIMA keeps every exchange when the vocabulary has the
conversation tokens, ``data.instruct.make_transform``)."""
"""Names of the data sources (binarized as ``DATA/{split}/{source}``; mixture keys)."""

_CFG = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)
"""Every plan class: unknown fields refused, and no float field takes NaN or inf (issue 27 §4)."""


def _listify(v: Any) -> Any:
    return [v] if isinstance(v, (str, Path)) else v


# ---- data ------------------------------------------------------------------------------------
@dataclass(config=_CFG)
class GeneratorSpec:
    """The built-in data generator: coloured-shape images with captions and a templated text corpus
    (``quickstart_data``), made on the fly from the seed."""

    train_texts: int = Field(1200, ge=1)
    """Text documents for training (the parents' and the 1x continued-pretraining set)."""
    valid_texts: int = Field(64, ge=1)
    """Text documents for validation (the "Wikipedia PPL" set)."""
    train_images: int = Field(1200, ge=1)
    """Image-caption documents for training (and the image tokenizer's pool)."""
    valid_images: int = Field(64, ge=1)
    """Image-caption documents for validation, caption + image only (the "MS-COCO PPL" set)."""
    image_size: int = Field(32, ge=8)
    """Side of the images in pixels."""
    follow_up: float = Field(0.3, ge=0.0, le=1.0)
    """Fraction of training caption documents with a sentence after the image."""
    train_instruct: int = Field(0, ge=0)
    """Instruction documents for training (``instruct_format``); 0 = no instruct data."""
    valid_instruct: int = Field(0, ge=0)
    """Instruction documents for validation (another seed: the held-out conversations of the
    report's history PPL)."""
    instruct_format: Literal["plain", "conversation"] = "plain"
    """``plain``: "draw a ..." answered by a sentence, the picture and a sentence (one exchange);
    ``conversation``: multi-turn conversations whose follow-ups only the history answers ("now make
    it blue.", "what colour was the background?"; docs/CONVERSATIONS.md)."""
    grow_with_budget: bool = True
    """Continued pretraining on a budget b times the plan's first budget gets b times the training
    documents (new ones after the first), so every budget of a sweep sees its data for the same
    number of epochs (the parents always train on the first set)."""

    @model_validator(mode="after")
    def _instruct_pair(self) -> "GeneratorSpec":
        if (self.train_instruct == 0) != (self.valid_instruct == 0):
            raise ValueError("train_instruct and valid_instruct must both be 0 or both be > 0")
        return self


@dataclass(config=_CFG)
class Files:
    """JSONL documents of one source (``jam-data`` document format), one or more files per split."""

    train: list[Path] = Field(min_length=1)
    """Training files (a path or a list of paths, relative to the plan's folder)."""
    valid: list[Path] = Field(min_length=1)
    """Validation files: the in-training curves and the default evaluation set."""

    @field_validator("train", "valid", mode="before")
    @classmethod
    def _wrap(cls, v: Any) -> Any:
        return _listify(v)


@dataclass(config=_CFG)
class InstructFiles:
    """Instruction documents (``{"prompt": ..., "response": [...]}``, or LIMA / wikiHow records)."""

    train: list[Path] = Field(min_length=1)
    """Training files."""
    valid: list[Path] = Field(min_length=1)
    """Validation files."""
    format: Literal["plain", "lima", "wikihow", "conversation"] = "plain"
    """Record format: ``plain`` (already prompt/response), ``lima`` or ``wikihow`` (converted, §3.1.1),
    ``conversation`` (``{"turns": [...]}``, docs/CONVERSATIONS.md). ``conversation`` and ``lima``
    (every exchange kept) train the conversation tokens: the instruct stage gives the model their
    rows (``jam-ckpt extend-vocab``) when the run's vocabulary lacks them."""
    max_images: int = Field(3, ge=0)
    """wikiHow: images kept per article (the paper's 3)."""

    @field_validator("train", "valid", mode="before")
    @classmethod
    def _wrap(cls, v: Any) -> Any:
        return _listify(v)


@dataclass(config=_CFG)
class TextTokenizerSpec:
    """The text tokenizer: a given one, or one trained on the training text."""

    path: str | None = None
    """A sentencepiece ``.model``, an HF tokenizers ``.json`` or ``bytes``; null = train one."""
    vocab_size: int = Field(256, ge=8)
    """Size of a trained tokenizer (an upper bound: a small corpus may support fewer)."""
    kind: Literal["sentencepiece", "bpe"] = "sentencepiece"
    """Algorithm of a trained tokenizer."""
    sample_lines: int = Field(200_000, ge=1)
    """Text segments a trained tokenizer sees at most (the first ones of the training files)."""


@dataclass(config=_CFG)
class ImageTokenizerSpec:
    """The image tokenizer: a given VQGAN folder, or the small one trained on the training images."""

    path: Path | None = None
    """Folder with ``vqgan.ckpt`` + ``vqgan.yaml`` (taming / Make-A-Scene layout); null = train one."""
    steps: int = Field(600, ge=1)
    """Training steps of a trained tokenizer (the ``tiny`` preset: 32 px -> 8x8 codes of 64)."""
    max_images: int = Field(4096, ge=1)
    """Training images a trained tokenizer sees at most (the first ones of the caption files)."""


@dataclass(config=_CFG)
class DataSpec:
    """Where the documents come from and how they become tokens (§3.1 Tokenizers, Datasets)."""

    builtin: GeneratorSpec | None = None
    """The built-in generator (instead of ``text`` / ``caption`` files)."""
    text: Files | None = None
    """Text-only documents (the Wikipedia / CommonCrawl role)."""
    caption: Files | None = None
    """Image-caption documents, images as ``{"image": path}`` or ``{"image_tokens": [...]}`` (the
    Shutterstock / MS-COCO role)."""
    instruct: InstructFiles | None = None
    """Instruction documents for the instruct-tuning stage (§2.2, Table 5); optional."""
    vocab: Path | None = None
    """A vocabulary manifest (``jam-data vocab``) to use as is; null = build it from the tokenizers
    (or take the parents' ``vocab.json`` when they have one)."""
    text_tokenizer: TextTokenizerSpec = Field(default_factory=TextTokenizerSpec)
    """The text tokenizer."""
    image_tokenizer: ImageTokenizerSpec = Field(default_factory=ImageTokenizerSpec)
    """The image tokenizer."""
    num_sentinels: int = Field(4, ge=1)
    """CM3 sentinels in a built vocabulary (the most masked spans per sequence)."""
    tokens_per_sample: int = Field(160, ge=8)
    """Sequence length of training and evaluation (the parents' positions must cover it)."""
    on_error: Literal["fail", "skip"] = "fail"
    """A bad JSONL line: ``fail`` stops naming ``file:line``; ``skip`` counts it in the data report."""

    @model_validator(mode="after")
    def _one_source(self) -> "DataSpec":
        files = [k for k in ("text", "caption") if getattr(self, k) is not None]
        if self.builtin is not None and (files or self.instruct is not None):
            raise ValueError("give either builtin or text/caption/instruct files, not both")
        if self.builtin is None and len(files) < 2:
            missing = [k for k in ("text", "caption") if getattr(self, k) is None]
            raise ValueError(f"needs builtin, or both text and caption files (missing: {', '.join(missing)})")
        return self

    @property
    def has_instruct(self) -> bool:
        return self.instruct is not None or (self.builtin is not None and self.builtin.train_instruct > 0)

    @property
    def instruct_format(self) -> str | None:
        """The instruct data's format (``InstructFiles.format``, the generator's
        ``instruct_format``); None without instruct data."""
        if self.instruct is not None:
            return self.instruct.format
        return self.builtin.instruct_format if self.has_instruct else None

    @property
    def conversations(self) -> bool:
        """The instruct data are multi-turn conversations (``CONVERSATION_FORMATS``): the instruct
        stage's vocabulary has the conversation tokens."""
        return self.instruct_format in CONVERSATION_FORMATS


# ---- models ----------------------------------------------------------------------------------
@dataclass(config=_CFG)
class ShapeSpec:
    """The shape both parents share (one parent; JAM-Width doubles it, JAM-Cross holds two)."""

    embed_dim: int = Field(64, ge=1)
    """Hidden size E."""
    ffn_dim: int = Field(256, ge=1)
    """FFN inner size."""
    layers: int = Field(4, ge=1)
    """Layers; 4 or more, so that a cross block every 1, 2 and 4 layers differ."""
    heads: int = Field(4, ge=1)
    """Attention heads (E must be a multiple unless ``attn_head_dim`` is set)."""
    kv_heads: int | None = Field(None, ge=1)
    """Key/value heads of grouped-query attention (Llama family); null = ``heads``."""
    attn_head_dim: int | None = Field(None, ge=1)
    """Width of one head when it is not E / heads (Gemma); null = E / heads."""
    activation: Literal["relu", "gelu", "silu", "gelu_tanh"] = "relu"
    """FFN activation (``silu``, ``gelu_tanh``: the Llama family's, for given parents of it)."""
    bias: bool = True
    """Biases in the projections (False: CM3leon's ``--disable-bias``)."""
    affine_ln: bool = True
    """LayerNorms with weight and bias (False: CM3leon's ``--disable-affine-ln``)."""

    @model_validator(mode="after")
    def _heads_divide(self) -> "ShapeSpec":
        if self.kv_heads is not None and self.heads % self.kv_heads:
            raise ValueError(f"kv_heads {self.kv_heads} does not divide heads {self.heads}")
        if self.attn_head_dim is None and self.embed_dim % self.heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not a multiple of heads {self.heads}")
        return self


@dataclass(config=_CFG)
class ParentSpec:
    """One parent: a checkpoint, or trained from the data (write ``train``)."""

    checkpoint: Path | None = None
    """Any layout ``jam-ckpt`` reads (consolidated, MP parts, FSDP shards, safetensors, HF OPT);
    null = train it from the data with ``model``'s shape."""
    heads: int | None = Field(None, ge=1)
    """Attention heads, for a checkpoint that does not store them (HF and metaseq ones do)."""

    @property
    def trained(self) -> bool:
        return self.checkpoint is None


def _parent_shorthand(v: Any) -> Any:
    if v == "train":
        return {}
    if isinstance(v, (str, Path)):
        return {"checkpoint": v}
    return v


@dataclass(config=_CFG)
class OptimSpec:
    """Optimisation of one training stage (Adam, linear warm-up, linear decay, clipping)."""

    batch_size: int = Field(8, ge=1)
    """Sequences per update (the global batch)."""
    lr: float = Field(1e-3, gt=0)
    """Peak learning rate."""
    warmup_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    """Linear warm-up over this fraction of the updates (at least one update)."""
    end_lr: float = Field(0.0, ge=0.0)
    """Learning rate at the last update (linear decay from the peak)."""
    betas: tuple[float, float] = (0.9, 0.98)
    """Adam betas."""
    weight_decay: float = Field(0.0, ge=0.0)
    """Decoupled weight decay."""
    clip_norm: float = Field(1.0, ge=0.0)
    """Gradient-norm clipping (0 = none)."""
    curve_points: int = Field(6, ge=1)
    """Validation runs during training (the curves' resolution)."""


@dataclass(config=_CFG)
class ParentTrainSpec(OptimSpec):
    """How parents are trained from the data (same initialisation for both, as two models
    fine-tuned from one base would share, which makes weight averaging meaningful)."""

    budget_tokens: int = Field(640_000, ge=1)
    """Training tokens of each parent (a whole number of updates)."""
    lr: float = Field(3e-3, gt=0)
    """Peak learning rate."""


@dataclass(config=_CFG)
class ParentsSpec:
    """The two parents (§2: a text LLM and a text-to-image model of the same architecture)."""

    llm: ParentSpec = Field(default_factory=ParentSpec)
    """The text LLM: a checkpoint path, or ``train`` (on the text data)."""
    img: ParentSpec = Field(default_factory=ParentSpec)
    """The image-text model (CM3leon's role): a checkpoint path, or ``train`` (on the caption data)."""
    train: ParentTrainSpec = Field(default_factory=ParentTrainSpec)
    """Training of the parents that are trained."""

    @field_validator("llm", "img", mode="before")
    @classmethod
    def _short(cls, v: Any) -> Any:
        return _parent_shorthand(v)


@dataclass(config=_CFG)
class PretrainSpec(OptimSpec):
    """Continued pretraining of every variant after fusion (§3.1 "alignment"), same budget for all."""

    budget_tokens: list[int] = Field(default_factory=lambda: [192_000], min_length=1)
    """Tokens per variant: one value, or a list for a budget sweep (each a whole number of updates)."""
    mixture: dict[str, float] = Field(default_factory=lambda: {"text": 1.0, "caption": 1.0})
    """Source weights, token-balanced (the paper: 50/50 text and image-caption)."""
    @field_validator("budget_tokens", mode="before")
    @classmethod
    def _wrap(cls, v: Any) -> Any:
        return [v] if isinstance(v, (int, float, str)) else v

    @field_validator("budget_tokens")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        bad = [b for b in v if b < 1]
        if bad:
            raise ValueError(f"budgets must be >= 1 token, got {bad}")
        if len(set(v)) != len(v):
            raise ValueError(f"budgets repeat: {v}")
        return v

    @field_validator("mixture")
    @classmethod
    def _mixture(cls, v: dict[str, float]) -> dict[str, float]:
        bad = sorted(set(v) - {"text", "caption"})
        if bad:
            raise ValueError(f"unknown source(s) {bad}; continued pretraining mixes text and caption")
        if not v or any(not (w > 0 and math.isfinite(w)) for w in v.values()):
            raise ValueError(f"weights must be finite and > 0, got {v}")
        return v


@dataclass(config=_CFG)
class InstructSpec(OptimSpec):
    """Instruction tuning of trained variants (§2.2; Table 5: with and without image-caption data)."""

    variants: list[str] = Field(default_factory=lambda: [PAPER_CROSS], min_length=1)
    """Variants (after continued pretraining on the largest budget) to instruct-tune."""
    mixtures: list[dict[str, float]] = Field(
        default_factory=lambda: [{"instruct": 1.0}, {"instruct": 1.0, "caption": 1.0}], min_length=1)
    """One run per mixture (Table 5's rows: instruct data alone, and mixed with image-caption data)."""
    budget_tokens: int = Field(64_000, ge=1)
    """Tokens per run (a whole number of updates)."""
    lr: float = Field(3e-4, gt=0)
    """Peak learning rate."""

    @field_validator("mixtures")
    @classmethod
    def _mixtures(cls, v: list[dict[str, float]]) -> list[dict[str, float]]:
        for m in v:
            bad = sorted(set(m) - set(SOURCES))
            if bad or "instruct" not in m:
                raise ValueError(f"each mixture needs 'instruct' and may add {list(SOURCES)}; got {m}")
            if any(not (w > 0 and math.isfinite(w)) for w in m.values()):
                raise ValueError(f"weights must be finite and > 0, got {m}")
        return v


@dataclass(config=_CFG)
class EvalSpec:
    """Evaluation sets: token-weighted perplexity of every model (Tables 1-4)."""

    text: dict[str, list[Path]] | None = None
    """Text sets by name (the Wikipedia PPL role); null = the text validation files as ``valid``."""
    caption: dict[str, list[Path]] | None = None
    """Image-caption sets by name (the MS-COCO PPL role); null = the caption validation files."""
    batch_size: int = Field(16, ge=1)
    """Sequences per forward pass."""
    drawing_prompts: int = Field(12, ge=0)
    """Instruct-tuned models on the generator's conversations: drawing prompts per set (single-turn,
    and a follow-up after a first exchange) of the prompt-following score (docs/CONVERSATIONS.md);
    0 = no score."""
    drawing_seeds: int = Field(2, ge=1)
    """Pictures drawn per drawing prompt (one per seed)."""

    @field_validator("text", "caption", mode="before")
    @classmethod
    def _wrap(cls, v: Any) -> Any:
        if isinstance(v, Mapping):
            for k in v:  # issue 27 §1: a set's name becomes a folder (bin/eval/KIND/NAME)
                try:
                    safe_component(k, what="set name")
                except JamError as e:
                    raise ValueError(str(e)) from None
            return {k: _listify(x) for k, x in v.items()}
        return v


@dataclass(config=_CFG)
class GenerateSpec:
    """Interleaved answers from the best JAM model (§3.1 Decoding), written as HTML with images."""

    prompts: list[str] = Field(default_factory=lambda: ["a red circle on a white background",
                                                        "a picture of a blue square on a black background"])
    """Prompts, one answer each (an empty list skips generation)."""
    model: str = "auto"
    """``auto`` (the instruct-tuned model if any, else the JAM-Cross with the lowest text x caption
    PPL on the largest budget) or a variant key."""
    guidance_scale: float = Field(3.5, ge=0.0)
    """Classifier-free guidance on image tokens (Eq. 6; the paper used 3.5 and 4)."""
    temperature: float = Field(1.0, gt=0.0)
    """Sampling temperature."""
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    """Nucleus sampling threshold (the paper: 0.8 - 1)."""
    max_text_tokens: int = Field(40, ge=1)
    """Text tokens per answer besides its image."""


@dataclass(config=_CFG)
class SlurmSpec:
    """SLURM placement of training and evaluation jobs (through submitit)."""

    cluster: Literal["slurm", "local"] = "slurm"
    """submitit executor: ``slurm``, or ``local`` (the same jobs as subprocesses of this machine)."""
    partition: str | None = None
    """SLURM partition."""
    account: str | None = None
    """SLURM account."""
    gpus: int = Field(1, ge=0)
    """GPUs of one training job (one task per GPU; 0 = a CPU job)."""
    gpus_per_node: int = Field(8, ge=1)
    """GPUs per node."""
    cpus_per_task: int = Field(10, ge=1)
    """CPU cores per task."""
    time_hours: int = Field(24, ge=1)
    """Time limit per job."""
    port: int = Field(29500, ge=1, le=65535)
    """``--distributed-port`` of the host's SLURM rendez-vous."""


@dataclass(config=_CFG)
class RunSpec:
    """Where and how the work runs."""

    where: Literal["local", "slurm"] = "local"
    """``local`` subprocesses, or ``slurm`` jobs (training and evaluation; the rest runs here)."""
    jobs: int = Field(0, ge=0)
    """Training runs at once (0: local = 2 on a CPU with >= 2 cores, else 1; slurm = all)."""
    threads: int = Field(0, ge=0)
    """CPU threads per local process (0 = the cores divided among ``jobs``)."""
    slurm: SlurmSpec = Field(default_factory=SlurmSpec)
    """SLURM settings (``where: slurm``)."""


@dataclass(config=_CFG)
class PlanSpec:
    """The whole pipeline: data -> tokenizers -> binarize -> parents -> fuse -> pretrain (-> instruct)
    -> eval -> report -> generate."""

    out: Path | None = None
    """Output folder (``--out`` wins; default ``runs/<plan file name>``)."""
    seed: int = 0
    """Seed of the data generator, the initialisations, the training order and the sampling."""
    host: Literal["fairseq", "metaseq"] = "fairseq"
    """Trainer: ``fairseq-train`` or ``metaseq-train`` (the same flags, ``--user-dir jam_metaseq``)."""
    device: str = "cpu"
    """torch device: ``cpu``, ``cuda`` or ``cuda:N``."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision (bf16 / fp16 need a GPU)."""
    data: DataSpec = Field(default_factory=lambda: DataSpec(builtin=GeneratorSpec()))
    """The documents and their tokenizers (default: the built-in generator)."""
    model: ShapeSpec | None = None
    """The parents' shape: needed to train a parent (default: the given parent's, else the
    quickstart's); checked against given parents."""
    image_model: ShapeSpec | None = None
    """The image parent's shape when it differs from the LLM's (``model``): JAM-Cross between
    parents of different sizes (width, FFN, layers, heads; activation, bias and LayerNorm kind
    are shared), so only ``cross*`` variants. null = ``model``'s shape (checked against a given
    image parent)."""
    parents: ParentsSpec = Field(default_factory=ParentsSpec)
    """The two parents."""
    variants: list[str] = Field(default_factory=lambda: list(VARIANTS), min_length=1)
    """JAM variants to build, train and evaluate (keys of ``VARIANTS``)."""
    pretrain: PretrainSpec = Field(default_factory=PretrainSpec)
    """Continued pretraining (the budget or budget sweep)."""
    instruct: InstructSpec = Field(default_factory=InstructSpec)
    """Instruction tuning (runs when the data has instruct documents)."""
    eval: EvalSpec = Field(default_factory=EvalSpec)
    """Evaluation sets."""
    generate: GenerateSpec = Field(default_factory=GenerateSpec)
    """Generated answers."""
    run: RunSpec = Field(default_factory=RunSpec)
    """Placement: local or SLURM, parallel jobs, threads."""

    @field_validator("variants")
    @classmethod
    def _variants(cls, v: list[str]) -> list[str]:
        bad = [x for x in v if x not in VARIANTS]
        if bad:
            raise ValueError(f"unknown variant(s) {bad}; variants are {', '.join(VARIANTS)}")
        if len(set(v)) != len(v):
            raise ValueError(f"variants repeat: {v}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", v):
            raise ValueError(f"expected cpu, cuda or cuda:N, got {v!r}")
        return v

    @model_validator(mode="after")
    def _cross_rules(self) -> "PlanSpec":
        problems = []
        if self.device == "cpu" and self.precision != "fp32":
            problems.append(f"precision {self.precision} needs a GPU device (device is cpu)")
        if self.image_model is not None and self.model is None:
            problems.append("image_model needs model (the LLM's shape) next to it")
        elif self.image_model is not None and self.asymmetric:
            s, i = self.shape, self.image_model
            shared = [f for f in ("activation", "bias", "affine_ln") if getattr(s, f) != getattr(i, f)]
            if shared:
                problems.append(f"image_model: {', '.join(shared)} must equal the LLM's (model); parents of "
                                "different sizes differ in embed_dim, ffn_dim, layers and heads only")
            others = [v for v in self.variants if VARIANTS[v].family != "jam_cross"]
            if others:
                problems.append(f"variants {others} need parents of one shape; with image_model of another "
                                "size only JAM-Cross variants (cross*) fuse them")
        if self.generate.model not in ("auto", *self.variants):
            problems.append(f"generate.model {self.generate.model!r} is neither auto nor one of the variants")
        bad = [v for v in self.instruct.variants if v not in self.variants]
        if self.data.has_instruct and bad:
            problems.append(f"instruct.variants {bad} are not among the plan's variants")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # ---- derived --------------------------------------------------------------------------------
    @property
    def shape(self) -> ShapeSpec:
        return self.model if self.model is not None else ShapeSpec()

    @property
    def image_shape(self) -> ShapeSpec:
        """The image parent's shape (``image_model``, else ``model``'s)."""
        return self.image_model if self.image_model is not None else self.shape

    @property
    def asymmetric(self) -> bool:
        """The parents' shapes differ (JAM-Cross between parents of different sizes)."""
        return any(getattr(self.shape, f) != getattr(self.image_shape, f)
                   for f in ("embed_dim", "ffn_dim", "layers", "heads"))

    @property
    def budgets(self) -> list[int]:
        """Continued-pretraining budgets, ascending."""
        return sorted(self.pretrain.budget_tokens)

    @property
    def reference_budget(self) -> int:
        """The plan's first budget: ``1x`` of ``--budgets`` and of the generator's growth."""
        return self.pretrain.budget_tokens[0]


_ADAPTER = TypeAdapter(PlanSpec)


# ---- validation ------------------------------------------------------------------------------
def field_name(loc: Iterable[Any]) -> str:
    """``("data", "text", "train", 0)`` -> ``data.text.train[0]``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(plan)"


def _clean_loc(loc: Sequence[Any], data: Any) -> tuple:
    """pydantic's location without the validator tags it inserts (``function-before[...]``)."""
    out: list[Any] = []
    node = data
    for part in loc:
        if isinstance(node, Mapping) and part in node:
            out.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            out.append(part)
            node = node[part]
        elif isinstance(part, str) and not re.search(r"[\[\(-]", part):
            out.append(part)  # a field the input lacks (missing) or a leaf
            node = None
    return tuple(out)


def _where(loc: tuple, lines: Mapping[tuple, int]) -> str:
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return f"line {lines[loc[:n]]}: "
    return ""


def _message(err: Mapping[str, Any]) -> str:
    kind, msg = err.get("type", ""), err.get("msg", "")
    if kind == "unexpected_keyword_argument" or kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing" or kind == "missing_argument":
        return "required field is missing"
    msg = re.sub(r"^(Value error|Assertion failed), ", "", msg)
    return msg


def parse_plan(data: Any, *, source: str = "plan", base_dir: str | Path | None = None,
               lines: Mapping[tuple, int] | None = None) -> PlanSpec:
    """Validate a plan mapping (already parsed YAML) into a ``PlanSpec``; relative paths are taken
    from ``base_dir``. Every problem is reported at once, each naming its field."""
    lines = lines or {}
    if not isinstance(data, Mapping):
        raise PlanError([f"a plan is a mapping of fields (data, parents, variants, ...), got "
                         f"{type(data).__name__}"], source=source)
    try:
        plan = _ADAPTER.validate_python(dict(data))
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = _clean_loc(err["loc"], data)
            problems.append(f"{_where(loc, lines)}{field_name(loc)}: {_message(err)}")
        raise PlanError(problems, source=source) from None
    if base_dir is not None:
        resolve_paths(plan, Path(base_dir))
    return plan


def resolve_paths(obj: Any, base: Path) -> None:
    """Make every relative path of the plan absolute against ``base`` (in place)."""

    def fix(p: Any) -> Any:
        if isinstance(p, Path):
            p = p.expanduser()
            return p if p.is_absolute() else (base / p)
        if isinstance(p, list):
            return [fix(x) for x in p]
        if isinstance(p, dict):
            return {k: fix(x) for k, x in p.items()}
        return p

    if isinstance(obj, TextTokenizerSpec):
        if obj.path is not None and obj.path != "bytes":
            prefix = next((x for x in ("spm:", "bpe:") if obj.path.startswith(x)), "")
            obj.path = prefix + str(fix(Path(obj.path[len(prefix):])))
        return
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            resolve_paths(v, base)
        else:
            setattr(obj, f.name, fix(v))


__all__ = [
    "CONVERSATION_FORMATS", "DataSpec", "EvalSpec", "Files", "GenerateSpec", "GeneratorSpec", "ImageTokenizerSpec", "InstructFiles",
    "InstructSpec", "OptimSpec", "ParentSpec", "ParentTrainSpec", "ParentsSpec", "PlanError", "PlanSpec",
    "PretrainSpec", "RunSpec", "SOURCES", "ShapeSpec", "SlurmSpec", "TextTokenizerSpec", "field_name", "parse_plan",
    "resolve_paths",
]
