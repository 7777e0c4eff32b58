"""Local task definitions for lm-evaluation-harness: the six zero-shot tasks of Table 1 (paper
§3.2.1) and a plain multiple-choice format, read from JSONL files the user supplies (nothing can
be downloaded here).

``write_task_configs(data_dir=DIR, out_dir=OUT)`` writes one lm_eval YAML per task whose file is in
DIR; pass OUT as ``--include_path`` / ``TaskManager(include_path=OUT)``. The prompts, targets and
metrics are those of lm_eval's own tasks (``piqa``, ``arc_easy``, ``arc_challenge``,
``storycloze_2016``, ``wsc273``, ``winogrande``), so scores are comparable; only the data source
changes (``dataset_path: json`` with the local file). Expected files (one JSON object a line, the
fields of the Hugging Face data sets those tasks read):

    piqa.jsonl           {"goal", "sol1", "sol2", "label"}                      (validation split)
    arc_easy.jsonl       {"question", "choices": {"text": [...], "label": [...]}, "answerKey"}
    arc_challenge.jsonl  same as arc_easy                                       (test split)
    storycloze.jsonl     {"input_sentence_1".."input_sentence_4", "sentence_quiz1",
                          "sentence_quiz2", "answer_right_ending" (1 or 2)}     (2016 val/test)
    winograd.jsonl       {"text", "pronoun", "pronoun_loc", "options": [a, b], "label"}  (WSC273)
    winogrande.jsonl     {"sentence" (with one "_"), "option1", "option2", "answer" ("1"|"2")}

Plain multiple choice (tests, new tasks): ``{"context": str, "choices": [str, ...], "label": int}``;
score each choice as the continuation of the context (joined by one space); ``mc_tasks={name: path}``.
Every file is checked line by line first (``check_task_file``): a line that is not UTF-8 JSON or
lacks a field is named as ``file:line``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from jam_metaseq.inputs import safe_component

# task name -> (file in the data folder, lm_eval config fields besides the data source)
_ACC = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]
_ACC_NORM = _ACC + [{"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]
_ARC = {
    "doc_to_text": "Question: {{question}}\nAnswer:",
    "doc_to_target": "{{choices.label.index(answerKey)}}",
    "doc_to_choice": "{{choices.text}}",
    "metric_list": _ACC_NORM,
}
TASKS: dict[str, tuple[str, dict[str, Any]]] = {
    "piqa_local": ("piqa.jsonl", {
        "doc_to_text": "Question: {{goal}}\nAnswer:",
        "doc_to_target": "label",
        "doc_to_choice": "{{[sol1, sol2]}}",
        "metric_list": _ACC_NORM,
    }),
    "arc_easy_local": ("arc_easy.jsonl", _ARC),
    "arc_challenge_local": ("arc_challenge.jsonl", _ARC),
    "storycloze_local": ("storycloze.jsonl", {
        "doc_to_text": "{{[input_sentence_1, input_sentence_2, input_sentence_3, input_sentence_4]|join(' ')}}",
        "doc_to_target": "{{answer_right_ending-1}}",
        "doc_to_choice": "{{[sentence_quiz1, sentence_quiz2]}}",
        "metric_list": _ACC,
    }),
    # partial scoring: the choices are the contexts, the shared continuation is the target
    "winograd_local": ("winograd.jsonl", {
        "process_docs": "!function jam_task_utils.wsc273_process_docs",
        "doc_to_text": "label",
        "doc_to_target": "{% set index = pronoun_loc + pronoun | length %}{{text[index:]}}",
        "doc_to_choice": "{% set template = text[:pronoun_loc] %}{{[template+options[0], template+options[1]]}}",
        "metric_list": _ACC,
    }),
    "winogrande_local": ("winogrande.jsonl", {
        "doc_to_text": "!function jam_task_utils.winogrande_doc_to_text",
        "doc_to_target": "!function jam_task_utils.winogrande_doc_to_target",
        "doc_to_choice": "!function jam_task_utils.winogrande_doc_to_choice",
        "metric_list": _ACC,
    }),
}
MC_FIELDS = {
    "doc_to_text": "{{context}}",
    "doc_to_target": "{{label}}",
    "doc_to_choice": "{{choices}}",
    "metric_list": _ACC_NORM,
}
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "piqa_local": ("goal", "sol1", "sol2", "label"),
    "arc_easy_local": ("question", "choices", "answerKey"),
    "arc_challenge_local": ("question", "choices", "answerKey"),
    "storycloze_local": ("input_sentence_1", "input_sentence_2", "input_sentence_3", "input_sentence_4",
                         "sentence_quiz1", "sentence_quiz2", "answer_right_ending"),
    "winograd_local": ("text", "pronoun", "pronoun_loc", "options", "label"),
    "winogrande_local": ("sentence", "option1", "option2", "answer"),
}
"""The fields each task's lines must hold (module docstring), checked before lm_eval reads them."""
MC_REQUIRED = ("context", "choices", "label")


