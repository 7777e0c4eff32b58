"""``jam-vq``: train a small image tokenizer, turn images into codes, and codes back into PNGs.

    jam-vq train  --out DIR [--steps N] [--images PATH ...]     -> DIR/vqgan.ckpt + DIR/vqgan.yaml
    jam-vq encode --tokenizer PATH --out codes.npy IMAGE|DIR|LIST.jsonl ...   -> (N, h, w) int64
    jam-vq decode --tokenizer PATH --codes codes.npy --out-dir DIR            -> DIR/000000.png ...

``--tokenizer`` is a directory with ``vqgan.ckpt`` + ``vqgan.yaml`` (taming / Chameleon layout) or
one of the two files. Paper §3.1 Tokenizers. Progress goes to stderr; on bad input the command
exits with status 2 and a one-line message naming the file or flag.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from jam_metaseq.errors import JamError, add_trust_pickle_flag, run_cli
from jam_metaseq.inputs import NON_NEGATIVE_FLOAT, POSITIVE_FLOAT, POSITIVE_INT, SEED, THREADS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Image files, directories (their images, sorted) and JSONL files of ``{"image": path}``."""
    paths: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise JamError(f"{p}: directory holds no images ({', '.join(IMAGE_SUFFIXES)})")
            paths.extend(found)
        elif p.suffix == ".jsonl":
            if not p.is_file():
                raise JamError(f"{p}: no such file")
            from jam_metaseq.data.documents import DocumentError, parse_jsonl_line

            with open(p, "rb") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = parse_jsonl_line(line)
                    except DocumentError as e:
                        raise e.at(f"{p}:{lineno}") from None
                    if not isinstance(rec, dict) or not isinstance(rec.get("image"), str):
                        raise JamError(f"{p}:{lineno}: expected an object with an \"image\" path")
                    img = Path(rec["image"])
                    paths.append(img if img.is_absolute() else p.parent / img)
        elif p.is_file():
            paths.append(p)
        else:
            raise JamError(f"{p}: no such file or directory")
    for p in paths:
        if not p.is_file():
            raise JamError(f"{p}: no such image file")
    return paths


