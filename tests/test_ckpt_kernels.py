"""Streaming kernels and buffers of checkpoints_tools against the fusion functions they stand for.

``kernels.merge_into`` / ``widen_into`` / ``cross_into`` must equal ``jam_metaseq.fusion``'s
``merge_tensor`` / ``widen_tensor`` / ``cross_tensor`` cast to the output dtype, bit for bit, on
every tensor of tiny models, across chunk boundaries (CHUNK made small here) and dtypes;
``ops.expected_shapes`` (meta build without init) must equal ``fusion.state_shapes``; the
writer's reused buffers must not leak one tensor into the next.
"""

from __future__ import annotations

import collections

import pytest
import torch

from checkpoints_tools import kernels
from checkpoints_tools.io import OutputSpec
from checkpoints_tools.ops import CommonOptions, expected_shapes, merge, reshard
from checkpoints_tools.readers import open_checkpoint
from checkpoints_tools.workspace import Workspace
from jam_metaseq.fusion import cross_tensor, merge_tensor, state_shapes, widen_tensor
from jam_metaseq.models.config import cross_of, preset, uniform_of, width_of
from _ckpt_util import assert_state_equal, save_metaseq, tiny_parent

torch.set_num_threads(1)


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(kernels, "CHUNK", 96)  # tiny tensors span many chunks, with ragged tails


@pytest.fixture(scope="module")
def two():
    cfg, a = tiny_parent(31)
    _, b = tiny_parent(32)
    return cfg, a, b


def _cast(state, dtype):
    return collections.OrderedDict((k, v.to(dtype)) for k, v in state.items())


def _bitwise(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, what
    assert torch.equal(got.view(-1).view(torch.uint8) if got.numel() else got,
                       want.view(-1).view(torch.uint8) if want.numel() else want), what


def test_expected_shapes_equal_fusion_state_shapes():
    p = preset("tiny")
    for cfg in (p, uniform_of(p), width_of(p), cross_of(p, 1, image_vocab_start=10, image_vocab_end=20),
                cross_of(p, 2, cross_init="preserve", image_vocab_start=0, image_vocab_end=5),
                preset("tiny", bias=False, affine_ln=False)):
        got, want = expected_shapes(cfg), state_shapes(cfg)
        assert list(got.items()) == list(want.items()), cfg


@pytest.mark.parametrize("dt_in,dt_out", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                          (torch.bfloat16, torch.float16), (torch.float16, torch.float32)])
def test_merge_into_is_merge_tensor_bitwise(two, small_chunks, dt_in, dt_out):
    _, a, b = two
    a, b = _cast(a, dt_in), _cast(b, dt_in)
    c = _cast(a, torch.float32)
    for k in a:
        for ins, w in (([a[k], b[k]], [0.5, 0.5]), ([a[k], b[k], c[k]], [0.2, 0.3, 0.5])):
            out = torch.empty(a[k].shape, dtype=dt_out)
            kernels.merge_into(k, ins, out, weights=w)
            _bitwise(out, merge_tensor(k, ins, weights=w).to(dt_out), k)


@pytest.mark.parametrize("init", ["copy", "average"])
@pytest.mark.parametrize("dt_in,dt_out", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                          (torch.float16, torch.bfloat16)])
def test_widen_into_is_widen_tensor_bitwise(two, small_chunks, init, dt_in, dt_out):
    cfg, a, b = two
    a, b = _cast(a, dt_in), _cast(b, dt_in)
    shapes = state_shapes(width_of(cfg))
    assert list(shapes) == list(a)
    for k in a:
        out = torch.full(shapes[k], float("nan"), dtype=dt_out)  # every element must be written
        kernels.widen_into(k, a[k], b[k], out, parent=cfg, init=init)
        _bitwise(out, widen_tensor(k, a[k], b[k], parent=cfg, init=init).to(dt_out), k)


