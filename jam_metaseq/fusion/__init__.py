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

from .cross import (
    DEFAULT_INIT_SEED_SCHEME, INIT_SEED_SCHEMES, cross_plan, cross_tensor, draw_normal, fresh_rule, fresh_tensor,
)
from .shapes import cross_state_shapes, decoder_state_shapes, state_shapes
from .uniform import average_pair, merge_tensor
from .width import WIDEN_INITS, block_value, widen_blocks, widen_matrix, widen_tensor, widened_shape

FUSION_METHODS = ("uniform", "width", "cross")

__all__ = [
    "DEFAULT_INIT_SEED_SCHEME", "FUSION_METHODS", "INIT_SEED_SCHEMES", "WIDEN_INITS", "average_pair", "block_value",
    "cross_plan", "cross_state_shapes", "cross_tensor", "decoder_state_shapes", "draw_normal", "fresh_rule",
    "fresh_tensor", "merge_tensor", "state_shapes", "widen_blocks", "widen_matrix", "widen_tensor", "widened_shape",
]
