"""SLURM jobs for the paper's training stages through fairseq or metaseq (JAM §3.1, Table 4).

``plan(cfg)`` turns a ``LaunchConfig`` (host, stage, paths, cluster shape) into ``Job``s: the
exact training command and the sbatch script that runs it, one task per GPU (both hosts infer
their distributed setup from SLURM's environment once ``--distributed-port`` is given).
``submit(jobs)`` writes the scripts atomically and calls ``sbatch``. Nothing here imports a host.

The per-update batch follows from the cluster shape:
    batch_tokens = (gpus / model_parallel_size) x max_tokens x update_freq
with ``max_tokens`` a whole number of ``tokens_per_sample`` sequences; combinations that do not
divide are refused with the numbers that did not fit.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from jam_metaseq.errors import JamError
from jam_metaseq.flags import FLAGS_BY_DEST
from jam_metaseq.inputs import safe_component, script_value
from launch.recipes import StageRecipe, stage

HOSTS = ("fairseq", "metaseq")
ARCHS = ("jam_uniform", "jam_width", "jam_cross")


class SubmitError(JamError, RuntimeError):
    """``sbatch`` refused a job script; the message holds its reply."""


@dataclass
class LaunchConfig:
    """Everything a launch needs besides the stage recipe."""

    stage: str
    """Stage name (``alignment``, ``instruct``, ``ablation_cross``)."""
    host: Literal["fairseq", "metaseq"]
    """Trainer: ``fairseq`` (fairseq-train) or ``metaseq`` (metaseq-train)."""
    data: str
    """Binarized data directory (the cm3_multimodal task's positional DATA argument)."""
    save_dir: str
    """Where checkpoints, logs and the generated sbatch scripts go."""
    arch: str = "jam_cross_7b"
    """Registered arch name (``jam_uniform_7b``, ``jam_width_7b``, ``jam_cross_7b``, ...)."""
    restore_file: str | None = None
    """Starting weights (a ``jam-ckpt`` output), loaded with every ``--reset-*`` flag."""
    finetune_from_model: str | None = None
    """Alternative to ``restore_file``: the hosts' ``--finetune-from-model``."""
    user_dir: str | None = None
    """Path of the jam_metaseq package for ``--user-dir`` (default: this checkout's)."""
    gpus: int | None = None
    """Total GPUs (default: the paper's for the stage)."""
    gpus_per_node: int = 8
    """GPUs per node; ``gpus`` must be a multiple."""
    tokens_per_sample: int = 4096
    """Sequence length."""
    max_tokens: int | None = None
    """Tokens per GPU per forward/backward (default: ``tokens_per_sample``, one sequence)."""
    model_parallel_size: int = 1
    """Tensor-parallel degree (metaseq only)."""
    precision: Literal["bf16", "fp16", "fp32"] | None = None
    """Training precision (default ``default_precision``: bf16, the paper's, except fp16 for fairseq's
    fully sharded training, which refuses ``--bf16``)."""
    seed: int = 1
    """Seed for the host (the CM3 transform derives its own from (seed, epoch, index))."""
    cross_every: int | None = None
    """Override ``--cross-every`` (JAM-Cross); the ablation stage sweeps it itself."""
    partition: str | None = None
    """SLURM partition."""
    account: str | None = None
    """SLURM account."""
    cpus_per_task: int = 10
    """CPU cores per GPU task."""
    time_hours: int | None = None
    """SLURM time limit in hours (default: the stage's)."""
    port: int = 29500
    """``--distributed-port`` for the host's SLURM rendez-vous (-1: none, one process outside SLURM)."""
    ddp_backend: str = "fully_sharded"
    """``--ddp-backend`` (``legacy_ddp`` where FSDP has no GPU process group: one CPU process)."""
    extra_args: list[str] = field(default_factory=list)
    """More flags for the training command; a flag the command already has takes this value instead
    (``merge_flags``: each flag once)."""

    def __post_init__(self) -> None:
        if self.host not in HOSTS:
            raise ValueError(f"host must be one of {HOSTS}, got {self.host!r}")
        if self.restore_file and self.finetune_from_model:
            raise ValueError("give restore_file or finetune_from_model, not both")
        if self.model_parallel_size > 1 and self.host != "metaseq":
            raise ValueError("model_parallel_size > 1 needs --host metaseq (fairseq has no tensor parallelism here)")
        if self.precision is None:
            object.__setattr__(self, "precision", default_precision(self.host, self.ddp_backend))
        if self.precision not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"precision must be bf16, fp16 or fp32, got {self.precision!r}")
        if self.precision == "bf16" and self.host == "fairseq" and self.ddp_backend == "fully_sharded":
            raise ValueError("fairseq's fully sharded training refuses --bf16 (its trainer: 'FullyShardedDataParallel "
                             "is not compatible with --bf16'): use --precision fp16, --host metaseq, or --ddp-backend "
                             "legacy_ddp")