@pytest.mark.parametrize("scheme", ["per-tensor", "per-block"])
@pytest.mark.parametrize("init", ["paper", "preserve"])
def test_cross_into_is_cross_tensor_bitwise(two, tmp_path, monkeypatch, init, scheme):
    """Also with draw blocks much smaller than a tensor (many blocks, ragged last one) spread
    over 1 or 3 threads: the bits depend on the seed and the names only."""
    from jam_metaseq.fusion import cross as fusion_cross

    monkeypatch.setattr(fusion_cross, "DRAW_BLOCK", 100)
    cfg, a, b = two
    a16, b16 = _cast(a, torch.float16), _cast(b, torch.bfloat16)  # mixed parent dtypes
    ra = open_checkpoint(save_metaseq(tmp_path / "a", cfg, a16, mp=2))
    rb = open_checkpoint(save_metaseq(tmp_path / "b", cfg, b16, fsdp=2))
    ccfg = cross_of(cfg, 1, cross_init=init, image_vocab_start=64, image_vocab_end=100)
    ws = Workspace()
    for threads in (1, 3):
        monkeypatch.setattr(kernels, "DRAW_THREADS", threads)
        monkeypatch.setattr(kernels, "_POOL", None)
        for k, shape in state_shapes(ccfg).items():
            out = ws.get("out", shape, torch.float16)
            out.fill_(float("nan"))
            kernels.cross_into(k, out, cfg=ccfg, llm=ra, img=rb, seed=9, ws=ws, scheme=scheme)
            want = cross_tensor(k, cfg=ccfg, llm=a16.__getitem__, img=b16.__getitem__, seed=9,
                                scheme=scheme).to(torch.float16)
            _bitwise(out, want, k)


def test_workspace_reuses_and_grows():
    ws = Workspace()
    x = ws.get("a", (4, 8), torch.float32)
    y = ws.get("a", (2, 8), torch.float16)
    assert x.data_ptr() == y.data_ptr()  # same pages, another view
    z = ws.get("a", (64, 64), torch.float32)
    assert z.shape == (64, 64) and ws.nbytes() >= 64 * 64 * 4
    assert ws.get("b", (0, 3), torch.float16).numel() == 0


@pytest.mark.parametrize("small", [0, 2048, 1 << 40], ids=["all-big", "mixed", "all-small"])
@pytest.mark.parametrize("mp,fsdp", [(1, 0), (2, 0), (4, 0), (2, 2)])
def test_reused_buffers_do_not_leak_between_tensors(two, tmp_path, monkeypatch, mp, fsdp, small):
    """merge/reshard produce big tensors into two reused slots (small ones into their own
    buffers, queued behind them) and the writer packs MP pieces into another buffer: every
    written tensor must still be its own (read back against the reference), whichever tensors
    count as small (``SMALL_TENSOR``: none, some, all of the tiny model's)."""
    from checkpoints_tools.ops import stream

    monkeypatch.setattr(stream, "SMALL_TENSOR", small)
    monkeypatch.setattr(stream, "SMALL_IN_FLIGHT", 4096)  # the small queue fills and drains
    cfg, a, b = two
    pa = save_metaseq(tmp_path / "a", cfg, a, mp=2)
    pb = save_metaseq(tmp_path / "b", cfg, b)
    opts = CommonOptions(spec=OutputSpec(out_dir=tmp_path / f"m{mp}_{fsdp}", mp=mp, fsdp=fsdp),
                         progress=False, hash_sources="none")
    out = merge([pa, pb], opts=opts, weights=[0.25, 0.75])
    got = collections.OrderedDict(open_checkpoint(out).items())
    want = collections.OrderedDict((k, merge_tensor(k, [a[k], b[k]], weights=[0.25, 0.75])) for k in a)
    assert_state_equal(got, want)
    back = reshard(out, opts=CommonOptions(spec=OutputSpec(out_dir=tmp_path / f"r{mp}_{fsdp}"), progress=False,
                                           hash_sources="none"))
    assert_state_equal(collections.OrderedDict(open_checkpoint(back).items()), want)


def test_source_hashes_from_the_sources_manifest_only_when_unchanged(two, tmp_path):
    """--hash-sources auto takes a jam-ckpt source's recorded sha256 when size and mtime say the
    file is unchanged since its manifest; a newer file is read and hashed; full always reads."""
    import json
    import os

    from checkpoints_tools.io import sha256_file

    cfg, a, _ = two
    src = reshard(save_metaseq(tmp_path / "p", cfg, a),
                  opts=CommonOptions(spec=OutputSpec(out_dir=tmp_path / "src", mp=2), progress=False,
                                     hash_sources="none"))

    def sources(name, policy):
        o = reshard(src, opts=CommonOptions(spec=OutputSpec(out_dir=tmp_path / name), progress=False,
                                            hash_sources=policy))
        return json.loads((o / "manifest.json").read_text())["sources"][0]["files"]

    files = sources("auto", "auto")
    assert {r["sha256_from"] for r in files.values()} == {"manifest"}
    for f, r in files.items():
        assert r["sha256"] == sha256_file(f)
    part1 = src / "checkpoint-model_part-1.pt"
    later = (src / "manifest.json").stat().st_mtime_ns + 10**9
    os.utime(part1, ns=(later, later))  # e.g. rewritten in place after the manifest
    files = sources("touched", "auto")
    assert files[str(part1)]["sha256_from"] == "read"
    assert files[str(src / "checkpoint-model_part-0.pt")]["sha256_from"] == "manifest"
    assert {r["sha256_from"] for r in sources("full", "full").values()} == {"read"}
    assert {r["sha256"] for r in sources("none", "none").values()} == {None}


