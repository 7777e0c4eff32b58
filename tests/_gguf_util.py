"""GGUF files for the tests of ``checkpoints_tools/readers/gguf.py`` (issue 28), written the way
llama.cpp's converter writes them and independently of the reader under test:

- ``write_llama_gguf``: an HF ``LlamaForCausalLM`` as a llama GGUF through the ``gguf`` package's
  own ``GGUFWriter``, tensor names from its ``TensorNameMap``, q/k rows reordered by
  ``llamacpp_permute`` (llama.cpp's ``LlamaModel.permute``, written here from its definition), each
  matrix quantized with ``gguf.quants.quantize`` to the type asked for (norms stay F32, as there);
- ``RawGGUF``: a GGUF byte string built field by field with ``struct``, for files that lie
  (counts, lengths, offsets, dims) or stop short.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

V, E, F, LAYERS, HEADS, KV_HEADS = 96, 32, 64, 2, 4, 2
"""The tiny llama: rows of 32 and 64 elements are whole blocks of every quantized type read."""


def llama_config(**kw: Any):
    import transformers

    base = dict(vocab_size=V, hidden_size=E, intermediate_size=F, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
                rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return transformers.LlamaConfig(**{**base, **kw})


def hf_llama(seed: int = 0, **kw: Any):
    """A random HF ``LlamaForCausalLM`` (SDPA), norm scales near 1."""
    import transformers

    model = transformers.LlamaForCausalLM._from_config(llama_config(**kw), attn_implementation="sdpa")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model.eval()


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter on HF q/k rows: within each head, (2, D/2) -> (D/2, 2)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_type(name: str):
    import gguf

    return gguf.GGMLQuantizationType[name]


def quantized_values(w: np.ndarray, qtype: str) -> np.ndarray:
    """What a reader must give back for ``w`` stored as ``qtype``, dequantized by transformers' own
    torch code for the block types (not the ``gguf`` package's numpy code the reader uses)."""
    import gguf.quants
    from transformers.integrations.gguf.dequant import dequantize

    q = gguf.quants.quantize(w.astype(np.float32), gguf_type(qtype))
    if qtype == "F32":
        return q
    if qtype == "F16":
        return q.astype(np.float32)
    if qtype == "BF16":
        return (q.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    flat = dequantize(torch.from_numpy(np.ascontiguousarray(q)).reshape(-1), int(gguf_type(qtype)))
    return flat.reshape(w.shape).numpy()


def write_llama_gguf(path: Path, model, *, qtype: str = "F32", tokenizer: dict[str, Any] | None = None,
                     meta: dict[str, Any] | None = None, drop: Sequence[str] = (),
                     extra: dict[str, tuple[np.ndarray, str]] | None = None, arch: str = "llama") -> Path:
    """``model`` (HF Llama) as a llama.cpp GGUF: matrices as ``qtype``, norms F32; ``tokenizer``:
    ``{"model", "tokens", "merges", "types", "pre", "bos", "eos", "unk", "pad"}`` metadata; ``meta``: more
    (or overriding) ``llama.*`` keys; ``drop``: GGUF tensor names left out; ``extra``: more tensors
    ``name -> (values, type)``."""
    import gguf
    import gguf.quants

    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    for k, v in (meta or {}).items():
        _add_kv(w, k, v)
    if tokenizer is None:  # SmolLM2's special ids: pads with its eos, so the padding id is unk's
        for k, v in (("bos", 1), ("eos", 2), ("unknown", 0), ("padding", 2)):
            if f"tokenizer.ggml.{k}_token_id" not in (meta or {}):
                w.add_uint32(f"tokenizer.ggml.{k}_token_id", v)
    else:
        w.add_tokenizer_model(tokenizer.get("model", "gpt2"))
        if tokenizer.get("pre"):
            w.add_tokenizer_pre(tokenizer["pre"])
        w.add_token_list(tokenizer["tokens"])
        w.add_token_merges(tokenizer["merges"])
        if "types" in tokenizer:
            w.add_token_types(tokenizer["types"])
        for k in ("bos", "eos", "unk", "pad"):
            if tokenizer.get(k) is not None:
                getattr(w, {"bos": "add_bos_token_id", "eos": "add_eos_token_id", "unk": "add_unk_token_id",
                            "pad": "add_pad_token_id"}[k])(tokenizer[k])
    state = model.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for hf_name, t in state.items():
        base, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        if name in drop:
            continue
        a = t.detach().float().numpy()
        if ".attn_q." in name:
            a = llamacpp_permute(a, cfg.num_attention_heads)
        elif ".attn_k." in name:
            a = llamacpp_permute(a, cfg.num_key_value_heads)
        _add_tensor(w, name, a, "F32" if a.ndim == 1 else qtype)
    for name, (a, t) in (extra or {}).items():
        _add_tensor(w, name, a, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add_kv(w, key: str, v: Any) -> None:
    import gguf

    T = gguf.GGUFValueType
    kind = T.STRING if isinstance(v, str) else T.BOOL if isinstance(v, bool) else \
        T.UINT32 if isinstance(v, int) else T.FLOAT32
    w.add_key_value(key, v, kind)


def _add_tensor(w, name: str, a: np.ndarray, qtype: str) -> None:
    import gguf.quants

    t = gguf_type(qtype)
    try:
        data = gguf.quants.quantize(np.ascontiguousarray(a, dtype=np.float32), t)
    except NotImplementedError:  # a type the package only reads (K-quants): zero blocks of its size
        data = np.zeros(gguf.quants.quant_shape_to_byte_shape(a.shape, t), dtype=np.uint8)
    w.add_tensor(name, data, raw_dtype=None if qtype in ("F32", "F16") else t)


# ---- files built field by field ---------------------------------------------------------------------
class RawGGUF:
    """A GGUF byte string written field by field, so a test can make any field lie."""

    def __init__(self, *, version: int = 3) -> None:
        self.version = version
        self.kv: list[bytes] = []
        self.records: list[bytes] = []
        self.data = b""
        self.n_tensors: int | None = None
        self.n_kv: int | None = None

    @staticmethod
    def string(s: str | bytes, length: int | None = None) -> bytes:
        b = s.encode() if isinstance(s, str) else s
        return struct.pack("<Q", len(b) if length is None else length) + b

    def add_kv(self, key: str, vtype: int, payload: bytes) -> "RawGGUF":
        self.kv.append(self.string(key) + struct.pack("<I", vtype) + payload)
        return self

    def add_str(self, key: str, value: str) -> "RawGGUF":
        return self.add_kv(key, 8, self.string(value))

    def add_u32(self, key: str, value: int) -> "RawGGUF":
        return self.add_kv(key, 4, struct.pack("<I", value))

    def add_tensor(self, name: str, dims: Sequence[int], ggml_type: int, offset: int,
                   n_dims: int | None = None) -> "RawGGUF":
        self.records.append(self.string(name) + struct.pack("<I", len(dims) if n_dims is None else n_dims)
                            + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", ggml_type, offset))
        return self

    def bytes(self) -> bytes:
        head = b"GGUF" + struct.pack("<I", self.version) + struct.pack(
            "<QQ", len(self.records) if self.n_tensors is None else self.n_tensors,
            len(self.kv) if self.n_kv is None else self.n_kv)
        body = head + b"".join(self.kv) + b"".join(self.records)
        body += b"\0" * (-len(body) % 32)
        return body + self.data

    def write(self, path: Path) -> Path:
        path.write_bytes(self.bytes())
        return path
