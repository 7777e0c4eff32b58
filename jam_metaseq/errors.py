"""How every jam command fails: one home for the errors users see.

``run_cli(prog, command)`` is the top-level handler of every console script (``jam``, ``jam-data``,
``jam-ckpt``, ``jam-generate``, ``jam-retrieval``, ``jam-vq``, ``jam-launch``, ``jam-eval``):

- an **expected** error (bad input, a missing or unreadable file, a full disk) prints one line
  ``PROG: error: <file>: <cause>`` on stderr and exits 2;
- anything else is a **bug**: its traceback, then one line asking for a report (what to include:
  the whole message, which already holds the command line and the versions), exit 70 (EX_SOFTWARE);
- **SIGTERM** (what SLURM sends on ``scancel`` or at the time limit) raises ``Terminated``, a
  ``KeyboardInterrupt``, in the main thread, so the same cleanup as Ctrl-C runs (temp outputs are
  removed, nothing half-written stays under an output's name); exit 143 (128 + SIGTERM), or 130
  after Ctrl-C, with one line saying so.

Expected (``expected_errors()``): ``JamError`` (the project's own: ``CheckpointError``,
``OutputError``, ``DocumentError``, ``EvalInputError`` ... derive from it), ``ValueError`` (the
library's signal for a bad value, its message naming the file), ``OSError`` (reported as
``<filename>: <strerror>``), ``pickle.UnpicklingError``, running out of memory, and a missing
optional extra (``OPTIONAL_MODULES``: the line says what to ``pip install``). ``TypeError``,
``KeyError``, ``AttributeError``, ``IndexError``, ``RuntimeError`` are bugs: input is validated
before it can cause one (``jam_metaseq.inputs`` for names, JSON, YAML, images, numbers and script
values; ``safe_torch_load`` for checkpoints). Messages are one line whatever they hold: control
characters are escaped (``one_line``), never cut.
"""

from __future__ import annotations

import argparse
import os
import pickle
import platform
import shlex
import signal
import sys
import threading
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

EXIT_ERROR = 2
"""An expected error: bad input or environment (argparse's usage errors exit 2 as well)."""
EXIT_BUG = 70
"""An unexpected exception (sysexits.h EX_SOFTWARE): a bug to report."""

TRUST_PICKLE_HELP = ("unpickle globals outside the allow-list (argparse.Namespace, numpy scalars); "
                     "only for files you trust: a pickle can run code")
"""The help of ``--trust-pickle`` in every command that loads a checkpoint (one meaning everywhere:
``checkpoints_tools.safe_load.safe_torch_load(trust_pickle=True)``)."""


class JamError(Exception):
    """An expected failure: the input or the environment is wrong, not the code. The message names
    the file (and line, tensor or key) and says what is wrong, in one line."""


def add_trust_pickle_flag(parser: argparse.ArgumentParser | Any) -> None:
    """``--trust-pickle`` with its one help text (a parser or an argument group)."""
    parser.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE_HELP)


def _out_of_memory_types() -> tuple[type[BaseException], ...]:
    torch = sys.modules.get("torch")  # never import torch just to fail
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    return (MemoryError,) + ((oom,) if isinstance(oom, type) else ())


def expected_errors() -> tuple[type[BaseException], ...]:
    """The exception types ``run_cli`` reports in one line (module docstring)."""
    return (JamError, ValueError, OSError, pickle.UnpicklingError, *_out_of_memory_types())


OPTIONAL_MODULES = {"faiss": "retrieval", "open_clip": "retrieval", "lm_eval": "eval", "submitit": "launch",
                    "fairseq": "fairseq", "fairscale": "fairseq"}
"""Top-level modules of the optional extras (setup.py): one missing is the user's install, not a bug."""


def missing_extra(exc: BaseException) -> str | None:
    """``pip install`` advice when ``exc`` is an optional extra's module not being installed."""
    name = (getattr(exc, "name", None) or "").split(".")[0]
    if isinstance(exc, ModuleNotFoundError) and name in OPTIONAL_MODULES:
        return (f"this needs the optional module '{name}', which is not installed: "
                f"pip install 'jam_metaseq[{OPTIONAL_MODULES[name]}]'")
    return None


