"""The five classes of untrusted input (issue 27; threat model in docs/TESTING.md), one home each in
``jam_metaseq.inputs``: a generator-based test per class (hypothesis) plus the issue's instances
that the homes fix outside ``checkpoints_tools/`` and ``pipeline/`` as regression tests.

1. names that escape        -> ``safe_component``, ``resolve_output_dir``
2. containers that lie      -> bounded JSON / YAML / zip / images / ints, ``FileSnapshot``
3. settings vs the weights  -> manifest fields checked where read, ``agree``
4. numbers that are not     -> ``finite_float`` / ``bounded_int`` on every CLI option
5. data that becomes script -> ``script_value`` in the sbatch writer (checked with ``bash -n``)

Everything runs in process or in one short child; no sleeps, no timing.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import shlex
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from jam_metaseq.data.documents import DataReport, DocumentError, iter_jsonl, parse_jsonl_line
from jam_metaseq.errors import JamError, describe, run_cli
from jam_metaseq.inputs import (MAX_DEPTH, FieldError, FileSnapshot, InputError, ScriptValueError, agree,
                                check_float, check_int_list, finite_float, load_rgb_image, loads_json, loads_yaml,
                                open_zip_member, read_json, read_zip_member, resolve_output_dir, safe_component,
                                unique_zip_names)
from jam_metaseq.vocab import VocabManifest, tiny_manifest

ROOT = Path(__file__).resolve().parents[1]
HANG_GUARD_S = 1800  # child timeouts guard against a hang only (a loaded machine is slow, not hung)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
VOCAB = tiny_manifest(text_size=256)

# text a hostile or unlucky user can type: separators, quotes, shell syntax, control characters
HOSTILE_CHARS = list("ab9_-./\\'\"$()`;&|<>*?~#%!{}[]=,:@+ \t\n\r\x00\x1b") + ["é", "\u2028", "\ud800"]
hostile_text = st.one_of(st.text(alphabet=st.sampled_from(HOSTILE_CHARS), max_size=24), st.text(max_size=24))


# ==== 1. names ===================================================================================


@FAST
@given(name=hostile_text)
@example("../victim/in")
@example("..")
@example("a\nb")
@example("x" * 256)
def test_a_safe_component_is_exactly_one_entry_of_its_directory(tmp_path_factory, name):
    d = tmp_path_factory.mktemp("names")
    try:
        safe_component(name, what="--name")
    except JamError as e:
        assert str(e).startswith("--name ") and "\n" not in describe(e)
        return
    # accepted: writing d/name creates exactly one new entry of d, named name
    (d / name).write_bytes(b"x")
    assert os.listdir(d) == [name]


def test_an_output_directory_in_a_symlink_loop_is_one_line(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(JamError, match="symlink loop"):
        resolve_output_dir(tmp_path / "a")
    with pytest.raises(JamError, match="symlink loop"):
        resolve_output_dir(tmp_path / "a" / "out")
    assert resolve_output_dir(tmp_path / "new" / "out") == tmp_path.resolve() / "new" / "out"


def test_a_multiple_choice_task_name_cannot_leave_the_task_folder(tmp_path):
    from jam_metaseq.eval.tasks import write_task_configs

    data = tmp_path / "mc.jsonl"
    data.write_text(json.dumps({"context": "a", "choices": ["b", "c"], "label": 0}) + "\n")
    with pytest.raises(JamError, match="--mc-task name '../escaped'"):
        write_task_configs(out_dir=tmp_path / "out", mc_tasks={"../escaped": data})
    assert not (tmp_path / "escaped.yaml").exists()


# ==== 2. containers that lie =====================================================================

json_leaves = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
json_values = st.recursive(json_leaves, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                               st.dictionaries(st.text(max_size=4), kids, max_size=4)),
                           max_leaves=20)


def _nest(depth: int) -> str:
    return "[" * depth + "]" * depth


@FAST
@given(value=json_values, extra=st.integers(0, 3))
def test_json_within_the_bounds_round_trips_and_deeper_is_refused(value, extra):
    assert loads_json(json.dumps(value)) == value
    assert loads_json(json.dumps(value).encode()) == value
    wrapped = "[" * (MAX_DEPTH - 1 + extra) + json.dumps(value) + "]" * (MAX_DEPTH - 1 + extra)
    depth = MAX_DEPTH - 1 + extra + _depth(value)
    if depth <= MAX_DEPTH:
        assert loads_json(wrapped) is not None
    else:
        with pytest.raises(InputError, match=f"nested more than {MAX_DEPTH} deep"):
            loads_json(wrapped)


def _depth(v) -> int:
    if isinstance(v, list):
        return 1 + max(map(_depth, v), default=0)
    if isinstance(v, dict):
        return 1 + max(map(_depth, v.values()), default=0)
    return 0


@FAST
@given(data=st.binary(max_size=64) | st.text(alphabet=st.sampled_from(list('[]{}",:0123456789.eE-+ \\nu\nNaIfty')),
                                             max_size=64))
def test_any_bytes_parse_or_are_one_input_error(data):
    try:
        loads_json(data, where="f.json")
    except InputError as e:
        assert str(e).startswith("f.json") and e.reason
    # nothing else: no RecursionError, ValueError from int conversion, UnicodeError


@FAST
@given(s=st.text(max_size=12), f=st.floats())
def test_strings_and_floats_either_survive_utf8_and_json_or_are_refused(s, f):
    encodable = True
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        encodable = False
    text = json.dumps({"s": s, "f": f})  # ensure_ascii: a lone surrogate becomes \\udxxx, nan NaN
    if encodable and math.isfinite(f):
        assert loads_json(text) == {"s": s, "f": f}
    else:
        with pytest.raises(InputError) as e:
            loads_json(text)
        assert e.value.reason in ("lone_surrogate", "not_finite")


def test_json_regressions_name_the_line():
    cases = {
        "too_deep": "[1,\n" + _nest(100_000) + "]",
        "not_finite": '{"a": 1,\n "w": NaN}',
        "huge_int": '[1,\n' + "7" * 5000 + "]",
        "lone_surrogate": '["ok",\n "\\ud800"]',
    }
    for reason, text in cases.items():
        with pytest.raises(InputError) as e:
            loads_json(text, where="m.json", what="manifest")
        assert e.value.reason == reason and str(e.value).startswith("m.json:2: manifest: "), str(e.value)
    assert loads_json('"\\ud83d\\ude00"') == "\U0001F600"  # a surrogate pair is a character
    assert loads_json('"\\\\ud800"') == "\\ud800"  # an escaped backslash, not a surrogate
    assert loads_json("[NaN]", allow_nan=True)[0] != 0


@pytest.mark.parametrize("line, reason", [
    (_nest(100_000), "too_deep"),
    ('[{"text": "a"}, {"text": "\\udc80"}]', "lone_surrogate"),
    ('{"segments": [{"text": "a"}], "n": ' + "9" * 5000 + "}", "huge_int"),
    ('{"segments": [{"text": "a"}], "score": NaN}', "not_finite"),
    ('[{"image_tokens": [' + "9223372036854775808, 0, 0, 0" + "]}]", "image_code_range"),
])
def test_a_hostile_jsonl_line_is_skipped_with_its_file_and_line(tmp_path, line, reason):
    """Each of these ended in a traceback, also with --on-error skip (issue 27 §2)."""
    from jam_metaseq.data.tokenizers import load_text_tokenizer

    vocab = tiny_manifest(text_size=256, image_codes=32, image_grid=(2, 2))
    p = tmp_path / "docs.jsonl"
    good = json.dumps([{"text": "fine"}])
    p.write_text("\n".join([good, line, good]) + "\n")
    report = DataReport()
    docs = list(iter_jsonl(p, on_error="skip", vocab=vocab, text_tokenizer=load_text_tokenizer("bytes"),
                           report=report))
    assert [d.line for d in docs] == [1, 3]
    assert dict(report.skipped) == {reason: 1} and report.first_errors[0].startswith(f"{p}:2: ")
    with pytest.raises(DocumentError, match=f"^{p}:2: "):
        list(iter_jsonl(p, on_error="fail", vocab=vocab))


def test_a_hostile_prompt_line_names_its_file_and_line(tmp_path):
    from jam_metaseq.generation.run import read_prompts_jsonl

    p = tmp_path / "prompts.jsonl"
    for bad in ('{"prompt_ids": [5, 18446744073709551616]}', '{"prompt": "a", "seed": -1}',
                '{"prompt": "\\ud800"}', '{"prompt": "a", "seed": ' + "1" * 5000 + "}"):
        p.write_text('{"prompt": "ok"}\n' + bad + "\n")
        with pytest.raises(ValueError, match=f"^{p}:2: "):
            read_prompts_jsonl(p)


BOMB = textwrap.dedent("""\
    a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
    b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
    c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
    d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
    e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
    f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
    g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
    h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
    i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
    j: &j [*i, *i, *i, *i, *i, *i, *i, *i, *i]
