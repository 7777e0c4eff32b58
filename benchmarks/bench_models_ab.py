"""The core models of this checkout against another checkout's (a baseline commit), in one process.

``jam_metaseq.models`` of the baseline is imported under another name (the package imports only
itself, relatively), both versions are built from one config and loaded with the same weights,
and each step is timed in turns, A then B, many times: load from other processes hits both alike,
and the table gives the median time of each and their ratio (this / baseline; < 1 is faster), and
the ratio of the fastest turns (the least disturbed on a shared machine).
Steps: a training step (forward + next-token cross-entropy + backward), a prefill, and one-token
decode steps through the KV cache, eager (keys grow) and static (``span=``, the CUDA-graph step).

    python benchmarks/bench_models_ab.py --baseline ../base-checkout          # tiny, opt_125m
    python benchmarks/bench_models_ab.py --baseline ../main --shapes tiny,llama_tiny --repeats 50

A shape the baseline does not know (e.g. a preset added since) is skipped with a note.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import jam_metaseq.models as this


def load_models_package(root: Path, name: str = "jam_models_baseline"):
    """``root/jam_metaseq/models`` as a package of its own (``name``)."""
    pkg = root / "jam_metaseq" / "models"
    spec = importlib.util.spec_from_file_location(name, pkg / "__init__.py", submodule_search_locations=[str(pkg)])
    if spec is None or spec.loader is None:
        raise SystemExit(f"bench_models_ab: no jam_metaseq/models package under {root}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def build(models, cfg_dict: dict) -> torch.nn.Module:
    """The model of ``cfg_dict`` (``config_to_json``'s dict) from one version of the package."""
    torch.manual_seed(0)
    return models.build_model(models.config_from_dict(cfg_dict))


def make_steps(model, *, tokens: torch.Tensor, decode: int) -> dict[str, Callable[[], None]]:
    """The timed steps on one model: each is a fresh call (new cache), so turns are independent."""
    B, T = tokens.shape
    targets = tokens[:, 1:].reshape(-1)

    def train() -> None:
        model.train()
        logits = model(tokens)
        F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets).backward()
        model.zero_grad(set_to_none=True)

    def prefill() -> None:
        model.eval()
        with torch.inference_mode():
            model(tokens, cache=model.setup_caches(B, T + decode))

    def decode_steps(static: bool) -> Callable[[], None]:
        def run() -> None:
            model.eval()
            with torch.inference_mode():
                cache = model.setup_caches(B, T + decode)
                model(tokens, cache=cache)
                feed = tokens[:, -1:]
                for _ in range(decode):
                    model(feed, cache=cache, span=cache.max_len) if static else model(feed, cache=cache)
        return run

    return {"train step": train, "prefill": prefill, f"prefill + {decode} eager": decode_steps(False),
            f"prefill + {decode} static": decode_steps(True)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--baseline", required=True, type=Path, help="root of the baseline checkout")
    ap.add_argument("--shapes", default="tiny,opt_125m", help="comma-separated presets")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--decode", type=int, default=16, help="one-token steps after the prefill")
    ap.add_argument("--repeats", type=int, default=15, help="timed turns per step and version (median)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="cpu: this process's CPU time (time spent waiting for a core on a shared machine "
                    "does not count; use with --threads 1); wall: elapsed time")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    base = load_models_package(args.baseline.resolve())
    print(f"# this={Path(this.__file__).parents[2]} baseline={args.baseline} batch={args.batch} seq={args.seq} "
          f"repeats={args.repeats} threads={args.threads} clock={args.clock} torch={torch.__version__}")
    print(f"{'shape':<12}{'step':<24}{'this ms':>10}{'baseline ms':>13}{'this/baseline':>15}{'of the minima':>15}")
    for shape in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        if shape not in base.PRESETS:
            print(f"{shape:<12}(not a preset of the baseline: skipped)")
            continue
        cfg = dataclasses.replace(this.preset(shape), max_positions=max(args.seq + args.decode, 8))
        cfg_dict = cfg.to_dict()
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(4, cfg.vocab_size, (args.batch, args.seq), generator=g)
        a, b = build(this, cfg_dict), build(base, cfg_dict)
        b.load_state_dict(a.state_dict(), strict=True)  # same weights: same work
        sa, sb = make_steps(a, tokens=tokens, decode=args.decode), make_steps(b, tokens=tokens, decode=args.decode)
        for name in sa:
            times: dict[str, list[float]] = {"a": [], "b": []}
            for r in range(args.repeats + 1):  # the first turn warms up
                for key, fn in (("a", sa[name]), ("b", sb[name])) if r % 2 else (("b", sb[name]), ("a", sa[name])):
                    t0 = clock()
                    fn()
                    if r:
                        times[key].append(clock() - t0)
            ma, mb = statistics.median(times["a"]), statistics.median(times["b"])
            least = min(times["a"]) / min(times["b"])  # the least disturbed turn of each
            print(f"{shape:<12}{name:<24}{ma * 1e3:>10.2f}{mb * 1e3:>13.2f}{ma / mb:>14.3f}x{least:>14.3f}x",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