_CONTROL = {c: f"\\x{c:02x}" for c in range(32)} | {0x7F: "\\x7f", 0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}


def one_line(text: str) -> str:
    """``text`` with every control character escaped (a newline as ``\\n``, ESC as ``\\x1b``): a
    file name holding a newline or a terminal escape stays visible and whole in a one-line message,
    and cannot end the line or rewrite the terminal."""
    return text.strip().translate(_CONTROL)


def describe(exc: BaseException) -> str:
    """One line for an expected error: the file first when the exception knows it. Nothing is cut:
    control characters (a newline in a file name, a library's multi-line message) are escaped."""
    if isinstance(exc, OSError) and exc.strerror:
        where = exc.filename
        if where is not None:
            other = exc.filename2
            cause = exc.strerror + (f" (-> {one_line(os.fsdecode(other))})" if other is not None else "")
            return f"{one_line(os.fsdecode(where))}: {cause}"
        return exc.strerror
    if isinstance(exc, UnicodeDecodeError):
        return (f"not valid {exc.encoding}: byte 0x{exc.object[exc.start]:02x} at offset {exc.start}")
    if isinstance(exc, _out_of_memory_types()) and not str(exc):
        return "out of memory"
    return one_line(str(exc)) or type(exc).__name__


# ---- signals -----------------------------------------------------------------------------------


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is: every ``except KeyboardInterrupt`` / ``finally``
    cleanup runs as after Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_terminated(signum: int, frame: Any) -> None:
    signal.signal(signum, signal.SIG_IGN)  # one is enough: let the cleanup it starts finish
    raise Terminated(signum)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Terminated`` in the main thread (no-op in other threads,
    where Python cannot install handlers); the previous handler is restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---- the handler -------------------------------------------------------------------------------


def _close_progress_bars() -> None:
    """Finish live tqdm bars so the message starts on its own line."""
    tqdm_mod = sys.modules.get("tqdm")
    bars = getattr(getattr(tqdm_mod, "tqdm", None), "_instances", None)
    for bar in list(bars or ()):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a bar that cannot close must not hide the error
            pass


def _versions() -> str:
    from jam_metaseq import __version__

    parts = [f"jam_metaseq {__version__}"]
    torch = sys.modules.get("torch")
    if torch is not None:
        parts.append(f"torch {getattr(torch, '__version__', '?')}")
    parts.append(f"Python {platform.python_version()}, {platform.system()}-{platform.machine()}")
    return ", ".join(parts)


def bug_report_line(prog: str) -> str:
    """The one line printed after the traceback of an unexpected exception."""
    command = shlex.join([os.path.basename(sys.argv[0]) or prog.split()[0], *sys.argv[1:]])
    return (f"{prog}: internal error (a bug in jam_metaseq, not in your input): please report it on the "
            f"jam_metaseq issue tracker with this whole output, the traceback above included "
            f"[command: {command}; {_versions()}]")


def run_cli(prog: str, command: Callable[[], int | None], *,
            interrupted: str = "no output was left half-written (each is renamed into place only when "
                               "complete)") -> int:
    """Run ``command`` as a console script's body and return its exit status (module docstring).

    ``prog``: how messages start (``jam-ckpt merge``). ``interrupted``: what the interruption line
    says about the outputs (a resumable command says how to resume)."""
    try:
        with sigterm_as_interrupt():
            return int(command() or 0)
    except KeyboardInterrupt as e:
        _close_progress_bars()
        signum = e.signum if isinstance(e, Terminated) else signal.SIGINT
        print(f"{prog}: interrupted ({signal.Signals(signum).name}); {interrupted}", file=sys.stderr)
        return 128 + int(signum)
    except expected_errors() as e:
        _close_progress_bars()
        print(f"{prog}: error: {describe(e)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # noqa: BLE001 - the one place that turns a bug into a report
        _close_progress_bars()
        advice = missing_extra(e)
        if advice is not None:
            print(f"{prog}: error: {advice}", file=sys.stderr)
            return EXIT_ERROR
        traceback.print_exc()
        print(bug_report_line(prog), file=sys.stderr)
        return EXIT_BUG
