"""``jam run PLAN.yaml``: run (or resume) a plan end to end; ``jam quickstart`` runs the built-in one.

Library entry: ``run_plan(plan, options) -> dict``. CLI: ``main(argv)``:

    jam run PLAN.yaml [--out DIR] [--budgets 1x,4x,16x] [--set FIELD=VALUE ...] [--stages S,..]
                      [--variants V,..] [--force] [--dry-run] [--no-progress]
    jam run --print-quickstart-plan          # the built-in plan as commented YAML

The plan is validated (``pipeline.spec``) and checked against the files and checkpoints it names
(``pipeline.check``) before any work; every problem names its field and line.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from jam_metaseq.errors import run_cli
from jam_metaseq.inputs import resolve_output_dir
from jam_metaseq.pipeline.spec import (
    VARIANTS, PlanError, PlanSpec, apply_override, parse_plan, plan_dict, plan_yaml, quickstart_plan,
)
from jam_metaseq.pipeline.units import STAGES, Pipeline, RunOptions, log, set_log_prefix


def default_jobs(plan: PlanSpec) -> int:
    if plan.run.jobs:
        return plan.run.jobs
    if plan.run.where == "slurm":
        return 64
    return 2 if plan.device == "cpu" and (os.cpu_count() or 1) >= 2 else 1


def threads_per_job(plan: PlanSpec, jobs: int) -> int:
    """Intra-op threads of each local process (0 = leave torch's default)."""
    if plan.run.threads:
        return plan.run.threads
    return max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else 0


def placement_for(plan: PlanSpec, options: RunOptions, jobs: int) -> Any:
    from jam_metaseq.pipeline.train import LocalPlacement, SubmititPlacement

    if plan.run.where == "slurm":
        return SubmititPlacement(slurm=plan.run.slurm, folder=options.out / "slurm", device=plan.device,
                                 progress=options.progress)
    return LocalPlacement(device=plan.device, threads=threads_per_job(plan, jobs), progress=options.progress)


def run_plan(plan: PlanSpec, options: RunOptions, *, source: str = "plan",
             lines: dict | None = None) -> dict:
    """Check, then run (or resume) every stage of ``plan``; returns ``{"results", "paths", "ran",
    "skipped", "planned", "jobs"}`` (``--dry-run``: nothing run, ``planned`` lists the units)."""
    from jam_metaseq.pipeline.check import check_plan
    from jam_metaseq.pipeline.stages import PIPELINE, Context

    learnt = check_plan(plan, source=source, lines=lines or {}, executables=not options.dry_run)
    jobs = default_jobs(plan)
    threads = threads_per_job(plan, jobs)
    if threads and plan.run.where == "local" and not options.dry_run:
        import torch

        torch.set_num_threads(threads)
    if not options.dry_run:
        options.out.mkdir(parents=True, exist_ok=True)
    p = Pipeline(options, jobs=jobs)
    ctx = Context(p=p, plan=plan, placement=placement_for(plan, options, jobs), progress=options.progress,
                  given=learnt.get("parents", {}))
    t0 = time.time()
    # Stages after the last selected one are not run; earlier unselected ones must be finished.
    last = max(STAGES.index(s) for s in options.stages)

    def wanted(stage: str) -> bool:
        return STAGES.index(stage) <= last

    for stage, run in PIPELINE:
        if wanted(stage):
            run(ctx)
    results: dict[str, Any] = {}
    if wanted("report") and not options.dry_run:
        from jam_metaseq.pipeline.units import read_json

        results = read_json(p.path("report") / "results.json")
    gen = ctx.markers.get("generate")
    if wanted("generate") and gen is not None and not options.dry_run:
        results["generation"] = {k: gen.get(k) for k in ("model", "label", "answers", "images")}
    paths = {"results": p.path("report") / "results.json", "tables": p.path("report") / "tables.txt",
             "curves": p.path("report") / "curves.png", "sweep": p.path("report") / "sweep.png",
             "html": p.path("generate") / "answers.html", "checkpoints": p.path("pretrain")}
    if results:
        from jam_metaseq.pipeline.report import chat_model
        from jam_metaseq.pipeline.stages.context import instruct_checkpoint, tokenizer_paths

        chat = chat_model(results, choice=plan.generate.model)
        if chat is not None:
            paths["chat"] = instruct_checkpoint(ctx, chat["key"])
            paths["image_tokenizer"] = tokenizer_paths(ctx)["image_tokenizer"]
    if not options.dry_run:
        log(f"finished in {time.time() - t0:.0f} s ({len(p.ran)} units run, {len(p.skipped)} skipped)")
    return {"results": results, "paths": paths, "ran": p.ran, "skipped": p.skipped, "planned": p.planned,
            "jobs": ctx.jobs, "context": ctx}


def render_dry_run(out: dict, plan: PlanSpec) -> str:
    """What a run would do: every unit with its state, and the command of each training unit."""
    from jam_metaseq.pipeline.train import host_command

    ctx = out["context"]
    lines = []
    width = max((len(rel) for rel, _ in out["planned"]), default=10)
    for rel, status in out["planned"]:
        lines.append(f"{rel:<{width}}  {status}")
        job = out["jobs"].get(rel)
        if job is not None and status != "done":
            cmd = host_command(job, plan=plan, gpus=ctx.placement.gpus, slurm=ctx.placement.slurm)
            lines.append("    " + shlex.join(cmd))
    return "\n".join(lines)


# ---- budgets on the command line -------------------------------------------------------------------
_SUFFIX = {"": 1, "k": 1_000, "m": 1_000_000, "b": 1_000_000_000}


def parse_budgets(text: str, *, reference: int) -> list[int]:
    """``1x,4x,16x`` (multiples of the plan's first budget) or token counts (``192000``, ``768k``,
    ``1.5M``) -> token counts."""
    out = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([xX]|[kKmMbB]?)", item)
        if not m:
            raise ValueError(f"--budgets: {item!r} is neither a multiple (4x) nor a token count (768k, 1.5M)")
        value, unit = float(m[1]), m[2].lower()
        tokens = value * reference if unit == "x" else value * _SUFFIX[unit]
        if abs(tokens - round(tokens)) > 1e-6 * max(1.0, tokens):
            raise ValueError(f"--budgets: {item!r} is not a whole number of tokens ({tokens:g})")
        out.append(int(round(tokens)))
    if not out:
        raise ValueError("--budgets: no budget given")
    return out


# ---- CLI -------------------------------------------------------------------------------------------
def _csv(choices: Sequence[str], what: str):
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(s.strip() for s in text.split(",") if s.strip())
        bad = [s for s in items if s not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad) or '(none)'}; choose from "
                                             f"{', '.join(choices)}")
        return items

    return parse


