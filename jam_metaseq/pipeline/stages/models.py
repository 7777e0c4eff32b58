"""The model each training unit of ``jam run`` builds (paper §2.1): a parent's config (a given
parent's, a trained one's, else the plan's shape), a variant's config, and its training command's
model flags (``jam_metaseq.flags``)."""

from __future__ import annotations

import dataclasses
from typing import Any

from jam_metaseq.pipeline.spec import PARENTS, ShapeSpec, Variant
from jam_metaseq.pipeline.stages.context import Context


def parent_config(ctx: Context, role: str = "llm") -> Any:
    """Parent ``role``'s ``DecoderConfig`` (a given parent's, else the plan's shape for it:
    ``model``, or ``image_model`` for the image parent). Parents of one shape: either role's. A
    parent trained next to a given parent of another shape takes the plan's shape and every other
    field from the given one (``config.SHAPE_FIELDS``: all the rest is shared)."""
    from jam_metaseq.models.config import DecoderConfig, config_from_dict

    roles = [role] + ([] if ctx.plan.asymmetric else [r for r in PARENTS if r != role])
    for r in roles:
        if r in ctx.given:
            return ctx.given[r][0]
        m = ctx.markers.get("parents", {}).get(r, {})
        if m.get("config"):
            return config_from_dict(m["config"])
    s: ShapeSpec = ctx.plan.image_shape if role == "img" else ctx.plan.shape
    vocab_size = ctx.markers["tokenizers"].get("vocab_size", 0) or 8
    other = next((ctx.given[r][0] for r in PARENTS if r != role and r in ctx.given), None)
    if other is not None:
        # a parent trained next to a given one of another size (JAM-Cross): the plan's shape, every
        # other field (family, norm, rotary, padding, positions, vocabulary) the given parent's
        return dataclasses.replace(other, embed_dim=s.embed_dim, ffn_dim=s.ffn_dim, layers=s.layers, heads=s.heads,
                                   kv_heads=s.kv_heads, attn_head_dim=s.attn_head_dim, arch="decoder")
    return DecoderConfig(vocab_size=vocab_size, embed_dim=s.embed_dim, ffn_dim=s.ffn_dim, layers=s.layers,
                         heads=s.heads, max_positions=ctx.plan.data.tokens_per_sample, bias=s.bias,
                         affine_ln=s.affine_ln, activation=s.activation)


def variant_config(ctx: Context, v: Variant, *, role: str = "llm") -> Any:
    """The model a variant trains: the family's config of the (``role``) parent's shape; JAM-Cross
    with the image parent's shape for its image branch (``config.SHAPE_FIELDS``: what the host's
    ``--img-*`` flags carry)."""
    from jam_metaseq.models.config import SHAPE_FIELDS, cross_of, uniform_of, width_of

    parent = parent_config(ctx, role)
    if v.family == "jam_uniform":
        return uniform_of(parent)
    if v.family == "jam_width":
        return width_of(parent)
    img = parent_config(ctx, "img")
    return cross_of(parent, v.cross_every, cross_init=v.init,
                    image_parent=dataclasses.replace(parent, **{f: getattr(img, f) for f in SHAPE_FIELDS}))


def variant_flags(ctx: Context, v: Variant, *, role: str = "llm") -> tuple[str, list[str]]:
    """(arch, model flags) of a variant's training command: the family's ``_tiny`` arch (its
    preset has every switch off, so the flags decide every field) and
    ``flags.command_line_from_config``."""
    from jam_metaseq.flags import command_line_from_config

    return f"{v.family}_tiny", command_line_from_config(variant_config(ctx, v, role=role))


__all__ = ["parent_config", "variant_config", "variant_flags"]
