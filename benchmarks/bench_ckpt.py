"""Benchmark jam-ckpt's streaming merge / widen / cross (paper §2.1) against its I/O floor.

Synthetic parents of a preset (default ``opt_1_3b`` shape, fp16, MP=2) are written to a scratch
dir. Each measurement runs in a fresh subprocess, which reports its wall time, CPU time (user +
system, all threads) and peak RSS (``ru_maxrss``). In the same run we measure, for each operation:
  - ``stream:H``: checkpoints_tools.ops with ``--hash-sources H`` (lazy readers, fp32 math per
    tensor, streaming writer, output and source hashes);
  - ``base:H``: the same with the code of ``--baseline-tree`` (e.g. a checkout of main), for a
    before/after comparison within one run;
  - ``floor``: the op's I/O alone: read every byte of the parents' files and write as many bytes
    as the op's output through jam-ckpt's write-behind (``io.hashed_file.WriteBehind``), fsync. Issue 18's
    target: every stream within 1.25x of it (``x floor``), cold and warm page cache;
  - ``copy``: the same with plain buffered writes (issue 4's baseline);
  - ``naive``: torch.load every parent file whole, fuse whole state dicts, torch.save.
Peak RSS target (issue 4): <= 2 x the largest output tensor + 1 GiB above a bare ``import torch``.
On a shared machine the times swing with the load: ``--repeat N`` runs every stream and the
copies N times, one after the other in each repeat, and reports medians; ``x floor`` is the
median over the repeats of (run / the floor run of the same repeat). Every run starts after an
``os.sync()`` (and with ``--cold`` after dropping the page cache).

  python benchmarks/bench_ckpt.py --no-naive --hash-sources auto full          # warm page cache
  python benchmarks/bench_ckpt.py --no-naive --hash-sources auto full --cold   # parents from disk
  python benchmarks/bench_ckpt.py --no-naive --baseline-tree ../main           # before/after, same run
  python benchmarks/bench_ckpt.py --preset opt_125m --repeat 5 --no-naive

Hugging Face parents (issue 23: a 7B Llama-family merge / widen / cross within 24 GiB): ``--format hf``
writes each random parent as the HF directory of its family (``config.json``, bf16 safetensors shards
of at most 2 GB with ``model.safetensors.index.json``), its tensor names and shapes taken from the
``transformers`` class built on the meta device, each tensor drawn and written one at a time (a
parent is never whole in memory); the streams then read them as jam-ckpt reads a download:

  python benchmarks/bench_ckpt.py --format hf --preset gemma_7b --dtype bfloat16 --ops merge --repeat 1 --no-naive
  python benchmarks/bench_ckpt.py --format hf --preset gemma_7b --layers 4 --dtype bfloat16 --repeat 1 --no-naive
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


# ---- child-side work ---------------------------------------------------------------------------


def parent_config(preset: str, layers: int | None):
    import dataclasses

    from jam_metaseq.models.config import preset as get_preset

    cfg = get_preset(preset)
    return dataclasses.replace(cfg, layers=layers) if layers else cfg


def make_parent(out: Path, *, preset: str, seed: int, mp: int, dtype: str, layers: int | None = None) -> None:
    """Random parent streamed to disk through our writer (never whole in memory)."""
    import torch

    from checkpoints_tools.ops import expected_shapes
    from checkpoints_tools.io import OutputDir, OutputSpec
    from jam_metaseq.models import keys

    cfg = parent_config(preset, layers)
    shapes = expected_shapes(cfg)
    dt = getattr(torch, dtype)
    od = OutputDir(OutputSpec(out_dir=out, mp=mp, dtype=dt), cfg=cfg, shapes=shapes)
    od.open({n: dt for n in shapes})
    g = torch.Generator().manual_seed(seed)
    emb = None
    for n, s in shapes.items():
        if keys.is_version(n):
            t = torch.tensor([keys.VERSION_VALUE])
        elif n == keys.OUTPUT and cfg.tie_embeddings:
            t = emb
        else:
            t = (torch.randn(s, generator=g) * 0.02).to(dt)
        if n == keys.EMBED:
            emb = t
        od.add(n, t)
    od.commit(manifest_extra={})


HF_SHARD_BYTES = 2 * 10**9
"""Bytes per safetensors shard of an ``--format hf`` parent (downloads come in shards of 2-5 GB)."""


def make_hf_parent(out: Path, *, preset: str, seed: int, dtype: str, layers: int | None = None) -> None:
    """A random parent as its family's HF directory: names and shapes from the ``transformers``
    class on the meta device (HF's, not our key map), tensors drawn and streamed one at a time into
    safetensors shards, then the index and ``config.json``."""
    import torch
    import transformers

    from checkpoints_tools.io.hf_dir import INDEX, plan_shards
    from checkpoints_tools.io.safetensors import SafetensorsStreamWriter
    from jam_metaseq.models import hf_families

    cfg = parent_config(preset, layers)
    dt = getattr(torch, dtype)
    written = hf_families.hf_config(cfg, dtype=dt)
    config = transformers.AutoConfig.for_model(written["model_type"]).from_dict(written)
    with torch.device("meta"):
        model = getattr(transformers, written["architectures"][0])(config)
    plan = [(n, tuple(t.shape), dt) for n, t in model.state_dict().items()
            if not (cfg.tie_embeddings and n == "lm_head.weight")]  # save_pretrained leaves a tied head out
    shards = plan_shards(plan, max_shard_size=HF_SHARD_BYTES)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    out.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    for f, shard in zip(names, shards):
        w = SafetensorsStreamWriter(out / f, shard, {"format": "pt"})
        for n, shape, _ in shard:
            w.add(n, (torch.randn(shape, generator=g) * 0.02).to(dt))
        w.finish()
    index = {"metadata": {"total_size": sum(dt.itemsize * int(torch.Size(s).numel()) for _, s, _ in plan)},
             "weight_map": {n: f for f, shard in zip(names, shards) for n, _, _ in shard}}
    (out / INDEX).write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(written, indent=2))


def child_stream(op: str, llm: str, img: str, out: str, mp: int, image_vocab: tuple[int, int],
                 hash_sources: bool | str = True) -> None:
    from checkpoints_tools import ops
    from checkpoints_tools.io import OutputSpec

    opts = ops.CommonOptions(spec=OutputSpec(out_dir=Path(out), mp=mp), progress=False, hash_sources=hash_sources)
    if op == "merge":
        ops.merge([llm, img], opts=opts)
    elif op == "widen":
        ops.widen(llm, img, opts=opts, init="copy")
    else:
        ops.cross(llm, img, opts=opts, cross_every=2, image_vocab=image_vocab)


def child_naive(op: str, llm: str, img: str, out: str, image_vocab: tuple[int, int]) -> None:
    import torch

    from checkpoints_tools import layout
    from jam_metaseq.fusion import cross_tensor, merge_tensor, state_shapes, widen_tensor
    from jam_metaseq.models.config import CHECKPOINT_KEY as CONFIG_KEY
    from jam_metaseq.models.config import config_from_dict, cross_of, uniform_of, width_of

    def load_whole(d: str) -> tuple[dict, object]:
        files = sorted(Path(d).glob("*.pt"))
        objs = [torch.load(f, map_location="cpu", weights_only=False) for f in files]
        cfg = config_from_dict(objs[0][CONFIG_KEY])
        sd = {k: layout.join(k, [o["model"][k] for o in objs]) for k in objs[0]["model"]}
        return sd, cfg

    a, cfg = load_whole(llm)
    b, _ = load_whole(img)
    dt = a["decoder.layers.0.fc1.weight"].dtype
    if op == "merge":
        tcfg = uniform_of(cfg)
        outsd = {k: merge_tensor(k, [a[k], b[k]], weights=[0.5, 0.5]).to(dt) for k in state_shapes(tcfg)}
    elif op == "widen":
        tcfg = width_of(cfg)
        outsd = {k: widen_tensor(k, a[k], b[k], parent=cfg, init="copy").to(dt) for k in state_shapes(tcfg)}
    else:
        tcfg = cross_of(cfg, 2, image_vocab_start=image_vocab[0], image_vocab_end=image_vocab[1])
        outsd = {k: cross_tensor(k, cfg=tcfg, llm=a.__getitem__, img=b.__getitem__, seed=0).to(dt)
                 for k in state_shapes(tcfg)}
    Path(out).mkdir(parents=True)
    torch.save({"model": outsd, CONFIG_KEY: tcfg.to_dict()}, Path(out) / "checkpoint.pt")


class _WriteBehind:
    """A file written through jam-ckpt's write-behind window (``io.hashed_file.WriteBehind``), no hashing."""

    def __init__(self, f) -> None:
        from checkpoints_tools.io.hashed_file import WriteBehind

        self.f, self.behind, self.pos = f, WriteBehind(f), 0

    def write(self, b) -> None:
        self.f.write(b)
        self.pos += len(b)
        self.behind.wrote(self.pos)


def child_copy(srcs: list[str], out: str, out_bytes: int, write_behind: bool = False) -> None:
    """Read every byte of the parents' files and write ``out_bytes`` (the op's output size):
    the bytes read, while the output still needs them, then zeros; one fsync at the end."""
    chunk = 16 << 20
    Path(out).mkdir(parents=True)
    written = 0
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(Path(out) / "copy.bin", "wb") as f:
        w = _WriteBehind(f) if write_behind else f
        for d in srcs:
            for src in sorted([*Path(d).glob("*.pt"), *Path(d).glob("*.safetensors")]):
                with open(src, "rb", buffering=0) as r:
                    while True:
                        n = r.readinto(view)
                        if not n:
                            break
                        n = min(n, out_bytes - written)
                        if n > 0:
                            w.write(view[:n])
                            written += n
        view[:] = bytes(chunk)
        while written < out_bytes:  # outputs larger than the inputs (widen, cross)
            n = min(chunk, out_bytes - written)
            w.write(view[:n])
            written += n
        f.flush()
        os.fsync(f.fileno())


def child_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind")
    ap.add_argument("--json", required=True)
    a = ap.parse_args(argv)
    job = json.loads(a.json)
    import torch  # noqa: F401  (counted in the import baseline)

    t0 = time.perf_counter()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = ru0.ru_utime + ru0.ru_stime
    k = a.kind
    if k == "import":
        pass
    elif k == "parent" and job.get("format") == "hf":
        make_hf_parent(Path(job["out"]), preset=job["preset"], seed=job["seed"], dtype=job["dtype"],
                       layers=job.get("layers"))
    elif k == "parent":
        make_parent(Path(job["out"]), preset=job["preset"], seed=job["seed"], mp=job["mp"], dtype=job["dtype"],
                    layers=job.get("layers"))
    elif k == "stream":
        child_stream(job["op"], job["llm"], job["img"], job["out"], job["mp"], tuple(job["image_vocab"]),
                     job.get("hash_sources", True))
    elif k == "naive":
        child_naive(job["op"], job["llm"], job["img"], job["out"], tuple(job["image_vocab"]))
    elif k == "copy":
        child_copy(job["srcs"], job["out"], job["out_bytes"], job.get("write_behind", False))
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"seconds": time.perf_counter() - t0, "maxrss": _rss(),
                      "cpu": ru.ru_utime + ru.ru_stime - cpu0}))


