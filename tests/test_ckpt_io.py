"""checkpoints_tools I/O: safe loading, lazy readers of every layout, streaming writers, atomicity."""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from checkpoints_tools import layout
from checkpoints_tools.io import OutputError, OutputSpec
from checkpoints_tools.io.target import check_free_space
from checkpoints_tools.ops import CommonOptions, reshard
from checkpoints_tools.readers import open_checkpoint, read_safetensors_header
from checkpoints_tools.safe_load import CheckpointError, UnsafePickleError, safe_torch_load
from _ckpt_util import assert_state_equal, ref_mp_split, save_metaseq, tiny_parent

torch.set_num_threads(1)


def _opts(out: Path, **kw) -> CommonOptions:
    return CommonOptions(spec=OutputSpec(out_dir=out, **kw), progress=False, hash_sources=True)


def _read_all(path) -> dict[str, torch.Tensor]:
    r = open_checkpoint(path)
    return collections.OrderedDict((n, r.get(n)) for n in r.names())


@pytest.fixture(scope="module")
def parent():
    return tiny_parent(0)


# ---- safe loading ------------------------------------------------------------------------------


class NotAllowed:
    """A class no checkpoint allow-list contains."""

    def __init__(self) -> None:
        self.x = 1


def test_disallowed_global_is_refused_unless_trusted(tmp_path):
    torch.save({"model": {"w": torch.ones(2)}, "extra": NotAllowed()}, tmp_path / "evil.pt")
    with pytest.raises(UnsafePickleError, match=r"NotAllowed.*--trust-pickle"):
        safe_torch_load(tmp_path / "evil.pt")
    obj = safe_torch_load(tmp_path / "evil.pt", trust_pickle=True)
    assert isinstance(obj["extra"], NotAllowed)


def test_namespace_cfg_is_allowed(tmp_path, parent):
    cfg, state = parent
    p = save_metaseq(tmp_path, cfg, state)
    obj = safe_torch_load(p)
    assert obj["cfg"]["model"].decoder_attention_heads == cfg.heads


def test_mapped_file_reads_by_pread_and_falls_back(tmp_path):
    from checkpoints_tools.safe_load import MappedFile

    t = torch.randn(6, 5)
    torch.save({"model": {"w": t}}, tmp_path / "a.pt")
    view = safe_torch_load(tmp_path / "a.pt")["model"]["w"]
    mf = MappedFile(tmp_path / "a.pt")
    assert mf._locate(view.data_ptr()) is not None  # found in /proc/self/maps: the pread path
    assert torch.equal(mf.read(view), t)
    assert torch.equal(mf.read(view, dtype=torch.float64), t.double())
    dest = torch.zeros(5, 6).t()  # strided destination
    assert torch.equal(mf.read(view, dest=dest), t)
    assert torch.equal(mf.read(view.t()), t.t())  # non-contiguous view: copied from the map


def test_truncated_file_is_reported_and_no_output_left(tmp_path, parent):
    cfg, state = parent
    p = save_metaseq(tmp_path / "src", cfg, state)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"checkpoint_last\.pt.*truncated"):
        reshard(p, opts=_opts(tmp_path / "out", mp=2))
    assert not (tmp_path / "out").exists()
    assert [x for x in tmp_path.iterdir() if x.name.startswith(".out")] == []


# ---- model parallelism -------------------------------------------------------------------------


def test_layout_split_matches_reference_and_joins_back(parent):
    _, state = parent
    for n, t in state.items():
        for parts in (1, 2, 4):
            got = layout.split(n, t, parts)
            want = ref_mp_split(n, t, parts)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), (n, parts)
            assert torch.equal(layout.join(n, got), t)
            into = torch.full_like(t, float("nan"))
            for r, piece in enumerate(got):
                layout.join_into(n, into, piece, r, parts)
            assert torch.equal(into, t), (n, parts)


def test_qkv_join_is_not_plain_concatenation():
    # Hand case: E=2, MP=2. Rows of the consolidated qkv are K0 K1 V0 V1 Q0 Q1.
    t = torch.arange(6.0).view(6, 1)
    parts = layout.split("decoder.layers.0.self_attn.qkv_proj.weight", t, 2)
    assert parts[0].view(-1).tolist() == [0, 2, 4] and parts[1].view(-1).tolist() == [1, 3, 5]
    assert not torch.equal(torch.cat(parts), t)


