"""Vocabulary transplant, measured (issue 24 item 3): a tiny LM trained here with tokenizer A,
transplanted to tokenizer B (both trained on the fly on the same corpus), scored on held-out text in
bits per byte under both.

    python benchmarks/bench_transplant.py [--corpus stdlib|quickstart] [--steps 800] [--json OUT]

Rows: the original model under A; the transplanted model under B by each rule
(``jam_metaseq.vocab_transplant.RULES``); two controls under B: ``random composed`` (copied rows
kept, every other text row random: isolates the rule) and ``random text rows`` (every text row
random: no transplant at all); with ``--native``, a model trained from scratch with B for the same
steps. Random rows are drawn from a diagonal Gaussian fitted to the old text rows (their scale).
``gap closed`` = (control - row) / (control - original) against ``random composed``: 1 = as good
as the original, 0 = no better than random rows where the rule acts. Copied share = text ids of B
whose string A has; composed tokens = the share of B's held-out tokens whose rows were composed.

Corpora (nothing downloaded): ``stdlib`` = the docstrings of the Python standard library that runs
this script (real English prose and code words, deterministic per Python version), ``quickstart`` =
``jam_metaseq.quickstart_data.text_documents`` (templated sentences). A = byte-level BPE
(``tokenizers``), B = sentencepiece BPE: different algorithms, so many ids differ.
``tests/test_vocab_transplant.py`` runs this with tiny settings.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from jam_metaseq.data.tokenizers import load_text_tokenizer, train_bpe, train_sentencepiece  # noqa: E402
from jam_metaseq.eval.ppl import bits_per_byte  # noqa: E402
from jam_metaseq.models import build_model, keys, preset  # noqa: E402
from jam_metaseq.vocab import VocabManifest  # noqa: E402
from jam_metaseq.vocab_transplant import (  # noqa: E402
    DEFAULT_RULE, RULES, plan_rows, plan_text, transplant_record, transplant_state_dict, transplanted_vocab,
)


def stdlib_texts(limit_bytes: int) -> list[str]:
    """Docstrings of the standard library's modules, classes and functions (files in sorted order),
    each with its whitespace collapsed, up to ``limit_bytes`` in all."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                text = " ".join(doc.split()) if doc else ""
                if len(text) >= 40:
                    out.append(text)
                    total += len(text.encode("utf-8"))
                    if total >= limit_bytes:
                        return out
    return out


def quickstart_texts(n: int, *, seed: int) -> list[str]:
    from jam_metaseq.quickstart_data import text_documents

    return [" ".join(s["text"] for s in d["segments"]) for d in text_documents(n, seed=seed)]


def manifest_for(tok) -> VocabManifest:
    """A text-only layout: the four specials, the tokenizer's ids, one sentinel, no image codes."""
    return VocabManifest(text_size=tok.vocab_size, image_codes=0, num_sentinels=1, image_tokens_per_image=1,
                         image_grid=(1, 1), text_tokenizer=tok.spec)


def lm_config(args, vocab: VocabManifest):
    return preset(args.family, vocab_size=vocab.size, embed_dim=args.width, ffn_dim=4 * args.width,
                  layers=args.layers, heads=args.heads, kv_heads=None, max_positions=args.block)


