"""Image tokens per second of the JAM generator with classifier-free guidance (paper §3.1, Eq. 6),
next to Hugging Face ``generate`` on an ``OPTForCausalLM`` of the same shape, measured in the same
run.

Both sides produce one N-token image per prompt with top-p sampling: the engine runs each prompt as
a CFG pair (prompt + ``<mask>`` prompt, 2B rows, one forward pass per step, image tokens guided);
HF runs the same 2B rows as independent sequences with its KV cache (the baseline the issue names:
"batch 2 = one CFG pair"). Throughput counts one image per pair: B * N / seconds.

``--modes`` picks the engine's decode modes (``Engine(decode=...)``): ``eager`` (keys grow every
step), ``static`` (fixed shapes, state read only at planned points) and ``graph`` (static steps
replayed as CUDA graphs). The graph engine is warmed up with one full-length call (it allocates the
cache it keeps and captures the graphs, so capture is not timed), the others with an 8-token call.
A cell that fails prints its error and the table shows "failed"; the other cells still run. Every
finished cell is printed to stderr at once, and SIGTERM or Ctrl-C (e.g. ``timeout 170 python ...``)
prints the table of the cells finished so far. Cells run in the order of ``--modes``, after HF.

On an accelerator (``--device cuda``) the table adds, per shape, seconds per image next to the
memory-bandwidth bound ``weight bytes / bandwidth * (N + 1)`` (``--bandwidth-tbs``, default guessed
from the device name); "s/run" is the wall time of one call (one image per prompt), so at batch 1
it is the seconds per image. CPU runs are best pinned with ``--threads``: on a shared machine
oversubscribed threads dominate the timings.

    python benchmarks/bench_generate.py                               # CPU: tiny and opt_125m, batch 1 and 8
    python benchmarks/bench_generate.py --shapes opt_125m --image-tokens 256 --batch 1,8
    python benchmarks/bench_generate.py --device cuda --dtype bfloat16 --shapes cm3leon_7b --batch 1,8
    python benchmarks/bench_generate.py --device cuda --dtype bfloat16 --shapes opt_1_3b --modes eager,static,graph
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import time
import traceback
import warnings

import torch

from jam_metaseq.generation.engine import DECODE_MODES, Engine, GenerationConfig
from jam_metaseq.generation.sampling import SamplingConfig
from jam_metaseq.generation.cfg import unconditional_prompt
from jam_metaseq.models import build_model, count_parameters, preset
from jam_metaseq.vocab import VocabManifest

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BANDWIDTH_TBS = {"H200": 4.8, "H100": 3.35, "A100": 2.0}
OPT_VOCAB = 50272
NUM_SENTINELS = 16
IMAGE_CODES = 8192


def bench_vocab(vocab_size: int, image_tokens: int) -> VocabManifest:
    """A manifest whose size is exactly ``vocab_size``: 8192 image codes, the rest text."""
    side = int(math.isqrt(image_tokens))
    if side * side != image_tokens:
        raise SystemExit(f"--image-tokens {image_tokens} is not a square grid")
    text = vocab_size - (4 + IMAGE_CODES + 1 + NUM_SENTINELS + 1)
    v = VocabManifest(text_size=text, image_codes=IMAGE_CODES, num_sentinels=NUM_SENTINELS,
                      image_tokens_per_image=image_tokens, image_grid=(side, side))
    if v.size != vocab_size:
        raise SystemExit(f"vocab {vocab_size} is not a multiple of {v.pad_to_multiple}")
    return v


def prompts(vocab: VocabManifest, batch: int) -> list[list[int]]:
    """Text prompts ending in <break>: the image starts at once, so every step is an image step."""
    return [[vocab.eos] + [vocab.text_start + 100 + 7 * i + j for j in range(12)] + [vocab.break_id]
            for i in range(batch)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_engine(model, vocab, batch: int, *, device: str, repeats: int, mode: str) -> tuple[float, str]:
    """Best seconds per call, and the decode mode that ran (``graph`` may fall back to ``static``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        engine = Engine(model, vocab=vocab, decode=mode)
    sampling = SamplingConfig(temperature=1.0, top_p=0.9)
    cfg = GenerationConfig(max_new_tokens=vocab.image_tokens_per_image + 1, text=sampling, image=sampling,
                           guidance_scale=3.5, max_images=1, check_done_every=64)
    ps = prompts(vocab, batch)
    warm = cfg if mode == "graph" else GenerationConfig(**{**cfg.__dict__, "max_new_tokens": 8})
    sync(device)
    t = time.perf_counter()
    engine.generate(ps, config=warm)
    sync(device)
    if engine.static is not None:
        print(f"    {mode}: warm-up {time.perf_counter() - t:.2f} s, {len(engine.static.graphs)} graphs captured",
              file=sys.stderr, flush=True)
    best = float("inf")
    for r in range(repeats):
        sync(device)
        t = time.perf_counter()
        answers = engine.generate(ps, config=cfg, seeds=[r * batch + i for i in range(batch)])
        sync(device)
        best = min(best, time.perf_counter() - t)
        assert all(a.images and a.images[0].complete for a in answers)
    return best, engine.decode_mode


def hf_model(cfg, *, device: str, dtype: torch.dtype):
    from transformers import OPTConfig, OPTForCausalLM

    hf_cfg = OPTConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim, num_hidden_layers=cfg.layers,
        ffn_dim=cfg.ffn_dim, num_attention_heads=cfg.heads, max_position_embeddings=cfg.max_positions,
        word_embed_proj_dim=cfg.embed_dim, do_layer_norm_before=True, enable_bias=cfg.bias,
        activation_function=cfg.activation, dropout=0.0, attention_dropout=0.0, pad_token_id=1,
        bos_token_id=2, eos_token_id=2,
    )
    hf_cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = OPTForCausalLM(hf_cfg)
    return model.to(dtype=dtype).eval()


