"""Class 2: containers that may disagree with themselves or explode (issue 27 §2): structured text.

Each reader here bounds what a small file can make the program do, and names the file (and line)
when it refuses, as an ``InputError`` (a ``JamError`` and ``ValueError``: one line, exit 2). The
same class's zip records, images and files changed while read have their rooms beside this one
(``archives.py``, ``images.py``, ``files.py``).

- ``loads_json`` / ``read_json``: UTF-8 JSON nested at most ``MAX_DEPTH`` deep (Python's own parser
  ends in ``RecursionError`` near 1000), no ``NaN`` / ``Infinity`` / ``1e999`` (not JSON; strict
  readers refuse them), no lone surrogate (``"\\ud800"`` decodes but can never be written as UTF-8),
  no integer of more digits than Python converts (``ValueError`` without a position).
- ``loads_yaml`` / ``compose_yaml``: YAML (safe tags only) nested at most ``MAX_DEPTH`` deep whose
  aliases expand to at most ``MAX_YAML_NODES`` nodes (ten lines of nested aliases expand to 10^9),
  never recursive.
- ``check_int_list``: integers checked as Python ints (type and range) before numpy sees them
  (``np.asarray([2**63])`` raises ``OverflowError``).
- ``dumps_json``: the JSON we write is JSON these readers read back (non-finite floats refused, or
  written as ``null`` where the caller says a missing value is meant).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from jam_metaseq.errors import JamError

from .refusal import InputError, at_line

MAX_DEPTH = 100
"""Nesting bound of JSON and YAML inputs. Our formats nest at most ~6 deep (plans, manifests,
documents, HF configs); Python's parsers and every recursive walk over the result stay far from the
interpreter's recursion limit below 100."""
MAX_YAML_NODES = 1_000_000
"""Bound on the nodes a YAML document expands to, aliases followed (a plan has a few hundred)."""


# ---- JSON ----------------------------------------------------------------------------------------

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_CONSTANT = re.compile(rb"NaN|-?Infinity|[0-9.][eE]\+?[0-9]{3,}")
_LONE_SURROGATE = re.compile(
    rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}")
_LONG_DIGITS = re.compile(rb"[0-9]{4000,}")
_OPEN, _CLOSE = (ord("["), ord("{")), (ord("]"), ord("}"))


def _blank_strings(raw: bytes) -> bytes:
    """``raw`` with every JSON string replaced by ``""``: brackets, constants and digits inside
    strings no longer count. Strings hold no raw newline, so line numbers stay those of ``raw``."""
    return _STRING.sub(b'""', raw)


def _line_of(raw: bytes, pos: int) -> int:
    return raw.count(b"\n", 0, pos) + 1


def _too_deep_line(raw: bytes, max_depth: int) -> int | None:
    """Line of the first bracket opened deeper than ``max_depth`` (strings ignored), else None."""
    blank = _blank_strings(raw)
    code = np.frombuffer(blank, dtype=np.uint8)
    step = np.isin(code, _OPEN).astype(np.int32) - np.isin(code, _CLOSE).astype(np.int32)
    over = np.flatnonzero(np.cumsum(step) > max_depth)
    return _line_of(blank, int(over[0])) if over.size else None


def _search_line(pattern: re.Pattern, raw: bytes) -> int | None:
    blank = _blank_strings(raw)
    m = pattern.search(blank)
    return None if m is None else _line_of(blank, m.start())


class _NonFinite(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _NonFinite(name)


def _finite_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v):
        raise _NonFinite(s)
    return v


def _has_lone_surrogate(obj: Any) -> bool:
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return False


