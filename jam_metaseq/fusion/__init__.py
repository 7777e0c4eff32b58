"""Fusion math (paper §2.1.1-2.1.3) as pure, tensor-wise functions: ``(name, parent tensors) -> tensor``.

This package is the one statement of Eq. 1 (``uniform``), Eq. 2-3 (``width``) and the JAM-Cross
init (``cross``). Where a rule says which part of a tensor comes from where, it is data
(``widen_blocks``, ``cross_plan``, ``fresh_rule``) and the arithmetic is a small function of the
parents' parts (``merge_tensor``, ``block_value``, ``average_pair``, ``draw_normal``), so
``checkpoints_tools.kernels`` can stream a tensor chunk by chunk through the same functions the
whole-tensor versions (``merge_tensor``, ``widen_tensor``, ``cross_tensor``) use. All results are
fp32 (accumulation in fp32); the caller casts to the output dtype.
"""

from __future__ import annotations

import functools
import json

import torch

from ..models import build_model
from ..models.config import CrossConfig, DecoderConfig, ModelConfig, config_from_json, config_to_json
from .cross import (
    DEFAULT_INIT_SEED_SCHEME, INIT_SEED_SCHEMES, cross_plan, cross_tensor, draw_normal, fresh_rule, fresh_tensor,
)
from .uniform import average_pair, merge_tensor
from .width import WIDEN_INITS, block_value, widen_blocks, widen_matrix, widen_tensor, widened_shape

FUSION_METHODS = ("uniform", "width", "cross")

__all__ = [
    "DEFAULT_INIT_SEED_SCHEME", "FUSION_METHODS", "INIT_SEED_SCHEMES", "WIDEN_INITS", "average_pair", "block_value",
    "cross_plan", "cross_state_shapes", "cross_tensor", "decoder_state_shapes", "draw_normal", "fresh_rule",
    "fresh_tensor", "merge_tensor", "state_shapes", "widen_blocks", "widen_matrix", "widen_tensor", "widened_shape",
]


@functools.lru_cache(maxsize=32)
def _shapes(cfg_json: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    with torch.device("meta"):
        model = build_model(config_from_json(cfg_json))
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict(keep_vars=True).items())


def state_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Ordered {state-dict key: shape} of the model ``cfg`` describes (built on the meta device)."""
    return dict(_shapes(config_to_json(cfg)))


def decoder_state_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
    return state_shapes(cfg)


def cross_state_shapes(cfg: CrossConfig) -> dict[str, tuple[int, ...]]:
    return state_shapes(cfg)