@pytest.mark.parametrize("paced", [True, False], ids=["paced", "control-unpaced"])
def test_source_hashing_is_paced_by_the_stream_and_correct(two, tmp_path, monkeypatch, paced):
    """--hash-sources full hashes each source file on its own thread while the stream reads it:
    no read of the hash starts more than HASH_LEAD bytes ahead of the reader's progress (so each
    byte is read from disk once), and the sha256s equal hashlib's of the whole files, though the
    stream never reads every byte (tied output projection, pickles) before it releases the
    pacing. Control: without the wait the hash does run ahead (the check can fail)."""
    import json
    import threading

    from checkpoints_tools.io import sha256_file
    from checkpoints_tools.ops import provenance, stream

    cfg, a, b = two
    pa = save_metaseq(tmp_path / "a", cfg, a, mp=2)
    pb = save_metaseq(tmp_path / "b", cfg, b)
    lead = 4096
    monkeypatch.setattr(provenance, "HASH_LEAD", lead)
    ahead: list[float] = []  # at each read while the stream runs: read position - stream progress
    real_wait = provenance.SourceHash._wait_until_allowed
    go = threading.Event()

    def wait(self, pos, size):
        go.wait(10)  # the hash starts once the stream does (else it may finish before any read)
        if paced:
            real_wait(self, pos, size)
        if not self._released.is_set():
            ahead.append(pos - self.reader.read_fraction() * size)

    monkeypatch.setattr(provenance.SourceHash, "_wait_until_allowed", wait)
    real_hash = provenance.SourceHash._hash_file
    monkeypatch.setattr(provenance.SourceHash, "_hash_file", lambda self, path: real_hash(self, path, chunk=1024))
    real_stream_to = stream.stream_to

    def stream_to(out, produce, **kw):
        def slow_produce(name, buf):  # a stream slower than the hash, as on a real disk
            go.set()
            threading.Event().wait(0.002)
            return produce(name, buf)
        return real_stream_to(out, slow_produce, **kw)

    monkeypatch.setattr(stream, "stream_to", stream_to)
    out = merge([pa, pb], opts=CommonOptions(spec=OutputSpec(out_dir=tmp_path / "m"), progress=False,
                                             hash_sources="full"))
    sources = json.loads((out / "manifest.json").read_text())["sources"]
    files = {f: r for s in sources for f, r in s["files"].items()}
    assert len(files) == 3
    for f, r in files.items():
        assert r["sha256_from"] == "read" and r["sha256"] == sha256_file(f)
    assert ahead
    if paced:
        assert max(ahead) <= lead
    else:
        assert max(ahead) > lead


def test_failed_stream_stops_the_source_hashing(two, tmp_path):
    """A stream that fails mid-way cancels its sources' hash threads (no thread left reading a
    7B parent after the error) and leaves no output behind."""
    import threading

    from checkpoints_tools import ops
    from checkpoints_tools.io import OutputDir

    cfg, a, _ = two
    pa = save_metaseq(tmp_path / "a", cfg, a, mp=2)
    r = open_checkpoint(pa)
    src = ops.source_record("source", r, hash_sources="full")
    out = OutputDir(OutputSpec(out_dir=tmp_path / "o"), cfg=cfg, shapes=r.shapes())
    calls = []

    def produce(name, buf):
        calls.append(name)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return r.get_into(name, buf)

    with pytest.raises(RuntimeError, match="disk on fire"):
        ops.stream_to(out, produce, produced_dtypes={n: r.info(n).dtype for n in r.shapes()}, desc="t",
                      progress=False, manifest_extra={"sources": [src]})
    for t in src._threads.values():
        t.join(timeout=600)  # a guard against a hang only: a loaded machine may take long to stop it
        assert not t.is_alive()
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.tmp")]
    assert not [t for t in threading.enumerate() if t.name.startswith("jam-ckpt-hash")]


