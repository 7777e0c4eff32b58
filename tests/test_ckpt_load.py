"""``checkpoints_tools.load_model``, the one loader (issue 15 item 3): what the evaluator's and the
generator's own readers used to do -- a config or vocabulary manifest given, beside the file or in
it; dtype and device -- and the meta-device check the hosts' starting-checkpoint check uses."""

from __future__ import annotations

import json

import pytest
import torch

from checkpoints_tools.load import load_model
from checkpoints_tools.safe_load import CheckpointError
from jam_metaseq.models import build_model, config_to_json, preset, width_of
from jam_metaseq.vocab import tiny_manifest

VOCAB = tiny_manifest()


def _model():
    """A float64 model whose weights float32 cannot hold (+ 2^-40 on every value)."""
    torch.manual_seed(0)
    m = build_model(preset("tiny", vocab_size=VOCAB.size, max_positions=40)).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(2.0**-40)
    return m


def _save(path, model, **extra):
    torch.save({"model": model.state_dict(), **extra}, path)
    return path


def _equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def test_config_and_vocab_stored_in_the_file_and_dtype_kept_exactly(tmp_path):
    m = _model()
    p = _save(tmp_path / "c.pt", m, jam_config=m.cfg.to_dict(), jam_vocab=VOCAB.to_dict())
    got, cfg, vocab = load_model(p)
    assert cfg == m.cfg and vocab == VOCAB
    assert _equal(got, m)  # float64 stays float64, bit for bit (no float32 detour)
    assert got.decoder.output_projection.weight is got.decoder.embed_tokens.weight  # tied
    got32, _, _ = load_model(p, dtype=torch.float32)
    assert _equal(got32, m.float())


def test_config_json_and_vocab_json_beside_the_file(tmp_path):
    m = _model()
    p = _save(tmp_path / "c.pt", m)
    (tmp_path / "config.json").write_text(config_to_json(m.cfg))
    VOCAB.save(tmp_path / "vocab.json")
    got, cfg, vocab = load_model(p)
    assert cfg == m.cfg and vocab == VOCAB and _equal(got, m)


def test_given_config_and_vocab_replace_the_checkpoints(tmp_path):
    m = _model()
    other = tiny_manifest(text_size=72)
    p = _save(tmp_path / "c.pt", m, jam_config=m.cfg.to_dict(), jam_vocab=VOCAB.to_dict())
    cfg_file = tmp_path / "given.json"
    cfg_file.write_text(json.dumps({**m.cfg.to_dict(), "dropout": 0.25}))
    _, cfg, _ = load_model(p, config=cfg_file)
    assert cfg.dropout == 0.25
    other.save(tmp_path / "v.json")
    with pytest.raises(CheckpointError, match=f"vocab manifest has {other.size} ids but the checkpoint .*"
                                              f"embedding has {VOCAB.size} rows"):
        load_model(p, vocab=tmp_path / "v.json")
    with pytest.raises(CheckpointError, match="has shape .* but the model .* expects"):
        load_model(p, config=width_of(m.cfg))


def test_missing_vocab_is_an_error_only_when_required(tmp_path):
    m = _model()
    p = _save(tmp_path / "c.pt", m, jam_config=m.cfg.to_dict())
    assert load_model(p)[2] is None
    with pytest.raises(CheckpointError, match=f"{p}: no vocabulary manifest .*pass --vocab"):
        load_model(p, require_vocab=True)


def test_meta_device_reads_no_tensor_data(tmp_path, monkeypatch):
    from checkpoints_tools import readers

    m = _model()
    p = _save(tmp_path / "c.pt", m, jam_config=m.cfg.to_dict(), jam_vocab=VOCAB.to_dict())

    def refuse(*a, **k):
        raise AssertionError("tensor data read")

    monkeypatch.setattr(readers.MetaseqReader, "get_into", refuse)
    got, cfg, _ = load_model(p, device="meta")
    assert cfg == m.cfg and all(t.is_meta for t in got.state_dict().values())
    with pytest.raises(AssertionError, match="tensor data read"):  # control: a real load reads
        load_model(p)
