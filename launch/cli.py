"""``jam-launch``: SLURM jobs for the paper's training stages (JAM §3.1, Table 4).

Parses flags, validates them, calls ``launch.slurm.plan``; ``--dry-run`` prints each job's training
command and sbatch script, otherwise the scripts are written under SAVE_DIR/slurm/ and submitted.
"""

from __future__ import annotations

import argparse
import sys

from jam_metaseq.errors import run_cli
from jam_metaseq.inputs import NON_NEGATIVE_INT, PORT, POSITIVE_INT, SEED
from launch.recipes import STAGES
from launch.slurm import HOSTS, LaunchConfig, plan, render, submit


def build_parser() -> argparse.ArgumentParser:
    stages = "; ".join(f"{n}: {r.description}" for n, r in STAGES.items())
    p = argparse.ArgumentParser(
        prog="jam-launch",
        description="Launch a JAM training stage on SLURM through fairseq-train or metaseq-train. "
                    f"Stages: {stages}.")
    p.add_argument("--stage", required=True, choices=list(STAGES), help="paper stage to run")
    p.add_argument("--host", required=True, choices=HOSTS, help="trainer: fairseq-train or metaseq-train")
    p.add_argument("--data", required=True, help="binarized data directory (jam-data output)")
    p.add_argument("--save-dir", required=True, help="checkpoint/log directory; scripts go to SAVE_DIR/slurm/")
    p.add_argument("--arch", default="jam_cross_7b",
                   help="registered arch, e.g. jam_uniform_7b, jam_width_7b, jam_cross_7b (default %(default)s)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--restore-file", help="starting weights (jam-ckpt output), loaded with all --reset-* flags")
    start.add_argument("--finetune-from-model", help="starting weights through the host's --finetune-from-model")
    p.add_argument("--user-dir", help="jam_metaseq package path for --user-dir (default: this checkout's)")
    p.add_argument("--gpus", type=POSITIVE_INT, help="total GPUs (default: the paper's: alignment 256, instruct 64)")
    p.add_argument("--gpus-per-node", type=POSITIVE_INT, default=8, help="GPUs per node (default %(default)s)")
    p.add_argument("--tokens-per-sample", type=POSITIVE_INT, default=4096, help="sequence length (default %(default)s)")
    p.add_argument("--max-tokens", type=POSITIVE_INT,
                   help="tokens per GPU per step, a multiple of --tokens-per-sample (default: one sequence)")
    p.add_argument("--model-parallel-size", type=POSITIVE_INT, default=1, help="tensor parallelism (metaseq only)")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"),
                   help="training precision (default: bf16, the paper's; fp16 for --host fairseq, whose fully "
                        "sharded training refuses bf16)")
    p.add_argument("--seed", type=SEED, default=1, help="host seed (default %(default)s)")
    p.add_argument("--cross-every", type=NON_NEGATIVE_INT,
                   help="JAM-Cross: a cross block every K layers (0 = none); for ablation_cross runs only K")
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--account", help="SLURM account")
    p.add_argument("--cpus-per-task", type=POSITIVE_INT, default=10, help="CPU cores per GPU task (default %(default)s)")
    p.add_argument("--time-hours", type=POSITIVE_INT, help="SLURM time limit in hours (default: the stage's)")
    p.add_argument("--port", type=PORT, default=29500, help="--distributed-port (default %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="print commands and sbatch scripts, submit nothing")
    p.add_argument("extra", nargs=argparse.REMAINDER,
                   help="after --: extra flags appended verbatim to the training command")
    return p


def _run(args: argparse.Namespace) -> int:
    extra = list(args.extra)
    if extra and extra[0] == "--":
        extra = extra[1:]
    cfg = LaunchConfig(
        stage=args.stage, host=args.host, data=args.data, save_dir=args.save_dir, arch=args.arch,
        restore_file=args.restore_file, finetune_from_model=args.finetune_from_model,
        user_dir=args.user_dir, gpus=args.gpus, gpus_per_node=args.gpus_per_node,
        tokens_per_sample=args.tokens_per_sample, max_tokens=args.max_tokens,
        model_parallel_size=args.model_parallel_size, precision=args.precision, seed=args.seed,
        cross_every=args.cross_every, partition=args.partition, account=args.account,
        cpus_per_task=args.cpus_per_task, time_hours=args.time_hours, port=args.port,
        extra_args=extra)
    jobs = plan(cfg)
    if args.dry_run:
        print(render(jobs))
        return 0
    for reply in submit(jobs, script_dir=f"{args.save_dir}/slurm"):
        print(reply)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("jam-launch", lambda: _run(args),
                   interrupted="jobs already submitted keep running (see squeue); no script was left "
                               "half-written")


if __name__ == "__main__":
    sys.exit(main())
