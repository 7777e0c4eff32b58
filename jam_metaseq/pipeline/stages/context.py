"""What every stage of ``jam run`` shares: the ``Context`` (the pipeline, the plan, where runs go,
the markers of finished stages), the data stage's ``Sources``, and where each stage's outputs lie
(the paths later stages read). Folder names: ``pipeline.layout``."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jam_metaseq.pipeline.layout import budget_tag
from jam_metaseq.pipeline.spec import PlanSpec
from jam_metaseq.pipeline.train import TrainJob, train
from jam_metaseq.pipeline.units import Pipeline


KINDS = ("text", "caption")
"""Evaluation kinds: text-only documents and image-caption documents."""


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
    sources: Sources | None = None
    """The data stage's files (``stages.data``)."""

    @property
    def dry(self) -> bool:
        return self.p.options.dry_run

    def path(self, rel: str) -> Path:
        return self.p.path(rel)

    def tmp(self, rel: str) -> Path:
        """Where a unit is built before it is renamed into place (``Pipeline.unit``)."""
        final = self.path(rel)
        return final.with_name(f".{final.name}.tmp")

    def train(self, rel: str, job: TrainJob, *, vocab: Path | None = None) -> tuple[TrainJob, Any]:
        """Register ``job`` (built in unit ``rel``) and return it with a build function running it;
        ``vocab``: the manifest its checkpoints go with (default: the run's)."""
        self.jobs[rel] = job

        def build(tmp: Path) -> dict:
            assert tmp == job.save_dir, (tmp, job.save_dir)
            info = train(job, plan=self.plan, placement=self.placement)
            shutil.copy(vocab or tokenizer_paths(self)["vocab"], tmp / "vocab.json")
            return info

        return job, build


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


def fingerprint(paths: list[Path]) -> list[list]:
    """(path, size, mtime) of each file: a unit keyed by it re-runs when a file changes."""
    out = []
    for p in paths:
        st = p.stat()
        out.append([str(p), st.st_size, st.st_mtime_ns])
    return out


def tokenizer_paths(ctx: Context) -> dict[str, Path | None]:
    """The manifest and image tokenizer of the run (after the tokenizers stage); the image tokenizer
    is None when the data's images are VQ codes and none was given (nothing to encode or draw)."""
    m = ctx.markers["tokenizers"]
    image = m.get("image_tokenizer")
    return {"vocab": ctx.path("tokenizers") / "vocab.json",
            "image_tokenizer": None if m.get("no_image_tokenizer") else
            Path(image) if image else ctx.path("tokenizers") / "vq"}


def instruct_vocab(ctx: Context, base: Any) -> Any:
    """The instruct stage's vocabulary: the run's manifest (``base``), with the conversation tokens
    when the instruct data are conversations (``DataSpec.conversations``). The parents and the
    continued pretraining never see those tokens; the instruct stage gives a model their rows
    (``jam-ckpt extend-vocab``) when the run's manifest lacks them (docs/CONVERSATIONS.md)."""
    return base.with_conversation_tokens() if ctx.plan.data.conversations else base


def instruct_vocab_path(ctx: Context) -> Path:
    """Where the binarize stage writes the instruct vocabulary (``instruct_vocab``)."""
    return ctx.path("bin") / "instruct" / "vocab.json"


def eval_prefix(ctx: Context, src: Sources, kind: str, name: str) -> Path:
    """The binarized prefix of an evaluation set (the validation split's when it is the same files)."""
    if src.eval_sets[kind][name] == src.files["valid"][kind]:
        return ctx.path("bin") / kind / "valid" / kind
    return ctx.path("bin") / "eval" / kind / name


def pretrain_data(ctx: Context, budget: int) -> Path:
    grown = ctx.markers["bin"].get(budget)
    return ctx.path(f"bin-{budget_tag(budget)}" if grown is not None else "bin") / "mixed"


def parent_checkpoint(ctx: Context, role: str) -> Path:
    spec = getattr(ctx.plan.parents, role)
    return Path(spec.checkpoint) if not spec.trained else ctx.path(f"parents/{role}") / "checkpoint_last.pt"


def fused_checkpoint(ctx: Context, key: str) -> Path:
    return ctx.path(f"fused/{key}") / ctx.markers["fused"][key].get("checkpoint", "ckpt/checkpoint.pt")


def pretrained_checkpoint(ctx: Context, budget: int, key: str) -> Path:
    return ctx.path(f"pretrain/{budget_tag(budget)}/{key}") / "checkpoint_last.pt"


def instruct_checkpoint(ctx: Context, name: str) -> Path:
    """An instruct run's checkpoint (``name``: ``variant/mixture``); its manifest is beside it."""
    return ctx.path(f"instruct/{name}") / "checkpoint_last.pt"


__all__ = ["Context", "KINDS", "Sources", "eval_prefix", "fingerprint", "fused_checkpoint", "instruct_checkpoint",
           "instruct_vocab", "instruct_vocab_path", "parent_checkpoint", "pretrain_data", "pretrained_checkpoint",
           "tokenizer_paths"]
