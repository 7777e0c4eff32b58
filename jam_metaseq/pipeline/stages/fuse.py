"""Stage ``fuse``: ``jam-ckpt`` (``checkpoints_tools.ops``) builds every variant from the two
parents: JAM-Uniform (Eq. 1), JAM-Width (Eq. 2-3), JAM-Cross (§2.1.3)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jam_metaseq.pipeline.spec import PARENTS, VARIANTS, Variant
from jam_metaseq.pipeline.stages.context import Context, parent_checkpoint, tokenizer_paths
from jam_metaseq.pipeline.units import PipelineError


def stage_fuse(ctx: Context) -> dict[str, dict]:
    plan, p = ctx.plan, ctx.p
    out = {}
    llm, img = parent_checkpoint(ctx, "llm"), parent_checkpoint(ctx, "img")
    vocab = tokenizer_paths(ctx)["vocab"]
    heads = plan.parents.llm.heads or plan.parents.img.heads
    for key in plan.variants:
        v = VARIANTS[key]

        def build(tmp: Path, v: Variant = v) -> dict:
            from checkpoints_tools import ops
            from checkpoints_tools.io import OutputSpec

            target = tmp / "ckpt"
            opts = ops.CommonOptions(spec=OutputSpec(out_dir=target), vocab=str(vocab), hash_sources=False,
                                     progress=ctx.progress, command=["jam run", "fuse", v.key])
            if v.family == "jam_uniform":
                ops.merge([llm, img], opts=opts, weights=[0.5, 0.5], heads=heads)
            elif v.family == "jam_width":
                ops.widen(llm, img, opts=opts, init=v.init, heads=heads)
            else:
                ops.cross(llm, img, opts=opts, cross_every=v.cross_every, init=v.init, seed=plan.seed, heads=heads)
            pts = sorted(target.glob("*.pt"))
            if len(pts) != 1:
                raise PipelineError(f"{target}: jam-ckpt wrote {len(pts)} .pt files, expected 1")
            return {"checkpoint": f"ckpt/{pts[0].name}"}

        parents = [ctx.markers["parents"][r]["run"] for r in PARENTS]
        out[key] = p.unit("fuse", f"fused/{key}", {"parents": parents, "variant": dataclasses.asdict(v),
                                                   "seed": plan.seed}, build)
    ctx.markers["fused"] = out
    return out


def run(ctx: Context) -> None:
    stage_fuse(ctx)


__all__ = ["run", "stage_fuse"]