def _save_npy(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npy", dir=path.parent)
    os.close(fd)
    try:
        np.save(tmp, arr)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cmd_train(args: argparse.Namespace) -> int:
    from .config import preset
    from .train import train_tiny_tokenizer

    overrides, extra = {}, {}
    if args.resolution is not None:
        overrides["resolution"] = args.resolution
    if args.codes is not None:
        overrides["n_codes"] = args.codes
    try:
        cfg = preset(args.preset, **overrides)
    except (KeyError, ValueError) as e:
        raise JamError(f"--preset/--resolution/--codes: {e}") from None
    images = [str(p) for p in _expand_inputs(args.images)] if args.images else None
    if args.cycle_weight is not None:
        extra["cycle_weight"] = args.cycle_weight
    tok = train_tiny_tokenizer(
        images,
        out_path=args.out,
        steps=args.steps,
        seed=args.seed,
        config=cfg,
        progress=not args.quiet,
        batch_size=args.batch_size,
        lr=args.lr,
        codebook=args.codebook,
        pool_size=args.pool_size,
        num_threads=args.threads,
        **extra,
    )
    print(
        json.dumps(
            {"out": str(args.out), "resolution": tok.resolution, "grid": list(tok.grid), "n_codes": tok.n_codes}
        )
    )
    return 0


def _load(args: argparse.Namespace):
    from .tokenizer import load_image_tokenizer

    return load_image_tokenizer(
        args.tokenizer, device=args.device, trust_pickle=args.trust_pickle, batch_size=args.batch_size
    )


def cmd_encode(args: argparse.Namespace) -> int:
    paths = _expand_inputs(args.inputs)
    tok = _load(args)
    from tqdm import tqdm

    h, w = tok.grid
    codes = np.zeros((len(paths), h, w), dtype=np.int64)
    bs = tok.batch_size
    for start in tqdm(range(0, len(paths), bs), desc="encode", file=sys.stderr, disable=args.quiet, leave=False):
        codes[start : start + bs] = tok.encode_files(paths[start : start + bs])
    _save_npy(Path(args.out), codes)
    print(json.dumps({"out": args.out, "images": len(paths), "grid": [h, w], "n_codes": tok.n_codes}))
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    try:
        codes = np.load(args.codes)
    except (OSError, ValueError) as e:
        raise JamError(f"{args.codes}: cannot read codes ({e})") from None
    tok = _load(args)
    h, w = tok.grid
    if codes.shape == (h, w):  # one grid
        codes = codes[None]
    if codes.ndim == 2 and codes.shape[1] == h * w:
        codes = codes.reshape(-1, h, w)
    if codes.ndim != 3 or codes.shape[1:] != (h, w):
        raise JamError(f"{args.codes}: codes of shape {codes.shape}, tokenizer expects (N, {h}, {w})")
    if not np.issubdtype(codes.dtype, np.integer):
        raise JamError(f"{args.codes}: codes must be integers, got {codes.dtype}")
    if codes.size and (codes.min() < 0 or codes.max() >= tok.n_codes):
        raise JamError(f"{args.codes}: codes span [{codes.min()}, {codes.max()}], tokenizer has {tok.n_codes}")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm

    bs = tok.batch_size
    written = []
    for start in tqdm(range(0, len(codes), bs), desc="decode", file=sys.stderr, disable=args.quiet, leave=False):
        for i, img in enumerate(tok.decode_codes(codes[start : start + bs]), start):
            dst = out / f"{i:06d}.png"
            tmp = out / f".{dst.name}.tmp"
            try:
                img.save(tmp, format="PNG")
                os.replace(tmp, dst)
            finally:
                tmp.unlink(missing_ok=True)  # interrupted or failed: no stray temp file
            written.append(str(dst))
    print(json.dumps({"out_dir": str(out), "images": len(written)}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jam-vq",
        description="VQGAN image tokenizer (taming/Chameleon layout): train a small one, encode, decode.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--quiet", action="store_true", help="no progress bar on stderr")

    t = sub.add_parser("train", help="train a small tokenizer on CPU and save it to --out")
    t.add_argument("--out", required=True, help="output directory for vqgan.ckpt + vqgan.yaml")
    t.add_argument("--images", nargs="*", default=None,
                   help="training images: files, directories or JSONL of {\"image\": path}; "
                        "default: procedural coloured shapes")
    t.add_argument("--preset", default="tiny", help="model preset (tiny, make_a_scene_256, chameleon_512)")
    t.add_argument("--resolution", type=POSITIVE_INT, default=None, help="override the preset's image side in pixels")
    t.add_argument("--codes", type=POSITIVE_INT, default=None, help="override the preset's codebook size")
    t.add_argument("--steps", type=POSITIVE_INT, default=1500, help="optimizer steps (default 1500)")
    t.add_argument("--batch-size", type=POSITIVE_INT, default=16, help="images per step (default 16)")
    t.add_argument("--lr", type=POSITIVE_FLOAT, default=1e-3, help="peak Adam learning rate, cosine-decayed (default 1e-3)")
    t.add_argument("--codebook", choices=("ema", "loss"), default="ema",
                   help="codebook update: moving average (ema) or VQ loss gradient (loss)")
    t.add_argument("--cycle-weight", type=NON_NEGATIVE_FLOAT, default=None,
                   help="weight of the cycle-consistency loss that keeps encode -> decode -> encode stable "
                        "(0 = off; default: TrainConfig's, 0.02)")
    t.add_argument("--pool-size", type=POSITIVE_INT, default=1024,
                   help="synthetic images generated up front when --images is not given (default 1024)")
    t.add_argument("--seed", type=SEED, default=0, help="seed for weights, data and batch order")
    t.add_argument("--threads", type=THREADS, default=None, help="torch CPU threads while training")
    common(t)
    t.set_defaults(func=cmd_train)

    def tok_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--tokenizer", required=True,
                        help="directory with vqgan.ckpt + vqgan.yaml, or one of those files")
        sp.add_argument("--device", default="cpu", help="torch device (default cpu)")
        sp.add_argument("--batch-size", type=POSITIVE_INT, default=16, help="images per forward pass (default 16)")
        add_trust_pickle_flag(sp)
        common(sp)

    e = sub.add_parser("encode", help="images -> codes.npy of shape (N, h, w), int64")
    e.add_argument("inputs", nargs="+", help="image files, directories, or JSONL files of {\"image\": path}")
    e.add_argument("--out", required=True, help="output .npy path")
    tok_args(e)
    e.set_defaults(func=cmd_encode)

    d = sub.add_parser("decode", help="codes.npy of shape (N, h, w) or (N, h*w) -> PNG files")
    d.add_argument("--codes", required=True, help="input .npy of integer codes")
    d.add_argument("--out-dir", required=True, help="directory for 000000.png, 000001.png, ...")
    tok_args(d)
    d.set_defaults(func=cmd_decode)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(f"jam-vq {args.command}", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