def default_precision(host: str, ddp_backend: str) -> str:
    """bf16 (the paper trains in bf16), except fp16 where fairseq shards fully: its trainer refuses bf16
    with FSDP."""
    return "fp16" if host == "fairseq" and ddp_backend == "fully_sharded" else "bf16"


@dataclass(frozen=True)
class Job:
    """One SLURM job: its name, the training command (argv) and the sbatch script."""

    name: str
    command: list[str]
    script: str


def update_freq(*, batch_tokens: int, gpus: int, max_tokens: int, tokens_per_sample: int,
                model_parallel_size: int = 1) -> int:
    """Gradient-accumulation steps so that one update sees exactly ``batch_tokens`` tokens."""
    if min(batch_tokens, gpus, max_tokens, tokens_per_sample, model_parallel_size) <= 0:
        raise ValueError("batch_tokens, gpus, max_tokens, tokens_per_sample and model_parallel_size must be > 0")
    if max_tokens % tokens_per_sample:
        raise ValueError(
            f"max_tokens {max_tokens} is not a multiple of tokens_per_sample {tokens_per_sample}")
    if gpus % model_parallel_size:
        raise ValueError(f"gpus {gpus} is not a multiple of model_parallel_size {model_parallel_size}")
    replicas = gpus // model_parallel_size
    per_step = replicas * max_tokens
    if batch_tokens % per_step:
        raise ValueError(
            f"batch of {batch_tokens} tokens does not divide into {replicas} data-parallel replicas x "
            f"{max_tokens} tokens per step ({per_step} tokens); change --gpus or --max-tokens")
    return batch_tokens // per_step


def _default_user_dir() -> str:
    return str(Path(__file__).resolve().parent.parent / "jam_metaseq")


def _flag_groups(argv: Sequence[str]) -> list[list[str]]:
    """``argv`` as groups: the words before the first flag, then each ``--flag`` with its values."""
    groups: list[list[str]] = [[]]
    for word in argv:
        if word.startswith("--") and len(word) > 2:
            groups.append([word])
        else:
            groups[-1].append(word)
    return groups


def merge_flags(command: Sequence[str], overrides: Sequence[str]) -> list[str]:
    """``command`` with ``overrides`` merged in: an override's flag (with its values) replaces the
    command's occurrence of that flag where it stands, a new flag is appended, so every flag appears
    once and the override's value is the one the host reads (as it would, last, if repeated)."""
    head, *groups = _flag_groups(command)
    extra_head, *extra = _flag_groups(overrides)
    by_flag: dict[str, list[str]] = {}
    for g in extra:
        by_flag[g[0]] = g  # the last of a flag given twice
    out = list(head)
    for g in groups:
        out += by_flag.pop(g[0], g)
    out += extra_head  # words before the overrides' first flag stay where appending put them
    for g in by_flag.values():
        out += g
    return out


