"""``jam``: the umbrella command. ``jam demo`` fuses two tiny random parents three ways (paper §2.1);
``jam params`` counts JAM-Cross parameters for two parent presets (OPT / CM3leon or Llama-family:
``--llm gemma_7b --img gemma_7b``), of the same or different sizes;
``jam run PLAN.yaml`` runs the whole pipeline declared in a plan; ``jam quickstart`` runs the
built-in plan (the pipeline in miniature); ``jam chat CHECKPOINT`` talks to a model in the terminal
and ``jam serve CHECKPOINT`` on a local web page (docs/CONVERSATIONS.md)."""

from __future__ import annotations

import argparse
import sys

import torch

from .errors import run_cli
from .inputs import SEED
from .fusion import cross_tensor, merge_tensor, state_shapes, widen_tensor
from .models import PRESETS, build_model, count_parameters, cross_of, preset, uniform_of, width_of
from .models.decoder import build_context
from .vocab import tiny_manifest


def parent_hidden(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """A parent's residual stream after its last layer (what a JAM-Cross branch must reproduce)."""
    d = model.decoder
    ctx = build_context(tokens, padding_idx=model.cfg.padding_idx, cache=None)
    x = d.embed(tokens, d.embed_positions, None)
    for layer in d.layers:
        x = layer(x, ctx)
    return x


def demo(*, seed: int) -> list[dict]:
    """Build two tiny parents, fuse them as JAM-Uniform / JAM-Width (copy, average) / JAM-Cross."""
    torch.manual_seed(seed)
    vocab = tiny_manifest()
    parent_cfg = preset("tiny", vocab_size=vocab.size)
    llm, img = build_model(parent_cfg).eval(), build_model(parent_cfg).eval()
    sd_llm, sd_img = llm.state_dict(), img.state_dict()
    text = torch.randint(vocab.text_start, vocab.text_end, (2, 16))
    image = torch.randint(vocab.image_start, vocab.image_end, (2, 16))

    rows = []
    variants = {
        "JAM-Uniform": (uniform_of(parent_cfg), lambda k, c: merge_tensor(k, [sd_llm[k], sd_img[k]])),
        "JAM-Width copy": (width_of(parent_cfg),
                           lambda k, c: widen_tensor(k, sd_llm[k], sd_img[k], parent=parent_cfg, init="copy")),
        "JAM-Width average": (width_of(parent_cfg),
                              lambda k, c: widen_tensor(k, sd_llm[k], sd_img[k], parent=parent_cfg, init="average")),
    }
    for every in (2, 1, 0):
        c = cross_of(parent_cfg, every, cross_init="preserve", image_vocab_start=vocab.image_start,
                     image_vocab_end=vocab.image_end)
        variants[f"JAM-Cross every {every}"] = (
            c, lambda k, c: cross_tensor(k, cfg=c, llm=sd_llm.__getitem__, img=sd_img.__getitem__, seed=seed))
    for name, (cfg, fuse) in variants.items():
        model = build_model(cfg).eval()
        model.load_state_dict({k: fuse(k, cfg) for k in state_shapes(cfg)}, strict=True)
        with torch.no_grad():
            logits = model(text)
            note = ""
            if name.startswith("JAM-Cross"):
                x_llm, _ = model.branch_features(text)
                _, x_img = model.branch_features(image)
                err = max((x_llm - parent_hidden(llm, text)).abs().max().item(),
                          (x_img - parent_hidden(img, image)).abs().max().item())
                note = f"preserve init: branches = parents (max |diff| {err:.1e})"
        rows.append({"model": name, "params": count_parameters(cfg), "logits": tuple(logits.shape), "note": note})
    return rows


def _print_demo(*, seed: int) -> int:
    rows = demo(seed=seed)
    print(f"{'model':<22}{'params':>10}  {'logits':<14}note")
    for r in rows:
        print(f"{r['model']:<22}{r['params']:>10,}  {str(r['logits']):<14}{r['note']}")
    return 0


def params_table(llm: str, img: str, everies: list[int]) -> list[dict]:
    """Parameter counts (meta device) of JAM-Cross with an LLM shaped like preset ``llm`` and an
    image decoder shaped like preset ``img`` (different sizes allowed), one row per cross_every."""
    a, b = preset(llm), preset(img)
    rows = []
    for every in everies:
        cfg = cross_of(a, every, image_parent=b)
        rows.append({"cross_every": every, "params": count_parameters(cfg),
                     "pairs": " ".join(f"{i}:{j}" for i, j in cfg.cross_pairs)})
    return rows


def _print_params(llm: str, img: str, everies: list[int]) -> int:
    a, b = preset(llm), preset(img)
    print(f"JAM-Cross: LLM {llm} ({count_parameters(a) / 1e9:.3f} B) x image decoder {img} "
          f"({count_parameters(b) / 1e9:.3f} B)")
    print(f"{'cross every':>11}  {'parameters':>16}  {'B':>7}  pairs (LLM layer:image layer)")
    for r in params_table(llm, img, everies):
        pairs = r["pairs"] if len(r["pairs"]) < 60 else r["pairs"][:57] + "..."
        print(f"{r['cross_every']:>11}  {r['params']:>16,}  {r['params'] / 1e9:>7.3f}  {pairs or 'none'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jam", description=__doc__)
    sub = parser.add_subparsers(dest="verb", required=True)
    p_demo = sub.add_parser("demo", help="fuse two tiny random parents three ways and print a table")
    p_demo.add_argument("--seed", type=SEED, default=0, help="random seed for the parents (default 0)")
    p_params = sub.add_parser("params", help="JAM-Cross parameter counts of two parent presets (meta device)")
    names = ", ".join(sorted(PRESETS))
    p_params.add_argument("--llm", default="opt_6_7b", choices=sorted(PRESETS), metavar="PRESET",
                          help=f"LLM parent preset, one of {names} (default %(default)s)")
    p_params.add_argument("--img", default="opt_1_3b", choices=sorted(PRESETS), metavar="PRESET",
                          help="image-decoder parent preset, any size and the LLM's family (default %(default)s)")
    p_params.add_argument("--cross-every", default="1,2,4,0",
                          help="comma-separated cross_every values, counted on the shallower branch (default %(default)s)")
    sub.add_parser("run", help="the JAM pipeline declared in a plan (YAML): jam run PLAN.yaml", add_help=False)
    sub.add_parser("quickstart", help="the JAM pipeline in miniature: jam run on the built-in plan", add_help=False)
    sub.add_parser("chat", help="talk to a model in the terminal, text and pictures: jam chat CHECKPOINT",
                   add_help=False)
    sub.add_parser("serve", help="talk to a model on a local web page: jam serve CHECKPOINT [--port N]",
                   add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.verb == "chat":
        from .generation.chat_cli import main as chat_main

        return chat_main(rest)
    if args.verb == "serve":
        from .serve.cli import main as serve_main

        return serve_main(rest)
    if args.verb == "quickstart":
        from .quickstart import main as quickstart_main

        return quickstart_main(rest)
    if args.verb == "run":
        from .pipeline.run import main as run_main

        return run_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.verb == "params":
        try:
            everies = [int(x) for x in args.cross_every.split(",") if x.strip()]
        except ValueError:
            parser.error(f"--cross-every must be comma-separated integers, got {args.cross_every!r}")
        return run_cli("jam params", lambda: _print_params(args.llm, args.img, everies))
    return run_cli("jam demo", lambda: _print_demo(seed=args.seed))


if __name__ == "__main__":
    sys.exit(main())
