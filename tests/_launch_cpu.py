"""``jam-launch`` jobs run for real on this machine's CPUs, for the tests (docs/METASEQ.md, "What
runs where").

``jam-launch --dry-run`` prints each job's training command and its sbatch script. A CPU test runs
the script as written (bash: its ``mkdir``, its resume logic, its ``srun`` line) with a stand-in
``srun`` first on ``PATH``, which starts the command as ``torchrun --nproc_per_node N`` processes
after ``cpu_argv``: the GPU-only flags dropped (``--bf16`` / ``--fp16``: CUDA mixed precision;
``--distributed-port``: SLURM's rendez-vous, torchrun gives the processes theirs), the chosen
flags' values replaced (tiny sizes, few updates), the CPU flags appended. Nothing else is changed,
and there is no second launcher: what runs is jam-launch's own script and command.

This module imports nothing heavy: the ``srun`` stand-in imports it too.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Mapping

GPU_ONLY = ("--bf16", "--fp16", "--distributed-port")
"""Flags of jam-launch's commands that a CPU run drops (with their values)."""
CPU_FLAGS = ("--cpu", "--distributed-backend", "gloo", "--num-workers", "0")
"""What a CPU run adds: no CUDA, gloo collectives, data read in the training process."""
HERE = Path(__file__).resolve().parent


def cpu_argv(argv: Iterable[str], *, values: Mapping[str, str] | None = None, drop: Iterable[str] = ()) -> list[str]:
    """A jam-launch training command's arguments as a CPU test runs them: ``GPU_ONLY`` and
    ``drop`` flags removed with their values, each flag of ``values`` given that value (it must be
    in the command), ``CPU_FLAGS`` appended."""
    argv, values, drop = list(argv), dict(values or {}), set(GPU_ONLY) | set(drop)
    missing = [f for f in values if f not in argv]
    if missing:
        raise ValueError(f"cpu_argv: the command has no {missing}")
    out: list[str] = []
    i = 0
    while i < len(argv):
        flag = argv[i]
        n = 1
        while i + n < len(argv) and not argv[i + n].startswith("--"):
            n += 1  # the flag's values
        if flag in drop:
            pass
        elif flag in values:
            out += [flag, values[flag]]
        else:
            out += argv[i:i + n]
        i += n
    return out + list(CPU_FLAGS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_SRUN = """#!{python}
# srun stand-in written by tests/_launch_cpu.py: the job's step as torchrun processes on this machine
import json, os, sys
sys.path.insert(0, {here!r})
from _launch_cpu import cpu_argv
spec = json.loads(os.environ["JAM_CPU_SRUN"])
args = sys.argv[1:]
while args and args[0].startswith("--"):  # srun's own options (--label)
    args = args[1:]
tool, rest = args[0], args[1:]
bin_dir = os.path.dirname(sys.executable)
torchrun = os.path.join(bin_dir, "torchrun")
os.execv(torchrun, [torchrun, "--nproc_per_node", str(spec["nproc"]), "--master_port", str(spec["port"]),
                    os.path.join(bin_dir, tool), *cpu_argv(rest, values=spec["values"], drop=spec["drop"])])
"""


def run_script(script: str, *, workdir: Path, nproc: int, values: Mapping[str, str] | None = None,
               drop: Iterable[str] = (), env: Mapping[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a jam-launch sbatch ``script`` with bash, its ``srun`` step as ``nproc`` torchrun
    processes of ``cpu_argv(command, values=values, drop=drop)``; stdout and stderr together."""
    workdir.mkdir(parents=True, exist_ok=True)
    bin_dir = workdir / "bin"
    bin_dir.mkdir(exist_ok=True)
    srun = bin_dir / "srun"
    srun.write_text(_SRUN.format(python=sys.executable, here=str(HERE)))
    srun.chmod(0o755)
    job = workdir / "job.sbatch"
    job.write_text(script)
    spec = {"nproc": nproc, "port": free_port(), "values": dict(values or {}), "drop": list(drop)}
    full_env = dict(env, PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', os.environ.get('PATH', ''))}",
                    JAM_CPU_SRUN=json.dumps(spec))
    return subprocess.run(["bash", str(job)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=full_env, timeout=timeout, cwd=workdir)


def dry_run(*flags: str) -> tuple[list[str], str]:
    """``jam-launch FLAGS --dry-run`` (one job): its training command (argv, the tool first) and its
    sbatch script, parsed from what it prints."""
    import contextlib
    import io
    import shlex

    from launch.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*flags, "--dry-run"]) == 0
    lines = out.getvalue().splitlines()
    if sum(line.startswith("### job ") for line in lines) != 1:
        raise ValueError(f"jam-launch {' '.join(flags)}: expected one job")
    command = shlex.split(lines[lines.index("### command:") + 1])
    script = "\n".join(lines[lines.index("### sbatch script:") + 1:]) + "\n"
    return command, script