def train_command(cfg: LaunchConfig, recipe: StageRecipe, *, cross_every: int | None = None) -> list[str]:
    """The host's training command line for one job (argv, without ``srun``): the recipe's
    settings, then ``cfg.extra_args`` merged in (``merge_flags``: each flag once)."""
    gpus = cfg.gpus or recipe.gpus
    max_tokens = cfg.max_tokens or cfg.tokens_per_sample
    freq = update_freq(batch_tokens=recipe.batch_tokens, gpus=gpus, max_tokens=max_tokens,
                       tokens_per_sample=cfg.tokens_per_sample,
                       model_parallel_size=cfg.model_parallel_size)
    cmd = [f"{cfg.host}-train", cfg.data,
           "--user-dir", cfg.user_dir or _default_user_dir(),
           "--task", "cm3_multimodal", "--criterion", "cm3", "--arch", cfg.arch,
           "--tokens-per-sample", str(cfg.tokens_per_sample),
           "--max-tokens", str(max_tokens),
           "--batch-size", str(max_tokens // cfg.tokens_per_sample),
           "--update-freq", str(freq),
           "--optimizer", "adam", "--adam-betas", f"({recipe.adam_betas[0]}, {recipe.adam_betas[1]})",
           "--adam-eps", repr(recipe.adam_eps), "--weight-decay", repr(recipe.weight_decay),
           "--clip-norm", repr(recipe.clip_norm),
           "--lr", repr(recipe.lr), "--lr-scheduler", "polynomial_decay",
           "--warmup-updates", str(recipe.warmup_updates)]
    if recipe.max_update:
        cmd += ["--max-update", str(recipe.max_update), "--total-num-update", str(recipe.max_update)]
    else:
        # The scheduler needs a horizon; constant lr after warm-up makes its value irrelevant.
        cmd += ["--total-num-update", "1000000"]
    end_lr = recipe.end_lr if recipe.end_lr is not None else (0.0 if recipe.decay_to_zero else recipe.lr)
    cmd += ["--end-learning-rate", repr(end_lr)]
    if recipe.max_epoch:
        cmd += ["--max-epoch", str(recipe.max_epoch)]
    cmd += ["--save-dir", cfg.save_dir, "--save-interval-updates", str(recipe.save_interval_updates)]
    if recipe.keep_every_epoch:
        cmd += ["--save-interval-epochs" if cfg.host == "metaseq" else "--save-interval", "1",
                "--keep-last-epochs", "-1"]
    else:
        # the same setting under each host's name (fairseq kept the older one)
        cmd += ["--keep-last-updates" if cfg.host == "metaseq" else "--keep-interval-updates", "2"]
    cmd += ["--ddp-backend", cfg.ddp_backend, "--distributed-world-size", str(gpus),
            "--distributed-port", str(cfg.port), "--seed", str(cfg.seed),
            "--log-format", "json", "--log-interval", str(recipe.log_interval)]
    if cfg.precision == "bf16":
        # metaseq reads --bf16 as a modifier of --fp16 (mixed precision); fairseq takes it alone.
        cmd += ["--bf16", "--fp16"] if cfg.host == "metaseq" else ["--bf16"]
    elif cfg.precision == "fp16":
        cmd += ["--fp16"]
    if cfg.host == "metaseq":
        cmd += ["--model-parallel-size", str(cfg.model_parallel_size), "--use-sharded-state"]
    if cfg.restore_file:
        cmd += ["--restore-file", cfg.restore_file, "--reset-optimizer", "--reset-dataloader",
                "--reset-meters", "--reset-lr-scheduler"]
    elif cfg.finetune_from_model:
        cmd += ["--finetune-from-model", cfg.finetune_from_model]
    if cross_every is not None:
        cmd += [FLAGS_BY_DEST["cross_every"].option, str(cross_every)]
    return merge_flags(cmd, cfg.extra_args)


def _sbatch(value: str | int, what: str) -> str:
    return script_value(value, position="sbatch", what=what)


def _shell(value: str | int, what: str = "a training-command word") -> str:
    return script_value(value, position="shell", what=what)


def _shell_words(words: Sequence[str]) -> str:
    # a word after a flag is named by it (the flag the user gave); the rest by position
    return " ".join(_shell(w, f"the value of {words[i - 1]}" if i and words[i - 1].startswith("--") else
                           f"word {i} of the training command") for i, w in enumerate(words))


def sbatch_script(cfg: LaunchConfig, recipe: StageRecipe, *, name: str, command: Sequence[str]) -> str:
    """An sbatch script running ``command`` as one task per GPU. Every value goes through
    ``script_value`` for its position (issue 27 §5): ``#SBATCH`` values are one plain word, shell
    words are quoted, so no flag's value can become a line of the script."""
    gpus = cfg.gpus or recipe.gpus
    if gpus % cfg.gpus_per_node and gpus > cfg.gpus_per_node:
        raise ValueError(f"gpus {gpus} is not a multiple of gpus_per_node {cfg.gpus_per_node}")
    nodes = max(1, gpus // cfg.gpus_per_node)
    per_node = min(gpus, cfg.gpus_per_node)
    lines = [
        "#!/bin/bash",
        f"# jam-launch: stage {recipe.name} ({recipe.description}), host {cfg.host}",
        f"#SBATCH --job-name={_sbatch(name, 'the job name (from --stage and --arch)')}",
        f"#SBATCH --nodes={_sbatch(nodes, '--gpus')}",
        f"#SBATCH --ntasks-per-node={_sbatch(per_node, '--gpus-per-node')}",
        f"#SBATCH --gpus-per-node={_sbatch(per_node, '--gpus-per-node')}",
        f"#SBATCH --cpus-per-task={_sbatch(cfg.cpus_per_task, '--cpus-per-task')}",
        "#SBATCH --mem=0",
        f"#SBATCH --time={_sbatch(cfg.time_hours or recipe.time_hours, '--time-hours')}:00:00",
        f"#SBATCH --output={_sbatch(cfg.save_dir, '--save-dir')}/slurm-%j.out",
        "#SBATCH --open-mode=append",
    ]
    if cfg.partition:
        lines.append(f"#SBATCH --partition={_sbatch(cfg.partition, '--partition')}")
    if cfg.account:
        lines.append(f"#SBATCH --account={_sbatch(cfg.account, '--account')}")
    save = _shell(cfg.save_dir, "--save-dir")
    lines += [
        "set -euo pipefail",
        f"mkdir -p {save}",
        "export OMP_NUM_THREADS=1",
    ]
    command = list(command)
    if cfg.restore_file and "--restore-file" in command:
        # --restore-file with --reset-* would restart from the fused weights on a resubmission:
        # once the job has written checkpoint_last*.pt, resume from it instead.
        i = command.index("--restore-file")
        start = command[i:i + 6]
        rest = command[:i] + command[i + 6:]
        lines += [
            f'if compgen -G {save}"/checkpoint_last*.pt" > /dev/null; then START=(); '
            f"else START=({_shell_words(start)}); fi",
            "srun --label " + _shell_words(rest) + ' "${START[@]}"',
        ]
    else:
        lines.append("srun --label " + _shell_words(command))
    lines.append("")
    return "\n".join(lines)


def plan(cfg: LaunchConfig) -> list[Job]:
    """The jobs of one stage (one per ``--cross-every`` value for the Table 4 ablation)."""
    recipe = stage(cfg.stage)
    arch_family = next((a for a in ARCHS if cfg.arch.startswith(a)), None)
    if arch_family is None:
        raise ValueError(f"unknown arch {cfg.arch!r}; expected one of {ARCHS} or a sized variant")
    if recipe.cross_every_sweep:
        if arch_family != "jam_cross":
            raise ValueError(f"stage {recipe.name} ablates JAM-Cross; got arch {cfg.arch!r}")
        sweep: list[int | None] = list(recipe.cross_every_sweep)
        if cfg.cross_every is not None:
            sweep = [cfg.cross_every]
    else:
        sweep = [cfg.cross_every]
    if any(c is not None for c in sweep) and arch_family != "jam_cross":
        raise ValueError("--cross-every applies to jam_cross archs only")
    jobs = []
    for cross_every in sweep:
        tag = "" if cross_every is None else (
            "-nocross" if cross_every == 0 else f"-cross{cross_every}")
        # a file name (SAVE_DIR/slurm/NAME.sbatch) and, for the sweep, a directory under SAVE_DIR
        name = safe_component(f"jam-{recipe.name}-{cfg.arch}{tag}", what="the job name (from --stage and --arch)")
        job_cfg = cfg if cross_every is None else dataclasses.replace(
            cfg, save_dir=str(Path(cfg.save_dir) / name.removeprefix("jam-")))
        command = train_command(job_cfg, recipe, cross_every=cross_every)
        jobs.append(Job(name=name, command=command,
                        script=sbatch_script(job_cfg, recipe, name=name, command=command)))
    return jobs


def render(jobs: Sequence[Job]) -> str:
    """Dry-run text: for each job, its training command and its sbatch script."""
    out = []
    for job in jobs:
        out += [f"### job {job.name}", "### command:", shlex.join(job.command), "### sbatch script:",
                job.script]
    return "\n".join(out)


def submit(jobs: Sequence[Job], *, script_dir: str | os.PathLike) -> list[str]:
    """Write each script atomically under ``script_dir`` and ``sbatch`` it; returns sbatch's replies."""
    script_dir = Path(script_dir)
    script_dir.mkdir(parents=True, exist_ok=True)
    replies = []
    for job in jobs:
        path = script_dir / f"{job.name}.sbatch"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(job.script)
        os.replace(tmp, path)
        res = subprocess.run(["sbatch", str(path)], capture_output=True, text=True)
        if res.returncode:
            raise SubmitError(f"sbatch {path} failed: {res.stderr.strip() or res.stdout.strip()}")
        replies.append(res.stdout.strip())
    return replies