def test_write_behind_windows_keep_outputs_exact(two, tmp_path, monkeypatch):
    """With a tiny write-behind window (flush + drop from the page cache every few KiB, many
    times per tensor) the written files still hold exactly the merged tensors, and the manifest's
    sha256 (hashed as written) equals the file's."""
    import json

    from checkpoints_tools.io import hashed_file, sha256_file

    if hashed_file._SYNC_FILE_RANGE is None:
        pytest.skip("sync_file_range is Linux-only")
    monkeypatch.setattr(hashed_file, "WRITE_BEHIND", 8192)
    monkeypatch.setattr(hashed_file, "WRITE_CHUNK", 4096)
    monkeypatch.setattr(hashed_file, "PARALLEL_HASH_BYTES", 4096)
    flushed = []
    real = hashed_file.HashedFile.close

    def close(self):
        flushed.append((self.behind.flushed, self.nbytes))
        return real(self)

    monkeypatch.setattr(hashed_file.HashedFile, "close", close)
    cfg, a, b = two
    pa = save_metaseq(tmp_path / "a", cfg, a)
    pb = save_metaseq(tmp_path / "b", cfg, b)
    out = merge([pa, pb], opts=CommonOptions(spec=OutputSpec(out_dir=tmp_path / "m", mp=2), progress=False,
                                             hash_sources="none"))
    assert flushed and all(f > 0 and n - f < 3 * 8192 for f, n in flushed)  # the windows did run
    want = collections.OrderedDict((k, merge_tensor(k, [a[k], b[k]], weights=[0.5, 0.5])) for k in a)
    assert_state_equal(collections.OrderedDict(open_checkpoint(out).items()), want)
    for name, rec in json.loads((out / "manifest.json").read_text())["files"].items():
        assert rec["sha256"] == sha256_file(out / name)


@pytest.mark.parametrize("fmt", ["metaseq", "safetensors"])
def test_read_ahead_prefetches_exactly_the_coming_tensors_bytes(two, tmp_path, monkeypatch, fmt):
    """The stream asks the OS (posix_fadvise WILLNEED) for the parents' coming tensors before it
    reads them, at most READ_AHEAD bytes ahead: every hinted byte range of a file holds exactly
    a tensor's stored bytes, every tensor read was hinted first, and hints never run further
    ahead than READ_AHEAD (plus the tensors being produced)."""
    import os

    from checkpoints_tools.ops import stream

    cfg, a, b = two
    pa = save_metaseq(tmp_path / "a", cfg, a, mp=2)
    pb = save_metaseq(tmp_path / "b", cfg, b)
    if fmt == "safetensors":
        pa = reshard(pa, opts=CommonOptions(spec=OutputSpec(out_dir=tmp_path / "sa", format="safetensors"),
                                            progress=False, hash_sources="none"))
    monkeypatch.setattr(stream, "READ_AHEAD", 4096)
    hints, events = [], []
    real_fadvise = os.posix_fadvise

    def fadvise(fd, off, n, advice):
        if advice == os.POSIX_FADV_WILLNEED:
            hints.append((os.readlink(f"/proc/self/fd/{fd}"), off, n))
        return real_fadvise(fd, off, n, advice)

    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    real_prefetch = stream.ReadAhead.advance

    def advance(self, name):
        before = self.next
        real_prefetch(self, name)
        events.append((name, before, self.next, self.cum))

    monkeypatch.setattr(stream.ReadAhead, "advance", advance)
    merge([pa, pb], opts=CommonOptions(spec=OutputSpec(out_dir=tmp_path / "m"), progress=False, hash_sources="none"))
    assert hints and events
    def pieces(path: str) -> set[bytes]:  # the tensors stored in one file, as bytes
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(path)
        else:
            sd = torch.load(path, weights_only=False)["model"]
        return {t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() for t in sd.values()}

    files: dict[str, set[bytes]] = {}
    for path, off, n in hints:
        with open(path, "rb") as f:
            f.seek(off)
            data = f.read(n)
        assert data in files.setdefault(path, pieces(path)), (path, off, n)
    assert len(files) == (3 if fmt == "metaseq" else 2)
    for i, (name, before, after, cum) in enumerate(events):
        assert after > i  # the tensor being produced (and all before it) was hinted
        assert cum[after - 1] - cum[i + 1] < 4096 or after == i + 1  # never further than READ_AHEAD
