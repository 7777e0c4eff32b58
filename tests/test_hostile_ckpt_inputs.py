"""Issue 27 at the checkpoint tools' and the pipeline's boundaries: each class of untrusted input
refused where it enters ``checkpoints_tools`` / ``jam run`` (threat model: docs/TESTING.md), with a
generator-based test per class and the issue's instances as regressions.

1. names        -> ``OutputSpec`` (``--name``), ``OutputDir`` (``-o``), manifest / index file names
2. containers   -> ``safe_load.check_torch_zip`` (duplicate records, bounded ``data.pkl``),
                   ``OutputDir.commit`` (an input changed while streamed), plan YAML
3. settings     -> ``readers.infer.check_config`` (``--heads``, config.json, GGUF metadata vs tensors),
                   ``readers.hf.read_hf_config`` (an HF config's sizes are positive integers)
4. numbers      -> ``OutputDir._check_finite`` (``--allow-non-finite``), strict ``manifest.json``,
                   ``results.json`` (null for a missing metric)

Tiny tensors, everything in process, no sleeps: an input "changes while read" at a chosen tensor.
"""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from checkpoints_tools import safe_load
from checkpoints_tools.cli import main as ckpt
from checkpoints_tools.io import OutputSpec
from checkpoints_tools.io.output_dir import OutputDir
from checkpoints_tools.load import read_manifest
from checkpoints_tools.readers import open_checkpoint
from checkpoints_tools.safe_load import CheckpointError, safe_torch_load
from jam_metaseq.errors import JamError
from jam_metaseq.inputs import InputError, safe_component
from _ckpt_util import save_metaseq, tiny_parent

torch.set_num_threads(1)
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
HOSTILE = list("ab9_-./\\'\"$ \t\n\x00\x1b") + ["é"]
names = st.one_of(st.text(alphabet=st.sampled_from(HOSTILE), max_size=12), st.text(max_size=12))


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt_inputs")
    cfg, a = tiny_parent(31)
    _, b = tiny_parent(32)
    return {"dir": d, "cfg": cfg, "a": save_metaseq(d / "a", cfg, a), "b": save_metaseq(d / "b", cfg, b)}


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


# ==== 1. names ===================================================================================


@FAST
@given(name=names)
@example("../victim/in")
@example("..")
@example("a\nb")
def test_an_output_name_is_one_component_or_refused(tmp_path_factory, name):
    out = tmp_path_factory.mktemp("o") / "out"
    try:
        safe_component(name, what="x")
        safe = True
    except JamError:
        safe = False
    if not safe:
        with pytest.raises(JamError, match="^--name"):
            OutputSpec(out_dir=out, name=name, mp=2, fsdp=2)
        return
    for fmt in ("metaseq", "safetensors"):
        spec = OutputSpec(out_dir=out, name=name, format=fmt, mp=2 if fmt == "metaseq" else 1,
                          fsdp=2 if fmt == "metaseq" else 0)
        for f in (f for rank in spec.file_names() for f in rank):
            assert (out / f).parent == out and f.startswith(name)  # one entry of the output directory


def test_a_name_that_leaves_the_output_never_touches_an_input(parents, capsys):
    d = parents["dir"]
    victim = d / "victim"
    victim.mkdir(exist_ok=True)
    (victim / "in.pt").write_bytes(b"keep")
    before = _sha(parents["a"])
    for name in ("../victim/in", f"../a/{parents['a'].stem}"):
        assert ckpt(["merge", str(parents["a"]), str(parents["b"]), "-o", str(d / "out"), "--name", name,
                     "--quiet"]) == 2
        assert "--name" in _one_line(capsys)
    assert (victim / "in.pt").read_bytes() == b"keep" and _sha(parents["a"]) == before
    assert not (d / "out").exists()


def test_an_output_in_a_symlink_loop_is_one_line(parents, tmp_path, capsys):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for out in (tmp_path / "loop", tmp_path / "loop" / "x"):
        assert ckpt(["merge", str(parents["a"]), str(parents["b"]), "-o", str(out), "--quiet"]) == 2
        assert "symlink loop" in _one_line(capsys)


