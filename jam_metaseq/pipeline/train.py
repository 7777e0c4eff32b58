"""Training runs of ``jam run``: the host's command line and where it runs (paper §3.1 Training).

The command is built by ``launch.slurm.train_command`` (the code behind ``jam-launch``) from a
``StageRecipe`` made of the plan's optimisation settings (learning rate, warm-up, Adam betas,
weight decay, clipping, end learning rate, log interval), so a plan's runs on this machine, on
SLURM and through ``jam-launch`` use the same flags; the model flags (``jam_metaseq.flags``) and
the plan's other settings (mixture, validation points) are merged in, each flag once. Placement
adds what differs between a local process and a SLURM job:

- ``LocalPlacement``: one process on this machine (``--cpu`` on a CPU; the plain DDP backend and
  no SLURM rendez-vous on one device), its output streamed into ``train.log`` and a progress bar;
- ``SubmititPlacement``: a submitit job (one task per GPU, the host's SLURM rendez-vous through
  ``--distributed-port``); the driver polls the job's log for progress. ``cluster: local`` runs
  the same jobs as local subprocesses (the SLURM path without a cluster). Evaluation and
  generation go through ``call`` the same way.

The validation curve is read back from the host's ``--log-format json`` lines (``parse_log``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from jam_metaseq.pipeline.spec import OptimSpec, PlanSpec, SlurmSpec
from jam_metaseq.pipeline.units import PipelineError, bar, log, repo_paths


@dataclass
class TrainJob:
    """One training run (a parent from scratch, a variant's continued pretraining, instruct tuning)."""

    desc: str
    """Progress-bar / log label."""
    data: Path
    """Binarized data directory (``DATA/{train,valid}/{source}``)."""
    save_dir: Path
    """Checkpoints and ``train.log``."""
    arch: str
    """Registered arch (``jam_uniform_tiny`` ...: the size fills nothing the model flags give)."""
    model_flags: list[str]
    """Model flags (``flags.command_line_from_config``: the shape, and JAM-Cross's settings)."""
    optim: OptimSpec
    """Optimisation settings."""
    updates: int
    """Updates to run."""
    tokens_per_sample: int
    """Sequence length."""
    seed: int
    """Host ``--seed``."""
    restore: Path | None = None
    """Starting weights (loaded with every ``--reset-*`` flag); None = from scratch."""
    mixture: dict[str, float] | None = None
    """Training source weights (None = every source equally)."""
    instruction: bool = False
    """Loss only on the tokens the data's mask keeps (instruct tuning)."""


def warmup_updates(optim: OptimSpec, updates: int) -> int:
    return max(1, int(round(updates * optim.warmup_fraction)))


def curve_interval(optim: OptimSpec, updates: int) -> int:
    return max(1, updates // optim.curve_points)


def host_command(job: TrainJob, *, plan: PlanSpec, gpus: int, slurm: SlurmSpec | None = None) -> list[str]:
    """The host's training argv for ``job`` on ``gpus`` devices (0 = one CPU process), through
    ``launch.slurm.train_command`` with a recipe made of the job's settings."""
    from launch.recipes import StageRecipe
    from launch.slurm import LaunchConfig, train_command

    o = job.optim
    replicas = max(1, gpus)
    if o.batch_size % replicas:
        raise PipelineError(f"{job.desc}: batch_size {o.batch_size} does not divide over {replicas} GPUs")
    max_tokens = (o.batch_size // replicas) * job.tokens_per_sample
    every = curve_interval(o, job.updates)
    recipe = StageRecipe(name="plan", description=job.desc, lr=o.lr, warmup_updates=warmup_updates(o, job.updates),
                         batch_tokens=o.batch_size * job.tokens_per_sample, gpus=replicas, max_update=job.updates,
                         save_interval_updates=every, time_hours=slurm.time_hours if slurm else 24,
                         adam_betas=(o.betas[0], o.betas[1]), weight_decay=o.weight_decay, clip_norm=o.clip_norm,
                         end_lr=o.end_lr, log_interval=max(1, min(10, job.updates // 20)))
    pkg, _ = repo_paths()
    # validation and checkpoints by updates only (the curve's points), none at an epoch's end:
    # fairseq's flags; metaseq validates by updates alone and names the epoch save interval its way
    epoch_end = (["--validate-interval", "1000000", "--save-interval", "1000000", "--no-epoch-checkpoints"]
                 if plan.host == "fairseq" else ["--save-interval-epochs", "1000000"])
    extra = [*job.model_flags, "--validate-interval-updates", str(every), *epoch_end, "--num-workers", "0",
             "--batch-size-valid", str(max(1, o.batch_size // replicas))]
    if job.mixture:
        extra += ["--mixture", ",".join(f"{k}={v:g}" for k, v in job.mixture.items())]
    if job.instruction:
        extra.append("--instruction")
    if gpus == 0:
        extra.append("--cpu")
    cfg = LaunchConfig(
        stage="plan", host=plan.host, data=str(job.data), save_dir=str(job.save_dir), arch=job.arch,
        restore_file=str(job.restore) if job.restore is not None else None, user_dir=str(pkg), gpus=replicas,
        gpus_per_node=slurm.gpus_per_node if slurm else max(1, replicas), tokens_per_sample=job.tokens_per_sample,
        max_tokens=max_tokens, precision=plan.precision, seed=job.seed,
        partition=slurm.partition if slurm else None, account=slurm.account if slurm else None,
        cpus_per_task=slurm.cpus_per_task if slurm else 1,
        # one process on this machine: no SLURM rendez-vous, even inside an allocation
        port=slurm.port if slurm else -1,
        # the plain DDP backend where fairscale's FSDP has no GPU process group
        ddp_backend="legacy_ddp" if plan.host == "fairseq" and (slurm is None or gpus == 0) else "fully_sharded",
        extra_args=extra)
    try:
        return train_command(cfg, recipe)
    except ValueError as e:
        raise PipelineError(f"{job.desc}: {e}") from None


def resolve_executable(cmd: list[str]) -> list[str]:
    """``fairseq-train`` / ``metaseq-train`` of this interpreter's environment (else PATH, else
    ``python -m``)."""
    tool = cmd[0]
    exe = Path(sys.executable).parent / tool
    if exe.is_file():
        return [str(exe), *cmd[1:]]
    found = shutil.which(tool)
    if found:
        return [found, *cmd[1:]]
    module = {"fairseq-train": "fairseq_cli.train", "metaseq-train": "metaseq.cli.train"}.get(tool)
    if module is None:
        return cmd
    return [sys.executable, "-m", module, *cmd[1:]]


def subprocess_env(*, device: str, threads: int) -> dict[str, str]:
    _, root = repo_paths()
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif device.startswith("cuda:"):
        env["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
    return env


# ---- logs --------------------------------------------------------------------------------------
def parse_log(line: str) -> tuple[str, dict] | None:
    """A host ``--log-format json`` line -> ("train_inner" | "valid" | "train", record) or None."""
    for tag in ("train_inner", "valid", "train"):
        mark = f"| {tag} | "
        if mark in line:
            try:
                rec = json.loads(line.split(mark, 1)[1])
            except json.JSONDecodeError:
                return None
            return (tag, rec) if isinstance(rec, dict) else None
    return None


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def read_curve(log_path: Path) -> tuple[list[dict], float]:
    """(validation points by update, last training loss) from a training log (every attempt of a
    resumed run: the last record of an update wins)."""
    points: dict[int, dict] = {}
    last = float("nan")
    if not log_path.is_file():
        return [], last
    for line in log_path.read_text(errors="replace").splitlines():
        parsed = parse_log(line)
        if parsed is None:
            continue
        tag, rec = parsed
        if tag == "train_inner":
            last = _num(rec.get("loss"))
        elif tag == "valid":
            u = int(_num(rec.get("valid_num_updates", 0)) if math.isfinite(_num(rec.get("valid_num_updates"))) else 0)
            point = {"update": u}
            for k in ("ppl", "text_ppl", "image_ppl", "loss"):
                if f"valid_{k}" in rec:
                    point[k] = _num(rec[f"valid_{k}"])
            points[u] = point
    return [points[u] for u in sorted(points)], last


def _progress_from(line: str, pbar: Any) -> None:
    parsed = parse_log(line)
    if parsed is not None and parsed[0] == "train_inner":
        n = int(_num(parsed[1].get("num_updates", 0)) or 0)
        pbar.update(max(0, n - pbar.n))
        loss = _num(parsed[1].get("loss"))
        if math.isfinite(loss):
            pbar.set_postfix(loss=f"{loss:.3f}")


# ---- placements ----------------------------------------------------------------------------------
def run_logged(cmd: list[str], env: dict[str, str], log_path: str) -> int:
    """Run ``cmd`` with its output appended to ``log_path`` (rank > 0 of a SLURM job: a file of its
    own); returns the exit status. Module-level so submitit can pickle it."""
    rank = os.environ.get("SLURM_PROCID") or os.environ.get("SUBMITIT_LOCAL_GLOBALID")
    path = Path(log_path)
    if rank not in (None, "0"):
        path = path.with_name(f"{path.stem}.rank{rank}{path.suffix}")
    with open(path, "a") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **env})
    if rc != 0:
        raise RuntimeError(f"exit status {rc}; see {path}")
    return rc


@dataclass
class LocalPlacement:
    """Every run on this machine."""

    device: str
    threads: int = 0
    """Intra-op threads per process (0 = torch's default)."""
    progress: bool = True

    @property
    def gpus(self) -> int:
        return 0 if self.device == "cpu" else 1

    slurm = None

    def train(self, cmd: list[str], *, log_path: Path, desc: str, updates: int) -> None:
        env = subprocess_env(device=self.device, threads=self.threads)
        cmd = resolve_executable(cmd)
        with open(log_path, "a") as logf, bar(updates, desc, enabled=self.progress, unit="upd") as pbar:
            logf.write(" ".join(cmd) + "\n")
            logf.flush()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                    bufsize=1)
            assert proc.stdout is not None
            try:
                for line in proc.stdout:
                    logf.write(line)
                    _progress_from(line, pbar)
                rc = proc.wait()
            except BaseException:
                proc.terminate()
                proc.wait()
                raise
        if rc != 0:
            tail = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()][-1:]
            raise PipelineError(f"{cmd[0].rsplit('/', 1)[-1]} failed (exit {rc}) for {desc}; see {log_path}: "
                                f"{tail[0] if tail else ''}")

    def call(self, fn: Callable[..., Any], /, *args: Any, desc: str = "", **kwargs: Any) -> Any:
        return fn(*args, **kwargs)


@dataclass
class SubmititPlacement:
    """Training and evaluation as submitit jobs (SLURM, or ``cluster: local``)."""

    slurm: SlurmSpec
    folder: Path
    """submitit's job folder (pickles, stdout/stderr per job)."""
    device: str = "cuda"
    progress: bool = True
    poll_s: float = 5.0
    _executors: dict[str, Any] = field(default_factory=dict)

    @property
    def gpus(self) -> int:
        return self.slurm.gpus

    def _executor(self, *, tasks: int, gpus: int, name: str) -> Any:
        import submitit

        ex = submitit.AutoExecutor(folder=str(self.folder), cluster=self.slurm.cluster)
        nodes = max(1, -(-gpus // self.slurm.gpus_per_node)) if gpus else 1
        params: dict[str, Any] = {"timeout_min": self.slurm.time_hours * 60, "nodes": nodes,
                                  "tasks_per_node": max(1, tasks // nodes), "gpus_per_node": min(gpus, self.slurm.gpus_per_node),
                                  "cpus_per_task": self.slurm.cpus_per_task, "name": name}
        if self.slurm.cluster == "slurm":
            if self.slurm.partition:
                params["slurm_partition"] = self.slurm.partition
            if self.slurm.account:
                params["slurm_account"] = self.slurm.account
        else:
            params = {k: v for k, v in params.items() if k in ("timeout_min", "tasks_per_node", "gpus_per_node")}
            params["tasks_per_node"] = 1  # the local executor cannot host a multi-GPU rendez-vous
        ex.update_parameters(**params)
        return ex

    def _wait(self, job: Any, *, on_poll: Callable[[], None] | None = None) -> Any:
        while not job.done():
            if on_poll:
                on_poll()
            time.sleep(self.poll_s)
        if on_poll:
            on_poll()
        try:
            return job.results()[0]
        except Exception as e:  # noqa: BLE001 - submitit wraps the job's failure in its own error
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            cause = lines[-1] if lines else type(e).__name__  # the job's own exception closes the trace
            raise PipelineError(f"job {job.job_id} failed: {cause} (logs: {self.folder})") from None

    def train(self, cmd: list[str], *, log_path: Path, desc: str, updates: int) -> None:
        env = subprocess_env(device=self.device if self.gpus else "cpu", threads=0)
        for k in ("CUDA_VISIBLE_DEVICES",):
            if self.gpus:
                env.pop(k, None)
        cmd = resolve_executable(cmd)
        ex = self._executor(tasks=max(1, self.gpus), gpus=self.gpus, name=f"jam-{desc.split(':')[0][:40]}")
        job = ex.submit(run_logged, cmd, env, str(log_path))
        log(f"{desc}: submitted job {job.job_id}")
        offset = 0
        with bar(updates, desc, enabled=self.progress, unit="upd") as pbar:
            def poll() -> None:
                nonlocal offset
                if log_path.is_file():
                    with open(log_path, errors="replace") as f:
                        f.seek(offset)
                        chunk = f.read()
                        offset = f.tell()
                    for line in chunk.splitlines():
                        _progress_from(line, pbar)

            self._wait(job, on_poll=poll)

    def call(self, fn: Callable[..., Any], /, *args: Any, desc: str = "", **kwargs: Any) -> Any:
        ex = self._executor(tasks=1, gpus=min(1, self.gpus), name=f"jam-{desc[:40] or fn.__name__}")
        job = ex.submit(fn, *args, **kwargs)
        log(f"{desc or fn.__name__}: submitted job {job.job_id}")
        return self._wait(job)


def train(job: TrainJob, *, plan: PlanSpec, placement: Any) -> dict:
    """Run ``job`` where ``placement`` says; returns its curve, last loss, updates and token budget.
    A save folder holding ``checkpoint_last.pt`` (an interrupted attempt) resumes from it."""
    job.save_dir.mkdir(parents=True, exist_ok=True)
    resuming = (job.save_dir / "checkpoint_last.pt").is_file()
    if resuming:
        job = TrainJob(**{**job.__dict__, "restore": None})  # the host resumes from checkpoint_last.pt
    cmd = host_command(job, plan=plan, gpus=placement.gpus, slurm=placement.slurm)
    log_path = job.save_dir / "train.log"
    placement.train(cmd, log_path=log_path, desc=job.desc, updates=job.updates)
    for extra in job.save_dir.glob("checkpoint*.pt"):
        if extra.name != "checkpoint_last.pt":
            extra.unlink()
    if not (job.save_dir / "checkpoint_last.pt").is_file():
        raise PipelineError(f"the trainer wrote no checkpoint_last.pt in {job.save_dir}; see {log_path}")
    curve, last = read_curve(log_path)
    return {"curve": curve, "final_train_loss": last, "updates": job.updates,
            "token_budget": job.updates * job.optim.batch_size * job.tokens_per_sample}


__all__ = ["LocalPlacement", "SubmititPlacement", "TrainJob", "curve_interval", "host_command", "parse_log",
           "read_curve", "resolve_executable", "run_logged", "subprocess_env", "train",
           "warmup_updates"]