def loads_json(data: str | bytes, *, where: str | None = None, what: str | None = None,
               max_depth: int = MAX_DEPTH, allow_nan: bool = False) -> Any:
    """Parse JSON text under this module's bounds; ``InputError`` (``where:line: what: problem``) else.

    ``where``: the file (or ``file:line`` of a JSONL line) for messages; the line inside the text is
    appended when the text has several lines. ``allow_nan``: accept ``NaN`` / ``Infinity`` (files
    written by older versions)."""
    if isinstance(data, str):
        try:
            raw = data.encode("utf-8")
        except UnicodeEncodeError:  # a str with lone surrogates already (decoded with surrogateescape)
            raise InputError(f"{what + ': ' if what else ''}not UTF-8 text", reason="bad_encoding",
                             where=where) from None
    else:
        raw = bytes(data)
    several = b"\n" in raw.strip()

    def fail(msg: str, reason: str, line: int | None) -> InputError:
        return InputError(f"{what + ': ' if what else ''}{msg}", reason=reason,
                          where=at_line(where, line if several else None), line=line)

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise fail(f"not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})", "bad_encoding",
                   _line_of(raw, e.start)) from None
    # Cheap bound first: fewer opening brackets than the limit cannot nest deeper than it.
    if raw.count(b"[") + raw.count(b"{") > max_depth:
        line = _too_deep_line(raw, max_depth)
        if line is not None:
            raise fail(f"nested more than {max_depth} deep", "too_deep", line)
    try:
        obj = json.loads(text, parse_constant=None if allow_nan else _refuse_constant,
                         parse_float=float if allow_nan else _finite_float)
    except json.JSONDecodeError as e:
        raise fail(f"bad JSON ({e.msg} at column {e.colno})", "bad_json", e.lineno) from None
    except _NonFinite as e:
        raise fail(f"the number {e} is not finite (not JSON)", "not_finite",
                   _search_line(_CONSTANT, raw)) from None
    except RecursionError:  # unreachable below the depth bound; the last line of defence
        raise fail("nested too deep for Python's parser", "too_deep", None) from None
    except ValueError as e:  # "Exceeds the limit (4300 digits) for integer string conversion ..."
        raise fail(f"an integer too long to convert ({str(e).split(':')[0]})", "huge_int",
                   _search_line(_LONG_DIGITS, raw)) from None
    if b"\\u" in raw and (m := _LONE_SURROGATE.search(raw)) is not None and _has_lone_surrogate(obj):
        raise fail(f"a lone surrogate {m.group().decode()} in a string (not encodable as UTF-8)",
                   "lone_surrogate", _line_of(raw, m.start()))
    return obj


def read_json(path: str | os.PathLike, *, what: str, expect: type | None = dict,
              max_depth: int = MAX_DEPTH, allow_nan: bool = False) -> Any:
    """A JSON file whose top level must be an ``expect`` (an object by default; None = anything):
    every way it can fail is a ``JamError`` naming the file (missing, a directory, unreadable, not
    UTF-8, not JSON, over a bound of ``loads_json``, another type)."""
    path = Path(path)
    if path.is_dir():
        raise JamError(f"{path}: is a directory, expected a {what} JSON file")
    if not path.exists():
        raise JamError(f"{path}: no such file ({what})")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise JamError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    obj = loads_json(raw, where=str(path), what=what, max_depth=max_depth, allow_nan=allow_nan)
    if expect is not None and not isinstance(obj, expect):
        want = {dict: "an object", list: "a list"}.get(expect, expect.__name__)
        raise JamError(f"{path}: {what} must be {want} in JSON, got {type(obj).__name__}")
    return obj


def _strict(obj: Any, *, nan_as_null: bool, path: str) -> Any:
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        if nan_as_null:
            return None
        raise ValueError(f"{path or 'value'} is {obj}, which JSON cannot hold")
    if isinstance(obj, dict):
        return {k: _strict(v, nan_as_null=nan_as_null, path=f"{path}.{k}" if path else str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v, nan_as_null=nan_as_null, path=f"{path}[{i}]") for i, v in enumerate(obj)]
    return obj


def dumps_json(obj: Any, *, nan_as_null: bool = False, **kwargs: Any) -> str:
    """``json.dumps`` that writes only strict JSON: a non-finite float is a ``ValueError`` naming its
    key path, or ``null`` with ``nan_as_null`` (a metric that does not exist, e.g. ``image_ppl`` of a
    text-only set)."""
    return json.dumps(_strict(obj, nan_as_null=nan_as_null, path=""), allow_nan=False, **kwargs)


# ---- YAML ----------------------------------------------------------------------------------------


def _yaml():
    import yaml

    return yaml


def _bounded_loader(text: str, *, where: str | None, max_depth: int):
    yaml = _yaml()

    class BoundedLoader(yaml.SafeLoader):
        """SafeLoader whose composer stops at ``max_depth`` (it recurses once per level)."""

        depth = 0

        def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
            if self.check_event(yaml.MappingStartEvent, yaml.SequenceStartEvent):
                self.depth += 1
                if self.depth > max_depth:
                    mark = self.peek_event().start_mark
                    raise InputError(f"YAML is nested more than {max_depth} deep", reason="too_deep",
                                     where=at_line(where, mark.line + 1), line=mark.line + 1)
                try:
                    return super().compose_node(parent, index)
                finally:
                    self.depth -= 1
            return super().compose_node(parent, index)

    return BoundedLoader(text)


