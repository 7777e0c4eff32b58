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

from jam_metaseq.errors import run_cli
from jam_metaseq.inputs import INT64, finite_float

from .options import DTYPES, add_options, generation_config
from .run import PROMPT_PREFIXES, PromptSpec, RetrievalOptions, generate_answers, read_prompts_jsonl


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jam-generate",
        description="Generate interleaved text and images (text until <break>, an image of N codes "
        "with classifier-free guidance, <break>, text until <eos>).",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint file or directory (any layout jam-ckpt reads)")
    add_options(p, "generate")  # the model and decoding flags (shared with jam chat / jam serve)
    pr = p.add_argument_group("prompts")
    pr.add_argument("--prompt", action="append", default=[], help="a prompt text (repeatable)")
    pr.add_argument("--prompts", help="JSONL file: one {\"prompt\": str} or {\"prompt_ids\": [int]} per line, "
                    "optional \"seed\"")
    pr.add_argument("--prompt-prefix", default="auto", choices=sorted(PROMPT_PREFIXES),
                    help="what comes before each text prompt: eos (the document separator in training), bos, none, "
                    "or turn: the prompt as a conversation's first user turn, answered until <eot> (a model with "
                    "conversation tokens); auto (default) = turn with conversation tokens, else eos")
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
    config = generation_config(args)
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
