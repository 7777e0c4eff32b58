"""``jam-generate``: interleaved text-and-image answers from a JAM checkpoint (paper §3.1).

    jam-generate --checkpoint ckpt.pt --tokenizer spm.model --prompt "How can I make shakshuka?"
    jam-generate --checkpoint ckpt_dir --prompts prompts.jsonl --out answers/ --image-tokenizer vq/
    jam-generate --checkpoint ckpt.pt --prompt "A red bicycle" --retrieve bank/ --clip-checkpoint clip.pt

``--retrieve`` prefixes each prompt with the documents a memory bank (``jam-retrieval build``)
retrieves for it (paper §3.1 retrieval augmentation; layout, context rule and CFG rows in
``run.py``'s docstring).

Parses and validates flags, then calls ``run.generate_answers``. Progress (image tokens) goes to
stderr; answers go to stdout as JSON lines, or to ``--out`` as answers.jsonl/.md/.html + PNGs.
"""

from __future__ import annotations

import argparse
import sys

import torch

from jam_metaseq.errors import add_trust_pickle_flag, run_cli
from jam_metaseq.inputs import (FINITE, INT64, NON_NEGATIVE_FLOAT, NON_NEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT,
                                SEED, finite_float)

from .engine import DECODE_MODES, GenerationConfig
from .run import PROMPT_PREFIXES, PromptSpec, RetrievalOptions, generate_answers, read_prompts_jsonl
from .sampling import SamplingConfig

