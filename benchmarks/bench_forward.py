"""Training-step throughput of the core models (paper §2.1): our metaseq-layout decoder, JAM-Width and
JAM-Cross, each next to HF transformers' ``OPTForCausalLM`` (SDPA) of the same shape measured in the
same run; for a Llama-family shape (``llama_tiny``, ``gemma_2b`` ...) the HF rows are that family's
class (``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``GemmaForCausalLM``, named ``hf_llama`` ...).

    python benchmarks/bench_forward.py                       # CPU: tiny and opt_125m shapes, fp32
    python benchmarks/bench_forward.py --shapes llama_tiny,qwen2_0_5b --seq 64   # Llama family on CPU
    python benchmarks/bench_forward.py --device cuda --dtype bf16 --shapes opt_1_3b \
        --batch 8 --seq 2048 --optimizer                     # GPU: MFU of a full training step

One step = forward + next-token cross-entropy + backward (+ a fused AdamW step with ``--optimizer``).
Rows: ``hf_opt`` (baseline), ``decoder`` (ours, same shape; target >= 1.0x), ``hf_opt_wide`` and
``jam_width`` (a decoder of width 2E), ``jam_cross_k`` (two parent branches, a cross-block pair every k
layers). For JAM-Cross the table also gives the ratio to our decoder that the FLOP count predicts and
measured/predicted (target: within 10%). FLOPs per token follow the PaLM convention:
6 * (weights of every matmul, output projection included) + 12 * (attention modules) * E * T;
MFU = tokens/s * FLOPs per token / peak (``--peak-tflops``, dense bf16).

On CPU the models of one shape are timed round-robin, one step each in turn, so that load from other
processes hits them alike; the median step is reported (on a shared machine ``--threads 1`` gives
steadier ratios). On CUDA they run one after the other, each built on the device and freed after.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from jam_metaseq.models import PRESETS, DecoderConfig, build_model, cross_of, width_of

MODEL_KINDS = ("hf_opt", "decoder", "hf_opt_wide", "jam_width", "jam_cross")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Row:
    shape: str
    name: str
    params: int
    flops_per_token: float
    step_s: float = float("nan")
    tokens_per_s: float = float("nan")
    baseline: str | None = None
    """Row name whose tokens/s this row is divided by (the HF model of the same shape)."""
    predicted_vs_decoder: float | None = None
    """JAM-Cross only: decoder FLOPs / JAM-Cross FLOPs (the throughput ratio the FLOPs predict)."""
    error: str | None = None


def hf_opt(cfg: DecoderConfig) -> nn.Module:
    """HF ``OPTForCausalLM`` with SDPA attention describing the same function family as ``cfg``."""
    try:
        from transformers import OPTConfig, OPTForCausalLM
    except ImportError as e:  # pragma: no cover - dev extra missing
        raise SystemExit(f"bench_forward: the HF baseline needs transformers (pip install .[dev]): {e}")
    hf_cfg = OPTConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim, ffn_dim=cfg.ffn_dim,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        max_position_embeddings=cfg.max_positions, word_embed_proj_dim=cfg.embed_dim,
        do_layer_norm_before=True, dropout=0.0, attention_dropout=0.0, layerdrop=0.0,
        activation_function=cfg.activation, enable_bias=cfg.bias,
        layer_norm_elementwise_affine=cfg.affine_ln, pad_token_id=cfg.padding_idx,
        bos_token_id=0, eos_token_id=2, tie_word_embeddings=True,
    )
    return OPTForCausalLM._from_config(hf_cfg, attn_implementation="sdpa")


def hf_reference(cfg: DecoderConfig) -> nn.Module:
    """The HF model computing ``cfg``'s function: OPT, or the Llama-family class ``hf_families`` names."""
    if cfg.learned_positions:
        return hf_opt(cfg)
    from transformers import AutoConfig
    import transformers

    from jam_metaseq.models import hf_families

    written = hf_families.hf_config(cfg)
    hf_cfg = AutoConfig.for_model(written["model_type"]).from_dict(written)
    return getattr(transformers, written["architectures"][0])._from_config(hf_cfg, attn_implementation="sdpa")


def hf_row_name(kind: str, cfg: DecoderConfig) -> str:
    """``hf_opt`` / ``hf_opt_wide`` rows are named after the shape's family (``hf_llama_wide`` ...)."""
    if not kind.startswith("hf_opt") or cfg.learned_positions:
        return kind
    from jam_metaseq.models import hf_families

    return kind.replace("opt", hf_families.family_for(cfg).model_type)