def test_reshard_1_2_4_1_is_bitwise_identical(tmp_path, parent):
    cfg, state = parent
    src = save_metaseq(tmp_path / "src", cfg, state)
    o2 = reshard(src, opts=_opts(tmp_path / "mp2", mp=2))
    # The MP=2 files hold exactly the reference split (what metaseq expects per rank).
    for r in range(2):
        part = torch.load(o2 / f"checkpoint-model_part-{r}.pt", weights_only=False)["model"]
        for n, t in state.items():
            assert torch.equal(part[n], ref_mp_split(n, t, 2)[r]), n
    o4 = reshard(o2, opts=_opts(tmp_path / "mp4", mp=4))
    o1 = reshard(o4, opts=_opts(tmp_path / "mp1", mp=1))
    back = torch.load(o1 / "checkpoint.pt", weights_only=False)
    assert_state_equal(back["model"], state)
    # tied output projection is stored once, like torch.save does for shared parameters
    m = back["model"]
    assert m["decoder.output_projection.weight"].data_ptr() == m["decoder.embed_tokens.weight"].data_ptr()
    assert back["jam_config"] == cfg.to_dict()
    assert back["cfg"]["model"].decoder_embed_dim == cfg.embed_dim


def test_mp_parts_give_full_vocab_output_projection(tmp_path, parent):
    """metaseq's reshard_mp copied output_projection from the last part (V/N rows): not here."""
    cfg, state = parent
    src = save_metaseq(tmp_path / "src", cfg, state, mp=4)
    r = open_checkpoint(src)
    assert r.mp == 4
    out = r.get("decoder.output_projection.weight")
    assert out.shape == (cfg.vocab_size, cfg.embed_dim)
    assert torch.equal(out, state["decoder.output_projection.weight"])
    assert_state_equal(_read_all(src), state)