def _index_label(label: Any, *, field: str, n: int, base: int = 0) -> str | None:
    """Why ``label`` is not an answer index in ``[base, base + n)``, or None when it is one. -1 (or
    empty) is how unlabelled test splits (PIQA's, Winogrande's) mark rows without an answer."""
    if label in (-1, "", None) or (isinstance(label, str) and label.strip() == "-1"):
        return (f"'{field}' is {label!r}: an unlabelled row (a test split without answers?) cannot be scored; "
                "use the labelled validation split")
    if isinstance(label, bool) or not isinstance(label, int):
        return f"'{field}' must be an integer, got {label!r}"
    if not base <= label < base + n:
        return f"'{field}' is {label}, outside the {n} choices ({base}..{base + n - 1})"
    return None


def _choices(doc: dict, field: str, *, n: int | None = None) -> tuple[list | None, str | None]:
    v = doc[field]
    if not isinstance(v, list) or not v or (n is not None and len(v) != n):
        want = f"a list of {n}" if n is not None else "a non-empty list"
        return None, f"'{field}' must be {want}, got {v!r}"[:200]
    return v, None


def _arc_target(doc: dict) -> str | None:
    c = doc["choices"]
    if not isinstance(c, dict) or not isinstance(c.get("text"), list) or not isinstance(c.get("label"), list) \
            or len(c["text"]) != len(c["label"]) or not c["text"]:
        return "'choices' must be {\"text\": [...], \"label\": [...]} of equal, non-zero length"
    if doc["answerKey"] not in c["label"]:
        return (f"'answerKey' {doc['answerKey']!r} is none of the choice labels {c['label']}"
                + (": an unlabelled row cannot be scored" if doc["answerKey"] in ("", None) else ""))
    return None


def _mc_target(doc: dict) -> str | None:
    choices, problem = _choices(doc, "choices")
    return problem or _index_label(doc["label"], field="label", n=len(choices))


def _winograd_target(doc: dict) -> str | None:
    _, problem = _choices(doc, "options", n=2)
    return problem or _index_label(doc["label"], field="label", n=2)


def _winogrande_target(doc: dict) -> str | None:
    answer = doc["answer"]
    if str(answer) not in ("1", "2") or isinstance(answer, bool):
        return _index_label(answer, field="answer", n=2, base=1) or f"'answer' must be \"1\" or \"2\", got {answer!r}"
    return None


TARGET_CHECKS: dict[str, Any] = {
    "piqa_local": lambda d: _index_label(d["label"], field="label", n=2),
    "arc_easy_local": _arc_target,
    "arc_challenge_local": _arc_target,
    "storycloze_local": lambda d: _index_label(d["answer_right_ending"], field="answer_right_ending", n=2, base=1),
    "winograd_local": _winograd_target,
    "winogrande_local": _winogrande_target,
}
"""Per task: why a row's answer cannot be scored (None = it can). lm_eval would score an unlabelled
row (label -1) as wrong, and a label past the choices ends in an IndexError inside it."""
GROUP = "jam_table1"
"""Group name of the six Table 1 tasks (those whose files were found)."""
UTILS_SOURCE = Path(__file__).with_name("task_utils.py")


def _yaml_value(v: Any) -> str:
    if isinstance(v, str) and v.startswith("!function "):
        return v  # a YAML tag, not a string
    return json.dumps(v)  # JSON is YAML: quoting and escapes are exact


