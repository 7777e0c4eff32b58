"""A ``jam run`` plan in and out of YAML: ``read_plan_file`` (the one place a plan file is read and
parsed), ``parse_yaml`` (the one YAML parser, also of ``--set`` values), ``load_plan`` (read, apply
``--set`` overrides, validate with ``spec.schema.parse_plan``), and ``plan_yaml`` (commented YAML
built from the field docstrings, which ``load_plan`` reads back to the same plan).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import yaml

from jam_metaseq.inputs import InputError, compose_yaml, loads_yaml
from jam_metaseq.pipeline.spec.schema import PlanError, PlanSpec, parse_plan


def parse_yaml(text: str, *, source: str) -> Any:
    """``text`` parsed as YAML (safe types only); ``PlanError`` naming ``source`` and the line."""
    try:  # bounded (issue 27 §2): nesting depth, alias expansion, no recursive alias
        return loads_yaml(text)
    except InputError as e:
        where = f"line {e.line}: " if e.line is not None else ""
        raise PlanError([f"{where}{e.detail}"], source=source) from None


def _yaml_lines(text: str) -> dict[tuple, int]:
    """Field path (keys and list indices) -> 1-based line of its value in the YAML text."""
    out: dict[tuple, int] = {}

    def walk(node: Any, path: tuple) -> None:
        out[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = k.value
                out[path + (key,)] = k.start_mark.line + 1
                walk(v, path + (key,))
                out[path + (key,)] = k.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, path + (i,))

    try:
        root = compose_yaml(text)  # bounded: walking an unchecked alias bomb would never end
    except InputError:
        return out
    if root is not None:
        walk(root, ())
    return out


def apply_override(data: dict, assignment: str) -> None:
    """``a.b.c=VALUE`` (VALUE read as YAML) into the nested mapping ``data`` (in place)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise PlanError([f"--set {assignment!r}: expected FIELD=VALUE (e.g. pretrain.lr=3e-3)"], source="--set")
    value = parse_yaml(raw, source=f"--set {key.strip()}") if raw.strip() else None
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def read_plan_file(path: str | Path) -> tuple[Any, dict[tuple, int]]:
    """A plan file's parsed YAML (``{}`` when empty) and the line of every field."""
    path = Path(path)
    if path.is_dir():
        raise PlanError(["is a directory, expected a plan YAML file"], source=str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlanError(["no such file"], source=str(path)) from None
    except UnicodeDecodeError as e:
        raise PlanError([f"not UTF-8 text (byte offset {e.start})"], source=str(path)) from None
    data = parse_yaml(text, source=str(path))
    return ({} if data is None else data), _yaml_lines(text)


def load_plan(path: str | Path, *, overrides: Sequence[str] = ()) -> PlanSpec:
    """Read, validate and resolve a plan file (YAML); ``overrides``: ``FIELD=VALUE`` assignments."""
    data, lines = read_plan_file(path)
    if isinstance(data, dict):
        for o in overrides:
            apply_override(data, o)
    return parse_plan(data, source=str(path), base_dir=Path(path).resolve().parent, lines=lines)


# ---- writing ---------------------------------------------------------------------------------
def plan_dict(plan: Any) -> Any:
    """The plan as plain YAML/JSON values (paths as strings, tuples as lists)."""
    if dataclasses.is_dataclass(plan):
        return {f.name: plan_dict(getattr(plan, f.name)) for f in dataclasses.fields(plan)}
    if isinstance(plan, Path):
        return str(plan)
    if isinstance(plan, (list, tuple)):
        return [plan_dict(x) for x in plan]
    if isinstance(plan, dict):
        return {k: plan_dict(v) for k, v in plan.items()}
    return plan


def _doc(cls: type, name: str) -> str:
    """A field's docstring (inherited fields: from the class that declares it)."""
    for klass in cls.__mro__:
        info = getattr(klass, "__pydantic_fields__", {}).get(name)
        text = (getattr(info, "description", None) or "").strip()
        if text and name in getattr(klass, "__annotations__", {}):
            return " ".join(text.split())
    return ""


def _scalar(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True, width=10_000, sort_keys=False).strip() \
        .removesuffix("...").strip()


def plan_yaml(plan: PlanSpec, *, header: str = "") -> str:
    """The plan as YAML, each field under its docstring as a comment (``load_plan`` reads it back)."""
    import textwrap

    out = [f"# {line}".rstrip() for line in header.splitlines()] if header else []

    def emit(obj: Any, indent: int) -> None:
        pad = "  " * indent
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            doc = _doc(type(obj), f.name)
            if doc:
                out.extend(textwrap.wrap(doc, width=max(40, 100 - len(pad)), initial_indent=pad + "# ",
                                         subsequent_indent=pad + "# "))
            if dataclasses.is_dataclass(v):
                out.append(f"{pad}{f.name}:")
                emit(v, indent + 1)
            else:
                out.append(f"{pad}{f.name}: {_scalar(plan_dict(v))}")

    emit(plan, 0)
    return "\n".join(out) + "\n"


__all__ = ["apply_override", "load_plan", "parse_yaml", "plan_dict", "plan_yaml", "read_plan_file"]
