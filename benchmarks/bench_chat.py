"""Time to the first token of turn k of a conversation: the ``Conversation`` that keeps its KV cache
(the new turn is the only prefill) against re-prefilling the whole history into the same
conversation's cache (what a chat without a kept cache does every turn), k = 1..K, same run
(issue 25 item 3).

Each repeat runs one K-turn conversation on a randomly initialised model: before turn k the
baseline copies the history into a second conversation whose cache it empties (both caches are
allocated before anything is timed) and times its first token; then the kept-cache conversation answers
turn k in full (a short text and one picture, CFG on), its first token timed the same way: from
``say`` until the decode loop reports the first chosen token (read on the host, so the device has
finished). Medians over repeats; the ratio is re-prefill / cached.

    python benchmarks/bench_chat.py                                   # CPU, a small model
    python benchmarks/bench_chat.py --device cuda --dtype bfloat16 --shape opt_1_3b --image-tokens 256
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings

import torch

from jam_metaseq.generation.conversation import Conversation
from jam_metaseq.generation.engine import DECODE_MODES, Engine, GenerationConfig
from jam_metaseq.generation.sampling import SamplingConfig
from jam_metaseq.models import build_model, count_parameters, preset
from jam_metaseq.vocab import VocabManifest

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHAPES = {"small": dict(embed_dim=256, ffn_dim=1024, layers=4, heads=4)}
"""Shapes besides the presets: ``small`` runs 8 turns on two CPU cores in about a minute."""


def chat_vocab(*, text_size: int, image_tokens: int, image_codes: int) -> VocabManifest:
    side = math.isqrt(image_tokens)
    if side * side != image_tokens:
        raise SystemExit(f"--image-tokens {image_tokens} is not a square grid")
    return VocabManifest(text_size=text_size, image_codes=image_codes, num_sentinels=16,
                         image_tokens_per_image=image_tokens, image_grid=(side, side), conversation_tokens=True)


def user_message(vocab: VocabManifest, k: int, length: int) -> list[int]:
    return [vocab.text_start + (37 * k + 11 * j) % vocab.text_size for j in range(length)]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class FirstToken:
    """``should_stop`` that records when the first token was reported (and may stop there)."""

    def __init__(self, *, stop: bool) -> None:
        self.stop = stop
        self.at: float | None = None

    def __call__(self) -> bool:
        if self.at is None:
            self.at = time.perf_counter()
        return self.stop


def run(args: argparse.Namespace) -> list[dict]:
    device, dtype = args.device, DTYPES[args.dtype]
    vocab = chat_vocab(text_size=args.text_size, image_tokens=args.image_tokens, image_codes=args.image_codes)
    overrides = dict(vocab_size=vocab.size, max_positions=args.max_positions, dropout=0.0, attention_dropout=0.0)
    cfg = preset("tiny", **SHAPES[args.shape], **overrides) if args.shape in SHAPES else preset(args.shape, **overrides)
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(cfg).to(dtype=dtype).eval()
    sampling = SamplingConfig(temperature=1.0, top_p=0.9)
    config = GenerationConfig(max_new_tokens=args.answer_text + args.image_tokens + 2, text=sampling, image=sampling,
                              max_images=1, min_images=1, guidance_scale=3.5)
    per_turn = args.message + 4 + config.max_new_tokens
    if 1 + args.turns * per_turn > args.max_positions:
        raise SystemExit(f"{args.turns} turns of up to {per_turn} tokens do not fit --max-positions {args.max_positions}")
    print(f"device {device} ({torch.cuda.get_device_name() if device.startswith('cuda') else 'CPU'}), {args.dtype}, "
          f"{args.shape} ({count_parameters(cfg) / 1e6:.1f} M parameters), decode {args.decode}, "
          f"threads {torch.get_num_threads()}; turn = {args.message}-token message, answer of up to "
          f"{config.max_new_tokens} tokens with one {args.image_tokens}-token picture, CFG on", file=sys.stderr)

    def conversation() -> Conversation:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # graph -> static off CUDA
            return Conversation(Engine(model, vocab=vocab, decode=args.decode), config=config,
                                answer_room=config.max_new_tokens)

    warm = conversation()
    warm.say(user_message(vocab, 0, args.message))
    times: dict[int, dict[str, list[float]]] = {k: {"cached": [], "reprefill": []} for k in range(1, args.turns + 1)}
    lengths: dict[int, tuple[int, int]] = {}
    for r in range(args.repeats):
        main, base = conversation(), conversation()
        main.allocate()  # both caches allocated before anything is timed
        base.allocate()
        for k in range(1, args.turns + 1):
            message = user_message(vocab, k, args.message)
            # baseline: the same history, re-prefilled whole into the kept buffer
            base.history, base.turns = list(main.history), list(main.turns)
            base.seen.copy_(main.seen)
            base.cache.reset()
            base.fed = 0
            first = FirstToken(stop=True)
            sync(device)
            t0 = time.perf_counter()
            base.say(message, seed=k, should_stop=first)
            times[k]["reprefill"].append(first.at - t0)
            # the kept cache: only the new turn is prefilled; the answer is written in full
            first = FirstToken(stop=False)
            new_tokens = len(main.history) - main.fed + len(main.user_turn(message))
            history = len(main.history) + len(main.user_turn(message))
            sync(device)
            t0 = time.perf_counter()
            main.say(message, seed=k, should_stop=first)
            times[k]["cached"].append(first.at - t0)
            lengths[k] = (history, new_tokens)
        print(f"  repeat {r + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    rows = []
    for k in range(1, args.turns + 1):
        cached = statistics.median(times[k]["cached"])
        re = statistics.median(times[k]["reprefill"])
        rows.append({"turn": k, "history": lengths[k][0], "prefill": lengths[k][1], "cached_ms": cached * 1e3,
                     "reprefill_ms": re * 1e3, "ratio": re / cached})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="small", help=f"model shape: {', '.join(SHAPES)} or a preset (opt_125m, opt_1_3b, ...)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--decode", default="eager", choices=DECODE_MODES, help="the engine's decode mode")
    p.add_argument("--turns", type=int, default=8, help="turns per conversation (k = 1..turns)")
    p.add_argument("--repeats", type=int, default=3, help="conversations (medians over them)")
    p.add_argument("--message", type=int, default=16, help="text tokens per user message")
    p.add_argument("--answer-text", type=int, default=24, help="text tokens an answer may add to its picture")
    p.add_argument("--image-tokens", type=int, default=64, help="tokens per picture (a square grid; the quickstart's 64)")
    p.add_argument("--image-codes", type=int, default=8192)
    p.add_argument("--text-size", type=int, default=50000)
    p.add_argument("--max-positions", type=int, default=2048)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args)
    print(f"\n{'turn k':>6} {'history':>8} {'prefill':>8} {'cached ms':>10} {'re-prefill ms':>14} {'ratio':>7}")
    for r in rows:
        print(f"{r['turn']:>6} {r['history']:>8} {r['prefill']:>8} {r['cached_ms']:>10.1f} "
              f"{r['reprefill_ms']:>14.1f} {r['ratio']:>7.2f}")
    print("history: tokens up to the new turn's <assistant>; prefill: what the kept cache runs for it; "
          "ratio: re-prefill / cached time to the first token (medians)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
