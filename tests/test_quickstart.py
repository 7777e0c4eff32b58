"""``jam quickstart`` (issue 9 items 2 and 4): the miniature JAM pipeline runs end to end through the
real fairseq host and jam-ckpt, writes every artefact, and a re-run skips finished stages.

The end-to-end runs use ``--steps 0.02`` (a handful of updates per stage): they check plumbing and
artefacts, not model quality. The default suite trains one JAM variant; the slow test trains all 11.
The pieces without training (embedded data, the unit runner, log parsing, tables) are tested
directly.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from jam_metaseq import quickstart as qs
from jam_metaseq import quickstart_data as qd
from jam_metaseq.cli import main as jam_main

pytest.importorskip("fairseq")

FAST = ["--steps", "0.02", "--threads", "1", "--no-progress"]


# ---- embedded data ---------------------------------------------------------------------------------
def test_text_documents_are_deterministic_and_consistent():
    a, b = qd.text_documents(20, seed=3), qd.text_documents(20, seed=3)
    assert a == b
    assert a != qd.text_documents(20, seed=4)
    for doc in a:
        text = doc["segments"][0]["text"]
        n = text.count(".")
        assert 3 <= n <= 6, text
        # the associations a model can learn: a trade always goes with its verb and object
        for trade, (verb, obj, _) in qd.TRADES.items():
            for sent in text.split("."):
                if f" {trade} " in f" {sent} ":
                    assert verb in sent and obj in sent, sent


def test_caption_samples_describe_their_image():
    samples = qd.caption_samples(40, size=32, seed=0, follow_up=0.5)
    again = qd.caption_samples(40, size=32, seed=0, follow_up=0.5)
    assert [(s.caption, s.follow_up) for s in samples] == [(s.caption, s.follow_up) for s in again]
    assert all((np.asarray(a.image) == np.asarray(b.image)).all() for a, b in zip(samples, again))
    from jam_metaseq.image_tokenizer.synthetic import BACKGROUNDS, COLOURS

    for s in samples:
        assert s.image.size == (32, 32)
        assert s.colour in s.caption and s.shape in s.caption and s.background in s.caption
        # the shape's colour is in the picture and the background colour fills a corner
        px = np.asarray(s.image).reshape(-1, 3)
        assert (px == np.asarray(COLOURS[s.colour])).all(axis=1).any()
        assert tuple(np.asarray(s.image)[0, 0]) == BACKGROUNDS[s.background] or \
            tuple(np.asarray(s.image)[-1, -1]) == BACKGROUNDS[s.background]
    follow = [s for s in samples if s.follow_up]
    assert 0 < len(follow) < len(samples)
    assert all(s.shape in s.follow_up and s.colour in s.follow_up for s in follow)
    assert not any(s.follow_up for s in qd.caption_samples(10, size=32, seed=0, follow_up=0.0))


def test_caption_document_tokenizes_as_caption_then_image():
    from jam_metaseq.data.documents import tokenize_document
    from jam_metaseq.data.tokenizers import ByteTokenizer
    from jam_metaseq.vocab import VocabManifest

    vocab = VocabManifest(text_size=256, image_codes=64, num_sentinels=4, image_tokens_per_image=64,
                          image_grid=(8, 8))
    codes = np.arange(64).reshape(8, 8)
    doc = qd.caption_document(caption="a red circle", codes=codes, follow_up="it is red.")
    tokens, mask = tokenize_document(doc, vocab=vocab, text_tokenizer=ByteTokenizer())
    n = len("a red circle")
    assert tokens[n] == vocab.break_id and tokens[n + 65] == vocab.break_id
    assert list(tokens[n + 1 : n + 65]) == [vocab.image_start + c for c in range(64)]
    assert tokens[-1] == vocab.eos and mask.all()
    assert len(tokens) == n + 66 + len("it is red.") + 1


def test_write_jsonl_round_trip(tmp_path):
    docs = qd.text_documents(5, seed=1)
    path = qd.write_jsonl(tmp_path / "a" / "x.jsonl", docs)
    assert qd.read_jsonl(path) == docs
    assert not list(tmp_path.glob("a/*.tmp"))


# ---- plan, variants, logs --------------------------------------------------------------------------
def test_plan_scales_training_and_width():
    base, short, wide = qs.plan_for(), qs.plan_for(steps=0.1), qs.plan_for(scale=2)
    assert short.parent_updates == round(base.parent_updates * 0.1)
    assert short.variant_updates == round(base.variant_updates * 0.1)
    assert short.embed_dim == base.embed_dim
    assert wide.embed_dim == 2 * base.embed_dim and wide.train_images == 2 * base.train_images
    assert wide.embed_dim % wide.heads == 0
    assert qs.plan_for(steps=1e-6).variant_updates >= 2  # never zero updates
    with pytest.raises(ValueError, match="--scale"):
        qs.plan_for(scale=0)
    with pytest.raises(ValueError, match="--steps"):
        qs.plan_for(steps=0)


def test_variants_cover_the_paper_ablations():
    v = qs.VARIANTS
    assert len(v) == 11
    assert {x.init for x in v.values() if x.family == "jam_width"} == {"copy", "average"}
    cross = {(x.cross_every, x.init) for x in v.values() if x.family == "jam_cross"}
    assert cross == {(k, i) for k in (0, 1, 2, 4) for i in ("paper", "preserve")}
    # with 4 layers per parent the four frequencies give different cross-block sets
    from jam_metaseq.models.config import DecoderConfig, cross_of

    parent = DecoderConfig(vocab_size=64, embed_dim=8, ffn_dim=16, layers=qs.Plan().layers, heads=2)
    sets = {tuple(cross_of(parent, k).cross_after) for k in (0, 1, 2, 4)}
    assert len(sets) == 4


def test_parse_fairseq_log_lines():
    line = ('2024-01-01 00:00:00 | INFO | train_inner | {"epoch": 1, "loss": "8.4", "num_updates": "5"}')
    assert qs.parse_fairseq_log(line) == ("train_inner", {"epoch": 1, "loss": "8.4", "num_updates": "5"})
    line = ('2024-01-01 00:00:00 | INFO | valid | {"epoch": 1, "valid_text_ppl": "12.5", "valid_num_updates": "10"}')
    assert qs.parse_fairseq_log(line)[0] == "valid"
    assert qs.parse_fairseq_log("2024 | INFO | fairseq_cli.train | model jam_cross") is None
    assert qs.parse_fairseq_log("x | train | {not json") is None


# ---- the unit runner ---------------------------------------------------------------------------------
def _pipeline(tmp_path: Path, **kw) -> qs.Pipeline:
    return qs.Pipeline(qs.QuickstartConfig(out=tmp_path, progress=False, **kw))


def test_unit_skips_finished_reruns_changed_and_forced(tmp_path):
    calls = []

    def build(tmp: Path) -> dict:
        calls.append(tmp)
        (tmp / "out.txt").write_text(str(len(calls)))
        return {"n": len(calls)}

    m1 = _pipeline(tmp_path).unit("data", "data", {"a": 1}, build)
    assert (tmp_path / "data" / "out.txt").read_text() == "1" and m1["n"] == 1
    m2 = _pipeline(tmp_path).unit("data", "data", {"a": 1}, build)  # a re-run: skipped
    assert len(calls) == 1 and m2["run"] == m1["run"]
    m3 = _pipeline(tmp_path).unit("data", "data", {"a": 2}, build)  # settings changed: re-run
    assert len(calls) == 2 and m3["run"] != m1["run"]
    assert (tmp_path / "data" / "out.txt").read_text() == "2"
    _pipeline(tmp_path, force=True).unit("data", "data", {"a": 2}, build)  # --force
    assert len(calls) == 3
    p = _pipeline(tmp_path)
    p.unit("data", "data", {"a": 2}, build)
    p.unit("data", "data", {"a": 2}, build)  # once per invocation, also with --force
    assert len(calls) == 3 and p.skipped == ["data"]
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".")]  # no temp dirs left


def test_units_run_in_parallel_and_keep_order(tmp_path):
    import threading

    seen = set()

    def build(tmp: Path) -> dict:
        seen.add(threading.get_ident())
        return {"name": tmp.name}

    items = [(f"pretrain/v{i}", {"i": i}, build) for i in range(5)]
    markers = _pipeline(tmp_path, jobs=2).units("pretrain", items)
    assert [m["name"] for m in markers] == [f".v{i}.tmp" for i in range(5)]
    assert sorted(d.name for d in (tmp_path / "pretrain").iterdir()) == [f"v{i}" for i in range(5)]
    assert len(seen) >= 1
    again = _pipeline(tmp_path, jobs=2).units("pretrain", items)
    assert [m["run"] for m in again] == [m["run"] for m in markers]


def test_failed_unit_keeps_previous_output(tmp_path):
    _pipeline(tmp_path).unit("data", "data", {"a": 1}, lambda t: (t / "f").write_text("good") and None)

    def broken(tmp: Path) -> dict:
        (tmp / "f").write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _pipeline(tmp_path).unit("data", "data", {"a": 2}, broken)
    assert (tmp_path / "data" / "f").read_text() == "good"
    assert json.loads((tmp_path / "data" / "DONE.json").read_text())["stage"] == "data"


def test_unselected_stage_must_be_finished(tmp_path):
    p = _pipeline(tmp_path, stages=("fuse",))
    with pytest.raises(qs.QuickstartError, match=r"stage 'parents' output is not run yet"):
        p.unit("parents", "parents/llm", {}, lambda t: {})


# ---- tables and the choice of the generating model ---------------------------------------------------
def _fake_evals(keys):
    out = {}
    for i, k in enumerate(["parent_llm", "parent_img"] + [f"start_{k}" for k in keys] + list(keys)):
        out[k] = {"params": 1000 * (i + 1), "text": {"ppl": 10.0 + i, "image_ppl": float("nan")},
                  "caption": {"ppl": 20.0 + i, "image_ppl": 5.0}}
    return out


def test_results_tables_and_best_cross(tmp_path):
    keys = tuple(qs.VARIANTS)
    p = _pipeline(tmp_path, variants=keys)
    evals = _fake_evals(keys)
    evals["cross4_preserve"]["text"]["ppl"] = 2.0  # the best JAM-Cross by geometric mean
    evals["uniform"]["text"]["ppl"] = 1.0  # better still, but not a JAM-Cross
    evals["uniform"]["caption"]["ppl"] = 1.0
    curve = {"curve": [{"update": 1, "text_ppl": 3.0, "image_ppl": 4.0}], "updates": 1, "token_budget": 8}
    plan = qs.plan_for()
    res = qs.build_results(p, plan, evals, {r: curve for r in qs.PARENTS}, {k: curve for k in keys})
    assert [r["key"] for r in res["rows"]] == ["parent_llm", "parent_img", *keys]
    t = res["tables"]
    assert [r[0] for r in t["table1"]["rows"]] == ["LLM parent (text)", "JAM-Uniform", "JAM-Width (copy)",
                                                   "JAM-Cross (every 2, paper)"]
    assert t["table2"]["rows"][0][0] == "Image-text parent"
    assert [r[0] for r in t["table3"]["rows"]] == ["Copy", "Average"]
    assert [(r[0], r[1]) for r in t["table4"]["rows"]] == [(c, i) for i in ("paper", "preserve")
                                                           for c in ("X", "1", "2", "4")]
    assert "zero-shot" in t["table1"]["note"]
    assert qs.best_cross(res)["key"] == "cross4_preserve"
    text = qs.render_tables(res)
    for title in ("Table 1", "Table 2", "Table 3", "Table 4"):
        assert title in text
    qs.plot_curves(res, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(res)  # serialisable


# ---- the CLI ------------------------------------------------------------------------------------------
def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        jam_main(["quickstart", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--out", "--steps", "--scale", "--device", "--seed", "--stages", "--variants", "--force",
                 "--jobs", "--threads", "--prompt", "--no-progress"):
        assert flag in out


def test_bad_arguments_fail_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        jam_main(["quickstart", "--out", str(tmp_path), "--variants", "cross3_paper"])
    assert e.value.code == 2 and "unknown variant cross3_paper" in capsys.readouterr().err
    assert jam_main(["quickstart", "--out", str(tmp_path), "--steps", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["jam quickstart: error: --steps must be > 0, got -1.0"]


# ---- end to end ---------------------------------------------------------------------------------------
def _check_artefacts(out: Path, variants: list[str], stdout: str) -> dict:
    res = json.loads((out / "report" / "results.json").read_text())
    keys = [r["key"] for r in res["rows"]]
    assert keys == ["parent_llm", "parent_img", *variants]
    for r in res["rows"]:
        assert math.isfinite(r["text_ppl"]) and r["text_ppl"] > 1, r
        assert math.isfinite(r["caption_ppl"]) and r["caption_ppl"] > 1, r
        assert r["curve"], r["key"]  # validation points parsed from fairseq's log
        if r["role"] == "jam":
            assert r["token_budget"] == res["rows"][-1]["token_budget"]  # same budget for all
            assert math.isfinite(r["start"]["text_ppl"])
    assert (out / "report" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Table 1" in stdout and "Table 2" in stdout
    html = (out / "generate" / "answers.html").read_text()
    assert html.count("<img") >= 1
    for src in __import__("re").findall(r'<img[^>]*src="([^"]+)"', html):
        assert (out / "generate" / src).read_bytes()[:4] == b"\x89PNG"
    assert (out / "tokenizers" / "spm.model").is_file() and (out / "tokenizers" / "vq").is_dir()
    for role in ("llm", "img"):
        assert (out / "parents" / role / "checkpoint_last.pt").is_file()
    for v in variants:
        assert (out / "pretrain" / v / "checkpoint_last.pt").is_file()
        assert len(list((out / "fused" / v / "ckpt").glob("*.pt"))) == 1
    return res


def _mtimes(out: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in out.rglob("*") if p.is_file()}


def _run(out: Path, variants: list[str], capsys, *extra: str) -> str:
    rc = jam_main(["quickstart", "--out", str(out), "--variants", ",".join(variants), *FAST, *extra])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    return captured.out


def test_quickstart_one_variant_end_to_end_and_resume(tmp_path, capsys):
    out, variants = tmp_path / "qs", ["cross2_preserve"]
    stdout = _run(out, variants, capsys)
    res = _check_artefacts(out, variants, stdout)
    assert res["rows"][-1]["params"] > res["rows"][0]["params"]  # two branches + cross blocks
    before = _mtimes(out)
    again = _run(out, variants, capsys)
    assert _mtimes(out) == before  # nothing rewritten
    assert again == stdout  # same tables from the stored results
    # asking again for one stage with --force re-runs it (and only it, plus what depends on it)
    _run(out, variants, capsys, "--stages", "report", "--force")
    after = _mtimes(out)
    changed = {Path(p).relative_to(out).parts[0] for p in after if after[p] != before.get(p)}
    assert changed == {"report"}


@pytest.mark.slow
def test_quickstart_all_variants_end_to_end(tmp_path, capsys):
    out, variants = tmp_path / "qs", list(qs.VARIANTS)
    stdout = _run(out, variants, capsys)
    res = _check_artefacts(out, variants, stdout)
    for n in ("Table 3", "Table 4"):
        assert n in stdout
    by = {r["key"]: r for r in res["rows"]}
    assert by["width_copy"]["params"] == by["width_average"]["params"] > by["uniform"]["params"]
    assert by["cross1_paper"]["params"] > by["cross2_paper"]["params"] > by["cross4_paper"]["params"] \
        > by["cross0_paper"]["params"]
    before = _mtimes(out)
    _run(out, variants, capsys)
    assert _mtimes(out) == before