def task_yaml(name: str, *, data_file: str | os.PathLike, fields: dict[str, Any],
              cache_dir: str | os.PathLike | None = None) -> str:
    """The YAML text of one local task reading ``data_file`` as its test split."""
    kwargs: dict[str, Any] = {"data_files": {"test": str(Path(data_file).resolve())}}
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)
    conf: dict[str, Any] = {
        "task": name, "dataset_path": "json", "dataset_kwargs": kwargs, "output_type": "multiple_choice",
        "test_split": "test", **fields, "metadata": {"version": 1.0},
    }
    return "".join(f"{k}: {_yaml_value(v)}\n" for k, v in conf.items())


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def check_task_file(path: str | os.PathLike, *, task: str, fields: tuple[str, ...], target: Any = None) -> None:
    """Every line of a task file is UTF-8 JSON (``parse_jsonl_line``'s bounds), an object holding
    ``fields`` whose answer ``target(doc)`` accepts (``TARGET_CHECKS``; an unlabelled or out-of-range
    answer is refused); else a ``DocumentError`` naming ``file:line`` (lm_eval would score the row as
    wrong or fail later inside a template, naming nothing)."""
    from jam_metaseq.data.documents import DocumentError, parse_jsonl_line

    n = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                doc = parse_jsonl_line(line)
            except DocumentError as e:
                raise e.at(where) from None
            if not isinstance(doc, dict):
                raise DocumentError(f"task {task}: expected a JSON object, got {type(doc).__name__}",
                                    reason="bad_schema", where=where)
            missing = [k for k in fields if k not in doc]
            if missing:
                raise DocumentError(f"task {task}: missing field(s) {', '.join(missing)}", reason="bad_schema",
                                    where=where)
            problem = None if target is None else target(doc)
            if problem is not None:
                raise DocumentError(f"task {task}: {problem}", reason="bad_label", where=where)
            n += 1
    if not n:
        raise ValueError(f"{path}: task {task} has no documents")


def write_task_configs(
    *,
    out_dir: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    names: list[str] | None = None,
    mc_tasks: dict[str, str | os.PathLike] | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> list[str]:
    """Write lm_eval task YAMLs into ``out_dir``; return the task names written.

    ``names`` (default: every Table 1 task whose file is in ``data_dir``) must all have their file.
    ``mc_tasks`` adds plain multiple-choice tasks ``{name: jsonl path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    if names is not None:
        unknown = [n for n in names if n not in TASKS]
        if unknown:
            raise ValueError(f"unknown local task(s) {unknown}; known: {', '.join(TASKS)}")
    if names is not None and names and data_dir is None:
        raise ValueError(f"tasks {names} need a data folder (--data-dir)")
    if data_dir is not None:
        data = Path(data_dir)
        if not data.is_dir():
            raise FileNotFoundError(f"task data folder not found: {data}")
        for name in (names if names is not None else list(TASKS)):
            file, fields = TASKS[name]
            path = data / file
            if not path.is_file():
                if names is not None:
                    raise FileNotFoundError(f"task {name}: data file not found: {path}")
                continue
            check_task_file(path, task=name, fields=REQUIRED_FIELDS[name], target=TARGET_CHECKS[name])
            _atomic_write(out / f"{name}.yaml", task_yaml(name, data_file=path, fields=fields, cache_dir=cache_dir))
            written.append(name)
        if any(written):
            shutil.copyfile(UTILS_SOURCE, out / "jam_task_utils.py")
            table1 = [n for n in written if n in TASKS]
            _atomic_write(out / f"{GROUP}.yaml", f"group: {GROUP}\ntask: {json.dumps(table1)}\n"
                          "aggregate_metric_list: []\nmetadata: {\"version\": 1.0}\n")
    for name, path in (mc_tasks or {}).items():
        safe_component(name, what="--mc-task name")  # it names OUT/NAME.yaml
        if name in TASKS or name == GROUP:
            raise ValueError(f"multiple-choice task name {name!r} clashes with a built-in local task")
        if not Path(path).is_file():
            raise FileNotFoundError(f"task {name}: data file not found: {path}")
        check_task_file(path, task=name, fields=MC_REQUIRED, target=_mc_target)
        _atomic_write(out / f"{name}.yaml", task_yaml(name, data_file=path, fields=MC_FIELDS, cache_dir=cache_dir))
        written.append(name)
    return written