""")


def test_yaml_bombs_deep_nesting_and_recursion_are_refused_by_line():
    with pytest.raises(InputError, match=r"^plan.yaml:\d+: YAML expands to more than") as e:
        loads_yaml(BOMB, where="plan.yaml")
    assert e.value.reason == "too_many_nodes"
    with pytest.raises(InputError, match="nested more than") as e:
        loads_yaml("x: " + "[" * 100_000, where="plan.yaml")
    with pytest.raises(InputError, match="recursive"):
        loads_yaml("a: &a [1, *a]\n", where="plan.yaml")
    with pytest.raises(InputError, match=r"^plan.yaml:3: not valid YAML"):
        loads_yaml("a: 1\nb: [\n", where="plan.yaml")
    # aliases that expand to little are fine (anchors are a normal way to share settings)
    assert loads_yaml("base: &b {lr: 1.0e-3}\nrun: *b\n") == {"base": {"lr": 1e-3}, "run": {"lr": 1e-3}}


@FAST
@given(value=json_values)
def test_yaml_within_the_bounds_round_trips(value):
    assert loads_yaml(yaml.safe_dump(value)) == value


def _zip(records: list[tuple[str, bytes]], method=zipfile.ZIP_DEFLATED) -> zipfile.ZipFile:
    buf = io.BytesIO()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name"
        with zipfile.ZipFile(buf, "w", compression=method) as zf:
            for name, data in records:
                zf.writestr(name, data)
    return zipfile.ZipFile(io.BytesIO(buf.getvalue()))


@FAST
@given(sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=4), bound=st.integers(0, 6000),
       stored=st.booleans())
def test_zip_records_inflate_within_their_bound_or_are_refused(sizes, bound, stored):
    records = [(f"r{i}", bytes([i]) * n) for i, n in enumerate(sizes)]
    zf = _zip(records, zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED)
    for name, data in records:
        if len(data) <= bound:
            assert b"".join(read_zip_member(zf, name, max_bytes=bound, where="x.pt", chunk=1000)) == data
        else:
            with pytest.raises(InputError, match=f"^x.pt: record '{name}' inflates to"):
                b"".join(read_zip_member(zf, name, max_bytes=bound, where="x.pt"))


def test_a_deflate_bomb_is_refused_in_chunks_and_duplicate_records_are_refused():
    bomb = _zip([("archive/data.pkl", bytes(64 << 20))])  # 64 MiB of zeros in ~64 KiB
    assert bomb.infolist()[0].compress_size < 1 << 20
    with pytest.raises(InputError, match="over the bound"):
        open_zip_member(bomb, "archive/data.pkl", max_bytes=1 << 20, where="bomb.pt")
    with open_zip_member(bomb, "archive/data.pkl", max_bytes=64 << 20, where="bomb.pt") as f:
        assert f.read(10) == bytes(10)  # a file object: pickle.Unpickler reads it piece by piece
    dup = _zip([("archive/data/0", b"\0" * 4), ("archive/data/0", b"\x7f" * 64)])
    with pytest.raises(InputError, match="two records named 'archive/data/0'"):
        unique_zip_names(dup, where="dup.pt")
    with pytest.raises(InputError, match="two records"):
        open_zip_member(dup, "archive/data/0", max_bytes=1 << 20, where="dup.pt")


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height RGB pixels, with a one-row IDAT (never decodable)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 7))
                     + chunk(b"IEND", b""))


def test_an_image_is_bounded_from_its_header_before_decoding(tmp_path):
    from PIL import Image

    _png_header_only(tmp_path / "huge.png", 20000, 20000)
    # above twice PIL's own bound PIL refuses it while reading the header; below, our bound does
    with pytest.raises(InputError, match=r"huge.png: image too large \(Image size \(400000000 pixels\)") as e:
        load_rgb_image(tmp_path / "huge.png")
    assert e.value.reason == "image_too_large"
    _png_header_only(tmp_path / "big.png", 9000, 9000)  # 81 Mpx: over our 64 Mpx, under PIL's error bound
    with pytest.raises(InputError, match=r"big.png: image of 9000x9000 pixels, more than the 67108864 accepted"):
        load_rgb_image(tmp_path / "big.png")
    Image.new("RGB", (4, 3), (200, 10, 10)).save(tmp_path / "ok.png")
    assert load_rgb_image(tmp_path / "ok.png").size == (4, 3)
    with pytest.raises(InputError, match="image_too_large|more than the 11 accepted"):
        load_rgb_image(tmp_path / "ok.png", max_pixels=11)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(InputError) as e:
        load_rgb_image(tmp_path / "bad.png")
    assert e.value.reason == "image_unreadable"
    # through a JSONL document and an image tokenizer: a skippable bad line, file:line
    (tmp_path / "docs.jsonl").write_text('[{"image": "huge.png"}]\n[{"text": "ok"}]\n')
    from jam_metaseq.data.tokenizers import load_text_tokenizer

    report = DataReport()
    docs = list(iter_jsonl(tmp_path / "docs.jsonl", on_error="skip", vocab=VOCAB, report=report,
                           text_tokenizer=load_text_tokenizer("bytes"), image_tokenizer=_NeverCalled()))
    assert len(docs) == 1 and dict(report.skipped) == {"image_too_large": 1}
    assert report.first_errors[0].startswith(f"{tmp_path / 'docs.jsonl'}:1: image too large")


class _NeverCalled:
    def encode_images(self, images):
        raise AssertionError("a refused image reached the tokenizer")


@FAST
@given(values=st.lists(st.one_of(st.integers(-2**70, 2**70), st.booleans(), st.floats(), st.text(max_size=2)),
                       max_size=6), hi=st.integers(1, 2**63 - 1))
def test_int_lists_are_checked_as_python_ints(values, hi):
    ok = all(type(v) is int and 0 <= v < hi for v in values)
    if ok:
        assert check_int_list(values, lo=0, hi=hi, what="ids").tolist() == values
    else:
        with pytest.raises(InputError, match=r"^ids\[\d+\]"):
            check_int_list(values, lo=0, hi=hi, what="ids")


def test_a_file_rewritten_while_read_is_refused(tmp_path):
    p = tmp_path / "in.pt"
    p.write_bytes(b"a" * 100)
    snap = FileSnapshot.of(p)
    snap.check_unchanged()
    with open(p, "ab") as f:  # appended in place: same inode, another size
        f.write(b"b")
    with pytest.raises(InputError, match="changed while it was read"):
        snap.check_unchanged()
    snap = FileSnapshot.of(p)
    (tmp_path / "new").write_bytes(b"c" * 101)
    os.replace(tmp_path / "new", p)  # replaced by a file of the same size: another inode
    with pytest.raises(InputError, match=r"changed while it was read \(.*ino"):
        snap.check_unchanged()


def test_read_json_keeps_its_messages_and_adds_the_bounds(tmp_path):
    p = tmp_path / "v.json"
    p.write_text('{"a":\n NaN}')
    with pytest.raises(JamError, match=r"v.json:2: vocab manifest: the number NaN is not finite"):
        read_json(p, what="vocab manifest")
    p.write_text("[1]")
    with pytest.raises(JamError, match="must be an object"):
        read_json(p, what="vocab manifest")


# ==== 3. settings and fields =====================================================================

field_values = st.one_of(st.integers(-2**40, 2**40), st.booleans(), st.floats(), st.text(max_size=3), st.none(),
                         st.lists(st.integers(-3, 40), max_size=3))


@FAST
@given(changes=st.dictionaries(st.sampled_from(["text_size", "image_codes", "num_sentinels", "pad_to_multiple",
                                                "image_tokens_per_image", "image_grid", "text_tokenizer"]),
                               field_values, max_size=3))
@example({"pad_to_multiple": 0})
@example({"pad_to_multiple": -8})
@example({"image_grid": [-32, -32], "image_tokens_per_image": 1024})
@example({"text_size": 256.5})
def test_every_manifest_field_is_checked_where_it_is_read(changes):
    d = {**tiny_manifest().to_dict(), **changes}
    d.pop("ids")
    try:
        m = VocabManifest.from_dict(d, source="v.json")
    except FieldError as e:
        assert str(e).startswith("v.json: ") and "\n" not in str(e)
        assert any(f"'{k}" in str(e) for k in changes) or "ids" in str(e), str(e)
        return
    for k in ("text_size", "image_codes", "num_sentinels", "pad_to_multiple", "image_tokens_per_image"):
        assert type(getattr(m, k)) is int and getattr(m, k) >= (0 if k in ("text_size", "image_codes") else 1)
    assert all(type(g) is int and g >= 1 for g in m.image_grid) and m.size % m.pad_to_multiple == 0
    assert VocabManifest.from_dict(m.to_dict(), source="v.json") == m


@pytest.mark.parametrize("field, value, message", [
    ("pad_to_multiple", 0, "field 'pad_to_multiple' must be >= 1, got 0"),
    ("pad_to_multiple", -8, "field 'pad_to_multiple' must be >= 1, got -8"),
    ("image_grid", [-2, -2], "field 'image_grid[0]' must be >= 1, got -2"),
    ("text_size", 256.5, "field 'text_size' must be an integer, got 256.5"),
])
def test_a_bad_manifest_stops_jam_data_in_one_line(tmp_path, capsys, field, value, message):
    from jam_metaseq.data.cli import main

    d = VOCAB.to_dict()
    d[field] = value
    (tmp_path / "v.json").write_text(json.dumps(d))
    (tmp_path / "d.jsonl").write_text('[{"text": "a"}]\n')
    assert main(["validate", str(tmp_path / "d.jsonl"), "--vocab", str(tmp_path / "v.json"),
                 "--tokenizer", "bytes"]) == 2
    err = capsys.readouterr().err
    assert err == f"jam-data validate: error: {tmp_path / 'v.json'}: {message}\n"


def test_recorded_ids_must_be_the_ones_the_fields_give():
    d = VOCAB.to_dict()
    d["ids"]["break"] += 1
    with pytest.raises(FieldError, match=r"v.json: field 'ids.break' is \d+ but the manifest's fields give"):
        VocabManifest.from_dict(d, source="v.json")


def test_what_the_tensors_prove_wins():
    assert agree(what="attention heads", given=None, given_by="--heads", proven=4, proven_by="a.pt") == 4
    assert agree(what="attention heads", given=4, given_by="--heads", proven=4, proven_by="a.pt") == 4
    with pytest.raises(JamError, match="^--heads says 8 attention heads, but a.pt's tensors has 4: "):
        agree(what="attention heads", given=8, given_by="--heads", proven=4, proven_by="a.pt's tensors")


# ==== 4. numbers =================================================================================


def _all_parsers() -> dict[str, argparse.ArgumentParser]:
    from checkpoints_tools.cli import build_parser as ckpt
    from jam_metaseq.data.cli import build_parser as data
    from jam_metaseq.eval.cli import build_parser as evaluate
    from jam_metaseq.generation.cli import build_parser as generate
    from jam_metaseq.hosts.args import add_criterion_args, add_model_args, add_task_args
    from jam_metaseq.image_tokenizer.cli import build_parser as vq
    from jam_metaseq.pipeline.run import build_parser as run
    from jam_metaseq.quickstart import build_parser as quickstart
    from jam_metaseq.retrieval.cli import build_parser as retrieval
    from launch.cli import build_parser as launch

    hosts = argparse.ArgumentParser()
    for add in (add_model_args, add_task_args, add_criterion_args):
        add(hosts)
    return {"jam-ckpt": ckpt(), "jam-data": data(), "jam-eval": evaluate(), "jam-generate": generate(),
            "jam-vq": vq(), "jam-retrieval": retrieval(), "jam-launch": launch(), "jam quickstart": quickstart(),
            "jam run": run(), "fairseq/metaseq-train --user-dir jam_metaseq": hosts}


def _actions(parser: argparse.ArgumentParser, prefix: str):
    for a in parser._actions:  # noqa: SLF001 - argparse has no public walk
        if isinstance(a, argparse._SubParsersAction):  # noqa: SLF001
            for name, sub in a.choices.items():
                yield from _actions(sub, f"{prefix} {name}")
        elif a.option_strings:
            yield prefix, a


def test_every_float_option_of_every_cli_is_finite_and_every_thread_count_bounded():
    floats = 0
    for prog, parser in _all_parsers().items():
        for where, a in _actions(parser, prog):
            flag = f"{where} {a.option_strings[-1]}"
            assert a.type is not float, f"{flag}: type=float accepts nan and inf"
            if getattr(a.type, "__name__", "") == "finite float":
                floats += 1
                for bad in ("nan", "inf", "-inf", "1e999", "NaN"):
                    with pytest.raises(argparse.ArgumentTypeError, match="not a finite number"):
                        a.type(bad)
            if a.option_strings[-1] == "--threads":
                with pytest.raises(argparse.ArgumentTypeError, match="out of range"):
                    a.type("100000")
    assert floats >= 20  # jam-generate 6 + 1, jam-ckpt --weights, jam-vq 2, jam-retrieval 4, jam-eval, hosts 5 ...


@FAST
@given(text=st.one_of(st.floats().map(repr), st.floats().map(str), st.text(max_size=6),
                      st.sampled_from(["nan", "inf", "-Infinity", "1e999", "1_0", " 2 ", "none"])),
       lo=st.none() | st.floats(-10, 10), width=st.floats(0, 10), lo_open=st.booleans(), hi_open=st.booleans(),
       none_ok=st.booleans())
def test_finite_float_accepts_exactly_the_finite_numbers_in_range(text, lo, width, lo_open, hi_open, none_ok):
    hi = None if lo is None else lo + width
    parse = finite_float(lo, hi, lo_open=lo_open, hi_open=hi_open, none_ok=none_ok)
    if none_ok and text.strip().lower() == "none":
        assert parse(text) is None
        return
    try:
        v = float(text)
    except ValueError:
        with pytest.raises(argparse.ArgumentTypeError, match="is not a number"):
            parse(text)
        return
    inside = math.isfinite(v) and (lo is None or (v > lo if lo_open else v >= lo)) and \
        (hi is None or (v < hi if hi_open else v <= hi))
    if inside:
        assert parse(text) == v
    else:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


@pytest.mark.parametrize("tool, argv", [
    ("jam-generate", ["--checkpoint", "c.pt", "--prompt", "a", "--temperature", "nan"]),
    ("jam-generate", ["--checkpoint", "c.pt", "--prompt", "a", "--repetition-penalty", "nan"]),
    ("jam-generate", ["--checkpoint", "c.pt", "--prompt", "a", "--guidance-scale", "inf"]),
    ("jam-generate", ["--checkpoint", "c.pt", "--prompt", "a", "--guidance-scale", "nan"]),
    ("jam-generate", ["--checkpoint", "c.pt", "--prompt", "a", "--image-temperature", "nan"]),
    ("jam-ckpt", ["merge", "a.pt", "b.pt", "-o", "out", "--weights", "nan", "0.5"]),
    ("jam-ckpt", ["merge", "a.pt", "b.pt", "-o", "out", "--threads", "100000"]),
    ("jam-ckpt", ["merge", "a.pt", "b.pt", "-o", "out", "--heads", "-4"]),
    ("jam-launch", ["--stage", "alignment", "--host", "fairseq", "--data", "d", "--save-dir", "s", "--port", "0"]),
])
def test_non_finite_and_out_of_range_options_are_usage_errors(capsys, tool, argv):
    """Issue 27 §4: each of these ran (all-zero ids, NaN tensors, a segfault) before."""
    from checkpoints_tools.cli import main as ckpt
    from jam_metaseq.generation.cli import main as generate
    from launch.cli import main as launch

    with pytest.raises(SystemExit) as e:
        {"jam-generate": generate, "jam-ckpt": ckpt, "jam-launch": launch}[tool](argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {argv[-2] if argv[-2].startswith('-') else argv[-3]}" in err


def test_library_configs_refuse_nan_too():
    from jam_metaseq.generation.config import GenerationConfig
    from jam_metaseq.generation.sampling import SamplingConfig

    for kw in ({"temperature": math.nan}, {"top_p": math.nan}, {"repetition_penalty": math.inf}):
        with pytest.raises(ValueError, match="not a finite number"):
            SamplingConfig(**kw)
    with pytest.raises(ValueError, match="guidance_scale"):
        GenerationConfig(guidance_scale=math.nan)
    assert check_float(2, name="x", lo=0) == 2.0


# ==== 5. script values ===========================================================================


def _plan(**kw):
    from launch.slurm import LaunchConfig, plan

    base = dict(stage="alignment", host="fairseq", data="/d", save_dir="/s")
    (job,) = plan(LaunchConfig(**{**base, **kw}))
    return job


def _bash_syntax_ok(script: str) -> None:
    r = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert r.returncode == 0, r.stderr


def _srun_words(script: str) -> list[str]:
    """The srun command as bash will split it (POSIX shlex: single quotes are literal, as in bash)."""
    return shlex.split(script[script.index("\nsrun --label ") + 1:])


def _utf8(v: str) -> bool:
    try:
        v.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _directives(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH ")]


SBATCH_OK = set("abcdefghijklmnopqrstuvwxyz0123456789_-./+,=@:~é")


@settings(max_examples=120, deadline=None)
@given(field=st.sampled_from(["partition", "account", "save_dir", "data", "user_dir", "extra_args", "arch"]),
       value=hostile_text)
@example(field="partition", value="learn\ntouch /tmp/x")
@example(field="data", value="$(touch /tmp/x)`id`;rm -rf ~\n'")
def test_a_value_is_written_for_its_position_or_refused(field, value):
    """Never executed: the script is parsed back with ``bash -n`` and the value recovered intact."""
    kw = {"extra_args": ["--x", value]} if field == "extra_args" else \
        {"arch": f"jam_cross_7b{value}"} if field == "arch" else {field: value}
    directive = field in ("partition", "account", "save_dir", "arch")
    # (partition and account are written only when given: an empty one is no directive)
    refused_when = (lambda v: not v or any(c not in SBATCH_OK and not c.isalnum() for c in v)) if directive \
        else (lambda v: "\0" in v or not _utf8(v))
    written = f"jam_cross_7b{value}" if field == "arch" else value
    try:
        job = _plan(**kw)
    except JamError as e:
        flag = {"save_dir": "--save-dir", "arch": "--arch"}.get(field, f"--{field}")
        assert (flag in str(e) or "NUL" in str(e) or "UTF-8" in str(e)) and "\n" not in describe(e)
        assert refused_when(written) or (field == "arch" and "\\" in value), str(e)
        return
    if field in ("partition", "account") and not value:
        assert not any(f"--{field}" in d for d in _directives(job.script))
    else:
        assert not refused_when(written)
    _bash_syntax_ok(job.script)
    assert _srun_words(job.script) == ["srun", "--label", *job.command]
    assert len(_directives(job.script)) == 9 + sum(bool(kw.get(k)) for k in ("partition", "account"))
    if field in ("partition", "account") and value:
        assert f"#SBATCH --{field}={value}" in _directives(job.script)
    if field == "data":
        assert job.command[1] == value
    if field == "extra_args":
        assert job.command[-2:] == ["--x", value]


@pytest.mark.parametrize("flag", ["--partition", "--account", "--save-dir", "--arch"])
def test_jam_launch_refuses_a_shell_line_in_a_directive(capsys, tmp_path, flag):
    """Issue 27 §5: ``--partition $'learn\\ntouch /tmp/x'`` put a shell line into the script."""
    from launch.cli import main

    value = {"--arch": "jam_cross_7b\ntouch x"}.get(flag, "learn\ntouch x")
    argv = ["--stage", "alignment", "--host", "fairseq", "--data", "/d", "--save-dir", "/s", flag, value]
    assert main([*argv, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err and "touch x" in err.replace("\\n", " ")


def test_a_restore_file_with_shell_syntax_stays_one_word():
    value = "/w/$(touch x) `id`\n;'q'.pt"
    job = _plan(restore_file=value)
    _bash_syntax_ok(job.script)
    line = next(l for l in job.script.split("\nif ") if "START=(" in l)
    words = shlex.split("if " + line.split("\nsrun")[0])
    assert words[words.index("START=(--restore-file") + 1] == value


# ==== messages and atomic answer sets ============================================================


def test_a_newline_in_a_file_name_does_not_cut_the_message(tmp_path, capsys):
    p = tmp_path / "a\nb.jsonl"
    p.write_text('[{"text": "ok"}]\n{"oops"\n')

    def read():
        list(iter_jsonl(p, vocab=VOCAB))

    assert run_cli("jam-data validate", read) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path}/a\\nb.jsonl:2: bad JSON" in err, err
    assert describe(FileNotFoundError(2, "No such file or directory", "x\x1b[2Jy")) == \
        "x\\x1b[2Jy: No such file or directory"


_FULL_DISK = """
import resource, signal, sys
from pathlib import Path
from PIL import Image
from jam_metaseq.generation.answer import Answer, split_segments
from jam_metaseq.generation.render import write_answer_set
from jam_metaseq.vocab import tiny_manifest