# ---- parent-side driver ------------------------------------------------------------------------


COLD = False
"""--cold: drop the page cache before every timed run (parents then come from the disk)."""


def drop_caches() -> None:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
    except OSError as e:
        raise SystemExit(f"--cold needs to write /proc/sys/vm/drop_caches (root): {e}") from None


def run_child(kind: str, job: dict, tree: Path | None = None) -> dict:
    """One measurement in a fresh process; ``tree``: another checkout of the project whose
    benchmarks/bench_ckpt.py (and code) runs it (a same-run baseline, e.g. main's)."""
    # Start every timed run from the same state: no dirty pages of the previous run still being
    # written back (their flush would be billed to whichever run comes next).
    os.sync()
    if COLD and kind in ("stream", "copy", "naive"):
        drop_caches()
    root = tree or ROOT
    cmd = [sys.executable, str(root / "benchmarks" / "bench_ckpt.py"), "--child", kind, "--json", json.dumps(job)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)}
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*") if f.is_file())


def _print_rows(rows: list, *, base: dict, parent_bytes: int, header: bool) -> None:
    if header:
        print(f"\n{'op':<6} {'method':<12} {'wall s':>8} {'x floor':>8} {'cpu s':>7} {'peak RSS MiB':>13} "
              f"{'RSS-import MiB':>15} {'RSS budget MiB':>15} {'within':>7}", flush=True)
    for op, largest, out_bytes, streams, res in rows:
        budget = (2 * largest + (1 << 30)) / 2**20
        for method in (*streams, "naive", "copy", "floor"):
            r = res.get(method)
            if r is None:
                continue
            if "error" in r:
                print(f"{op:<6} {method:<12} error: {r['error']}")
                continue
            net = (r["maxrss"] - base["maxrss"]) / 2**20
            stream = method in streams
            ok = "" if not stream else ("yes" if net <= budget else "NO")
            print(f"{op:<6} {method:<12} {r['seconds']:>8.2f} {r.get('x_floor', float('nan')):>7.2f}x "
                  f"{r.get('cpu', float('nan')):>7.1f} {r['maxrss'] / 2**20:>13.0f} {net:>15.0f} "
                  f"{budget if stream else float('nan'):>15.0f} {ok:>7}")
        runs_s = "; ".join(f"{m} " + " ".join(f"{x:.2f}" for x in res[m].get("all", []))
                           for m in (*streams, "copy", "floor") if m in res)
        print(f"{'':<6} read {parent_bytes / 2**30:.2f} GiB, wrote {out_bytes / 2**30:.2f} GiB, largest output "
              f"tensor {largest / 2**20:.0f} MiB; runs (s): {runs_s}", flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="opt_1_3b", help="parent shape (jam_metaseq.models.config.PRESETS)")
    ap.add_argument("--layers", type=int, default=None, metavar="N",
                    help="parents of the preset's width but N layers: peak memory depends on the largest "
                         "tensor, not the depth, so e.g. --preset cm3leon_7b --layers 2 measures the 7B -> 26B "
                         "widen's memory on a small disk (default: the preset's depth)")
    ap.add_argument("--dtype", default="float16", help="parent and output dtype")
    ap.add_argument("--format", choices=("metaseq", "hf"), default="metaseq",
                    help="parents as jam-ckpt .pt outputs (metaseq, at --mp) or as their family's HF directory "
                         "(hf: sharded safetensors with the index, e.g. --preset gemma_7b --dtype bfloat16)")
    ap.add_argument("--mp", type=int, default=2, help="model-parallel size of parents and outputs")
    ap.add_argument("--ops", nargs="+", default=["merge", "widen", "cross"], choices=["merge", "widen", "cross"])
    ap.add_argument("--no-naive", action="store_true", help="skip the naive baseline (it needs RAM for everything)")
    ap.add_argument("--scratch", type=Path, default=None,
                    help="scratch dir (default: a temp dir, removed after); parents already there "
                         "(same --preset/--dtype/--mp, from an earlier run) are reused")
    ap.add_argument("--repeat", type=int, default=3, metavar="N",
                    help="stream/copy pairs per op; medians reported (default 3)")
    ap.add_argument("--hash-sources", choices=("auto", "full", "none"), nargs="+", default=["auto"],
                    help="jam-ckpt --hash-sources for the stream runs (default auto: the synthetic parents "
                         "are jam-ckpt outputs, so their manifests' hashes are reused; full = hash them "
                         "while reading). Several values: one stream row each, measured in the same run")
    ap.add_argument("--copy", action="store_true", help="also time the plain copy (buffered writes, no write-behind)")
    ap.add_argument("--baseline-tree", type=Path, default=None, metavar="DIR",
                    help="also run the streams with the code of another checkout (e.g. main's), alternating "
                         "with this one in the same run: rows base:*")
    ap.add_argument("--cold", action="store_true",
                    help="drop the page cache before every timed run (needs root), as for parents "
                         "larger than the RAM: then hashing sources in a second pass would read them twice")
    args = ap.parse_args()
    global COLD
    COLD = args.cold
    if COLD:
        drop_caches()

    import torch

    from checkpoints_tools.ops import expected_shapes
    from jam_metaseq.models.config import cross_of, uniform_of, width_of

    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="bench_ckpt_"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        cfg = parent_config(args.preset, args.layers)
        lo, hi = cfg.vocab_size // 2, cfg.vocab_size  # any image-code range: the cost does not depend on it
        base = run_child("import", {})
        t = time.perf_counter()
        stamp = {"preset": args.preset, "dtype": args.dtype, "mp": args.mp, "layers": args.layers,
                 "format": args.format}
        done = "config.json" if args.format == "hf" else "manifest.json"
        for name, seed in (("llm", 1), ("img", 2)):
            tag = scratch / f"{name}.json"
            if tag.is_file() and json.loads(tag.read_text()) == stamp and (scratch / name / done).is_file():
                continue
            shutil.rmtree(scratch / name, ignore_errors=True)
            r = run_child("parent", {"out": str(scratch / name), "preset": args.preset, "seed": seed,
                                     "mp": args.mp, "dtype": args.dtype, "layers": args.layers,
                                     "format": args.format})
            if "error" in r:
                raise SystemExit(f"making parent {name}: {r['error']}")
            tag.write_text(json.dumps(stamp))
        parent_bytes = dir_bytes(scratch / "llm") + dir_bytes(scratch / "img")
        itemsize = getattr(torch, args.dtype).itemsize
        print(f"# preset {args.preset}{f' ({args.layers} layers)' if args.layers else ''}, {args.format} parents, "
              f"{args.dtype}, MP={args.mp}, --hash-sources {' '.join(args.hash_sources)}{', cold page cache' if args.cold else ''}; "
              f"parents {parent_bytes / 2**30:.2f} GiB "
              f"(made in {time.perf_counter() - t:.1f} s); bare `import torch` RSS {base['maxrss'] / 2**20:.0f} MiB",
              file=sys.stderr)
        rows = []
        for op in args.ops:
            tcfg = {"merge": uniform_of(cfg), "widen": width_of(cfg),
                    "cross": cross_of(cfg, 2, image_vocab_start=lo, image_vocab_end=hi)}[op]
            largest = max(int(torch.Size(s).numel()) for s in expected_shapes(tcfg).values()) * itemsize
            job = {"op": op, "llm": str(scratch / "llm"), "img": str(scratch / "img"), "mp": args.mp,
                   "image_vocab": [lo, hi]}
            streams = [(f"stream:{h}", h, None) for h in args.hash_sources]
            if args.baseline_tree:
                streams += [(f"base:{h}", h, args.baseline_tree) for h in args.hash_sources]
            copies = (("copy", False), ("floor", True)) if args.copy else (("floor", True),)
            runs: dict[str, list[dict]] = {**{m: [] for m, _, _ in streams}, **{m: [] for m, _ in copies}}
            out_bytes = 0
            for _ in range(max(1, args.repeat)):
                for m, h, tree in streams:
                    runs[m].append(run_child("stream", {**job, "out": str(scratch / f"{op}_stream"),
                                                        "hash_sources": h}, tree))
                    out_bytes = out_bytes or dir_bytes(scratch / f"{op}_stream")
                    shutil.rmtree(scratch / f"{op}_stream", ignore_errors=True)
                for m, wb in copies:
                    runs[m].append(run_child("copy", {"srcs": [job["llm"], job["img"]], "write_behind": wb,
                                                      "out": str(scratch / f"{op}_copy"), "out_bytes": out_bytes}))
                    shutil.rmtree(scratch / f"{op}_copy", ignore_errors=True)
            res: dict[str, dict] = {}
            for m, rs in runs.items():
                bad = [r for r in rs if "error" in r]
                res[m] = bad[0] if bad else {"seconds": statistics.median(r["seconds"] for r in rs),
                                             "cpu": statistics.median(r.get("cpu", float("nan")) for r in rs),
                                             "maxrss": max(r["maxrss"] for r in rs),
                                             "all": [r["seconds"] for r in rs]}
            for m in runs:  # same-run ratios: the median over the repeats of (this run / its floor run)
                if "error" not in res[m] and "error" not in res["floor"]:
                    res[m]["x_floor"] = statistics.median(s["seconds"] / f["seconds"]
                                                          for s, f in zip(runs[m], runs["floor"]))
            if not args.no_naive:
                res["naive"] = run_child("naive", {**job, "out": str(scratch / f"{op}_naive")})
                shutil.rmtree(scratch / f"{op}_naive", ignore_errors=True)
            row = (op, largest, out_bytes, [m for m, _, _ in streams], res)
            rows.append(row)
            _print_rows([row], base=base, parent_bytes=parent_bytes, header=len(rows) == 1)
        print("\nx floor: wall time / the floor's in the same repeat (median over repeats; the issue's target "
              "is <= 1.25x). floor: read every input byte and write the output's bytes through jam-ckpt's "
              "write-behind (io.hashed_file.WriteBehind), fsync; copy: the same with plain buffered writes. cpu s: "
              "user + system seconds of the process (all threads). RSS budget: 2 x largest tensor + 1 GiB.")
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
