"""Zero-shot multiple-choice evaluation through lm-evaluation-harness (paper §3.2.1, Table 1).

``run_zeroshot`` writes the local task YAMLs (``tasks.py``) into a temporary folder, adds any
user ``include_path`` folders, and calls ``lm_eval.simple_evaluate`` with the ``jam`` model
(``lm_eval_adapter.JamLM``) at 0 shots. Hugging Face hub access is switched off
(``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE``) since the data come from local files.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_model_args(text: str) -> dict[str, str]:
    """``k=v,k2=v2`` -> dict (values stay strings; JamLM converts them)."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise ValueError(f"model args: expected key=value, got {part!r}")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def summarize(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from lm_eval's results (``acc,none`` -> ``acc``; stderr kept)."""
    table: dict[str, dict[str, float]] = {}
    for task, metrics in results.get("results", {}).items():
        row = {}
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                name = key.split(",")[0]
                row["n" if name == "sample_len" else name] = float(value)
        if any(k != "n" for k in row):  # groups without an aggregate have no metrics
            table[task] = row
    return table


def run_zeroshot(
    *,
    tasks: list[str],
    model_args: dict[str, Any] | None = None,
    model: Any = None,
    data_dir: str | os.PathLike | None = None,
    mc_tasks: dict[str, str | os.PathLike] | None = None,
    include_path: list[str | os.PathLike] | None = None,
    include_defaults: bool = False,
    batch_size: int = 8,
    limit: int | float | None = None,
    num_fewshot: int = 0,
    seed: int = 1234,
    cache_dir: str | os.PathLike | None = None,
    log_samples: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` (a ``JamLM``) or ``JamLM(**model_args)`` on lm_eval ``tasks``; return lm_eval's
    results dict (``["results"][task]["acc,none"]`` ...) with ``["jam_summary"]`` = ``summarize``.

    Local Table 1 tasks named in ``tasks`` (``piqa_local`` ..., or the group ``jam_table1``) are
    written from ``data_dir``; ``mc_tasks`` adds plain multiple-choice files.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    from jam_metaseq.eval import lm_eval_adapter
    from jam_metaseq.eval.tasks import GROUP, TASKS, write_task_configs

    if not tasks:
        raise ValueError("no tasks given")
    if model is None:
        model = lm_eval_adapter.JamLM(**{"batch_size": batch_size, **(model_args or {})})
    wanted_local = [t for t in tasks if t in TASKS]
    with tempfile.TemporaryDirectory(prefix="jam_eval_tasks_") as tmp:
        names = None if GROUP in tasks else wanted_local
        if data_dir is not None or wanted_local:
            written = write_task_configs(out_dir=tmp, data_dir=data_dir, names=names, mc_tasks=mc_tasks,
                                         cache_dir=cache_dir)
        else:
            written = write_task_configs(out_dir=tmp, mc_tasks=mc_tasks, cache_dir=cache_dir)
        if GROUP in tasks and not any(n in TASKS for n in written):
            raise FileNotFoundError(f"{GROUP}: none of the Table 1 task files are in {data_dir}")
        paths = [tmp, *(str(p) for p in (include_path or []))]
        manager = TaskManager(include_path=paths, include_defaults=include_defaults)
        results = lm_eval.simple_evaluate(
            model=model, tasks=list(tasks), num_fewshot=num_fewshot, batch_size=batch_size, limit=limit,
            task_manager=manager, log_samples=log_samples, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=0,
        )
    if results is None:
        raise RuntimeError("lm_eval returned no results")
    results["jam_summary"] = summarize(results)
    return results
