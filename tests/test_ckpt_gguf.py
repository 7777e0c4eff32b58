"""GGUF in (issue 28): ``checkpoints_tools/readers/gguf.py`` and ``io/gguf.py`` on tiny llama files
written here the way llama.cpp writes them (``_gguf_util``: the ``gguf`` package's own writer and
name map, llama.cpp's q/k row permutation written from its definition).

For every type read (F32, F16, BF16, Q8_0, Q4_0, Q4_1) our weights equal the written values as
transformers' own torch code dequantizes them, and our logits equal HF ``LlamaForCausalLM``'s on
those weights (fp32 round-off); untied heads and biases too. Negative control: with the q/k row
order not undone the logits differ. Refused by name: other types, other architectures, what our
decoder does not compute. Hostile files (every prefix of a real one, counts, lengths, offsets and
dims that lie) stop with one line naming the file. ``jam-ckpt inspect / convert / reshard``.
"""

from __future__ import annotations

import copy
import json
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _gguf_util import KV_HEADS, HEADS, V, RawGGUF, hf_llama, llamacpp_permute, quantized_values, write_llama_gguf
from checkpoints_tools import cli as ckpt_cli
from checkpoints_tools.load import load_model, verify_checkpoint
from checkpoints_tools.readers import gguf as gguf_reader
from checkpoints_tools.readers import open_checkpoint
from checkpoints_tools.safe_load import CheckpointError
from jam_metaseq.models import hf_families
from jam_metaseq.models.rotary import half_split_to_interleaved, interleaved_to_half_split

gguf = pytest.importorskip("gguf")  # a CORE dependency: present wherever the package is installed
transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)
ATOL = 1e-5
TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")


@pytest.fixture(scope="module")
def hf():
    return hf_llama(seed=0)


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, V, (2, 12), generator=torch.Generator().manual_seed(seed))  # 0 is the padding id


def _logits(model, tokens):
    with torch.no_grad():
        out = model(tokens)
    return out[0] if isinstance(out, tuple) else out


def _reference(hf, qtype: str):
    """``hf`` with every matrix replaced by its ``qtype`` round trip (norms are stored F32)."""
    ref = copy.deepcopy(hf)
    with torch.no_grad():
        for _, p in ref.named_parameters():
            if p.ndim == 2:
                p.copy_(torch.from_numpy(quantized_values(p.numpy(), qtype)))
    return ref


# ---- weights and logits ------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", TYPES)
def test_each_type_reads_as_transformers_dequantizes_it(tmp_path, hf, qtype):
    path = write_llama_gguf(tmp_path / f"tiny-{qtype}.gguf", hf, qtype=qtype)
    model, cfg, vocab = load_model(path)
    ref = _reference(hf, qtype)
    ours = hf_families.to_hf_state(model.state_dict(), cfg)
    want = {k: v for k, v in ref.state_dict().items() if k != "lm_head.weight"}  # tied: the embedding
    assert set(ours) == set(want)
    for k, v in want.items():
        torch.testing.assert_close(ours[k], v, atol=0, rtol=0, msg=f"{qtype} {k}")
    tokens = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(_logits(model, tokens), ref(input_ids=tokens).logits, atol=ATOL, rtol=0)
    assert vocab is None and cfg.padding_idx == 0 and cfg.tie_embeddings


def test_untied_head_and_biases(tmp_path):
    hf = hf_llama(seed=1, tie_word_embeddings=False, attention_bias=True, mlp_bias=True)
    model, cfg, _ = load_model(write_llama_gguf(tmp_path / "biased.gguf", hf))
    assert not cfg.tie_embeddings and cfg.bias
    ours = hf_families.to_hf_state(model.state_dict(), cfg)
    for k, v in hf.state_dict().items():
        assert torch.equal(ours[k], v), k  # F32: bit for bit, q/k biases back in order too
    tokens = _tokens(1)
    with torch.no_grad():
        torch.testing.assert_close(_logits(model, tokens), hf(input_ids=tokens).logits, atol=ATOL, rtol=0)


def test_negative_control_rotary_order_not_undone(tmp_path, hf, monkeypatch):
    path = write_llama_gguf(tmp_path / "tiny.gguf", hf)
    monkeypatch.setattr(gguf_reader, "interleaved_to_half_split", lambda rows, heads: rows)
    model, _, _ = load_model(path)
    tokens = _tokens()
    with torch.no_grad():
        diff = (_logits(model, tokens) - hf(input_ids=tokens).logits).abs().max()
    assert diff > 100 * ATOL