# float64: a reference run whose tokens every decode mode and batch size reproduces (rounding of
# float32 logits can tip a near-tied draw; see docs/TESTING.md).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jam-generate",
        description="Generate interleaved text and images (text until <break>, an image of N codes "
        "with classifier-free guidance, <break>, text until <eos>).",
    )
    src = p.add_argument_group("model")
    src.add_argument("--checkpoint", required=True, help="checkpoint file or directory (any layout jam-ckpt reads)")
    src.add_argument("--vocab", help="vocabulary manifest JSON (default: stored in the checkpoint, or vocab.json beside it)")
    src.add_argument("--tokenizer", help="text tokenizer: .model (sentencepiece), .json (HF BPE) or 'bytes' "
                     "(default: the manifest's text_tokenizer)")
    src.add_argument("--image-tokenizer", help="image tokenizer to decode image codes to PNG (needs --out); "
                     "without it images are written as code grids")
    src.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    src.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights/activations dtype (default: float32; float64 for reference runs)")
    add_trust_pickle_flag(src)
    pr = p.add_argument_group("prompts")
    pr.add_argument("--prompt", action="append", default=[], help="a prompt text (repeatable)")
    pr.add_argument("--prompts", help="JSONL file: one {\"prompt\": str} or {\"prompt_ids\": [int]} per line, "
                    "optional \"seed\"")
    pr.add_argument("--prompt-prefix", default="eos", choices=sorted(PROMPT_PREFIXES),
                    help="token put before each text prompt (default eos: the document separator in training)")
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=POSITIVE_INT, default=1280, help="generated tokens per answer, images included")
    g.add_argument("--temperature", type=NON_NEGATIVE_FLOAT, default=1.0, help="text temperature (0 = greedy); paper: 1")
    g.add_argument("--top-p", type=finite_float(0.0, 1.0, lo_open=True), default=0.9, help="text nucleus mass (1 = off); paper: 0.8-1")
    g.add_argument("--top-k", type=NON_NEGATIVE_INT, default=0, help="text top-k (0 = off)")
    g.add_argument("--repetition-penalty", type=POSITIVE_FLOAT, default=1.0, help="CTRL penalty on seen text tokens (1 = off)")
    g.add_argument("--image-temperature", type=NON_NEGATIVE_FLOAT, help="image temperature (default: --temperature)")
    g.add_argument("--image-top-p", type=finite_float(0.0, 1.0, lo_open=True), help="image nucleus mass (default: --top-p)")
    g.add_argument("--image-top-k", type=NON_NEGATIVE_INT, help="image top-k (default: --top-k)")
    g.add_argument("--guidance-scale", type=FINITE, default=3.5, help="CFG alpha of Eq. 6 for image tokens; paper: 3.5-4")
    g.add_argument("--no-guidance", action="store_true", help="no unconditional rows (half the compute, unguided images)")
    g.add_argument("--images", default="auto", choices=["auto", "force", "forbid"],
                   help="auto: the model decides; force: start with an image; forbid: text only")
    g.add_argument("--max-images", type=NON_NEGATIVE_INT, default=3, help="images per answer")
    g.add_argument("--min-images", type=NON_NEGATIVE_INT, default=0, help="forbid <eos> until this many images were written")
    g.add_argument("--seed", type=SEED, default=0, help="prompt i uses seed + i unless its JSONL line sets one")
    g.add_argument("--batch-size", type=POSITIVE_INT, default=8, help="prompts decoded together (each pair of CFG rows counts once)")
    g.add_argument("--decode", default="auto", choices=("auto", *DECODE_MODES),
                   help="decode steps: eager (fastest on CPU), static (fixed shapes, few host syncs) or graph "
                   "(static steps replayed as CUDA graphs; falls back to static with a warning off CUDA; "
                   "measured 19-24x HF generate on an H200); auto = graph on CUDA, eager elsewhere. "
                   "Same seeds give the same answers in every mode")
    r = p.add_argument_group("retrieval augmentation")
    r.add_argument("--retrieve", metavar="BANK_DIR",
                   help="memory bank (jam-retrieval build): put the documents retrieved for each text prompt "
                   "before it; the prefix gets the context left by the prompt and --max-new-tokens")
    r.add_argument("--retrieve-k", type=INT64, default=2, help="documents retrieved per prompt (default 2, as in the paper)")
    r.add_argument("--retrieve-threshold", type=finite_float(none_ok=True), default=0.9,
                   help="skip candidates scoring above this relevance (too close to the prompt), or 'none' "
                   "(default 0.9)")
    r.add_argument("--clip-checkpoint",
                   help="local CLIP weights of the query encoder (default: the path recorded in the bank; "
                   "without either the encoder is randomly initialised, with a warning)")
    o = p.add_argument_group("output")
    o.add_argument("--out", help="directory for answers.jsonl, answers.md, answers.html and images/ "
                   "(default: JSON lines on stdout)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def _run(args: argparse.Namespace) -> int:
    if bool(args.prompt) == bool(args.prompts):
        raise ValueError("give --prompt (repeatable) or --prompts FILE.jsonl, not both or neither")
    if args.image_tokenizer and not args.out:
        raise ValueError("--image-tokenizer writes PNG files: give --out DIR")
    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    if args.clip_checkpoint and not args.retrieve:
        raise ValueError("--clip-checkpoint is for --retrieve: give --retrieve BANK_DIR")
    retrieval = None if not args.retrieve else RetrievalOptions(
        bank_dir=args.retrieve, k=args.retrieve_k, score_threshold=args.retrieve_threshold,
        clip_checkpoint=args.clip_checkpoint,
    )
    specs = read_prompts_jsonl(args.prompts) if args.prompts else [
        PromptSpec(text=t, source=f"--prompt {i + 1}") for i, t in enumerate(args.prompt)
    ]
    text = SamplingConfig(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
    )
    image = SamplingConfig(
        temperature=args.temperature if args.image_temperature is None else args.image_temperature,
        top_p=args.top_p if args.image_top_p is None else args.image_top_p,
        top_k=args.top_k if args.image_top_k is None else args.image_top_k,
    )
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens, text=text, image=image,
        guidance_scale=args.guidance_scale, guidance=not args.no_guidance,
        max_images=0 if args.images == "forbid" else args.max_images,
        min_images=0 if args.images == "forbid" else args.min_images,
        force_image_first=args.images == "force", seed=args.seed,
    )
    answers = generate_answers(
        checkpoint=args.checkpoint, prompts=specs, config=config, vocab_path=args.vocab,
        tokenizer=args.tokenizer, image_tokenizer=args.image_tokenizer, out_dir=args.out,
        batch_size=args.batch_size, device=args.device, dtype=DTYPES[args.dtype],
        prompt_prefix=PROMPT_PREFIXES[args.prompt_prefix], progress=not args.no_progress,
        retrieval=retrieval, decode=args.decode, trust_pickle=args.trust_pickle,
    )
    if args.out:
        print(f"wrote {len(answers)} answers to {args.out}", file=sys.stderr)
    else:
        from .render import to_jsonl

        sys.stdout.write(to_jsonl(answers))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("jam-generate", lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
