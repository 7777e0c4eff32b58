"""The unit runner of ``jam run``: every piece of work is a *unit*, a folder under the output
directory built in a temporary folder and renamed into place with a ``DONE.json`` marker keyed by
its settings and its inputs' run ids. A re-run skips every unit whose marker matches, so a plan can
be resumed after any interruption, and changing one setting re-runs exactly what depends on it.

A unit marked ``resumable`` (training) keeps its temporary folder across interruptions when the
key is unchanged, so a killed training run continues from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from jam_metaseq.errors import JamError
from jam_metaseq.inputs import dumps_json

STAGES = ("data", "tokenizers", "binarize", "parents", "fuse", "pretrain", "instruct", "eval", "report",
          "generate")
"""The pipeline's stages in order (``--stages`` names)."""


class PipelineError(JamError, RuntimeError):
    """A failure with a one-line cause (the CLI prints it and exits non-zero)."""


@dataclass
class RunOptions:
    """How one invocation runs a plan (not part of the plan: it changes no result)."""

    out: Path
    """Output directory (created)."""
    stages: tuple[str, ...] = STAGES
    """Stages to run; the others' outputs must exist already."""
    force: bool = False
    """Re-run the selected stages even when finished."""
    progress: bool = True
    """Progress bars on stderr."""
    dry_run: bool = False
    """Print what would run (units and training commands), run nothing."""
    prog: str = "jam run"
    """Prefix of the log lines."""

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise ValueError(f"unknown stage(s) {bad}; stages are {', '.join(STAGES)}")
        if not self.stages:
            raise ValueError("at least one stage is needed")


_PREFIX = threading.local()
_SLOT = threading.local()
"""Which progress-bar line the current worker thread owns (parallel training runs)."""


def log(msg: str) -> None:
    print(f"[{getattr(_PREFIX, 'value', 'jam run')}] {msg}", file=sys.stderr, flush=True)


def set_log_prefix(prefix: str) -> None:
    _PREFIX.value = prefix


def bar(total: int | None, desc: str, *, enabled: bool, unit: str = "it"):
    from tqdm import tqdm

    slot = getattr(_SLOT, "value", 0)
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, disable=not enabled,
                leave=slot == 0, position=slot)


def json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: Path, obj: Any, *, nan_as_null: bool = False) -> None:
    """``obj`` as JSON at ``path`` (temp file + rename). ``nan_as_null``: strict JSON for readers
    outside the pipeline (``report/results.json``, issue 27): a metric that does not exist (NaN,
    e.g. ``image_ppl`` of a text-only set) is ``null``; the pipeline's own markers keep NaN."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    text = json.dumps(obj, indent=2, default=json_default, allow_nan=True)
    if nan_as_null:
        text = dumps_json(json.loads(text), nan_as_null=True, indent=2)
    tmp.write_text(text + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def unit_key(stage: str, rel: str, material: dict) -> str:
    return hashlib.sha256(json.dumps({"stage": stage, "rel": rel, **material}, sort_keys=True,
                                     default=json_default).encode()).hexdigest()[:16]


@dataclass
class Pipeline:
    """Runs units (a folder under ``out``) at most once per invocation, skipping finished ones."""

    options: RunOptions
    jobs: int = 1
    """Units of one ``units`` call run at once."""
    markers: dict[str, dict] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    planned: list[tuple[str, str]] = field(default_factory=list)
    """Dry run: (rel, status) of every unit met."""

    @property
    def out(self) -> Path:
        return self.options.out

    def path(self, rel: str) -> Path:
        return self.out / rel

    def unit(self, stage: str, rel: str, material: dict, build: Callable[[Path], dict | None], *,
             resumable: bool = False) -> dict:
        """Run ``build(tmp_dir)`` unless ``out/rel`` holds a marker with the same key; publish
        ``tmp_dir`` as ``out/rel`` (rename) with ``DONE.json``. Returns the marker."""
        if rel in self.markers:
            return self.markers[rel]
        final = self.path(rel)
        key = unit_key(stage, rel, material)
        done = final / "DONE.json"
        old = read_json(done) if done.is_file() else None
        selected = stage in self.options.stages
        if old is not None and old.get("key") == key and not (self.options.force and selected):
            if not self.options.dry_run:
                log(f"skip {rel} (done)")
            self.skipped.append(rel)
            self.markers[rel] = old
            self.planned.append((rel, "done"))
            return old
        if self.options.dry_run:
            status = "run" if selected else ("missing" if old is None else "out of date")
            self.planned.append((rel, status))
            marker = {"key": key, "run": f"dry-{key}", "stage": stage, "dry_run": True}
            self.markers[rel] = marker
            return marker
        if not selected:
            why = "not run yet" if old is None else "out of date (its settings or inputs changed)"
            raise PipelineError(f"{final}: stage '{stage}' output is {why}; add it to --stages")
        tmp = final.with_name(f".{final.name}.tmp")
        key_file = tmp / ".unit_key"
        if resumable and key_file.is_file() and key_file.read_text().strip() == key:
            log(f"resume {rel}")
        else:
            log(f"run  {rel}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            key_file.write_text(key + "\n")
        t0 = time.time()
        info = build(tmp) or {}
        key_file.unlink(missing_ok=True)
        marker = {"key": key, "run": uuid.uuid4().hex[:12], "stage": stage, "seconds": round(time.time() - t0, 2),
                  "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **info}
        write_json(tmp / "DONE.json", marker)
        if final.exists():
            trash = final.with_name(f".{final.name}.old")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        self.ran.append(rel)
        self.markers[rel] = marker
        return marker

    def units(self, stage: str, items: Sequence[tuple], *, resumable: bool = False) -> list[dict]:
        """``unit`` for each (rel, material, build), ``jobs`` at a time; markers in item order."""
        if self.jobs <= 1 or len(items) <= 1 or self.options.dry_run:
            return [self.unit(stage, *it, resumable=resumable) for it in items]
        from concurrent.futures import ThreadPoolExecutor
        from queue import Queue

        slots: Queue[int] = Queue()
        for i in range(self.jobs):
            slots.put(i)
        prefix = getattr(_PREFIX, "value", "jam run")

        def one(rel: str, material: dict, build: Callable[[Path], dict | None]) -> dict:
            slot = slots.get()
            _SLOT.value = slot
            _PREFIX.value = prefix
            try:
                return self.unit(stage, rel, material, build, resumable=resumable)
            finally:
                _SLOT.value = 0
                slots.put(slot)

        with ThreadPoolExecutor(self.jobs) as ex:
            futures = [ex.submit(one, *it) for it in items]
            return [f.result() for f in futures]


def repo_paths() -> tuple[Path, Path]:
    """(the jam_metaseq package folder = the hosts' ``--user-dir``, the folder above it)."""
    pkg = Path(__file__).resolve().parent.parent
    return pkg, pkg.parent


__all__ = ["Pipeline", "PipelineError", "RunOptions", "STAGES", "bar", "json_default", "log", "read_json",
           "repo_paths", "set_log_prefix", "unit_key", "write_json"]