# ---- the maps ------------------------------------------------------------------------------------------
def test_key_map_is_the_gguf_packages():
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 3)
    for g, h in gguf_reader.KEY_MAP.items():
        base, suffix = h.format(2).rsplit(".", 1)
        assert f"{names.get_name(base)}.{suffix}" == g.format(2), h


def test_rotary_rows_hand_case_and_llamacpp():
    # one head of width 4: half-split pairs (0, 2), (1, 3) -> interleaved pairs (0, 1), (2, 3)
    half = torch.tensor([[10.0], [11.0], [20.0], [21.0]])
    inter = torch.tensor([[10.0], [20.0], [11.0], [21.0]])
    assert torch.equal(half_split_to_interleaved(half, heads=1), inter)
    assert torch.equal(interleaved_to_half_split(inter, heads=1), half)
    w = torch.randn(HEADS * 8, 5)
    assert torch.equal(half_split_to_interleaved(w, heads=HEADS), torch.from_numpy(llamacpp_permute(w.numpy(), HEADS)))
    with pytest.raises(ValueError, match="even width"):
        interleaved_to_half_split(torch.zeros(6, 2), heads=2)


@settings(max_examples=30, deadline=None)
@given(heads=st.integers(1, 4), half=st.integers(1, 4), cols=st.integers(0, 3))
def test_rotary_rows_round_trip(heads, half, cols):
    shape = (heads * 2 * half, cols) if cols else (heads * 2 * half,)
    w = torch.randn(shape)
    assert torch.equal(interleaved_to_half_split(half_split_to_interleaved(w, heads=heads), heads=heads), w)