def matmul_weights(model: nn.Module) -> int:
    """Weights used in matmuls: every ``nn.Linear`` once per use (a tied output projection counts)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def attention_modules(model: nn.Module) -> int:
    """Self- and cross-attention modules (each attends over the whole sequence once per step)."""
    names = ("SelfAttention", "CrossAttention", "OPTAttention", "LlamaAttention", "Qwen2Attention", "GemmaAttention")
    return sum(type(m).__name__ in names for m in model.modules())


def flops_per_token(model: nn.Module, *, embed_dim: int, seq: int) -> float:
    return 6.0 * matmul_weights(model) + 12.0 * attention_modules(model) * embed_dim * seq


def build(kind: str, parent: DecoderConfig, cross_every: int) -> tuple[nn.Module, int]:
    """(model, width of its attention, heads x head dim) for one row kind."""
    attn = parent.heads * parent.head_dim
    if kind == "hf_opt":
        return hf_reference(parent), attn
    if kind == "decoder":
        return build_model(parent), attn
    if kind == "hf_opt_wide":
        return hf_reference(width_of(parent)), 2 * attn
    if kind == "jam_width":
        return build_model(width_of(parent)), 2 * attn
    if kind == "jam_cross":
        return build_model(cross_of(parent, cross_every)), attn
    raise ValueError(f"unknown model kind {kind!r}")


def make_step(
    model: nn.Module, *, tokens: torch.Tensor, device: torch.device, dtype: torch.dtype, optimizer: bool
) -> Callable[[], None]:
    """One training step on fixed tokens: forward, next-token cross-entropy, backward (+ AdamW)."""
    is_hf = not hasattr(model, "extract_features")
    autocast = dtype != torch.float32
    opt = None
    if optimizer:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    targets = tokens[:, 1:].reshape(-1)

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=autocast):
            logits = model(input_ids=tokens).logits if is_hf else model(tokens)  # (B, T, V)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    steps: dict[str, Callable[[], None]], *, warmup: int, repeats: int, device: torch.device,
    interleave: bool, progress,
) -> dict[str, float]:
    """Median seconds per step of each callable (round-robin when ``interleave``)."""
    times: dict[str, list[float]] = {k: [] for k in steps}

    def one(name: str, record: bool) -> None:
        sync(device)
        t0 = time.perf_counter()
        steps[name]()
        sync(device)
        if record:
            times[name].append(time.perf_counter() - t0)
        progress.update(1)

    order = [(r, n) for r in range(warmup + repeats) for n in steps] if interleave else [
        (r, n) for n in steps for r in range(warmup + repeats)
    ]
    for r, name in order:
        one(name, record=r >= warmup)
    return {k: statistics.median(v) for k, v in times.items()}


def run_shape(shape: str, args, device: torch.device, dtype: torch.dtype, progress) -> list[Row]:
    parent = dataclasses.replace(PRESETS[shape], max_positions=max(args.seq, 8))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, parent.vocab_size, (args.batch, args.seq), generator=g).to(device)
    n_tokens = args.batch * args.seq
    # (row name, kind, cross_every, baseline row) in table order.
    entries = []
    for kind in MODEL_KINDS:
        if kind not in args.models:
            continue
        baseline = {"decoder": "hf_opt", "jam_cross": "hf_opt", "jam_width": "hf_opt_wide"}.get(kind)
        baseline = baseline and hf_row_name(baseline, parent)
        for every in args.cross_every if kind == "jam_cross" else [0]:
            name = f"jam_cross_{every}" if kind == "jam_cross" else hf_row_name(kind, parent)
            entries.append((name, kind, every, baseline))
    if device.type == "cpu":
        # Round-robin within two groups: parent-shaped rows, then the twice-as-wide ones.
        groups = [[e for e in entries if e[1] not in ("hf_opt_wide", "jam_width")],
                  [e for e in entries if e[1] in ("hf_opt_wide", "jam_width")]]
    else:
        groups = [[e] for e in entries]  # one model (and its optimizer state) on the device at a time
    rows: dict[str, Row] = {}
    for group in filter(None, groups):
        models, steps = {}, {}
        for name, kind, every, baseline in group:
            torch.manual_seed(0)
            with device:  # build (and initialise) on the device: no multi-GB host copy
                model, E = build(kind, parent, every)
            model = model.train()
            rows[name] = Row(shape=shape, name=name, params=sum(p.numel() for p in model.parameters()),
                             flops_per_token=flops_per_token(model, embed_dim=E, seq=args.seq), baseline=baseline)
            models[name] = model
            steps[name] = make_step(model, tokens=tokens, device=device, dtype=dtype, optimizer=args.optimizer)
        try:
            timed = measure(steps, warmup=args.warmup, repeats=args.steps, device=device,
                            interleave=device.type == "cpu", progress=progress)
        except torch.OutOfMemoryError as e:  # pragma: no cover - GPU only
            for name in steps:
                rows[name].error = f"out of memory ({str(e).splitlines()[0][:60]})"
            timed = {}
        for name, s in timed.items():
            rows[name].step_s = s
            rows[name].tokens_per_s = n_tokens / s
        del models, steps
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "decoder" in rows:
        for row in rows.values():
            if row.name.startswith("jam_cross"):
                row.predicted_vs_decoder = rows["decoder"].flops_per_token / row.flops_per_token
    return list(rows.values())


def fmt_si(x: float) -> str:
    """1234567 -> '1.23M' (params, FLOPs)."""
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None or x != x else f"{x:.2f}x"


def print_table(rows: list[Row], *, device: torch.device, peak_tflops: float, out=sys.stdout) -> None:
    mfu = device.type == "cuda"
    head = ["shape", "model", "params", "FLOP/tok", "step ms", "tokens/s", "vs HF same shape",
            "vs decoder", "FLOP-predicted", "meas/pred"] + (["MFU"] if mfu else [])
    table = [head]
    by_key = {(r.shape, r.name): r for r in rows}
    for r in rows:
        base = by_key.get((r.shape, r.baseline)) if r.baseline else None
        dec = by_key.get((r.shape, "decoder"))
        vs_base = r.tokens_per_s / base.tokens_per_s if base else None
        vs_dec = r.tokens_per_s / dec.tokens_per_s if (dec and r.predicted_vs_decoder) else None
        meas_pred = vs_dec / r.predicted_vs_decoder if vs_dec else None
        line = [r.shape, r.name, fmt_si(r.params), fmt_si(r.flops_per_token),
                "-" if r.error else f"{r.step_s * 1e3:.1f}", "-" if r.error else f"{r.tokens_per_s:,.0f}",
                fmt_ratio(vs_base), fmt_ratio(vs_dec), fmt_ratio(r.predicted_vs_decoder), fmt_ratio(meas_pred)]
        if mfu:
            line.append("-" if r.error else f"{100 * r.tokens_per_s * r.flops_per_token / (peak_tflops * 1e12):.1f}%")
        if r.error:
            line[-1] += f"  [{r.error}]"
        table.append(line)
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    for k, row in enumerate(table):
        print("  ".join(str(c).rjust(w) if i > 1 else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))),
              file=out)
        if k == 0:
            print("  ".join("-" * w for w in widths), file=out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Training-step tokens/s of our decoder, JAM-Width and JAM-Cross next to HF OPT of the same "
        "shape, measured in the same run (ratios in the table; no pass/fail).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--shapes", default=None,
                    help=f"comma-separated parent presets ({', '.join(PRESETS)}); "
                    "default tiny,opt_125m on CPU, opt_1_3b on CUDA")
    ap.add_argument("--models", default=None,
                    help=f"comma-separated rows among {', '.join(MODEL_KINDS)}; default all on CPU, "
                    "hf_opt,decoder,jam_cross on CUDA (JAM-Width of 1.3B needs sharding to train)")
    ap.add_argument("--cross-every", default="2",
                    help="comma-separated cross_every values for the JAM-Cross rows (0 = no cross blocks)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default 2 on CPU, 8 on CUDA)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 128 on CPU, 2048 on CUDA)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per model; the median is reported "
                    "(default 3 on CPU, 10 on CUDA)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per model before timing")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                    help="compute dtype; bf16 = autocast over fp32 master weights")
    ap.add_argument("--optimizer", action=argparse.BooleanOptionalAction, default=None,
                    help="include an AdamW step (fused on CUDA) in each timed step (default: on CUDA only)")
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="accelerator peak for MFU (dense bf16; 989 = H100/H200 SXM)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    args.shapes = args.shapes or ("opt_1_3b" if cuda else "tiny,opt_125m")
    args.models = args.models or ("hf_opt,decoder,jam_cross" if cuda else ",".join(MODEL_KINDS))
    args.batch = args.batch or (8 if cuda else 2)
    args.seq = args.seq or (2048 if cuda else 128)
    args.steps = args.steps or (10 if cuda else 3)
    args.optimizer = cuda if args.optimizer is None else args.optimizer
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [s for s in shapes if s not in PRESETS] + [m for m in models if m not in MODEL_KINDS]
    if bad:
        ap.error(f"unknown shape/model {bad[0]!r}")
    try:
        args.cross_every = [int(x) for x in args.cross_every.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--cross-every must be comma-separated integers, got {args.cross_every!r}")
    if any(k < 0 for k in args.cross_every) or not args.cross_every:
        ap.error("--cross-every values must be >= 0")
    if min(args.batch, args.seq, args.steps) < 1 or args.warmup < 0:
        ap.error("--batch, --seq and --steps must be >= 1, --warmup >= 0")
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no CUDA device")
    args.shapes, args.models = shapes, models
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    n_rows = len([m for m in args.models if m != "jam_cross"]) + ("jam_cross" in args.models) * len(args.cross_every)
    total = len(args.shapes) * n_rows * (args.warmup + args.steps)
    rows: list[Row] = []
    with tqdm(total=total, desc="steps", file=sys.stderr, leave=False) as progress:
        for shape in args.shapes:
            rows += run_shape(shape, args, device, dtype, progress)
    print(f"# device={args.device} dtype={args.dtype} batch={args.batch} seq={args.seq} "
          f"steps={args.steps} (median) optimizer={'AdamW' if args.optimizer else 'none'} "
          f"threads={torch.get_num_threads()} torch={torch.__version__}")
    print_table(rows, device=device, peak_tflops=args.peak_tflops)
    return 0


if __name__ == "__main__":
    sys.exit(main())
