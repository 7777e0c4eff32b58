"""jam-eval perplexity (issue 9 item 1; paper Tables 2-5): hand-computed values, an independent
per-sequence cross-entropy reference with padding in the batch, the window rule, loss masks, the
three architectures, and the ``jam-eval ppl`` CLI on JSONL and binarized data."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from checkpoints_tools.load import load_model
from jam_metaseq.eval.io import save_checkpoint
from jam_metaseq.eval.context import document_windows
from jam_metaseq.eval.ppl import perplexity
from jam_metaseq.models import build_model, cross_of, preset, width_of
from jam_metaseq.vocab import VocabManifest, tiny_manifest

torch.set_num_threads(1)

VOCAB = tiny_manifest()  # text [4, 68), image [68, 100), size 112


def randomize_(model: torch.nn.Module, *, seed: int, std: float = 0.3) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(1.0 + noise if ("layer_norm" in name and name.endswith("weight")) else noise)
    return model.eval()


def tiny_model(*, seed: int = 0, max_positions: int = 32, layers: int = 2) -> torch.nn.Module:
    return randomize_(build_model(preset("tiny", vocab_size=VOCAB.size, max_positions=max_positions,
                                         layers=layers)), seed=seed)


def random_docs(n: int, *, seed: int, lengths: tuple[int, int] = (3, 20)) -> list[np.ndarray]:
    """Caption-like documents: text, then an image (<break> codes <break>), then <eos>."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        text = rng.integers(VOCAB.text_start, VOCAB.text_end, rng.integers(*lengths))
        codes = rng.integers(VOCAB.image_start, VOCAB.image_end, VOCAB.image_tokens_per_image)
        docs.append(np.concatenate([text, [VOCAB.break_id], codes, [VOCAB.break_id, VOCAB.eos]]))
    return docs


def reference_nll(model, seqs, *, max_len: int, stride: int | None = None):
    """Independent computation: one sequence at a time from position 0 (its first token context),
    full-window logits, F.cross_entropy."""
    stride = stride or max_len
    nll, count = 0.0, 0
    per_class = {"text": [0.0, 0], "image": [0.0, 0], "other": [0.0, 0]}
    with torch.no_grad():
        for s in seqs:
            x = torch.tensor([*map(int, s)])
            n = len(s) - 1  # targets
            for a in range(0, n, stride):
                b = min(a + stride, n)
                lo = max(0, b - max_len)
                logits = model(x[lo:b][None])[0]  # (b - lo, V), no padding anywhere
                k = b - a
                tgt = x[a + 1 : b + 1]
                losses = F.cross_entropy(logits[-k:].double(), tgt, reduction="none")
                nll += float(losses.sum())
                count += k
                for t, l in zip(tgt.tolist(), losses.tolist()):
                    cls = "text" if VOCAB.is_text(t) else "image" if VOCAB.is_image(t) else "other"
                    per_class[cls][0] += l
                    per_class[cls][1] += 1
    return nll, count, per_class


def test_hand_computed_constant_predictor():
    """Final LayerNorm weight 0: every position predicts softmax(E @ b); PPL follows by hand."""
    model = tiny_model(seed=1, layers=1)
    with torch.no_grad():
        model.decoder.layer_norm.weight.zero_()
    E = model.decoder.embed_tokens.weight.detach().double().numpy()  # (V, D)
    b = model.decoder.layer_norm.bias.detach().double().numpy()  # (D,)
    z = E @ b
    logp = z - (z.max() + np.log(np.exp(z - z.max()).sum()))  # log-softmax by hand
    seqs = [np.array([10, 20, 30]), np.array([69, 70, 71, VOCAB.eos])]
    r = perplexity(model, seqs, vocab=VOCAB, batch_size=2)
    # targets: 20, 30 and 70, 71, <eos> (each document's first token is context)
    targets = [20, 30, 70, 71, VOCAB.eos]
    expect = math.exp(-np.mean([logp[t] for t in targets]))
    assert r["tokens"] == 5
    assert r["ppl"] == pytest.approx(expect, rel=1e-5)
    assert r["text"]["ppl"] == pytest.approx(math.exp(-np.mean([logp[t] for t in (20, 30)])), rel=1e-5)
    assert r["image"]["ppl"] == pytest.approx(math.exp(-np.mean([logp[70], logp[71]])), rel=1e-5)
    assert r["other"]["tokens"] == 1 and r["other"]["ppl"] == pytest.approx(math.exp(-logp[VOCAB.eos]), rel=1e-5)