# ---- refused by name -----------------------------------------------------------------------------------
REFUSED = {
    "Q5_K": (dict(drop=["token_embd.weight"], extra={"token_embd.weight": (np.zeros((V, 256)), "Q5_K")}),
             "token_embd.weight is Q5_K; the types read are F32, F16, BF16, Q8_0, Q4_0, Q4_1"),
    "architecture": (dict(arch="qwen2"), "general.architecture 'qwen2' is not supported"),
    "experts": (dict(meta={"llama.expert_count": 8}), "llama.expert_count=8: mixture-of-experts"),
    "rope-scaling": (dict(meta={"llama.rope.scaling.type": "yarn"}), "llama.rope.scaling.type='yarn'"),
    "rope-freqs": (dict(extra={"rope_freqs.weight": (np.ones(4), "F32")}), "tensor rope_freqs.weight (per-frequency"),
    "partial-rotary": (dict(meta={"llama.rope.dimension_count": 4}), "llama.rope.dimension_count=4 differs"),
    "unknown-tensor": (dict(extra={"blk.0.attn_sinks.weight": (np.ones(4), "F32")}),
                       "tensor blk.0.attn_sinks.weight is not a tensor of a llama model"),
    "blocks": (dict(meta={"llama.block_count": 10 ** 9}), "llama.block_count=1000000000 but the file holds"),
    "heads": (dict(meta={"llama.attention.head_count": 0}), "llama.attention.head_count=0 is not a positive integer"),
    "width": (dict(meta={"llama.embedding_length": 48, "llama.rope.dimension_count": 12}),
              "tensor token_embd.weight has shape [96, 32] but"),
    "missing": (dict(drop=["blk.1.ffn_up.weight"]), "lacks 1 tensor(s) of the model"),
    "no-padding-id": (dict(meta={"tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.padding_token_id": 0}),
                      "no id to mask as padding"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_by_name(tmp_path, hf, case):
    kw, message = REFUSED[case]
    path = write_llama_gguf(tmp_path / f"{case}.gguf", hf, **kw)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(path)
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


# ---- hostile files -------------------------------------------------------------------------------------
def _raw_ok() -> RawGGUF:
    return RawGGUF().add_str("general.architecture", "llama")


def _f32(rows: int, cols: int) -> bytes:
    return np.zeros((rows, cols), np.float32).tobytes()


def _lie(change) -> RawGGUF:
    r = _raw_ok()
    change(r)
    return r


LIES = {
    "magic": (lambda r: None, "not a GGUF file", lambda b: b"GGML" + b[4:]),
    "version-1": (lambda r: setattr(r, "version", 1), "GGUF version 1 is not supported", None),
    "big-endian": (lambda r: setattr(r, "version", 3 << 24), "a big-endian file?", None),
    "kv-count": (lambda r: setattr(r, "n_kv", 1 << 62), "the metadata count runs past the end", None),
    "tensor-count": (lambda r: setattr(r, "n_tensors", 1 << 60), "the tensor count runs past the end", None),
    "key-length": (lambda r: r.kv.append(RawGGUF.string("x", length=1 << 60)), "metadata entry 1 runs past", None),
    "string-length": (lambda r: r.add_kv("k", 8, RawGGUF.string("v", length=1 << 50)), "metadata key 'k' runs past",
                      None),
    "array-count": (lambda r: r.add_kv("a", 9, struct.pack("<IQ", 0, 1 << 40)), "metadata key 'a' runs past", None),
    "value-type": (lambda r: r.add_kv("t", 99, b""), "metadata key 't': unknown value type 99", None),
    "duplicate-key": (lambda r: r.add_str("general.architecture", "llama"), "'general.architecture': appears twice",
                      None),
    "alignment": (lambda r: r.add_u32("general.alignment", 3), "general.alignment 3 is not a power of two", None),
    "n-dims": (lambda r: r.add_tensor("w", [2, 2, 2, 2, 2], 0, 0), "tensor 'w': has 5 dims", None),
    "absurd-dims": (lambda r: r.add_tensor("w", [1 << 40, 1 << 40], 0, 0), "needs bytes", None),
    "zero-dim": (lambda r: r.add_tensor("w", [0, 4], 0, 0), "tensor 'w' has dims [0, 4]", None),
    "ggml-type": (lambda r: r.add_tensor("w", [4], 99, 0), "tensor 'w' has unknown ggml type 99", None),
    "offset": (lambda r: r.add_tensor("w", [4], 0, 1 << 20), "needs bytes", None),
    "misaligned": (lambda r: (r.add_tensor("w", [4], 0, 4), setattr(r, "data", _f32(2, 4))),
                   "starts at offset 4, not a multiple of the alignment 32", None),
    "overlap": (lambda r: (r.add_tensor("a", [8], 0, 0), r.add_tensor("b", [8], 0, 0), setattr(r, "data", _f32(1, 8))),
                "tensor 'b' overlaps", None),
    "duplicate-tensor": (lambda r: (r.add_tensor("a", [8], 0, 0), r.add_tensor("a", [8], 0, 32),
                                    setattr(r, "data", _f32(2, 16))), "tensor 'a' appears twice", None),
    "q-rows": (lambda r: (r.add_tensor("q", [48], 8, 0), setattr(r, "data", b"\0" * 64)),
               "Q8_0 rows are whole blocks of 32", None),
    "short": (lambda r: None, "too short to be a GGUF file", lambda b: b[:10]),
}


@pytest.mark.parametrize("case", list(LIES))
def test_lying_header(tmp_path, case):
    change, message, edit = LIES[case]
    data = _lie(change).bytes()
    path = tmp_path / f"{case}.gguf"
    path.write_bytes(edit(data) if edit else data)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(path)
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_truncated_files_are_refused_in_one_line(tmp_path, hf):
    whole = write_llama_gguf(tmp_path / "whole.gguf", hf, qtype="Q8_0").read_bytes()
    data_start = open_checkpoint(tmp_path / "whole.gguf").header.data_start  # the whole file reads
    rng = np.random.default_rng(0)  # every cut in the first fields, a sample of the rest
    cuts = sorted({*range(64), *rng.integers(64, data_start, 250).tolist(), *rng.integers(data_start, len(whole), 30)})
    path = tmp_path / "cut.gguf"
    for n in cuts:
        path.write_bytes(whole[:n])
        with pytest.raises(CheckpointError) as e:
            open_checkpoint(path)
        assert "\n" not in str(e.value) and str(path) in str(e.value), n


# ---- jam-ckpt ------------------------------------------------------------------------------------------
def test_jam_ckpt_inspect_convert_reshard(tmp_path, hf, capsys):
    src = write_llama_gguf(tmp_path / "tiny.gguf", hf, qtype="Q8_0")
    assert ckpt_cli.main(["inspect", str(src), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "gguf" and info["config"]["heads"] == HEADS and info["config"]["kv_heads"] == KV_HEADS
    assert ckpt_cli.main(["convert", str(src), "--to", "metaseq", "-o", str(tmp_path / "ms"), "--quiet"]) == 0
    assert ckpt_cli.main(["reshard", str(src), "--mp", "2", "-o", str(tmp_path / "mp2"), "--quiet"]) == 0
    ref, _, _ = load_model(src)
    tokens = _tokens()
    for out in ("ms", "mp2"):
        verify_checkpoint(tmp_path / out)
        model, _, _ = load_model(tmp_path / out)
        assert torch.equal(_logits(model, tokens), _logits(ref, tokens)), out
