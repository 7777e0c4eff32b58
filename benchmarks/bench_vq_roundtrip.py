"""Round-trip stability and reconstruction error of the tiny image tokenizer (paper §3.1
"Tokenizers"), trained with and without the cycle-consistency loss, same seeds, same run.

    python benchmarks/bench_vq_roundtrip.py [--resolution 32] [--steps 600] [--seeds 0 1 2]

For each seed it trains the baseline (``cycle_weight=0``) and each ``--cycle-weights`` entry
(default: ``TrainConfig``'s) on procedural shapes (``pool_size`` images from seed ``s``), then measures on held-out shapes (seed
12345): reconstruction MSE in [-1, 1] pixels, and the fraction of codes identical after
encode -> decode (uint8 PNG pixels) -> encode. Prints a table with ratios to the baseline. The
defaults are the quickstart's tokenizer (32 px -> 8x8 codes of 64, 600 steps); ``--resolution 16
--steps 300 --pool-size 512`` is the test suite's model.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from jam_metaseq.image_tokenizer import preset, shape_samples, train_tiny_tokenizer  # noqa: E402
from jam_metaseq.image_tokenizer.train import TrainConfig  # noqa: E402


def measure(tok, images) -> tuple[float, float]:
    """(held-out reconstruction MSE, encode -> decode -> encode code agreement)."""
    x = tok.preprocess(images)
    mse = float(((tok.decode(tok.encode(x)) - x) ** 2).mean())
    codes = tok.encode_images(images)
    again = tok.encode_images(tok.decode_codes(codes))
    return mse, float((codes == again).mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--resolution", type=int, default=32, help="image side (32: the tiny preset; 16: the tests' model)")
    ap.add_argument("--steps", type=int, default=600, help="training steps per model (quickstart: 600)")
    ap.add_argument("--pool-size", type=int, default=1024, help="training images per seed")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds; each trains both variants")
    ap.add_argument("--held-out", type=int, default=256, help="held-out images measured")
    ap.add_argument("--cycle-weights", type=float, nargs="+", default=[TrainConfig.cycle_weight],
                    help=f"cycle-consistency weights compared with the baseline (default {TrainConfig.cycle_weight})")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = preset("tiny") if args.resolution == 32 else preset("tiny", resolution=args.resolution, channel_multipliers=(1, 2))
    held_out = [s.image for s in shape_samples(args.held_out, size=args.resolution, seed=12345)]
    variants = [("baseline (no cycle loss)", 0.0)] + [(f"cycle loss w={w:g}", w) for w in args.cycle_weights if w > 0]
    rows: dict[str, list[tuple[float, float, float]]] = {name: [] for name, _ in variants}
    for seed in args.seeds:
        for name, w in variants:
            t0 = time.perf_counter()
            tok = train_tiny_tokenizer(None, out_path=None, steps=args.steps, seed=seed, config=cfg, progress=False,
                                       pool_size=args.pool_size, cycle_weight=w)
            secs = time.perf_counter() - t0
            mse, agree = measure(tok, held_out)
            rows[name].append((secs, mse, agree))
            print(f"  seed {seed} {name}: {secs:.0f} s, MSE {mse:.4f}, agreement {agree:.3f}", file=sys.stderr)
    print(f"tiny tokenizer {args.resolution} px -> {cfg.grid[0]}x{cfg.grid[1]} codes of {cfg.n_codes}, "
          f"{args.steps} steps, seeds {args.seeds}, {args.held_out} held-out images; means over seeds")
    print(f"{'variant':<28} {'train s':>8} {'MSE':>8} {'vs base':>8} {'agree':>7} {'min':>7} {'vs base':>8}")
    base = np.mean(rows[variants[0][0]], axis=0)
    for name, _ in variants:
        r = np.asarray(rows[name])
        secs, mse, agree = r.mean(axis=0)
        print(f"{name:<28} {secs:>8.1f} {mse:>8.4f} {mse / base[1]:>8.3f} {agree:>7.3f} {r[:, 2].min():>7.3f} "
              f"{agree / base[2]:>8.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
