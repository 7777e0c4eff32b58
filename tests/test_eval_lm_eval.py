"""The lm-evaluation-harness adapter ``jam`` and the local Table 1 tasks (issue 9 item 1; paper
Table 1): log-likelihoods against an independent computation, a tiny model trained to prefer the
right answers scores ~100% through ``jam-eval lm-eval``, a random model scores at chance within a
binomial tolerance, and the six local task definitions build lm_eval's requests."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from jam_metaseq.data.tokenizers import ByteTokenizer  # noqa: E402
from jam_metaseq.eval.io import save_checkpoint  # noqa: E402
from jam_metaseq.eval.lm_eval_adapter import JamLM  # noqa: E402
from jam_metaseq.eval.ppl import perplexity  # noqa: E402
from jam_metaseq.eval.zeroshot import run_zeroshot  # noqa: E402
from jam_metaseq.models import build_model, preset  # noqa: E402
from jam_metaseq.vocab import VocabManifest  # noqa: E402

torch.set_num_threads(1)

VOCAB = VocabManifest(text_size=256, image_codes=16, image_tokens_per_image=4, image_grid=(2, 2),
                      num_sentinels=2, text_tokenizer="bytes")
LETTERS = "abcdefgh"
TOK = ByteTokenizer()


def enc(s: str) -> list[int]:
    return [t + VOCAB.text_start for t in TOK.encode(s)]


def random_model(*, seed: int, max_positions: int = 32, std: float = 0.3) -> torch.nn.Module:
    model = build_model(preset("tiny", vocab_size=VOCAB.size, max_positions=max_positions))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(1.0 + noise if ("layer_norm" in name and name.endswith("weight")) else noise)
    return model.eval()


@pytest.fixture(scope="module")
def copy_model() -> torch.nn.Module:
    """A tiny model trained (300 steps, ~4 s) on 'k: kkk' documents: the answer repeats the context letter.

    What this training reliably reaches (seeds 0-9, one thread, documents starting at position 0 as
    the training task presents them; with the earlier <eos>-first documents the emulated CPUs of
    docs/TESTING.md reached >= 4.5 where one thread reached 5.6): every right answer beats every
    wrong one by >= 6.4 nats and is the greedy continuation, ' ccc' beats ' ddd' by >= 6.7; the
    tests ask for 3 nats and every item right."""
    torch.manual_seed(0)
    model = build_model(preset("tiny", vocab_size=VOCAB.size, max_positions=32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(0)
    for _ in range(300):
        batch = []
        for _ in range(32):
            k = rng.choice(LETTERS)
            batch.append([*enc(f"{k}: {k * 3}"), VOCAB.eos])  # a document starting a block (eval.context)
        x = torch.tensor(batch)
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def copy_items(n: int, *, seed: int, num_choices: int = 4) -> list[dict]:
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        k = rng.choice(LETTERS)
        opts = rng.sample([c for c in LETTERS if c != k], num_choices - 1) + [k]
        rng.shuffle(opts)
        items.append({"context": f"{k}:", "choices": [o * 3 for o in opts], "label": opts.index(k)})
    return items


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_registered_as_jam():
    from lm_eval.api.registry import get_model

    assert get_model("jam") is JamLM


def test_loglikelihood_matches_independent_computation():
    model = random_model(seed=1)
    lm = JamLM(model=model, manifest=VOCAB, text_tokenizer=TOK, batch_size=3)
    pairs = [("Question: why?\nAnswer:", " because"), ("a", " b"), ("", "hello"),
             ("long context " * 4, " end"), ("x y", " z w v")]
    res = lm.loglikelihood([Instance("loglikelihood", {}, p, 0) for p in pairs], disable_tqdm=True)
    with torch.no_grad():
        for (ctx, cont), (lp, greedy) in zip(pairs, res):
            stripped = ctx.rstrip()  # lm_eval moves a context's trailing spaces into the continuation
            ctx, cont = stripped, ctx[len(stripped):] + cont
            ctx_ids = enc(ctx)  # nothing before the context: the evaluation rule (eval.context)
            cont_ids = enc(cont)
            scored = cont_ids if ctx_ids else cont_ids[1:]  # no context: the first token is the context
            whole = (ctx_ids + cont_ids)[-33:]  # max_length 32 (+1 for the shift)
            logits = model(torch.tensor(whole[:-1])[None])[0]  # alone: no padding
            logp = F.log_softmax(logits.double(), -1)[-len(scored):]
            tgt = torch.tensor(scored)
            assert lp == pytest.approx(float(logp.gather(1, tgt[:, None]).sum()), rel=1e-5, abs=1e-5)
            assert greedy == bool((logits[-len(scored):].argmax(-1) == tgt).all())


def test_greedy_flag_on_trained_model(copy_model):
    lm = JamLM(model=copy_model, manifest=VOCAB, text_tokenizer=TOK)
    res = lm.loglikelihood([Instance("loglikelihood", {}, ("c:", " ccc"), 0),
                            Instance("loglikelihood", {}, ("c:", " ddd"), 0)], disable_tqdm=True)
    assert res[0][1] is True and res[1][1] is False
    assert res[0][0] > res[1][0] + 3.0


def test_loglikelihood_rolling_is_perplexity_nll():
    model = random_model(seed=2, max_positions=16)
    lm = JamLM(model=model, manifest=VOCAB, text_tokenizer=TOK, batch_size=2)
    texts = ["short text", "a string longer than sixteen bytes, scored in windows"]
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), 0) for t in texts],
                                   disable_tqdm=True)
    for t, lp in zip(texts, got):
        r = perplexity(model, [np.array(enc(t))], vocab=VOCAB, max_len=16)
        assert lp == pytest.approx(-r["nll"], rel=1e-6)
        assert r["tokens"] == len(t) - 1  # every byte but the first


def test_generate_until_not_provided():
    lm = JamLM(model=random_model(seed=3), manifest=VOCAB, text_tokenizer=TOK)
    with pytest.raises(NotImplementedError, match="jam-generate"):
        lm.generate_until([])


def test_trained_model_prefers_right_answers_through_cli(copy_model, tmp_path, capsys):
    from jam_metaseq.eval.cli import main

    ckpt = tmp_path / "copy.pt"
    save_checkpoint(ckpt, copy_model, vocab=VOCAB)  # manifest names the 'bytes' tokenizer
    data = write_jsonl(tmp_path / "copy.jsonl", copy_items(40, seed=5))
    out = tmp_path / "res.json"
    rc = main(["lm-eval", "--model-args", f"checkpoint={ckpt}", "--tasks", "copy_mc",
               "--mc-task", f"copy_mc={data}", "--cache-dir", str(tmp_path / "hf"), "--output", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["jam_summary"]["copy_mc"]["n"] == 40
    assert res["jam_summary"]["copy_mc"]["acc"] >= 0.95  # chance is 0.25
    assert "copy_mc" in capsys.readouterr().out


def test_random_model_scores_at_chance(tmp_path):
    n = 200
    rng = random.Random(7)
    rows = [{"context": f"item {i}:", "choices": ["".join(rng.choice(LETTERS) for _ in range(3)) for _ in range(2)],
             "label": rng.randrange(2)} for i in range(n)]
    data = write_jsonl(tmp_path / "rand.jsonl", rows)
    lm = JamLM(model=random_model(seed=4), manifest=VOCAB, text_tokenizer=TOK, batch_size=16)
    res = run_zeroshot(tasks=["rand_mc"], model=lm, mc_tasks={"rand_mc": data}, cache_dir=tmp_path / "hf")
    acc = res["jam_summary"]["rand_mc"]["acc"]
    sigma = math.sqrt(0.25 / n)
    assert abs(acc - 0.5) < 3.5 * sigma, acc  # labels are independent of the model: Binomial(n, 1/2) / n


def table1_files(d) -> None:
    write_jsonl(d / "piqa.jsonl", [{"goal": f"open jar {i}", "sol1": "twist lid", "sol2": "hit it", "label": i % 2}
                                   for i in range(3)])
    arc = [{"question": "Which is a gas?", "choices": {"text": ["rock", "steam", "ice"], "label": ["A", "B", "C"]},
            "answerKey": "B"}] * 2
    write_jsonl(d / "arc_easy.jsonl", arc)
    write_jsonl(d / "arc_challenge.jsonl", arc)
    write_jsonl(d / "storycloze.jsonl", [{**{f"input_sentence_{k}": f"S{k}." for k in range(1, 5)},
                                          "sentence_quiz1": "Good end.", "sentence_quiz2": "Bad end.",
                                          "answer_right_ending": 1}] * 2)
    wsc = "The city refused the women a permit because they feared violence."
    write_jsonl(d / "winograd.jsonl", [{"text": wsc, "pronoun": "they", "pronoun_loc": wsc.index("they"),
                                        "options": ["The city councilmen", "The demonstrators"], "label": 0}] * 2)
    write_jsonl(d / "winogrande.jsonl", [{"sentence": "Sarah was a better nurse than Maria because _ was careful.",
                                          "option1": "Sarah", "option2": "Maria", "answer": "1"}] * 2)


def test_table1_local_tasks_build_lm_eval_requests(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    table1_files(d)
    lm = JamLM(model=random_model(seed=5, max_positions=128), manifest=VOCAB, text_tokenizer=TOK)
    res = run_zeroshot(tasks=["jam_table1"], model=lm, data_dir=d, cache_dir=tmp_path / "hf", log_samples=True)
    summary = res["jam_summary"]
    assert set(summary) == {"piqa_local", "arc_easy_local", "arc_challenge_local", "storycloze_local",
                            "winograd_local", "winogrande_local"}
    assert summary["piqa_local"]["n"] == 3 and "acc_norm" in summary["arc_easy_local"]
    s = {t: v[0] for t, v in res["samples"].items()}
    assert s["piqa_local"]["arguments"] == [("Question: open jar 0\nAnswer:", " twist lid"),
                                            ("Question: open jar 0\nAnswer:", " hit it")]
    assert s["arc_easy_local"]["target"] == 1
    assert s["storycloze_local"]["arguments"][1] == ("S1. S2. S3. S4.", " Bad end.")
    # partial scoring: the options end the contexts, the rest of the sentence is the continuation
    assert s["winogrande_local"]["arguments"] == [
        ("Sarah was a better nurse than Maria because Sarah", " was careful."),
        ("Sarah was a better nurse than Maria because Maria", " was careful.")]
    ctxs = [a[0] for a in s["winograd_local"]["arguments"]]
    assert ctxs == ["The city refused the women a permit because the city councilmen",
                    "The city refused the women a permit because the demonstrators"]  # lower-cased mid-sentence
    # accuracy is what the model's log-likelihoods say
    for task, sample in s.items():
        lls = [r[0] for r in sample["filtered_resps"]]
        target = sample["target"] if isinstance(sample["target"], int) else 0
        if task == "winograd_local" or task == "winogrande_local":
            target = 0  # label 0 / answer "1"
        assert sample["acc"] == float(int(np.argmax(lls)) == target)


def test_cli_errors(tmp_path, capsys):
    from jam_metaseq.eval.cli import main

    model = random_model(seed=6)
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, model, vocab=VOCAB)
    rc = main(["lm-eval", "--model-args", f"checkpoint={ckpt}", "--tasks", "piqa_local", "--data-dir", str(tmp_path)])
    assert rc == 2 and "piqa.jsonl" in capsys.readouterr().err
    rc = main(["lm-eval", "--model-args", f"checkpoint={ckpt},bogus=1", "--tasks", "x", "--mc-task", "x=nofile"])
    assert rc == 2 and "bogus" in capsys.readouterr().err


def test_cli_tasks_writes_include_path(tmp_path, capsys):
    from lm_eval.tasks import TaskManager

    from jam_metaseq.eval.cli import main

    d = tmp_path / "data"
    d.mkdir()
    table1_files(d)
    (d / "arc_challenge.jsonl").unlink()
    out = tmp_path / "tasks"
    assert main(["tasks", "--data-dir", str(d), "--out", str(out)]) == 0
    names = capsys.readouterr().out.split()
    assert names == ["piqa_local", "arc_easy_local", "storycloze_local", "winograd_local", "winogrande_local"]
    assert (out / "jam_task_utils.py").is_file()
    manager = TaskManager(include_path=str(out), include_defaults=False)
    assert set(names) <= set(manager.all_tasks)
    assert main(["tasks", "--data-dir", str(tmp_path / "none"), "--out", str(out)]) == 2


@pytest.mark.slow
def test_lm_eval_own_cli_with_jam_registered(copy_model, tmp_path):
    """``python -m jam_metaseq.eval.lm_eval_adapter`` is lm_eval's CLI with ``--model jam`` available."""
    import os
    import subprocess
    import sys

    ckpt = tmp_path / "copy.pt"
    save_checkpoint(ckpt, copy_model, vocab=VOCAB)
    data = write_jsonl(tmp_path / "copy.jsonl", copy_items(12, seed=8))
    from jam_metaseq.eval.tasks import write_task_configs

    write_task_configs(out_dir=tmp_path / "tasks", mc_tasks={"copy_mc": data}, cache_dir=tmp_path / "hf")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "jam_metaseq.eval.lm_eval_adapter", "--model", "jam", "--model_args",
         f"checkpoint={ckpt}", "--tasks", "copy_mc", "--include_path", str(tmp_path / "tasks"),
         "--device", "cpu", "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=1800)  # a hang guard: lm_eval is slow on a busy machine
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = sorted((tmp_path / "out").rglob("results*.json"))
    assert files, proc.stdout[-2000:]
    res = json.loads(files[-1].read_text())["results"]["copy_mc"]
    assert res["acc,none"] >= 0.9