@FAST
@given(name=names)
def test_file_names_from_a_manifest_or_an_index_are_one_component(tmp_path_factory, name):
    from checkpoints_tools.io.safetensors import read_safetensors_index

    d = tmp_path_factory.mktemp("m")
    (d / "manifest.json").write_text(json.dumps({"files": {name: {"bytes": 1, "sha256": "0" * 64}}}))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": name}}))
    try:
        safe_component(name, what="x")
    except JamError:
        with pytest.raises(CheckpointError, match="manifest.json: corrupt manifest"):
            read_manifest(d / "manifest.json")
        with pytest.raises(CheckpointError, match="not a file next to the index"):
            read_safetensors_index(d / "model.safetensors.index.json")
        return
    assert list(read_manifest(d / "manifest.json")["files"]) == [name]
    assert read_safetensors_index(d / "model.safetensors.index.json") == {"w": d / name}


# ==== 2. containers that lie =====================================================================


def _records(path: Path) -> list[tuple[zipfile.ZipInfo, bytes]]:
    with zipfile.ZipFile(path) as zf:
        return [(i, zf.read(i)) for i in zf.infolist()]


def _rezip(path: Path, records: list[tuple[str, bytes, int]]) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name"
        with zipfile.ZipFile(path, "w") as zf:
            for name, data, method in records:
                zf.writestr(zipfile.ZipInfo(name), data, compress_type=method)