def test_missing_part_is_reported_and_no_output_left(tmp_path, parent):
    cfg, state = parent
    src = save_metaseq(tmp_path / "src", cfg, state, mp=4)
    os.remove(tmp_path / "src" / "checkpoint_last-model_part-2.pt")
    with pytest.raises(CheckpointError, match=r"missing model part\(s\) \[2\]"):
        reshard(src, opts=_opts(tmp_path / "out"))
    os.remove(tmp_path / "src" / "checkpoint_last-model_part-3.pt")  # now parts 0,1: cfg says 4
    with pytest.raises(CheckpointError, match="model_parallel_size=4 but 2 part"):
        reshard(src, opts=_opts(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_target_mp_must_divide_heads(tmp_path, parent):
    cfg, state = parent
    src = save_metaseq(tmp_path / "src", cfg, state)
    with pytest.raises(ValueError, match="model-parallel size 3 does not divide its attention heads"):
        reshard(src, opts=_opts(tmp_path / "out", mp=3))
    assert not (tmp_path / "out").exists()


# ---- FSDP --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mp,world", [(1, 3), (2, 2)])
def test_reads_fairscale_style_shards(tmp_path, parent, mp, world):
    cfg, state = parent
    src = save_metaseq(tmp_path / "src", cfg, state, mp=mp, fsdp=world)
    r = open_checkpoint(src)
    assert (r.mp, r.fsdp) == (mp, world)
    assert_state_equal(_read_all(src), state)


def test_consolidated_fsdp_consolidated_identical(tmp_path, parent):
    cfg, state = parent
    src = save_metaseq(tmp_path / "src", cfg, state)
    sh = reshard(src, opts=_opts(tmp_path / "fsdp", fsdp=3))
    files = sorted(p.name for p in sh.glob("*.pt"))
    assert files == [f"checkpoint-model_part-0-shard{j}.pt" for j in range(3)]  # metaseq: 3 processes
    shard0 = torch.load(sh / files[0], weights_only=False)
    md = shard0["shard_metadata"]
    assert md["param_metadata"][0]["fsdp_path"] == "" and md["buffer_names"] == ["decoder.version"]
    assert "decoder.layers.0.flat_param_0" in shard0["model"]
    # fairscale's own consolidation rule (cat unpadded shards, split by numels) recovers the state
    shards = [torch.load(sh / f, weights_only=False) for f in files]
    for unit_idx, unit in enumerate(md["param_metadata"]):
        key = (unit["fsdp_path"] + "." if unit["fsdp_path"] else "") + "flat_param_0"
        pieces = []
        for s in shards:
            pad = s["shard_metadata"]["param_metadata"][unit_idx]["params"]["flat_param_0"]["padding"]
            t = s["model"][key]
            pieces.append(t[: t.numel() - pad])
        full = torch.cat(pieces)
        p = unit["params"]["flat_param_0"]
        for n, t, shp in zip(p["names"], full.split(p["numels"]), p["shapes"]):
            name = (unit["fsdp_path"] + "." if unit["fsdp_path"] else "") + n
            assert torch.equal(t.view(shp), state[name]), name
    back = reshard(sh, opts=_opts(tmp_path / "back"))
    assert_state_equal(torch.load(back / "checkpoint.pt", weights_only=False)["model"], state)


def test_missing_last_fsdp_shard_is_detected(tmp_path, parent):
    cfg, state = parent
    src = save_metaseq(tmp_path / "src", cfg, state, fsdp=3)
    os.remove(tmp_path / "src" / "checkpoint_last-shard2.pt")
    with pytest.raises(CheckpointError, match="missing or extra shards"):
        open_checkpoint(src)


def test_mixed_dtypes_are_refused(tmp_path, parent):
    cfg, state = parent
    mixed = collections.OrderedDict(state)
    mixed["decoder.layers.1.fc1.weight"] = mixed["decoder.layers.1.fc1.weight"].half()
    src = save_metaseq(tmp_path / "src", cfg, mixed)
    with pytest.raises(CheckpointError, match=r"mixed parameter dtypes.*fc1"):
        reshard(src, opts=_opts(tmp_path / "out", dtype=None))
    assert not (tmp_path / "out").exists()


# ---- safetensors, dtype, manifest --------------------------------------------------------------


def test_safetensors_output_is_readable_by_the_safetensors_library(tmp_path, parent):
    from safetensors.torch import load_file

    cfg, state = parent
    src = save_metaseq(tmp_path / "src", cfg, state)
    out = reshard(src, opts=_opts(tmp_path / "st", format="safetensors", dtype=torch.bfloat16))
    loaded = load_file(str(out / "checkpoint.safetensors"))
    assert_state_equal(loaded, {k: v.to(torch.bfloat16) for k, v in state.items()})
    assert_state_equal(_read_all(out), loaded)
    assert open_checkpoint(out).config() == cfg


def _save_tied(path: Path, cfg, state) -> Path:
    """A consolidated metaseq file whose output projection IS the embedding (as metaseq saves it)."""
    tied = collections.OrderedDict(state)
    tied["decoder.output_projection.weight"] = tied["decoder.embed_tokens.weight"]
    path.mkdir(parents=True)
    torch.save({"model": tied, "cfg": {"model": argparse.Namespace(arch="transformer_lm", decoder_attention_heads=cfg.heads)}},
               path / "checkpoint.pt")
    return path / "checkpoint.pt"


@pytest.mark.parametrize("op", ["merge", "cross"])
def test_safetensors_stores_the_tied_embedding_once_and_loads_back_tied(tmp_path, op):
    """Issue 18 item 2: tied sources give a safetensors file holding the embedding once, with
    ``__metadata__`` naming the output projection as its alias (the safetensors library's own
    record of a dropped shared tensor); our reader lists both names and calls them tied,
    load_model's output projection IS its embedding, the safetensors library loads the file
    (``load_file``, and ``load_model`` into our model with strict=True), a reshard to .pt aliases
    the storage again, and the tensors equal those of the .pt output."""
    import safetensors.torch as st

    from checkpoints_tools import load_model, ops
    from checkpoints_tools.load import verify_checkpoint
    from jam_metaseq.models import build_model

    cfg, a = tiny_parent(11)
    _, b = tiny_parent(12)
    pa, pb = _save_tied(tmp_path / "a", cfg, a), _save_tied(tmp_path / "b", cfg, b)

    def run(name, **spec):
        opts = _opts(tmp_path / name, **spec)
        if op == "merge":
            return ops.merge([pa, pb], opts=opts)
        return ops.cross(pa, pb, opts=opts, cross_every=1, image_vocab=(64, 100))

    pt, sf = run("pt"), run("st", format="safetensors")
    emb, proj = "decoder.embed_tokens.weight", "decoder.output_projection.weight"
    f = sf / "checkpoint.safetensors"
    with st.safe_open(str(f), "pt") as h:
        assert proj not in h.keys() and emb in h.keys()
        assert h.metadata()[proj] == emb
    plain = st.load_file(str(f))
    assert proj not in plain
    r = open_checkpoint(sf)
    assert proj in r.names() and r.tied(emb, proj) and r.tied(proj, emb) and not r.tied(emb, "decoder.version")
    assert_state_equal(_read_all(sf), _read_all(pt))
    model, mcfg, _ = load_model(sf)
    assert model.decoder.output_projection.weight is model.decoder.embed_tokens.weight
    fresh = build_model(mcfg)
    missing, unexpected = st.load_model(fresh, str(f), strict=True)
    assert not missing and not unexpected
    assert torch.equal(fresh.decoder.output_projection.weight, plain[emb])
    verify_checkpoint(sf)
    m = json.loads((sf / "manifest.json").read_text())
    assert m["tensors"][proj] == m["tensors"][emb]
    nbytes = a[emb].numel() * a[emb].element_size()
    sep = save_metaseq(tmp_path / "sep", cfg, a)  # its output projection is a tensor of its own
    back = reshard(sf, opts=_opts(tmp_path / "back"))
    sd = torch.load(back / "checkpoint.pt", weights_only=False)["model"]
    assert sd[proj].untyped_storage().data_ptr() == sd[emb].untyped_storage().data_ptr()
    # Control: a source whose output projection is its own tensor is written in full.
    tied_src = reshard(pa, opts=_opts(tmp_path / "tied", format="safetensors"))
    full = reshard(sep, opts=_opts(tmp_path / "full", format="safetensors"))
    with st.safe_open(str(full / "checkpoint.safetensors"), "pt") as h:
        assert proj in h.keys() and proj not in h.metadata()
    data = lambda p: p.stat().st_size - read_safetensors_header(p).data_start  # noqa: E731
    assert data(full / "checkpoint.safetensors") == data(tied_src / "checkpoint.safetensors") + nbytes


def test_manifest_lists_files_tensors_and_sources(tmp_path, parent):
    import hashlib

    cfg, state = parent
    src = save_metaseq(tmp_path / "src", cfg, state, mp=2)
    out = reshard(src, opts=_opts(tmp_path / "out", mp=2, dtype=torch.float16))
    m = json.loads((out / "manifest.json").read_text())
    assert m["layout"] == {"format": "metaseq", "mp": 2, "fsdp": 0, "name": "checkpoint", "dtype": "float16"}
    for f, rec in m["files"].items():
        assert hashlib.sha256((out / f).read_bytes()).hexdigest() == rec["sha256"]
    assert m["tensors"]["decoder.embed_tokens.weight"] == {"shape": [128, 32], "dtype": "float16"}
    srcs = m["sources"][0]["files"]
    assert len(srcs) == 2 and all(len(v["sha256"]) == 64 for v in srcs.values())
    assert m["config"] == cfg.to_dict()


def test_existing_output_and_disk_space_are_checked(tmp_path, parent):
    cfg, state = parent
    src = save_metaseq(tmp_path / "src", cfg, state)
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        reshard(src, opts=_opts(tmp_path / "out"))
    with pytest.raises(OutputError, match="not enough free disk"):
        check_free_space(tmp_path / "new", 1 << 62)


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_hf_index_without_a_weight_map_is_a_clear_error(tmp_path, kind):
    """An HF OPT directory whose *.index.json has no "weight_map" object, or names a file outside
    the directory, stops with an error naming the index (not a KeyError traceback); a valid
    index is checked against the files (a tensor the index puts in the wrong file is named)."""
    from safetensors.torch import save_file

    from checkpoints_tools.readers import open_checkpoint as open_ckpt

    d = tmp_path / "opt"
    d.mkdir()
    hf = {"model_type": "opt", "hidden_size": 32, "ffn_dim": 48, "num_hidden_layers": 1, "num_attention_heads": 4,
          "vocab_size": 96, "max_position_embeddings": 40}
    (d / "config.json").write_text(json.dumps(hf))
    index = d / ("model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json")
    for bad, msg in (({"metadata": {}}, "no \"weight_map\""), ({"weight_map": ["a"]}, "no \"weight_map\""),
                     ({"weight_map": {"lm_head.weight": "../x.bin"}}, "not a file next to the index")):
        index.write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=msg) as e:
            open_ckpt(d)
        assert str(index) in str(e.value)
    if kind == "safetensors":
        emb = torch.zeros(96, 32)
        save_file({"model.decoder.embed_tokens.weight": emb}, str(d / "a.safetensors"))
        save_file({"model.decoder.embed_positions.weight": torch.zeros(42, 32)}, str(d / "b.safetensors"))
        index.write_text(json.dumps({"weight_map": {"model.decoder.embed_tokens.weight": "b.safetensors",
                                                    "model.decoder.embed_positions.weight": "a.safetensors"}}))
        with pytest.raises(CheckpointError, match="weight_map puts tensor 'model.decoder.embed_"):
            open_ckpt(d)


@settings(max_examples=15, deadline=None)
@given(sizes=st.lists(st.sampled_from([0, 1, 7, 64, 1000, 70_000, 1_200_000]), min_size=0, max_size=6),
       seed=st.integers(0, 2**16))
def test_zip_crcs_written_beside_the_data_equal_torchs(tmp_path_factory, sizes, seed):
    """TorchStreamWriter runs torch's zip writer without its CRC and fills the CRCs itself
    (zip_crc.ZipCrcs): the file must be byte for byte what torch's writer writes with its own CRC
    (descriptors, central directory, serialization id), for empty, tiny and multi-chunk records,
    and load with torch.load. Control: the same records without the fix-up differ."""
    import io

    from torch.serialization import _get_storage_alignment

    from checkpoints_tools.io import torch_zip

    d = tmp_path_factory.mktemp("zip")
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8) for n in sizes]
    w = torch_zip.TorchStreamWriter(d / "ours.pt")
    obj = {f"t{i}": w.add(t) for i, t in enumerate(tensors)}
    sha, nbytes = w.finish(obj)
    ours = (d / "ours.pt").read_bytes()

    def reference(crc: bool) -> bytes:
        buf = io.BytesIO()
        z = torch._C.PyTorchFileWriter(buf, crc, _get_storage_alignment())
        for i, t in enumerate(tensors):
            z.write_record(f"data/{i}", t.untyped_storage(), t.numel())
        pkl = io.BytesIO()
        torch_zip._StubPickler(pkl, protocol=2).dump(
            {f"t{i}": torch_zip._TensorStub(torch_zip._StorageStub(str(i), t.dtype, t.numel()), t.shape)
             for i, t in enumerate(tensors)})
        align = str(_get_storage_alignment())
        for name, payload in (("data.pkl", pkl.getvalue()), (".format_version", "1"), (".storage_alignment", align),
                              ("byteorder", sys.byteorder)):
            z.write_record(name, payload, len(payload))
        z.write_end_of_file()
        del z
        return buf.getvalue()

    assert ours == reference(True)
    assert nbytes == len(ours) and sha == hashlib.sha256(ours).hexdigest()
    if any(sizes):
        assert ours != reference(False)
    back = torch.load(d / "ours.pt", weights_only=True)
    for i, t in enumerate(tensors):
        assert torch.equal(back[f"t{i}"], t)


def test_zip_crcs_refuse_a_layout_they_do_not_know(tmp_path):
    """A write that is not torch's zip layout is an error of that file (never a wrong CRC)."""
    from checkpoints_tools.io.hashed_file import HashedFile
    from checkpoints_tools.io.zip_crc import ZipCrcs

    f = HashedFile(tmp_path / "x.pt")
    z = ZipCrcs(f)
    z.write(b"not a zip header at all, 30 by")
    with pytest.raises(OutputError, match="unexpected zip layout from torch's writer"):
        f.check()
    f.discard()