def time_hf(model, vocab, batch: int, *, device: str, repeats: int) -> float:
    ps = prompts(vocab, batch)
    rows = ps + [unconditional_prompt(p, vocab=vocab) for p in ps]  # one CFG pair per prompt
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), vocab.pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = torch.tensor(r)
        mask[i, L - len(r):] = 1
    ids, mask = ids.to(device), mask.to(device)
    n = vocab.image_tokens_per_image
    kw = dict(do_sample=True, top_p=0.9, top_k=0, temperature=1.0, pad_token_id=vocab.pad,
              eos_token_id=vocab.eos, use_cache=True)
    with torch.inference_mode():
        model.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, **kw)
        best = float("inf")
        for _ in range(repeats):
            sync(device)
            t = time.perf_counter()
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, **kw)
            sync(device)
            best = min(best, time.perf_counter() - t)
            assert out.shape[1] == L + n
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="tiny,opt_125m", help="comma-separated presets (jam_metaseq.models.config.PRESETS)")
    p.add_argument("--batch", default="1,8", help="comma-separated prompt counts (each a CFG pair: 2x rows)")
    p.add_argument("--image-tokens", type=int, default=1024, help="tokens per image (a square grid)")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights/activations dtype")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per cell (best is kept)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--no-hf", action="store_true", help="skip the HF baseline")
    p.add_argument("--modes", default="",
                   help="engine decode modes, comma-separated: eager, static, graph "
                   "(default: eager,static,graph on CUDA, eager,static elsewhere)")
    p.add_argument("--bandwidth-tbs", type=float, default=0.0,
                   help="device memory bandwidth in TB/s for the bound (default: guessed from the name)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    batches = [int(b) for b in args.batch.split(",")]
    modes = (args.modes or ("eager,static,graph" if args.device.startswith("cuda") else "eager,static")).split(",")
    bad = [m for m in modes if m not in DECODE_MODES]
    if bad:
        raise SystemExit(f"unknown --modes {bad}; choose from {', '.join(DECODE_MODES)}")
    bandwidth = args.bandwidth_tbs
    if args.device.startswith("cuda") and not bandwidth:
        name = torch.cuda.get_device_name()
        bandwidth = next((bw for k, bw in BANDWIDTH_TBS.items() if k in name), 0.0)
    rows = []
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        run_shapes(args, rows, modes=modes, dtype=dtype, batches=batches, bandwidth=bandwidth)
    except KeyboardInterrupt:
        print("  interrupted: the table holds the cells finished so far", file=sys.stderr, flush=True)
    print_table(rows, image_tokens=args.image_tokens)
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run_shapes(args, rows: list, *, modes: list[str], dtype: torch.dtype, batches: list[int], bandwidth: float) -> None:
    print(f"device {args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else 'CPU'}), "
          f"dtype {args.dtype}, threads {torch.get_num_threads()}, N = {args.image_tokens} tokens per image, "
          "CFG alpha 3.5, top-p 0.9", file=sys.stderr)
    for shape in args.shapes.split(","):
        base = preset(shape)
        vocab_size = base.vocab_size if base.vocab_size >= 16384 else OPT_VOCAB
        cfg = preset(shape, vocab_size=vocab_size, max_positions=max(base.max_positions, args.image_tokens + 64),
                     dropout=0.0, attention_dropout=0.0)
        vocab = bench_vocab(vocab_size, args.image_tokens)
        model = hf = None
        try:
            torch.manual_seed(0)
            with torch.device(args.device):
                model = build_model(cfg)
            model = model.to(dtype=dtype).eval()
            hf = None if args.no_hf or not cfg.bias or not cfg.affine_ln else hf_model(cfg, device=args.device, dtype=dtype)
        except Exception as e:  # noqa: BLE001 -- report and go on with the next shape
            print(f"  {shape}: building the models failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            rows.append((shape, 0, "models", float("nan"), float("nan"), float("nan")))
            continue
        weight_bytes = count_parameters(cfg) * torch.finfo(dtype).bits // 8
        for b in batches:
            bound = weight_bytes / (bandwidth * 1e12) * (args.image_tokens + 1) if bandwidth else float("nan")
            t_hf = float("nan")
            if hf is not None:
                t_hf = run_cell(f"{shape} batch {b} HF", lambda: time_hf(
                    hf, vocab, b, device=args.device, repeats=args.repeats))
                rows.append((shape, b, "HF generate", t_hf, t_hf, bound))
            for mode in modes:
                result = run_cell(f"{shape} batch {b} {mode}", lambda: time_engine(
                    model, vocab, b, device=args.device, repeats=args.repeats, mode=mode))
                t, ran = result if isinstance(result, tuple) else (result, mode)
                if not math.isnan(t):
                    vs_hf = "" if math.isnan(t_hf) else f", {t_hf / t:.2f}x HF"
                    print(f"    -> {b * args.image_tokens / t:.1f} img tok/s{vs_hf}", file=sys.stderr, flush=True)
                rows.append((shape, b, f"engine {mode}" if ran == mode else f"engine {mode} (ran {ran})", t, t_hf, bound))
        model = hf = None  # free both before the next shape's
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


def print_table(rows: list, *, image_tokens: int) -> None:
    n = image_tokens
    print("\n| shape | batch (CFG pairs) | generator | img tok/s | vs HF | s/run | bound s/image | s/run / bound |")
    print("|---|---|---|---|---|---|---|---|")
    for shape, b, name, t, t_hf, bound in rows:
        if math.isnan(t):
            print(f"| {shape} | {b} | {name} | failed | | | | |")
            continue
        vs_hf = "-" if math.isnan(t_hf) else f"{t_hf / t:.2f}x"
        vs_bound = ("-", "-") if math.isnan(bound) else (f"{bound:.2f}", f"{t / bound:.2f}x")
        print(f"| {shape} | {b} | {name} | {b * n / t:.1f} | {vs_hf} | {t:.2f} | {vs_bound[0]} | {vs_bound[1]} |",
              flush=True)


def run_cell(label: str, fn):
    """``fn()``, or NaN after printing the error (one failing cell must not cost the others)."""
    print(f"  {label} ...", file=sys.stderr, flush=True)
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 -- CUDA OOM, a capture bug, an HF API change: report, continue
        print(f"  {label}: FAILED {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        traceback.print_exc(limit=4, file=sys.stderr)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return float("nan")
    t = result[0] if isinstance(result, tuple) else result
    print(f"  {label}: {t:.3f} s/run", file=sys.stderr, flush=True)
    return result


if __name__ == "__main__":
    sys.exit(main())