class Decoder:
    def decode_codes(self, codes):
        return [Image.new("RGB", (4, 4), (int(c[0, 0]) * 7 % 256, 0, 0)) for c in codes]

out, limit = Path(sys.argv[1]), int(sys.argv[2])
v = tiny_manifest(text_size=64)
image = [v.break_id, *(v.image_start + c for c in range(4)), v.break_id]
ids = image + [v.text_start + i % 60 for i in range(2000)] + image + [v.eos]
answers = [Answer(prompt_ids=[2], ids=ids, finish_reason="eos", seed=i, segments=split_segments(ids, vocab=v))
           for i in range(3)]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    write_answer_set(answers, out_dir=out, image_decoder=Decoder())
    print("written")
except OSError as e:
    print("failed", e.errno)
"""


@pytest.mark.parametrize("exists", [False, True])
def test_jam_generate_out_is_written_as_a_set_or_not_at_all(tmp_path, exists):
    """Issue 27: a full disk left answers.jsonl/.md and 0-byte .tmp files. Here the kernel refuses
    writes past a file-size limit (EFBIG): the six PNGs fit, answers.jsonl does not."""
    out = tmp_path / "answers"
    if exists:
        out.mkdir()
        (out / "answers.jsonl").write_text("old\n")
        (out / "notes.txt").write_text("mine\n")
    before = sorted(p.name for p in out.iterdir()) if exists else None
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", _FULL_DISK, str(out), "20000"], capture_output=True, text=True,
                       env=env, timeout=HANG_GUARD_S, cwd=ROOT)
    assert r.stdout.split() == ["failed", "27"], r.stdout + r.stderr[-2000:]  # EFBIG
    if exists:
        assert sorted(p.name for p in out.iterdir()) == before and (out / "answers.jsonl").read_text() == "old\n"
    else:
        assert not out.exists()
    r = subprocess.run([sys.executable, "-c", _FULL_DISK, str(out), str(1 << 30)], capture_output=True, text=True,
                       env=env, timeout=HANG_GUARD_S, cwd=ROOT)
    assert r.stdout.strip() == "written", r.stderr[-2000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["answers.jsonl", "answers.md", "answers.html", "images",
                            *(["notes.txt"] if exists else [])])
    assert len((out / "answers.jsonl").read_text().splitlines()) == 3 and len(list((out / "images").iterdir())) == 6


# ==== lm-eval task rows ==========================================================================


@FAST
@given(label=st.one_of(st.integers(-3, 4), st.booleans(), st.floats(-1, 3), st.text(max_size=2), st.none()),
       n=st.integers(1, 3))
@example(label=-1, n=2)
@example(label=7, n=2)
def test_a_task_row_is_scored_only_with_a_label_among_its_choices(tmp_path_factory, label, n):
    from jam_metaseq.eval.tasks import write_task_configs

    d = tmp_path_factory.mktemp("mc")
    rows = [{"context": "a", "choices": ["x", "y"], "label": 0},
            {"context": "b", "choices": [f"c{i}" for i in range(n)], "label": label}]
    (d / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ok = type(label) is int and 0 <= label < n
    if ok:
        assert write_task_configs(out_dir=d / "out", mc_tasks={"mc": d / "mc.jsonl"}) == ["mc"]
    else:
        with pytest.raises(DocumentError, match=f"^{d / 'mc.jsonl'}:2: task mc: 'label'"):
            write_task_configs(out_dir=d / "out", mc_tasks={"mc": d / "mc.jsonl"})


@pytest.mark.parametrize("task, file, row, message", [
    ("piqa_local", "piqa.jsonl", {"goal": "g", "sol1": "a", "sol2": "b", "label": -1}, "unlabelled row"),
    ("piqa_local", "piqa.jsonl", {"goal": "g", "sol1": "a", "sol2": "b", "label": 2}, "outside the 2 choices"),
    ("winogrande_local", "winogrande.jsonl", {"sentence": "a _ b", "option1": "x", "option2": "y", "answer": ""},
     "unlabelled row"),
    ("storycloze_local", "storycloze.jsonl", {**{f"input_sentence_{i}": "s" for i in range(1, 5)},
                                              "sentence_quiz1": "a", "sentence_quiz2": "b",
                                              "answer_right_ending": 3}, "outside the 2 choices (1..2)"),
    ("arc_easy_local", "arc_easy.jsonl", {"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]},
                                          "answerKey": "E"}, "none of the choice labels"),
])
def test_table1_rows_without_a_valid_answer_are_refused(tmp_path, task, file, row, message):
    from jam_metaseq.eval.tasks import write_task_configs

    (tmp_path / file).write_text(json.dumps(row) + "\n")
    with pytest.raises(DocumentError, match=f"^{tmp_path / file}:1: task {task}: .*{re.escape(message)}"):
        write_task_configs(out_dir=tmp_path / "out", data_dir=tmp_path, names=[task])
