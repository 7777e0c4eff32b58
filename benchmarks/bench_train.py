"""Training throughput of JAM-Cross through the fairseq host, next to a plain decoder of the
parent's shape measured in the same run (paper §2.1.3; Table 4's cost of cross blocks).

Each step is what ``fairseq-train`` does per batch: the host model wrapper's forward, the ``cm3``
criterion, backward, an Adam step. The predicted ratio (JAM-Cross tokens/s over decoder tokens/s)
is decoder FLOPs / JAM-Cross FLOPs per token, with 6 x (matmul parameters) + 12 x T x E per
attention (self or cross) for forward + backward. Target: measured ratio >= 0.9 x predicted.

    python benchmarks/bench_train.py --shapes tiny,opt_125m
"""

from __future__ import annotations

import argparse
import sys
import time
from argparse import Namespace

import torch


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters used in matrix multiplies: every 2-D weight except lookup tables (the tied output
    projection counts once, as the logits matmul)."""
    seen, n = set(), 0
    for name, p in model.named_parameters():
        if p.dim() != 2 or id(p) in seen:
            continue
        seen.add(id(p))
        if "embed_positions" in name:
            continue
        n += p.numel()
    return n


def flops_per_token(model: torch.nn.Module, *, attentions: int, seq_len: int, embed_dim: int) -> float:
    return 6.0 * matmul_params(model) + 12.0 * attentions * seq_len * embed_dim


def build(kind: str, parent, *, cross_every: int, seq_len: int, batch: int) -> dict:
    """The host model, criterion, optimizer and one fixed batch for ``kind`` (decoder | jam_cross)."""
    from jam_metaseq import flags as jam_flags
    from jam_metaseq.hosts import args as jam_args
    from jam_metaseq.hosts.fairseq import CM3Criterion, JamLanguageModel, dictionary_from_manifest
    from jam_metaseq.vocab import tiny_manifest

    vocab = tiny_manifest(text_size=parent.vocab_size - 48, image_codes=32) \
        if parent.vocab_size > 200 else tiny_manifest()
    family = "jam_cross" if kind == "jam_cross" else "jam_uniform"
    ns = Namespace(**jam_flags.args_from_config(parent))
    jam_args.apply_arch_defaults(ns, family=family, size="tiny")  # fills nothing: all flags are set
    ns.cross_every = cross_every
    task = Namespace(vocab=vocab, target_dictionary=dictionary_from_manifest(vocab))
    model = JamLanguageModel.build_model(ns, task)
    cfg = model.jam_config
    attentions = (2 * cfg.parent.layers + 2 * len(cfg.cross_after)) if kind == "jam_cross" else cfg.layers
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, vocab.size, (batch, seq_len + 1), generator=g)
    sample = {"net_input": {"src_tokens": tokens[:, :-1]}, "target": tokens[:, 1:],
              "loss_weights": torch.ones(batch, seq_len), "ntokens": batch * seq_len, "nsentences": batch}
    model.train()
    return {"model": model, "crit": CM3Criterion(task), "sample": sample, "times": [],
            "opt": torch.optim.Adam(model.parameters(), lr=1e-4),
            "params": sum(p.numel() for p in model.parameters()),
            "flops": flops_per_token(model, attentions=attentions, seq_len=seq_len, embed_dim=parent.embed_dim)}


def step(run: dict) -> float:
    """One training step as fairseq's train_step does it; returns seconds."""
    t0 = time.perf_counter()
    loss, _, _ = run["crit"](run["model"], run["sample"])
    loss.backward()
    run["opt"].step()
    run["opt"].zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def bench_pair(parent, *, cross_every: int, seq_len: int, batch: int, steps: int, warmup: int) -> tuple[dict, dict]:
    """Decoder and JAM-Cross steps interleaved (ABAB...), so machine load hits both alike."""
    runs = [build(kind, parent, cross_every=cross_every, seq_len=seq_len, batch=batch)
            for kind in ("decoder", "jam_cross")]
    for i in range(warmup + steps):
        for run in runs:
            t = step(run)
            if i >= warmup:
                run["times"].append(t)
    for run in runs:
        run["tok_s"] = batch * seq_len / sorted(run["times"])[len(run["times"]) // 2]  # median step
    return runs[0], runs[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="tiny,opt_125m", help="parent presets, comma separated (default %(default)s)")
    p.add_argument("--cross-every", type=int, default=2, help="JAM-Cross cross block frequency (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default %(default)s)")
    p.add_argument("--batch", type=int, default=2, help="sequences per step (default %(default)s)")
    p.add_argument("--steps", type=int, default=5, help="timed steps, median reported (default %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default %(default)s)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from jam_metaseq.hosts import register_hosts
    from jam_metaseq.models.config import preset

    if "fairseq" not in register_hosts(import_hosts=True):
        print("bench_train: fairseq is not installed", file=sys.stderr)
        return 1
    print(f"{'shape':<10} {'model':<10} {'params':>12} {'tokens/s':>10} {'ratio':>7} {'predicted':>9} {'meas/pred':>9}")
    for shape in args.shapes.split(","):
        parent = preset(shape, dropout=0.0, attention_dropout=0.0,
                        max_positions=max(args.seq_len, 64))
        if shape == "tiny":
            parent = preset(shape, vocab_size=112, max_positions=max(args.seq_len, 64))
        print(f"bench_train: {shape} ...", file=sys.stderr)
        base, cross = bench_pair(parent, cross_every=args.cross_every, seq_len=args.seq_len,
                                 batch=args.batch, steps=args.steps, warmup=args.warmup)
        ratio = cross["tok_s"] / base["tok_s"]
        pred = base["flops"] / cross["flops"]
        print(f"{shape:<10} {'decoder':<10} {base['params']:>12,} {base['tok_s']:>10.1f} {1.0:>7.3f} {1.0:>9.3f} {1.0:>9.3f}")
        print(f"{shape:<10} {'jam_cross':<10} {cross['params']:>12,} {cross['tok_s']:>10.1f} {ratio:>7.3f} "
              f"{pred:>9.3f} {ratio / pred:>9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
