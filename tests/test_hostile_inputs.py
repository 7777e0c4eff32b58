"""The five classes of untrusted input (issue 27; threat model in docs/TESTING.md), one home each in
``jam_metaseq.inputs``: a generator-based test per class (hypothesis) plus the issue's instances
that the homes fix outside ``checkpoints_tools/`` and ``pipeline/`` as regression tests.

1. names that escape        -> ``safe_component``, ``resolve_output_dir``
2. containers that lie      -> bounded JSON / YAML / zip / images / ints, ``FileSnapshot``; lm-eval rows
3. settings vs the weights  -> manifest fields checked where read, ``agree``
4. numbers that are not     -> ``test_hostile_options.py``
5. data that becomes script -> ``test_hostile_options.py``

Everything runs in process; no sleeps, no timing.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import struct
import textwrap
import zipfile
import zlib
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from jam_metaseq.data.documents import DataReport, DocumentError, iter_jsonl
from jam_metaseq.errors import JamError, describe
from jam_metaseq.inputs import (MAX_DEPTH, FieldError, FileSnapshot, InputError, agree, check_int_list,
                                load_rgb_image, loads_json, loads_yaml, open_zip_member, read_json,
                                read_zip_member, resolve_output_dir, safe_component, unique_zip_names)
from jam_metaseq.vocab import VocabManifest, tiny_manifest

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
