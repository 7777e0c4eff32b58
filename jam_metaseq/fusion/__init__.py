"""Fusion math (paper §2.1.1-2.1.3) as pure, tensor-wise functions: ``(name, parent tensors) -> tensor``.

The checkpoint tools stream parents one tensor at a time through these; tests call them on tiny
tensors. All results are fp32 (accumulation in fp32); the caller casts to the output dtype.
"""

from __future__ import annotations

import functools
import json

import torch

from ..models import build_model
from ..models.config import CrossConfig, DecoderConfig, ModelConfig, config_from_json, config_to_json
from .cross import cross_tensor, fresh_tensor
from .uniform import merge_tensor
from .width import WIDEN_INITS, widen_matrix, widen_tensor

FUSION_METHODS = ("uniform", "width", "cross")

__all__ = [
    "FUSION_METHODS", "WIDEN_INITS", "cross_state_shapes", "cross_tensor", "decoder_state_shapes",
    "fresh_tensor", "merge_tensor", "state_shapes", "widen_matrix", "widen_tensor",
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