@FAST
@given(which=st.integers(0, 1000), first=st.booleans())
def test_a_torch_zip_with_two_records_of_one_name_is_refused(parents, tmp_path_factory, which, first):
    """The issue's instance: a short record of one name first, torch reads one and a check the other.
    Any record duplicated, before or after the original, is refused before torch reads anything."""
    src = _records(parents["a"])
    i = which % len(src)
    info, data = src[i]
    dup = (info.filename, data[: len(data) // 2], zipfile.ZIP_STORED)
    rows = [(x.filename, b, zipfile.ZIP_STORED) for x, b in src]
    rows.insert(i if first else i + 1, dup)
    p = tmp_path_factory.mktemp("dup") / "dup.pt"
    _rezip(p, rows)
    with pytest.raises(InputError, match="two records named"):
        safe_torch_load(p)


def test_a_deflated_data_pkl_is_inflated_under_a_bound(parents, tmp_path, monkeypatch):
    """The issue's deflate bomb (1.5 GB from 1.6 MB), in miniature: the bound is lowered to 1 KiB and
    the pickle deflated; the record is refused from its header before anything is inflated, and a
    record whose header lies about its size stops at the bound while inflating, in chunks."""
    rows = [(i.filename, b, zipfile.ZIP_DEFLATED if i.filename.endswith("data.pkl") else zipfile.ZIP_STORED)
            for i, b in _records(parents["a"])]
    p = tmp_path / "bomb.pt"
    _rezip(p, rows)
    assert safe_torch_load(p)["model"]  # deflated but within the bound: read as before
    monkeypatch.setattr(safe_load, "MAX_PICKLE_BYTES", 1024)
    with pytest.raises(InputError, match="data.pkl' inflates to .* over the bound of 1024"):
        safe_torch_load(p)


def test_an_input_rewritten_while_it_is_streamed_is_refused(parents, tmp_path, capsys, monkeypatch):
    """The input changes after the third tensor is read (the reader says when: no timing): the output
    would mix two versions, so nothing is written."""
    from checkpoints_tools.readers.metaseq import MetaseqReader

    victim = tmp_path / "a.pt"
    victim.write_bytes(parents["a"].read_bytes())
    reads = {"n": 0}
    real = MetaseqReader.get_into

    def get_into(self, name, out):
        reads["n"] += 1
        if reads["n"] == 3:
            with open(victim, "ab") as f:  # rewritten in place: same inode, new size and mtime
                f.write(b"\0")
        return real(self, name, out)

    monkeypatch.setattr(MetaseqReader, "get_into", get_into)
    assert ckpt(["merge", str(victim), str(parents["b"]), "-o", str(tmp_path / "out"), "--quiet"]) == 2
    assert "changed while it was read" in _one_line(capsys)
    assert reads["n"] >= 3 and not (tmp_path / "out").exists()


def test_a_hostile_plan_is_refused_at_dry_run(tmp_path, capsys):
    from jam_metaseq.cli import main as jam

    lines = ['a: &a ["x","x","x","x","x","x","x","x","x","x"]']
    for i, k in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        lines.append(f"{k}: &{k} [" + ",".join([f"*{prev}"] * 10) + "]")
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\n")
    (tmp_path / "deep.yaml").write_text("a: " + "[" * 100_000 + "]" * 100_000 + "\n")
    (tmp_path / "nan.yaml").write_text("pretrain:\n  betas: [.nan, 0.9]\n")
    (tmp_path / "name.yaml").write_text('eval:\n  text:\n    "../x": [a.jsonl]\n')
    for name, words in (("bomb.yaml", "expands to more than"), ("deep.yaml", "nested more than"),
                        ("nan.yaml", "pretrain.betas[0]: Input should be a finite number"),
                        ("name.yaml", "set name '../x' contains '/'")):
        assert jam(["run", str(tmp_path / name), "--dry-run", "--out", str(tmp_path / "o")]) == 2
        assert words in _one_line(capsys)


# ==== 3. settings that override what the weights say =============================================


@FAST
@given(heads=st.integers(1, 40))
def test_heads_must_agree_with_the_checkpoint(parents, heads):
    r = open_checkpoint(parents["a"])
    true = parents["cfg"].heads
    if heads == true:
        assert r.config(heads=heads).heads == true
    else:
        with pytest.raises(JamError, match=f"--heads says {heads} attention heads, but .* has {true}"):
            r.config(heads=heads)


def test_img_heads_that_contradict_the_image_parent_are_named(parents, tmp_path, capsys):
    assert ckpt(["cross", "--llm", str(parents["a"]), "--img", str(parents["b"]), "--img-heads", "8", "-o",
                 str(tmp_path / "o"), "--quiet"]) == 2
    assert _one_line(capsys).startswith("jam-ckpt cross: error: --img-heads says 8 attention heads, but ")


@pytest.fixture(scope="module")
def hf_dir(parents, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    cfg, state = tiny_parent(33, scale_embedding=False)  # HF OPT does not scale embeddings
    src = save_metaseq(root / "opt", cfg, state)
    out = root / "hf"
    assert ckpt(["convert", str(src), "--to", "hf", "-o", str(out), "--quiet", "--no-hash-sources"]) == 0
    return out


@FAST
@given(field=st.sampled_from(["num_hidden_layers", "vocab_size", "hidden_size"]),
       value=st.one_of(st.integers(1, 300), st.just(10**9)))
def test_an_hf_config_that_contradicts_its_tensors_is_refused_before_any_work(hf_dir, tmp_path_factory,
                                                                             field, value):
    import shutil

    d = tmp_path_factory.mktemp("hfc") / "hf"
    shutil.copytree(hf_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    true = cfg[field]
    cfg[field] = value
    if field == "hidden_size":  # a config that is one at all: heads divide it, no projection
        cfg["num_attention_heads"] = 1
        cfg["word_embed_proj_dim"] = value
    (d / "config.json").write_text(json.dumps(cfg))
    if value == true:
        assert open_checkpoint(d).config()
        return
    with pytest.raises(JamError, match=f"config.json says {value} .*, but .* has {true}"):
        open_checkpoint(d).config()


@FAST
@given(key=st.sampled_from(["num_hidden_layers", "hidden_size", "vocab_size", "num_attention_heads", "head_dim"]),
       value=st.one_of(st.integers(-3, 3), st.floats(-3, 3), st.text(max_size=3), st.none(), st.booleans(),
                       st.lists(st.integers(), max_size=2)))
def test_an_hf_config_size_is_a_positive_integer_where_it_is_read(tmp_path_factory, key, value):
    from checkpoints_tools.readers.hf import read_hf_config

    p = tmp_path_factory.mktemp("cfg") / "config.json"
    p.write_text(json.dumps({"model_type": "opt", key: value}))
    if (isinstance(value, int) and not isinstance(value, bool) and value >= 1) or (value is None and key == "head_dim"):
        assert read_hf_config(p)[key] == value
    else:
        with pytest.raises(JamError, match=f"config.json: field '{key}' must be"):
            read_hf_config(p)


def test_ten_to_the_nine_layers_is_one_line_before_any_work(hf_dir, tmp_path, capsys):
    import shutil

    d = tmp_path / "hf"
    shutil.copytree(hf_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 10**9
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "manifest.json").unlink()  # an HF directory from elsewhere: no jam-ckpt manifest
    for argv in (["convert", str(d), "--to", "metaseq", "-o", str(tmp_path / "o"), "--quiet"],
                 ["verify", str(d), "--no-manifest"]):
        assert ckpt(argv) == 2
        assert "says 1000000000 layers" in _one_line(capsys)


# ==== 4. numbers that are not finite =============================================================


values = st.one_of(st.floats(width=32, allow_nan=True, allow_infinity=True), st.sampled_from([3e38, -3e38, 6e4]))


@FAST
@given(data=st.lists(values, min_size=1, max_size=12), dtype=st.sampled_from([torch.float32, torch.float16,
                                                                              torch.bfloat16]))
def test_a_non_finite_tensor_stops_the_output_unless_asked(tmp_path_factory, data, dtype):
    """Exactly the tensors holding NaN or inf after the cast to the written dtype are refused (the
    reference: ``torch.isfinite``), big finite values (3e38, fp16's 6e4) accepted."""
    t = torch.tensor(data, dtype=torch.float32).to(dtype)
    bad = not bool(torch.isfinite(t).all())
    out = OutputDir.__new__(OutputDir)
    out.spec, out.non_finite = OutputSpec(out_dir=Path("o")), set()
    import threading

    out._error_lock = threading.Lock()
    if bad:
        with pytest.raises(JamError, match="holds non-finite values .*--allow-non-finite"):
            out._check_finite("w", t)
    else:
        out._check_finite("w", t)
    out.spec = OutputSpec(out_dir=Path("o"), allow_non_finite=True)
    out._check_finite("w", (t,))
    assert out.non_finite == ({"w"} if bad else set())


def _strict(text: str):
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in strict JSON"))


def test_fp16_overflow_of_the_weights_is_refused_or_written_when_asked(parents, tmp_path, capsys):
    argv = ["merge", str(parents["a"]), str(parents["b"]), "--weights", "1e5", "1e5", "--dtype", "fp16", "--quiet"]
    assert ckpt([*argv, "-o", str(tmp_path / "refused")]) == 2
    assert "non-finite" in _one_line(capsys) and not (tmp_path / "refused").exists()
    assert ckpt([*argv, "-o", str(tmp_path / "asked"), "--allow-non-finite"]) == 0
    capsys.readouterr()
    m = _strict((tmp_path / "asked" / "manifest.json").read_text())
    assert "decoder.embed_tokens.weight" in m["non_finite_tensors"]
    with pytest.raises(SystemExit) as e:  # argparse's usage error: the flag, at parse time
        ckpt(["merge", str(parents["a"]), str(parents["b"]), "--weights", "nan", "0.5", "-o", str(tmp_path / "nan")])
    assert e.value.code == 2 and "not a finite number" in capsys.readouterr().err


def test_results_json_writes_null_for_a_missing_metric(tmp_path):
    from jam_metaseq.pipeline.report import best_model
    from jam_metaseq.pipeline.units import write_json

    rows = [{"role": "jam", "key": "a", "family": "jam_cross", "text_ppl": 3.0, "caption_ppl": float("nan")},
            {"role": "jam", "key": "b", "family": "jam_cross", "text_ppl": 4.0, "caption_ppl": 5.0}]
    write_json(tmp_path / "results.json", {"rows": rows, "image_ppl": float("nan")}, nan_as_null=True)
    back = _strict((tmp_path / "results.json").read_text())
    assert back["image_ppl"] is None and back["rows"][0]["caption_ppl"] is None
    assert best_model(back)["key"] == "b" and math.isnan(rows[0]["caption_ppl"])


def test_without_an_image_tokenizer_the_chat_commands_name_none():
    from jam_metaseq.pipeline.run import chat_commands

    assert all("--image-tokenizer" not in c for c in chat_commands(Path("ckpt"), None))
    assert all("--image-tokenizer vq" in c for c in chat_commands(Path("ckpt"), Path("vq")))
