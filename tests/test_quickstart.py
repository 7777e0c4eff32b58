"""``jam quickstart`` (issue 9 items 2 and 4; issue 16: it is ``jam run`` on the built-in plan): the
miniature JAM pipeline runs end to end through the real fairseq host and jam-ckpt, writes every
artefact, and a re-run skips finished stages.

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
from jam_metaseq.pipeline import report as rp
from jam_metaseq.pipeline.layout import budget_tag
from jam_metaseq.pipeline.spec import VARIANTS, ShapeSpec, quickstart_plan
from jam_metaseq.pipeline.train import parse_log
from jam_metaseq.pipeline.units import Pipeline, PipelineError, RunOptions

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


def test_text_corpus_knows_the_caption_words():
    """The LLM's corpus uses every word of the captions (JAM-Cross reads captions through the LLM's
    text embedding rows; docs/REPRODUCTION.md), yet no text document is a caption."""
    text = " ".join(d["segments"][0]["text"] for d in qd.text_documents(200, seed=0))
    words = set(text.replace(".", " ").replace(",", " ").split())
    captions = qd.caption_samples(60, size=32, seed=0, follow_up=1.0)
    for s in captions:
        for part in (s.caption, s.follow_up):
            missing = set(part.replace(".", " ").replace(",", " ").split()) - words
            assert not missing, (part, missing)
    assert not {s.caption for s in captions} & {sent.strip() for sent in text.split(".")}


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
    assert qd.caption_document(caption="x", image="a.png") == {"segments": [{"text": "x"}, {"image": "a.png"}]}
    with pytest.raises(ValueError):
        qd.caption_document(caption="x", image="a.png", codes=codes)


def test_instruct_documents_ask_for_what_they_show(tmp_path):
    from jam_metaseq.data.documents import tokenize_document
    from jam_metaseq.data.tokenizers import ByteTokenizer
    from jam_metaseq.vocab import VocabManifest

    samples = qd.instruct_samples(6, size=32, seed=2)
    assert [s.caption for s in samples] == [s.caption for s in qd.instruct_samples(6, size=32, seed=2)]
    vocab = VocabManifest(text_size=256, image_codes=64, num_sentinels=4, image_tokens_per_image=64,
                          image_grid=(8, 8))
    for s in samples:
        assert s.colour in s.caption and s.shape in s.caption and s.background in s.caption
        doc = qd.instruct_document(s, image="x.png")
        doc["response"][1] = {"image_tokens": [0] * 64}
        tokens, mask = tokenize_document(doc, vocab=vocab, text_tokenizer=ByteTokenizer())
        n_prompt = len(doc["prompt"].encode())
        assert not mask[:n_prompt].any() and mask[n_prompt:].all()  # the loss falls on the answer only


def test_write_jsonl_round_trip(tmp_path):
    docs = qd.text_documents(5, seed=1)
    path = qd.write_jsonl(tmp_path / "a" / "x.jsonl", docs)
    assert qd.read_jsonl(path) == docs
    assert not list(tmp_path.glob("a/*.tmp"))


# ---- the built-in plan, variants, logs -------------------------------------------------------------
def test_builtin_plan_scales_training_and_width():
    base, short, wide = quickstart_plan(), quickstart_plan(steps=0.1), quickstart_plan(scale=2)
    tpu = base.pretrain.batch_size * base.data.tokens_per_sample
    assert tpu == 4 * 320 == 8 * 160  # the tokens of an update did not change with the longer sequences
    assert base.budgets == [150 * tpu] and base.parents.train.budget_tokens == 500 * tpu
    assert base.instruct.budget_tokens == 150 * tpu and base.instruct.variants == ["cross2_paper"]
    assert base.data.conversations and base.data.builtin.train_instruct == 600
    assert quickstart_plan(variants=["uniform", "cross2_preserve"]).instruct.variants == ["uniform"]
    assert short.budgets == [15 * tpu] and short.parents.train.budget_tokens == 50 * tpu
    assert short.data.image_tokenizer.steps == 60 and short.model.embed_dim == base.model.embed_dim
    assert wide.model.embed_dim == 2 * base.model.embed_dim and wide.pretrain.batch_size == 8
    assert wide.data.builtin.train_images == 2 * base.data.builtin.train_images
    assert wide.model.embed_dim % wide.model.heads == 0
    assert quickstart_plan(steps=1e-6).budgets == [2 * tpu]  # never zero updates
    with pytest.raises(ValueError, match="--scale"):
        quickstart_plan(scale=0)
    with pytest.raises(ValueError, match="--steps"):
        quickstart_plan(steps=0)


def test_variants_cover_the_paper_ablations():
    v = VARIANTS
    assert len(v) == 11
    assert {x.init for x in v.values() if x.family == "jam_width"} == {"copy", "average"}
    cross = {(x.cross_every, x.init) for x in v.values() if x.family == "jam_cross"}
    assert cross == {(k, i) for k in (0, 1, 2, 4) for i in ("paper", "preserve")}
    # with 4 layers per parent the four frequencies give different cross-block sets
    from jam_metaseq.models.config import DecoderConfig, cross_of

    parent = DecoderConfig(vocab_size=64, embed_dim=8, ffn_dim=16, layers=ShapeSpec().layers, heads=2)
    sets = {tuple(cross_of(parent, k).cross_after) for k in (0, 1, 2, 4)}
    assert len(sets) == 4


def test_parse_fairseq_log_lines():
    line = ('2024-01-01 00:00:00 | INFO | train_inner | {"epoch": 1, "loss": "8.4", "num_updates": "5"}')
    assert parse_log(line) == ("train_inner", {"epoch": 1, "loss": "8.4", "num_updates": "5"})
    line = ('2024-01-01 00:00:00 | INFO | valid | {"epoch": 1, "valid_text_ppl": "12.5", "valid_num_updates": "10"}')
    assert parse_log(line)[0] == "valid"
    assert parse_log("2024 | INFO | fairseq_cli.train | model jam_cross") is None
    assert parse_log("x | train | {not json") is None
    assert parse_log("x | valid | [1, 2]") is None


def test_read_curve_keeps_the_last_record_of_an_update(tmp_path):
    from jam_metaseq.pipeline.train import read_curve

    log = tmp_path / "train.log"
    log.write_text("\n".join([
        'a | train_inner | {"loss": "5.0", "num_updates": "1"}',
        'a | valid | {"valid_ppl": "9.0", "valid_text_ppl": "8.0", "valid_num_updates": "2"}',
        "a resumed attempt",
        'a | valid | {"valid_ppl": "7.0", "valid_num_updates": "2"}',
        'a | valid | {"valid_ppl": "6.0", "valid_image_ppl": "3.0", "valid_num_updates": "4"}',
        'a | train_inner | {"loss": "4.5", "num_updates": "4"}']))
    curve, last = read_curve(log)
    assert curve == [{"update": 2, "ppl": 7.0}, {"update": 4, "ppl": 6.0, "image_ppl": 3.0}] and last == 4.5


# ---- the unit runner ---------------------------------------------------------------------------------
def _pipeline(tmp_path: Path, jobs: int = 1, **kw) -> Pipeline:
    return Pipeline(RunOptions(out=tmp_path, progress=False, **kw), jobs=jobs)


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


def test_resumable_unit_keeps_its_work_after_an_interruption(tmp_path):
    calls = []

    def build(tmp: Path) -> dict:
        calls.append(sorted(f.name for f in tmp.iterdir()))
        (tmp / "checkpoint_last.pt").write_text("half")
        if len(calls) == 1:
            raise KeyboardInterrupt
        return {}

    with pytest.raises(KeyboardInterrupt):
        _pipeline(tmp_path).unit("pretrain", "pretrain/x", {"a": 1}, build, resumable=True)
    _pipeline(tmp_path).unit("pretrain", "pretrain/x", {"a": 1}, build, resumable=True)
    assert calls == [[".unit_key"], [".unit_key", "checkpoint_last.pt"]]  # the second attempt found the first's
    assert not (tmp_path / "pretrain" / "x" / ".unit_key").exists()
    # another key starts afresh; a unit that is not resumable always does
    _pipeline(tmp_path).unit("pretrain", "pretrain/y", {"a": 1}, lambda t: (t / "f").write_text("x") and None)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        _pipeline(tmp_path).unit("pretrain", "pretrain/z", {"a": 1}, build, resumable=True)
    _pipeline(tmp_path).unit("pretrain", "pretrain/z", {"a": 2}, build, resumable=True)
    assert calls == [[".unit_key"], [".unit_key"]]


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
    with pytest.raises(PipelineError, match=r"stage 'parents' output is not run yet"):
        p.unit("parents", "parents/llm", {}, lambda t: {})


# ---- tables and the choice of the generating model ---------------------------------------------------
def _fake_evals(keys, tag):
    out = {}
    names = ["parent_llm", "parent_img"] + [f"start/{k}" for k in keys] + [f"{tag}/{k}" for k in keys]
    for i, k in enumerate(names):
        out[k] = {"params": 1000 * (i + 1), "sets": {
            "text": {"valid": {"ppl": 10.0 + i, "text_ppl": 10.0 + i, "image_ppl": float("nan"), "tokens": 3}},
            "caption": {"valid": {"ppl": 20.0 + i, "text_ppl": 9.0, "image_ppl": 5.0, "tokens": 3}}}}
    return out


def test_results_tables_and_best_cross(tmp_path):
    keys = tuple(VARIANTS)
    plan = quickstart_plan()
    tag = budget_tag(plan.budgets[0])
    evals = _fake_evals(keys, tag)
    evals[f"{tag}/cross4_preserve"]["sets"]["text"]["valid"]["ppl"] = 2.0  # the best JAM-Cross by geometric mean
    evals[f"{tag}/uniform"]["sets"]["text"]["valid"]["ppl"] = 1.0  # better still, but not a JAM-Cross
    evals[f"{tag}/uniform"]["sets"]["caption"]["valid"]["ppl"] = 1.0
    curve = {"curve": [{"update": 1, "text_ppl": 3.0, "image_ppl": 4.0}], "updates": 1, "token_budget": 8}
    res = rp.build_results(plan=plan, evals=evals, parents={"llm": curve, "img": curve},
                           pretrain={plan.budgets[0]: {k: curve for k in keys}})
    assert [r["key"] for r in res["rows"]] == ["parent_llm", "parent_img", *keys]
    t = res["tables"]
    assert [r[0] for r in t["table1"]["rows"]] == ["LLM parent (text)", "JAM-Uniform", "JAM-Width (copy)",
                                                   "JAM-Cross (every 2, paper)"]
    assert t["table2"]["rows"][0][0] == "Image-text parent"
    assert [r[0] for r in t["table3"]["rows"]] == ["Copy", "Average"]
    assert [(r[0], r[1]) for r in t["table4"]["rows"]] == [(c, i) for i in ("paper", "preserve")
                                                           for c in ("X", "1", "2", "4")]
    assert "zero-shot" in t["table1"]["note"] and "sweep" not in t  # one budget: no sweep table
    assert rp.best_model(res)["key"] == "cross4_preserve"
    assert rp.best_model(res, choice="uniform")["key"] == "uniform"
    text = rp.render_tables(res)
    for title in ("Table 1", "Table 2", "Table 3", "Table 4"):
        assert title in text
    rp.plot_curves(res, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(res)  # serialisable
    assert rp.chat_model(res) is None and "conversations" not in t  # nothing tuned on conversations


def test_conversation_measurements_sit_beside_the_caption_ppl():
    """Instruct runs tuned on conversations: their history PPL, drawing accuracy and <eot> share in
    the conversation table next to their caption PPL; jam chat is pointed at the answering model
    (the lowest caption PPL), else at the run whose follow-ups have the lowest PPL after their
    history."""
    plan = quickstart_plan(variants=["cross2_paper"])
    tag = budget_tag(plan.budgets[0])
    evals = _fake_evals(("cross2_paper",), tag)
    evals["instruct/cross2_paper/instruct"] = evals["instruct/cross2_paper/instruct+caption"] = evals[f"{tag}/cross2_paper"]
    curve = {"curve": [], "updates": 1, "token_budget": 8}
    instruct = {f"cross2_paper/{m}": {**curve, "variant": "cross2_paper", "mixture": mix}
                for m, mix in (("instruct", {"instruct": 1.0}), ("instruct+caption", {"instruct": 1.0, "caption": 1.0}))}

    def conv(with_h, drawn, ended, n):
        sets = {k: {"all": drawn[i], "ended_with_eot": ended[i], "n": n[i]} for i, k in enumerate(("single", "follow_up"))}
        return {"history_ppl": {"with_history": with_h, "without_history": 2 * with_h, "ratio": 2.0, "exchanges": 9,
                                "tokens": 90}, "prompt_following": sets}

    convs = {"cross2_paper/instruct": conv(3.0, (0.5, 0.25), (1.0, 0.5), (4, 4)),
             "cross2_paper/instruct+caption": conv(2.5, (0.75, 0.5), (1.0, 1.0), (4, 12))}
    res = rp.build_results(plan=plan, evals=evals, parents={"llm": curve, "img": curve},
                           pretrain={plan.budgets[0]: {"cross2_paper": curve}}, instruct=instruct,
                           conversations=convs)
    rows = res["tables"]["conversations"]["rows"]
    assert rows[0][1:] == ["instruct", 23.0, 3.0, 6.0, 2.0, 0.5, 0.25, 0.75]  # caption PPL of the fake eval
    assert rows[1][-1] == 1.0 and rows[1][2] == res["instruct"][1]["caption_ppl"]
    assert res["instruct"][1]["conversations"] == convs["cross2_paper/instruct+caption"]
    assert rp.chat_model(res)["key"] == rp.best_model(res)["key"] == "cross2_paper/instruct"  # caption PPLs tie
    res["instruct"][0]["caption_ppl"] = 99.0
    assert rp.chat_model(res)["key"] == "cross2_paper/instruct+caption"
    assert rp.chat_model(res, choice="cross2_paper")["key"] == "cross2_paper/instruct+caption"  # by history PPL
    assert "Conversations:" in rp.render_tables(res)
    assert res["tables"]["all"]["header"][-1] == "Caption"  # no drawing scores: no Drawn column
    # every model that draws is scored beside its caption PPL (the all-models table's Drawn)
    drawing = {"parent_img": {"all": 0.25, "n": 4}, f"{tag}/cross2_paper": {"all": 0.5, "n": 4}}
    res = rp.build_results(plan=plan, evals=evals, parents={"llm": curve, "img": curve},
                           pretrain={plan.budgets[0]: {"cross2_paper": curve}}, drawing=drawing)
    table = res["tables"]["all"]
    assert table["header"][-2:] == ["Caption", "Drawn"] and [r[-1] for r in table["rows"]] == [None, 0.25, 0.5]
    assert [r[-2] for r in table["rows"]] == [r["caption_ppl"] for r in res["rows"]]
    assert res["rows"][2]["drawn"] == drawing[f"{tag}/cross2_paper"] and "drawn" not in res["rows"][0]


# ---- the CLI ------------------------------------------------------------------------------------------
def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        jam_main(["quickstart", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--out", "--steps", "--scale", "--device", "--seed", "--stages", "--variants", "--force",
                 "--jobs", "--threads", "--prompt", "--no-progress", "--dry-run", "--print-plan"):
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
        if r["key"] != "parent_llm":  # every model that draws, scored beside its caption PPL (1 prompt x 2 seeds)
            assert r["drawn"]["n"] == 2 and 0 <= r["drawn"]["all"] <= 1, r["key"]
            sheet = out / "eval" / "drawing" / ("parent_img" if r["role"] == "parent" else
                                                f"{budget_tag(res['budget'])}/{r['key']}") / "drawing-single.png"
            assert sheet.read_bytes()[:4] == b"\x89PNG"
    assert "parent_llm" not in {r["key"] for r in res["rows"] if "drawn" in r}
    assert "Drawn" in stdout
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
        assert (out / "pretrain" / budget_tag(res["budget"]) / v / "checkpoint_last.pt").is_file()
        assert len(list((out / "fused" / v / "ckpt").glob("*.pt"))) == 1
    # the paper's JAM-Cross (else the first variant) tuned on the generator's conversations, both
    # mixtures, each measured as a chat: history PPL, pictures drawn as asked, answers closed
    tuned = "cross2_paper" if "cross2_paper" in variants else variants[0]
    assert [r["key"] for r in res["instruct"]] == [f"{tuned}/instruct", f"{tuned}/instruct+caption"]
    for r in res["instruct"]:
        c = r["conversations"]
        assert c["history_ppl"]["exchanges"] > 64 and math.isfinite(c["history_ppl"]["ratio"])
        for name in ("single", "follow_up"):
            drawn = c["prompt_following"][name]
            assert drawn["n"] == 2 and 0 <= drawn["all"] <= 1 and 0 <= drawn["ended_with_eot"] <= 1  # 1 prompt x 2 seeds
            assert (out / "eval" / "conversations" / r["key"] / f"drawing-{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert "Conversations:" in stdout
    assert f"jam chat {out}/instruct/{tuned}/" in stdout and f"--image-tokenizer {out}/tokenizers/vq" in stdout
    # the answers came from the tuned model, as a chat's first turns
    from jam_metaseq.vocab import VocabManifest

    vocab = VocabManifest.load(out / "bin" / "instruct" / "vocab.json")
    for line in (out / "generate" / "answers.jsonl").read_text().splitlines():
        a = json.loads(line)
        assert a["prompt_ids"][:2] == [vocab.eos, vocab.user_id] and a["prompt_ids"][-2:] == [vocab.eot,
                                                                                              vocab.assistant_id]
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
    # every validation token is scored except each document's first, which starts the document at
    # position 0 as in the training blocks (no <eos> before it: a model never saw one there)
    from jam_metaseq.eval.io import read_sequences
    from jam_metaseq.vocab import VocabManifest

    vocab = VocabManifest.load(out / "tokenizers" / "vocab.json")
    for kind in ("text", "caption"):
        seqs, _ = read_sequences(out / "bin" / kind / "valid" / kind, vocab=vocab)
        want = sum(len(s) for s in seqs) - len(seqs)
        assert {r["sets"][kind]["valid"]["tokens"] for r in res["rows"]} == {want}, kind
    before = _mtimes(out)
    again = _run(out, variants, capsys)
    assert _mtimes(out) == before  # nothing rewritten
    assert again == stdout  # same tables from the stored results
    # asking again for one stage with --force re-runs it (and only it, plus what depends on it)
    _run(out, variants, capsys, "--stages", "report", "--force")
    after = _mtimes(out)
    changed = {Path(p).relative_to(out).parts[0] for p in after if after[p] != before.get(p)}
    assert changed == {"report"}
    # the printed plan, run by `jam run`, is the same pipeline: everything is done already
    assert jam_main(["quickstart", "--print-plan", "--variants", ",".join(variants), *FAST]) == 0
    plan = out.parent / "plan.yaml"
    plan.write_text(capsys.readouterr().out)
    assert jam_main(["run", str(plan), "--out", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().out == stdout and _mtimes(out) == after


@pytest.mark.slow
def test_quickstart_all_variants_end_to_end(tmp_path, capsys):
    out, variants = tmp_path / "qs", list(VARIANTS)
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
