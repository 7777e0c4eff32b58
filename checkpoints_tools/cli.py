"""``jam-ckpt``: inspect, merge, widen, cross, reshard, convert, transplant, extend-vocab, tokenizer and verify
checkpoints (paper §2.1).

Each subcommand parses and validates its flags, then calls one library function
(``checkpoints_tools.ops`` / ``checkpoints_tools.load``). Progress bars go to stderr, results to
stdout; any error exits non-zero with a one-line message naming the file and tensor.

Examples:
  jam-ckpt inspect llm/checkpoint_last.pt
  jam-ckpt widen --llm llm/checkpoint_last.pt --img cm3leon/ --init copy --mp 4 --dtype fp16 -o width26b
  jam-ckpt cross --llm llm/ --img cm3leon/ --cross-every 2 --vocab vocab.json --mp 4 -o cross19b
  jam-ckpt reshard width26b --mp 2 --fsdp 8 -o width26b_mp2_fsdp8
  jam-ckpt convert facebook-opt-1.3b/ --to metaseq -o opt13b_metaseq
  jam-ckpt transplant --model llm/ --to-tokenizer img_tokenizer.json -o llm_in_img_tokens
  jam-ckpt extend-vocab cross19b --conversation-tokens -o cross19b_chat
  jam-ckpt convert SmolLM2-135M-Instruct.Q4_1.gguf --to metaseq -o smollm2
  jam-ckpt tokenizer SmolLM2-135M-Instruct.Q4_1.gguf -o smollm2_tok
  jam-ckpt widen --llm gemma-7b/ --img liquid-7b/ --vocab jam_vocab.json -o width_gemma
  jam-ckpt convert width_gemma --to hf -o width_gemma_hf   # a plain GemmaForCausalLM, twice as wide

Inputs: jam-ckpt outputs, metaseq/fairseq checkpoints (consolidated, model-parallel parts, FSDP
shards), safetensors files, Hugging Face directories of OPTForCausalLM, LlamaForCausalLM,
Qwen2ForCausalLM, GemmaForCausalLM and ChameleonForConditionalGeneration (its decoder; its VQ model
is read by jam_metaseq.image_tokenizer.hf_vqvae) (config.json + model.safetensors or a sharded set
with its index) and llama.cpp GGUF files of the llama architecture, read tensor by tensor. An HF Llama names
no padding id: give the parent's vocabulary manifest (--vocab, or vocab.json beside it;
docs/FAMILIES.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Sequence

import torch

from jam_metaseq.data.cli import add_layout_flags, layout_of
from jam_metaseq.errors import add_trust_pickle_flag, run_cli
from jam_metaseq.inputs import FINITE, NON_NEGATIVE_INT, POSITIVE_INT, SEED, THREADS  # issue 27: finite, bounded
from jam_metaseq.vocab import find_vocab

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def _add_input_flags(p: argparse.ArgumentParser) -> None:
    add_trust_pickle_flag(p)
    p.add_argument("--heads", type=POSITIVE_INT, metavar="H",
                   help="attention heads of the input when the checkpoint does not record them")


def _add_read_flags(p: argparse.ArgumentParser) -> None:
    """Flags of the commands that read tensors (not ``inspect``)."""
    _add_input_flags(p)
    p.add_argument("--allow-replica-mismatch", action="store_true",
                   help="when the model-parallel parts of an input hold different copies of a replicated "
                        "tensor (layer norms, some biases, positions), warn (naming the tensor and the largest "
                        "difference) and use part 0's, instead of stopping with an error")


def _add_output_flags(p: argparse.ArgumentParser, *, formats: Sequence[str] = ("metaseq", "safetensors")) -> None:
    p.add_argument("-o", "--out", required=True, type=Path, metavar="DIR",
                   help="output directory (created atomically: written to a temp dir .DIR.tmp-PID-... next to "
                        "it, then renamed; a temp dir left by a run that died is removed by the next run). Never "
                        "/, $HOME, the working directory or their parents, nor a directory holding an input")
    p.add_argument("--mp", type=POSITIVE_INT, default=1, metavar="M",
                   help="target model-parallel size: files NAME-model_part-{r}.pt (default 1 = consolidated)")
    p.add_argument("--fsdp", type=NON_NEGATIVE_INT, default=0, metavar="W",
                   help="write W FSDP shards per MP rank (NAME-model_part-{r}-shard{j}.pt, fairscale's flat "
                        "parameters and shard_metadata) for a fully-sharded run of MP x W processes with "
                        "--use-sharded-state; 0 = unflattened")
    p.add_argument("--format", choices=formats, default=formats[0],
                   help="metaseq .pt files, or one consolidated safetensors file")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="dtype of the written floating tensors (default: the inputs'); math is fp32 either way")
    p.add_argument("--name", default="checkpoint",
                   help="file stem; pass OUT/NAME.pt to metaseq --restore-file (default: checkpoint)")
    p.add_argument("--vocab", type=Path, metavar="JSON",
                   help="vocabulary manifest stored as OUT/vocab.json and in every file "
                        "(checked against the embedding; default: the input's own, if any)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT if it is an earlier jam-ckpt output (has manifest.json): the new output is "
                        "written next to it and swapped in atomically, then the old one removed; a crash at any "
                        "point leaves the old or the new output complete. Any other existing directory is refused")
    p.add_argument("--overwrite-any-dir", action="store_true",
                   help="like --overwrite, but also replace an existing directory that is NOT a jam-ckpt output "
                        "(no manifest.json): everything in it is deleted once the new output is in place")
    p.add_argument("--hash-sources", choices=("auto", "full", "none"), default="auto",
                   help="sha256 of the input files in manifest.json: auto = reuse the hash an input's own "
                        "jam-ckpt manifest.json records when the file's size matches and it is not newer "
                        "than that manifest, else read and hash it; full = always read and hash (one thread "
                        "per input file, kept at most 512 MiB ahead of the conversion's reads of it, so each "
                        "byte comes from the disk once); none = sizes only (default: auto)")
    p.add_argument("--no-hash-sources", action="store_true", help="same as --hash-sources none")
    p.add_argument("--threads", type=THREADS, default=1, metavar="N",
                   help="torch threads for the per-tensor math (default 1: the work is memory-bound and "
                        "more threads only wait on each other on a busy machine; 0 = torch's default)")
    p.add_argument("--allow-non-finite", action="store_true",
                   help="write tensors holding NaN or inf (listed in manifest.json as non_finite_tensors); by "
                        "default such a tensor (a NaN in an input, an overflow of --dtype fp16) stops the output "
                        "and nothing is written")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_read_flags(p)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="jam-ckpt", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="architecture, parameter count, MP/FSDP layout, dtype, vocab")
    p.add_argument("path", help="checkpoint file, directory, X.pt of MP parts, an HF directory (OPT, Llama, "
                                "Qwen2, Gemma) or a llama .gguf file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_input_flags(p)

    p = sub.add_parser("merge", help="JAM-Uniform (Eq. 1): weighted average of n parents of one shape")
    p.add_argument("parents", nargs="+", help="two or more parent checkpoints (any layout)")
    p.add_argument("--weights", type=FINITE, nargs="+", metavar="W",
                   help="one weight per parent (default 1/n each; Eq. 1 uses 0.5, 0.5)")
    _add_output_flags(p)

    p = sub.add_parser("widen", help="JAM-Width (Eq. 2/3): a 2x wider decoder from two parents")
    p.add_argument("--llm", required=True, help="text LLM parent")
    p.add_argument("--img", required=True, help="image-text (CM3leon) parent")
    p.add_argument("--init", choices=("copy", "average"), default="copy",
                   help="new off-diagonal blocks: copy each parent (Eq. 2) or the parents' average (Eq. 3)")
    _add_output_flags(p)

    p = sub.add_parser("cross", help="JAM-Cross (§2.1.3): both parents as branches + cross-attention blocks")
    p.add_argument("--llm", required=True, help="text LLM parent")
    p.add_argument("--img", required=True, help="image-text (CM3leon) parent")
    p.add_argument("--cross-every", type=NON_NEGATIVE_INT, default=2, metavar="N",
                   help="a cross-block pair after layers 0, N, 2N, ... (paper Table 4; 0 = none; default 2)")
    p.add_argument("--init", choices=("paper", "preserve"), default="paper",
                   help="new weights: paper = normal init; preserve = cross blocks start as identities "
                        "(each branch reproduces its parent)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the new weights (per tensor name)")
    p.add_argument("--init-seed-scheme", choices=("per-block", "per-tensor"), default="per-block",
                   help="how the normal draws of new weights are seeded (recorded in manifest.json as "
                        "init_seed_scheme): per-block = each block of 2^18 elements of a tensor from its own "
                        "generator seeded by (seed, name, block), drawn on two threads; per-tensor = one "
                        "generator per tensor seeded by (seed, name), the scheme of outputs whose manifest "
                        "records no init_seed_scheme: pass it to reproduce those (default: per-block)")
    p.add_argument("--image-vocab", type=NON_NEGATIVE_INT, nargs=2, metavar=("START", "END"),
                   help="embedding rows [START, END) taken from the image parent (default: the vocab "
                        "manifest's image range)")
    p.add_argument("--img-heads", type=POSITIVE_INT, metavar="H",
                   help="attention heads of the image parent when its checkpoint does not record them and "
                        "differ from --heads (parents of different sizes)")
    _add_output_flags(p)

    p = sub.add_parser("reshard", help="change layout: MP N->M, FSDP in/out, consolidated <-> sharded")
    p.add_argument("src", help="input checkpoint (any layout)")
    _add_output_flags(p)

    p = sub.add_parser("convert", help="Hugging Face <-> metaseq (OPT, Llama, Qwen2, Gemma); llama GGUF -> metaseq")
    p.add_argument("src", help="input: an HF directory (config.json + weights), a llama .gguf file (dequantized "
                               "to float32: F32/F16/BF16/Q8_0/Q4_0/Q4_1), a metaseq checkpoint or a jam-ckpt output")
    p.add_argument("--to", choices=("metaseq", "hf"), required=True,
                   help="hf: the model's own HF family layout (OUT/config.json + OUT/model.safetensors, or "
                        "model-0000i-of-0000n.safetensors shards with model.safetensors.index.json), loadable by "
                        "transformers' AutoModelForCausalLM with no custom code: a parent, or a JAM-Uniform / "
                        "JAM-Width model of a family's parents (a plain, wider model of that family). JAM-Cross has "
                        "no HF class: it is written in our layout only (--to metaseq). metaseq: .pt files")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="--to hf: bytes per safetensors shard at most, e.g. 5GB, 500MB, 2GiB (default 5GB, "
                        "save_pretrained's)")
    _add_output_flags(p, formats=("metaseq",))

    from jam_metaseq.vocab_transplant import DEFAULT_RULE, RULES

    p = sub.add_parser(
        "transplant", help="re-express a model's embedding and output rows in another text tokenizer",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Re-express a model's vocabulary rows (token embedding, output projection) in another text "
                    "tokenizer; every other tensor is copied bit for bit. Per id of the new tokenizer: an id whose "
                    "string (its bytes, or a special token's name) exists in the old tokenizer copies that id's "
                    "rows; any other id is cut into the fewest pieces of the old tokenizer that spell its bytes "
                    "and its row is built from theirs by --rule; an id no pieces spell gets the mean of the old "
                    "text rows. Non-text ids (specials, image codes, <break>, sentinels, <eoss>, conversation "
                    "tokens) keep their rows. The output's vocab.json is the input's with the new text range; "
                    "manifest.json records the rule and the share of ids copied exactly. --vocab names the "
                    "INPUT's manifest when its checkpoint has none (docs/FAMILIES.md, \"Chameleon and different "
                    "tokenizers\").")
    p.add_argument("--model", required=True, help="the model to transplant (a decoder, any layout)")
    p.add_argument("--to-tokenizer", required=True, metavar="T",
                   help="the new text tokenizer: a tokenizers .json (byte-level BPE or Metaspace) or a "
                        "sentencepiece .model (or spm:/bpe: spec, or 'bytes')")
    p.add_argument("--from-tokenizer", metavar="T",
                   help="the model's text tokenizer (default: the one its vocabulary manifest names)")
    p.add_argument("--to-vocab", metavar="MANIFEST",
                   help="the new vocabulary manifest whole (e.g. a Chameleon image parent's: jam-ckpt inspect shows "
                        "it, explicit ids): text ids from T as above, bos/pad/eos/unk, image begin/end, <eoss>, "
                        "sentinels and image codes from the model's ids of the same role, every other row the "
                        "mean of its text rows (default: the model's manifest with T's text range)")
    p.add_argument("--rule", choices=tuple(RULES), default=DEFAULT_RULE,
                   help="how a composed row is built: " + "; ".join(f"{k} = {v}" for k, v in RULES.items())
                        + f" (default {DEFAULT_RULE}: measured best here, docs/FAMILIES.md)")
    _add_output_flags(p)

    p = sub.add_parser("extend-vocab", help="the rows a grown vocabulary adds (conversation tokens), "
                       "set to the mean of the text rows; every old id unchanged")
    p.add_argument("src", help="input checkpoint (any layout) with its vocabulary manifest (stored or vocab.json "
                   "beside it; else --old-vocab)")
    p.add_argument("--conversation-tokens", action="store_true",
                   help="the new vocabulary is the checkpoint's own plus <user>, <assistant>, <eot> "
                        "(instead of --vocab NEW.json)")
    p.add_argument("--old-vocab", type=Path, metavar="JSON",
                   help="the manifest the checkpoint was trained with, when it stores none")
    p.add_argument("--init", choices=("text_mean",), default="text_mean",
                   help="how added rows start: text_mean = the mean of the same tensor's text rows (its logit "
                        "starts at the average text logit; docs/CONVERSATIONS.md)")
    _add_output_flags(p)
    for a in p._actions:
        if a.dest == "vocab":
            a.help = ("the new vocabulary manifest (it must extend the checkpoint's: the same ids plus the "
                      "conversation tokens, e.g. jam-data vocab --conversation-tokens); stored as OUT/vocab.json")

    p = sub.add_parser("tokenizer", help="a GGUF file's tokenizer as OUT/tokenizer.json + OUT/vocab.json for jam-data")
    p.add_argument("src", help="a .gguf file whose metadata holds a byte-level BPE tokenizer")
    p.add_argument("-o", "--out", required=True, type=Path, metavar="DIR",
                   help="output directory (created if missing): tokenizer.json (HF tokenizers; jam-data --tokenizer) "
                        "and vocab.json (a vocabulary manifest keeping the file's text ids as they are, its bos, eos "
                        "and pad among them, then the layout below; jam-data --vocab), each written atomically")
    add_layout_flags(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT/tokenizer.json or OUT/vocab.json")

    p = sub.add_parser("verify", help="check manifest hashes; forward pass on a few tokens if small")
    p.add_argument("path", help="a jam-ckpt output directory (or a file in one)")
    p.add_argument("--no-manifest", action="store_true",
                   help="check a checkpoint that is not a jam-ckpt output (no manifest.json): its structure "
                        "and the forward pass only, no hashes. Without it a missing manifest.json is an error")
    p.add_argument("--no-forward", action="store_true", help="skip the forward pass")
    p.add_argument("--max-forward-params", type=NON_NEGATIVE_INT, default=50_000_000, metavar="N",
                   help="run the forward pass only below this many parameters (default 50M)")
    _add_read_flags(p)
    return ap


def _opts(args: argparse.Namespace, argv: Sequence[str], *, fmt: str | None = None):
    from checkpoints_tools.io import OutputSpec
    from checkpoints_tools.ops import CommonOptions

    if args.mp < 1:
        raise ValueError(f"--mp must be >= 1, got {args.mp}")
    if args.fsdp < 0:
        raise ValueError(f"--fsdp must be >= 0, got {args.fsdp}")
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    from checkpoints_tools.io.hf_dir import DEFAULT_MAX_SHARD_SIZE, parse_size

    shard = getattr(args, "max_shard_size", None)
    spec = OutputSpec(out_dir=args.out, format=fmt or args.format, mp=args.mp, fsdp=args.fsdp,
                      dtype=DTYPES[args.dtype] if args.dtype else None, name=args.name,
                      overwrite=args.overwrite or args.overwrite_any_dir, overwrite_any_dir=args.overwrite_any_dir,
                      max_shard_size=parse_size(shard) if shard else DEFAULT_MAX_SHARD_SIZE,
                      allow_non_finite=args.allow_non_finite)
    return CommonOptions(spec=spec, vocab=str(args.vocab) if args.vocab else None,
                         hash_sources="none" if args.no_hash_sources else args.hash_sources,
                         progress=not args.quiet,
                         command=["jam-ckpt", *argv], trust_pickle=args.trust_pickle,
                         replica_mismatch=_replica_mismatch(args), threads=args.threads or None)


def _replica_mismatch(args: argparse.Namespace) -> str:
    return "warn" if args.allow_replica_mismatch else "error"


def _print_inspect(info: dict) -> None:
    rows = [("path", info["path"]), ("format", info["format"]), ("arch", info.get("arch")),
            ("layout", f"MP={info['mp']}" + (f", FSDP shards={info['fsdp_shards']}" if info["fsdp_shards"] else "")),
            ("files", len(info["files"])), ("tensors", info["tensors"]),
            ("parameters", f"{info['parameters']:,} ({info['parameters'] / 1e9:.3f} B)"),
            ("dtype", info["dtype"]), ("size", f"{info['bytes'] / 2**30:.3f} GiB"),
            ("embedding rows", info.get("embedding_rows")), ("vocab", info.get("vocab")),
            ("manifest", info.get("manifest"))]
    cfg = info.get("config")
    if cfg:
        c = cfg.get("parent", cfg)
        rows.insert(3, ("shape", f"layers={c['layers']} embed={c['embed_dim']} ffn={c['ffn_dim']} heads={c['heads']} "
                                 f"vocab={c['vocab_size']} positions={c['max_positions']}"
                                 + (f" cross_every={cfg['cross_every']}" if "cross_every" in cfg else "")))
        if c.get("positions") == "rotary" or c.get("norm", "layernorm") != "layernorm":  # a Llama-family block
            from jam_metaseq.models.config import config_from_dict

            p = config_from_dict(c)
            rows.insert(4, ("block", f"norm={p.norm} positions={p.positions} mlp={p.mlp} activation={p.activation} "
                                     f"kv_heads={p.num_kv_heads} head_dim={p.head_dim} "
                                     f"tied_head={p.tie_embeddings} rope_theta={p.rope_theta:g}"))
        if cfg.get("image_parent"):
            from jam_metaseq.models.config import config_from_dict

            x = config_from_dict(cfg)
            i = x.img
            rows.insert(4, ("image branch", f"layers={i.layers} embed={i.embed_dim} ffn={i.ffn_dim} heads={i.heads} "
                                            f"output width={x.output_dim}"))
            pairs = " ".join(f"{a}:{b}" for a, b in x.cross_pairs) or "none"
            rows.insert(5, ("cross pairs", f"{pairs}  (LLM layer:image layer)"))
    if info.get("config_error"):
        rows.append(("config", info["config_error"]))
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from checkpoints_tools import ops
    from checkpoints_tools.load import inspect_checkpoint, verify_checkpoint

    if args.cmd == "inspect":
        info = inspect_checkpoint(args.path, trust_pickle=args.trust_pickle, heads=args.heads)
        if args.json:
            print(json.dumps(info, indent=2, default=str))
        else:
            _print_inspect(info)
        return 0
    if args.cmd == "tokenizer":
        from checkpoints_tools.gguf_tokenizer import write_tokenizer

        print(json.dumps(write_tokenizer(args.src, args.out, layout=layout_of(args), overwrite=args.overwrite)))
        return 0
    if args.cmd == "verify":
        rep = verify_checkpoint(args.path, forward=not args.no_forward, max_forward_params=args.max_forward_params,
                                trust_pickle=args.trust_pickle, require_manifest=not args.no_manifest,
                                replica_mismatch=_replica_mismatch(args))
        print(json.dumps({"ok": True, **rep}, default=str))
        return 0
    if args.cmd == "merge":
        out = ops.merge(args.parents, opts=_opts(args, argv), weights=args.weights, heads=args.heads)
    elif args.cmd == "widen":
        out = ops.widen(args.llm, args.img, opts=_opts(args, argv), init=args.init, heads=args.heads)
    elif args.cmd == "cross":
        if args.cross_every < 0:
            raise ValueError(f"--cross-every must be >= 0, got {args.cross_every}")
        out = ops.cross(args.llm, args.img, opts=_opts(args, argv), cross_every=args.cross_every, init=args.init,
                        seed=args.seed, image_vocab=tuple(args.image_vocab) if args.image_vocab else None,
                        heads=args.heads, init_seed_scheme=args.init_seed_scheme, img_heads=args.img_heads)
    elif args.cmd == "reshard":
        out = ops.reshard(args.src, opts=_opts(args, argv), heads=args.heads)
    elif args.cmd == "transplant":
        out = ops.transplant(args.model, to_tokenizer=args.to_tokenizer, from_tokenizer=args.from_tokenizer,
                             opts=_opts(args, argv), rule=args.rule, heads=args.heads,
                             to_vocab=None if args.to_vocab is None else find_vocab(given=args.to_vocab))
    elif args.cmd == "extend-vocab":
        if bool(args.vocab) == args.conversation_tokens:
            raise ValueError("give the new vocabulary as --vocab NEW.json or --conversation-tokens (one of them)")
        opts = _opts(args, argv)
        out = ops.extend_vocab(args.src, opts=dataclasses.replace(opts, vocab=None), new_vocab=opts.vocab,
                               old_vocab=args.old_vocab, rule=args.init, heads=args.heads)
    elif args.cmd == "convert":
        fmt = "hf" if args.to == "hf" else "metaseq"
        out = ops.reshard(args.src, opts=_opts(args, argv, fmt=fmt), heads=args.heads)
    else:  # pragma: no cover - argparse guards this
        raise ValueError(f"unknown command {args.cmd}")
    print(out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    writes = args.cmd not in ("inspect", "verify", "tokenizer")
    return run_cli(f"jam-ckpt {args.cmd}", lambda: run(args, argv),
                   **({"interrupted": f"the temporary output was removed, {args.out} was not touched"}
                      if writes else {}))


if __name__ == "__main__":
    sys.exit(main())