def _check_expansion(root: Any, *, where: str | None, max_nodes: int, max_depth: int) -> None:
    """What the node graph expands to, aliases followed: at most ``max_nodes`` nodes, ``max_depth``
    levels, no cycle. Memoised per node, so a bomb is measured without being expanded."""
    yaml = _yaml()
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_path: set[int] = set()

    def fail(msg: str, node: Any, reason: str) -> InputError:
        line = node.start_mark.line + 1
        return InputError(msg, reason=reason, where=at_line(where, line), line=line)

    # iterative post-order walk: (node, children visited?)
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if isinstance(node, yaml.ScalarNode):
            size[key], depth[key] = 1, 0
            continue
        children = ([c for kv in node.value for c in kv] if isinstance(node, yaml.MappingNode)
                    else list(node.value))
        if done:
            on_path.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in children)
            depth[key] = 1 + max((depth[id(c)] for c in children), default=0)
            if size[key] > max_nodes:
                raise fail(f"YAML expands to more than {max_nodes} nodes (aliases of aliases?)", node,
                           "too_many_nodes")
            if depth[key] > max_depth:
                raise fail(f"YAML expands to more than {max_depth} levels of nesting", node, "too_deep")
            continue
        if key in size:
            continue
        if key in on_path:
            raise fail("YAML alias refers to a node that contains it (a recursive structure)", node, "recursive")
        on_path.add(key)
        stack.append((node, True))
        for c in children:
            if id(c) in on_path:
                raise fail("YAML alias refers to a node that contains it (a recursive structure)", c, "recursive")
            if id(c) not in size:
                stack.append((c, False))


def compose_yaml(text: str, *, where: str | None = None, max_depth: int = MAX_DEPTH,
                 max_nodes: int = MAX_YAML_NODES) -> Any:
    """The checked node graph of a YAML document (``yaml.Node``, with line marks; None when empty):
    for readers that report positions."""
    yaml = _yaml()
    loader = _bounded_loader(text, where=where, max_depth=max_depth)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark is not None else None
        raise InputError(f"not valid YAML ({e.problem or e})", reason="bad_yaml", where=at_line(where, line),
                         line=line) from None
    except yaml.YAMLError as e:
        raise InputError(f"not valid YAML ({e})", reason="bad_yaml", where=where) from None
    finally:
        loader.dispose()
    if node is not None:
        _check_expansion(node, where=where, max_nodes=max_nodes, max_depth=max_depth)
    return node


def loads_yaml(text: str, *, where: str | None = None, max_depth: int = MAX_DEPTH,
               max_nodes: int = MAX_YAML_NODES) -> Any:
    """``yaml.safe_load`` under this module's bounds (``compose_yaml``), then constructed."""
    yaml = _yaml()
    node = compose_yaml(text, where=where, max_depth=max_depth, max_nodes=max_nodes)
    if node is None:
        return None
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark is not None else None
        raise InputError(f"not valid YAML ({e.problem or e})", reason="bad_yaml", where=at_line(where, line),
                         line=line) from None
    except (yaml.YAMLError, ValueError) as e:  # e.g. a timestamp out of range
        raise InputError(f"not valid YAML ({e})", reason="bad_yaml", where=where) from None
    finally:
        loader.dispose()


# ---- integers ------------------------------------------------------------------------------------


def check_int_list(values: Any, *, lo: int, hi: int, what: str) -> np.ndarray:
    """A JSON list of integers in ``[lo, hi)`` as int64; ``InputError`` naming ``what``, the first bad
    value and its index. Types and range are checked on the Python ints, before numpy (a value above
    2**63 would raise ``OverflowError`` there; ``True`` is not an integer here)."""
    if not isinstance(values, list):
        raise InputError(f"{what} must be a list of integers, got {type(values).__name__}", reason="bad_type")
    for i, v in enumerate(values):
        if type(v) is not int:
            raise InputError(f"{what}[{i}] must be an integer, got {type(v).__name__}", reason="bad_type")
    try:
        arr = np.asarray(values, dtype=np.int64)
        bad = np.flatnonzero((arr < lo) | (arr >= hi))
        first = int(bad[0]) if bad.size else None
    except OverflowError:
        first = next(i for i, v in enumerate(values) if not lo <= v < hi)
    if first is not None:
        v = values[first]
        shown = str(v) if abs(v) < 10**30 else f"{str(v)[:12]}... ({len(str(abs(v)))} digits)"
        raise InputError(f"{what}[{first}] = {shown} is out of range [{lo}, {hi})", reason="int_range")
    return arr