def test_zero_model_is_uniform():
    """All weights zero: logits are 0, so PPL is the vocabulary size exactly."""
    model = build_model(preset("tiny", vocab_size=VOCAB.size, max_positions=32)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    r = perplexity(model, random_docs(3, seed=0), vocab=VOCAB, batch_size=2)
    assert r["ppl"] == pytest.approx(VOCAB.size, rel=1e-6)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_matches_per_sequence_cross_entropy_with_padding(batch_size):
    model = tiny_model(seed=2)
    seqs = random_docs(7, seed=3)  # lengths differ: batches are right-padded
    r = perplexity(model, seqs, vocab=VOCAB, batch_size=batch_size)
    nll, count, per_class = reference_nll(model, seqs, max_len=32)
    assert r["tokens"] == count == sum(len(s) - 1 for s in seqs)
    assert r["nll"] == pytest.approx(nll, rel=1e-5)
    assert r["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    for cls, (n, c) in per_class.items():
        assert r[cls]["tokens"] == c
        assert r[cls]["nll"] == pytest.approx(n, rel=1e-5)


@pytest.mark.parametrize("max_len,stride", [(8, None), (8, 3), (5, 5), (32, 1)])
def test_long_sequences_in_windows(max_len, stride):
    model = tiny_model(seed=4)
    seqs = random_docs(3, seed=5, lengths=(10, 30))
    r = perplexity(model, seqs, vocab=VOCAB, batch_size=4, max_len=max_len, stride=stride)
    nll, count, _ = reference_nll(model, seqs, max_len=max_len, stride=stride)
    assert r["tokens"] == count
    assert r["nll"] == pytest.approx(nll, rel=1e-5)


def test_window_rule_each_target_once():
    toks = list(range(10, 23))  # 13 tokens
    ws = document_windows(toks, max_len=5, stride=4)
    got = [t for w in ws for t in w.targets]
    assert got == toks[1:]  # every token but the first, once
    for w in ws:
        assert len(w.inputs) <= 5
        # the scored positions' next tokens are the targets
        i = toks.index(w.inputs[0])
        assert toks[i + 1 : i + len(w.inputs) + 1][-len(w.targets):] == w.targets
    assert ws[0].inputs[0] == toks[0]  # nothing before the document
    assert ws[-1].inputs == toks[12 - 5 : 12]  # the last window reaches back to max_len
    # from a later token on (a continuation after its context): the same windows' tail
    tail = document_windows(toks, max_len=5, first_target=9)
    assert [t for w in tail for t in w.targets] == toks[9:] and tail[-1].inputs == toks[7:12]
    with pytest.raises(ValueError, match="stride"):
        document_windows(toks, max_len=5, stride=6)
    with pytest.raises(ValueError, match="first token has no context"):
        document_windows(toks, max_len=5, first_target=0)


def test_loss_mask():
    model = tiny_model(seed=6)
    seqs = random_docs(3, seed=7)
    masks = [np.arange(len(s)) >= 3 for s in seqs]  # drop tokens 1 and 2 (token 0 is never a target)
    r = perplexity(model, seqs, vocab=VOCAB, masks=masks)
    full = perplexity(model, seqs, vocab=VOCAB)
    assert full["tokens"] == sum(len(s) - 1 for s in seqs) and r["tokens"] == full["tokens"] - 6
    # reference: the masked targets' own losses, recomputed
    drop = 0.0
    with torch.no_grad():
        for s in seqs:
            x = torch.tensor([*map(int, s)])
            lp = F.log_softmax(model(x[None])[0].double(), -1)
            drop -= float(lp[0, x[1]] + lp[1, x[2]])
    assert r["nll"] == pytest.approx(full["nll"] - drop, rel=1e-5)


@pytest.mark.parametrize("arch", ["width", "cross"])
def test_other_architectures(arch):
    parent = preset("tiny", vocab_size=VOCAB.size, max_positions=32)
    cfg = width_of(parent) if arch == "width" else cross_of(
        parent, 1, image_vocab_start=VOCAB.image_start, image_vocab_end=VOCAB.image_end)
    model = randomize_(build_model(cfg), seed=8, std=0.2)
    seqs = random_docs(5, seed=9)
    r = perplexity(model, seqs, vocab=VOCAB, batch_size=3)
    nll, count, _ = reference_nll(model, seqs, max_len=32)
    assert r["nll"] == pytest.approx(nll, rel=1e-5) and r["tokens"] == count


def test_bad_inputs():
    model = tiny_model()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        perplexity(model, [np.array([5, VOCAB.size])], vocab=VOCAB)
    with pytest.raises(ValueError, match="max_positions"):
        perplexity(model, [np.array([5, 6])], vocab=VOCAB, max_len=64)
    with pytest.raises(ValueError, match="pad id"):
        perplexity(model, [np.array([5, VOCAB.pad, 6])], vocab=VOCAB)


# ---- CLI ------------------------------------------------------------------------------------
BYTES_VOCAB = VocabManifest(text_size=256, image_codes=16, image_tokens_per_image=4, image_grid=(2, 2),
                            num_sentinels=2, text_tokenizer="bytes")


@pytest.fixture()
def ckpt(tmp_path):
    model = randomize_(build_model(preset("tiny", vocab_size=BYTES_VOCAB.size, max_positions=48)), seed=11)
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, vocab=BYTES_VOCAB)
    return path, model


def _write_jsonl(path, docs):
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def test_checkpoint_round_trip(ckpt):
    path, model = ckpt
    loaded, cfg, vocab = load_model(path)
    assert vocab == BYTES_VOCAB and cfg == model.cfg
    x = torch.tensor([[2, 70, 80, 90]])
    torch.testing.assert_close(loaded(x), model(x))


def test_cli_ppl_jsonl_and_binarized(ckpt, tmp_path, capsys):
    from jam_metaseq.data.binarize import binarize
    from jam_metaseq.data.tokenizers import ByteTokenizer
    from jam_metaseq.eval.cli import main

    path, model = ckpt
    caption_docs = [[{"text": f"a red square number {i}"}, {"image_tokens": [i % 16, 3, 5, 7]}] for i in range(4)]
    text_docs = [[{"text": "some wikipedia text that is longer than the forty-eight token context of this model"}],
                 [{"text": "short"}]]
    cap = _write_jsonl(tmp_path / "coco.jsonl", caption_docs)
    wiki = _write_jsonl(tmp_path / "wiki.jsonl", text_docs)
    binarize(cap, out_prefix=tmp_path / "bin" / "coco", vocab=BYTES_VOCAB, text_tokenizer=ByteTokenizer(),
             block_size=64, progress=False)
    out = tmp_path / "res.json"
    rc = main(["ppl", "--checkpoint", str(path), "--data", str(cap), str(tmp_path / "bin" / "coco"),
               "--kind", "caption", "--batch-size", "3", "--output", str(out), "--no-progress"])
    assert rc == 0
    assert torch.is_grad_enabled()  # the CLI does not switch autograd off for its caller's process
    res = json.loads(out.read_text())
    a, b = res[str(cap)], res[str(tmp_path / "bin" / "coco")]
    assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-9) and a["tokens"] == b["tokens"]
    tok = ByteTokenizer()
    seqs = [np.array([*(np.array(tok.encode(d[0]["text"])) + 4), BYTES_VOCAB.break_id,
                      *(np.array(d[1]["image_tokens"]) + BYTES_VOCAB.image_start), BYTES_VOCAB.break_id,
                      BYTES_VOCAB.eos]) for d in caption_docs]
    nll, count = 0.0, 0
    with torch.no_grad():
        for s in seqs:  # each document alone from position 0: its first token is context
            x = torch.tensor(s.tolist())
            nll += float(F.cross_entropy(model(x[None, :-1])[0], x[1:], reduction="sum"))
            count += len(s) - 1
    assert a["tokens"] == count and a["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert a["image"]["tokens"] == 4 * 4 and a["text"]["tokens"] == sum(len(d[0]["text"]) - 1 for d in caption_docs)
    printed = capsys.readouterr().out
    assert "coco.jsonl" in printed and f"{a['ppl']:.3f}" in printed

    # text data longer than the context is scored in windows
    assert main(["ppl", "--checkpoint", str(path), "--data", str(wiki), "--kind", "text", "--no-progress",
                 "--output", str(out)]) == 0
    r = json.loads(out.read_text())[str(wiki)]
    assert r["windows"] > r["sequences"] and r["image"]["tokens"] == 0

    # wrong kind: one-line error, exit status 2
    assert main(["ppl", "--checkpoint", str(path), "--data", str(cap), "--kind", "text", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "document 0 holds image tokens" in err and len(err.strip().splitlines()) == 1
    assert main(["ppl", "--checkpoint", str(tmp_path / "missing.pt"), "--data", str(cap)]) == 2
    assert "missing.pt" in capsys.readouterr().err


def test_cli_ppl_on_jam_ckpt_cross_output(tmp_path, capsys):
    """A JAM-Cross checkpoint written by jam-ckpt at MP=2 evaluates like the same model fused in-process."""
    ck = pytest.importorskip("checkpoints_tools.cli")
    from jam_metaseq.eval.cli import main
    from jam_metaseq.fusion import cross_tensor, state_shapes

    parent = preset("tiny", vocab_size=BYTES_VOCAB.size, max_positions=48)
    parents = {}
    for i, name in enumerate(("llm", "img")):
        m = randomize_(build_model(parent), seed=20 + i, std=0.2)
        save_checkpoint(tmp_path / f"{name}.pt", m, vocab=BYTES_VOCAB)
        parents[name] = m.state_dict()
    BYTES_VOCAB.save(tmp_path / "vocab.json")
    out = tmp_path / "cross"
    assert ck.main(["cross", "--llm", str(tmp_path / "llm.pt"), "--img", str(tmp_path / "img.pt"),
                    "--cross-every", "1", "--vocab", str(tmp_path / "vocab.json"), "--mp", "2", "--seed", "3",
                    "-o", str(out)]) == 0
    capsys.readouterr()
    cfg = cross_of(parent, 1, image_vocab_start=BYTES_VOCAB.image_start, image_vocab_end=BYTES_VOCAB.image_end)
    fused = build_model(cfg)
    fused.load_state_dict({k: cross_tensor(k, cfg=cfg, llm=parents["llm"].__getitem__,
                                           img=parents["img"].__getitem__, seed=3) for k in state_shapes(cfg)})
    docs = [[{"text": "a red circle"}, {"image_tokens": [1, 2, 3, 4]}], [{"text": "a blue square"}]]
    data = _write_jsonl(tmp_path / "d.jsonl", docs)
    res_path = tmp_path / "r.json"
    assert main(["ppl", "--checkpoint", str(out), "--data", str(data), "--no-progress", "--output", str(res_path)]) == 0
    r = json.loads(res_path.read_text())[str(data)]
    assert r["arch"] == "jam_cross"
    from jam_metaseq.data.tokenizers import ByteTokenizer
    from jam_metaseq.eval.io import read_sequences

    seqs, _ = read_sequences(data, vocab=BYTES_VOCAB, text_tokenizer=ByteTokenizer())
    expect = perplexity(fused.eval(), seqs, vocab=BYTES_VOCAB)
    assert r["ppl"] == pytest.approx(expect["ppl"], rel=1e-5)


# ---- the evaluation context is the training context ---------------------------------------------
@pytest.mark.parametrize("break_mode", ["complete", "eos"])
def test_a_document_is_scored_in_the_context_training_gives_it(tmp_path, break_mode):
    """The evaluation rule (eval.context) against the real training task: documents binarized as
    jam run binarizes them (blocks of T + 1 tokens), the task's training items (CM3Items, the code
    both hosts train on, with no span drawn) and their batch (collate). Every document that starts
    a block (with break_mode eos: every document) is scored on exactly its training row: the same
    tokens before every target, the same targets, each counted by training. Putting anything
    before a document (an <eos>, as jam-eval once did) or dropping its first token breaks this."""
    from jam_metaseq.data.binarize import binarize, open_dataset
    from jam_metaseq.task.items import CM3Items, TaskOptions, collate
    from jam_metaseq.data.tokenizers import ByteTokenizer
    from jam_metaseq.objectives.cm3 import CM3Config

    T = 40
    rng = np.random.default_rng(0)
    docs = []
    for i in range(12):
        words = " ".join(["red", "square", "on", "grey", "picture", "of", "a"][j] for j in rng.integers(0, 7, 1 + i % 4))
        docs.append([{"text": words}] + ([{"image_tokens": [int(c) for c in rng.integers(0, 16, 4)]}] if i % 3 else []))
    jsonl = _write_jsonl(tmp_path / "docs.jsonl", docs)
    prefix = tmp_path / "data" / "train" / "mix"
    binarize(jsonl, out_prefix=prefix, vocab=BYTES_VOCAB, text_tokenizer=ByteTokenizer(), block_size=T + 1,
             break_mode=break_mode, progress=False)
    ds = open_dataset(prefix)
    opts = TaskOptions(data=str(tmp_path / "data"), tokens_per_sample=T, seed=3,
                       cm3=CM3Config(mode="fixed", min_spans=0, max_spans=0, num_spans=0))
    items = CM3Items({"mix": ds}, vocab=BYTES_VOCAB, opts=opts, train=True, epoch=1)
    batch = collate([items[i] for i in range(len(items))], pad=BYTES_VOCAB.pad)
    src, tgt, w = batch["net_input"]["src_tokens"], batch["target"], batch["loss_weights"]
    blocks = [ds[b]["tokens"].tolist() for b in range(len(ds))]
    assert max(len(b) for b in blocks) <= T + 1 and (break_mode == "eos") == (len(blocks) == len(docs))
    checked = set()
    for r in range(src.shape[0]):
        n = int(batch["net_input"]["src_lengths"][r])
        row_in, row_tgt = src[r, :n].tolist(), tgt[r, :n].tolist()
        b = blocks.index(row_in + row_tgt[-1:])  # the block this training row was made of
        doc = blocks[b][: blocks[b].index(BYTES_VOCAB.eos) + 1]  # the document that starts it
        (win,) = document_windows(doc, max_len=T)
        k = len(win.targets)
        assert win.inputs == row_in[:k] and win.targets == row_tgt[:k]
        assert bool((w[r, :k] == 1).all())  # training counts every target the evaluation scores
        checked.add(b)
    assert checked == set(range(len(blocks)))  # one epoch: every block, so every block-starting document