def train_lm(texts: list[str], tok, vocab: VocabManifest, args) -> torch.nn.Module:
    """``args.steps`` AdamW steps on random ``args.block``-token windows of the texts as one stream
    of ``<s> text </s>`` documents (seeded: the same run every time)."""
    torch.manual_seed(args.seed)
    stream = torch.tensor([t for x in texts for t in (vocab.bos, *(vocab.text_start + i for i in tok.encode(x)),
                                                      vocab.eos)])
    model = build_model(lm_config(args, vocab)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    g = torch.Generator().manual_seed(args.seed)
    T = args.block
    for _ in range(args.steps):
        start = torch.randint(0, len(stream) - T - 1, (args.batch,), generator=g)
        x = torch.stack([stream[s:s + T] for s in start])
        y = torch.stack([stream[s + 1:s + T + 1] for s in start])
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def score(model, texts, tok, vocab, args) -> float:
    with torch.no_grad():
        return bits_per_byte(model, texts, text_tokenizer=tok, vocab=vocab, batch_size=16,
                             max_len=args.block)["bits_per_byte"]


def random_rows(tensor: torch.Tensor, rows: torch.Tensor, vocab: VocabManifest, *, seed: int) -> torch.Tensor:
    """``tensor`` with ``rows`` drawn from a diagonal Gaussian fitted to ``vocab``'s text rows of it."""
    text = tensor[vocab.text_start:vocab.text_end].float()
    g = torch.Generator().manual_seed(seed)
    out = tensor.clone()
    out[rows] = (text.mean(0) + text.std(0) * torch.randn(len(rows), tensor.shape[1], generator=g)).to(tensor.dtype)
    return out


def controls(state: dict, plan, *, seed: int) -> dict[str, dict]:
    """The two random-row controls of a transplanted state dict (same rows of every vocab tensor)."""
    new = plan.new
    composed = (plan.source < 0).nonzero()[:, 0]
    composed = composed[(composed >= new.text_start) & (composed < new.text_end)]
    every = torch.arange(new.text_start, new.text_end)
    out = {}
    for name, rows in (("random composed", composed), ("random text rows", every)):
        out[name] = {k: random_rows(v, rows, new, seed=seed) if keys.rule_for(k) == "vocab" else v
                     for k, v in state.items()}
    return out


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    if args.corpus == "stdlib":
        texts = stdlib_texts(args.corpus_bytes)
    else:
        texts = quickstart_texts(args.docs, seed=args.seed)
    held = texts[::args.held_out_every]
    train = [t for i, t in enumerate(texts) if i % args.held_out_every]
    started = time.time()
    with tempfile.TemporaryDirectory() as d:
        tok_a = load_text_tokenizer(train_bpe(train, out_path=Path(d) / "a.json", vocab_size=args.vocab_a))
        tok_b = load_text_tokenizer(train_sentencepiece(train, out_prefix=Path(d) / "b", vocab_size=args.vocab_b))
        va, vb = manifest_for(tok_a), manifest_for(tok_b)
        model = train_lm(train, tok_a, va, args)
        plan = plan_rows(plan_text(tok_a.token_bytes(), tok_b.token_bytes()), old=va,
                         new=transplanted_vocab(va, text_size=vb.text_size, text_tokenizer=tok_b.spec))
        record = transplant_record(plan, rule="mean")
        held_b = [i for t in held for i in tok_b.encode(t)]
        composed_share = sum(plan.text.source[i] < 0 for i in held_b) / len(held_b)
        rows = {"original (A)": score(model, held, tok_a, va, args)}
        states = {f"{rule} (B)": transplant_state_dict(model.state_dict(), plan, rule=rule) for rule in RULES}
        states.update(controls(states[f"{DEFAULT_RULE} (B)"], plan, seed=args.seed))
        for name, state in states.items():
            m = build_model(lm_config(args, plan.new)).eval()
            m.load_state_dict(state, strict=True)
            rows[name] = score(m, held, tok_b, plan.new, args)
        if args.native:
            rows["native B (trained)"] = score(train_lm(train, tok_b, vb, args), held, tok_b, vb, args)
    base, rand = rows["original (A)"], rows["random composed"]
    return {
        "bits_per_byte": rows,
        "gap_closed": {k: (rand - v) / (rand - base) if rand != base else float("nan") for k, v in rows.items()},
        "transplant": {**{k: record[k] for k in ("text_ids", "copied", "composed", "fallback", "copied_share",
                                                 "mean_pieces")},
                       "held_out_composed_token_share": round(composed_share, 4)},
        "corpus": {"name": args.corpus, "train_texts": len(train), "held_out_texts": len(held),
                   "held_out_bytes": sum(len(t.encode()) for t in held)},
        "tokenizers": {"A": f"byte-level BPE, {tok_a.vocab_size} ids", "B": f"sentencepiece BPE, {tok_b.vocab_size} ids"},
        "model": {"family": args.family, "width": args.width, "layers": args.layers, "steps": args.steps,
                  "block": args.block, "batch": args.batch},
        "seconds": round(time.time() - started, 1),
    }


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", choices=("stdlib", "quickstart"), default="stdlib")
    ap.add_argument("--corpus-bytes", type=int, default=600_000, help="stdlib: bytes of docstrings read")
    ap.add_argument("--docs", type=int, default=400, help="quickstart: documents generated")
    ap.add_argument("--held-out-every", type=int, default=10, help="every k-th text is held out")
    ap.add_argument("--vocab-a", type=int, default=1000, help="ids of tokenizer A (byte-level BPE)")
    ap.add_argument("--vocab-b", type=int, default=1000, help="ids of tokenizer B (sentencepiece BPE)")
    ap.add_argument("--family", default="llama_tiny", help="preset of the LM (untied: both tensors transplanted)")
    ap.add_argument("--width", type=int, default=96)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--block", type=int, default=96, help="training window and scoring length")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--native", action="store_true", help="also train a model with B from scratch")
    ap.add_argument("--json", type=Path, help="write the results as JSON here")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    res = run(args)
    base = res["bits_per_byte"]["original (A)"]
    print(f"corpus {res['corpus']}; A: {res['tokenizers']['A']}, B: {res['tokenizers']['B']}; "
          f"model {res['model']}")
    t = res["transplant"]
    print(f"transplant A -> B: {t['copied']} of {t['text_ids']} ids copied ({100 * t['copied_share']:.1f}%), "
          f"{t['composed']} composed (mean {t['mean_pieces']} pieces), {t['fallback']} fallback; "
          f"{100 * t['held_out_composed_token_share']:.1f}% of B's held-out tokens composed")
    print(f"{'model':<22} {'bits/byte':>10} {'vs original':>12} {'gap closed':>11}")
    for k, v in res["bits_per_byte"].items():
        print(f"{k:<22} {v:>10.4f} {v / base:>11.3f}x {res['gap_closed'][k]:>11.3f}")
    print(f"({res['seconds']} s)")
    if args.json:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(res, indent=2) + "\n")
        os.replace(tmp, args.json)
    return 0 if all(math.isfinite(v) for v in res["bits_per_byte"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
