"""``jam-eval``: the paper's evaluations for any JAM checkpoint (paper §3.2-3.3, Tables 1-5).

    jam-eval ppl --checkpoint CKPT --data wiki.jsonl [--kind text]          Wikipedia-style PPL
    jam-eval ppl --checkpoint CKPT --data coco_val --kind caption           MS-COCO-style PPL
    jam-eval lm-eval --model-args checkpoint=CKPT,tokenizer=TOK --tasks jam_table1 --data-dir DIR
    jam-eval tasks --data-dir DIR --out TASKS      (YAMLs for lm_eval's own CLI: --include_path TASKS)

``ppl`` prints one row per data file (overall, text-token and image-token PPL; definition in
``jam_metaseq.eval.ppl``) and writes the full numbers as JSON with ``--output``. ``lm-eval`` (alias
``zeroshot``) runs lm-evaluation-harness with the ``jam`` model on local task files
(``jam_metaseq.eval.tasks``) and prints accuracy per task. Progress goes to stderr, results to
stdout; bad input exits with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch

from jam_metaseq.errors import add_trust_pickle_flag, run_cli
from jam_metaseq.inputs import NON_NEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT, SEED, dumps_json


def _write_json(path: str, obj: Any) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    try:
        # strict JSON: a metric that does not exist (image PPL of a text-only set) is null, not NaN
        tmp.write_text(dumps_json(obj, nan_as_null=True, indent=2, default=str) + "\n")
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)  # interrupted or failed: no stray temp file


def _fmt(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jam-eval", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{ppl,lm-eval,tasks}")

    q = sub.add_parser("ppl", help="text / image-caption perplexity (Tables 2-5)",
                       description="Token-weighted perplexity of a checkpoint over local data files "
                                   "(definition: jam_metaseq/eval/ppl.py). Each document is scored as training "
                                   "presents a document that starts a block: alone, from position 0, its first "
                                   "token as context (jam_metaseq/eval/context.py; the same rule as jam run).")
    q.add_argument("--checkpoint", required=True,
                   help="checkpoint file or folder (jam-ckpt output, or a .pt with 'model' + config)")
    q.add_argument("--data", required=True, nargs="+",
                   help="JSONL documents file(s) and/or binarized dataset prefix(es) (jam-data binarize)")
    q.add_argument("--kind", choices=("text", "caption", "auto"), default="auto",
                   help="text: Wikipedia-style, refuses documents with images; caption: MS-COCO-style, every "
                        "document must hold an image; auto: no check (default)")
    q.add_argument("--tokenizer", help="text tokenizer spec for JSONL input (.model, .json, spm:/bpe: prefix or "
                                       "'bytes'); default: the vocabulary manifest's text_tokenizer")
    q.add_argument("--config", help="model config JSON overriding the checkpoint's (config_to_json format)")
    q.add_argument("--vocab", help="vocabulary manifest JSON overriding the checkpoint's")
    q.add_argument("--batch-size", type=POSITIVE_INT, default=8, help="windows per forward pass (default 8)")
    q.add_argument("--max-len", type=POSITIVE_INT,
                   help="window length in tokens (default: the model's max_positions)")
    q.add_argument("--stride", type=POSITIVE_INT,
                   help="new targets per window, <= max-len (default: max-len, i.e. no overlap)")
    q.add_argument("--use-loss-mask", action="store_true",
                   help="count only targets with loss mask True (instruction data: the response only)")
    q.add_argument("--limit", type=POSITIVE_INT, help="evaluate at most this many documents per file")
    q.add_argument("--device", default="cpu", help="torch device (default cpu)")
    q.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="model weights dtype; log-probabilities are always fp32 (default float32)")
    add_trust_pickle_flag(q)
    q.add_argument("--output", help="write the full results as JSON here (atomically)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")

    z = sub.add_parser("lm-eval", aliases=["zeroshot"], help="zero-shot tasks through lm-eval (Table 1)",
                       description="Zero-shot multiple-choice accuracy with lm-evaluation-harness and the "
                                   "'jam' model, on local task files (jam_metaseq/eval/tasks.py).")
    z.add_argument("--model-args", required=True,
                   help="jam model args, k=v comma-separated: checkpoint=PATH[,tokenizer=SPEC,config=,vocab=,"
                        "max_length=,device=,dtype=,trust_pickle=]")
    add_trust_pickle_flag(z)
    z.add_argument("--tasks", required=True,
                   help="comma-separated task names: piqa_local, arc_easy_local, arc_challenge_local, "
                        "storycloze_local, winograd_local, winogrande_local, the group jam_table1 (all whose "
                        "files exist), names of --mc-task tasks, or tasks under --include-path")
    z.add_argument("--data-dir", help="folder with piqa.jsonl, arc_easy.jsonl, arc_challenge.jsonl, "
                                      "storycloze.jsonl, winograd.jsonl, winogrande.jsonl (any subset)")
    z.add_argument("--mc-task", action="append", default=[], metavar="NAME=FILE",
                   help="a plain multiple-choice task from a JSONL of {context, choices, label}; repeatable")
    z.add_argument("--include-path", action="append", default=[],
                   help="extra folder of lm_eval task YAMLs (their data must be local); repeatable")
    z.add_argument("--include-defaults", action="store_true",
                   help="also index lm_eval's built-in tasks (slow; they download data, so offline they fail)")
    z.add_argument("--batch-size", type=POSITIVE_INT, default=8, help="requests per forward pass (default 8)")
    z.add_argument("--limit", type=POSITIVE_FLOAT, help="at most this many documents per task (or a fraction < 1)")
    z.add_argument("--num-fewshot", type=NON_NEGATIVE_INT, default=0, help="few-shot examples (Table 1 is zero-shot: 0)")
    z.add_argument("--seed", type=SEED, default=1234, help="random seed for lm_eval (default 1234)")
    z.add_argument("--cache-dir", help="datasets cache folder for the local JSON files (default: HF default)")
    z.add_argument("--output", help="write lm_eval's results (plus jam_summary) as JSON here (atomically)")

    t = sub.add_parser("tasks", help="write the local task YAMLs for lm_eval's own CLI (--include_path)",
                       description="Write lm_eval task YAMLs for the Table 1 task files found in --data-dir "
                                   "(and any --mc-task) into --out, for use as lm_eval --include_path.")
    t.add_argument("--data-dir", help="folder with the Table 1 JSONL files (see jam-eval lm-eval --help)")
    t.add_argument("--mc-task", action="append", default=[], metavar="NAME=FILE",
                   help="a plain multiple-choice task from a JSONL of {context, choices, label}; repeatable")
    t.add_argument("--out", required=True, help="folder to write the YAML files into")
    t.add_argument("--cache-dir", help="datasets cache folder written into the task configs")
    return p


def _run_ppl(args: argparse.Namespace) -> int:
    from jam_metaseq.eval.ppl import evaluate_ppl_files

    results = evaluate_ppl_files(
        checkpoint=args.checkpoint, data=args.data, kind=args.kind, tokenizer=args.tokenizer,
        config=args.config, vocab=args.vocab, batch_size=args.batch_size, max_len=args.max_len,
        stride=args.stride, use_loss_mask=args.use_loss_mask, limit=args.limit, device=args.device, dtype=args.dtype,
        trust_pickle=args.trust_pickle, progress=not args.no_progress)
    print(f"{'data':<40} {'kind':<8} {'docs':>6} {'tokens':>9} {'PPL':>10} {'text PPL':>10} {'image PPL':>10}")
    for path, r in results.items():
        print(f"{path[-40:]:<40} {r['kind']:<8} {r['sequences']:>6} {r['tokens']:>9} {_fmt(r['ppl']):>10} "
              f"{_fmt(r['text']['ppl']):>10} {_fmt(r['image']['ppl']):>10}")
    if args.output:
        _write_json(args.output, results)
    return 0


def _mc_tasks(items: list[str]) -> dict[str, str]:
    mc = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--mc-task expects NAME=FILE, got {item!r}")
        name, path = item.split("=", 1)
        mc[name] = path
    return mc


def _run_tasks(args: argparse.Namespace) -> int:
    from jam_metaseq.eval.tasks import write_task_configs

    names = write_task_configs(out_dir=args.out, data_dir=args.data_dir, mc_tasks=_mc_tasks(args.mc_task),
                               cache_dir=args.cache_dir)
    if not names:
        raise FileNotFoundError(f"no task files found in {args.data_dir} and no --mc-task given")
    print("\n".join(names))
    return 0


def _run_lm_eval(args: argparse.Namespace) -> int:
    from jam_metaseq.eval.zeroshot import parse_model_args, run_zeroshot

    mc = _mc_tasks(args.mc_task)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    model_args = parse_model_args(args.model_args)
    if args.trust_pickle:
        model_args["trust_pickle"] = "true"
    results = run_zeroshot(
        tasks=tasks, model_args=model_args, data_dir=args.data_dir, mc_tasks=mc,
        include_path=args.include_path, include_defaults=args.include_defaults, batch_size=args.batch_size,
        limit=limit, num_fewshot=args.num_fewshot, seed=args.seed, cache_dir=args.cache_dir)
    print(f"{'task':<28} {'n':>6} {'acc':>8} {'acc_norm':>9}")
    for task, row in results["jam_summary"].items():
        acc, norm = row.get("acc"), row.get("acc_norm")
        print(f"{task:<28} {int(row.get('n', 0)):>6} {_fmt(acc) if acc is not None else '-':>8} "
              f"{_fmt(norm) if norm is not None else '-':>9}")
    if args.output:
        _write_json(args.output, {k: v for k, v in results.items() if k != "samples"})
    return 0


def _run(args: argparse.Namespace) -> int:
    with torch.no_grad():  # scoped: callers in the same process (tests, quickstart) keep autograd
        if args.command == "ppl":
            return _run_ppl(args)
        if args.command == "tasks":
            return _run_tasks(args)
        return _run_lm_eval(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(f"jam-eval {args.command}", lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