def add_run_flags(ap: argparse.ArgumentParser) -> None:
    """The flags ``jam run`` and ``jam quickstart`` share (how to run, not what)."""
    ap.add_argument("--stages", type=_csv(STAGES, "stage"), default=STAGES, metavar="S[,S...]",
                    help="run only these stages (the earlier ones' outputs must exist); default: all")
    ap.add_argument("--force", action="store_true", help="re-run the selected stages even when finished")
    ap.add_argument("--dry-run", action="store_true",
                    help="check the plan and print every unit (done / run) and the training commands; run nothing")
    ap.add_argument("--print-plan", action="store_true", help="print the effective plan as YAML and exit")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="jam run", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the JAM pipeline declared in a plan (YAML): data (your JSONL files or the built-in "
                    "generator), tokenizers, parents (checkpoints or trained from the data), fusion into the JAM "
                    "variants, continued pretraining on one budget or a budget sweep, instruction tuning, "
                    "evaluation, the report (tables, curves, sweep plot) and generated answers. The plan is "
                    "checked before any work; a re-run skips every finished unit whose settings and inputs are "
                    "unchanged.",
        epilog="Stages: " + ", ".join(STAGES) + ".\nVariants: " + ", ".join(VARIANTS) + ".\n"
               "Outputs: OUT/report/{results.json,tables.txt,curves.png,sweep.png}, OUT/generate/answers.html.\n"
               "Start from the built-in plan: jam run --print-quickstart-plan > plan.yaml")
    ap.add_argument("plan", nargs="?", type=Path, help="the plan (YAML); see --print-quickstart-plan")
    ap.add_argument("--out", type=Path, metavar="DIR", help="output directory (default: the plan's out, else "
                                                            "runs/<plan file name>)")
    ap.add_argument("--budgets", metavar="B[,B...]",
                    help="continued-pretraining budgets instead of the plan's: multiples of its first budget "
                         "(1x,4x,16x) or token counts (192k,768k); one line per variant in report/sweep.png")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", dest="overrides",
                    help="override a plan field (VALUE is YAML), e.g. --set pretrain.lr=3e-3 --set "
                         "run.jobs=1; repeatable")
    ap.add_argument("--variants", type=_csv(tuple(VARIANTS), "variant"), metavar="V[,V...]",
                    help="only these variants (instead of the plan's)")
    ap.add_argument("--print-quickstart-plan", action="store_true",
                    help="print the built-in plan of jam quickstart (commented YAML) and exit")
    add_run_flags(ap)
    return ap


