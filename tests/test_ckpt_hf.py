"""HF OPT <-> metaseq conversion (jam_metaseq.models.hf_families): logits parity with
transformers' OPTForCausalLM, a negative control, and the HF -> metaseq -> HF round trip."""

from __future__ import annotations

import json

import pytest
import torch

from checkpoints_tools import load_model
from checkpoints_tools.io import OutputSpec
from checkpoints_tools.ops import CommonOptions, reshard
from checkpoints_tools.readers import open_checkpoint
from checkpoints_tools.safe_load import CheckpointError

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)


def _opts(out, **kw) -> CommonOptions:
    return CommonOptions(spec=OutputSpec(out_dir=out, **kw), progress=False, hash_sources=False)


def _hf_model(seed: int = 0, **cfg_over):
    from transformers import OPTConfig, OPTForCausalLM

    kw = dict(vocab_size=96, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=40, word_embed_proj_dim=32, do_layer_norm_before=True, dropout=0.0,
              attention_dropout=0.0, pad_token_id=1, bos_token_id=2, eos_token_id=2)
    kw.update(cfg_over)
    torch.manual_seed(seed)
    model = OPTForCausalLM(OPTConfig(**kw)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():  # biases and LayerNorms non-trivial too
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if "layer_norm.weight" in n else 0.0))
    return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "opt"
    model = _hf_model()
    model.save_pretrained(d)
    return d, model


def test_hf_opt_reads_as_metaseq_and_matches_logits(hf_dir):
    d, hf = hf_dir
    model, cfg, _ = load_model(d)
    assert (cfg.embed_dim, cfg.heads, cfg.layers, cfg.scale_embedding) == (32, 4, 2, False)
    x = torch.randint(4, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(x)
        ref = hf(input_ids=x).logits
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_negative_control_swapped_q_and_k_changes_logits(hf_dir):
    d, hf = hf_dir
    model, cfg, _ = load_model(d)
    w = model.decoder.layers[0].self_attn.qkv_proj.weight
    E = cfg.embed_dim
    with torch.no_grad():
        w.copy_(torch.cat([w[2 * E:], w[E:2 * E], w[:E]]))  # [Q; V; K]: the wrong order
    x = torch.randint(4, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(model(x), hf(input_ids=x).logits, atol=1e-3)


def test_hf_metaseq_hf_round_trip(tmp_path, hf_dir):
    from transformers import OPTForCausalLM

    d, hf = hf_dir
    ms = reshard(d, opts=_opts(tmp_path / "ms", mp=2))
    assert open_checkpoint(ms).mp == 2
    back = reshard(ms, opts=_opts(tmp_path / "hf", format="hf_opt"))
    cfg_json = json.loads((back / "config.json").read_text())
    assert cfg_json["model_type"] == "opt" and cfg_json["hidden_size"] == 32
    again = OPTForCausalLM.from_pretrained(back).eval()
    a, b = hf.state_dict(), again.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_fsdp_shards_do_not_depend_on_the_reader_the_tensors_came_from(tmp_path, hf_dir):
    """FSDP shards written straight from the HF reader equal, byte for byte, those written from
    its metaseq conversion. pickle stores an object it has already written as a reference, so the
    shards' shared-parameter names must not be the very string objects the tensor names are (the
    HF reader's names are the key schema's constants)."""
    d, _ = hf_dir
    direct = reshard(d, opts=_opts(tmp_path / "direct", fsdp=2))
    via = reshard(reshard(d, opts=_opts(tmp_path / "ms")), opts=_opts(tmp_path / "via", fsdp=2))
    files = sorted(f.name for f in direct.glob("*.pt"))
    assert files == ["checkpoint-model_part-0-shard0.pt", "checkpoint-model_part-0-shard1.pt"]
    for name in files:
        assert (direct / name).read_bytes() == (via / name).read_bytes(), name


def test_post_layernorm_opt_is_refused(tmp_path):
    d = tmp_path / "opt350"
    _hf_model(do_layer_norm_before=False).save_pretrained(d)
    with pytest.raises(CheckpointError, match="post-LayerNorm"):
        reshard(d, opts=_opts(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout", ["safetensors", "bin-shards"])
def test_hf_views_count_their_reads_for_paced_hashing(tmp_path, layout):
    """An HF OPT view (one safetensors file, or several .bin shards through the HF index) counts
    every consolidated read: after reading each tensor once its read_fraction is 1, so the paced
    source hashing of an HF parent follows the stream instead of waiting for its end."""
    model = _hf_model()
    d = tmp_path / "opt"
    model.save_pretrained(d)
    if layout == "bin-shards":  # the older HF layout: .bin shards and their index
        (d / "model.safetensors").unlink()
        sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
        keys = list(sd)
        shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
                  "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
        for f, ks in shards.items():
            torch.save({k: sd[k] for k in ks}, d / f)
        (d / "pytorch_model.bin.index.json").write_text(
            json.dumps({"weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    r = open_checkpoint(d)
    assert r.read_fraction() == 0.0
    names = r.names()
    for n in names[: len(names) // 2]:
        r.get_into(n, torch.empty(r.info(n).shape, dtype=r.info(n).dtype))
    assert 0.0 < r.read_fraction() < 1.0
    for n in names[len(names) // 2:]:
        r.get_into(n, torch.empty(r.info(n).shape, dtype=r.info(n).dtype))
    assert r.read_fraction() == 1.0