def load_for_cli(path: Path, *, overrides: Sequence[str], budgets: str | None,
                  variants: Sequence[str] | None) -> tuple[PlanSpec, str, dict]:
    """Read the plan with the command line's changes applied as plan fields (so that their errors
    name the field too): ``--set`` assignments, ``--budgets`` (multiples of the plan's first budget),
    ``--variants``."""
    from jam_metaseq.pipeline.spec import read_plan_file

    data, lines = read_plan_file(path)
    base = path.resolve().parent
    if isinstance(data, dict):
        for o in overrides:
            apply_override(data, o)
    plan = parse_plan(data, source=str(path), base_dir=base, lines=lines)
    if budgets is None and variants is None:
        return plan, str(path), lines
    if budgets is not None:
        data.setdefault("pretrain", {})["budget_tokens"] = parse_budgets(budgets, reference=plan.reference_budget)
    if variants is not None:
        data["variants"] = list(variants)
    return parse_plan(data, source=str(path), base_dir=base, lines=lines), str(path), lines


def chat_commands(checkpoint: Path, image_tokenizer: Path | None) -> list[str]:
    """The commands that talk to a tuned model (``jam chat``, ``jam serve``; without an image
    tokenizer, when the data's images were VQ codes, pictures stay code grids)."""
    args = [str(checkpoint)] + (["--image-tokenizer", str(image_tokenizer)] if image_tokenizer else [])
    return [shlex.join(["jam", "chat", *args]), shlex.join(["jam", "serve", *args, "--port", "8000"])]


def print_outputs(out: dict) -> None:
    from jam_metaseq.pipeline.report import render_tables

    if out["results"].get("tables"):
        print(render_tables(out["results"]))
    g = out["results"].get("generation")
    if g:
        print(f"\ngenerated answers: {g.get('label')} ({g.get('images')} decoded images)")
    paths = dict(out["paths"])
    chat, vq = paths.pop("chat", None), paths.pop("image_tokenizer", None)
    for k, v in paths.items():
        if Path(v).exists():
            print(f"{k:<12}{v}")
    if chat is not None and Path(chat).exists():
        print("\ntalk to the model tuned on conversations (docs/CONVERSATIONS.md):")
        for cmd in chat_commands(chat, vq):
            print(f"  {cmd}")


def execute(plan: PlanSpec, options: RunOptions, *, source: str, lines: dict | None = None,
            print_plan: bool = False) -> int:
    """What both CLIs do with a plan: print it, dry-run it, or run it and print the report."""
    if print_plan:
        print(plan_yaml(plan), end="")
        return 0
    out = run_plan(plan, options, source=source, lines=lines)
    if options.dry_run:
        print(f"{options.prog}: dry run of {source} into {options.out} (nothing was run)")
        print(render_dry_run(out, plan))
        return 0
    print_outputs(out)
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.print_quickstart_plan:
        print(plan_yaml(quickstart_plan(), header="The built-in plan of `jam quickstart` (jam run --print-"
                                                  "quickstart-plan).\nPaths are relative to this file's folder."),
              end="")
        return 0
    if args.plan is None:
        raise PlanError(["no plan given: jam run PLAN.yaml (or --print-quickstart-plan for a start)"], source="jam run")
    plan, source, lines = load_for_cli(args.plan, overrides=args.overrides, budgets=args.budgets,
                                       variants=args.variants)
    out_dir = args.out or plan.out or Path("runs") / args.plan.stem
    resolve_output_dir(out_dir, what="output directory (--out / the plan's out)")  # a symlink loop: one line
    options = RunOptions(out=out_dir, stages=args.stages, force=args.force, progress=not args.no_progress,
                         dry_run=args.dry_run)
    return execute(plan, options, source=source, lines=lines, print_plan=args.print_plan)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    set_log_prefix("jam run")
    return run_cli("jam run", lambda: _run(args),
                   interrupted="finished units are kept: run the same command again to resume")


__all__ = ["add_run_flags", "build_parser", "chat_commands", "default_jobs", "execute", "main", "parse_budgets", "print_outputs",
           "render_dry_run", "run_plan", "threads_per_job"]
